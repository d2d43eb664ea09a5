"""Faults and bad input (issue 18): each case fails before anything trains, in one line, with exit code 2."""

from __future__ import annotations

import pytest

import medfm
from medfm.cli import main

from .pretrain_helpers import data_2d

SMALL = ["encoder.name=vit_micro", "encoder.img_size=32", "encoder.patch_size=8", "data.batch_size=8",
         "data.num_workers=0", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_2d(tmp_path_factory.mktemp("faults"))


def test_a_misspelled_split_is_an_error_listing_the_splits_before_training(data, tmp_path, capsys):
    out = tmp_path / "run"
    extra = [] if data.endswith(".npz") else ["classification.label=label"]
    code = main(["finetune", "classify_2d", "--data", data, "--out", str(out), "--max-steps", "2",
                 "data.val_split=validation", *SMALL, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "no split 'validation' (data.val_split)" in err and "train" in err and "val" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing trained, no half-made run folder


@pytest.mark.parametrize("steps", ["-5", "-1", "0"])
def test_a_step_budget_below_one_is_refused(data, tmp_path, capsys, steps):
    out = tmp_path / "run"
    extra = [] if data.endswith(".npz") else ["classification.label=label"]
    assert main(["finetune", "classify_2d", "--data", data, "--out", str(out), "--max-steps", steps, *SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert f"trainer.max_steps (--max-steps) must be a whole number >= 1, got {steps}" in err
    assert not out.exists()
    assert main(["pretrain", "mae_vit_2d", "--data", data, "--out", str(out), "--max-steps", steps, *SMALL]) == 2
    assert not out.exists()


# ------------------------------------------------------------------ the run folder
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from medfm.data import samples  # noqa: E402
from medfm.run import RunFolder  # noqa: E402

from .conftest import REPO  # noqa: E402

PRETRAIN = ["pretrain", "mae_vit_2d", "--profile", "tiny", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """Real 2D data that ships with nilearn: 32 axial MNI152 slices with a 4-level label."""
    return str(samples.mni152_slices(tmp_path_factory.mktemp("slices"), n=32, size=32))


def _weights(run: Path) -> dict:
    return load_file(str(run / "encoder" / "model.safetensors"))


@pytest.mark.slow  # a subprocess stopped with SIGTERM, then resumed
def test_sigterm_writes_a_checkpoint_exits_143_and_resume_ends_like_an_uninterrupted_run(slices, tmp_path):
    """Item 1: SIGTERM (timeout, SLURM) must not end a run with exit 0 and nothing saved."""
    out = tmp_path / "stopped"  # 40 steps: the signal lands a few steps after the first checkpoint (step 5)
    argv = [*PRETRAIN, "--data", slices, "--out", str(out), "--max-steps", "40", "trainer.checkpoint_every_n_steps=5"]
    proc = subprocess.Popen([sys.executable, "-m", "medfm.cli", *argv], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # training is running once the first periodic checkpoint exists
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM at step" in err and "--resume" in err
    step = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < step < 40 and not (out / "encoder").exists()
    assert main([*argv, "--resume"]) == 0
    whole = tmp_path / "whole"
    assert main([*PRETRAIN, "--data", slices, "--out", str(whole), "--max-steps", "40",
                 "trainer.checkpoint_every_n_steps=5"]) == 0
    a, b = _weights(out), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_takes_the_runs_own_recipe_and_a_change_needs_to_be_allowed(slices, tmp_path, capsys):
    """Item 2: resuming without repeating the overrides continues with what ran; a change is refused or
    recorded."""
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), "mae.mask_ratio=0.6", "data.batch_size=4"]) == 0
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), "--resume", "--max-steps", "6"]) == 0
    recipe = (out / "recipe.yaml").read_text()
    assert "mask_ratio: 0.6" in recipe and "batch_size: 4" in recipe and "max_steps: 6" in recipe
    capsys.readouterr()
    assert main([*PRETRAIN, "--out", str(out), "--resume", "--max-steps", "8", "mae.mask_ratio=0.5"]) == 2
    err = capsys.readouterr().err
    assert "mae.mask_ratio would change from 0.6 to 0.5" in err and "--allow-change mae.mask_ratio" in err
    assert len(err.strip().splitlines()) == 1
    assert main([*PRETRAIN, "--out", str(out), "--resume", "--max-steps", "8", "mae.mask_ratio=0.5",
                 "--allow-change", "mae.mask_ratio"]) == 0
    info = json.loads((out / "run.json").read_text())
    changes = info["resumed_with_changes"]
    assert changes[0]["trainer.max_steps"] == {"from": 4, "to": 6}
    assert changes[1]["mae.mask_ratio"] == {"from": 0.6, "to": 0.5}


def test_a_folder_holding_a_runs_outputs_is_refused_without_resume_or_overwrite(slices, tmp_path, capsys):
    """Item 3: a finished run whose checkpoints/ was deleted is not silently overwritten."""
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--data", slices, "--out", str(out)]) == 0
    import shutil

    shutil.rmtree(out / "checkpoints")
    before = _weights(out)
    capsys.readouterr()
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), "mae.mask_ratio=0.5"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (recipe.yaml, run.json" in err and "--overwrite" in err
    assert all(torch.equal(before[k], v) for k, v in _weights(out).items())
    (out / "notes.txt").write_text("mine")
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), "mae.mask_ratio=0.5", "--overwrite"]) == 0
    assert "mask_ratio: 0.5" in (out / "recipe.yaml").read_text() and (out / "notes.txt").read_text() == "mine"


def test_a_second_process_on_a_run_folder_in_use_is_refused(slices, tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunFolder(out)
    holder.lock()
    try:
        assert main([*PRETRAIN, "--data", slices, "--out", str(out)]) == 2
        assert f"is in use by process {os.getpid()}" in capsys.readouterr().err
    finally:
        holder.unlock()
    assert main([*PRETRAIN, "--data", slices, "--out", str(out)]) == 0
    assert not (out / ".lock").exists()


def test_checkpoints_are_written_beside_the_target_and_a_stale_partial_one_is_never_read(slices, tmp_path):
    """Item 10: no temporary checkpoint in the system temp folder; a leftover .tmp is removed, not resumed."""
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--data", slices, "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    assert oct(ckpt.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the umask's mode, like every other file
    (out / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half a checkpoint")
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), "--resume", "--max-steps", "5"]) == 0
    assert not (out / "checkpoints" / "last.ckpt.tmp").exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ recipes and arguments
@pytest.mark.parametrize("override, message", [
    ("trainer.max_step=3", "unknown recipe key 'trainer.max_step'; did you mean 'max_steps'?"),
    ("encoder.patch_sise=4", "unknown recipe key 'encoder.patch_sise'; did you mean 'patch_size'?"),
    ("view.scael=[0.5,1.0]", "unknown recipe key 'view.scael'"),
    ("encoder.img_size=100000", "tokens per image (at most 32,768): check encoder.img_size"),
])
def test_typos_and_absurd_values_in_free_form_sections_are_one_line_errors(slices, tmp_path, capsys, override, message):
    """Items 7 and 8: no TypeError naming internal classes, no 12.9 GB allocation, no half-made folder."""
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_yaml_tag_a_pickle_an_unwritable_out_and_a_wrong_preset_are_one_line_errors(slices, tmp_path, capsys):
    """Item 8."""
    recipe = tmp_path / "evil.yaml"
    recipe.write_text("method: mae\nseed: !!python/object/apply:os.system ['touch pwned']\n")
    assert main(["pretrain", str(recipe), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{recipe} (line 2): not a plain YAML recipe" in err and not (tmp_path / "pwned").exists()
    weights = tmp_path / "planted.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "hook": os.getcwd}, weights)  # a function: pickled code
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(weights), "--data", slices,
                 "--out", str(tmp_path / "b"), "classification.label=level"]) == 2
    err = capsys.readouterr().err
    assert "refused: the file holds pickled Python objects" in err and "weights_only=False" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    assert main([*PRETRAIN, "--data", slices, "--out", "/proc/medfm_cannot_write_here"]) == 2
    assert "medfm pretrain: error:" in capsys.readouterr().err
    png = next(Path(slices).parent.glob("t1_*.png"))
    assert main(["encode", str(png), "--preset", "ct_3d"]) == 2
    assert "is 2D; preset ct_3d is for 3D inputs (use radiograph_2d)" in capsys.readouterr().err


# ------------------------------------------------------------------ data
def _manifest(tmp_path: Path, rows: list[dict]) -> str:
    from medfm.data.writers import write_manifest

    return str(write_manifest(tmp_path / "manifest.csv", rows))


def test_a_corrupt_file_is_found_before_training_and_on_error_skip_drops_it(slices, tmp_path, capsys):
    """Item 6: the pre-flight scan names the line before anything trains; skip drops the row and counts it;
    a worker's error is the same one line."""
    import csv

    rows = list(csv.DictReader(open(slices)))
    for r in rows:
        r["image"] = str(Path(slices).parent / r["image"])
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    rows[5]["image"] = str(bad)
    manifest = _manifest(tmp_path, rows)
    assert main([*PRETRAIN, "--data", manifest, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert f"{manifest} line 7: {bad}: unreadable" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    assert main([*PRETRAIN, "--data", manifest, "--out", str(tmp_path / "b"), "data.on_error=skip"]) == 0
    # without the scan the file is met while training, in a DataLoader worker: still one line naming it
    assert main([*PRETRAIN, "--data", manifest, "--out", str(tmp_path / "c"), "data.preflight=false",
                 "data.num_workers=1", "data.cache=false", "--max-steps", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "DataLoader worker" not in err[0], err


def test_labels_missing_from_training_are_named(tmp_path, slices):
    """Item 4: a class present only in val / test, and a single-class training set, are warned about."""
    import csv

    rows = list(csv.DictReader(open(slices)))
    for r in rows:
        r["image"] = str(Path(slices).parent / r["image"])
        r["finding"] = "normal" if r["split"] == "train" else ("normal" if r["level"] in ("q1", "q2") else "lesion")
    manifest = _manifest(tmp_path, rows)
    with pytest.warns(UserWarning) as caught:
        assert main(["finetune", "classify_2d", "--profile", "tiny", "--data", manifest, "--out", str(tmp_path / "r"),
                     "classification.label=finding", "trainer.enable_progress_bar=false"]) == 0
    text = " | ".join(str(w.message) for w in caught)
    assert "the training split 'train' holds a single class (normal)" in text
    assert "class 'lesion' appears in split 'val'" in text and f"{manifest} line" in text


def test_a_mask_label_outside_the_classes_names_the_file(tmp_path, capsys):
    """Item 9a."""
    import nibabel as nib
    import numpy as np

    manifest = samples.mni152_hemispheres(tmp_path / "hemi")
    left = tmp_path / "hemi" / "left_tissue.nii.gz"
    img = nib.load(left)
    lab = np.asarray(img.dataobj).copy()
    lab[lab == 2] = 7
    nib.save(nib.Nifti1Image(lab, img.affine), left)
    code = main(["finetune", "segment_3d", "--profile", "tiny", "--data", str(manifest), "--out", str(tmp_path / "s"),
                 "segmentation.num_classes=3", "data.test_split=null", "trainer.enable_progress_bar=false"])
    err = capsys.readouterr().err
    assert code == 2 and f"{manifest} line 2: {left}: label value(s) [7" in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_on_the_validation_split_reproduces_the_runs_own_numbers(slices, tmp_path, capsys):
    """Item 9b: `medfm evaluate --split val` scores as the run did, and says at which threshold."""
    out = tmp_path / "cls"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--data", slices, "--out", str(out),
                 "classification.label=level", "trainer.enable_progress_bar=false", "data.test_split=null"]) == 0
    own = json.loads((out / "metrics.json").read_text())["val"]
    capsys.readouterr()
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    again = json.loads((out / "eval_val" / "metrics.json").read_text())["val"]
    assert again["accuracy"] == pytest.approx(own["accuracy"]) and again["auroc"] == pytest.approx(own["auroc"])
    assert "[threshold 0.5 / argmax]" in capsys.readouterr().out


# ------------------------------------------------------------------ kill -9 / SIGTERM at each stage
from .fault_injection import partial_files, run_killed, same_result, tiny_argv  # noqa: E402

STAGES = [  # (kind, stage, signal)
    ("pretrain", "step", "SIGKILL"), ("pretrain", "checkpoint", "SIGKILL"), ("pretrain", "export", "SIGKILL"),
    ("finetune", "step", "SIGTERM"), ("finetune", "checkpoint", "SIGKILL"), ("finetune", "evaluation", "SIGKILL"),
    ("finetune", "export", "SIGKILL"), ("text_mlm", "export", "SIGKILL"),
]


@pytest.fixture(scope="module")
def uninterrupted(slices, tmp_path_factory):
    root = tmp_path_factory.mktemp("whole")
    runs = {kind: root / kind for kind in ("pretrain", "finetune", "text_mlm")}
    for kind, out in runs.items():
        assert main(tiny_argv(kind, slices, out)) == 0
    return runs


@pytest.mark.slow  # runs killed in subprocesses at every stage
@pytest.mark.parametrize("kind, stage, signal", STAGES, ids=lambda v: str(v))
def test_a_run_killed_at_any_stage_resumes_to_the_uninterrupted_result(kind, stage, signal, slices, uninterrupted,
                                                                        tmp_path):
    out = tmp_path / "run"
    argv = tiny_argv(kind, slices, out)
    killed = run_killed(stage, signal, argv, at=3, cwd=REPO, fork=True)
    assert killed.returncode == (143 if signal == "SIGTERM" and stage == "step" else -9), killed.stderr[-1500:]
    assert not (out / "metrics.json").exists() or stage == "export"
    assert main([*argv, "--resume"]) == 0
    ok, why = same_result(out, uninterrupted[kind])
    assert ok, why
    assert partial_files(out) == []
    if kind == "text_mlm":  # the text tower a kill interrupted mid-save reloads from its folder (alone, in a fresh
        tower = medfm.load(out)  # process, for every artifact kind: test_run_layer.py)
        assert type(tower).__name__ == "TextEncoder" and tower(["no acute findings."])["pooled"].shape[-1] == 384


class _Planted:
    """Unpickling this runs code: it creates the file named in ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_in_a_resume_checkpoint_runs_nothing(slices, tmp_path, capsys):
    """Planted pickles: `--resume` reads checkpoints/last.ckpt, a file anyone with access to the folder can replace."""
    out = tmp_path / "run"
    assert main([*PRETRAIN, "--data", slices, "--out", str(out)]) == 0
    marker = tmp_path / "pwned"
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    state["hyper_parameters"] = {"x": _Planted(str(marker))}
    torch.save(state, out / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    assert main([*PRETRAIN, "--data", slices, "--out", str(out), "--resume", "--max-steps", "6"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "last.ckpt: refused" in err and len(err.strip().splitlines()) == 1, err
