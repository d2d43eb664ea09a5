"""The public-model front door: `medfm models` lists and identifies, `hf:` ids resolve from the local cache, and
every bad checkpoint (wrong family, truncated, pickled, missing keys, unknown layout) is one line naming the
file and what did not fit, exit 2."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from medfm.cli import main
from medfm.encoders import create_encoder, list_formats

from .public_helpers import QUIET

FAMILIES = ("dinov2-hf", "dinov2-original", "dinov2-timm", "open-clip-timm", "sam", "swinunetr-ssl", "ct-fm",
            "monai-vit", "xrv-densenet121", "xrv-resnet50", "clip-hf")


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_dinov2", embed_dim=48, depth=2, num_heads=1, img_size=28, num_classes=0)
    path = tmp_path_factory.mktemp("dinov2") / "vit_small_patch14_dinov2.safetensors"
    save_file(ref.state_dict(), path)
    return path


def _one_error_line(capsys, *expected: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    for text in expected:
        assert text in err[0], err[0]
    return err[0]


def test_models_lists_every_family_and_identifies_a_checkpoint(dinov2_file, capsys):
    assert {f.name for f in list_formats()} == set(FAMILIES)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in FAMILIES:
        assert f"{name}  -> encoder" in out
    assert "smollm2  SmolLM2-135M-Instruct" in out and "tiny-random-llama" in out  # the language models
    assert main(["models", str(dinov2_file)]) == 0
    out = capsys.readouterr().out
    assert "dinov2-timm" in out and "dinov2(embed_dim=48" in out and "parameters" in out


def test_hf_ids_resolve_from_the_local_cache_offline(dinov2_file, tmp_path, monkeypatch, capsys):
    """`hf:ORG/NAME` reads a snapshot in the Hugging Face cache with no network; an id not cached is one line."""
    cache = tmp_path / "hub"
    snap = cache / "models--medfm-test--tiny-dinov2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(dinov2_file.read_bytes())
    (cache / "models--medfm-test--tiny-dinov2" / "refs").mkdir()
    (cache / "models--medfm-test--tiny-dinov2" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert main(["models", "hf:medfm-test/tiny-dinov2"]) == 0
    assert "dinov2-timm" in capsys.readouterr().out
    enc = create_encoder("dinov2", img_size=28, pretrained="hf:medfm-test/tiny-dinov2")
    assert enc(torch.rand(1, 1, 28, 28)).shape == (1, 48)
    assert main(["models", "hf:medfm-test/not-downloaded"]) == 2
    _one_error_line(capsys, "hf:medfm-test/not-downloaded", "not in the local Hugging Face cache")


def test_bad_checkpoints_are_one_line_and_exit_2(dinov2_file, tmp_path, slices, capsys):
    # the wrong family: a DINOv2 checkpoint built as a ViT-S/16, and a 2D-only SAM encoder in a 3D task
    with pytest.raises(ValueError, match="a dinov2 checkpoint; build it as 'dinov2', not 'vit_small'"):
        create_encoder("vit_small", pretrained=dinov2_file)
    with pytest.raises(ValueError, match="SAM's image encoder is 2D"):
        create_encoder("sam_vit", spatial_dims=3)
    # a truncated file
    cut = tmp_path / "truncated.safetensors"
    cut.write_bytes(dinov2_file.read_bytes()[: 5000])
    assert main(["models", str(cut)]) == 2
    _one_error_line(capsys, str(cut), "not a readable safetensors file")
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(cut), "--data", slices,
                 "--out", str(tmp_path / "r1"), "classification.label=level", *QUIET]) == 2
    _one_error_line(capsys, str(cut))
    # a pickle that is more than tensors
    pickled = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)
    assert main(["models", str(pickled)]) == 2
    _one_error_line(capsys, str(pickled), "refused", "state_dict()")
    # missing keys: a DINOv2 without its final norm
    sd = {k: v for k, v in timm.create_model("vit_small_patch14_dinov2", embed_dim=48, depth=2, num_heads=1,
                                             img_size=28, num_classes=0).state_dict().items() if not k.startswith("norm.")}
    partial = tmp_path / "no_norm.safetensors"
    save_file(sd, partial)
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(partial), "--data", slices,
                 "--out", str(tmp_path / "r2"), "classification.label=level", *QUIET]) == 2
    _one_error_line(capsys, str(partial), "missing keys ['norm.bias', 'norm.weight']")
    # an unknown layout: the nearest format and its keys that did not fit
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.stem.weight": torch.zeros(4, 1, 3, 3), "blocks.0.attn.qkv.weight": torch.zeros(12, 4)}, unknown)
    assert main(["models", str(unknown)]) == 2
    _one_error_line(capsys, str(unknown), "no public format fits", "nearest format", "did not fit")
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(unknown), "--data", slices,
                 "--out", str(tmp_path / "r3"), "classification.label=level", *QUIET]) == 2
    _one_error_line(capsys, str(unknown), "weights do not fit", "nearest format")
