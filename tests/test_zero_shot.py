"""Zero-shot classification and image-text retrieval with a CLIP model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- zero-shot and retrieval
@pytest.fixture(scope="module")
def tiny_clip():
    from medfm.encoders import create_encoder
    from medfm.encoders.text import TextEncoder
    from medfm.encoders import CLIP

    torch.manual_seed(0)
    return CLIP(create_encoder("vit_micro", img_size=32, patch_size=8), TextEncoder(max_length=16), embed_dim=32).eval()


def test_zero_shot_is_exact_when_image_embeddings_equal_the_prompt_embeddings(tiny_clip):
    from medfm.evaluate.zeroshot import class_embeddings, finding_scores, zero_shot_scores

    names = ["pleural effusion", "cardiomegaly", "pneumothorax", "normal chest"]
    cls = class_embeddings(tiny_clip, names)
    target = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2])
    scores = zero_shot_scores(cls[target], cls)
    assert (scores.argmax(1) == target).all() and torch.allclose(scores.sum(1), torch.ones(9))
    # an image whose embedding is the positive prompt ensemble of a finding scores > 0.5 for it
    from medfm.evaluate.zeroshot import FINDING_PAIRS

    pos = class_embeddings(tiny_clip, names, [p for p, _ in FINDING_PAIRS])
    assert (finding_scores(tiny_clip, pos, names).diagonal() > 0.5).all()


def test_retrieval_recall_is_one_for_matching_pairs_and_near_chance_for_random_ones():
    from medfm.evaluate.zeroshot import retrieval_metrics

    emb = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    m = retrieval_metrics(emb, emb)
    assert m["image_to_text"] == m["text_to_image"] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    assert m["chance"] == {"R@1": 0.02, "R@5": 0.1, "R@10": 0.2}
    rand = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert retrieval_metrics(emb, rand)["image_to_text"]["R@10"] < 0.5
    # duplicate captions: any text with the pair's key is a hit
    keys = ["a", "a", "b", "b"]
    two = F.normalize(torch.tensor([[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]]), dim=-1)
    assert retrieval_metrics(two, two[[1, 0, 3, 2]], ks=(1,), keys=keys)["image_to_text"]["R@1"] == 1.0
    with pytest.raises(ValueError, match="paired"):
        retrieval_metrics(emb, emb[:10])
