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
