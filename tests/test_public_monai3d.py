"""3D foundation encoders from MONAI: SwinUNETR's self-supervised Swin ViT (model_swinvit.pt layout) and CT-FM's
SegResEncoder, converted and compared with MONAI's own modules (random weights) map by map; each trains a 3D
task from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import save_file

from medfm.cli import main
from medfm.encoders import create_encoder, create_model_and_transforms, saved_architecture
from medfm.encoders.formats import identify, open_checkpoint

from .finetune_helpers import mni_hemispheres
from .public_helpers import QUIET

SWIN = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=3)


def _ssl_layout(swin_vit: torch.nn.Module) -> dict:
    """The Swin ViT's weights as model_swinvit.pt stores them: ``module.`` keys, ``mlp.fc1`` / ``fc2``, and the
    self-supervision heads beside them."""
    sd = {f"module.{k}".replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
          for k, v in swin_vit.state_dict().items()}
    sd["module.rotation_head.weight"] = torch.zeros(4, 192)
    sd["module.contrastive_head.weight"] = torch.zeros(512, 192)
    sd["module.conv.0.weight"] = torch.zeros(96, 192, 1, 1, 1)
    return sd


def test_swinunetr_ssl_parity(tmp_path):
    torch.manual_seed(0)
    ref = SwinUNETR(in_channels=1, out_channels=2, **SWIN).eval()
    sd = _ssl_layout(ref.swinViT)
    check = SwinUNETR(in_channels=1, out_channels=2, **SWIN)
    check.load_from({"state_dict": sd})  # MONAI's own reader accepts the stand-in as the SSL file
    torch.testing.assert_close(check.swinViT.layers4[0].blocks[0].mlp.linear1.weight,
                               ref.swinViT.layers4[0].blocks[0].mlp.linear1.weight)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"epoch": 100, "state_dict": sd}, path)
    assert identify(open_checkpoint(path)).name == "swinunetr-ssl"
    arch = saved_architecture(path)
    assert arch == {"name": "swin_vit", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 3}
    ours = create_encoder("swin_vit", spatial_dims=3, img_size=32, pretrained=path).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = ref.swinViT(x, normalize=True)
        got = ours.forward_intermediates(x)
    assert len(got) == 5 and [m.shape[-1] for m in got] == [16, 8, 4, 2, 1]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _ct_fm_folder(tmp_path):
    torch.manual_seed(0)
    ref = SegResEncoder(spatial_dims=3, init_filters=8, in_channels=1, blocks_down=(1, 2, 2, 4, 4)).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path / "ct_fm_feature_extractor"
    folder.mkdir()
    save_file(ref.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"init_filters": 8, "blocks_down": [1, 2, 2, 4, 4], "in_channels": 1,
                                                    "spatial_dims": 3, "norm": "batch", "act": "relu"}))
    return ref, folder


def test_ct_fm_segres_encoder_parity(tmp_path):
    ref, folder = _ct_fm_folder(tmp_path)
    assert identify(open_checkpoint(folder)).name == "ct-fm"
    ours = create_encoder("segres_encoder", spatial_dims=3, img_size=32, pretrained=folder).eval()
    assert ours.preprocess["args"]["window"] == [-1024, 2048]
    model, transform = create_model_and_transforms(folder)  # 3D, with CT-FM's HU window as its transform
    assert model.spatial_dims == 3 and transform.transforms[2].scaler.a_min == -1024
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = ref(x)[1:]
        got = ours.forward_intermediates(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # 3D runs from the CLI
def test_3d_foundation_encoders_train_from_the_cli(tmp_path):
    """CT-FM and the SwinUNETR-SSL encoder, each LoRA-tuned to segment MNI152 tissue (3D)."""
    manifest = str(mni_hemispheres(tmp_path))
    _, folder = _ct_fm_folder(tmp_path)
    run = tmp_path / "ctfm"
    assert main(["finetune", "segment_3d", "--profile", "tiny", "--encoder", str(folder), "--data", manifest,
                 "--out", str(run), "segmentation.num_classes=3", "--method", "lora", *QUIET]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == "segres_encoder" and 0 < metrics["trainable_params"] < metrics["total_params"]
    torch.manual_seed(0)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": _ssl_layout(SwinUNETR(in_channels=1, out_channels=2, **SWIN).swinViT)}, path)
    run = tmp_path / "swin"
    assert main(["finetune", "segment_3d", "--profile", "tiny", "--encoder", str(path), "--data", manifest,
                 "--out", str(run), "segmentation.num_classes=3", "--method", "lora", *QUIET]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == "swin_vit" and 0 < metrics["trainable_params"] < metrics["total_params"]


def test_monai_vit_m3d_layout_parity(tmp_path):
    """M3D-CLIP's vision encoder: a MONAI ViT with perceptron patches (no class token) and one with a class token."""
    from monai.networks.nets import ViT

    for classification in (False, True):
        torch.manual_seed(0)
        ref = ViT(in_channels=1, img_size=(8, 32, 32), patch_size=(4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=2,
                  num_heads=2, proj_type="perceptron", classification=classification, num_classes=3).eval()
        folder = tmp_path / f"m3d_{classification}"
        folder.mkdir()
        save_file({f"vision_encoder.{k}": v for k, v in ref.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"img_size": [8, 32, 32], "patch_size": [4, 16, 16], "num_heads": 2}))
        assert identify(open_checkpoint(folder)).name == "monai-vit"
        ours = create_encoder("monai_vit", spatial_dims=3, img_size=(8, 32, 32), pretrained=folder).eval()
        x = torch.rand(2, 1, 8, 32, 32)
        with torch.no_grad():
            h = ref.patch_embedding(x)
            if classification:
                h = torch.cat([ref.cls_token.expand(2, -1, -1), h], 1)
            for blk in ref.blocks:
                h = blk(h)
            tokens = ref.norm(h)
            torch.testing.assert_close(ours.forward_features(x), tokens, rtol=1e-5, atol=1e-5)
            if not classification:
                torch.testing.assert_close(ours.forward_features(x), ref(x)[0], rtol=1e-5, atol=1e-5)
    run = tmp_path / "m3d_lora"
    from .finetune_helpers import mni_map_classes

    assert main(["finetune", "classify_3d", "--profile", "tiny", "--encoder", str(folder), "--method", "lora",
                 "--data", str(mni_map_classes(tmp_path)), "--out", str(run), "classification.label=map", *QUIET]) == 0
    assert json.loads((run / "metrics.json").read_text())["encoder"] == "monai_vit"
