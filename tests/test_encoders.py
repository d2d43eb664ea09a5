"""Every registered encoder, 2D and 3D: shapes, intermediates, backward, save/load round trip."""

from __future__ import annotations

import os

import pytest
import torch

from medfm.encoders import (Encoder, ViT, create_encoder, encoder_arguments, encoder_family, from_pretrained,
                            layer_decay_param_groups, list_encoders, saved_architecture)

SIZE = 32
# every encoder but ViT-B and ViT-L (86M and 300M parameters of the same ViT class that ViT-Micro, -Tiny and -S
# test here: their layouts are checked against timm's on the meta device in test_speed_paths.py)
BIG = ("vit_base", "vit_large")
CASES = [(name, dims) for name in list_encoders() if name not in BIG for dims in encoder_family(name).dims]
# public families default to their published sizes (a DINOv2 ViT-B/14): built tiny here, parity-tested at full
# layout in tests/test_public_*.py
TINY = {"dinov2": dict(embed_dim=48, depth=4, num_heads=2, patch_size=8),
        "sam_vit": dict(embed_dim=32, depth=4, num_heads=2, window_size=2, global_attn_indexes=[3], neck_chans=16,
                        sam_img_size=64),
        "swin_vit": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=3),
        "segres_encoder": dict(init_filters=8),
        "monai_vit": dict(embed_dim=48, depth=4, num_heads=2, patch_size=8),
        "clip_vit": dict(embed_dim=48, depth=4, num_heads=2, patch_size=8),
        "clip_vision": dict(embed_dim=48, depth=4, num_heads=2, patch_size=8)}


def _input(dims: int, batch: int = 2, chans: int = 1) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, chans, *(SIZE,) * dims)


@pytest.mark.parametrize("name,dims", CASES)
def test_encoder_api(name, dims, tmp_path):
    torch.manual_seed(0)
    model = create_encoder(name, spatial_dims=dims, img_size=SIZE, **TINY.get(name, {}))
    assert model.spatial_dims == dims and len(model.patch_size) == dims
    x = _input(dims)

    # forward / features / intermediates
    emb = model(x)
    assert emb.shape == (2, model.embed_dim)
    feats = model.forward_features(x)
    assert feats.shape[0] == 2 and feats.shape[-1 if isinstance(model, ViT) else 1] == model.embed_dim
    maps = model.forward_intermediates(x)
    assert len(maps) >= 4
    for m in maps:
        assert m.ndim == dims + 2 and m.shape[0] == 2
    last = model.forward_intermediates(x, indices=1)[0]
    grid = tuple(s // p for s, p in zip(x.shape[2:], model.patch_size))
    assert last.shape == (2, model.embed_dim, *grid)

    # backward reaches every trainable parameter
    emb.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"

    # save_pretrained / from_pretrained: safetensors + config.json, identical outputs
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json"} <= files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    for loaded in (from_pretrained(tmp_path), type(model).from_pretrained(tmp_path),
                   create_encoder(name, spatial_dims=dims, img_size=SIZE, pretrained=tmp_path, **TINY.get(name, {}))):
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in list_encoders() if n not in BIG])
def test_every_encoder_follows_the_declared_interface(name, tmp_path):
    """The Encoder protocol, for every registered name: members, token grid, blocks, LoRA targets that name
    real layers, the registered name saved as `architecture` and adopted from the folder, recipe keys from
    the family's own signature."""
    import re

    model = create_encoder(name, spatial_dims=2, img_size=SIZE, **TINY.get(name, {})).eval()
    assert isinstance(model, Encoder) and isinstance(model, encoder_family(name))
    assert model.architecture == name and model.feature_maps in ("tokens", "pyramid")
    x = _input(2, batch=1)
    last = model.forward_intermediates(x, indices=1)[0]
    assert tuple(last.shape[2:]) == model.token_grid(x.shape[2:])
    blocks = model.encoder_blocks()
    assert blocks and all(isinstance(b, torch.nn.Module) for b in blocks)
    targets = model.lora_targets
    if isinstance(targets, str):
        assert any(re.fullmatch(targets, n) for n, _ in model.named_modules())
    assert targets is None or isinstance(targets, (str, list))
    model.save_pretrained(tmp_path)
    assert from_pretrained(tmp_path).architecture == name and saved_architecture(tmp_path)["name"] == name
    keys = encoder_arguments(name)
    assert {"spatial_dims", "in_chans", "img_size"} <= keys
    assert ("patch_size" in keys) == (encoder_family(name).feature_maps == "tokens")  # token grids have a patch


@pytest.mark.parametrize("dims", [2, 3])
def test_vit_grad_checkpointing_same_result(dims):
    torch.manual_seed(0)
    model = create_encoder("vit_micro", spatial_dims=dims, img_size=SIZE)
    x = _input(dims)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


def test_vit_other_input_size_resamples_pos_embed():
    model = create_encoder("vit_micro", spatial_dims=3, img_size=32, patch_size=(4, 16, 16))
    assert model.patch_size == (4, 16, 16)
    out = model.forward_intermediates(torch.randn(1, 1, 16, 48, 64), indices=1)[0]
    assert out.shape == (1, 48, 4, 3, 4)


def test_vit_rejects_wrong_input():
    model = create_encoder("vit_micro", spatial_dims=3, img_size=32)
    with pytest.raises(ValueError, match="5-d batch"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(torch.randn(1, 1, 30, 32, 32))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(KeyError, match="unknown encoder 'vit_huge'"):
        create_encoder("vit_huge")


def test_sincos_pos_embed_is_fixed():
    model = create_encoder("vit_micro", spatial_dims=3, img_size=32, pos_embed="sincos")
    assert not model.pos_embed.requires_grad
    assert model.pos_embed[:, 1:].abs().sum() > 0


@pytest.mark.parametrize("name", ["vit_micro", "resnet18"])
def test_layer_decay_groups(name):
    model = create_encoder(name, spatial_dims=2, img_size=SIZE)
    groups = layer_decay_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lrs = sorted({g["lr"] for g in groups})
    assert max(lrs) == pytest.approx(1e-3)
    assert len(lrs) >= 4 and min(lrs) < 1e-3 * 0.5**3
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    if name.startswith("vit"):  # stem, then one group per block (the final norm joins the last, as in timm)
        assert len(lrs) == len(model.blocks) + 1
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        assert id(model.pos_embed) in no_decay and id(model.cls_token) in no_decay


def test_strict_loading_names_bad_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = create_encoder("vit_micro", spatial_dims=2, img_size=SIZE)
    model.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["blocks.0.attn.qkv.weight"]
    sd["surprise.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\].*unexpected keys \['surprise.weight'\]"):
        from_pretrained(tmp_path)


def test_hub_id_goes_through_the_hub_client(tmp_path, monkeypatch):
    """A hub id is fetched with huggingface_hub (stood in for here by a local folder: no network in CI)."""
    import huggingface_hub

    model = create_encoder("vit_micro", spatial_dims=3, img_size=SIZE).eval()
    model.save_pretrained(tmp_path / "repo")
    asked = []

    def fake_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(tmp_path / "repo" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)  # medfm.artifacts.resolve_file's fetch
    loaded = from_pretrained("medfm-team/vit-micro-3d")
    assert ("medfm-team/vit-micro-3d", "config.json") in asked and ("medfm-team/vit-micro-3d", "model.safetensors") in asked
    x = _input(3, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
