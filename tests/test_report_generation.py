"""Report generation: the MiniLM-initialised decoder, training on real captions, decoding, metrics, the labeler,
reload, the 3D check on engine volumes with known reports."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from transformers import AutoTokenizer

import medfm
from medfm.cli import main
from medfm.encoders import create_encoder, default_text_model_path
from medfm.evaluate.report_labeler import agreement, label_report, label_reports
from medfm.evaluate.report_metrics import caption_metrics, mention_scores, model_based_scores, tokenize_report
from medfm.finetune import load_task_recipe, run_finetune
from medfm.synthetic.reports import ATTRIBUTES, synthetic_report_set
from medfm.finetune.report_generation import ReportGenerator
from medfm.heads.text_writer import ReportVocab, build_decoder

from .conftest import REPO, shared_path
from .pretrain_helpers import losses

CAPTIONS = ["no acute cardiopulmonary abnormality.", "left pleural effusion.", "mild cardiomegaly without effusion.",
            "right upper lobe opacity, possibly pneumonia."]


def test_the_minilm_decoder_lists_exactly_its_new_weights():
    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    vocab = ReportVocab.build(tok, CAPTIONS, max_size=50)
    assert len(vocab) < 50 and {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id} <= set(vocab.ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder, new = build_decoder(None, num_layers=2, vocab=vocab)
    cross = [f"bert.encoder.layer.{i}.crossattention.{p}" for i in range(2) for p in (
        "self.query.weight", "self.query.bias", "self.key.weight", "self.key.bias", "self.value.weight",
        "self.value.bias", "output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias")]
    head = ["cls.predictions.bias", "cls.predictions.decoder.bias", "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.dense.bias", "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.LayerNorm.bias"]
    assert set(new) == set(cross + head) - {k for k in head if k not in decoder.state_dict()}
    assert any("start random" in str(w.message) and "crossattention" in str(w.message) for w in caught)
    # the copied rows: each compact token keeps MiniLM's embedding of its tokenizer id
    minilm = torch.nn.Embedding.from_pretrained(
        __import__("transformers").AutoModel.from_pretrained(default_text_model_path()).embeddings.word_embeddings.weight)
    torch.testing.assert_close(decoder.bert.embeddings.word_embeddings.weight, minilm.weight[torch.tensor(vocab.ids)])
    ids = tok(CAPTIONS, return_tensors="pt", padding=True)["input_ids"]
    assert torch.equal(vocab.to_full(vocab.to_compact(ids)), ids)  # every training token round-trips


def test_a_decoder_from_an_mlm_trained_bert_keeps_its_lm_head(tmp_path):
    """`medfm pretrain text_mlm` writes mlm/ (BERT + MLM head): only cross-attention is new then."""
    from transformers import AutoModelForMaskedLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlm = AutoModelForMaskedLM.from_pretrained(default_text_model_path())
    mlm.save_pretrained(tmp_path / "mlm")
    AutoTokenizer.from_pretrained(default_text_model_path()).save_pretrained(tmp_path / "mlm")
    tok = AutoTokenizer.from_pretrained(tmp_path / "mlm")
    vocab = ReportVocab.build(tok, CAPTIONS, max_size=50)
    decoder, new = build_decoder(str(tmp_path / "mlm"), num_layers=2, vocab=vocab, warn=False)
    assert new and all("crossattention" in k for k in new)
    torch.testing.assert_close(decoder.cls.predictions.transform.dense.weight, mlm.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(decoder.cls.predictions.bias, mlm.cls.predictions.bias[torch.tensor(vocab.ids)])


def _tiny_model(vocab_texts=CAPTIONS) -> ReportGenerator:
    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    decoder, _ = build_decoder(None, 1, ReportVocab.build(tok, vocab_texts, 200), warn=False)
    return ReportGenerator(create_encoder("vit_micro", img_size=32, patch_size=8), decoder, tok,
                           ReportVocab.build(tok, vocab_texts, 200), label_smoothing=0.1)


def test_any_causal_lm_folder_can_be_the_decoder_and_reloads(tmp_path, capsys):
    """A GPT-2-style decoder (here a tiny random one saved locally: no hub here) instead of MiniLM: it gets new
    cross-attention, trains and reloads from the model folder alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from medfm.heads.text_writer import decoder_config

    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
                    ).save_pretrained(tmp_path / "gpt")
    tok.save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="compact vocabulary needs a BERT-family decoder"):
        decoder_config(str(tmp_path / "gpt"), 2, 100)
    spec = {"task": "report_generation", "method": "full", "lora": {}, "vpt": {},
            "encoder": {"name": "vit_micro", "spatial_dims": 2, "in_chans": 1, "img_size": 32, "patch_size": 8},
            "head": {"text_model": str(tmp_path / "gpt"), "decoder_config": decoder_config(str(tmp_path / "gpt"), 2, None),
                     "vocab": None, "unk_id": None, "max_length": 16, "label_smoothing": 0.0, "generation": {}},
            "preprocess": {"preset": "radiograph_2d", "size": 32, "args": {}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a run states its decoder's new weights as one line, not a warning
        model = ReportGenerator.from_spec(spec)
    assert "crossattention" in capsys.readouterr().out
    x = torch.rand(2, 1, 32, 32)
    loss = model(x, CAPTIONS[:2])
    loss.backward()
    assert torch.isfinite(loss) and type(model.decoder).__name__ == "GPT2LMHeadModel"
    model.save_pretrained(tmp_path / "model")
    again = medfm.load(tmp_path / "model")
    assert again.generate(x, max_new_tokens=5) == model.generate(x, max_new_tokens=5)


def test_beam_search_returns_the_requested_beams_and_is_deterministic():
    torch.manual_seed(0)
    model = _tiny_model()
    x = torch.rand(2, 1, 32, 32)
    a = model.generate(x, num_beams=4, num_return_sequences=3, max_new_tokens=8)
    b = model.generate(x, num_beams=4, num_return_sequences=3, max_new_tokens=8)
    assert len(a) == 6 and a == b
    study = model.generate(torch.rand(2, 3, 1, 32, 32), image_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]), max_new_tokens=5)
    assert len(study) == 2  # several images per study


def test_captioning_metrics_match_pycocoevalcap_on_known_strings():
    refs = ["the heart is normal in size. the lungs are clear.", "there is a small left pleural effusion."]
    hyps = ["heart size is normal and the lungs are clear.", "small left effusion is present."]
    m = caption_metrics(refs, hyps, meteor=False)
    gts = {i: [tokenize_report(r)] for i, r in enumerate(refs)}
    res = {i: [tokenize_report(h)] for i, h in enumerate(hyps)}
    assert m["bleu_4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3])
    assert m["rouge_l"] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert m["cider"] == pytest.approx(Cider().compute_score(gts, res)[0])
    assert tokenize_report("The heart, lungs: CLEAR.") == "the heart lungs clear"
    same = caption_metrics(refs, refs, meteor=False)
    assert same["bleu_1"] == pytest.approx(1.0) and same["bleu_4"] == pytest.approx(1.0) and same["rouge_l"] == 1.0


def test_model_based_scorers_are_hooks_that_say_why_they_did_not_run(capsys):
    out = model_based_scores(["no effusion."], ["no effusion."])
    assert set(out) == {"chexbert", "radgraph"}
    for name, res in out.items():  # neither package (nor its weights) is installable offline here
        assert "version" in res or res["skipped"].startswith(f"{name} skipped:")
    assert "skipped" in capsys.readouterr().out or all("version" in r for r in out.values())


def test_the_labeler_handles_negation_and_uncertainty_and_agrees_with_iu_mesh(iu_reports):
    assert label_report("No pleural effusion.")["effusion"] == 0.0
    assert label_report("Possible effusion.")["effusion"] == -1.0
    assert label_report("Small left pleural effusion.")["effusion"] == 1.0
    assert label_report("Effusion has resolved. Heart size normal.")["effusion"] == 0.0
    assert np.isnan(label_report("Lungs are clear.")["effusion"]) and label_report("Lungs are clear.")["normal"] == 1.0
    lab = label_report("Cardiomegaly. No pneumothorax, but there is a right pleural effusion.")
    assert lab["cardiomegaly"] == 1 and lab["pneumothorax"] == 0 and lab["effusion"] == 1 and lab["normal"] == 0
    # validated against the MeSH major tags of the IU X-ray reports (benchmarks/report_labeler_iu.py: all 3,955)
    reports = iu_reports[:600]
    a = agreement(label_reports([r.text() for r in reports]), np.stack([r.labels for r in reports]))
    assert a["micro"]["f1"] > 0.75 and a["per_label"]["cardiomegaly"]["f1"] > 0.8, a["micro"]


def test_mention_scores():
    s = mention_scores(["a small bright structure on the left.", "nothing named", "right, then left"],
                       ["left", "right", "right"], ("left", "right"))
    assert s["accuracy"] == pytest.approx(2 / 3) and s["named"] == pytest.approx(2 / 3)


def _medpix_subset(tmp_path, n_train: int = 48, n_dev: int = 12):
    """A small manifest of real MedPix 2.0 images and captions (absolute paths)."""
    src = shared_path("medpix2", "manifest.csv")
    with open(src) as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"][:n_train]
    dev = [r for r in rows if r["split"] == "dev"][:n_dev]
    out = tmp_path / "medpix.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in train + dev:
            w.writerow({**r, "image": str(src.parent / r["image"])})
    return out


def _tiny_report_recipe(name="report_2d", **over):
    base = {"encoder": {"name": "vit_micro", "img_size": 32, "patch_size": 8},
            "report_generation": {"decoder_layers": 1, "vocab_size": 800, "max_length": 32, "eval_batch_size": 8,
                                  "examples": 4, "meteor": False,
                                  "generation": {"num_beams": 2, "max_new_tokens": 20, "no_repeat_ngram_size": 3}},
            "data": {"batch_size": 8, "num_workers": 0, "test_split": None},
            "optim": {"lr": 1e-3, "warmup_steps": 2},
            "trainer": {"max_steps": 30, "log_every_n_steps": 1, "enable_progress_bar": False,
                        "checkpoint_every_n_steps": 100}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_task_recipe(REPO / "tasks" / f"{name}.yaml", base)


@pytest.mark.slow
def test_teacher_forced_loss_falls_on_medpix_captions_and_the_run_reloads(tmp_path, capsys):
    manifest = _medpix_subset(tmp_path)
    cfg = _tiny_report_recipe(report_generation={"text": "caption"}, data={"val_split": "dev"})
    run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))
    curve = losses(run)
    assert len(curve) == 30 and np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5]), curve
    m = json.loads((run / "metrics.json").read_text())["dev"]
    assert m["n"] == 12 and {"model", "most common report", "random report", "nearest-neighbour report"} <= set(m)
    assert all(0.0 <= m[k]["bleu_4"] <= 1.0 and "rouge_l" in m[k] and "cider" in m[k] for k in m if k != "n")
    assert (run / "examples_dev.html").read_text().count("<tr>") == 5  # header + 4 examples
    # distinct reports and the model's image sensitivity (its reports with blank / shuffled images)
    assert m["most common report"]["distinct_reports"] == 1 and 1 <= m["model"]["distinct_reports"] <= 12
    assert set(m["model"]["image_sensitivity"]) == {"model, blank image", "model, shuffled images"}
    assert all(0.0 <= x <= 1.0 for x in m["model"]["image_sensitivity"].values())
    assert "model, shuffled images" in (run / "examples_dev.html").read_text()
    # the model folder alone rebuilds the model (fresh process, no recipe) and writes the same reports
    image = str(manifest.parent / "img.png")
    with open(manifest) as f:
        first = next(csv.DictReader(f))["image"]
    assert main(["generate-report", "--model", str(run), first, "--beams", "2"]) == 0
    here = capsys.readouterr().out.strip()
    code = (f"import medfm, sys; from medfm.cli import main; sys.exit(main(['generate-report', '--model', "
            f"{str(run / 'model')!r}, {first!r}, '--beams', '2']))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert there.stdout.strip().splitlines()[-1] == here.splitlines()[-1]
    assert type(medfm.load(run)).__name__ == "ReportGenerator" and image


def test_3d_reports_on_engine_volumes_with_known_attributes(tmp_path):
    manifest = synthetic_report_set(24, tmp_path / "synth", size=32, progress=False)
    cfg = _tiny_report_recipe("report_3d", encoder={"spatial_dims": 3}, data={
        "val_split": "dev", "preset": "mr_3d", "preset_args": {"spacing": 1.0}, "batch_size": 4},
        report_generation={"attributes": {k: list(v) for k, v in ATTRIBUTES.items()}},
        trainer={"max_steps": 10}, optim={"lr": 1e-3})
    cfg["method"] = "lora"  # the encoder adapts too (LoRA), at optim.lr x encoder_lr_scale
    run = run_finetune(cfg, tmp_path / "run3d", data_path=str(manifest))
    m = json.loads((run / "metrics.json").read_text())["dev"]
    assert m["n"] == 6 and set(m["model"]["attributes"]) == set(ATTRIBUTES)
    assert all(0.0 <= m[k]["attributes"]["side"]["accuracy"] <= 1.0 for k in m if k != "n")


def test_studies_of_several_images_train_cached_and_generate(tmp_path):
    """Rows sharing a study column form one sample (several images, one report); a frozen encoder's tokens
    are cached per study with the padding masked."""
    from PIL import Image

    from medfm.data import load, samples

    vol = load(samples.mni152("t1"))["image"][0].numpy()
    rows = []
    for k in range(12):
        plane, axis = (("sagittal", 0), ("axial", 2))[k % 2]
        for j in range(1 + k % 3):  # 1 to 3 images per study
            idx = int((0.35 + 0.1 * j) * vol.shape[axis])
            sl = np.take(vol, idx, axis=axis)
            name = f"s{k}_{j}.png"
            Image.fromarray((255 * sl / sl.max()).astype(np.uint8)).save(tmp_path / name)
            rows.append({"image": name, "study": f"s{k}", "report": f"{plane} slices of the brain.",
                         "split": "dev" if k >= 9 else "train"})
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = _tiny_report_recipe(report_generation={"text": "report", "study": "study", "max_images": 2},
                              data={"val_split": "dev"}, trainer={"max_steps": 6})
    run = run_finetune(cfg, tmp_path / "run", data_path=str(tmp_path / "m.csv"))  # linear_probe: cached tokens
    m = json.loads((run / "metrics.json").read_text())["dev"]
    assert m["n"] == 3 and len(losses(run)) == 6


@pytest.mark.slow  # a report run
def test_attribute_prompts_train_their_heads_prompt_the_decoder_and_reload(tmp_path):
    """report_generation.prompt_attributes: heads predicting MedPix's modality and body region from the image, whose
    predictions are memory tokens of the decoder; trained with the report (loss falls), scored, reloaded alone."""
    manifest = _medpix_subset(tmp_path)
    cols = ["type", "location_category"]
    cfg = _tiny_report_recipe(report_generation={"text": "caption", "prompt_attributes": cols}, data={"val_split": "dev"})
    run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        attr = [float(r["train/attributes"]) for r in csv.DictReader(f) if r.get("train/attributes")]
    assert len(attr) == 30 and np.mean(attr[-5:]) < np.mean(attr[:5]), attr
    m = json.loads((run / "metrics.json").read_text())["dev"]["model"]
    assert set(m["attribute_heads"]) == set(cols) and all(0 <= v["accuracy"] <= 1 for v in m["attribute_heads"].values())
    model = medfm.load(run)
    assert list(model.prompts) == cols and "CT" in model.prompts["type"]
    x = torch.rand(2, 1, 32, 32)
    memory, mask = model.encode(x)
    assert memory.shape[1] == mask.shape[1] == 16 + 1 + len(cols)  # 4x4 patches, class token, one prompt per attribute
    pred = model.predict_attributes(x)
    assert set(pred) == set(cols) and all(v in model.prompts["type"] for v in pred["type"])
    # the true value, where given, replaces the prediction (teacher forcing); the prompt token changes with it
    tokens, tmask = model.encode_tokens(x)
    assert len(model.prompts["location_category"]) > 1
    a = model.prompted_memory(tokens, tmask, torch.tensor([[-100, 0], [-100, 0]]))[0]
    b = model.prompted_memory(tokens, tmask, torch.tensor([[-100, 1], [-100, 1]]))[0]
    assert torch.allclose(a[:, -2], b[:, -2]) and not torch.allclose(a[:, -1], b[:, -1])
    # a frozen encoder's cached tokens carry the labels too
    cfg = _tiny_report_recipe(report_generation={"text": "caption", "prompt_attributes": cols}, data={"val_split": "dev"},
                              trainer={"max_steps": 4})
    cfg["method"] = "linear_probe"
    run_finetune(cfg, tmp_path / "probe", data_path=str(manifest))
