"""Robustness specs: every perturbation is the identity at severity 0 and grows with severity, is deterministic
per seed; a spec with an unknown family or an impossible severity is one line naming the key; the shipped specs
load; `medfm evaluate RUN --robustness SPEC` scores a real run clean and perturbed, with pass / fail."""

from __future__ import annotations

import json
import re

import pytest
import torch

from medfm.cli import main
from medfm.data import load
from medfm.evaluate.robustness import FAMILIES, load_spec, perturb


def _real_image(dims: int) -> torch.Tensor:
    """A real MNI152 T1 slice (2D) or block (3D), scaled to 0-1 as the presets leave it."""
    from medfm.data import samples

    vol = load(samples.mni152("t1"))["image"][0]
    x = vol[40:72, 60:92, 70:102] if dims == 3 else vol[20:84, 30:94, 90]
    x = (x - x.min()) / (x.max() - x.min())
    return x[None].float()


@pytest.mark.parametrize("dims", [2, 3])
def test_each_perturbation_is_the_identity_at_zero_and_grows(dims):
    x = _real_image(dims)
    for name, family in FAMILIES.items():
        if dims not in family.dims:
            continue
        assert torch.equal(perturb(x, name, 0, seed=3), x), name
        levels = {"flip": [1.0], "rotation": [2.0, 8.0, 30.0]}.get(name) or (  # 90 degrees may look alike again
            [1, 3, 6] if family.integer else [family.max_severity * f for f in (0.05, 0.2, 0.5)])
        change = [float((perturb(x, name, s, seed=3) - x).abs().mean()) for s in levels]
        assert change[0] > 0 and all(b > a for a, b in zip(change, change[1:])), (name, change)
        again = perturb(x, name, levels[-1], seed=3)
        assert again.shape == x.shape and torch.equal(again, perturb(x, name, levels[-1], seed=3)), name


def test_bad_specs_are_one_line_naming_the_key(tmp_path):
    cases = {
        "perturbations:\n  speckle: {severities: [0.1]}\n": "perturbations.speckle: unknown perturbation",
        "perturbations:\n  jpeg: {severities: [120]}\n": "perturbations.jpeg.severities: 120 is impossible (a number in 0..99",
        "perturbations:\n  gaussian_noise: {severities: [-0.1]}\n": "perturbations.gaussian_noise.severities: -0.1 is impossible",
        "perturbations:\n  slice_thickness: {severities: [1.5]}\n": "severities: 1.5 is impossible (a whole number",
        "perturbations:\n  blur: {severities: [1], strength: 2}\n": "perturbations.blur: unknown key(s) strength",
        "name: x\n": "needs a 'perturbations' mapping",
    }
    for text, message in cases.items():
        path = tmp_path / "spec.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_spec(str(path))
    (tmp_path / "s3d.yaml").write_text("perturbations:\n  slice_thickness: {severities: [1]}\n")
    with pytest.raises(ValueError, match="perturbations.slice_thickness: is for 3D inputs, the model reads 2D"):
        load_spec(str(tmp_path / "s3d.yaml"), dims=2)
    with pytest.raises(FileNotFoundError, match="shipped specs: ct, cxr, mr"):
        load_spec("xray")
    for name, dims in (("cxr", 2), ("mr", 2), ("mr", 3), ("ct", 3)):
        assert load_spec(name, dims=dims).severities


def test_evaluate_a_run_under_a_spec(classification_run, tmp_path, capsys):
    run, first = classification_run, tmp_path / "first"  # the session's shared run: results go to --out
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: tiny\nmetric: accuracy\ntolerance: 0.3\nperturbations:\n"
                    "  gaussian_noise: {severities: [0.05, 0.5]}\n  intensity_scale: {severities: [9.0], tolerance: 0.0}\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--robustness", str(spec), "--out", str(first)]) == 0
    out = capsys.readouterr().out
    m = json.loads((first / "metrics.json").read_text())["robustness"]
    own = json.loads((run / "metrics.json").read_text())["val"]
    assert m["clean"] == pytest.approx(own["accuracy"])  # clean = the run's own score, nothing refitted
    assert list(m["families"]) == ["gaussian_noise", "intensity_scale"]
    assert set(m["families"]["gaussian_noise"]["severities"]) == {"0.05", "0.5"}
    for f in m["families"].values():
        assert f["passed"] == (f["worst_drop"] <= f["tolerance"])
    assert (first / "robustness.png").stat().st_size > 5000
    assert "| gaussian_noise |" in (first / "robustness.md").read_text()
    assert "robustness (tiny):" in out
    # the same spec again: the same numbers (deterministic per seed)
    assert main(["evaluate", str(run), "--split", "val", "--robustness", str(spec), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["robustness"]["families"] == m["families"]
    # a 3D-only family for a 2D model: one line, exit 2
    spec.write_text("perturbations:\n  slice_thickness: {severities: [2]}\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "val", "--robustness", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is for 3D inputs, the model reads 2D" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_a_segmentation_mask_moves_with_a_rotated_or_flipped_image(dims):
    from medfm.evaluate.robustness import Perturbed

    x = _real_image(dims)
    sample = {"image": x, "mask": (x > 0.4).long(), "label": 1}
    for family, severity in (("rotation", 20.0), ("flip", 1.0), ("gaussian_noise", 0.1)):
        out = Perturbed([sample], family, severity)[0]
        moved = (out["image"] > 0.4).long()
        # the mask follows the anatomy (up to interpolation at the edges); noise leaves it alone
        agree = float((out["mask"] == moved).float().mean()) if family != "gaussian_noise" else None
        if agree is not None:
            assert agree > 0.95 and not torch.equal(out["mask"], sample["mask"]), (family, agree)
            assert out["mask"].dtype == sample["mask"].dtype and set(out["mask"].unique().tolist()) <= {0, 1}
        else:
            assert torch.equal(out["mask"], sample["mask"])
        assert out["label"] == 1


def test_a_segmenter_under_a_spec(tmp_path, slices):
    run = tmp_path / "seg"
    assert main(["finetune", "segment_2d", "--data", slices, "--out", str(run), "--profile", "tiny",
                 "trainer.max_steps=3", "segmentation.num_classes=3", "data.test_split=null"]) == 0
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: seg\ntolerance: 0.5\nperturbations:\n  rotation: {severities: [10]}\n"
                    "  rician_noise: {severities: [0.1]}\n")
    assert main(["evaluate", str(run), "--split", "val", "--robustness", str(spec)]) == 0
    m = json.loads((run / "robustness_val" / "metrics.json").read_text())["robustness"]
    own = json.loads((run / "metrics.json").read_text())["val"]
    assert m["metric"] == "mean_dice" and m["clean"] == pytest.approx(own["mean_dice"])
    assert set(m["families"]) == {"rotation", "rician_noise"}
