"""MONAI dict-transform presets for 2D radiographs and 3D CT / MR.

Each preset is a ``monai.transforms.Compose`` over the keys ``image`` and, when
present, ``mask`` (resampled with nearest neighbour). The deterministic steps
come first, so a dataset built with ``cache=True`` keeps them in memory and only
the random crops and augmentations run every epoch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    Randomizable,
    RandCropByPosNegLabeld,
    RandSpatialCropd,
    Resized,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import ensure_tuple_rep

KEYS = ("image", "mask")


class ForegroundCropd(Randomizable, MapTransform):
    """nnU-Net's foreground oversampling: with probability ``foreground`` the patch is centred on a random
    foreground voxel of ``mask`` (MONAI's ``RandCropByPosNegLabeld``), otherwise it is a random patch
    (``RandSpatialCropd``), so that small structures are seen in about that share of the batches."""

    def __init__(self, keys, size, foreground: float, label_key: str = "mask"):
        super().__init__(keys, allow_missing_keys=True)
        self.foreground, self.label_key = float(foreground), label_key
        self.on_label = RandCropByPosNegLabeld(keys, label_key=label_key, spatial_size=size, pos=1.0, neg=0.0,
                                               num_samples=1, allow_missing_keys=True)
        self.anywhere = RandSpatialCropd(keys, roi_size=size, random_size=False, allow_missing_keys=True)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.on_label.set_random_state(seed, state)
        self.anywhere.set_random_state(seed, state)
        return self

    def randomize(self, data=None) -> None:
        self._centre = self.R.rand() < self.foreground

    def __call__(self, data: dict) -> dict:
        self.randomize()
        if self._centre and self.label_key in data and bool((data[self.label_key] > 0).any()):
            return self.on_label(data)[0]
        return self.anywhere(data)


def _crop(size: tuple[int, ...], train: bool, foreground: float = 0.0) -> list:
    pad = SpatialPadd(KEYS, spatial_size=size, allow_missing_keys=True)
    if train and foreground:
        return [pad, ForegroundCropd(KEYS, size, foreground)]
    if train:
        return [pad, RandSpatialCropd(KEYS, roi_size=size, random_size=False, allow_missing_keys=True)]
    return [pad, CenterSpatialCropd(KEYS, roi_size=size, allow_missing_keys=True)]


AUGMENTATIONS = (None, "nnunet")


def nnunet_augmentation(dims: int) -> list:
    """nnU-Net's training augmentation built from MONAI transforms, with its probabilities: rotation (±30°) and
    scaling (0.7-1.4) p 0.2, Gaussian noise p 0.1, Gaussian blur p 0.2, brightness (x0.75-1.25) p 0.15, contrast
    around the mean p 0.15, low resolution (down to 0.5x, then back) p 0.25, gamma (0.7-1.5) p 0.3, and mirroring
    along each axis p 0.5. Applied to the training patch after it is cropped (nnU-Net transforms a larger region
    first, so its rotated corners hold image, here zeros)."""
    interp = ("bilinear", "nearest")
    return [
        RandAffined(KEYS, prob=0.2, rotate_range=(0.52,) * (3 if dims == 3 else 1), scale_range=(0.3,) * dims,
                    mode=interp, padding_mode="zeros", allow_missing_keys=True),
        RandGaussianNoised("image", prob=0.1, std=0.1),
        RandGaussianSmoothd("image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandScaleIntensityd("image", factors=0.25, prob=0.15),
        RandScaleIntensityFixedMeand("image", factors=0.25, preserve_range=True, prob=0.15),
        RandSimulateLowResolutiond("image", prob=0.25, zoom_range=(0.5, 1.0),
                                   upsample_mode="trilinear" if dims == 3 else "bilinear"),
        RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)),
        *[RandFlipd(KEYS, prob=0.5, spatial_axis=a, allow_missing_keys=True) for a in range(dims)],
    ]


def _check_augment(augment: str | None) -> None:
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.preset_args.augment={augment!r}: null (the preset's own) or nnunet")


def zscore(clip: Sequence[float] | None = None, mean: float | None = None, std: float | None = None) -> list:
    """nnU-Net's normalisation: per image (each channel to mean 0, std 1: MR and other unitless images) or, with
    the data set's foreground statistics (CT), clipped to ``clip`` and scaled by that ``mean`` / ``std``. A list
    of steps (not a Compose, which the datasets would take for a random step and not cache)."""
    steps = []
    if clip is not None:
        steps.append(ScaleIntensityRanged("image", a_min=clip[0], a_max=clip[1], b_min=clip[0], b_max=clip[1], clip=True))
    if mean is None:
        steps.append(NormalizeIntensityd("image", channel_wise=True))
    else:
        steps.append(NormalizeIntensityd("image", subtrahend=mean, divisor=std))
    return steps


NORMALIZATIONS = (None, "percentile", "zscore")


def _check_normalize(normalize: str | None) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"data.preset_args.normalize={normalize!r}: percentile (the default) or zscore")


def radiograph_2d(size: int | Sequence[int] | None = 224, train: bool = False, percentiles=(0.5, 99.5),
                  normalize: str | None = None, augment: str | None = None) -> Compose:
    """Chest X-ray and other 2D images: percentile scaling to [0, 1] (``normalize="zscore"``: each image to mean 0,
    std 1, as nnU-Net plans for unitless images), resize to ``size``; in training a mild random affine (±5°,
    ±10 % scale; no flips: anatomy is lateralised); ``augment="nnunet"``: nnU-Net's set instead
    (:func:`nnunet_augmentation`, mirroring included).

    ``size=None`` keeps the image size (pretraining views crop and resize later)."""
    _check_normalize(normalize)
    _check_augment(augment)
    steps = zscore() if normalize == "zscore" else [
        ScaleIntensityRangePercentilesd("image", lower=percentiles[0], upper=percentiles[1], b_min=0.0, b_max=1.0, clip=True)]
    if size is not None:
        size = ensure_tuple_rep(size, 2)
        steps += [
            Resized("image", spatial_size=size, mode="area"),
            Resized("mask", spatial_size=size, mode="nearest", allow_missing_keys=True),
        ]
    if train and augment == "nnunet":
        steps += nnunet_augmentation(2)
    elif train:
        steps.append(
            RandAffined(KEYS, prob=0.5, rotate_range=0.087, scale_range=0.1, mode=("bilinear", "nearest"),
                        padding_mode="zeros", allow_missing_keys=True)
        )
    return Compose(steps)


def _volume(size, spacing, intensity, train: bool, foreground: float = 0.0, augment: str | None = None) -> Compose:
    spacing = ensure_tuple_rep(spacing, 3)
    steps = [
        Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        Spacingd(KEYS, pixdim=spacing, mode=("bilinear", "nearest"), allow_missing_keys=True),
        *intensity,
    ]
    # size=None: the whole resampled volume (pretraining views crop later)
    _check_augment(augment)
    extra = nnunet_augmentation(3) if train and augment == "nnunet" else []
    return Compose(steps if size is None else steps + _crop(ensure_tuple_rep(size, 3), train, foreground) + extra)


def ct_3d(
    size: int | Sequence[int] | None = 96,
    spacing: float | Sequence[float] = 1.5,
    window: tuple[float, float] = (-1000.0, 1000.0),
    train: bool = False,
    zscore_stats: Sequence[float] | None = None,
    foreground: float = 0.0,
    augment: str | None = None,
) -> Compose:
    """CT volumes: RAS orientation, resampling to ``spacing`` mm, a HU window scaled to [0, 1] (with
    ``zscore_stats=(mean, std)``, nnU-Net's: clipped to the window, then the data set's foreground mean and std),
    pad and crop to ``size`` (random crop in training, a share ``foreground`` of them centred on the mask's
    foreground; centre crop otherwise; ``None``: no crop); ``augment="nnunet"``: nnU-Net's augmentation of the
    training patches (:func:`nnunet_augmentation`)."""
    if zscore_stats is not None:
        intensity = zscore(window, *zscore_stats)
    else:
        intensity = [ScaleIntensityRanged("image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)]
    return _volume(size, spacing, intensity, train, foreground, augment)


def mr_3d(
    size: int | Sequence[int] | None = 96,
    spacing: float | Sequence[float] = 1.0,
    percentiles: tuple[float, float] = (0.5, 99.5),
    train: bool = False,
    normalize: str | None = None,
    foreground: float = 0.0,
    augment: str | None = None,
) -> Compose:
    """MR volumes: like :func:`ct_3d`, but intensities are scaled by percentiles (MR has no absolute units), or
    with ``normalize="zscore"`` each volume to mean 0, std 1 (nnU-Net's MR normalisation)."""
    _check_normalize(normalize)
    if normalize == "zscore":
        intensity = zscore()
    else:
        intensity = [ScaleIntensityRangePercentilesd(
            "image", lower=percentiles[0], upper=percentiles[1], b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )]
    return _volume(size, spacing, intensity, train, foreground, augment)


class MatchChannels:
    """Deterministic first step: an image's channels made ``channels`` (what the encoder takes): colour -> the
    mean of its channels for a 1-channel encoder, grey repeated for a 3-channel one. Sets that mix greyscale
    and colour files (VQA-RAD: 10 of 315 images carry colour annotations) then batch together."""

    def __init__(self, channels: int):
        self.channels = int(channels)

    def __call__(self, sample: dict) -> dict:
        x, c = sample["image"], sample["image"].shape[0]
        if c == self.channels:
            return sample
        lib = np if isinstance(x, np.ndarray) else torch
        keep = {"keepdims": True} if lib is np else {"keepdim": True}
        if self.channels == 1:
            x = x.mean(0, **keep)
        elif c == 1:
            x = lib.concatenate([x] * self.channels, 0) if lib is np else torch.cat([x] * self.channels, 0)
        else:
            raise ValueError(f"an image with {c} channels cannot be made {self.channels} channels")
        return {**sample, "image": x}


def with_channels(transform: Compose, channels: int) -> Compose:
    """A preset's steps preceded by :class:`MatchChannels` (one Compose: datasets split it at its first random step)."""
    return Compose([MatchChannels(channels), *transform.transforms])


PRESETS = {"radiograph_2d": radiograph_2d, "ct_3d": ct_3d, "mr_3d": mr_3d}
PRESET_DIMS = {"radiograph_2d": 2, "ct_3d": 3, "mr_3d": 3}  # the spatial dimensions each preset is for


def preset_mismatch(preset: str, dims: int) -> str | None:
    """None when ``preset`` is for ``dims``-D inputs (or is not one of :data:`PRESETS`); otherwise what to say:
    ``"preset ct_3d is for 3D inputs (use radiograph_2d)"``."""
    want = PRESET_DIMS.get(preset, dims)
    if want == dims:
        return None
    return f"preset {preset} is for {want}D inputs (use {'radiograph_2d' if dims == 2 else 'ct_3d or mr_3d'})"
