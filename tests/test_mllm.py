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
