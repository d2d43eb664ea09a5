"""``medfm suite`` (issue 40): frozen-feature scores of encoders on a suite file, the comparison, the embedding cache,
and the encoder medfm ships (``medfm:tiny-2d``). Data: real MNI152 slices (nilearn's file), 32 px."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from medfm.cli import main
from medfm.encoders.shipped import card, shipped
from medfm.suite import knn_scores, run_suite

from .conftest import REPO


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory, slices):
    """A two-task suite on the MNI152 slices: the ``level`` of a slice (4 classes) and its tissue map."""
    d = tmp_path_factory.mktemp("suite")
    (d / "suite.yaml").write_text(
        "name: mni\nshots: [1, all]\ntasks:\n"
        f"  - {{name: level, data: {slices}, label: level, val: val, min_train: 2}}\n"
        "  - {name: tissue, kind: segment, data: manifest.csv, val: val}\n")
    return d / "suite.yaml"


def test_suite_scores_two_encoders_and_compares_them(suite_file, mae_run, slices, tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    root = str(os.path.dirname(slices))  # the tissue task's relative path
    rows = run_suite([str(mae_run), "random:vit_micro"], out, str(suite_file), data_root=root, seeds=[0, 1],
                     size=32, cache=cache)
    got = {(r["encoder"], r["task"], r["method"], r["shots"], r["seed"]) for r in rows}
    for enc in (str(mae_run), "random:vit_micro"):
        for method in ("linear", "knn"):
            assert {(enc, "level", method, "1", 0), (enc, "level", method, "1", 1), (enc, "level", method, "all", 0)} <= got
        assert {(enc, "tissue", "linear", "all", 0), (enc, "tissue", "linear", "all", 1)} <= got
    level = [r for r in rows if r["task"] == "level"]
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["accuracy"] <= 1 for r in level)
    assert all(r["n_train"] == 4 for r in level if r["shots"] == "1")  # one per class, four classes
    tissue = [r for r in rows if r["task"] == "tissue"]
    assert all(0 < r["dice"] <= 1 for r in tissue), tissue  # the brain is found from frozen features
    with open(out / "suite.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = (out / "suite.md").read_text()
    assert "| random:vit_micro | level | knn | auroc |" in table and " ± " in table
    assert "| encoder | level | tissue | mean (classification) |" in table  # the headline: linear probe, 1 per class here
    compare = (out / "compare.md").read_text()
    assert "## random:vit_micro - " in compare and compare.count("| level |") == 4  # 2 methods x 2 shots
    assert "| tissue | linear | all | dice |" in compare
    assert (out / "suite.png").stat().st_size > 5000
    # the embedding cache: the second suite reads what the first wrote and scores the same
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 4  # 2 encoders x (train, val) of the classification task
    again = run_suite([str(mae_run), "random:vit_micro"], tmp_path / "again", str(suite_file), data_root=root,
                      seeds=[0, 1], size=32, cache=cache)
    assert sorted(cache.glob("*.safetensors")) == files
    assert [r.get("auroc") for r in again] == [r.get("auroc") for r in rows]


def test_knn_scores_are_dinos_weighted_vote():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 1])
    s = knn_scores(train, y, torch.tensor([[1.0, 0.05], [0.2, 1.0]]), num_classes=2, k=3, t=0.07)
    assert s.argmax(1).tolist() == [0, 1] and torch.allclose(s.sum(1), torch.ones(2))
    # by hand for the first query: its 3 nearest by cosine (centred on the training mean), each voting exp(cos / t)
    mean = train.mean(0)
    q = torch.nn.functional.normalize(torch.tensor([1.0, 0.05]) - mean, dim=0)
    cos = torch.nn.functional.normalize(train - mean, dim=1) @ q
    top = cos.topk(3).indices
    votes = np.zeros(2)
    for i in top.tolist():
        votes[y[i]] += float(torch.exp(cos[i] / 0.07))
    np.testing.assert_allclose(s[0].numpy(), votes / votes.sum(), rtol=1e-5)


def test_bad_suites_are_one_line(suite_file, tmp_path, capsys):
    assert main(["suite", "random:vit_micro", "--suite", str(suite_file), "--tasks", "nope", "--size", "32",
                 "--out", str(tmp_path / "o")]) == 2
    assert "no task ['nope']" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: a, data: x.npz, kind: detect}\n")
    assert main(["suite", "random", "--suite", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown kind 'detect'" in capsys.readouterr().err
    assert main(["suite", "random", "--suite", "nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "suite nosuch: no such file" in capsys.readouterr().err
    assert main(["suite", "random", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr()
    assert "no task's data found" in err.err and "skipping pneumonia" in err.out
    assert main(["suite", "medfm:nope", "--out", str(tmp_path / "o")]) == 2
    assert "medfm ships no encoder 'nope'" in capsys.readouterr().err


@pytest.mark.skipif("tiny-2d" not in shipped(), reason="medfm/weights/tiny-2d is written by benchmarks/ship_tiny_2d.py")
def test_the_shipped_encoder_loads_offline_and_embeds_as_stored(tmp_path, capsys):
    """In a fresh process without network: medfm:tiny-2d, its recorded preprocessing applied, embeds the fixed
    reference image as its card says (fp16 weights read into fp32); `medfm models` lists it."""
    script = (
        "import json, torch\n"
        "from medfm.encoders import create_model_and_transforms\n"
        "from medfm.encoders.shipped import card, reference_image\n"
        "model, transform = create_model_and_transforms('medfm:tiny-2d')\n"
        "x = transform({'image': reference_image()})['image'][None]\n"
        "with torch.no_grad():\n"
        "    e = model.eval()(torch.as_tensor(x)).flatten()\n"
        "print(json.dumps({'emb': e.tolist(), 'dtype': str(next(model.parameters()).dtype),"
        " 'size': list(x.shape), 'pre': model.preprocess}))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    c = card("tiny-2d")
    size = got["pre"]["size"]  # 64 for the encoder shipped
    assert got["dtype"] == "torch.float32" and got["size"] == [1, 1, size, size]
    assert got["pre"]["preset"] == "radiograph_2d"
    np.testing.assert_allclose(got["emb"], c["reference_embedding"], atol=1e-4)
    weights = REPO / "medfm" / "weights" / "tiny-2d" / "model.safetensors"
    assert weights.stat().st_size == c["file_bytes"] < 12_000_000  # fp16
    assert {s["name"] for s in c["mixture"]["sources"]} >= {"pediatric_cxr", "medpix", "lgg_flair"}
    assert all(s["licence"] and s["citation"] for s in c["mixture"]["sources"])
    assert main(["models"]) == 0
    assert "medfm:tiny-2d" in capsys.readouterr().out


@pytest.mark.slow  # a CLIP run
def test_zero_shot_rows_for_an_encoder_with_a_text_tower(tmp_path):
    from medfm.pretrain import run_pretrain

    from .test_clip import paired_manifest, tiny_clip_recipe

    manifest = paired_manifest(tmp_path)
    cfg = tiny_clip_recipe()
    cfg["trainer"]["max_steps"] = 4
    run = run_pretrain(cfg, tmp_path / "clip", data_path=str(manifest))
    prompts = {p: f"{p} T1 MRI slice of the brain" for p in ("axial", "coronal", "sagittal")}
    (tmp_path / "s.yaml").write_text("name: zs\nshots: [all]\ntasks:\n"
                                     f"  - {{name: plane, data: {manifest}, label: plane, val: train, min_train: 2, "
                                     f"zero_shot: {json.dumps(prompts)}}}\n")
    rows = run_suite([str(run), "random:vit_micro"], tmp_path / "out", str(tmp_path / "s.yaml"), size=32, cache=None)
    zs = [r for r in rows if r["method"] == "zero_shot"]
    assert [r["encoder"] for r in zs] == [str(run)]  # the random encoder has no text tower
    assert zs[0]["n_train"] == 0 and 0 <= zs[0]["auroc"] <= 1 and 0 <= zs[0]["accuracy"] <= 1
    assert "zero-shot" in (tmp_path / "out" / "suite.md").read_text()
