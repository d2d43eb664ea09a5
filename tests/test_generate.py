"""Diffusion generators: training lowers the loss on real 2D and 3D data, guidance, reload, masks, export, CLI."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import torch

from medfm.artifacts import load
from medfm.cli import main
from medfm.data import open_dataset, samples
from medfm.generate import DiffusionGenerator, export_generated, load_generator_recipe, run_generator
from medfm.generate.recipe import open_training_set
from medfm.pretrain import METHODS, run_pretrain
from medfm.pretrain.data import build_data

from .conftest import KillAt, REPO
from .pretrain_helpers import data_2d, losses, tiny_recipe

pytestmark = pytest.mark.slow  # diffusion generators trained: `make test` runs it, `make test-fast` leaves it out

TINY_2D = {
    "diffusion": {"image_size": 32, "channels": [16, 32], "attention": [False, True], "head_channels": 16,
                  "sample_steps": 4, "preview": 4},
    "data": {"batch_size": 16, "num_workers": 0},
    "optim": {"lr": 2e-3, "warmup_steps": 2},
    "trainer": {"max_steps": 40, "log_every_n_steps": 1, "enable_progress_bar": False, "checkpoint_every_n_steps": 20},
}
TINY_3D = {
    "diffusion": {"image_size": 32, "channels": [8, 16, 16], "attention": [False, False, True], "head_channels": 8,
                  "sample_steps": 3, "preview": 2},
    "data": {"batch_size": 2, "num_workers": 0, "preset_args": {"spacing": 4.0}},
    "optim": {"lr": 2e-3, "warmup_steps": 2},
    "trainer": {"max_steps": 30, "log_every_n_steps": 1, "enable_progress_bar": False, "checkpoint_every_n_steps": 15},
}


def tiny(name: str, base: dict, **sections) -> dict:
    over = {k: dict(v) for k, v in base.items()}
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return load_generator_recipe(REPO / "generators" / f"{name}.yaml", over)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_data")
    return {2: data_2d(tmp), 3: str(samples.mni152_tissue_manifest(tmp / "mni"))}


def fixed_loss(generator: DiffusionGenerator, images: torch.Tensor, cond: dict) -> float:
    """The DDPM loss at fixed noise and timesteps (seeded), so two models are compared on the same draw."""
    torch.manual_seed(123)
    with torch.no_grad():
        return float(generator.loss(images, cond))


def spec_2d(**kw) -> dict:
    spec = dict(spatial_dims=2, image_size=16, in_chans=1, conditioning="class", num_classes=2, class_names=["a", "b"],
                mask_classes=None, channels=[8, 16], attention=[False, True], layers_per_block=1, norm_groups=8,
                head_channels=8, backbone="auto", text_model=None, text_max_length=16, train_timesteps=100,
                beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", sampler="ddim", sample_steps=4,
                guidance_scale=2.0)
    spec.update(kw)
    return spec


# ----------------------------------------------------------------- training on real data
def _label_key(path: str) -> dict:
    return {} if path.endswith(".npz") else {"data": {"label": "label"}}


def test_2d_class_conditioned_loss_falls_on_real_images(data, tmp_path):
    cfg = tiny("diffusion_2d", TINY_2D, **_label_key(data[2]))
    run = run_generator(cfg, tmp_path / "g2d", data_path=data[2])
    trained = load(run)
    assert isinstance(trained, DiffusionGenerator) and trained.network.kind == "diffusers"
    train = open_training_set(cfg, data[2])
    batch = [train[i] for i in range(32)]
    images = torch.stack([b["image"] for b in batch])
    cond = {"class_labels": torch.tensor([int(b["label"]) for b in batch])}
    L.seed_everything(cfg["seed"], verbose=False)
    fresh = DiffusionGenerator(trained.spec)  # the initialisation the run started from
    before, after = fixed_loss(fresh, images, cond), fixed_loss(trained, images, cond)
    assert after < 0.6 * before, (before, after)
    logged = losses(run)
    assert np.mean(logged[-10:]) < np.mean(logged[:5])
    assert (run / "samples.png").stat().st_size > 0
    assert json.loads((run / "run.json").read_text())["kind"] == "generate"


def test_3d_mask_conditioned_loss_falls_on_mni152_crops(data, tmp_path):
    cfg = tiny("diffusion_3d", TINY_3D)
    run = run_generator(cfg, tmp_path / "g3d", data_path=data[3])
    trained = load(run)
    assert trained.network.kind == "monai" and trained.spec.mask_classes == 3  # background, GM, WM
    train = open_training_set(cfg, data[3])
    batch = [train[0] for _ in range(4)]  # random crops of the one brain (the training transform)
    images = torch.stack([b["image"] for b in batch])
    cond = {"mask": torch.stack([b["mask"] for b in batch]).round().long()}
    L.seed_everything(cfg["seed"], verbose=False)
    fresh = DiffusionGenerator(trained.spec)
    before, after = fixed_loss(fresh, images, cond), fixed_loss(trained, images, cond)
    assert after < 0.7 * before, (before, after)


def test_a_killed_run_resumes_to_the_same_weights_and_ema(data, tmp_path):
    cfg = tiny("diffusion_2d", TINY_2D, trainer={"max_steps": 12, "checkpoint_every_n_steps": 6},
               diffusion={"preview": 0}, **_label_key(data[2]))
    whole = run_generator(cfg, tmp_path / "whole", data_path=data[2])
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_generator(cfg, tmp_path / "split", data_path=data[2], callbacks=[KillAt(6)])
    assert "ema" in torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    split = run_generator(cfg, tmp_path / "split", data_path=data[2], resume=True)
    a, b = load(whole).state_dict(), load(split).state_dict()  # the exported (EMA) weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_latent_diffusion_trains_the_autoencoder_then_denoises_its_latents(data, tmp_path):
    cfg = tiny("diffusion_3d", TINY_3D, diffusion={"latent_diffusion": True, "autoencoder_channels": [8, 16],
                                                   "latent_channels": 2, "autoencoder_steps": 8, "channels": [16, 16],
                                                   "attention": [False, True]},
               trainer={"max_steps": 14, "checkpoint_every_n_steps": 7})
    run = run_generator(cfg, tmp_path / "latent", data_path=data[3])
    g = load(run)
    assert g.autoencoder is not None and g.net_spec.image_size == 16 and g.net_spec.in_chans == 2
    assert float(g.latent_scale) != 1.0  # measured when the diffusion stage began, saved with the weights
    logged = losses(run)
    assert len(logged) == 14 and np.mean(logged[4:8]) < logged[0]  # the autoencoder's L1 + KL falls first
    masks = torch.randint(0, 3, (1, 1, 32, 32, 32))
    out = g.generate(masks=masks, seed=0, steps=2)
    assert out.shape == (1, 1, 32, 32, 32)
    torch.testing.assert_close(out, load(run).generate(masks=masks, seed=0, steps=2))


# ----------------------------------------------------------------- guidance, reload, masks
def test_guidance_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    g = DiffusionGenerator(spec_2d()).eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 50, 90])
    cond = g.condition(classes=["a", "b", "a"])
    eps_c = g(x, t, cond)
    eps_u = g(x, t, g.null(cond))
    torch.testing.assert_close(g.predict(x, t, cond, guidance_scale=1.0), eps_c)
    torch.testing.assert_close(g.predict(x, t, cond, guidance_scale=3.0), eps_u + 3.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps_c, eps_u)  # the "no class" embedding is a different input


def test_a_saved_generator_reloads_and_samples_identically(tmp_path):
    torch.manual_seed(0)
    g = DiffusionGenerator(spec_2d()).eval()
    g.save_pretrained(tmp_path / "gen")
    again = load(tmp_path / "gen")
    for sampler in ("ddim", "dpm", "ddpm"):
        a = g.generate(classes=["a", "b"], seed=7, sampler=sampler)
        b = again.generate(classes=["a", "b"], seed=7, sampler=sampler)
        assert a.shape == (2, 1, 16, 16) and 0 <= float(a.min()) and float(a.max()) <= 1
        torch.testing.assert_close(a, b)
    assert not torch.allclose(g.generate(classes=["a"], seed=7), g.generate(classes=["a"], seed=8))
    # sample i is seeded by seed + i: the second sample of a call regenerates alone
    torch.testing.assert_close(g.generate(classes=["a", "b"], seed=3)[1:], g.generate(classes=["b"], seed=4), rtol=1e-4, atol=1e-5)


def test_mask_conditioned_3d_sampling_returns_an_image_of_the_masks_shape():
    torch.manual_seed(0)
    g = DiffusionGenerator(spec_2d(spatial_dims=3, conditioning="mask", num_classes=None, class_names=None,
                                   mask_classes=3, image_size=16)).eval()
    assert g.network.kind == "monai"
    masks = torch.randint(0, 3, (2, 1, 16, 24, 8))
    out = g.generate(masks=masks, seed=0, steps=2)
    assert out.shape == (2, 1, 16, 24, 8)
    with pytest.raises(ValueError, match="outside 0..2"):
        g.generate(masks=masks + 1, steps=1)
    with pytest.raises(ValueError, match="multiple of 2"):
        g.generate(masks=torch.zeros(1, 1, 15, 16, 16, dtype=torch.long), steps=1)


def test_bad_conditions_are_named():
    g = DiffusionGenerator(spec_2d()).eval()
    with pytest.raises(ValueError, match=r"unknown class 'c'; this generator knows \['a', 'b'\]"):
        g.generate(classes=["c"])
    with pytest.raises(ValueError, match="class-conditioned; it takes no text"):
        g.generate(prompts=["a chest x-ray"])
    with pytest.raises(ValueError, match="give classes"):
        g.generate(n=2)


# ----------------------------------------------------------------- export, text, CLI
def test_exported_sets_read_back_through_medfm_data(tmp_path):
    torch.manual_seed(0)
    g = DiffusionGenerator(spec_2d()).eval()
    manifest = export_generated(g, tmp_path / "set2d", classes=["a", "b", "b"], seed=5, model="abc", progress=False)
    ds = open_dataset(manifest, label="label")
    assert len(ds) == 3 and ds.classes == ["a", "b"] and [ds[i]["label"] for i in range(3)] == [0, 1, 1]
    assert ds[0]["image"].shape == (1, 16, 16)
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    assert [r["seed"] for r in rows] == ["5", "6", "7"] and rows[0]["model"] == "abc" and rows[0]["sampler"] == "ddim"
    assert (tmp_path / "set2d" / "grid.png").exists()

    g3 = DiffusionGenerator(spec_2d(spatial_dims=3, conditioning="mask", num_classes=None, class_names=None,
                                    mask_classes=3, image_size=16)).eval()
    masks = [torch.randint(0, 3, (1, 16, 16, 16)) for _ in range(2)]
    manifest = export_generated(g3, tmp_path / "set3d", masks=masks, steps=2, progress=False)
    ds = open_dataset(manifest, mask_key="mask", spatial_dims=3)
    assert len(ds) == 2 and ds[1]["image"].shape == (1, 16, 16, 16)
    torch.testing.assert_close(ds[1]["mask"].long(), masks[1])  # generated volumes come with their labels


def test_text_conditioned_generator_trains_and_samples_from_prompts(tmp_path):
    rows = [{"image": f"img{i}.png", "caption": ["bright disc", "dark square"][i % 2], "split": "train"} for i in range(8)]
    yy, xx = np.mgrid[:32, :32]
    from PIL import Image

    for i, r in enumerate(rows):
        img = ((xx - 16) ** 2 + (yy - 16) ** 2 < 60) * 220 if i % 2 == 0 else ((abs(xx - 16) < 8) & (abs(yy - 16) < 8)) * 60
        Image.fromarray((img + 20).astype(np.uint8)).save(tmp_path / r["image"])
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = tiny("diffusion_2d", TINY_2D, diffusion={"conditioning": "text", "text_max_length": 8},
               data={"text": "caption", "batch_size": 4}, trainer={"max_steps": 4})
    run = run_generator(cfg, tmp_path / "run", data_path=str(tmp_path / "m.csv"))
    g = load(run)
    assert g.conditioning == "text" and (run / "model" / "text_encoder" / "config.json").exists()
    assert type(g.network.unet).__name__ == "UNet2DConditionModel"
    out = g.generate(prompts=["bright disc", "dark square"], seed=0, steps=2)
    assert out.shape == (2, 1, 32, 32)
    torch.testing.assert_close(out, load(run).generate(prompts=["bright disc", "dark square"], seed=0, steps=2))


def test_cli_trains_generates_and_evaluates_a_generator(data, tmp_path, capsys):
    run = tmp_path / "gen"
    overrides = ["diffusion.channels=[16,32]", "diffusion.attention=[false,true]", "diffusion.sample_steps=3",
                 "diffusion.preview=2", "data.batch_size=16", "data.num_workers=0", "trainer.enable_progress_bar=false"]
    if not data[2].endswith(".npz"):
        overrides.append("data.label=label")
    assert main(["pretrain", "generators/diffusion_2d.yaml", "--data", data[2], "--out", str(run), "--max-steps", "20",
                 *overrides]) == 0
    assert main(["generate", "--model", str(run), "--classes", "all", "--n", "6", "--out", str(tmp_path / "set")]) == 0
    assert "manifest.csv" in capsys.readouterr().out
    assert main(["generate", "--model", str(run), "--classes", "nope", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown class 'nope'" in capsys.readouterr().err
    assert main(["evaluate", str(run), "--n", "24", "--split", "val", "encoder.name=vit_micro", "encoder.img_size=32",
                 "encoder.patch_size=8", "method=full", "trainer.max_steps=6", "trainer.enable_progress_bar=false",
                 "data.num_workers=0", "data.batch_size=16", *(["classification.label=label"] if not data[2].endswith(".npz") else [])]) == 0
    printed = capsys.readouterr().out
    assert "utility, AUROC on real val" in printed and "Frechet distance" in printed
    m = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert set(m["utility"]) >= {"real", "generated", "both"}
    for key in ("real", "generated", "both"):
        assert 0.0 <= m["utility"][key]["auroc"] <= 1.0 and m["utility"][key]["steps"] == 6
    assert 0.0 <= m["conditioning"]["accuracy"] <= 1.0
    assert m["distance"]["generated_vs_real"]["frechet"] >= 0 and m["distance"]["real_vs_real"]["frechet"] >= 0
    assert 0 < m["diversity"]["generated"]["ms_ssim"] <= 1 and m["memorisation"]["generated_median"] > 0
    assert (run / "eval_val" / "memorisation.png").exists()


def test_cli_generates_volumes_for_engine_label_maps(tmp_path, capsys):
    torch.manual_seed(0)
    g = DiffusionGenerator(spec_2d(spatial_dims=3, conditioning="mask", num_classes=None, class_names=None,
                                   mask_classes=3, image_size=16, sample_steps=2)).eval()
    g.save_pretrained(tmp_path / "gen3d")
    assert main(["synth", "--dims", "3", "--size", "16", "--n", "2", "--labels", "3", "--out", str(tmp_path / "synth")]) == 0
    assert main(["generate", "--model", str(tmp_path / "gen3d"), "--masks", str(tmp_path / "synth" / "labels"),
                 "--out", str(tmp_path / "set")]) == 0
    with open(tmp_path / "set" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["mask_source"].endswith("synth_00000.nii.gz") and rows[1]["seed"] == "1"
    ds = open_dataset(tmp_path / "set" / "manifest.csv", mask_key="mask", spatial_dims=3)
    engine = open_dataset(tmp_path / "synth" / "manifest.csv", mask_key="mask", spatial_dims=3)
    torch.testing.assert_close(ds[0]["mask"], engine[0]["mask"])  # each volume comes with its label map
    assert main(["generate", "--model", str(tmp_path / "gen3d"), "--classes", "a", "--out", str(tmp_path / "x")]) == 2
    assert "mask-conditioned; it takes no class" in capsys.readouterr().err


def test_a_generated_set_feeds_pretraining_beside_real_data(data, tmp_path):
    torch.manual_seed(0)
    g = DiffusionGenerator(spec_2d(image_size=32)).eval()
    manifest = export_generated(g, tmp_path / "set", classes=["a", "b"] * 4, progress=False)
    cfg = tiny_recipe("mae_vit_2d", data={"train_from": [str(manifest)]}, trainer={"max_steps": 3})
    run = run_pretrain(cfg, tmp_path / "mae", data_path=data[2])
    built = build_data(cfg | {"data": {**cfg["data"], "path": data[2]}}, METHODS.get_plugin("mae"))
    real = open_dataset(data[2], split="train")
    assert len(built.keyed) == len(real) + 8  # the real split and every generated image
    assert (run / "encoder" / "config.json").exists()
