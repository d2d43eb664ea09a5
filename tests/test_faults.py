"""Faults and bad input (issue 18): each case fails before anything trains, in one line, with exit code 2."""

from __future__ import annotations

import pytest

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
