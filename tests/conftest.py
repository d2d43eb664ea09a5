"""Shared fixtures: real files from installed packages and ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from medfm.data import samples
from medfm.data.reports import read_iu_xray

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


class KillAt(L.Callback):
    """Dies at the start of step ``step`` (after the checkpoints before it), as a killed job would: the one
    simulated kill of the in-process resume tests (the subprocess kills are in ``fault_injection.py``)."""

    def __init__(self, step: int = 4):
        self.step = step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated kill")


def fork_is_safe() -> bool:
    """Whether a test may ``fork`` this process instead of starting a new interpreter (which pays ~10 s importing
    torch + MONAI): only where torch runs on one thread (``make test`` sets OMP_NUM_THREADS=1). Measured: a fork
    taken after a multi-threaded OpenMP pool has run hangs the child at its next parallel region."""
    import os

    import torch

    return hasattr(os, "fork") and torch.get_num_threads() == 1


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is absent: ../shared/data is only beside the repository on the team's machines and in CI")
    return p


@pytest.fixture(scope="session")
def iu_reports():
    """The 3,955 real IU X-ray reports that torchxrayvision ships."""
    return read_iu_xray()


@pytest.fixture(scope="session")
def vqa_subset(tmp_path_factory) -> Path:
    """The questions on 24 VQA-RAD images (absolute paths), with a validation split carved by image: the VQA and
    multimodal-LM tests' data."""
    import csv

    from medfm.data.prepare import carve_split
    from medfm.data.writers import write_manifest

    src = shared_path("vqa_rad", "manifest.csv")
    with open(src) as f:
        rows = list(csv.DictReader(f))
    images = sorted({r["image"] for r in rows})[:24]
    keep = [{**r, "image": str(src.parent / r["image"])} for r in rows if r["image"] in images]
    d = tmp_path_factory.mktemp("vqa")
    return carve_split(write_manifest(d / "all.csv", keep), d / "manifest.csv", by="image", fraction=0.25)


@pytest.fixture(scope="session")
def mni_t1() -> Path:
    return samples.mni152("t1")


@pytest.fixture(scope="session")
def ct_small() -> Path:
    return samples.pydicom_file("CT_small.dcm")


@pytest.fixture(scope="session")
def slices(tmp_path_factory) -> str:
    """Real MNI152 axial slices with tissue label maps and a ``level`` class, 32 px (a manifest path)."""
    from medfm.data import samples

    return str(samples.mni152_slices(tmp_path_factory.mktemp("slices"), n=24, size=32))


# ----------------------------------------------------------------- one tiny trained run per kind, shared
@pytest.fixture(scope="session")
def mae_run(tmp_path_factory, slices) -> Path:
    """One finished MAE pretraining run (``--profile tiny``, real MNI152 slices), shared by every test that only
    reads a pretraining run (evaluate, reload, options): trained once per session, never changed by a test."""
    from medfm.cli import main

    run = tmp_path_factory.mktemp("shared_runs") / "mae"
    assert main(["pretrain", "mae_vit_2d", "--profile", "tiny", "--data", slices, "--out", str(run),
                 "trainer.enable_progress_bar=false"]) == 0
    return run


@pytest.fixture(scope="session")
def classification_run(tmp_path_factory, slices) -> Path:
    """One finished linear-probe classification run (``--profile tiny``, MNI152 slices, label ``level``), shared
    by the tests that only read a fine-tuning run."""
    from medfm.cli import main

    run = tmp_path_factory.mktemp("shared_runs") / "classification"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--data", slices, "--out", str(run),
                 "classification.label=level", "data.test_split=null", "trainer.enable_progress_bar=false"]) == 0
    return run
