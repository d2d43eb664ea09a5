"""`medfm quickstart --fast` (what `make demo` runs, at test size): every step runs, the report holds the
numbers the runs measured, the console is free of third-party noise, and the artifacts reload."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import medfm
from medfm.cli import main

from .conftest import REPO

pytestmark = pytest.mark.slow  # the quickstart in a subprocess: `make test` runs it, `make test-fast` leaves it out


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # show every warning a user would see once
    exe = os.path.join(os.path.dirname(sys.executable), "medfm")  # the installed console script, as `make demo` runs it
    proc = subprocess.run([exe, "quickstart", "--fast", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_every_step_runs_and_the_report_holds_the_measured_numbers(quick):
    out, _ = quick
    results = json.loads((out / "results.json").read_text())
    assert [s["step"] for s in results["steps"]] == ["pretrain_3d", "segment_3d", "pretrain_2d", "probe_2d", "report",
                                                     "diffusion"]
    report = (out / "report.md").read_text()
    seg = json.loads((out / "segment_3d" / "metrics.json").read_text())["val"]["mean_dice"]
    seg_random = json.loads((out / "segment_3d_random" / "metrics.json").read_text())["val"]["mean_dice"]
    probe = json.loads((out / "probe_2d" / "metrics.json").read_text())["val"]["auroc"]
    bleu = json.loads((out / "report" / "metrics.json").read_text())["dev"]["model"]["bleu_4"]
    for value in (seg, seg_random, probe, bleu):
        assert f"{value:.3f}" in report
    losses = [float(r["train/loss"]) for r in __import__("csv").DictReader(open(out / "pretrain_2d" / "logs" / "metrics.csv"))
              if r.get("train/loss")]
    assert f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" in report
    for png in ("summary.png", "segment_3d/overlay_val.png", "pretrain_2d/mae_reconstruction.png",
                "diffusion/generated/grid.png", "probe_2d/roc_val.png"):
        assert (out / png).stat().st_size > 1000, png
        assert png.split("/")[-1] in report or png == "diffusion/generated/grid.png"


def test_the_console_shows_step_totals_and_no_third_party_noise(quick):
    _, console = quick
    assert re.search(r"training on cpu \(\d+ threads\), 32-true: 100% 4/4 ", console)
    assert "\r" not in console  # not a terminal: progress comes as whole lines, no carriage-return redraws
    warned = [line for line in console.splitlines() if "Warning" in line]
    assert not warned and "site-packages" not in console, warned  # nothing a demo user need not act on
    assert "report decoder: warm-started from all-MiniLM-L6-v2; 16 new weights start random" in console
    for noise in ("GPU available", "TPU available", "Epoch 0/", "LeafSpec", "litlogger", "eval mode",
                  "worker processes", "Trainer.fit"):
        assert noise not in console, noise
    assert "| 3D tissue segmentation (MNI152 right hemisphere) | mean Dice" in console
    assert "report: " in console and "report.md" in console


def test_the_quickstart_models_reload_alone(quick):
    out, _ = quick
    import torch

    seg = medfm.load(out / "segment_3d")
    with torch.no_grad():
        assert seg(torch.rand(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)  # background, GM, WM, CSF
    assert type(medfm.load(out / "report")).__name__ == "ReportGenerator"
    assert type(medfm.load(out / "diffusion")).__name__ == "DiffusionGenerator"
    assert (out / "pretrain_3d" / "encoder" / "model.safetensors").exists()


def test_quickstart_refuses_unknown_steps_and_foreign_folders(tmp_path, capsys):
    assert main(["quickstart", "--fast", "--out", str(tmp_path / "a"), "--data", "segment=x.csv"]) == 2
    assert "unknown step; steps that take data: segment_3d" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert main(["quickstart", "--fast", "--out", str(tmp_path / "mine")]) == 2
    assert "is not an earlier quickstart folder" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").exists()


def test_make_demo_runs_the_quickstart():
    demo = (REPO / "Makefile").read_text().split("\ndemo:")[1].split("\n\n")[0]
    assert "medfm quickstart" in demo


def test_progress_in_a_log_is_a_line_every_ten_percent():
    import io

    from medfm.progress import LineProgress, progress_bar

    log = io.StringIO()
    bar = progress_bar(total=200, desc="training", unit="step", file=log, mininterval=0)
    assert isinstance(bar, LineProgress)
    for i in range(200):
        bar.update(1)
        bar.set_postfix_str(f"loss {i}", refresh=False)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 10 <= len(lines) <= 12, lines
    assert lines[0].startswith("training:   0% 0/200") and lines[-1].startswith("training: 100% 200/200")
    assert "loss 199" in lines[-1]
