"""Calibration (ECE, temperature scaling stored with the model, selective prediction) and group metrics
(per-group metrics, worst group, the gap's bootstrap interval, the shift against validation)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmc

import medfm
from medfm.cli import main
from medfm.evaluate.calibration import (calibration_error, fit_temperature, probabilities, selective_prediction)
from medfm.evaluate.groups import group_report, rank_auroc


def _miscalibrated(n=2000, seed=0):
    """Logits of a calibrated 3-class model (labels drawn from its own softmax), then made 4x overconfident."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=g) * 1.5
    target = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)
    return logits * 4.0, target


def test_ece_matches_a_hand_count_and_temperature_scaling_lowers_it():
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    target = torch.tensor([1, 0, 0, 1])
    # bins (15 equal): confidences 0.9, 0.8, 0.6, 0.7 each alone; |conf - correct| = 0.1, 0.8, 0.4, 0.3
    assert calibration_error(probs, target) == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4, abs=1e-6)
    logits, target = _miscalibrated()
    before = calibration_error(probabilities(logits), target)
    t = fit_temperature(logits, target)
    after = calibration_error(probabilities(logits, temperature=t), target)
    assert t == pytest.approx(4.0, rel=0.15) and after < before / 3, (t, before, after)
    # a ranking metric does not move
    assert torch.equal(probabilities(logits, temperature=t).argmax(1), logits.argmax(1))


def test_selective_prediction_defers_the_least_confident():
    probs = torch.tensor([[0.99, 0.01], [0.9, 0.1], [0.55, 0.45], [0.4, 0.6]])
    target = torch.tensor([0, 0, 1, 1])  # the one mistake is the least confident case
    s = selective_prediction(probs, target, coverages=(1.0, 0.75, 0.5))
    assert s["coverage"]["1.0"]["accuracy"] == 0.75 and s["coverage"]["0.8"]["accuracy"] == 1.0
    assert s["aurc"] == pytest.approx((0 + 0 + 0 + 0.25) / 4)


def test_group_gap_and_its_interval_on_a_constructed_case():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    good = np.stack([1 - y, y], 1) * 0.8 + 0.1  # group a: always right
    noise = rng.random(600)
    bad = np.stack([1 - noise, noise], 1)  # group b: coin flips
    probs = np.where((np.arange(600) < 300)[:, None], good, bad)
    groups = np.where(np.arange(600) < 300, "a", "b")
    r = group_report(probs, y, groups, n_boot=300)
    assert r["groups"]["a"]["accuracy"] == 1.0 and abs(r["groups"]["b"]["accuracy"] - 0.5) < 0.1
    assert r["worst"]["accuracy"]["group"] == "b" and r["worst"]["auroc"]["group"] == "b"
    lo, hi = r["gap"]["accuracy"]["ci95"]
    assert 0.35 < lo <= r["gap"]["accuracy"]["value"] <= hi < 0.65
    # two halves of one population: the gap's interval holds 0-ish differences, never a confident one
    same = group_report(bad, y, np.where(np.arange(600) % 2 == 0, "x", "y"), n_boot=300)
    assert same["gap"]["accuracy"]["ci95"][0] < 0.02
    assert rank_auroc(probs[:300, 1], y[:300]) == pytest.approx(
        float(tmc.binary_auroc(torch.tensor(probs[:300, 1]), torch.tensor(y[:300]))), abs=1e-6)


def test_a_run_stores_its_temperature_and_evaluate_reports_groups_and_shift(tmp_path, slices, capsys):
    # the real slice set with a site column (alternate blocks of 4 rows: two "scanners")
    with open(slices) as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        r["site"] = "A" if (i // 4) % 2 else "B"
    manifest = tmp_path / "data" / "m.csv"
    manifest.parent.mkdir()
    root = str(Path(slices).parent)
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{**r, "image": f"{root}/{r['image']}", "mask": f"{root}/{r['mask']}"} for r in rows])
    run = tmp_path / "run"
    assert main(["finetune", "classify_2d", "--data", str(manifest), "--out", str(run), "--profile", "tiny",
                 "classification.label=level", "trainer.max_steps=6"]) == 0
    m = json.loads((run / "metrics.json").read_text())["val"]
    assert {"ece", "ece_uncalibrated", "temperature", "selective"} <= set(m)
    # fitted on these cases by their likelihood: never a worse NLL (ECE is not what it minimises)
    assert m["nll"] <= m["nll_uncalibrated"] + 1e-6
    assert (run / "calibration_val.png").exists() and (run / "selective_val.png").exists()
    model = medfm.load(run / "model")
    assert model.temperature == pytest.approx(m["temperature"]) and model.spec["head"]["temperature"] == model.temperature
    capsys.readouterr()
    # the validation split again: the same numbers; by site: per-group metrics and the gap
    assert main(["evaluate", str(run), "--split", "val", "--groups", "site"]) == 0
    out = capsys.readouterr().out
    again = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert again["val"]["ece"] == pytest.approx(m["ece"], abs=1e-6) and "shift" not in again
    g = again["val"]["groups"]["site"]
    assert set(g["groups"]) == {"A", "B"} and sum(v["n"] for v in g["groups"].values()) == m["n"]
    assert g["worst"] == {} and "by site: 2 groups, fewer than two of 10+ cases to compare" in out  # 3 + 3 cases
    # another split is compared with validation (the shift report)
    assert main(["evaluate", str(run), "--split", "train"]) == 0
    shift = json.loads((run / "eval_train" / "metrics.json").read_text())["shift"]
    assert shift["auroc"]["in_domain"] == pytest.approx(m["auroc"]) and "train" in shift["auroc"]
    assert "shift    auroc: in-domain (validation)" in capsys.readouterr().out
    # a column the manifest lacks: one line, exit 2
    assert main(["evaluate", str(run), "--split", "val", "--groups", "scanner"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no column 'scanner' for --groups" in err and len(err.splitlines()) == 1
