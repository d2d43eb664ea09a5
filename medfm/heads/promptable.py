"""SAM whole as a medfm model: an image encoder from medfm (the ``sam_vit`` family for SAM / MedSAM checkpoints),
and segment-anything's own ``PromptEncoder`` and ``MaskDecoder`` (``TwoWayTransformer``), so a checkpoint's
``prompt_encoder.*`` and ``mask_decoder.*`` weights load as their authors saved them (the prompt encoder's random
Fourier matrix, ``pe_layer.positional_encoding_gaussian_matrix``, is a weight that loads, never re-drawn).

Three input conventions share the one checkpoint layout (recorded with the model as ``resize``):

* ``longest`` (SAM, ``SamPredictor``): the image as 0..255 RGB, its longest side resized to ``image_size`` with
  segment-anything's ``ResizeLongestSide``, normalised by SAM's pixel mean / std (the encoder's ``InputNorm``),
  padded at the bottom and right with zeros after normalisation; masks come back cropped and resized to the
  input's size, thresholded at logit 0.
* ``square`` (MedSAM): the image min-max scaled to [0, 1], resized to ``image_size`` square (no normalisation, no
  padding: the encoder has no ``InputNorm``); the mask is the 256 x 256 logits resized to the input's size,
  sigmoid > 0.5.
* ``square_norm`` (SAM-Med2D, ``SammedPredictor``): the image as 0..255 RGB, resized to ``image_size`` square
  (nearest neighbour), normalised by SAM's pixel mean / std; the logits go up to ``image_size`` and then to the
  input's size, thresholded at 0.

Boxes (x0, y0, x1, y1) and points (x, y) are given in the input image's pixels and mapped to the model's frame
as the image is (:meth:`PromptableSAM.predict`).

Any medfm 2D encoder can be the image encoder (LiteMedSAM's idea: a small encoder at 256 px instead of SAM's
ViT-B at 1024): its last feature map goes through SAM's neck (1x1 and 3x3 convolutions with channel LayerNorm, to
``prompt_dim`` channels); a SAM encoder (``sam_vit``) brings its own neck. The image embedding's grid is
``image_size / stride`` and the decoder's masks are four times that grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.utils.transforms import ResizeLongestSide

from medfm.encoders.sam import SAMEncoder
from medfm.evaluate.prompts import box_from_mask
from medfm.run import evaluating

from .promptable_volume import PromptableVolume
from .task_model import TaskModel, build_task_encoder

RESIZE = ("longest", "square", "square_norm")


def sam_neck(channels: int, out: int) -> nn.Sequential:
    """SAM's neck (segment-anything's ``ImageEncoderViT.neck``): a feature map of ``channels`` to ``out``."""
    return nn.Sequential(nn.Conv2d(channels, out, 1, bias=False), LayerNorm2d(out),
                         nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out))


class ImageEmbedding:
    """One image prepared and encoded once (:meth:`PromptableSAM.embed`), for several prompts on it (clicks)."""

    def __init__(self, embedding: torch.Tensor, size: tuple[int, int], resized: tuple[int, int]):
        self.embedding, self.size, self.resized = embedding, size, resized


class PromptableSAM(TaskModel, nn.Module):
    """Image encoder + SAM's prompt encoder and mask decoder: images and prompts in, mask logits and predicted
    IoU out.

    ``encoder``: a medfm 2D encoder; a ``sam_vit`` gives the (B, ``prompt_dim``, S/16, S/16) image embedding itself
    (its neck), any other encoder's last feature map goes through a new SAM neck (``neck``). The decoder's sizes (``decoder_depth``, ``decoder_mlp_dim``,
    ``decoder_heads``, ``iou_hidden``, ``mask_in_chans``) are SAM's by default and read from a checkpoint when
    converted (:func:`sam_parts`)."""

    def __init__(self, encoder: nn.Module, image_size: int = 1024, prompt_dim: int = 256, resize: str = "longest",
                 decoder_depth: int = 2, decoder_mlp_dim: int = 2048, decoder_heads: int = 8, iou_hidden: int = 256,
                 mask_in_chans: int = 16):
        super().__init__()
        if resize not in RESIZE:
            raise ValueError(f"resize={resize!r}: one of {', '.join(RESIZE)} (SAM's longest side, MedSAM's square, "
                             "SAM-Med2D's normalised square)")
        self.encoder, self.image_size, self.resize = encoder, image_size, resize
        if image_size % encoder.patch_size[0]:
            raise ValueError(f"image_size {image_size} is not divisible by the encoder's stride {encoder.patch_size[0]}")
        grid = image_size // encoder.patch_size[0]
        self.neck = None
        if not isinstance(encoder, SAMEncoder):
            was = encoder.training
            with torch.no_grad():  # a dry run in eval mode (no BatchNorm statistics touched) gives the width
                channels = self._last_map(encoder.eval(), torch.zeros(1, encoder.in_chans, image_size, image_size)).shape[1]
            encoder.train(was)
            self.neck = sam_neck(channels, prompt_dim)
        elif encoder.embed_dim != prompt_dim:
            raise ValueError(f"prompt_dim {prompt_dim}: a SAM encoder's neck gives {encoder.embed_dim} channels")
        self.prompt_encoder = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=(grid, grid),
                                            input_image_size=(image_size, image_size), mask_in_chans=mask_in_chans)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3, transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden,
            transformer=TwoWayTransformer(depth=decoder_depth, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim,
                                          num_heads=decoder_heads))
        self.resizer = ResizeLongestSide(image_size)

    # ------------------------------------------------------------------ the network
    @staticmethod
    def _last_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if encoder.feature_maps == "tokens":
            return encoder.forward_intermediates(x, indices=[-1], norm=True)[-1]
        return encoder.forward_intermediates(x)[-1]

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, prompt_dim, grid, grid) for prepared images (B, C, S, S): a SAM encoder's neck output, or any other
        encoder's last feature map through the model's neck."""
        if self.neck is None:
            return self.encoder.forward_features(images)
        return self.neck(self._last_map(self.encoder, images))

    def decode(self, embeddings: torch.Tensor, points: tuple[torch.Tensor, torch.Tensor] | None = None,
               boxes: torch.Tensor | None = None, masks: torch.Tensor | None = None,
               multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-resolution mask logits (B, 1 or 3, 4 grid, 4 grid) and predicted IoU (B, 1 or 3) for one image
        embedding (1, C, g, g) and B prompts in the model's frame: ``points`` ((B, N, 2), labels (B, N): 1
        foreground, 0 background), ``boxes`` (B, 4), ``masks`` (B, 1, 4 grid, 4 grid) logits of an earlier
        round."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        return self.mask_decoder(image_embeddings=embeddings, image_pe=self.prompt_encoder.get_dense_pe(),
                                 sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                 multimask_output=multimask)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None,
                points: tuple[torch.Tensor, torch.Tensor] | None = None, masks: torch.Tensor | None = None,
                multimask: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched training form: ``images`` (B, C, S, S) already prepared (:meth:`prepare`), one prompt set per
        image (``boxes`` (B, 4), ``points`` ((B, N, 2), (B, N)), ``masks`` (B, 1, 4g, 4g)): logits and IoU."""
        embeddings = self.image_embeddings(images)
        outs = [self.decode(embeddings[i:i + 1],
                            None if points is None else (points[0][i:i + 1], points[1][i:i + 1]),
                            None if boxes is None else boxes[i:i + 1], None if masks is None else masks[i:i + 1],
                            multimask) for i in range(len(images))]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    # ------------------------------------------------------------------ images and prompts in the input's pixels
    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """An image (H, W) or (H, W, C), any dtype, as the model's input (1, C, S, S), with its original size and
        the size it was resized to (before padding)."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[..., None]
        chans = self.encoder.in_chans
        if image.shape[-1] != chans:  # as the training data were made (medfm.data.transforms.MatchChannels)
            if chans == 1:
                image = image.astype(np.float32).mean(-1, keepdims=True)
            elif image.shape[-1] == 1:
                image = np.repeat(image, chans, -1)
            else:
                raise ValueError(f"an image with {image.shape[-1]} channels for a {chans}-channel encoder")
        size = image.shape[:2]
        if self.resize == "longest":  # SAM: uint8 0..255, segment-anything's own resize, pad after normalising
            if image.dtype != np.uint8:
                image = _to_uint8(image)
            resized = self.resizer.apply_image(image)
            x = torch.as_tensor(resized, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
            fill = getattr(getattr(self.encoder, "input_norm", None), "mean", None)
            h, w = x.shape[-2:]
            canvas = (fill.view(1, -1, 1, 1).expand(1, x.shape[1], self.image_size, self.image_size).clone()
                      if fill is not None else torch.zeros(1, x.shape[1], self.image_size, self.image_size))
            canvas[..., :h, :w] = x  # the mean pads: zero once normalised, as SAM pads its normalised image
            return canvas, size, (h, w)
        if self.resize == "square_norm":  # SAM-Med2D: 0..255 stretched square, normalised inside the encoder
            x = torch.as_tensor(image if image.dtype == np.uint8 else _to_uint8(image), dtype=torch.float32)
            x = F.interpolate(x.permute(2, 0, 1)[None] / 255.0, (self.image_size, self.image_size), mode="nearest")
            return x, size, (self.image_size, self.image_size)
        x = torch.as_tensor(image.astype(np.float32)).permute(2, 0, 1)[None]  # MedSAM: min-max to [0, 1], square
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
        x = F.interpolate(x, (self.image_size, self.image_size), mode="bicubic", align_corners=False).clamp(0, 1)
        return x, size, (self.image_size, self.image_size)

    def to_model_frame(self, xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """(..., 2) pixel coordinates (x, y) of an image of ``size`` (H, W) in the model's frame."""
        if self.resize == "longest":
            return self.resizer.apply_coords(np.asarray(xy, dtype=float), size)
        scale = np.array([self.image_size / size[1], self.image_size / size[0]])
        return np.asarray(xy, dtype=float) * scale

    def to_input(self, logits: torch.Tensor, size: tuple[int, int], resized: tuple[int, int]) -> torch.Tensor:
        """Low-resolution logits (B, M, 4g, 4g) as masks at the input's ``size``: SAM's upsampling, crop of the
        padding and resize, threshold at 0; MedSAM's resize, sigmoid > 0.5 (the same threshold); SAM-Med2D's
        upsampling to the model's size, then the input's."""
        if self.resize != "square":
            logits = F.interpolate(logits, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
            logits = logits[..., :resized[0], :resized[1]]
        return F.interpolate(logits, size, mode="bilinear", align_corners=False) > 0

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> ImageEmbedding:
        """The image prepared and encoded once, for :meth:`predict` with several prompts (SamPredictor's
        ``set_image``)."""
        x, size, resized = self.prepare(image)
        with evaluating(self):
            embedding = self.image_embeddings(x.to(next(self.parameters()).device))
        return ImageEmbedding(embedding, size, resized)

    @torch.no_grad()
    def predict(self, image: np.ndarray | ImageEmbedding, box: Sequence[float] | None = None,
                points: Sequence[Sequence[float]] | None = None, labels: Sequence[int] | None = None,
                mask: torch.Tensor | None = None, multimask: bool = False) -> dict:
        """Masks for one image (or its :meth:`embed`) and one prompt set given in the image's pixels: ``box`` (x0, y0, x1, y1),
        ``points`` [(x, y), ...] with ``labels`` (1 foreground, 0 background; default all 1), ``mask`` a previous
        round's low-resolution logits. Returns ``masks`` (M, H, W) bool at the image's size, ``iou`` (M,),
        ``logits`` (M, 4g, 4g) for a next round; M = 3 with ``multimask``, else 1."""
        if box is None and not points and mask is None:
            raise ValueError("a prompt is needed: a box, points or a previous mask")
        embedded = image if isinstance(image, ImageEmbedding) else self.embed(image)
        size, resized = embedded.size, embedded.resized
        device = next(self.parameters()).device
        boxes = pts = None
        if box is not None:
            boxes = torch.as_tensor(self.to_model_frame(np.asarray(box, float).reshape(2, 2), size).reshape(1, 4),
                                    dtype=torch.float32, device=device)
        if points:
            coords = torch.as_tensor(self.to_model_frame(np.asarray(points, float), size), dtype=torch.float32,
                                     device=device)[None]
            lab = torch.as_tensor(labels if labels is not None else [1] * len(points), dtype=torch.int, device=device)
            pts = (coords, lab[None])
        with evaluating(self):
            logits, iou = self.decode(embedded.embedding, pts, boxes, None if mask is None else mask.to(device)[None],
                                      multimask)
        return {"masks": self.to_input(logits, size, resized)[0].cpu(), "iou": iou[0].cpu(), "logits": logits[0].cpu()}

    # ------------------------------------------------------------------ artifact
    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "PromptableSAM":
        h = spec["head"]
        model = cls(build_task_encoder(spec, pretrained), **{k: h[k] for k in SAM_HEAD_KEYS if k in h})
        for part in h.get("frozen", ()):  # what a fine-tuning recipe kept frozen (MedSAM: the prompt encoder)
            getattr(model, part).requires_grad_(False)
        model.spec = spec
        return model


SAM_HEAD_KEYS = ("image_size", "prompt_dim", "resize", "decoder_depth", "decoder_mlp_dim", "decoder_heads",
                 "iou_hidden", "mask_in_chans")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """A grey or colour image of any range as 0..255 (min-max), the form SAM's predictor takes."""
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    return np.round((image - lo) / max(hi - lo, 1e-8) * 255).astype(np.uint8)


def sam_parts(state_dict: dict) -> tuple[dict, dict]:
    """A SAM state dict's ``prompt_encoder.*`` and ``mask_decoder.*`` weights (as the model names them) and the
    decoder sizes they imply (:class:`PromptableSAM`'s arguments); empty when the checkpoint has none."""
    sd = {k: v for k, v in state_dict.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    if not sd:
        return {}, {}
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("mask_decoder.transformer.layers.")}
    args = dict(prompt_dim=2 * sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].shape[1],
                decoder_depth=len(layers), decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
                iou_hidden=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
                mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0])
    return sd, args


def sam_resize(source: str | os.PathLike, resize: str | None = None, adapters: bool = False) -> str:
    """The input convention of a SAM-layout checkpoint: ``resize`` when given, else ``square`` for a file or
    folder whose name says MedSAM (MedSAM, LiteMedSAM: [0, 1] inputs resized square), ``square_norm`` for one
    that says SAM-Med2D or holds its ``adapters``, and ``longest`` (SAM's ``SamPredictor``) for any other."""
    if resize is not None:
        if resize not in RESIZE:
            raise ValueError(f"resize={resize!r}: one of {', '.join(RESIZE)}")
        return resize
    name = Path(str(source)).name.lower().replace("-", "_")
    if "medsam" in name:
        return "square"
    return "square_norm" if adapters or "sam_med2d" in name or "sammed" in name else "longest"


def convert_sam(source: str | os.PathLike, resize: str | None = None) -> PromptableSAM:
    """A SAM / MedSAM checkpoint (flat, ``{"model": ...}`` or ``module.``-prefixed keys) as a whole
    :class:`PromptableSAM`: its image encoder through medfm's ``sam`` format, its prompt encoder and mask
    decoder loaded as saved; the input convention from ``resize`` or the file's name (:func:`sam_resize`),
    recorded in the model's spec. A checkpoint without a prompt encoder and mask decoder is an error in one line
    (an image encoder alone fine-tunes under ``--encoder``)."""
    from medfm.data import Preprocess
    from medfm.encoders.registry import encoder_entrypoint
    from medfm.encoders.formats import convert_checkpoint, identify, open_checkpoint
    from medfm.encoders.weights import load_pretrained

    ckpt = open_checkpoint(source)  # read once: the image encoder converts from it, the decoder loads from it
    fmt = identify(ckpt)
    if fmt is None or fmt.name != "sam":
        raise ValueError(f"{source}: not a SAM / MedSAM checkpoint (image_encoder.*, prompt_encoder.*, mask_decoder.* "
                         f"keys){'; it is ' + fmt.name if fmt else ''}")
    flat = {k.removeprefix("module.").removeprefix("sam."): v for k, v in ckpt.state_dict.items()}
    parts, head = sam_parts(flat)
    if not parts:
        raise ValueError(f"{source}: an image encoder only (no prompt_encoder.* / mask_decoder.* weights): use it as "
                         "an encoder (--encoder), or give the whole SAM checkpoint")
    converted = convert_checkpoint(ckpt)
    arch = dict(converted.args)
    mode = sam_resize(source, resize, arch.get("adapters", False))
    size = arch["sam_img_size"]
    if mode == "square":  # MedSAM: [0, 1] into the encoder as is (no pixel mean / std)
        arch["input_norm"] = None
    encoder_section = {"name": "sam_vit", "spatial_dims": 2, "in_chans": 3, "img_size": size, **arch}
    encoder = load_pretrained(encoder_entrypoint("sam_vit")(**{k: v for k, v in encoder_section.items() if k != "name"}),
                              str(source), converted)
    model = PromptableSAM(encoder, image_size=size, resize=mode, **head)
    missing, _ = model.load_state_dict(parts, strict=False)
    left = [k for k in missing if k.startswith(("prompt_encoder.", "mask_decoder."))]
    if left:
        raise ValueError(f"{source}: the SAM checkpoint lacks {len(left)} decoder weights, e.g. {left[:3]}")
    model.spec = {"task": "promptable", "encoder": {**encoder_section, "pretrained": None}, "method": "full",
                  "head": {"image_size": size, "resize": mode, **head},
                  "preprocess": Preprocess("radiograph_2d", size).record(), "converted_from": str(source)}
    return model


def write_sam(source: str | os.PathLike, out: str | os.PathLike, resize: str | None = None) -> Path:
    """``medfm models convert SAM.pth --out DIR``: the whole SAM as ``DIR/model`` (``medfm segment --model DIR``)
    beside its image encoder as ``DIR/encoder`` (``--encoder DIR`` for the automatic segmenters). Returns ``out``."""
    from medfm.run import RunFolder

    model = convert_sam(source, resize)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty (choose a new --out)")
    folder = RunFolder(out)
    folder.save(model, "model")
    encoder = model.encoder
    encoder.preprocess = model.spec["preprocess"]
    folder.save(encoder, "encoder")
    folder.write_info(kind="pretrain", plugin="converted", model="model", converted_from=str(source),
                      resize=model.resize)
    return out


def is_whole_sam(source: str | os.PathLike) -> bool:
    """Whether ``source`` is a SAM-layout checkpoint with its prompt encoder and mask decoder (a whole SAM)."""
    from medfm.encoders.formats import identify, is_public, open_checkpoint

    if not is_public(source):
        return False
    ckpt = open_checkpoint(source)
    fmt = identify(ckpt)
    return fmt is not None and fmt.name == "sam" and any(
        k.removeprefix("module.").removeprefix("sam.").startswith("mask_decoder.") for k in ckpt.state_dict)


def load_promptable(source: str | os.PathLike, resize: str | None = None) -> PromptableSAM | PromptableVolume:
    """A promptable model from a converted folder or run (``DIR`` or ``DIR/model``: a SAM-layout model, or a native
    3D one from tasks/promptable_3d.yaml) or a SAM / MedSAM checkpoint (converted on the fly: :func:`convert_sam`)."""
    from medfm.artifacts import load

    path = Path(str(source))
    for folder in (path / "model", path):
        if (folder / "config.json").is_file():
            model = load(folder)
            if not isinstance(model, (PromptableSAM, PromptableVolume)):
                raise ValueError(f"{folder}: a {type(model).__name__}, not a promptable model (a converted SAM / "
                                 "MedSAM: medfm models convert SAM.pth --out DIR)")
            return model
    return convert_sam(source, resize)


def propagate(model: PromptableSAM, volume: np.ndarray, index: int, box: Sequence[float] | None = None,
              points: Sequence[Sequence[float]] | None = None, labels: Sequence[int] | None = None,
              margin: int = 2) -> np.ndarray:
    """A 3D object from a prompt on one slice, slice by slice (MedSAM's and LiteMedSAM's 3D inference).

    ``volume`` (I, J, K) in its voxel order; slices run along K, slice ``k`` shown as ``volume[:, :, k].T`` (x = I
    across, y = J down: how SimpleITK and ITK-SNAP index an axial slice), so ``box`` (x0, y0, x1, y1) and ``points``
    are voxel indices (i, j) on slice ``index``. The prompted slice is segmented first; then each next slice, up and
    down, is prompted with the box of its neighbour's mask widened by ``margin`` voxels, until a slice comes out
    empty or the volume ends. Returns the (I, J, K) boolean mask."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"propagation takes a 3D volume, got shape {volume.shape}")
    if not 0 <= index < volume.shape[2]:
        raise ValueError(f"slice {index} is outside the volume's {volume.shape[2]} slices (0..{volume.shape[2] - 1})")
    out = np.zeros(volume.shape, bool)

    def segment(k: int, **prompt) -> np.ndarray:
        return model.predict(volume[:, :, k].T, **prompt)["masks"][0].numpy().T

    first = out[:, :, index] = segment(index, box=box, points=points, labels=labels)
    for step in (1, -1):
        previous, k = first, index + step
        while 0 <= k < volume.shape[2] and previous.any():
            x0, y0, x1, y1 = box_from_mask(previous.T)
            h, w = previous.T.shape
            widened = [max(0, x0 - margin), max(0, y0 - margin), min(w - 1, x1 + margin), min(h - 1, y1 + margin)]
            previous = out[:, :, k] = segment(k, box=widened)
            k += step
    return out


def segment_file(model: PromptableSAM, image: str | os.PathLike, out: str | os.PathLike,
                 box: Sequence[float] | None = None, points: Sequence[Sequence[float]] | None = None,
                 labels: Sequence[int] | None = None, multimask: bool = False, index: int | None = None) -> dict:
    """``medfm segment``: the image file read, segmented from the prompts (in its pixels), and the mask with the
    highest predicted IoU written as a 0 / 255 PNG at the image's size. A NIfTI volume (``.nii``, ``.nii.gz``) is
    segmented from the prompts on slice ``index`` by :func:`propagate` and written as a 0 / 1 NIfTI with the input's
    affine (its geometry and orientation). Returns :meth:`PromptableSAM.predict`'s result with ``best`` (the mask
    written) and ``mask`` (H, W), or for a volume ``mask`` (I, J, K)."""
    from PIL import Image

    name = str(image).lower()
    if name.endswith((".nii", ".nii.gz")):
        from medfm.data.nifti import read_nifti
        from medfm.data.writers import write_nifti

        if index is None:
            raise ValueError(f"{image}: a volume needs the slice the prompt is on (--slice K)")
        if not str(out).lower().endswith((".nii", ".nii.gz")):
            raise ValueError(f"--out {out}: a volume's mask is written as NIfTI (mask.nii.gz)")
        data, affine = read_nifti(image)  # (C, I, J, K) in the file's voxel order; a damaged file names itself
        if data.ndim != 4 or data.shape[0] != 1:
            raise ValueError(f"{image}: a one-channel 3D volume is segmented slice by slice; it holds "
                             f"{tuple(data.shape[1:])} voxels in {data.shape[0]} channel(s)")
        mask = propagate(model, data[0], index, box=box, points=points, labels=labels)
        write_nifti(mask.astype(np.uint8), out, affine)
        return {"mask": mask, "slices": [int(k) for k in np.nonzero(mask.any((0, 1)))[0]]}
    pixels = np.asarray(Image.open(image))
    res = model.predict(pixels, box=box, points=points, labels=labels, multimask=multimask)
    best = int(res["iou"].argmax())
    mask = res["masks"][best].numpy()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((mask * 255).astype(np.uint8)).save(out)
    return {**res, "best": best, "mask": mask}
