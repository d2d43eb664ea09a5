"""Text tower adaptation: masked-language-model training on real reports, resume, export."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from medfm.data import DataError
from medfm.data.reports import read_iu_xray

from .conftest import KillAt

pytestmark = pytest.mark.slow  # MLM runs on the IU reports: `make test` runs it, `make test-fast` leaves it out


# --------------------------------------------------------------------------- text tower adaptation (MLM)
def _mlm_recipe(**over):
    from medfm.pretrain import load_recipe

    from .conftest import REPO

    base = {"text_mlm": {"max_length": 32, "holdout_every": 10},
            "data": {"batch_size": 8}, "optim": {"lr": 2e-4, "warmup_steps": 2},
            "trainer": {"max_steps": 12, "log_every_n_steps": 1, "enable_progress_bar": False,
                        "checkpoint_every_n_steps": 6}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_recipe(REPO / "encoders" / "text_mlm_reports.yaml", base)


def test_mlm_on_iu_reports_lowers_heldout_perplexity_and_exports_a_text_tower(tmp_path, iu_reports):
    from medfm.encoders.text import TextEncoder
    from medfm.pretrain import run_pretrain

    from .pretrain_helpers import losses

    run = run_pretrain(_mlm_recipe(text_mlm={"holdout_every": 80}), tmp_path / "mlm")
    m = json.loads((run / "metrics.json").read_text())
    # 28 of the 3,955 reports have neither findings nor impression
    assert m["train_texts"] + m["heldout_texts"] == 3927 and m["heldout_texts"] == 3927 // 80
    assert m["heldout_perplexity_after"] < m["heldout_perplexity_before"], m
    assert len(losses(run)) == 12
    text = TextEncoder(run / "encoder", max_length=32)  # the adapted encoder plugs into CLIP as clip.text_model
    assert text(["no acute cardiopulmonary abnormality."])["pooled"].shape == (1, 384)


def test_mlm_resume_masks_and_ends_like_an_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    from medfm.pretrain import run_pretrain

    from .pretrain_helpers import losses

    manifest = tmp_path / "reports.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["report"])
        for r in read_iu_xray()[:200]:
            w.writerow([r.text()])
    cfg = _mlm_recipe(data={"path": str(manifest), "text": "report", "batch_size": 8},
                      trainer={"max_steps": 6, "checkpoint_every_n_steps": 3}, text_mlm={"holdout_every": 0})
    full = run_pretrain(cfg, tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_pretrain(cfg, tmp_path / "part", callbacks=[KillAt(4)])
    resumed = run_pretrain(cfg, tmp_path / "part", resume=True)
    assert len(losses(resumed)) == 3  # the resumed part's log (the first part's is kept as metrics-part*.csv)
    a, b = load_file(str(full / "mlm" / "model.safetensors")), load_file(str(resumed / "mlm" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the run's model is its text tower; `medfm evaluate RUN` measures masked-token perplexity on given text
    import medfm
    from medfm.cli import main

    assert type(medfm.load(full)).__name__ == "TextEncoder"
    assert main(["evaluate", str(full), "--data", str(manifest), "--text", "report"]) == 0
    ppl = json.loads((full / "eval" / "metrics.json").read_text())
    assert 190 <= ppl["texts"] <= 200 and 1.0 < ppl["masked_perplexity"] < float("inf")  # empty rows skipped
    with pytest.raises(DataError, match="no column 'notes'"):
        run_pretrain(_mlm_recipe(data={"path": str(manifest), "text": "notes"}), tmp_path / "bad")
