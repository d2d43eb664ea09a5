"""Task heads: classification metrics and thresholds, the segmentation decoder, sliding window, Dice/HD95."""

from __future__ import annotations

import pytest
import torch

from medfm.data import DataError
from medfm.encoders import create_encoder
from medfm.tuning import adapt_encoder
from medfm.finetune.classification import class_weights, classification_metrics, select_thresholds
from medfm.finetune.segmentation import check_mask, predict, segmentation_metrics
from medfm.heads import SegmentationModel


def test_metrics_on_constructed_cases():
    target = torch.tensor([0, 0, 1, 1, 1, 1])
    scores = torch.tensor([0.1, 0.55, 0.6, 0.8, 0.9, 0.65])  # P(class 1): separable at 0.6, not at 0.5
    two = torch.stack([1 - scores, scores], 1)
    m = classification_metrics(two, target)
    assert m["auroc"] == 1.0 and m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    thr = select_thresholds(two, target, multi_label=False)
    tuned = classification_metrics(two, target, thresholds=thr)
    assert 0.55 < thr[0] <= 0.6 + 1e-6 and tuned["accuracy"] == 1.0 and tuned["f1"] == 1.0
    # multi-class: perfect one-hot scores
    y = torch.tensor([0, 1, 2, 2, 1])
    m = classification_metrics(torch.nn.functional.one_hot(y, 3).float(), y, class_names=["a", "b", "c"])
    assert m["auroc"] == m["accuracy"] == m["balanced_accuracy"] == m["f1"] == 1.0
    assert set(m["auroc_per_class"]) == {"a", "b", "c"}
    # multi-label: AUROC per class, one class inverted
    t = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]).float()
    s = torch.stack([t[:, 0], 1 - t[:, 1]], 1)
    m = classification_metrics(s, t, multi_label=True)
    assert m["auroc_per_class"] == {"0": 1.0, "1": 0.0} and m["auroc"] == 0.5


def test_class_weights_are_inverse_frequency():
    w = class_weights(torch.tensor([0] * 90 + [1] * 10), 2, multi_label=False)
    assert w[1] / w[0] == pytest.approx(9.0) and w.mean() == pytest.approx(1.0)
    pos = class_weights(torch.tensor([[1, 0]] * 3 + [[0, 1]]).float(), 2, multi_label=True)
    assert pos.tolist() == pytest.approx([1 / 3, 3.0])


@pytest.mark.parametrize("name,dims,kw", [("vit_micro", 2, {"patch_size": 4}), ("vit_micro", 3, {"patch_size": 4}),
                                          ("vit_micro", 2, {"patch_size": 16}), ("resnet18", 2, {}),
                                          ("resnet18", 3, {})])
def test_segmentation_model_gives_full_resolution_logits(name, dims, kw):
    enc = create_encoder(name, spatial_dims=dims, img_size=32, **kw)
    model = SegmentationModel(enc, num_classes=4, feature_size=8)
    x = torch.rand(2, 1, *([32] * dims))
    assert model(x).shape == (2, 4, *([32] * dims))
    assert model.stride == (kw.get("patch_size") or 32)


def test_unetr_takes_evenly_spaced_blocks_like_unetr():
    enc = create_encoder("vit_tiny", spatial_dims=3, img_size=32, patch_size=16)
    assert SegmentationModel(enc, 2).indices == [2, 5, 8, 11]  # UNETR's hidden states 3, 6, 9, 12
    with pytest.raises(ValueError, match="isotropic patch size"):
        SegmentationModel(create_encoder("vit_micro", spatial_dims=3, img_size=32, patch_size=[4, 8, 8]), 2)


def test_sliding_window_returns_the_full_size_prediction():
    enc = adapt_encoder(create_encoder("vit_micro", spatial_dims=3, img_size=32, patch_size=4), "lora")
    model = SegmentationModel(enc, 3, feature_size=8)
    x = torch.rand(1, 1, 45, 70, 37)  # larger than the 32^3 patch, not a multiple of it
    probs = predict(model, x, (32, 32, 32), overlap=0.25)
    assert probs.shape == (1, 3, 45, 70, 37)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 45, 70, 37))


def test_dice_is_one_for_perfect_and_zero_for_disjoint_predictions():
    lab = torch.zeros(1, 1, 20, 20, 20, dtype=torch.long)
    lab[..., 2:8, 2:8, 2:8] = 1
    lab[..., 10:18, 10:18, 10:18] = 2
    perfect = segmentation_metrics(lab, lab, 3, ["bg", "a", "b"], spacing=(2.0, 2.0, 2.0))
    assert perfect["dice"] == {"a": 1.0, "b": 1.0} and perfect["mean_hd95"] == 0.0
    disjoint = torch.zeros_like(lab)
    disjoint[..., 12:18, 2:8, 2:8] = 1  # class a moved 10 voxels along x, class b missing
    m = segmentation_metrics(disjoint, lab, 3, ["bg", "a", "b"], spacing=(2.0, 2.0, 2.0))
    assert m["dice"]["a"] == 0.0 and m["dice"]["b"] == 0.0
    assert m["hd95"]["a"] == pytest.approx(20.0, abs=2.0)  # 10 voxels x 2 mm


def test_a_mask_with_an_unknown_label_names_where():
    with pytest.raises(DataError, match=r"case7.nii.gz.*label value\(s\) \[5\] outside the recipe's classes 0..2"):
        check_mask(torch.tensor([[0, 1], [2, 5]]), 3, "case7.nii.gz")
