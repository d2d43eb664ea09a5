"""Visual question answering: answer normalisation and metrics on known strings, the blank / shuffled image
changes, and the task on real VQA-RAD questions at tiny scale (trains, answers, evaluates with every
baseline, reloads alone in a fresh process and answers the same, `medfm answer` errors)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

import medfm
from medfm.cli import main
from medfm.data.writers import write_manifest
from medfm.evaluate.vqa_metrics import (bleu_1, image_sensitivity, most_common_answers, normalize_answer, token_f1,
                                        vqa_metrics)
from medfm.finetune import load_task_recipe, run_finetune
from medfm.finetune.vqa import ChangedImages, QADataset, VQAModel, question_config
from medfm.heads.text_writer import writer_head

from .conftest import REPO
from .pretrain_helpers import losses


# ----------------------------------------------------------------- metrics on known strings
@pytest.mark.parametrize("raw, normal", [
    ("Yes", "yes"), ("Yes.", "yes"), ("  the LEFT lung ", "left lung"), ("Two", "2"), ("an MRI", "mri"),
    ("1.5 cm", "1.5 cm"), ("T2-weighted", "t2 weighted"), ("right, upper lobe", "right upper lobe"),
    ("twenty one", "20 1"), ("", ""),
])
def test_answer_normalisation(raw, normal):
    assert normalize_answer(raw) == normal


def test_token_f1_bleu_1_and_accuracy_on_known_answers():
    assert token_f1("the left lung", "left lung base") == pytest.approx(0.8)  # p 2/2, r 2/3
    assert token_f1("x-ray", "ct") == 0.0 and token_f1("", "") == 1.0
    assert bleu_1("left lung", "left lung") == pytest.approx(1.0)
    assert bleu_1("left lung", "left lung base") == pytest.approx(torch.exp(torch.tensor(1 - 3 / 2)).item(), abs=1e-5)
    m = vqa_metrics(["Yes", "no", "2", "kidney"], ["yes", "Yes", "two", "left kidney"],
                    ["CLOSED", "closed", "OPEN", "OPEN"], ["PRES", "PRES", "COUNT", "POS"], ["CHEST"] * 4)
    assert (m["closed_accuracy"], m["open_accuracy"], m["accuracy"]) == (0.5, 0.5, 0.5)
    assert m["open_token_f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["per_question_type"]["PRES"] == {"n": 2, "accuracy": 0.5} and m["per_organ"]["CHEST"]["n"] == 4
    with pytest.raises(ValueError, match="one each per question"):
        vqa_metrics(["yes"], ["yes", "no"], ["CLOSED"])


def test_most_common_answer_per_type_and_image_sensitivity():
    base = most_common_answers(["Yes", "yes", "no", "CT", "MR", "CT"], ["PRES"] * 3 + ["MODALITY"] * 3,
                               ["MODALITY", "PRES", "COUNT"])
    assert base == ["ct", "yes", "yes"]  # an unseen type gets the most common answer overall
    assert image_sensitivity(["yes", "no", "ct", "2"], ["Yes.", "yes", "ct", "two"]) == 0.25


# ----------------------------------------------------------------- changed images
class _Items(torch.utils.data.Dataset):
    def __init__(self, n=6):
        self.items = [{"image": torch.full((1, 4, 4), float(i // 2 + 1)), "question": f"q{i}", "answer": f"a{i}",
                       "answer_index": i} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def test_blank_and_shuffled_images_change_the_image_and_nothing_else():
    ds = _Items()
    keys = [f"img{i // 2}" for i in range(len(ds))]  # two questions per image
    for mode in ("blank", "shuffled"):
        changed = ChangedImages(ds, mode, keys, seed=3)
        for i in range(len(ds)):
            a, b = ds[i], changed[i]
            assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
            assert b["image"].shape == a["image"].shape and not torch.equal(a["image"], b["image"])
            if mode == "blank":
                assert not b["image"].any()
            else:  # another image of the set, and the same one for both questions on an image
                assert float(b["image"][0, 0, 0]) in {1.0, 2.0, 3.0}
                assert torch.equal(changed[i]["image"], changed[i ^ 1]["image"])
    with pytest.raises(ValueError, match="blank"):
        ChangedImages(ds, "noise")


def test_the_vqa_model_takes_volumes_through_the_same_encoder_interface():
    """3D: a volume encoder's tokens fuse with the question exactly as a 2D one's."""
    spec = {"task": "vqa", "method": "full", "encoder": {"name": "vit_micro", "spatial_dims": 3, "in_chans": 1,
                                                         "img_size": 32, "patch_size": 8},
            "head": {**writer_head(None, 1, None, 16, 0.0, {}), "decoder_config": None, "answers": ["left", "right"],
                     "question_config": question_config(None, 1), "fusion_layers": 1, "question_only": False},
            "preprocess": {"preset": "mr_3d", "size": 32, "args": {}}}
    model = VQAModel.from_spec(spec)
    x = torch.rand(2, 1, 32, 32, 32)
    loss, _ = model.vqa_loss(x, ["which side?", "which side is the lesion on?"], torch.tensor([0, 1]), ["left", "right"])
    loss.backward()
    assert torch.isfinite(loss) and model(x, ["which side?"] * 2).shape == (2, 2)


# ----------------------------------------------------------------- the task on real VQA-RAD questions
@pytest.fixture(scope="module")
def vqa_run(vqa_subset, tmp_path_factory):
    cfg = load_task_recipe(REPO / "tasks" / "vqa_2d.yaml", {
        "encoder": {"name": "vit_micro", "img_size": 32, "patch_size": 8},
        "vqa": {"question_layers": 1, "fusion_layers": 1, "examples": 4, "eval_batch_size": 16,
                "generation": {"num_beams": 1, "max_new_tokens": 6}},
        "data": {"path": str(vqa_subset), "batch_size": 16, "num_workers": 0, "test_split": None},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "trainer": {"max_steps": 40, "log_every_n_steps": 1, "enable_progress_bar": False}})
    return run_finetune(cfg, tmp_path_factory.mktemp("vqa_run") / "run")


def test_carving_validation_by_image_leaves_no_image_in_both_splits(vqa_subset):
    with open(vqa_subset) as f:
        rows = list(csv.DictReader(f))
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["image"], r["split"]) == r["split"]
    assert sorted(set(split_of.values())) == ["train", "val"] and list(split_of.values()).count("val") == 6


@pytest.mark.slow  # trains the shared VQA run
def test_vqa_trains_evaluates_with_every_baseline_and_writes_its_pages(vqa_run):
    loss = losses(vqa_run)
    assert len(loss) == 40 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5  # the loss falls
    val = json.loads((vqa_run / "metrics.json").read_text())["val"]
    for name in ("model", "model, generated answers", "model, blank images", "model, shuffled images",
                 "question-only model", "most common answer per question type"):
        assert {"closed_accuracy", "open_accuracy", "per_question_type", "per_organ"} <= set(val[name]), name
        assert 0 <= val[name]["closed_accuracy"] <= 1
    assert set(val["image_sensitivity"]) == {"model, blank images", "model, shuffled images",
                                             "question-only model, shuffled images"}
    assert val["image_sensitivity"]["question-only model, shuffled images"] == 0.0  # its image is a constant
    with open(vqa_run / "answers_val.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == val["n"]
    page = (vqa_run / "examples_val.html").read_text()
    assert page.count("<img") == 4 and "question-only model" in page
    assert (vqa_run / "accuracy_val.png").stat().st_size > 1000


@pytest.mark.slow
def test_vqa_reloads_alone_in_a_fresh_process_and_answers_the_same(vqa_run, vqa_subset):
    with open(vqa_subset) as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "val")
    main(["answer", "--model", str(vqa_run), row["image"], row["question"]])
    code = ("import sys; from medfm.cli import main; sys.exit(main(['answer', '--model', sys.argv[1], sys.argv[2], "
            "sys.argv[3]]))")
    fresh = subprocess.run([sys.executable, "-c", code, str(vqa_run), row["image"], row["question"]],
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    model = medfm.load(vqa_run)
    assert isinstance(model, VQAModel) and model.question_only is not None and model.question_only.blind
    assert fresh.stdout.splitlines()[0].startswith("answer: ")
    # the in-process run's own evaluation and a fresh evaluation of the reloaded run agree
    again = main(["evaluate", str(vqa_run), "--split", "val", "--out", str(vqa_run / "again")])
    assert again == 0
    first = json.loads((vqa_run / "metrics.json").read_text())["val"]["model"]
    second = json.loads((vqa_run / "again" / "metrics.json").read_text())["val"]["model"]
    assert first["accuracy"] == second["accuracy"]


@pytest.mark.slow  # trains the shared VQA run
def test_medfm_answer_bad_inputs_are_one_line_and_exit_2(vqa_run, vqa_subset, tmp_path, capsys):
    image = next(iter(csv.DictReader(open(vqa_subset))))["image"]
    assert main(["answer", "--model", str(vqa_run), str(tmp_path / "missing.png"), "Is there a mass?"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.png" in err
    assert main(["answer", "--model", str(vqa_run), image, "   "]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "question is empty" in err


def test_a_question_row_without_an_answer_is_an_error_naming_its_line(vqa_subset, tmp_path):
    from medfm.data import DataError, open_dataset

    with open(vqa_subset) as f:
        rows = list(csv.DictReader(f))
    rows[3]["answer"] = ""
    bad = write_manifest(tmp_path / "bad.csv", [{**r, "image": str((vqa_subset.parent / r["image"]).resolve())}
                                                for r in rows])
    with pytest.raises(DataError, match=r"bad.csv line 5: an empty answer"):
        QADataset(open_dataset(bad, images_repeat=True))
