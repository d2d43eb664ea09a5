"""Choosing what to label (``medfm select``) and curating a data set (``medfm curate``): every strategy's
contract, cold-start picks on known clusters, rounds, the embedding cache, planted duplicates and leaks on real
images, the cleaned copy, the balanced subset, the cheap cross-split check before training, and bad input."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from medfm.cli import main
from medfm.data import samples
from medfm.data.preflight import cross_split_copies
from medfm.select import NEEDS_MODEL, STRATEGIES, select
from medfm.select.curate import balanced_subset, outliers, run_curation
from medfm.select.embeddings import embed, load_embedder

from .select_helpers import planted_manifest


def _clusters(sizes=(200, 100, 50, 25, 10), dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 3
    x = np.concatenate([c + rng.normal(size=(n, dim)) * 0.3 for c, n in zip(centres, sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_returns_the_budget_new_items_and_the_same_for_a_seed(strategy):
    x, _ = _clusters()
    probs = np.random.default_rng(1).dirichlet(np.ones(3), size=len(x))
    labelled = [0, 5, 250, 380]
    picks = select(strategy, x, 12, labelled, seed=3, probs=probs)
    assert len(picks) == 12 and len(set(picks)) == 12 and not set(picks) & set(labelled)
    assert all(0 <= p < len(x) for p in picks)
    assert picks == select(strategy, x, 12, labelled, seed=3, probs=probs)


def test_typiclust_and_probcover_pick_one_per_cluster_where_random_does_not():
    x, cluster = _clusters()
    for strategy in ("typiclust", "probcover", "kmeans"):
        assert sorted(cluster[select(strategy, x, 5, seed=0, n_classes=5)]) == [0, 1, 2, 3, 4], strategy
    # random picks by the clusters' sizes: the small ones are missed (for this seed and most others)
    assert len(set(cluster[select("random", x, 5, seed=0)])) < 5
    # a second round covers what the first did not: clusters 0 and 1 are labelled, so the picks go elsewhere first
    labelled = [int(np.flatnonzero(cluster == 0)[0]), int(np.flatnonzero(cluster == 1)[0])]
    for strategy in ("typiclust", "probcover", "coreset"):
        assert set(cluster[select(strategy, x, 3, labelled, seed=0, n_classes=5)]) == {2, 3, 4}, strategy


def test_uncertainty_strategies_take_the_least_confident():
    x, _ = _clusters()
    probs = np.tile([0.98, 0.01, 0.01], (len(x), 1))
    probs[[7, 70, 300]] = [0.34, 0.33, 0.33]
    for strategy in ("entropy", "margin"):
        assert sorted(select(strategy, x, 3, probs=probs)) == [7, 70, 300]
    with pytest.raises(ValueError, match="needs a model's class probabilities"):
        select("badge", x, 3)


def test_bad_selection_input_is_one_clear_error():
    x, _ = _clusters((5, 5))
    with pytest.raises(ValueError, match="budget 11 is larger than the unlabelled pool \\(10"):
        select("typiclust", x, 11)
    with pytest.raises(ValueError, match="the pool is empty"):
        select("random", x, 1, labelled=range(10))
    with pytest.raises(ValueError, match="unknown strategy 'typical'; strategies: random"):
        select("typical", x, 1)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="not finite, e.g. position 3"):
        select("random", bad, 1)


def test_cli_select_rounds_reuse_the_cached_embeddings(tmp_path, slices, capsys):
    cache = tmp_path / "cache"
    common = ["--encoder", "vit_micro", "--size", "32", "--cache", str(cache)]
    assert main(["select", slices, "--budget", "4", "--strategy", "typiclust", "--out", str(tmp_path / "r1"), *common]) == 0
    with open(tmp_path / "r1" / "selected.csv") as f:
        first = list(csv.DictReader(f))
    assert len(first) == 4 and all(r["split"] == "train" and r["level"] for r in first)
    assert (tmp_path / "r1" / "selection.png").stat().st_size > 5000
    assert len(list(cache.iterdir())) == 1
    # round 2: the labelled items are never picked again; entropy needs the labels of round 1 (a probe)
    assert main(["select", slices, "--budget", "3", "--strategy", "entropy", "--labelled",
                 str(tmp_path / "r1" / "selected.csv"), "--label", "level", "--out", str(tmp_path / "r2"), *common]) == 0
    summary = json.loads((tmp_path / "r2" / "selection.json").read_text())
    assert summary["labelled"] == 4 and len(summary["positions"]) == 3
    assert not set(summary["positions"]) & {int(r["position"]) for r in first}
    assert len(list(cache.iterdir())) == 1  # the same encoder on the same data: read, not recomputed
    # a different encoder is a new cache entry
    assert main(["select", slices, "--budget", "2", "--out", str(tmp_path / "r3"), *common, "--seed", "1"]) == 0
    assert len(list(cache.iterdir())) == 2
    capsys.readouterr()
    # bad input: one line, exit 2
    for argv, message in [
        (["--budget", "500"], "budget 500 is larger than the unlabelled pool"),
        (["--budget", "2", "--preset", "ct_3d"], "reads 3D images"),
        (["--budget", "2", "--strategy", "badge"], "need labelled items of at least two classes"),
    ]:
        assert main(["select", slices, "--out", str(tmp_path / "bad"), *common, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def test_planted_duplicates_are_all_found_with_no_false_pair(tmp_path):
    manifest, expected = planted_manifest(tmp_path / "data")
    before = hashlib.sha1(manifest.read_bytes()).hexdigest()
    embedder = load_embedder("vit_micro", size=32)
    summary = run_curation(str(manifest), tmp_path / "out", embedder, label="label", patient="patient",
                           clean=True, balanced=6, cache=None, progress=False)
    with open(tmp_path / "out" / "findings.csv") as f:
        findings = list(csv.DictReader(f))
    rows = {n + 2: r for n, r in enumerate(csv.DictReader(open(manifest)))}
    pairs = {(rows[int(f["row_a"])]["image"], rows[int(f["row_b"])]["image"]) for f in findings
             if f["kind"] in ("duplicate", "leak")}
    assert pairs == expected  # every planted copy, nothing else
    leaks = [f for f in findings if f["kind"] == "leak"]
    assert {(f["split_a"], f["split_b"]) for f in leaks} == {("train", "val")}
    assert all(f["source_a"].endswith(f"line {f['row_a']}") and f["source_b"].endswith(f"line {f['row_b']}")
               for f in leaks)  # both rows named
    assert all(Path(f["file_a"]).name == rows[int(f["row_a"])]["image"] and Path(f["file_b"]).is_file()
               for f in leaks)  # and the image files a user acts on
    conflict = [f for f in findings if f["kind"] == "label_conflict"]
    assert [(rows[int(f["row_a"])]["image"], f["label_a"], f["label_b"]) for f in conflict] == [("img3.png", "b", "a")]
    patient = [f for f in findings if f["kind"] == "patient_leak"]
    assert len(patient) == 1 and patient[0]["detail"] == "patient p9"
    assert summary["duplicate"] == 3 and summary["leak"] == 2
    # the report shows the pairs' images; the cleaned copy drops the 5 copies; the input is unchanged
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("<img") >= 2 * 5 and "pHash" in html
    with open(tmp_path / "out" / "clean.csv") as f:
        kept = [r["image"] for r in csv.DictReader(f)]
    assert len(kept) == 10 and not any("copy" in k for k in kept)
    assert hashlib.sha1(manifest.read_bytes()).hexdigest() == before
    with open(tmp_path / "out" / "balanced.csv") as f:
        assert len(list(csv.DictReader(f))) == 6


def test_outliers_and_the_balanced_subset_on_constructed_embeddings():
    x, cluster = _clusters((300, 30, 30))
    far = np.vstack([x, x[:1] + 40.0])
    assert [i for i, _ in outliers(far)] == [len(x)]
    assert outliers(x) == []
    picked = balanced_subset(x, 30)
    assert len(picked) == 30 and len(set(picked)) == 30
    # spread over the clusters, not in proportion to their sizes (random: ~25 of 30 from the big one)
    assert np.bincount(cluster[picked]).min() >= 5


def test_curate_cli_on_an_npz_writes_a_clean_npz(tmp_path, capsys):
    rng = np.random.default_rng(0)
    from .select_helpers import distinct_slices

    images = np.stack(distinct_slices())[:, ::2, ::2]  # 10 real 32 px images
    train, val = images[:8], np.concatenate([images[8:], images[:1]])  # val holds a copy of train 0
    path = tmp_path / "set.npz"
    np.savez(path, train_images=train, train_labels=rng.integers(0, 2, (8, 1)), val_images=val,
             val_labels=rng.integers(0, 2, (3, 1)))
    assert cross_split_copies(path, ["train", "val"]) == ["val sample 2 = train sample 0"]
    # a fine-tuning run says so before it trains
    from medfm.finetune import load_task_recipe, run_finetune
    from medfm.run import find_recipe

    cfg = load_task_recipe(find_recipe("classify_2d", "tasks"), {"trainer": {"max_steps": 2}}, profile="tiny")
    with pytest.warns(UserWarning, match="the same image is stored in two splits .* val sample 2 = train sample 0"):
        run_finetune(cfg, tmp_path / "run", data_path=str(path))
    assert main(["curate", str(path), "--out", str(tmp_path / "out"), "--no-embeddings", "--clean"]) == 0
    assert "leaks 1" in capsys.readouterr().out
    clean = np.load(tmp_path / "out" / "clean.npz")
    assert clean["val_images"].shape[0] == 2 and clean["train_images"].shape[0] == 8
    assert main(["curate", str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "o2")]) == 2


def test_the_quickstart_slice_set_stores_no_image_twice(tmp_path):
    manifest = samples.mni152_slices(tmp_path, n=96, size=64)
    assert cross_split_copies(manifest, ["train", "val"]) == []


def test_embeddings_refuse_a_volume_for_a_2d_encoder(tmp_path, mni_t1):
    import csv as _csv

    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = _csv.writer(f)
        w.writerows([["image", "split"], [str(mni_t1), "train"]])
    with pytest.raises(ValueError, match="is 3D but vit_micro .* reads 2D images"):
        embed(load_embedder("vit_micro", size=32), tmp_path / "m.csv", "train", cache=None, progress=False)


def test_needs_model_strategies_are_declared():
    assert set(NEEDS_MODEL) <= set(STRATEGIES)
