"""timm checkpoints: exact 2D compatibility, 2D->3D inflation, RGB->grayscale adaptation."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

from medfm.encoders import create_encoder


@pytest.fixture(scope="module")
def timm_vit_file(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224").eval()
    path = tmp_path_factory.mktemp("ckpt") / "vit_small_patch16_224.pth"
    torch.save(model.state_dict(), path)
    return model, path


def _timm_embedding(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_timm_vit_loads_exactly(timm_vit_file, tmp_path):
    timm_model, path = timm_vit_file
    # the encoder-only state dict (num_classes=0) loads with nothing to adapt and no warning
    headless = tmp_path / "headless.safetensors"
    from safetensors.torch import save_file

    sd = {k: v for k, v in timm_model.state_dict().items() if not k.startswith("head.")}
    save_file(sd, headless)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = create_encoder("vit_small", spatial_dims=2, in_chans=3, img_size=224, pretrained=headless).eval()
    assert set(ours.state_dict()) == set(sd)
    # the full checkpoint: only the classifier head is dropped, and the warning says so
    with pytest.warns(UserWarning, match=r"dropped classifier head \['head.bias', 'head.weight'\]") as rec:
        ours_full = create_encoder("vit_small", spatial_dims=2, in_chans=3, img_size=224, pretrained=path).eval()
    assert "pos_embed" not in str(rec[0].message) and "inflated" not in str(rec[0].message)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = _timm_embedding(timm_model, x)
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours_full(x), ref, rtol=1e-5, atol=1e-5)


def test_rgb_to_grayscale_and_2d_to_3d_inflation(timm_vit_file):
    timm_model, path = timm_vit_file
    with pytest.warns(UserWarning, match="input channels 3 -> 1"):
        gray2d = create_encoder("vit_small", spatial_dims=2, in_chans=1, img_size=224, pretrained=path).eval()
    with pytest.warns(UserWarning) as rec:
        vol3d = create_encoder("vit_small", spatial_dims=3, in_chans=1, img_size=(16, 224, 224), pretrained=path).eval()
    msg = str(rec[0].message)
    for expected in ("input channels 3 -> 1", "inflated 1 2D kernel(s) to 3D", "patch_embed.proj.weight"):
        assert expected in msg
    assert vol3d.patch_embed.proj.weight.shape == (384, 1, 16, 16, 16)

    g = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        # grayscale weights = RGB weights summed: a gray image gives timm's output on (g, g, g)
        torch.testing.assert_close(gray2d(g), _timm_embedding(timm_model, g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
        # inflation: a volume constant along depth gives the 2D model's output on its slice
        vol = g[:, :, None].expand(-1, -1, 16, -1, -1).contiguous()
        torch.testing.assert_close(vol3d(vol), gray2d(g), rtol=1e-4, atol=1e-4)
        # larger volumes work: the position grid is resampled in-plane and repeated along depth
        with pytest.warns(UserWarning, match=r"pos_embed: resampled \(1, 197, 384\) -> \(1, 33, 384\) for grid \(2, 4, 4\)"):
            big = create_encoder("vit_small", spatial_dims=3, img_size=(32, 64, 64), pretrained=path)
        assert big(torch.randn(1, 1, 32, 64, 64)).shape == (1, 384)


def test_timm_resnet_2d_exact_and_3d_inflated(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18").eval()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    with pytest.warns(UserWarning, match=r"dropped classifier head \['net.fc.bias', 'net.fc.weight'\]"):
        ours = create_encoder("resnet18", spatial_dims=2, in_chans=3, pretrained=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref.forward_head(ref.forward_features(x), pre_logits=True), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="inflated 20 2D kernel"):
        vol = create_encoder("resnet18", spatial_dims=3, in_chans=1, pretrained=path).eval()
    with torch.no_grad():
        assert vol(torch.randn(1, 1, 32, 32, 32)).shape == (1, 512)


def test_weights_never_unpickled_beyond_tensors(tmp_path):
    """A pickle carrying code is refused: torch.load(weights_only=True) only rebuilds tensors."""

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"patch_embed.proj.weight": Evil()}, path)
    with pytest.raises(ValueError, match="refused: the file holds pickled Python objects") as e:  # and no advice
        create_encoder("vit_micro", pretrained=path)                                              # to unpickle it
    assert "weights_only=False" not in str(e.value)
