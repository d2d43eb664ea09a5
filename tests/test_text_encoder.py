"""The packaged MiniLM text encoder: loads offline, matches sentence-transformers, embeds meaningfully."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfm.encoders import create_text_encoder, default_text_model_path


@pytest.fixture(scope="module")
def text_encoder():
    return create_text_encoder().eval()


def test_shapes_and_tokenizer(text_encoder):
    out = text_encoder(["No acute cardiopulmonary abnormality.", "Small left pleural effusion."])
    assert out["pooled"].shape == (2, 384) and text_encoder.embed_dim == 384
    assert out["tokens"].shape[:2] == out["attention_mask"].shape and out["tokens"].shape[-1] == 384
    ids = text_encoder.tokenize("cardiomegaly")["input_ids"]
    assert ids[0, 0].item() == text_encoder.tokenizer.cls_token_id


def test_matches_sentence_transformers(text_encoder):
    """Reference: sentence-transformers' own pipeline on the same packaged model (mean pooling)."""
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(default_text_model_path(), device="cpu")
    texts = ["Heart size is normal.", "There is a right lower lobe consolidation concerning for pneumonia."]
    with torch.no_grad():
        ours = F.normalize(text_encoder(texts)["pooled"], dim=-1)
    theirs = torch.as_tensor(ref.encode(texts, normalize_embeddings=True))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_pretrained_semantics(text_encoder):
    """A real pretrained model: paraphrases are closer than unrelated findings."""
    with torch.no_grad():
        e = F.normalize(text_encoder(["the heart is enlarged", "cardiomegaly, enlarged cardiac silhouette",
                                      "fracture of the distal radius"])["pooled"], dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1


def test_local_folder_and_cls_pooling(tmp_path, text_encoder):
    text_encoder.model.save_pretrained(tmp_path)
    text_encoder.tokenizer.save_pretrained(tmp_path)
    other = create_text_encoder(tmp_path, pooling="cls", max_length=16).eval()
    with torch.no_grad():
        a = other(input_ids=other.tokenize("a" + " b" * 40)["input_ids"])
    assert a["tokens"].shape[1] == 16 and a["pooled"].shape == (1, 384)
