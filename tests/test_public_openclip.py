"""BiomedCLIP-layout open_clip models: a hub folder (timm ViT trunk + Hugging Face BERT with an MLP projection and
class-token pooling; random weights, tiny text tower) read by open_clip itself and by medfm agree on image, text
and logit outputs; the converted folder zero-shots through `medfm evaluate` and its image tower fine-tunes."""

from __future__ import annotations

import json

import pytest
import torch

import open_clip
from medfm.cli import main
from medfm.encoders import create_encoder, default_text_model_path
from medfm.encoders.formats import identify, open_checkpoint
from medfm.encoders.openclip import clip_from_open_clip

from .public_helpers import QUIET

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def biomedclip_folder(tmp_path_factory):
    """An open_clip hub folder in BiomedCLIP's layout with a tiny BERT (MiniLM's tokenizer) and ViT-Ti/16."""
    from transformers import AutoTokenizer, BertConfig

    root = tmp_path_factory.mktemp("biomedclip")
    bert = root / "tiny-pubmedbert"
    tok = AutoTokenizer.from_pretrained(default_text_model_path())
    tok.save_pretrained(bert)
    BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64).save_pretrained(bert)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32,
                     "hf_model_pretrained": False},
    }
    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=model_cfg["vision_cfg"], text_cfg=model_cfg["text_cfg"])
    folder = root / "BiomedCLIP-tiny"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                              "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def test_biomedclip_layout_parity(biomedclip_folder):
    ref = open_clip.create_model(f"local-dir:{biomedclip_folder}").eval()  # open_clip's own hub-folder reader
    tokenizer = open_clip.tokenizer.HFTokenizer(str(biomedclip_folder.parent / "tiny-pubmedbert"), context_length=32)
    assert identify(open_checkpoint(biomedclip_folder)).name == "open-clip-timm"
    ours = clip_from_open_clip(biomedclip_folder)
    x = torch.rand(2, 1, 224, 224)
    texts = ["chest x-ray with pneumonia", "normal chest radiograph of a child"]
    with torch.no_grad():
        rgb = (x.expand(-1, 3, -1, -1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        ref_img, ref_txt = ref.encode_image(rgb, normalize=True), ref.encode_text(tokenizer(texts), normalize=True)
        img, txt = ours.encode_image(x), ours.encode_text(texts)
        torch.testing.assert_close(img, ref_img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.logit_scale.exp() * img @ txt.T, ref.logit_scale.exp() * ref_img @ ref_txt.T,
                                   rtol=1e-5, atol=1e-4)
    # the image tower alone, as an encoder: the trunk's class token after its norm
    enc = create_encoder("clip_vit", img_size=224, pretrained=biomedclip_folder).eval()
    with torch.no_grad():
        trunk = ref.visual.trunk
        torch.testing.assert_close(enc(x), trunk.forward_head(trunk.forward_features(rgb), pre_logits=True), rtol=1e-5, atol=1e-5)


def test_converted_biomedclip_zero_shots_and_fine_tunes(biomedclip_folder, slices, tmp_path, capsys):
    out = tmp_path / "biomedclip"
    assert main(["models", "convert", str(biomedclip_folder), "--out", str(out)]) == 0
    assert (out / "model" / "config.json").exists() and (out / "encoder" / "config.json").exists()
    assert main(["evaluate", str(out), "--data", slices, "--classes", "level", "--split", "val"]) == 0
    assert "zero-shot accuracy" in capsys.readouterr().out
    run = tmp_path / "lora"
    assert main(["finetune", "classify_2d", "--profile", "tiny", "--encoder", str(out), "--method", "lora",
                 "--data", slices, "--out", str(run), "classification.label=level", *QUIET]) == 0
    assert json.loads((run / "metrics.json").read_text())["encoder"] == "clip_vit"


def test_lit_continues_from_a_converted_biomedclip(biomedclip_folder, tmp_path):
    """`clip.init` + `encoder.pretrained` the converted folder: the image tower locked (LiT), the text tower and the
    projections start from BiomedCLIP's and train on real image-caption pairs."""
    from safetensors.torch import load_file

    from .pretrain_helpers import losses
    from .test_clip import paired_manifest

    out = tmp_path / "biomedclip"
    assert main(["models", "convert", str(biomedclip_folder), "--out", str(out)]) == 0
    run = tmp_path / "lit"
    assert main(["pretrain", "clip_vit_2d", "--profile", "tiny", f"encoder.pretrained={out / 'encoder'}",
                 f"clip.init={out}", "--data", str(paired_manifest(tmp_path)), "--out", str(run), "trainer.max_steps=6", "data.batch_size=9",
                 "trainer.enable_progress_bar=false"]) == 0
    assert len(losses(run)) == 6
    before, after = (load_file(str(p / "encoder" / "model.safetensors")) for p in (out, run))
    # LiT: the image tower stayed frozen (its position grid resampled to the profile's 32 px)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "pos_embed")
    text_before, text_after = (load_file(str(p / "model" / "model.safetensors")) for p in (out, run))
    assert not torch.equal(text_before["text_proj.0.weight"], text_after["text_proj.0.weight"])
