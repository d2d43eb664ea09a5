"""Fine-tuning runs end to end on real data: every method's loss falls, outputs, resume, CLI, segmentation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.cli import main
from medfm.tuning import METHODS
from medfm.finetune.recipe import evaluate_run, load_run, load_task_recipe, open_split, run_finetune

from .conftest import KillAt, REPO
from .finetune_helpers import mni_hemispheres, mni_map_classes, mni_slices, tiny_task
from .pretrain_helpers import data_2d, losses

pytestmark = pytest.mark.slow  # fine-tuning runs of every method: `make test` runs it, `make test-fast` leaves it out


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    return data_2d(tmp_path_factory.mktemp("cls"))


@pytest.fixture(scope="module")
def hemispheres(tmp_path_factory):
    return mni_hemispheres(tmp_path_factory.mktemp("seg3d"))


def _label_section(data: str) -> dict:
    return {} if data.endswith(".npz") else {"classification": {"label": "label"}}


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_the_loss_on_a_small_real_set(method, cls_data, tmp_path):
    """32 examples per class (few-shot sampler), 40 steps: the last 5 losses average 10 % below the first
    (the head starts near zero, so the first loss is about the chance level, log 2)."""
    cfg = tiny_task("classify_2d", method=method, shots=32, **_label_section(cls_data),
                    trainer={"max_steps": 40}, optim={"lr": 1e-3 if method == "full" else 3e-3})
    run = run_finetune(cfg, tmp_path / method, data_path=cls_data)
    loss = losses(run)
    assert np.mean(loss[-5:]) < 0.9 * loss[0], loss
    m = json.loads((run / "metrics.json").read_text())
    assert m["method"] == method and m["steps"] == 40 and m["shots"] == 32
    assert 0 < m["trainable_params"] <= m["total_params"]
    assert 0.0 <= m["val"]["auroc"] <= 1.0 and m["val"]["n"] > 0 and "selected_thresholds" in m["val"]
    for f in ("model/config.json", "model/model.safetensors", "encoder/model.safetensors", "roc_val.png",
              "confusion_val.png"):
        assert (run / f).exists(), f
    assert (run / "adapter" / "adapter_model.safetensors").exists() == (method == "lora")


def test_a_run_reloads_and_evaluates_to_the_same_numbers(cls_data, tmp_path, capsys):
    data = cls_data
    args = ["finetune", "classify_2d", "--data", data, "--out", str(tmp_path / "r"), "--method", "vpt",
            "--shots", "8", "--max-steps", "5", "encoder.name=vit_micro", "encoder.img_size=32",
            "encoder.patch_size=4", "data.num_workers=0", "trainer.enable_progress_bar=false"]
    if not data.endswith(".npz"):
        args.append("classification.label=label")
    assert main(args) == 0
    assert "trainable" in capsys.readouterr().out
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["trainable_params"] == 10 * 48 + 48 * 2 + 2  # 10 prompts + the head
    assert main(["evaluate", "--run", str(tmp_path / "r"), "--split", "val"]) == 0
    again = json.loads((tmp_path / "r" / "eval_val" / "metrics.json").read_text())["val"]
    assert again["auroc"] == pytest.approx(m["val"]["auroc"], abs=1e-6)
    assert (tmp_path / "r" / "eval_val" / "roc_val.png").exists()
    model, cfg = load_run(tmp_path / "r")
    assert cfg["method"] == "vpt" and type(model.encoder).__name__ == "PromptedViT"
    # errors: clear messages, exit code 2
    assert main(["finetune", "classify_2d", "--data", data, "--out", str(tmp_path / "x"), "--method", "prefix"]) == 2
    assert "unknown method 'prefix'" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "nothing")]) == 2
    assert "not a finished fine-tuning run" in capsys.readouterr().err


def test_a_killed_run_resumes_to_the_same_weights(cls_data, tmp_path):
    cfg = tiny_task("classify_2d", method="lora", shots=16, **_label_section(cls_data),
                    trainer={"max_steps": 8, "checkpoint_every_n_steps": 4})
    whole = run_finetune(cfg, tmp_path / "whole", data_path=cls_data)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_finetune(cfg, tmp_path / "split", data_path=cls_data, callbacks=[KillAt(4)])
    with pytest.raises(FileExistsError):
        run_finetune(cfg, tmp_path / "split", data_path=cls_data)
    split = run_finetune(cfg, tmp_path / "split", data_path=cls_data, resume=True)
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 8
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_3d_segmentation_on_mni152_hemispheres(hemispheres, tmp_path):
    """Train on the left hemisphere's tissue labels, predict the whole right one (sliding window)."""
    cfg = tiny_task("segment_3d", method="full", trainer={"max_steps": 30}, optim={"lr": 3e-3})
    run = run_finetune(cfg, tmp_path / "seg", data_path=hemispheres)
    loss = losses(run)
    assert np.mean(loss[-5:]) < 0.9 * np.mean(loss[:5]), loss
    m = json.loads((run / "metrics.json").read_text())["val"]
    assert set(m["dice"]) == {"grey matter", "white matter"} and set(m["hd95"]) == set(m["dice"])
    assert m["dice"]["white matter"] > 0.3  # 30 steps already find the bright white matter
    pred = nib.load(run / "predictions_val" / "case0000.nii.gz")
    whole = open_split(cfg, "val", path=str(hemispheres))[0]["image"].shape[1:]
    assert pred.shape == whole and whole[1] > 32  # the whole right hemisphere at 4 mm, larger than the patch
    assert pred.affine[0, 3] == pytest.approx(2.0, abs=2.5)  # world position of the right half kept
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2}
    assert (run / "overlay_val.png").stat().st_size > 5000


def test_2d_segmentation_and_3d_classification_recipes_run(hemispheres, tmp_path):
    run = run_finetune(tiny_task("segment_2d", method="bitfit", trainer={"max_steps": 3}),
                       tmp_path / "seg2d", data_path=mni_slices(tmp_path))
    assert "mean_dice" in json.loads((run / "metrics.json").read_text())["val"]
    assert (run / "overlay_val.png").exists()
    cfg = tiny_task("classify_3d", method="ssf", classification={"label": "map"}, trainer={"max_steps": 3})
    run = run_finetune(cfg, tmp_path / "cls3d", data_path=mni_map_classes(tmp_path))
    m = json.loads((run / "metrics.json").read_text())["val"]
    assert m["n"] == 3 and set(m["auroc_per_class"]) == {"gm", "t1", "wm"}
    assert (run / "confusion_val.png").exists()


def test_every_recipe_in_tasks_loads():
    names = sorted(p.stem for p in (REPO / "tasks").glob("*.yaml"))
    assert {"classify_2d", "classify_3d", "segment_2d", "segment_3d"} <= set(names)
    for name in names:
        cfg = load_task_recipe(REPO / "tasks" / f"{name}.yaml")
        assert cfg["task"] in ("classification", "segmentation", "report_generation", "vqa", "mllm", "promptable",
                               "promptable_3d")
    with pytest.raises(KeyError, match="unknown recipe key 'lora.rank'"):
        load_task_recipe(REPO / "tasks" / "classify_2d.yaml", ["lora.rank=4"])


def test_lr_auto_is_the_tasks_lr_for_the_method_and_is_recorded_as_a_number():
    recipe = REPO / "tasks" / "classify_2d.yaml"
    # the head alone on cached features (a convex problem) takes a larger LR than an adapted encoder
    assert load_task_recipe(recipe, ["method=linear_probe"])["optim"]["lr"] == 1e-2
    assert load_task_recipe(recipe, ["method=lora"])["optim"]["lr"] == 1e-3
    assert load_task_recipe(recipe, ["method=linear_probe", "optim.lr=3e-3"])["optim"]["lr"] == 3e-3  # a number wins
    assert load_task_recipe(REPO / "tasks" / "segment_3d.yaml", ["method=linear_probe"])["optim"]["lr"] == 3e-4
    assert load_task_recipe(None, ["task=segmentation", "method=linear_probe"])["optim"]["lr"] == 1e-3
    with pytest.raises(ValueError, match="optim.lr must be a number or 'auto', got 'fast'"):
        load_task_recipe(recipe, ["optim.lr=fast"])


def test_evaluate_run_needs_a_finished_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing recipe.yaml"):
        evaluate_run(tmp_path)


def test_shots_and_selection_are_refused_by_every_task_but_classification():
    from medfm.finetune import TASKS

    for name in ("classify_2d", "segment_2d", "report_2d", "vqa_2d", "mllm_2d"):
        cfg = load_task_recipe(REPO / "tasks" / f"{name}.yaml")
        cfg["shots"] = 5
        plugin = TASKS.get_plugin(cfg["task"])
        if cfg["task"] == "classification":
            plugin.validate(cfg)
        else:
            with pytest.raises(ValueError, match="selection apply to classification"):
                plugin.validate(cfg)
