"""SAM whole (issue 42): a segment-anything checkpoint (random weights, tiny size) converted into medfm's
PromptableSAM gives segment-anything's own low-resolution logits, IoU predictions and masks through ``SamPredictor``
for box and point prompts, single- and multi-mask; MedSAM's convention; `medfm segment` on images and (by
propagation) volumes in their own geometry; the promptable fine-tuning recipe on real slices (MNI152 tissue maps),
from a random encoder and from a whole SAM, with LoRA."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import medfm
from medfm.cli import main

segment_anything = pytest.importorskip("segment_anything", reason="segment-anything is not installed")

PIXEL_MEAN, PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # segment_anything.modeling.Sam


def _tiny_sam(seed: int = 0):
    """segment-anything's Sam at a tiny size (64 px, 32-channel embedding), every weight random."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    sam = Sam(image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                            out_chans=32, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                            use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
                                            rel_pos_zero_init=False),
              prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=3,
                                       iou_head_hidden_dim=32,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=8)),
              pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    with torch.no_grad():
        sam.image_encoder.pos_embed.normal_(0, 0.02)
        for p in sam.prompt_encoder.parameters():  # not-a-point / no-mask embeddings start at zero-ish: randomise
            p.add_(torch.randn_like(p) * 0.1)
    return sam.eval()


@pytest.fixture(scope="module")
def sam_file(tmp_path_factory):
    sam = _tiny_sam()
    path = tmp_path_factory.mktemp("sam") / "sam_vit_tiny.pth"
    torch.save({f"module.{k}": v for k, v in sam.state_dict().items()}, path)  # a DDP-saved layout
    return sam, path


def _image(h: int = 50, w: int = 38, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - h / 2) ** 2 / 100 + (xx - w / 3) ** 2 / 40) < 1
    return (rng.normal(60, 10, (h, w)) + 120 * blob).clip(0, 255).astype(np.uint8)


PROMPTS = [
    {"box": [5, 8, 30, 40]},
    {"points": [[12, 20], [30, 5]], "labels": [1, 0]},
    {"box": [2, 3, 35, 45], "points": [[15, 25]], "labels": [1]},
]


def _same_as_the_predictor(ours, predictor, image, prompts) -> None:
    """Low-resolution logits and IoU within 1e-5 of ``SamPredictor``'s (set to ``image``), masks alike, for each
    prompt, single- and multi-mask."""
    for prompt in prompts:
        for multimask in (False, True):
            masks, iou, low = predictor.predict(
                point_coords=np.array(prompt["points"], float) if "points" in prompt else None,
                point_labels=np.array(prompt["labels"]) if "points" in prompt else None,
                box=np.array(prompt["box"], float) if "box" in prompt else None, multimask_output=multimask)
            out = ours.predict(image, multimask=multimask, **prompt)
            torch.testing.assert_close(out["logits"], torch.as_tensor(low), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out["iou"], torch.as_tensor(iou), rtol=1e-5, atol=1e-5)
            assert out["masks"].shape == masks.shape == ((3 if multimask else 1), *image.shape[:2])
            assert (out["masks"].numpy() == masks).mean() > 0.999


def test_the_converted_sam_is_segment_anythings_own_through_its_predictor(sam_file):
    from segment_anything import SamPredictor

    from medfm.heads.promptable import convert_sam

    sam, path = sam_file
    ours = convert_sam(path)
    assert ours.resize == "longest" and ours.image_size == 64
    predictor = SamPredictor(sam)
    image = _image()  # not square: SAM pads the bottom / right after normalising
    predictor.set_image(np.repeat(image[..., None], 3, -1))
    _same_as_the_predictor(ours, predictor, image, PROMPTS)
    # a next round: the previous low-resolution logits as the mask prompt, beside a new click
    _, _, low = predictor.predict(box=np.array(PROMPTS[2]["box"], float), point_coords=np.array(PROMPTS[2]["points"], float),
                                  point_labels=np.array(PROMPTS[2]["labels"]), multimask_output=True)
    previous = low[:1]  # (1, 16, 16): that round's first mask
    masks, iou, low = predictor.predict(point_coords=np.array([[20.0, 30.0]]), point_labels=np.array([1]),
                                        mask_input=previous, multimask_output=False)
    out = ours.predict(image, points=[[20, 30]], mask=torch.as_tensor(previous))
    torch.testing.assert_close(out["logits"], torch.as_tensor(low), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["iou"], torch.as_tensor(iou), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a ViT-B SAM (90 M random weights) built, saved and converted
def test_a_vit_b_sam_in_the_flat_layout_converts_to_segment_anythings_own_predictions(tmp_path):
    """SAM's ViT-B (width 768, 12 blocks, 12 heads, 14 x 14 windows, global blocks 2, 5, 8, 11; SAM's 256-wide
    decoder) at 256 px instead of 1024 (the same weights' shapes but the position tables), as segment-anything saves
    it (flat keys): the converted model gives SamPredictor's logits and IoU."""
    from segment_anything import SamPredictor
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from medfm.heads.promptable import convert_sam

    torch.manual_seed(1)
    sam = Sam(image_encoder=ImageEncoderViT(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                            out_chans=256, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                            use_rel_pos=True, window_size=14, global_attn_indexes=(2, 5, 8, 11),
                                            rel_pos_zero_init=False, qkv_bias=True),
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                                       iou_head_hidden_dim=256,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8)),
              pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD).eval()
    with torch.no_grad():
        sam.image_encoder.pos_embed.normal_(0, 0.02)
    path = tmp_path / "sam_vit_b_256.pth"
    torch.save(sam.state_dict(), path)  # segment-anything's own layout: flat keys
    ours = convert_sam(path)
    assert ours.encoder.embed_dim == 256 and len(ours.encoder.encoder_blocks()) == 12 and ours.image_size == 256
    image = _image(90, 120, seed=2)
    predictor = SamPredictor(sam)
    predictor.set_image(np.repeat(image[..., None], 3, -1))
    _same_as_the_predictor(ours, predictor, image, [{"box": [20, 15, 80, 70]},
                                                    {"points": [[40, 30], [100, 80]], "labels": [1, 0]}])


def test_medsam_goes_in_square_at_zero_to_one_and_a_sam_without_decoder_is_refused(sam_file, tmp_path):
    from medfm.heads.promptable import convert_sam

    sam, path = sam_file
    medsam = tmp_path / "medsam_vit_tiny.pth"
    torch.save({"model": sam.state_dict()}, medsam)  # MedSAM's training checkpoint nests the model
    model = convert_sam(medsam)
    assert model.resize == "square" and not hasattr(model.encoder.input_norm, "mean")
    image = _image()
    x, size, resized = model.prepare(image)
    assert x.shape == (1, 3, 64, 64) and size == (50, 38) and resized == (64, 64)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    # MedSAM's own inference: the encoder on [0, 1] as is, the box scaled per axis, logits resized to the image
    with torch.no_grad():
        emb = sam.image_encoder(x)
        box = torch.tensor([[5 * 64 / 38, 8 * 64 / 50, 30 * 64 / 38, 40 * 64 / 50]])
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
        expected = torch.sigmoid(torch.nn.functional.interpolate(low, (50, 38), mode="bilinear")) > 0.5
    out = model.predict(image, box=[5, 8, 30, 40])
    assert (out["masks"] == expected[0]).float().mean() > 0.999
    encoder_only = tmp_path / "sam_encoder_only.pth"
    torch.save({k: v for k, v in sam.state_dict().items() if k.startswith("image_encoder.")}, encoder_only)
    with pytest.raises(ValueError, match="an image encoder only"):
        convert_sam(encoder_only)


class _SammedAdapter(torch.nn.Module):
    """SAM-Med2D's ``Adapter_Layer`` as its repository writes it (OpenGVLab/SAM-Med2D,
    segment_anything/modeling/image_encoder.py): the reference the converted adapters are checked against."""

    def __init__(self, dim: int):
        super().__init__()
        nn = torch.nn
        self.norm = nn.LayerNorm(dim)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channel = nn.Sequential(nn.Linear(dim, dim // 4, bias=False), nn.ReLU(), nn.Linear(dim // 4, dim, bias=False),
                                     nn.Sigmoid())
        self.spatial = nn.Sequential(nn.Conv2d(dim, dim, 3, 2, 1, bias=False), nn.ReLU(),
                                     nn.ConvTranspose2d(dim, dim, 4, 2, 1, bias=False), nn.ReLU())

    def forward(self, x):
        x = x.permute(0, 3, 1, 2)
        b, c = x.shape[:2]
        x_channel = self.channel(self.avg_pool(x).view(b, c)).view(b, c, 1, 1) * x
        x = x + self.spatial(x_channel)
        return self.norm(x.permute(0, 2, 3, 1))


def _sammed_block_forward(self, x):
    """SAM-Med2D's ``Block.forward`` with its adapter: ``x + mlp(norm2(x)) + Adapter(norm2(x))``."""
    from segment_anything.modeling.image_encoder import window_partition, window_unpartition

    shortcut = x
    x = self.norm1(x)
    if self.window_size > 0:
        h, w = x.shape[1], x.shape[2]
        x, pad_hw = window_partition(x, self.window_size)
    x = self.attn(x)
    if self.window_size > 0:
        x = window_unpartition(x, self.window_size, pad_hw, (h, w))
    x = shortcut + x
    normed = self.norm2(x)
    return x + self.mlp(normed) + self.Adapter(normed)


def test_a_sam_med2d_checkpoint_converts_with_its_adapters_and_its_square_normalised_input(tmp_path, monkeypatch):
    """SAM-Med2D's layout (an ``Adapter`` beside each block's MLP, ``{"model": ...}``): every adapter weight loads,
    the input convention is read from the keys (``square_norm``), and the converted model gives SAM-Med2D's own
    forward (its adapter and block code above, ``SammedPredictor``'s steps) within 1e-5."""
    from segment_anything.modeling.image_encoder import Block

    from medfm.heads.promptable import convert_sam, load_promptable, write_sam

    sam = _tiny_sam(seed=3)
    monkeypatch.setattr(Block, "forward", _sammed_block_forward)
    torch.manual_seed(4)
    for block in sam.image_encoder.blocks:
        block.Adapter = _SammedAdapter(32)
    sam.eval()
    path = tmp_path / "tiny_with_adapters.pth"  # the name says nothing: the adapters decide the convention
    torch.save({"model": sam.state_dict(), "epoch": 3}, path)
    ours = convert_sam(path)
    assert ours.resize == "square_norm" and ours.spec["encoder"]["adapters"] is True
    assert sum(k.count(".Adapter.") for k in ours.state_dict()) == 2 * 6  # 2 blocks x (norm 2, channel 2, spatial 2)
    image = _image()
    rgb = np.repeat(image[..., None], 3, -1).astype(np.float64)
    # SammedPredictor: (image - pixel mean) / std, cv2 nearest resize to 64 x 64 (source index floor(i * in / out)),
    # box coordinates scaled per axis, logits up to 64 x 64 and then to the image's size, > 0
    normed = (rgb - np.array(PIXEL_MEAN)) / np.array(PIXEL_STD)
    rows, cols = (np.arange(64) * 50 // 64), (np.arange(64) * 38 // 64)
    x = torch.as_tensor(normed[rows][:, cols], dtype=torch.float32).permute(2, 0, 1)[None]
    box = torch.tensor([[5 * 64 / 38, 8 * 64 / 50, 30 * 64 / 38, 40 * 64 / 50]])
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
        low, iou = sam.mask_decoder(sam.image_encoder(x), sam.prompt_encoder.get_dense_pe(), sparse, dense, True)
        up = torch.nn.functional.interpolate(low, (64, 64), mode="bilinear", align_corners=False)
        masks = torch.nn.functional.interpolate(up, (50, 38), mode="bilinear", align_corners=False) > 0
    out = ours.predict(image, box=[5, 8, 30, 40], multimask=True)
    torch.testing.assert_close(out["logits"], low[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["iou"], iou[0], rtol=1e-5, atol=1e-5)
    assert (out["masks"] == masks[0]).float().mean() > 0.999
    reloaded = load_promptable(write_sam(path, tmp_path / "converted"))  # config + safetensors, adapters included
    assert reloaded.resize == "square_norm"
    torch.testing.assert_close(reloaded.predict(image, box=[5, 8, 30, 40], multimask=True)["logits"], out["logits"])
    # the adapters matter: without them the same weights predict otherwise
    plain = tmp_path / "tiny_plain.pth"
    torch.save({k: v for k, v in sam.state_dict().items() if ".Adapter." not in k}, plain)
    assert not torch.allclose(convert_sam(plain, resize="square_norm").predict(image, box=[5, 8, 30, 40])["logits"],
                              low[0, :1], atol=1e-3)


def test_medfm_segment_writes_the_predictors_mask_at_the_inputs_size(sam_file, tmp_path, capsys):
    from segment_anything import SamPredictor

    sam, path = sam_file
    image = _image(41, 57, seed=1)
    Image.fromarray(image).save(tmp_path / "grey.png")
    converted = tmp_path / "converted"
    assert main(["models", "convert", str(path), "--out", str(converted)]) == 0
    model = medfm.load(converted / "model")  # reloads alone, as converted
    assert type(model).__name__ == "PromptableSAM" and model.resize == "longest"
    for source in (path, converted):  # a checkpoint is converted on the fly; a converted folder loads
        out = tmp_path / f"mask_{source.name}.png"
        assert main(["segment", "--model", str(source), str(tmp_path / "grey.png"), "--box", "4,6,40,30",
                     "--out", str(out)]) == 0
        written = np.asarray(Image.open(out)) > 0
        predictor = SamPredictor(sam)
        predictor.set_image(np.repeat(image[..., None], 3, -1))
        masks, _, _ = predictor.predict(box=np.array([4, 6, 40, 30], float), multimask_output=False)
        assert written.shape == (41, 57) and (written == masks[0]).mean() > 0.999
    assert main(["segment", "--model", str(converted), str(tmp_path / "grey.png"), "--point", "20,15",
                 "--point", "3,3,0", "--multimask", "--out", str(tmp_path / "multi.png")]) == 0
    assert "predicted IoU" in capsys.readouterr().out
    assert main(["segment", "--model", str(converted), str(tmp_path / "grey.png"), "--out",
                 str(tmp_path / "none.png")]) == 2  # no prompt: one line


def test_simulated_prompts_box_the_object_and_click_in_its_errors():
    from medfm.evaluate.prompts import box_from_mask, next_click

    truth = np.zeros((40, 50), bool)
    truth[10:25, 12:30] = True
    assert box_from_mask(truth) == [12, 10, 29, 24]
    rng = np.random.default_rng(0)
    for _ in range(20):  # MedSAM's jitter moves each side outward by 0..5 pixels, inside the image
        x0, y0, x1, y1 = box_from_mask(truth, jitter=5, rng=rng)
        assert 7 <= x0 <= 12 and 5 <= y0 <= 10 and 29 <= x1 <= 34 and 24 <= y1 <= 29
    assert box_from_mask(np.zeros((4, 4))) is None
    pred = np.zeros_like(truth)
    pred[10:25, 12:18] = True  # most of the object missed: a positive click inside what was missed
    for seed in range(10):
        x, y, label = next_click(pred, truth, seed=seed)
        assert label == 1 and truth[int(y), int(x)] and not pred[int(y), int(x)]
    pred = truth.copy()
    pred[30:40, 0:50] = True  # a false detection larger than any miss: a negative click inside it
    for seed in range(10):
        x, y, label = next_click(pred, truth, seed=seed)
        assert label == 0 and pred[int(y), int(x)] and not truth[int(y), int(x)]
    assert next_click(truth, truth) is None


def test_simulated_clicks_in_a_volume_land_in_its_errors_and_score_each_round():
    from medfm.evaluate.prompts import click_scores, next_voxel_click

    truth = np.zeros((20, 24, 16), bool)
    truth[4:14, 6:18, 3:12] = True
    pred = np.zeros_like(truth)
    pred[4:14, 6:9, 3:12] = True  # most of the object missed: positive clicks inside what was missed
    for seed in range(5):
        (i, j, k), label = next_voxel_click(pred, truth, seed=seed)
        assert label == 1 and truth[i, j, k] and not pred[i, j, k]
    pred = truth.copy()
    pred[15:20] = True  # a larger false detection: negative clicks inside it
    for seed in range(5):
        (i, j, k), label = next_voxel_click(pred, truth, seed=seed)
        assert label == 0 and pred[i, j, k] and not truth[i, j, k]
    assert next_voxel_click(truth, truth) is None
    seen = []

    def predict(points, labels):  # a model that grows a cube around the clicks it is given
        seen.append(len(points))
        out = np.zeros_like(truth)
        for (i, j, k), lab in zip(points, labels):
            if lab:
                out[max(0, i - 3):i + 4, max(0, j - 3):j + 4, max(0, k - 3):k + 4] = True
        return out

    res = click_scores(predict, truth, clicks=[1, 3, 5])
    assert seen[:3] == [1, 2, 3]  # each round gets every click so far
    assert {"click_1", "click_3", "click_5"} <= set(res) and 0 < res["click_1"]["dice"] <= res["click_5"]["dice"] <= 1
    assert res["shown"]["first_mask"].shape == truth.shape and len(res["shown"]["points"]) <= 5


def test_prompted_scores_follow_the_box_and_the_click_rounds(sam_file):
    from medfm.evaluate.prompts import prompted_scores
    from medfm.heads.promptable import convert_sam

    _, path = sam_file
    image = _image()
    truth = np.zeros(image.shape, bool)
    truth[15:35, 5:25] = True

    def oracle(image, box=None, points=None, labels=None, mask=None):  # a model that segments the truth
        return {"masks": torch.as_tensor(truth)[None], "logits": torch.zeros(1, 16, 16), "iou": torch.ones(1)}

    perfect = prompted_scores(oracle, image, truth, clicks=(1, 3))
    assert perfect.pop("shown")["box"] is not None
    assert perfect == {k: {"dice": 1.0, "nsd": 1.0} for k in ("box", "click_1", "click_3")}
    scores = prompted_scores(convert_sam(path).predict, image, truth, clicks=(1, 3))
    scores.pop("shown")
    assert set(scores) == {"box", "click_1", "click_3"}
    assert all(0.0 <= v["dice"] <= 1.0 and 0.0 <= v["nsd"] <= 1.0 for v in scores.values())


# ---------------------------------------------------------------------------------------------- fine-tuning
TINY_DECODER = ["promptable.prompt_dim=32", "promptable.decoder_mlp_dim=64", "promptable.iou_hidden=32",
                "promptable.decoder_heads=4", "promptable.eval_clicks=[1,3]", "promptable.eval_max=6",
                "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "data.num_workers=0",
                "data.batch_size=4", "optim.lr=3e-3", "optim.warmup_steps=0"]


def _promptable(*overrides: str) -> dict:
    from medfm.finetune import load_task_recipe

    from .conftest import REPO

    return load_task_recipe(REPO / "tasks" / "promptable_2d.yaml", [*TINY_DECODER, *overrides], profile="tiny")


def _losses(run) -> list[float]:
    import csv

    with open(run / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow  # a 30-step run and its prompted evaluation
def test_promptable_recipe_trains_on_real_slices_reloads_alone_and_scores_prompts(tmp_path):
    from medfm.finetune import run_finetune

    from .finetune_helpers import mni_slices

    manifest = mni_slices(tmp_path)  # MNI152 axial slices, grey (1) and white (2) matter: two object classes
    cfg = _promptable("trainer.max_steps=30", "encoder.patch_size=4")
    run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))
    losses = _losses(run)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, losses
    metrics = __import__("json").loads((run / "metrics.json").read_text())
    val = metrics["val"]
    assert val["n"] == 6 and {"box_dice", "box_nsd", "click_1_dice", "click_3_dice", "cpu_s_per_prompt"} <= set(val)
    assert "box_dice/class 1" in val and "box_dice/class 2" in val  # per class: both tissue classes were objects
    assert (run / "prompted_val.html").read_text().count("<tr>") > 5 and (run / "prompted_val_overlays.png").exists()
    model = medfm.load(run / "model")  # reloads alone, predicts as the run's own model did
    assert model.spec["head"]["classes"] == [1.0, 2.0] and model.resize == "square"
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())  # MedSAM: the prompt encoder frozen
    image = np.asarray(Image.open(next(manifest.parent.glob("t1_*.png"))))
    out_a = model.predict(image, box=[20, 30, 150, 170])
    out_b = medfm.heads.promptable.load_promptable(run).predict(image, box=[20, 30, 150, 170])
    torch.testing.assert_close(out_a["logits"], out_b["logits"])
    assert out_a["masks"].shape == (1, *image.shape[:2])  # the input's size
    # medfm evaluate scores the run's validation split again, the same way
    assert main(["evaluate", str(run), "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    again = __import__("json").loads((tmp_path / "eval" / "metrics.json").read_text())["val"]
    assert again["box_dice"] == pytest.approx(val["box_dice"])


@pytest.mark.slow  # two short runs from a whole (tiny) SAM
@pytest.mark.parametrize("method", ["full", "lora"])
def test_promptable_starts_from_a_whole_sam_with_its_decoder_and_its_sizes(sam_file, tmp_path, method):
    from medfm.finetune import run_finetune
    from medfm.heads.promptable import convert_sam

    from .finetune_helpers import mni_slices

    sam, path = sam_file
    manifest = mni_slices(tmp_path, n=8)
    cfg = _promptable("trainer.max_steps=2", f"method={method}", f"promptable.from_model={path}",
                      "promptable.classes=[2]", "lora.target_modules=null")
    run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))
    model = medfm.load(run / "model")
    source = convert_sam(path)
    assert model.image_size == 64 and model.encoder.patch_size == (16, 16)  # the SAM's sizes, not the recipe's
    assert model.spec["head"]["classes"] == [2.0] and model.spec["head"]["prompt_dim"] == 32
    for k, v in source.prompt_encoder.state_dict().items():  # frozen, as loaded from the SAM
        torch.testing.assert_close(model.prompt_encoder.state_dict()[k], v)
    changed = [k for k, v in source.mask_decoder.state_dict().items()
               if not torch.equal(model.mask_decoder.state_dict()[k], v)]
    assert changed  # the decoder started from the SAM's weights and trained
    if method == "lora":
        assert any("lora_" in k for k in model.state_dict())


def test_propagation_follows_a_3d_object_from_one_slice(tmp_path, sam_file):
    """Slice by slice from a box on one slice (a model that segments the bright pixels inside its box stands in
    for a trained one: what is tested is the propagation); a NIfTI volume in, its mask written with the input's
    oblique, LPS affine."""
    import nibabel as nib

    from medfm.heads.promptable import propagate, segment_file

    vol = np.zeros((40, 36, 24), np.float32)
    ii, jj, kk = np.mgrid[:40, :36, :24]
    ball = ((ii - 20) / 9) ** 2 + ((jj - 16) / 7) ** 2 + ((kk - 11) / 6) ** 2 < 1  # slices 6..16
    vol[ball] = 100
    vol[2:6, 2:6, :] = 100  # something bright elsewhere on every slice: outside the boxes, never segmented

    class Thresholder:
        calls = []

        def predict(self, image, box=None, points=None, labels=None, **_):
            self.calls.append(box)
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            m = np.zeros(image.shape, bool)
            m[y0:y1 + 1, x0:x1 + 1] = image[y0:y1 + 1, x0:x1 + 1] > 50
            return {"masks": torch.as_tensor(m)[None]}

    model = Thresholder()
    model.spec = {"head": {"classes": [1.0, 2.0], "class_names": ["left half", "right half"]}}
    mask = propagate(model, vol, 11, box=[11, 9, 29, 23])  # x = first voxel index, y = second, on slice 11
    assert (mask == ball).all()
    assert len(model.calls) == 1 + 6 + 6  # slices 12..16 and one empty above, 10..6 and one empty below
    with pytest.raises(ValueError, match="outside the volume"):
        propagate(model, vol, 30, box=[0, 0, 5, 5])
    # the file path: an oblique, LPS-oriented NIfTI in, its mask out with the same affine
    affine = np.array([[-0.9, 0.1, 0.0, 40.0], [0.1, -0.95, 0.05, 30.0], [0.0, 0.05, 2.0, -20.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "vol.nii.gz")
    out = segment_file(model, tmp_path / "vol.nii.gz", tmp_path / "mask.nii.gz", box=[11, 9, 29, 23], index=11)
    written = nib.load(tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine) == ("L", "P", "S")
    assert (np.asarray(written.dataobj) == ball).all() and out["slices"] == list(range(6, 17))
    # and through the CLI with a real (tiny, converted) SAM: a mask in the volume's geometry
    _, path = sam_file
    assert main(["segment", "--model", str(path), str(tmp_path / "vol.nii.gz"), "--box", "11,9,29,23", "--slice",
                 "11", "--out", str(tmp_path / "sam_mask.nii.gz")]) == 0
    sam_mask = nib.load(tmp_path / "sam_mask.nii.gz")
    assert sam_mask.shape == vol.shape and np.allclose(sam_mask.affine, affine)
    assert main(["segment", "--model", str(path), str(tmp_path / "vol.nii.gz"), "--box", "11,9,29,23",
                 "--out", str(tmp_path / "x.nii.gz")]) == 2  # a volume without --slice: one line


def test_a_3d_manifest_becomes_slices_to_train_on_and_its_volumes_are_scored_by_propagation(tmp_path):
    import csv

    from medfm.finetune.promptable import propagated_scores, slice_manifest

    from .finetune_helpers import labelled_volumes

    volumes = labelled_volumes(tmp_path / "set", [(30, 34, 28)] * 4, [(1.0, 1.0, 1.0)] * 4)  # c3 is val
    slices = slice_manifest(volumes, tmp_path / "slices")
    with open(slices) as f:
        rows = list(csv.DictReader(f))
    labelled = int(np.asarray(nib_load(tmp_path / "set" / "labels" / "c0.nii.gz")).any((0, 1)).sum())
    assert len(rows) == 4 * labelled and sum(r["split"] == "val" for r in rows) == labelled  # c3's slices: val
    first = np.asarray(Image.open(slices.parent / rows[0]["mask"]))
    assert first.shape == (34, 30) and set(np.unique(first)) <= {0, 1, 2}  # shown transposed: (J, I)

    class Thresholder:  # segments what is brighter than the background inside its box
        spec = {"head": {"classes": [1.0, 2.0], "class_names": ["one", "two"]}}

        def predict(self, image, box=None, **_):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            m = np.zeros(image.shape, bool)
            m[y0:y1 + 1, x0:x1 + 1] = image[y0:y1 + 1, x0:x1 + 1] > 200
            return {"masks": torch.as_tensor(m)[None]}

    scores = propagated_scores(Thresholder(), volumes)
    assert scores["objects"] == 2 and scores["volumes"] == 1
    # the halves touch: each widened box takes in a little of the other half (this stand-in knows no classes)
    assert 0.7 < scores["dice/one"] < 1 and 0.7 < scores["dice/two"] < 1, scores


def nib_load(path):
    import nibabel as nib

    return nib.load(path).dataobj


def test_rows_without_a_mask_hold_no_object(tmp_path):
    """A normal image (BUSI's: no mask file) is no object: read as label 0 for training, skipped in evaluation,
    and a split where no row has a mask is an error that says so."""
    import csv

    from medfm.data import open_dataset
    from medfm.data.writers import write_manifest
    from medfm.finetune.promptable import evaluate_prompted, mask_values

    from .finetune_helpers import mni_slices

    manifest = mni_slices(tmp_path, n=4)
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    rows[0]["mask"] = ""
    write_manifest(manifest, rows)
    ds = open_dataset(manifest, split="train", spatial_dims=2, mask_key="mask")
    values = mask_values(ds)
    assert values[0] == {0.0} and values[1] >= {1.0, 2.0}
    for r in rows:
        r["mask"] = ""
    write_manifest(manifest, rows)
    with pytest.raises(medfm.data.DataError, match="3 of its 3 rows have no mask"):
        evaluate_prompted(None, open_dataset(manifest, split="train", spatial_dims=2, mask_key="mask"), [1.0],
                          ["one"], tmp_path, "train", [1])


def test_medfm_segment_scores_a_manifest_with_simulated_prompts(sam_file, tmp_path, capsys):
    """A converted SAM (no run, no recipe) scored on a segmentation manifest's split: every object from a jittered
    box and after clicks, metrics.json and the HTML page; its classes come from the masks."""
    import json

    from .finetune_helpers import mni_slices

    _, path = sam_file
    manifest = mni_slices(tmp_path, n=4)  # val: one slice, grey and white matter
    out = tmp_path / "scored"
    assert main(["segment", "--model", str(path), "--data", str(manifest), "--clicks", "1,2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 2 and {"box_dice", "click_1_dice", "click_2_nsd", "box_dice/class 1"} <= set(metrics)
    assert (out / "prompted_val.html").exists() and "2 objects: box Dice" in capsys.readouterr().out
    assert main(["segment", "--model", str(path), "--data", str(manifest), "--box", "1,1,5,5", "--out", str(out)]) == 2


@pytest.mark.slow  # a 3D run and its click evaluation on real MNI152 hemispheres
def test_promptable_3d_recipe_trains_on_real_volumes_reloads_alone_and_scores_clicks(tmp_path, capsys):
    """tasks/promptable_3d.yaml (native 3D: a 3D encoder, VISTA3D's point head) on the MNI152 hemispheres (grey and
    white matter as two object classes): the loss falls, validation scores 1 / 3 clicks per class, and the saved
    model reloads alone: `medfm evaluate` scores the same."""
    from medfm.finetune import load_task_recipe, run_finetune
    from medfm.heads.promptable_volume import PromptableVolume

    from .conftest import REPO
    from .finetune_helpers import mni_hemispheres

    manifest = mni_hemispheres(tmp_path)
    cfg = load_task_recipe(REPO / "tasks" / "promptable_3d.yaml",
                           ["encoder.name=segres_encoder", "encoder.init_filters=8", "encoder.blocks_down=[1,1,1]",
                            "data.preset_args.spacing=6.0", "promptable_3d.feature_dim=8",
                            "promptable_3d.decoder_width=8", "promptable_3d.eval_clicks=[1,3]", "trainer.max_steps=24",
                            "optim.lr=3e-3"], profile="tiny")
    with pytest.warns(UserWarning, match="resampled from its native spacing 1 x 1 x 1 mm to 6 x 6 x 6 mm"):
        run = run_finetune(cfg, tmp_path / "run", data_path=str(manifest))  # one line: 6 mm is far from 1 mm
    losses = _losses(run)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    val = __import__("json").loads((run / "metrics.json").read_text())["val"]
    assert val["n"] == 2 and {"click_1_dice", "click_3_dice", "click_3_nsd", "cpu_s_per_click_round"} <= set(val)
    assert "click_1_dice/class 1" in val and "click_1_dice/class 2" in val
    assert (run / "prompted_val_overlays.png").exists()
    model = medfm.load(run / "model")
    assert isinstance(model, PromptableVolume) and model.spec["head"]["classes"] == [1.0, 2.0]
    assert main(["evaluate", str(run), "--split", "val", "--out", str(tmp_path / "eval")]) == 0
    again = __import__("json").loads((tmp_path / "eval" / "metrics.json").read_text())["val"]
    assert again["click_3_dice"] == pytest.approx(val["click_3_dice"])
    # medfm segment: clicks in the input's voxels, carried through world coordinates into the model's 6 mm grid, the
    # mask written back in the input's grid and affine
    import nibabel as nib

    from medfm.heads.promptable_volume import segment_volume

    src = nib.load(manifest.parent / "right_t1.nii.gz")
    lab = np.asarray(nib.load(manifest.parent / "right_tissue.nii.gz").dataobj)
    click = [int(v) for v in np.argwhere(lab == 2)[len(np.argwhere(lab == 2)) // 2]]
    out = tmp_path / "mask.nii.gz"
    assert main(["segment", "--model", str(run), str(manifest.parent / "right_t1.nii.gz"),
                 "--point", ",".join(map(str, click)), "--out", str(out)]) == 0
    written = nib.load(out)
    assert written.shape == src.shape and np.allclose(written.affine, src.affine)
    res = segment_volume(model, manifest.parent / "right_t1.nii.gz", tmp_path / "again.nii.gz", [click])
    prepared = medfm.data.load(manifest.parent / "right_t1.nii.gz", spatial_dims=3)["image"]
    from medfm.data.preprocess import Preprocess

    grid = Preprocess.read(model.spec["preprocess"]).transform(train=False)({"image": prepared, "meta": {}})["image"].affine
    world = lambda affine, ijk: (np.asarray(affine, float) @ [*ijk, 1.0])[:3]  # noqa: E731
    assert np.linalg.norm(world(grid, res["model_points"][0]) - world(src.affine, click)) < 6.0  # within a model voxel
    assert main(["segment", "--model", str(run), str(manifest.parent / "right_t1.nii.gz"), "--box", "1,2,3,4",
                 "--out", str(out)]) == 2  # a box for a clicks-only model: one line, exit 2
    assert "clicks in the volume" in capsys.readouterr().err
    assert main(["predict", str(run), str(manifest.parent / "right_t1.nii.gz"), "--out", str(tmp_path / "p")]) == 2
    assert "segments from clicks: medfm segment --model RUN VOLUME --point i,j,k" in capsys.readouterr().err


def test_a_native_3d_model_reads_its_training_patch_around_the_first_click():
    """PromptableVolume.embed(centre=first click) reads the training patch around it (kept inside the volume); the
    mask comes back at the volume's size with background outside that region; clicks outside it are left out, and
    none inside is an error in one line."""
    from medfm.encoders import build_encoder
    from medfm.heads.promptable_volume import PromptableVolume

    torch.manual_seed(0)
    encoder = build_encoder({"name": "segres_encoder", "spatial_dims": 3, "in_chans": 1, "img_size": 16,
                             "init_filters": 4, "blocks_down": [1, 1]}, pretrained=False)
    model = PromptableVolume(encoder, feature_dim=8, decoder_width=4, patch=(16, 16, 16))
    volume = torch.randn(1, 30, 20, 12)  # smaller than the patch along the last axis
    e = model.embed(volume, centre=(28, 3, 6))
    assert e.start == (14, 0, 0) and e.region == (16, 16, 12) and e.size == (30, 20, 12)
    out = model.predict(e, [[28, 3, 6], [2, 2, 2]], [1, 0])  # the second click lies outside the region: left out
    assert out["logits"].shape == (30, 20, 12) and bool((out["logits"][:14] == -20.0).all())
    assert bool((out["logits"][:, 16:] == -20.0).all()) and not bool(out["mask"][:14].any())
    with pytest.raises(ValueError, match="no click"):
        model.predict(e, [[1, 1, 1]])
    whole = model.embed(volume)  # without a centre: the whole volume
    assert whole.start == (0, 0, 0) and whole.region == (30, 20, 12)
