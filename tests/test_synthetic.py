"""Randomized-synthesis engine: determinism, label counts, parameter ranges, worker/rank streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medfm.data import load
from medfm.synthetic import RANGES, SynthConfig, SyntheticDataset, random_label_map, synth_pair, synth_sample


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("kind", ["noise", "shapes", "mixed"])
def test_same_seed_same_sample_and_requested_labels(dims, kind):
    cfg = SynthConfig(spatial_dims=dims, size=32, n_labels=5, kind=kind)
    a, b, c = synth_sample(cfg, 7, 3), synth_sample(cfg, 7, 3), synth_sample(cfg, 7, 4)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == a["mask"].shape == (1,) + (32,) * dims
    assert a["image"].dtype == torch.float32 and a["mask"].dtype == torch.int64
    assert torch.unique(a["mask"]).tolist() == list(range(5))
    assert 0.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0
    assert a["meta"]["seed"] == 7 and a["meta"]["index"] == 3


def test_every_appearance_parameter_stays_in_its_documented_range():
    cfg = SynthConfig(spatial_dims=2, size=32, n_labels=4)
    seen_invert, seen_lowres = set(), set()
    for i in range(40):
        p = synth_sample(cfg, 0, i)["meta"]["appearance"]
        for key in ("mean", "std"):
            lo, hi = RANGES[key]
            assert all(lo <= v <= hi for v in p[key]), (key, p[key])
        for key in ("partial_volume_sigma", "bias", "gamma", "blur_sigma", "noise_std"):
            lo, hi = RANGES[key]
            assert lo <= p[key] <= hi, (key, p[key])
        if p["lowres_axis"] is not None:
            lo, hi = RANGES["lowres_factor"]
            assert lo <= p["lowres_factor"] <= hi and p["lowres_axis"] in (0, 1)
        assert p["noise"] in ("gaussian", "rician")
        seen_invert.add(p["inverted"])
        seen_lowres.add(p["lowres_axis"] is not None)
    assert seen_invert == {True, False} and seen_lowres == {True, False}  # the random switches do switch


def test_pairs_share_the_anatomy_not_the_contrast():
    p = synth_pair(SynthConfig(spatial_dims=3, size=24, n_labels=4), 1, 2)
    assert p["image"].shape == p["image2"].shape == p["mask"].shape
    assert torch.equal(p["mask"], synth_sample(SynthConfig(spatial_dims=3, size=24, n_labels=4), 1, 2)["mask"])
    assert p["meta"]["appearance"] != p["meta"]["appearance2"]
    assert (p["image"] - p["image2"]).abs().mean() > 0.01


def test_workers_and_ranks_draw_different_reproducible_samples():
    cfg = SynthConfig(spatial_dims=2, size=16, n_labels=3)

    def first(ds, n, workers=0):
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        return [s["meta"]["index"] for s in itertools.islice(iter(loader), n)]

    two_workers = first(SyntheticDataset(cfg, seed=0), 6, workers=2)
    assert sorted(two_workers) == list(range(6))  # every index once, none twice
    r0 = first(SyntheticDataset(cfg, seed=0, rank=0, world_size=2), 4)
    r1 = first(SyntheticDataset(cfg, seed=0, rank=1, world_size=2), 4)
    assert r0 == [0, 2, 4, 6] and r1 == [1, 3, 5, 7]
    a = next(iter(SyntheticDataset(cfg, seed=0, rank=1, world_size=2)))
    assert torch.equal(a["image"], synth_sample(cfg, 0, 1)["image"])  # reproducible: index -> sample


def test_real_label_maps_are_deformed_copies(tmp_path):
    from medfm.data import samples

    gm = load(samples.mni152("gm"))["image"][0, ::4, ::4, ::4]
    tissue = (gm > 0.5).long()  # a real grey-matter map
    rng = np.random.default_rng(0)
    lab, kind = random_label_map(tuple(tissue.shape), 2, rng, kind="template", templates=[tissue], deform=0.03)
    assert kind == "template" and lab.shape == tissue.shape
    agree = (lab == tissue).float().mean()
    assert 0.7 < agree < 1.0  # deformed, but still the same anatomy
    with pytest.raises(ValueError, match="templates"):
        random_label_map((8, 8), 2, rng, kind="template")
    with pytest.raises(ValueError, match="n_labels"):
        random_label_map((8, 8), 1, rng)


@pytest.mark.parametrize("dims", [2, 3])
def test_medfm_synth_writes_reproducible_nifti_readable_through_the_manifest(dims, tmp_path):
    import hashlib

    from medfm.cli import main
    from medfm.data import ManifestDataset

    def digest(folder):
        return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".png"}

    args = ["synth", "--dims", str(dims), "--size", "24", "--n", "3", "--labels", "4", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    da, db = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert len(da) == 7 and da == db  # 3 images + 3 label maps + manifest, byte-identical
    assert (tmp_path / "a" / "contact_sheet.png").stat().st_size > 2000
    ds = ManifestDataset(tmp_path / "a" / "manifest.csv", split="train", mask_key="mask")
    s = ds[1]
    ref = synth_sample(SynthConfig(spatial_dims=dims, size=24, n_labels=4), 5, 1)
    assert s["meta"]["spatial_dims"] == dims
    assert torch.allclose(torch.as_tensor(s["image"]), ref["image"], atol=1e-6)
    assert torch.equal(torch.as_tensor(s["mask"]).long(), ref["mask"])


# ------------------------------------------------------------------ the batched engine (training device)
@pytest.mark.parametrize("dims,size", [(2, 32), (3, 24)])
def test_device_engine_sample_depends_on_seed_and_index_only(dims, size):
    """A sample of the batched engine is the same whichever batch renders it, and on every call."""
    from medfm.synthetic.batched import synth_batch

    c = SynthConfig(spatial_dims=dims, size=size)
    batch = synth_batch(c, seed=3, indices=[5, 9, 2, 7])
    again = synth_batch(c, seed=3, indices=[5, 9, 2, 7])
    alone = synth_batch(c, seed=3, indices=[2])
    assert torch.equal(batch["image"], again["image"]) and torch.equal(batch["mask"], again["mask"])
    assert torch.equal(alone["mask"][0], batch["mask"][2])
    torch.testing.assert_close(alone["image"][0], batch["image"][2], rtol=0, atol=1e-6)
    assert not torch.equal(batch["image"][0], synth_batch(c, seed=4, indices=[5])["image"][0])
    assert batch["image"].shape == (4, 1, *([size] * dims)) and batch["mask"].dtype == torch.int64


def test_device_engine_draws_from_the_cpu_engines_distribution():
    """The batched engine and the per-sample CPU engine make different samples of one distribution: every
    parameter inside RANGES, every label present, the same share of noise and shape maps, and per-image
    intensity statistics and label volumes that a two-sample Kolmogorov-Smirnov test cannot tell apart."""
    from scipy.stats import ks_2samp

    from medfm.synthetic.batched import synth_batch

    n, c = 64, SynthConfig(spatial_dims=3, size=20, n_labels=6)
    dev = synth_batch(c, seed=0, indices=range(n), meta=True)
    cpu = [synth_sample(c, seed=0, index=i) for i in range(n)]
    for m in dev["meta"]:
        for key, value in m["appearance"].items():
            if isinstance(RANGES.get(key), tuple) and not (key == "lowres_factor" and m["appearance"]["lowres_axis"] is None):
                lo, hi = RANGES[key]
                assert all(lo <= v <= hi for v in np.atleast_1d(value)), (key, value)
    assert all(len(torch.unique(m)) == 6 for m in dev["mask"]) and all(len(torch.unique(s["mask"])) == 6 for s in cpu)
    share = lambda kinds: sum(k == "noise" for k in kinds) / n  # noqa: E731
    assert abs(share([m["label_kind"] for m in dev["meta"]]) - share([s["meta"]["label_kind"] for s in cpu])) < 0.25

    def stats(images, masks):
        img = images.reshape(len(images), -1)
        background = (masks.reshape(len(masks), -1) == 0).float().mean(1)
        return {"mean": img.mean(1), "std": img.std(1), "background share": background}

    a = stats(dev["image"], dev["mask"])
    b = stats(torch.stack([s["image"] for s in cpu]), torch.stack([s["mask"] for s in cpu]))
    for key in a:
        p = ks_2samp(a[key].numpy(), b[key].numpy()).pvalue
        assert p > 0.01, f"{key}: KS p = {p:.4f} (device {a[key].mean():.3f} vs cpu {b[key].mean():.3f})"
    assert float(dev["image"].min()) >= 0.0 and float(dev["image"].max()) <= 1.0
