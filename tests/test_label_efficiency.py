"""The label-efficiency benchmark (``medfm benchmark``): few-shot draws, the harness end to end at a 3-step
budget, the MNI slab, and the readout every init is compared with."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medfm.benchmark import LabelEfficiency, tables
from medfm.data import samples
from medfm.tuning import few_shot_indices

from .conftest import SHARED, shared_path

pytestmark = pytest.mark.slow  # the benchmark end to end: `make test` runs it, `make test-fast` leaves it out


def test_few_shot_draw_is_stratified_and_seed_stable():
    npz = SHARED / "pneumoniamnist" / "pneumoniamnist_trainval.npz"
    if npz.exists():  # the real, imbalanced labels (388 normal / 3494 pneumonia)
        y = np.load(npz)["train_labels"].ravel()
    else:
        y = np.r_[np.zeros(388, int), np.ones(3494, int)]
    for k in (1, 5, 10, 25, 100):
        idx = few_shot_indices(y, k, seed=0)
        assert np.bincount(y[idx]).tolist() == [k, k]  # K of every class, whatever the imbalance
        assert idx == few_shot_indices(y, k, seed=0)  # the same draw for the same seed (every init sees it)
        assert idx != few_shot_indices(y, k, seed=1)
    assert set(few_shot_indices(y, 5, 0)) != set(few_shot_indices(y, 5, 2))


def test_mni_slab_is_a_few_labelled_slices_of_the_left_hemisphere(tmp_path):
    whole = samples.mni152_hemispheres(tmp_path / "all", csf=True)
    slab = samples.mni152_hemispheres(tmp_path / "slab", csf=True, slab_mm=12.0)
    left_all, left_slab = (nib.load(str(m.parent / "left_tissue.nii.gz")) for m in (whole, slab))
    assert left_slab.shape[:2] == left_all.shape[:2] and left_slab.shape[2] == 12  # 12 axial 1 mm slices
    z_mm = (left_slab.affine @ [0, 0, 6, 1])[2]
    assert abs(z_mm - 20.0) <= 1.0  # centred 20 mm above the AC-PC plane
    assert set(np.unique(np.asarray(left_slab.dataobj))) == {0, 1, 2, 3}  # every tissue is labelled in it
    right = [nib.load(str(m.parent / "right_t1.nii.gz")).shape for m in (whole, slab)]
    assert right[0] == right[1]  # validation is the whole right hemisphere either way


def _rows(out) -> list[dict]:
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def test_benchmark_end_to_end_one_seed_two_shots_three_step_budget(tmp_path):
    npz = shared_path("pneumoniamnist", "pneumoniamnist_trainval.npz")
    out = tmp_path / "le"
    bench = LabelEfficiency(out, {"pneumonia": str(npz)}, ["pneumonia"], ["random", "mae"], ["linear_probe", "lora"],
                            shots=["1", "5"], seeds=[0], pretrain_budget=3, profile="tiny", progress=False)
    rows = bench.run()
    assert len(rows) == 8 and len(_rows(out)) == 8
    for r in rows:
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["balanced_accuracy"] <= 1.0
        m = json.loads((tmp_path / r["run"] / "metrics.json").read_text())
        assert m["n_train"] == 2 * int(r["shots"]) and m["shots"] == int(r["shots"]) and m["steps"] == 4
        assert (m["pretrained"] is None) == (r["init"] == "random")
    # the MAE init is an ordinary run of encoders/mae_vit_2d.yaml at the budget, read out by mean pooling
    enc = json.loads((out / "pretrain" / "mae_pneumonia" / "encoder" / "config.json").read_text())
    assert enc["global_pool"] == "avg" and enc["fc_norm"] is False
    recipe = yaml.safe_load((out / "pretrain" / "mae_pneumonia" / "recipe.yaml").read_text())
    assert recipe["method"] == "mae" and recipe["trainer"]["max_steps"] == 3
    # every init saw the same few-shot draw for the seed
    draws = {(r["init"], r["method"], r["shots"]): json.loads((tmp_path / r["run"] / "metrics.json").read_text())["few_shot_rows"]
             for r in rows}
    assert draws[("random", "linear_probe", "5")] == draws[("mae", "lora", "5")] != draws[("mae", "lora", "1")]
    md = (out / "label_efficiency.md").read_text()
    assert "### pneumonia: auroc" in md and "| linear_probe | mae |" in md and "K=5" in md
    assert (out / "pneumonia.png").stat().st_size > 5000
    # finished runs are kept: a second benchmark over the same folder trains nothing and reads the same rows
    again = LabelEfficiency(out, {"pneumonia": str(npz)}, ["pneumonia"], ["random", "mae"], ["linear_probe", "lora"],
                            shots=["1", "5"], seeds=[0], pretrain_budget=3, profile="tiny", progress=False).run()
    assert [(r["run"], r["auroc"]) for r in again] == [(r["run"], r["auroc"]) for r in rows]


def test_benchmark_strategy_axis_probe_and_selection_runs(tmp_path):
    """Selection strategies pick K x classes items from the init's embeddings of the pool (no labels read);
    the probe method scores them in seconds; a fine-tuning run trains on exactly the picked rows."""
    npz = shared_path("medmnist", "breastmnist_trainval.npz")
    out = tmp_path / "le"
    rows = LabelEfficiency(out, {"breastmnist": str(npz)}, ["breastmnist"], ["random"], ["probe", "linear_probe"],
                           shots=["1", "5"], seeds=[0], profile="tiny", progress=False,
                           strategies=["balanced", "typiclust"]).run()
    assert sorted((r["method"], r["strategy"], r["shots"]) for r in rows) == sorted(
        (m, s, k) for m in ("probe", "linear_probe") for s in ("balanced", "typiclust") for k in ("1", "5"))
    assert all(0.0 <= r["auroc"] <= 1.0 and r["n_train"] == 2 * int(r["shots"]) for r in rows)
    picked = [r for r in rows if r["method"] == "linear_probe" and r["strategy"] == "typiclust"]
    for r in picked:
        m = json.loads((tmp_path / r["run"] / "metrics.json").read_text())
        chosen = out / "selections" / "breastmnist" / "random" / f"typiclust_k{r['shots']}_s0.csv"
        positions = [int(line) for line in chosen.read_text().split()[1:]]
        assert m["n_train"] == len(positions) == 2 * int(r["shots"])
    md = (out / "label_efficiency.md").read_text()
    assert "| probe | random | typiclust |" in md and "| strategy |" in md
    with pytest.raises(ValueError, match="unknown strategy entropy"):
        LabelEfficiency(out, {"breastmnist": str(npz)}, ["breastmnist"], ["random"], strategies=["entropy"])


def test_benchmark_mni_slab_against_whole_hemisphere(tmp_path):
    out = tmp_path / "le"
    rows = LabelEfficiency(out, {}, ["mni_tissue"], ["random", "synth"], ["linear_probe"], seeds=[0],
                           pretrain_budget=3, profile="tiny", progress=False).run()
    assert sorted((r["init"], r["shots"]) for r in rows) == [("random", "all"), ("random", "slab"), ("synth", "all"),
                                                              ("synth", "slab")]
    assert all(0.0 <= r["mean_dice"] <= 1.0 for r in rows)
    for r in rows:
        m = json.loads((tmp_path / r["run"] / "metrics.json").read_text())
        assert (m["pretrained"] is None) == (r["init"] == "random") and "synth_3d" in (m["pretrained"] or "synth_3d")
    assert (out / "pretrain" / "synth_3d" / "encoder" / "config.json").exists()
    assert any("mni_tissue: mean_dice" in line for line in tables(rows)) and (out / "mni_tissue.png").exists()


def test_benchmark_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(ValueError, match="unknown task.*pneumonia, medpix_region"):
        LabelEfficiency(tmp_path, {}, ["pneumo"], ["random"])
    with pytest.raises(ValueError, match="task medpix_region needs --data medpix=PATH"):
        LabelEfficiency(tmp_path, {}, ["medpix_region"], ["random"])
    bench = LabelEfficiency(tmp_path, {}, ["mni_tissue"], ["random", "dino"])
    assert {job[1] for job in bench.plan()} == {"random"}  # DINO has no 3D MNI pretraining here: not planned
    # a checkpoint made elsewhere (a timm weight file, a GPU run) is one more init, used as given
    given = LabelEfficiency(tmp_path, {"pneumonia": "x.npz"}, ["pneumonia"], ["random", "timm"],
                            encoders={"timm": str(tmp_path / "vit.safetensors")})
    assert {job[1] for job in given.plan()} == {"random", "timm"}
    assert given.encoder_for("timm", "pneumonia") == str(tmp_path / "vit.safetensors")
    with pytest.raises(ValueError, match="clip init pretrains on MedPix captions"):
        LabelEfficiency(tmp_path, {"pneumonia": "x.npz"}, ["pneumonia"], ["clip"]).encoder_for("clip", "pneumonia")


def test_results_of_earlier_benchmarks_in_the_folder_are_kept(tmp_path):
    from medfm.benchmark import read_results

    row = {"task": "pneumonia", "init": "random", "method": "linear_probe", "shots": "5", "seed": 0, "auroc": 0.7,
           "balanced_accuracy": 0.6, "n_train": 10, "wall_s": 1.0}
    first = LabelEfficiency(tmp_path, {}, ["mni_tissue"], ["random"])
    first.rows = [{**row, "run": "a"}]
    first.write_rows()
    second = LabelEfficiency(tmp_path, {}, ["mni_tissue"], ["random"])
    second.rows = [{**row, "task": "mni_tissue", "auroc": None, "mean_dice": 0.5, "run": "b"}, {**row, "auroc": 0.8, "run": "a"}]
    second.write_rows()
    rows = {r["run"]: r for r in read_results(tmp_path / "results.csv")}
    assert set(rows) == {"a", "b"} and rows["a"]["auroc"] == 0.8 and rows["b"]["mean_dice"] == 0.5  # a run's row replaced


def test_mean_pooled_readout_reads_the_same_weights_as_the_class_token():
    from medfm.encoders import create_encoder

    torch.manual_seed(0)
    token = create_encoder("vit_micro", img_size=32, patch_size=8)
    avg = create_encoder("vit_micro", img_size=32, patch_size=8, global_pool="avg", fc_norm=False)
    assert token.state_dict().keys() == avg.state_dict().keys()
    avg.load_state_dict(token.state_dict())  # strict: a class-token encoder read out by mean pooling
    x = torch.rand(2, 1, 32, 32)
    tokens = token.forward_features(x)
    assert torch.allclose(avg(x), tokens[:, 1:].mean(1), atol=1e-6) and torch.allclose(token(x), tokens[:, 0])


def test_a_saved_readout_is_adopted_unless_the_recipe_sets_one(tmp_path, capsys):
    from medfm.encoders import create_encoder
    from medfm.finetune import load_task_recipe

    from .conftest import REPO

    create_encoder("vit_micro", img_size=32, patch_size=8, global_pool="avg", fc_norm=False).save_pretrained(tmp_path / "enc")
    cfg = load_task_recipe(REPO / "tasks" / "classify_2d.yaml", {"encoder": {"pretrained": str(tmp_path / "enc")}})
    assert cfg["encoder"]["global_pool"] == "avg" and cfg["encoder"]["fc_norm"] is False
    assert "global_pool None -> avg" in capsys.readouterr().out
    cfg = load_task_recipe(REPO / "tasks" / "classify_2d.yaml", {"encoder": {"pretrained": str(tmp_path / "enc"),
                                                                             "global_pool": "token"}})
    assert cfg["encoder"]["global_pool"] == "token"


def test_benchmark_overrides_reach_every_run_and_a_kept_run_trained_otherwise_is_refused(tmp_path, capsys):
    from medfm.cli import main

    npz = shared_path("pneumoniamnist", "pneumoniamnist_trainval.npz")
    out = tmp_path / "le"
    args = ["benchmark", "--data", f"pneumonia={npz}", "--tasks", "pneumonia", "--inits", "random", "--methods",
            "linear_probe", "--shots", "1", "--seeds", "0", "--profile", "tiny", "--out", str(out)]
    assert main(args + ["--set", "finetune.optim.lr=2e-2", "--set", "finetune.trainer.max_steps=2"]) == 0
    run = out / "finetune" / "pneumonia" / "random" / "linear_probe" / "k1_s0"
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["optim"]["lr"] == 0.02 and json.loads((run / "metrics.json").read_text())["steps"] == 2
    assert main(args + ["--set", "finetune.optim.lr=2e-2", "--set", "finetune.trainer.max_steps=2"]) == 0  # same: kept
    capsys.readouterr()
    assert main(args + ["--set", "finetune.optim.lr=5e-2"]) == 2  # the kept run was trained at 2e-2: not mixed in
    err = capsys.readouterr().err
    assert "k1_s0 is a finished run trained with optim.lr=0.02 (asked 0.05)" in err and "another --out" in err
    assert main(args + ["--set", "optim.lr=5e-2"]) == 2
    assert "'pretrain.' or 'finetune.'" in capsys.readouterr().err
