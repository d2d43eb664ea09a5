"""Pairs of images that are the same or nearly the same: exact pixel copies, perceptual-hash neighbours and
embedding neighbours.

* exact: the same pixel array (SHA-1 of its bytes and shape), whatever the file;
* pixels: perceptual hashes (imagehash's pHash, 64 bits, of the middle slice for a volume) within
  ``hash_distance`` bits, confirmed by a pixel correlation of at least ``PIXEL_CORRELATION`` between the two
  images at 32 x 32: survives resizing, re-compression and small intensity changes. The hash alone calls
  any two axial slices of one brain within 15 mm alike at 64 px; the correlation keeps the closest of them;
* crop: a centre-cropped square copy of a full frame (MedMNIST's preprocessing against the same film resized
  whole): a central crop of one image, at the aspect ratio of the original, correlates with the other at
  ``CROP_CORRELATION`` at 24 px, confirmed at ``CROP_CONFIRM`` at the smaller image's resolution (:func:`crop_pairs`,
  :func:`crop_confirmed`; pretraining mixtures run it between sources and evaluation sets);
* embedding: cosine similarity of centred, l2-normalised embeddings at or above ``cosine``, with a pixel
  correlation of at least ``LOOKALIKE_CORRELATION``: a copy the hash misses (noise, a different window). Below
  that correlation an embedding neighbour is a look-alike, not a copy: on PneumoniaMNIST all 10 pairs of
  different children's X-rays a random-init ViT put at cosine 0.995+ correlate 0.49-0.95.

Every function takes and returns positions in one flat list of items, so the caller can say which split
and row each one is."""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

from .strategies import normalise as centred  # embeddings minus their mean, l2-normalised

HASH_DISTANCE = 6  # pHash bits of 64. BUSI (benchmarks/RESULTS.md): 98 of its 136 marked near-duplicate pairs
# lie within 6 bits and none of the 1.8M unmarked pairs of breast_us does; 2 unmarked pairs at 8 bits
PIXEL_CORRELATION = 0.98  # 91 of BUSI's 98 marked pairs within 6 bits keep it
LOOKALIKE_CORRELATION = 0.96
THUMB = 32
COSINE = 0.995  # centred embeddings of a random-init ViT-Tiny/8 at 64 px. breast_us: 21 of BUSI's 136 marked pairs
# and no unmarked one (at 0.98: 37 and none); PneumoniaMNIST: 0.98 called 1,435 pairs of different children's
# chest X-rays alike (10 of 10 looked at were not copies), 0.995 about 37, most of them identical pixels.
# A pretrained encoder separates images better: pass a lower --cosine with one


def pixel_array(image) -> np.ndarray:
    """A 2D float array to hash: channels averaged, the middle slice of a volume's last axis."""
    a = np.asarray(image, dtype=np.float32)
    while a.ndim > 2:
        a = a.mean(0) if a.ndim == 3 and a.shape[0] <= 4 else a[..., a.shape[-1] // 2]
    return a


def exact_key(image) -> str:
    a = np.ascontiguousarray(np.asarray(image, dtype=np.float32))
    return hashlib.sha1(a.tobytes() + str(a.shape).encode()).hexdigest()


def as_uint8(image) -> np.ndarray:
    """The 2D array of :func:`pixel_array` scaled to 0-255 between its 0.5 and 99.5 percentiles."""
    a = pixel_array(image)
    lo, hi = np.percentile(a, [0.5, 99.5]) if a.size > 1 else (0.0, 1.0)
    return (np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1) * 255).astype(np.uint8)


def perceptual_hash(image) -> int:
    """pHash (imagehash) of the image scaled to 0-255, as a 64-bit integer."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(as_uint8(image))).hash.ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def thumbnail_vector(image, size: int = THUMB) -> np.ndarray:
    """The image at ``size`` x ``size``, centred and l2-normalised: dot products are pixel correlations."""
    from PIL import Image

    t = np.asarray(Image.fromarray(as_uint8(image)).resize((size, size), Image.BILINEAR), dtype=np.float32).ravel()
    t = t - t.mean()
    return t / (np.linalg.norm(t) + 1e-8)


CROP_RATIOS = tuple(np.round(np.arange(1.1, 2.0, 0.1), 1))  # aspect ratios of the original a square crop came from
CROP_CORRELATION = 0.96  # at 24 px. PneumoniaMNIST val against the 224 px pediatric chest X-rays
# (benchmarks/RESULTS.md): copies found at 0.97-0.995, the best crop of a different child's film at 0.93 or below ...
CROP_CONFIRM = 0.95  # ... confirmed at the smaller image's own resolution (up to 64 px). On the shipped mixture: 478
# of PneumoniaMNIST's 524 val films found in the pediatric set (at 0.96: 461; about 472 expected), and 103 LGG
# training slices called copies of other patients' validation slices (at 0.96: 41): look-alikes, not copies. A
# false call drops a training image; a missed one leaks an evaluation image
CROP_THUMB = 24
CONFIRM_MAX = 64


def _crops(a: np.ndarray, ratios=CROP_RATIOS) -> list[np.ndarray]:
    """The central crops of a 2D array that a square crop of a wider, then a taller, original becomes once the
    original is squashed to this array's shape, for each aspect ratio."""
    h, w = a.shape
    out = []
    for r in ratios:
        cw, ch = int(round(w / r)), int(round(h / r))
        out += [a[:, (w - cw) // 2:(w - cw) // 2 + cw], a[(h - ch) // 2:(h - ch) // 2 + ch]]
    return out


def _vector(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    small = Image.fromarray(np.ascontiguousarray(a)).resize((size, size), Image.BILINEAR)
    t = np.asarray(small, dtype=np.float32).ravel()
    t = t - t.mean()
    return t / (np.linalg.norm(t) + 1e-8)


def crop_thumbnails(image, ratios=CROP_RATIOS, size: int = CROP_THUMB) -> np.ndarray:
    """(2 x len(ratios), size^2): centred, l2-normalised thumbnails of the image's central crops (:func:`_crops`):
    what a copy made by centre-cropping to a square then resizing (MedMNIST) looks like in a full frame."""
    return np.stack([_vector(c, size) for c in _crops(as_uint8(image), ratios)])


def confirm_array(image) -> np.ndarray:
    """The image as uint8, its longer side at most :data:`CONFIRM_MAX` (what a crop match is confirmed on)."""
    from PIL import Image

    a = as_uint8(image)
    scale = CONFIRM_MAX / max(a.shape)
    if scale < 1:
        a = np.asarray(Image.fromarray(a).resize((max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale))),
                                                 Image.BILINEAR))
    return a


def crop_pairs(crops: np.ndarray, wholes: np.ndarray, min_correlation: float = CROP_CORRELATION
               ) -> Iterable[tuple[int, int, int]]:
    """(i, j, k) where central crop k of image i (``crops``: (N, C, D) from :func:`crop_thumbnails`) correlates
    with image j whole (``wholes``: (M, D), :func:`thumbnail_vector` at the crops' size) at least
    ``min_correlation``: candidates for "j is a centre-cropped copy of the full frame i"; confirm them with
    :func:`crop_confirmed`."""
    n, c, d = crops.shape
    sim = (crops.reshape(-1, d) @ wholes.T).reshape(n, c, len(wholes))
    best = sim.max(1)
    for i, j in zip(*np.nonzero(best >= min_correlation)):
        yield int(i), int(j), int(sim[i, :, j].argmax())


def crop_confirmed(full: np.ndarray, k: int, copy: np.ndarray, min_correlation: float = CROP_CONFIRM) -> bool:
    """Whether crop ``k`` of ``full`` and ``copy`` (:func:`confirm_array` arrays) correlate ``min_correlation`` at
    the smaller one's resolution."""
    crop = _crops(full)[k]
    size = max(8, min(*crop.shape, *copy.shape))
    return float(_vector(crop, size) @ _vector(copy, size)) >= min_correlation


def exact_pairs(keys: list[str]) -> list[tuple[int, int]]:
    """(i, j), i < j, for every two items with the same key (each to the group's first)."""
    first: dict[str, int] = {}
    pairs = []
    for j, k in enumerate(keys):
        if k in first:
            pairs.append((first[k], j))
        else:
            first[k] = j
    return pairs


def _popcount(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    count = np.zeros(x.shape, np.uint8)
    for shift in range(0, 64, 8):
        count += _BYTE_BITS[((x >> np.uint64(shift)) & np.uint64(255)).astype(np.uint8)]
    return count


_BYTE_BITS = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def hash_pairs(hashes: list[int], max_distance: int = HASH_DISTANCE, chunk: int = 512,
               thumbnails: np.ndarray | None = None, min_correlation: float = PIXEL_CORRELATION
               ) -> Iterable[tuple[int, int, int]]:
    """(i, j, Hamming distance), i < j, for hashes within ``max_distance`` bits (and, given ``thumbnails`` from
    :func:`thumbnail_vector`, a pixel correlation of at least ``min_correlation``)."""
    h = np.array(hashes, dtype=np.uint64)
    for start in range(0, len(h), chunk):
        block = h[start:start + chunk]
        dist = _popcount(block[:, None] ^ h[None, :])
        for a, j in zip(*np.nonzero(dist <= max_distance)):
            i = start + int(a)
            if i < j and (thumbnails is None or float(thumbnails[i] @ thumbnails[j]) >= min_correlation):
                yield i, int(j), int(dist[a, j])


def embedding_pairs(x: np.ndarray, min_cosine: float = COSINE, chunk: int = 1024, thumbnails: np.ndarray | None = None,
                    min_correlation: float = LOOKALIKE_CORRELATION) -> Iterable[tuple[int, int, float]]:
    """(i, j, cosine), i < j, for centred embeddings at least ``min_cosine`` alike (and, given ``thumbnails``,
    pixels correlated at least ``min_correlation``)."""
    z = centred(x)
    for start in range(0, len(z), chunk):
        sim = z[start:start + chunk] @ z.T
        for a, j in zip(*np.nonzero(sim >= min_cosine)):
            i = start + int(a)
            if i < j and (thumbnails is None or float(thumbnails[i] @ thumbnails[j]) >= min_correlation):
                yield i, int(j), float(sim[a, j])
