"""CLIP: losses against their formulas and under DDP, training on real image-text pairs (2D and 3D), LiT
locking, recipe errors."""

from __future__ import annotations

import csv
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .conftest import fork_is_safe


# --------------------------------------------------------------------------- CLIP losses
def _features(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_and_siglip_losses_equal_their_formulas():
    from medfm.pretrain.clip import clip_loss, make_loss

    img, txt = _features()
    scale = torch.tensor(14.0)

    class Scales(torch.nn.Module):  # the two learnable scalars of a CLIP model
        def __init__(self, bias=None):
            super().__init__()
            self.logit_scale = torch.nn.Parameter(scale.log())
            self.logit_bias = None if bias is None else torch.nn.Parameter(torch.tensor(bias))

    logits = scale * img @ txt.T
    target = torch.arange(8)
    want = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert torch.allclose(clip_loss(Scales(), img, txt, make_loss("clip")), want, atol=1e-6)
    from open_clip.loss import ClipLoss

    assert torch.allclose(clip_loss(Scales(), img, txt, make_loss("clip")), ClipLoss()(img, txt, scale), atol=1e-6)
    sign = 2 * torch.eye(8) - 1
    want = -F.logsigmoid(sign * (logits - 10.0)).sum() / 8
    assert torch.allclose(clip_loss(Scales(-10.0), img, txt, make_loss("siglip")), want, atol=1e-5)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from medfm.pretrain.clip import make_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    img, txt = _features(n=8, seed=1)
    n = 8 // world
    mine_i = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    mine_t = txt[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = make_loss("clip", rank, world)(mine_i, mine_t, torch.tensor(10.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "grad_i": mine_i.grad, "grad_t": mine_t.grad}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_clip_loss_under_two_process_ddp_matches_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from medfm.pretrain.clip import make_loss

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked from this process under `make test` (no new interpreters importing torch); spawned elsewhere
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork" if fork_is_safe() else "spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    img, txt = (t.clone().requires_grad_(True) for t in _features(n=8, seed=1))
    single = make_loss("clip")(img, txt, torch.tensor(10.0))
    single.backward()
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, single.detach(), atol=1e-6)
    # DDP averages gradients over ranks; gathered with gradients, each rank's features receive the
    # gradient of the sum of both ranks' losses = world x the gradient of the global-batch mean
    grad_i = torch.cat([r["grad_i"] for r in ranks]) / 2
    grad_t = torch.cat([r["grad_t"] for r in ranks]) / 2
    assert torch.allclose(grad_i, img.grad, atol=1e-6) and torch.allclose(grad_t, txt.grad, atol=1e-6)


# --------------------------------------------------------------------------- CLIP training
def paired_manifest(tmp: Path) -> Path:
    """Real images with text: axial, coronal and sagittal slices of the MNI152 brain, captioned with their plane
    and position (so captions differ and each names what its image shows)."""
    from PIL import Image

    from medfm.data import load, samples

    vol = load(samples.mni152("t1"))["image"][0].numpy()
    d = tmp / "paired"
    d.mkdir(exist_ok=True)
    rows = []
    for plane, axis in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        for k, frac in enumerate(np.linspace(0.3, 0.7, 6)):
            idx = int(frac * vol.shape[axis])
            sl = np.take(vol, idx, axis=axis)
            Image.fromarray((255 * sl / max(sl.max(), 1e-6)).astype(np.uint8)).save(d / f"{plane}_{k}.png")
            where = ("left" if frac < 0.5 else "right") if axis == 0 else ("low" if frac < 0.5 else "high")
            rows.append({"image": f"{plane}_{k}.png", "caption": f"{plane} T1 MRI slice of the brain, {where}",
                         "plane": plane, "split": "train"})
    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d / "manifest.csv"


def tiny_clip_recipe(**clip):
    from medfm.pretrain import load_recipe

    from .conftest import REPO

    return load_recipe(REPO / "encoders" / "clip_vit_2d.yaml", {
        "encoder": {"name": "vit_micro", "img_size": 32, "patch_size": 8},
        "clip": {"max_length": 24, "embed_dim": 32, **clip},
        "data": {"batch_size": 9, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "trainer": {"max_steps": 30, "log_every_n_steps": 1, "enable_progress_bar": False,
                    "checkpoint_every_n_steps": 10},
    })


@pytest.mark.slow
def test_clip_loss_falls_over_30_steps_on_real_image_text_pairs(tmp_path):
    from medfm.pretrain import run_pretrain

    from .pretrain_helpers import losses

    # A CNN image tower: a randomly initialised ViT's pooled features barely depend on the image, and
    # CLIP from such a start sits at the uniform solution (log B) for many steps (benchmarks/RESULTS.md).
    cfg = tiny_clip_recipe(lock_text=True)
    cfg["encoder"].update(name="resnet18", patch_size=None)
    cfg["data"]["batch_size"] = 18
    run = run_pretrain(cfg, tmp_path / "run", data_path=str(paired_manifest(tmp_path)))
    curve = losses(run)
    assert len(curve) == 30 and sum(curve[-5:]) < 0.85 * sum(curve[:5]), curve
    for f in ("encoder/model.safetensors", "text/model.safetensors", "text/tokenizer.json", "model/config.json",
              "model/model.safetensors"):
        assert (run / f).exists(), f
    # the run reloads (safetensors only) and evaluates zero-shot from the command line
    from medfm.cli import main

    manifest = tmp_path / "paired" / "manifest.csv"
    assert main(["evaluate", "zero-shot", "--model", str(run), "--data", str(manifest), "--split", "train",
                 "--classes", "plane", "--text", "caption", "--prompt", "{} T1 MRI slice of the brain",
                 "--out", str(tmp_path / "zs")]) == 0
    m = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert m["n"] == 18 and m["plane"]["classes"] == ["axial", "coronal", "sagittal"]
    assert 0 <= m["plane"]["accuracy"] <= 1 and m["plane"]["majority_rate"] == pytest.approx(1 / 3)
    assert set(m["retrieval"]["image_to_text"]) == {"R@1", "R@5", "R@10"}
    assert (tmp_path / "zs" / "confusion_plane.png").exists() and (tmp_path / "zs" / "retrieval.png").exists()


@pytest.mark.slow  # MAE then CLIP runs
def test_clip_vit_tower_learns_lit_style_from_a_self_supervised_encoder(tmp_path):
    from safetensors.torch import load_file

    from medfm.pretrain import load_recipe, run_pretrain

    from .conftest import REPO
    from .pretrain_helpers import losses, tiny_recipe

    manifest = str(paired_manifest(tmp_path))
    mae = run_pretrain(tiny_recipe("mae_vit_2d", trainer={"max_steps": 10}), tmp_path / "mae", data_path=manifest)
    base = tiny_clip_recipe()
    cfg = load_recipe(REPO / "encoders" / "clip_vit_2d.yaml", {**{k: base[k] for k in ("clip", "data", "optim", "trainer")},
                      "encoder": {"img_size": 32, "pretrained": str(mae / "encoder")}})
    assert cfg["encoder"]["name"] == "vit_micro" and cfg["encoder"]["global_pool"] == "avg"  # as the MAE saved it
    assert cfg["clip"]["lock_image"] == "auto"
    cfg["clip"]["lock_text"] = True
    cfg["data"]["batch_size"] = 18
    run = run_pretrain(cfg, tmp_path / "clip", data_path=manifest)
    curve = losses(run)
    # a random ViT tower sits at log B (the test above uses a CNN for that reason); from the MAE encoder, locked
    # (LiT: auto with pretrained weights) and its features standardised (feature_norm: auto), the projections learn
    assert sum(curve[-5:]) < 0.85 * sum(curve[:5]), curve
    before, after = (load_file(str(p / "encoder" / "model.safetensors")) for p in (mae, run))
    assert [k for k in before if not torch.equal(before[k], after[k])] == []  # the image tower stayed frozen
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["image_norm"] is True and config["text_norm"] is True


def test_clip_starts_from_open_clip_temperature_and_projection_init():
    from medfm.encoders import CLIP, create_encoder
    from medfm.encoders.text import TextEncoder

    torch.manual_seed(0)
    model = CLIP(create_encoder("vit_small", img_size=32, patch_size=8), TextEncoder(max_length=16), embed_dim=256)
    assert float(model.logit_scale.exp()) == pytest.approx(1 / 0.07)
    for proj, width in ((model.image_proj, 384), (model.text_proj, 384)):
        assert float(proj.weight.std()) == pytest.approx(width ** -0.5, rel=0.05)  # open_clip: N(0, width^-1/2)


def test_locked_towers_train_only_what_is_unlocked():
    from medfm.encoders import create_encoder
    from medfm.pretrain.clip import CLIPModule

    m = CLIPModule(create_encoder("vit_micro", img_size=32, patch_size=8), max_length=16, embed_dim=16,
                   lock_image=True, lock_text=True, unlocked_layers=1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.image_encoder.blocks.3.", "model.image_encoder.norm.",
                             "model.text_encoder.model.encoder.layer.5.", "model.image_proj", "model.text_proj",
                             "model.logit_scale")) for n in trainable), sorted(trainable)
    assert any(".blocks.3." in n for n in trainable) and any(".layer.5." in n for n in trainable)


def test_clip_recipe_without_text_is_a_clear_error(tmp_path):
    from medfm.pretrain import run_pretrain

    cfg = tiny_clip_recipe()
    cfg["data"]["text"] = None
    with pytest.raises(ValueError, match="data.text"):
        run_pretrain(cfg, tmp_path / "run", data_path=str(paired_manifest(tmp_path)))


def test_3d_clip_trains_on_volumes_with_text_and_evaluates_zero_shot(tmp_path):
    from medfm.evaluate.zeroshot import evaluate_zero_shot
    from medfm.pretrain import load_recipe, run_pretrain

    from .conftest import REPO
    from .finetune_helpers import mni_map_classes

    src = mni_map_classes(tmp_path)
    words = {"t1": "a T1-weighted MRI of the brain", "gm": "a grey matter probability map",
             "wm": "a white matter probability map"}
    with open(src) as f:
        rows = list(csv.DictReader(f))
    manifest = src.with_name("reports.csv")
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "report"])
        w.writeheader()
        w.writerows({**r, "report": f"{words[r['map']]}, {r['image'].split('_')[0]} hemisphere"} for r in rows)
    cfg = load_recipe(REPO / "encoders" / "clip_vit_3d.yaml", {
        "encoder": {"name": "vit_micro", "img_size": 32, "patch_size": 8},
        "clip": {"max_length": 16, "embed_dim": 16, "lock_text": True},
        "data": {"batch_size": 3, "num_workers": 0, "preset": "mr_3d", "preset_args": {"spacing": 4.0}},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "trainer": {"max_steps": 4, "log_every_n_steps": 1, "enable_progress_bar": False}})
    run = run_pretrain(cfg, tmp_path / "clip3d", data_path=str(manifest))
    m = evaluate_zero_shot(run, manifest, ["map"], split="train", text_key="report", out=tmp_path / "zs")
    assert m["n"] == 3 and m["map"]["classes"] == ["gm", "t1", "wm"] and m["map"]["majority_rate"] == pytest.approx(1 / 3)
    assert m["retrieval"]["chance"]["R@1"] == pytest.approx(1 / 3)
    assert (tmp_path / "zs" / "confusion_map.png").exists()
