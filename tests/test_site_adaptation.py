"""`medfm adapt`: adaptation to a new site from unlabelled images (batch-norm statistics, TENT, entropy on LoRA,
SHOT), the collapse guard, and the appearance augmentation of fine-tuning recipes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medfm
from medfm.cli import main
from medfm.finetune import open_split, run_recipe
from medfm.finetune.site_adaptation import (centroid_pseudo_labels, collapse_reason, entropy, information_maximisation,
                                            predict)
from medfm.synthetic import RandAppearanced


def test_collapse_guard_and_the_losses_on_constructed_cases():
    # one class takes (almost) everything after, and did not before: a collapse; an already dominant class is not
    assert "collapsed onto one class" in collapse_reason([0.5, 0.5], [0.97, 0.03])
    assert collapse_reason([0.94, 0.06], [0.96, 0.04]) is None and collapse_reason([0.5, 0.5], [0.6, 0.4]) is None
    # information maximisation prefers confident *and* diverse predictions over confident and collapsed ones
    diverse = torch.tensor([[9.0, 0.0], [0.0, 9.0]] * 8)
    collapsed = torch.tensor([[9.0, 0.0]] * 16)
    assert information_maximisation(diverse) < information_maximisation(collapsed) - 0.6
    assert float(entropy(torch.full((1, 4), 0.25))) == pytest.approx(np.log(4))
    # centroid pseudo-labels follow the feature clusters even where half the predictions of a cluster are wrong
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 8, generator=g) * 0.1 + 3, torch.randn(20, 8, generator=g) * 0.1 - 3
    b[:, 0] = 3  # the clusters differ in the other dimensions
    probs = torch.tensor([[0.9, 0.1]] * 20 + [[0.6, 0.4]] * 10 + [[0.2, 0.8]] * 10)
    labels = centroid_pseudo_labels(torch.cat([a, b]), probs)
    assert labels[:20].unique().numel() == 1 and labels[20:].unique().numel() == 1 and labels[0] != labels[-1]


def test_appearance_augmentation_changes_intensities_reproducibly():
    x = torch.linspace(0, 1, 32 * 32).view(1, 32, 32)
    t = RandAppearanced("image", prob=1.0)
    t.set_random_state(seed=3)
    y1 = t({"image": x.clone(), "label": 1})
    t.set_random_state(seed=3)
    y2 = t({"image": x.clone(), "label": 1})
    assert torch.equal(y1["image"], y2["image"]) and y1["label"] == 1 and y1["image"].shape == x.shape
    assert 0.0 <= float(y1["image"].min()) and float(y1["image"].max()) <= 1.0 + 1e-6
    assert float((y1["image"] - x).abs().mean()) > 0.01
    off = RandAppearanced("image", prob=0.0)
    assert torch.equal(off({"image": x})["image"], x)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, slices):
    """A tiny LoRA classifier on the real MNI152 slices (4 levels), the 'source site'."""
    run = tmp_path_factory.mktemp("adapt") / "source"
    assert main(["finetune", "classify_2d", "--data", slices, "--out", str(run), "--profile", "tiny", "--method", "lora",
                 "classification.label=level", "trainer.max_steps=6", "data.appearance=0.5"]) == 0
    return run


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["norm", "tent", "lora_entropy", "shot"])
def test_each_method_adapts_reloads_alone_and_evaluates(method, source_run, slices, tmp_path, capsys):
    out = tmp_path / method
    assert main(["adapt", str(source_run), "--data", slices, "--split", "val", "--method", method, "--out", str(out),
                 "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"adapt / {method}: 4 steps" in printed and "predicted class shares" in printed
    m = json.loads((out / "metrics.json").read_text())
    a = m["adaptation"]
    assert a["steps"] == 4 and a["collapsed"] is False and sum(a["class_prior_after"]) == pytest.approx(1.0)
    assert "val" in m and "auroc" in m["val"]  # the adapted model scored in-domain
    before, after = _params(medfm.load(source_run / "model")), _params(medfm.load(out / "model"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    if method == "norm":  # only the statistics: the head's feature standardisation, recomputed on the target
        assert changed and all("running" in k or "num_batches" in k for k in changed)
        model = medfm.load(out / "model")
        features, _ = predict(model, open_split(run_recipe(out), "val"))  # the target as the task opens it
        assert torch.allclose(model.head[0].running_mean, features.mean(0), atol=0.3 * float(features.std()))
    elif method == "tent":
        assert any("norm" in k and k.endswith(("weight", "bias")) for k in changed)
        assert not any("lora_" in k or "qkv.base_layer" in k for k in changed)
    else:
        assert any("lora_" in k for k in changed)
        assert not any(k.startswith("head.2") for k in changed)  # the classifier (hypothesis) stays as it was
    # the adapted run is a run of its task: `medfm evaluate` scores it on the target with a shift report
    assert main(["evaluate", str(out), "--data", slices, "--split", "train"]) == 0
    assert "shift    auroc" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["tent", "shot"])
def test_a_killed_adaptation_resumes_to_the_same_weights(method, source_run, slices, tmp_path):
    from safetensors.torch import load_file

    from medfm.finetune.site_adaptation import adapt_run

    from .conftest import KillAt

    kw = dict(method=method, data=slices, split="val", steps=6, overrides={"trainer": {"checkpoint_every_n_steps": 2}})
    whole = adapt_run(source_run, tmp_path / "whole", **kw)
    with pytest.raises(RuntimeError, match="simulated kill"):
        adapt_run(source_run, tmp_path / "split", callbacks=[KillAt(4)], **kw)
    split = adapt_run(source_run, tmp_path / "split", resume=True, **kw)
    a, b = (load_file(str(r / "model" / "model.safetensors")) for r in (whole, split))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, slices):
    """A tiny linear probe without feature standardisation or temperature: no LoRA, no batch norm."""
    run = tmp_path_factory.mktemp("adapt_plain") / "probe"
    assert main(["finetune", "classify_2d", "--data", slices, "--out", str(run), "--profile", "tiny",
                 "classification.label=level", "trainer.max_steps=2", "classification.head_norm=false",
                 "classification.temperature_scaling=false"]) == 0
    return run


def test_the_collapse_guard_keeps_collapsed_weights_out(plain_run, slices, tmp_path, capsys):
    out = tmp_path / "collapsed"
    # entropy minimisation on the whole encoder at a huge LR with no diversity term (and no batch norm to
    # re-standardise the features): one class for everything
    code = main(["adapt", str(plain_run), "--data", slices, "--split", "train", "--method", "tent", "--params",
                 "encoder", "--lr", "0.5", "--steps", "12", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medfm")]  # past the progress bar
    assert code == 2 and len(err) == 1 and "collapsed onto one class" in err[0]
    m = json.loads((out / "metrics.json").read_text())["adaptation"]
    assert m["collapsed"] is True and max(m["class_prior_after"]) >= 0.9
    assert not (out / "model").exists() and not (out / "encoder").exists()


def test_bad_adaptation_requests_are_one_line(plain_run, slices, tmp_path, capsys):
    for args, words in ((["--method", "lora_entropy"], "no LoRA parameters"),
                        (["--method", "norm"], "no batch norm"),
                        (["--method", "tent", "--split", "nosuch"], "nosuch")):
        assert main(["adapt", str(plain_run), "--data", slices, "--out", str(tmp_path / "x"), "--split", "val", *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medfm")]
        assert len(err) == 1 and words in err[0], err
