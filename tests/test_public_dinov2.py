"""DINOv2 / RAD-DINO: Hugging Face, timm and original layouts converted into medfm's ViT, compared with the
upstream implementation (random weights, tiny sizes) on the same input, at the native and a resampled grid."""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from medfm.encoders import create_encoder, create_model_and_transforms, saved_architecture
from medfm.encoders.formats import identify, open_checkpoint

from medfm.cli import main

from .public_helpers import QUIET, finetune_lora_cli

RAD_DINO_NORM = {"image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583]}
TOL = dict(rtol=1e-5, atol=1e-5)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """What the upstream image processor feeds its model for a grey image in [0, 1]."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (x.expand(-1, 3, -1, -1) - m) / s


def _hf_folder(tmp_path, registers: bool, swiglu: bool, layers: int = 2):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, image_size=28, patch_size=14,
              use_swiglu_ffn=swiglu, layerscale_value=0.5)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    with torch.no_grad():  # random, not zero, tokens so a misplaced one shows
        for p in model.embeddings.parameters():
            p.normal_()
    folder = tmp_path / f"hf_dinov2_{registers}_{swiglu}_{layers}"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({**RAD_DINO_NORM, "crop_size": {"height": 28, "width": 28}}))
    return model.eval(), folder


@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, True)])
def test_hugging_face_dinov2_parity(tmp_path, registers, swiglu):
    ref, folder = _hf_folder(tmp_path, registers, swiglu)
    assert identify(open_checkpoint(folder)).name == "dinov2-hf"
    arch = saved_architecture(folder)
    assert arch["name"] == "dinov2" and arch["embed_dim"] == 32 and arch["depth"] == 2
    assert arch["mlp"] == ("swiglu" if swiglu else "gelu") and arch.get("reg_tokens", 0) == (4 if registers else 0)
    for size in (28, 56):  # the native grid (2 x 2), then a resampled one (4 x 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the position-grid resampling note at 56 px
            ours = create_encoder("dinov2", img_size=size, pretrained=folder).eval()
        x = torch.rand(2, 1, size, size)
        with torch.no_grad():
            out = ref(pixel_values=_normalise(x, RAD_DINO_NORM["image_mean"], RAD_DINO_NORM["image_std"]))
            torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, **TOL)
            torch.testing.assert_close(ours(x), out.pooler_output, **TOL)
    assert ours.preprocess == {"preset": "radiograph_2d", "size": 28, "args": {}}
    model, transform = create_model_and_transforms(folder)
    assert model.img_size == (28, 28) and transform is not None


def _timm_dinov2(name: str = "vit_small_patch14_reg4_dinov2"):
    torch.manual_seed(1)
    ref = timm.create_model(name, embed_dim=48, depth=2, num_heads=1, img_size=28, num_classes=0).eval()
    with torch.no_grad():
        for p in (ref.cls_token, ref.reg_token):
            if p is not None:
                p.normal_()
    return ref


def test_timm_dinov2_parity(tmp_path):
    ref = _timm_dinov2()
    path = tmp_path / "vit_small_patch14_reg4_dinov2.safetensors"
    save_file(ref.state_dict(), path)
    assert identify(open_checkpoint(path)).name == "dinov2-timm"
    ours = create_encoder("dinov2", img_size=28, pretrained=path).eval()
    assert ours.reg_token.shape == (1, 4, 48)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        ref_in = _normalise(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(ref_in), **TOL)
        torch.testing.assert_close(ours(x), ref.forward_head(ref.forward_features(ref_in), pre_logits=True), **TOL)


def _to_original(sd: dict, swiglu: bool) -> dict:
    """A timm DINOv2 state dict written back in facebookresearch/dinov2's layout (the inverse of timm's own
    ``_convert_dinov2``, which the test runs to check this inverse)."""
    out = {(k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3") if swiglu else k): v
           for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    out["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    if "reg_token" not in sd:
        return {**out, "cls_token": sd["cls_token"], "pos_embed": sd["pos_embed"]}
    pos = torch.randn(1, 1, sd["pos_embed"].shape[-1])  # the class token's own slot, absorbed by timm
    out["pos_embed"] = torch.cat([pos, sd["pos_embed"]], dim=1)
    out["cls_token"] = sd["cls_token"] - pos[:, 0]
    out["register_tokens"] = sd["reg_token"]
    return out


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"])
def test_original_dinov2_layout_parity(tmp_path, name):
    """Registers (ViT-S/14-reg4) and SwiGLU with chunked blocks (ViT-g/14: ``mlp.w12``, ``blocks.0.N``)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = _timm_dinov2(name)
    swiglu = "giant" in name
    original = _to_original(ref.state_dict(), swiglu)
    back = checkpoint_filter_fn(dict(original), ref)  # timm reads our stand-in as an original checkpoint
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=1e-6, atol=1e-6)
    if swiglu:  # the giant release chunks its blocks: blocks.0.0 .. blocks.0.N
        original = {k.replace("blocks.", "blocks.0.", 1): v for k, v in original.items()}
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(original, path)
    assert identify(open_checkpoint(path)).name == "dinov2-original"
    ours = create_encoder("dinov2", img_size=28, pretrained=path).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        ref_in = _normalise(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(ref_in), **TOL)


def test_dinov2_inflates_to_3d(tmp_path):
    """A 2D DINOv2 in a 3D task: a volume constant along depth gives the 2D encoder's embedding."""
    _, folder = _hf_folder(tmp_path, registers=True, swiglu=False)
    flat = create_encoder("dinov2", img_size=28, pretrained=folder).eval()
    with pytest.warns(UserWarning, match="inflated"):
        vol = create_encoder("dinov2", spatial_dims=3, img_size=(14, 28, 28), pretrained=folder).eval()
    g = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(vol(g[:, :, None].expand(-1, -1, 14, -1, -1).contiguous()), flat(g), rtol=1e-4, atol=1e-4)


def test_dinov2_lora_finetunes_from_the_cli_and_reloads(tmp_path, slices, capsys):
    _, folder = _hf_folder(tmp_path, registers=True, swiglu=True)
    metrics = finetune_lora_cli(folder, slices, tmp_path / "lora")
    out = capsys.readouterr().out
    assert "-> dinov2" in out and "img_size 32 -> 28" in out, out
    assert metrics["encoder"] == "dinov2" and 0 < metrics["trainable_params"] < metrics["total_params"]
    assert 0.0 <= metrics["val"]["auroc"] <= 1.0


def test_dinov2_patch14_segments_2d_and_inflates_into_a_3d_task(tmp_path, slices):
    """Patch 14 in the UNETR decoder (decoded at stride 16, resampled to the input), and the 2D model in 3D."""
    from .finetune_helpers import mni_map_classes

    _, folder = _hf_folder(tmp_path, registers=True, swiglu=False, layers=4)
    metrics = finetune_lora_cli(folder, slices, tmp_path / "seg", recipe="segment_2d")
    assert metrics["encoder"] == "dinov2" and 0.0 <= metrics["val"]["mean_dice"] <= 1.0
    run = tmp_path / "cls3d"
    assert main(["finetune", "classify_3d", "--profile", "tiny", "--encoder", str(folder), "--method", "lora",
                 "--data", str(mni_map_classes(tmp_path)), "--out", str(run), "classification.label=map", *QUIET]) == 0
    assert json.loads((run / "metrics.json").read_text())["encoder"] == "dinov2"


def test_transformers_4_key_names_convert_the_same(tmp_path):
    """Hub folders saved before transformers 5 (RAD-DINO's) name the attention `attention.attention.query` /
    `attention.output.dense` and the SwiGLU `mlp.weights_in` (gate and value packed) / `weights_out`."""
    import re

    ref, folder = _hf_folder(tmp_path, registers=True, swiglu=True)
    from safetensors.torch import load_file

    sd = load_file(str(folder / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        k2 = re.sub(r"attention\.([qkv])_proj", lambda m: "attention.attention." + {"q": "query", "k": "key", "v": "value"}[m.group(1)], k)
        k2 = k2.replace("attention.o_proj", "attention.output.dense").replace("mlp.down_proj", "mlp.weights_out")
        if "mlp.up_proj" in k2:
            continue
        if "mlp.gate_proj" in k2:
            v, k2 = torch.cat([v, sd[k.replace("gate_proj", "up_proj")]]), k2.replace("mlp.gate_proj", "mlp.weights_in")
        old[k2] = v
    assert any("attention.attention.query" in k for k in old) and any("weights_in" in k for k in old)
    save_file(old, folder / "model.safetensors")
    ours = create_encoder("dinov2", img_size=28, pretrained=folder).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        out = ref(pixel_values=_normalise(x, RAD_DINO_NORM["image_mean"], RAD_DINO_NORM["image_std"]))
        torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, **TOL)


def test_mae_pretraining_continues_from_rad_dino_layout(tmp_path, slices):
    """Pretraining continuation: MAE on real MNI152 slices from an HF DINOv2-with-registers folder; the encoder it
    saves is a dinov2 with its registers and InputNorm, and reloads alone."""
    import medfm

    _, folder = _hf_folder(tmp_path, registers=True, swiglu=True)
    run = tmp_path / "mae"
    assert main(["pretrain", "mae_vit_2d", "--profile", "tiny", f"encoder.pretrained={folder}", "--data", slices,
                 "--out", str(run), "trainer.enable_progress_bar=false"]) == 0
    enc = medfm.load(run / "encoder")
    assert enc.architecture == "dinov2" and enc.reg_token.shape == (1, 4, 32) and enc.input_norm.channels == 3
    assert torch.isfinite(enc(torch.rand(1, 1, 28, 28))).all()
