"""Adaptation methods: which parameters train, LoRA save/reload/merge, SSF merge, VPT, few-shot sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from medfm.encoders import create_encoder
from medfm.tuning import METHODS, adapt_encoder, count_parameters, export_encoder, few_shot_indices
from medfm.finetune.classification import ClassificationModel

from .conftest import REPO

R = 4


def _vit(dims: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_encoder("vit_micro", spatial_dims=dims, img_size=32, patch_size=4)


def _trainable(m: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}


def _expected(method: str, vit: nn.Module) -> tuple[callable, int]:
    """(name predicate, parameter count) each method must train in the encoder, computed from the architecture."""
    d = vit.embed_dim
    linears = {n: m for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    if method == "full":
        return (lambda n: True), sum(p.numel() for p in vit.parameters())
    if method == "linear_probe":
        return (lambda n: False), 0
    if method == "bitfit":
        return (lambda n: n.endswith("bias")), sum(p.numel() for n, p in vit.named_parameters() if n.endswith("bias"))
    if method == "lora":  # r x (in + out) for qkv, proj, fc1, fc2 of every block
        n = sum(R * (m.in_features + m.out_features) for name, m in linears.items()
                if name.split(".")[-1] in ("qkv", "proj", "fc1", "fc2") and name.startswith("blocks"))
        return (lambda n: ".lora_A." in n or ".lora_B." in n), n
    if method == "vpt":
        return (lambda n: n == "prompts"), 5 * d
    if method == "ssf":  # scale + shift per channel after every Linear, LayerNorm and the patch-embedding conv
        chans = sum(m.out_features for m in linears.values())
        chans += sum(m.normalized_shape[0] for m in vit.modules() if isinstance(m, nn.LayerNorm))
        chans += vit.patch_embed.proj.out_channels
        return (lambda n: n.startswith("ssf.")), 2 * chans
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_exactly_its_parameters(method):
    vit = _vit()
    accept, count = _expected(method, _vit())
    enc = adapt_encoder(vit, method, lora={"r": R}, vpt={"num_tokens": 5})
    names = _trainable(enc)
    assert all(accept(n) for n in names), [n for n in names if not accept(n)][:5]
    assert sum(names.values()) == count
    model = ClassificationModel(enc, 2)
    trainable, total = count_parameters(model)
    assert trainable == count + 48 * 2 + 2  # + the linear head
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 2)
    model(x).sum().backward()  # gradients reach exactly the trainable parameters
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_deep_vpt_has_prompts_per_block_and_keeps_the_vit_api():
    vit = _vit(3)
    deep = adapt_encoder(vit, "vpt", vpt={"num_tokens": 3, "deep": True})
    assert deep.prompts.shape == (len(vit.blocks), 3, vit.embed_dim)
    x = torch.rand(1, 1, 32, 32, 32)
    maps = deep.forward_intermediates(x, indices=[1, 3])
    assert [m.shape for m in maps] == [m.shape for m in vit.forward_intermediates(x, indices=[1, 3])]
    assert deep(x).shape == vit(x).shape == (1, vit.embed_dim)
    assert not torch.allclose(deep(x), vit(x))  # the prompts take part in attention
    shallow = adapt_encoder(_vit(3), "vpt", vpt={"num_tokens": 3})
    assert shallow.prompts.shape == (1, 3, vit.embed_dim)
    assert export_encoder(deep).__class__.__name__ == "ViT"


def _perturb(module: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_adapter_saved_and_reloaded_gives_the_same_outputs_and_merges(tmp_path):
    from peft import PeftModel

    enc = adapt_encoder(_vit(), "lora", lora={"r": R})
    _perturb(enc)  # a "trained" adapter (LoRA B starts at zero)
    enc.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        y = enc(x)
        assert not torch.allclose(y, _vit().eval()(x), atol=1e-4)  # the adapter changes the model
    enc.save_pretrained(str(tmp_path / "adapter"))
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    reloaded = PeftModel.from_pretrained(_vit(), str(tmp_path / "adapter")).eval()
    merged = export_encoder(enc).eval()
    assert type(merged).__name__ == "ViT" and not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), y, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)


def test_ssf_merges_into_a_plain_encoder_with_the_same_outputs():
    for dims, name in ((2, "vit_micro"), (3, "resnet18")):
        torch.manual_seed(0)
        kw = {"patch_size": 4} if name.startswith("vit") else {}
        enc = adapt_encoder(create_encoder(name, spatial_dims=dims, img_size=32, **kw), "ssf")
        _perturb(enc)
        enc.eval()
        x = torch.rand(2, 1, *([32] * dims))
        with torch.no_grad():
            y = enc(x)
            merged = export_encoder(enc).eval()
            assert not hasattr(merged, "ssf") and type(merged).__name__ == type(enc).__name__
            torch.testing.assert_close(merged(x), y, rtol=1e-4, atol=1e-5)


def test_unknown_method_and_lora_without_targets_are_clear_errors():
    with pytest.raises(ValueError, match="unknown fine-tuning method 'prefix'.*lora"):
        adapt_encoder(_vit(), "prefix")
    with pytest.raises(ValueError, match="no layer of ResNetEncoder matches"):
        adapt_encoder(create_encoder("resnet18", spatial_dims=2, img_size=32), "lora")
    with pytest.raises(ValueError, match="VPT needs a medfm ViT"):
        adapt_encoder(create_encoder("resnet18", spatial_dims=2, img_size=32), "vpt")


def test_few_shot_sampler_returns_k_per_class_reproducibly():
    y = np.array([0] * 50 + [1] * 7 + [2] * 30)
    idx = few_shot_indices(y, 5, seed=3)
    assert np.bincount(y[idx]).tolist() == [5, 5, 5]
    assert idx == few_shot_indices(y, 5, seed=3) and idx != few_shot_indices(y, 5, seed=4)
    assert np.bincount(y[few_shot_indices(y, 10)]).tolist() == [10, 7, 10]  # a class with fewer gives all it has
    multi = np.zeros((40, 3))
    multi[:20, 0] = 1
    multi[10:30, 1] = 1
    multi[25:, 2] = 1
    idx = few_shot_indices(multi, 4, seed=0)
    assert (multi[idx].sum(0) >= 4).all() and len(idx) <= 12


def test_a_tuning_method_is_one_registration(slices, tmp_path):
    """A new tuning method (LayerNorms only, defined here) registers like every other extension point and runs
    through the fine-tuning recipe; which methods freeze the encoder is one registry property."""
    from dataclasses import dataclass

    from medfm.finetune import load_task_recipe, run_finetune
    from medfm.tuning import freezes_encoder, method_sections, register_tuning

    @dataclass
    class NormOnlyConfig:
        bias_too: bool = False

    @register_tuning("norm_only", section=NormOnlyConfig)
    def norm_only(encoder, section):
        for name, p in encoder.named_parameters():
            p.requires_grad_(".norm" in name or name.startswith("norm") or (bool((section or {}).get("bias_too"))
                                                                          and name.endswith("bias")))
        return encoder

    try:
        enc = adapt_encoder(_vit(), "norm_only")
        assert _trainable(enc) and all("norm" in n for n in _trainable(enc))
        assert freezes_encoder("linear_probe") and not freezes_encoder("norm_only")
        assert method_sections()["norm_only"] is NormOnlyConfig
        with pytest.raises(ValueError, match="registered twice"):
            register_tuning("norm_only")(norm_only)
        cfg = load_task_recipe(REPO / "tasks" / "classify_2d.yaml", ["method=norm_only", "norm_only.bias_too=true",
                                                          "classification.label=level", "data.test_split=null"],
                               profile="tiny")
        run = run_finetune(cfg, tmp_path / "run", data_path=slices)
        assert (run / "model" / "model.safetensors").exists()
    finally:
        METHODS.pop("norm_only", None)
