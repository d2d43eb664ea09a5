"""Native 3D promptable segmentation: clicks in a volume -> the object's 3D mask (SAM-Med3D's and VISTA3D's way,
where the encoder is 3D; a 2D model segments volumes slice by slice instead: :func:`medfm.heads.promptable.propagate`).

A medfm 3D encoder under medfm's U-Net decoder (:class:`~medfm.heads.segmentation.SegmentationModel`, with
``feature_dim`` output channels instead of classes) gives a full-resolution feature map; MONAI's VISTA3D point
head (``monai.networks.nets.vista3d.PointMappingSAM``: SAM's two-way transformer between the click tokens and the
features at half resolution, random Fourier positions of the clicks, a hypernetwork mask token) turns each set
of clicks into mask logits at the input's size. Clicks are voxel indices (i, j, k) of the tensor the model
reads, with labels 1 (object), 0 (background) and -1 (padding: no click).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets.vista3d import PointMappingSAM
from monai.transforms import ResampleToMatch

from medfm.data.preprocess import Preprocess
from medfm.data.volume import plain_tensor
from medfm.data.writers import write_nifti
from medfm.run import evaluating

from .segmentation import SegmentationModel
from .task_model import TaskModel, build_task_encoder


class VolumeEmbedding:
    """A volume encoded once (:meth:`PromptableVolume.embed`): the ``features`` of the region the model read,
    where it ``start``s and its size (``region``), and the whole volume's ``size``."""

    def __init__(self, features: torch.Tensor, start: tuple, region: tuple, size: tuple):
        self.features, self.start, self.region, self.size = features, start, region, size


class PromptableVolume(TaskModel, nn.Module):
    """(B, C, I, J, K) volumes and one click set per volume -> (B, 1, I, J, K) mask logits.

    ``feature_dim``: the width of the feature map the point head reads (a multiple of 8: its attention halves it
    over 4 heads); ``decoder_width``: the U-Net decoder's first-level width; ``max_prompt``: click sets decoded
    at once; ``patch``: the training patch (I, J, K), the region read around a first click at inference."""

    def __init__(self, encoder: nn.Module, feature_dim: int = 32, decoder_width: int = 16, max_prompt: int = 16,
                 patch: Sequence[int] | None = None):
        super().__init__()
        self.patch = tuple(int(p) for p in patch) if patch is not None else None
        if encoder.spatial_dims != 3:
            raise ValueError("PromptableVolume takes a 3D encoder (a 2D one segments volumes by propagation)")
        if feature_dim % 8:
            raise ValueError(f"feature_dim {feature_dim}: a multiple of 8 (the point head's attention: 4 heads of "
                             "half the width)")
        self.body = SegmentationModel(encoder, feature_dim, decoder_width)
        # n_classes=1: the class embeddings VISTA3D keeps for its class prompts are not used by click prompts
        self.point_head = PointMappingSAM(feature_size=feature_dim, max_prompt=max_prompt, n_classes=1,
                                          last_supported=1)

    @property
    def encoder(self) -> nn.Module:
        return self.body.encoder

    @property
    def multiple(self) -> int:
        """What every side of an input must be divisible by: the body's stride, and even for the point head."""
        return int(np.lcm(self.body.stride, 2))

    def features(self, volumes: torch.Tensor) -> torch.Tensor:
        """The (B, feature_dim, I, J, K) map the point head reads."""
        return self.body(volumes)

    def decode(self, features: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mask logits (P, 1, I, J, K) for one volume's features (1, F, I, J, K) and P click sets ((P, N, 3) voxel
        indices, (P, N) labels; -1 pads)."""
        return self.point_head(features, points.float(), labels)

    def forward(self, volumes: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Batched training form: one click set per volume ((B, N, 3), (B, N)) -> (B, 1, I, J, K) logits."""
        feats = self.features(volumes)
        return torch.cat([self.decode(feats[b:b + 1], points[b:b + 1], labels[b:b + 1]) for b in range(len(volumes))])

    @torch.no_grad()
    def embed(self, volume: torch.Tensor, centre: Sequence[float] | None = None) -> "VolumeEmbedding":
        """One prepared volume (C, I, J, K) (the spec's preprocessing applied) encoded once for several click
        rounds. With ``centre`` (the first click) and a training ``patch``, the model reads the patch of that size
        centred there (inside the volume), as it was trained on patches around its objects (SAM-Med3D crops around
        the prompt the same way); otherwise the whole volume. The region is padded to :attr:`multiple`."""
        size = tuple(volume.shape[1:])
        start, region = (0, 0, 0), size
        if centre is not None and self.patch is not None:
            region = tuple(min(p, s) for p, s in zip(self.patch, size))
            start = tuple(int(np.clip(round(c) - r // 2, 0, s - r)) for c, r, s in zip(centre, region, size))
        x = volume[(slice(None), *(slice(a, a + r) for a, r in zip(start, region)))][None].float()
        pad = [(-r) % self.multiple for r in region]
        x = F.pad(x, [p for s in reversed(pad) for p in (0, s)])  # z-scored volumes: 0 is their mean
        with evaluating(self):
            return VolumeEmbedding(self.features(x.to(next(self.parameters()).device)), start, region, size)

    @torch.no_grad()
    def predict(self, embedded: "VolumeEmbedding", points: Sequence[Sequence[float]],
                labels: Sequence[int] | None = None) -> dict:
        """The mask for clicks ``points`` [(i, j, k), ...] (``labels``: 1 object, 0 background; default all 1) on
        a volume :meth:`embed` prepared: ``mask`` (I, J, K) bool and ``logits`` at the volume's size (outside the
        region the model read: background). Clicks outside that region are left out."""
        if not points:
            raise ValueError("a click is needed: points [(i, j, k), ...]")
        e = embedded
        labels = list(labels) if labels is not None else [1] * len(points)
        local = np.asarray(points, dtype=np.float32) - np.asarray(e.start, dtype=np.float32)
        inside = np.all((local >= 0) & (local < np.asarray(e.region)), axis=1)
        if not inside.any():
            raise ValueError(f"no click {list(map(list, points))} lies in the region the model read (from {e.start}, "
                             f"{e.region} voxels): embed with the first click as its centre")
        device = e.features.device
        pts = torch.as_tensor(local[inside][None], device=device)
        lab = torch.as_tensor([[lab for lab, ok in zip(labels, inside) if ok]], dtype=torch.long, device=device)
        with evaluating(self):
            region = self.decode(e.features, pts, lab)[0, 0][tuple(slice(0, r) for r in e.region)].cpu()
        logits = torch.full(e.size, -20.0)
        logits[tuple(slice(a, a + r) for a, r in zip(e.start, e.region))] = region
        return {"mask": logits > 0, "logits": logits}

    @classmethod
    def from_spec(cls, spec: dict, pretrained: bool = True, folder: Path | None = None) -> "PromptableVolume":
        h = spec["head"]
        model = cls(build_task_encoder(spec, pretrained), h["feature_dim"], h["decoder_width"], h.get("max_prompt", 16),
                    h.get("patch"))
        model.spec = spec
        return model


def segment_volume(model: PromptableVolume, volume: str | os.PathLike, out: str | os.PathLike,
                   points: Sequence[Sequence[float]], labels: Sequence[int] | None = None) -> dict:
    """``medfm segment --model RUN volume.nii.gz --point i,j,k``: the volume read and prepared as the model's run
    prepared its data (orientation, spacing, intensity: the spec's preprocessing), the clicks (voxel indices of
    the input file) carried through the world coordinates into the model's grid, and the mask resampled back to
    the input's voxel grid (MONAI's ``ResampleToMatch`` of the logits) and written as 0 / 1 NIfTI with the input's
    affine. Returns ``mask`` (I, J, K) in the input's voxel order and ``model_points`` (the clicks in the model's
    grid)."""
    if not str(out).lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"--out {out}: a volume's mask is written as NIfTI (mask.nii.gz)")
    raw, image = Preprocess.read(model.spec["preprocess"]).read_file(volume, model.spec["encoder"]["in_chans"])
    size = tuple(raw["image"].shape[1:])
    for p in points:
        if len(p) != 3 or not all(0 <= v < n for v, n in zip(p, size)):
            raise ValueError(f"{volume}: the click {list(p)} is not a voxel index (i, j, k) inside its {size} voxels")
    src = np.asarray(raw["image"].affine, dtype=np.float64)
    dst = np.asarray(image.affine, dtype=np.float64)
    homogeneous = np.c_[np.asarray(points, dtype=np.float64), np.ones(len(points))]
    model_points = (np.linalg.solve(dst, src @ homogeneous.T).T[:, :3]).round().clip(0, np.array(image.shape[1:]) - 1)
    res = model.predict(model.embed(plain_tensor(image), centre=model_points[0]), model_points.tolist(), labels)
    back = ResampleToMatch(mode="bilinear", padding_mode="border")(MetaTensor(res["logits"][None].float(),
                                                                              affine=image.affine), img_dst=raw["image"])
    mask = (plain_tensor(back)[0] > 0).numpy()
    write_nifti(mask.astype(np.uint8), out, raw["meta"]["affine"])
    return {"mask": mask, "model_points": model_points}
