"""SAM / MedSAM image encoder: a segment-anything checkpoint (random weights, tiny size) converted into medfm's
SAM encoder agrees with segment-anything's own ImageEncoderViT on the neck's output; it segments from the CLI."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from medfm.cli import main
from medfm.encoders import create_encoder, saved_architecture
from medfm.encoders.formats import identify, open_checkpoint

from .public_helpers import QUIET

segment_anything = pytest.importorskip("segment_anything", reason="segment-anything (a test dependency) is not installed")

PIXEL_MEAN, PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # segment_anything.modeling.Sam


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    enc = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, out_chans=16,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=2,
                          global_attn_indexes=(3,), rel_pos_zero_init=False).eval()
    with torch.no_grad():
        enc.pos_embed.normal_(0, 0.02)
    sd = {f"image_encoder.{k}": v for k, v in enc.state_dict().items()}
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 16)  # the rest of a SAM checkpoint, left out
    path = tmp_path_factory.mktemp("sam") / "medsam_vit_tiny.pth"
    torch.save(sd, path)
    return enc, path


def test_sam_image_encoder_parity(sam_checkpoint):
    ref, path = sam_checkpoint
    assert identify(open_checkpoint(path)).name == "sam"
    arch = saved_architecture(path)
    assert arch["global_attn_indexes"] == [3] and arch["window_size"] == 2 and arch["sam_img_size"] == 64
    ours = create_encoder("sam_vit", img_size=64, pretrained=path).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        rgb = (x.expand(-1, 3, -1, -1) * 255 - torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)) / torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
        expected = ref(rgb)
        torch.testing.assert_close(ours.forward_features(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), expected.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
        maps = ours.forward_intermediates(x, indices=[0, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 16, 4, 4)] * 2
    torch.testing.assert_close(maps[-1], expected, rtol=1e-5, atol=1e-5)


def test_sam_encoder_segments_from_the_cli(sam_checkpoint, slices, tmp_path):
    _, path = sam_checkpoint
    run = tmp_path / "seg"
    assert main(["finetune", "segment_2d", "--profile", "tiny", "--encoder", str(path), "--data", slices,
                 "--out", str(run), "segmentation.num_classes=3", "--method", "lora", *QUIET]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"] == "sam_vit" and 0.0 <= metrics["val"]["mean_dice"] <= 1.0
