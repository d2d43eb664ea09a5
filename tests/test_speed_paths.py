"""The fast paths every run takes: fused attention in every ViT, fused AdamW, torch.compile and channels-last
switches, activation checkpointing; each checked against the slow path it replaces."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Attention

from medfm.encoders import create_encoder
from medfm.pretrain import DINOModule, MaskedAutoencoder, run_pretrain
from medfm.run.module import adamw_implementation

from .test_pretrain_runs import data  # noqa: F401  (the real-data fixture)
from .pretrain_helpers import losses, tiny_recipe


def _attentions(model: torch.nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("dims", [2, 3])
def test_every_vit_attention_is_fused_and_matches_the_explicit_softmax(dims):
    """ViT encoder, MAE decoder and DINO student/teacher attend through scaled_dot_product_attention (flash /
    memory-efficient kernels on a GPU); the explicit softmax(QK^T)V path gives the same tokens."""
    torch.manual_seed(0)
    enc = create_encoder("vit_micro", spatial_dims=dims, img_size=32, patch_size=8)
    mae = MaskedAutoencoder(enc, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    dino = DINOModule(create_encoder("vit_micro", spatial_dims=dims, img_size=32, patch_size=8), hidden_dim=32,
                      bottleneck_dim=16, output_dim=64).model
    for model in (enc, mae, dino):
        attn = _attentions(model)
        assert attn and all(a.fused_attn for a in attn)
    x = torch.rand(2, 1, *([32] * dims))
    enc.eval()
    with torch.no_grad():
        fused = enc.forward_features(x)
        for a in _attentions(enc):
            a.fused_attn = False
        explicit = enc.forward_features(x)
    torch.testing.assert_close(fused, explicit, rtol=1e-4, atol=1e-5)


def test_adamw_is_fused_on_cpu_and_matches_the_per_parameter_loop():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 8))
    groups = [{"params": [w], "weight_decay": 0.05}]
    assert adamw_implementation(groups) == {"fused": True}
    ref = torch.nn.Parameter(w.detach().clone())
    fused = torch.optim.AdamW(groups, lr=1e-2, **adamw_implementation(groups))
    loop = torch.optim.AdamW([{"params": [ref], "weight_decay": 0.05}], lr=1e-2, foreach=False)
    for _ in range(5):
        for p, opt in ((w, fused), (ref, loop)):
            opt.zero_grad()
            (p.sin().sum() + (p**2).mean()).backward()
            opt.step()
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)
    assert adamw_implementation([{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]}]) == {"foreach": True}


@pytest.mark.slow  # torch.compile
def test_compiled_run_trains_and_exports_the_same_parameter_names(data, tmp_path):  # noqa: F811
    """``trainer.compile`` compiles the method's model in place (here with torch.compile's ``eager`` backend: the
    graph capture without code generation, so the suite needs no compiler); the loss falls and the exported
    encoder loads as any other."""
    cfg = tiny_recipe("mae_vit_2d", trainer={"max_steps": 12, "compile": {"backend": "eager"}},
                      optim={"lr": 3e-3})
    run = run_pretrain(cfg, tmp_path / "run", data_path=data[2])
    curve = losses(run)
    assert sum(curve[-3:]) < sum(curve[:3])
    enc = create_encoder("vit_micro", img_size=32, patch_size=8, pretrained=run / "encoder")
    assert enc(torch.rand(1, 1, 32, 32)).shape == (1, enc.embed_dim)


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_gives_the_same_step(dims):
    """``trainer.channels_last`` moves every convolution's weights to channels-last (3D: channels_last_3d): the
    same outputs and gradients, in the layout CNN kernels prefer on GPUs and recent CPUs."""
    from medfm.run.module import to_channels_last

    torch.manual_seed(0)
    a = create_encoder("resnet18", spatial_dims=dims, img_size=32)
    b = create_encoder("resnet18", spatial_dims=dims, img_size=32)
    b.load_state_dict(a.state_dict())
    to_channels_last(b)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    assert b.net.conv1.weight.is_contiguous(memory_format=fmt)
    x = torch.rand(2, 1, *([32] * dims))
    a.eval(), b.eval()  # (train-mode BatchNorm over a 1-voxel map of 2 samples amplifies rounding to O(1))
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    target = torch.randn_like(ya)
    (ya - target).square().mean().backward()
    (yb - target).square().mean().backward()
    g = a.net.conv1.weight.grad
    torch.testing.assert_close(b.net.conv1.weight.grad.contiguous(), g, rtol=1e-3, atol=1e-4 * g.abs().max().item())


@pytest.mark.parametrize("dims", [2, 3])
def test_activation_checkpointing_gives_the_same_gradients(dims):
    """``encoder.grad_checkpointing`` (and FSDP's activation-checkpointing policy, which wraps the same blocks)
    recomputes each block's activations in the backward pass instead of keeping them: same gradients."""
    torch.manual_seed(0)
    a = create_encoder("vit_micro", spatial_dims=dims, img_size=32, patch_size=8)
    b = create_encoder("vit_micro", spatial_dims=dims, img_size=32, patch_size=8)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.rand(2, 1, *([32] * dims))
    a(x).square().sum().backward()
    b(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fsdp_strategy_shards_and_checkpoints_every_transformer_block():
    """``trainer.strategy: fsdp`` (+ ``activation_checkpointing``): Lightning's FSDPStrategy wrapping timm's Block
    (every medfm ViT's unit) for sharding and for recomputation, full state-dict checkpoints. Lightning runs FSDP
    on CUDA only, so the run itself is checked on a GPU machine, not here."""
    from lightning.pytorch.strategies import FSDPStrategy
    from timm.models.vision_transformer import Block

    from medfm.run.trainer import make_strategy

    s = make_strategy("fsdp", activation_checkpointing=True)
    assert isinstance(s, FSDPStrategy) and s._state_dict_type == "full"
    assert s.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert s._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert "auto_wrap_policy" not in make_strategy("fsdp")._activation_checkpointing_kwargs
    assert make_strategy("ddp") == "ddp"


def test_a_sharded_run_exports_from_its_gathered_checkpoint(data, tmp_path, monkeypatch):  # noqa: F811
    """Under FSDP no rank holds the whole model, so the run writes the final (gathered) checkpoint and rank 0
    exports from a fresh module loaded with it. Forced here on one CPU: the same encoder as the direct export."""
    from medfm.encoders import from_pretrained
    from medfm.run import callbacks

    cfg = tiny_recipe("mae_vit_2d", trainer={"max_steps": 5})
    direct = run_pretrain(cfg, tmp_path / "direct", data_path=data[2])
    monkeypatch.setattr(callbacks, "sharded_parameters", lambda trainer: True)
    gathered = run_pretrain(cfg, tmp_path / "gathered", data_path=data[2])
    a, b = from_pretrained(direct / "encoder").state_dict(), from_pretrained(gathered / "encoder").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


@pytest.mark.parametrize("name, timm_name, params", [("vit_base", "vit_base_patch16_224", 8.5e7),
                                                      ("vit_large", "vit_large_patch16_224", 3e8)])
def test_vit_base_and_large_have_timms_layout(name, timm_name, params):
    """ViT-B/16 and ViT-L/16 (the encoder FSDP is for), built on the meta device (no memory): timm's parameter
    names, shapes and count. The ViT class itself is exercised whole at ViT-Micro, -Tiny and -S (test_encoders.py)."""
    import timm

    with torch.device("meta"):
        ours = create_encoder(name, img_size=224)
        ref = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=1)
    a = {k: v.shape for k, v in ours.state_dict().items()}
    b = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: a[k] for k in b if k in a} == b and sum(v.numel() for v in ours.parameters()) > params
