"""Robustness tests tailored to a specification: the acquisition changes a model must tolerate, each at several
severities, scored against the clean metric with a pass / fail per the spec's tolerance.

A spec (YAML; the shipped ones are in the top-level ``robustness/`` folder: ``cxr``, ``mr``, ``ct``)::

    name: chest X-ray, portable and fixed units
    metric: auroc          # default: the task's headline metric (higher is better)
    tolerance: 0.05        # the largest drop allowed at any listed severity (per family: its own tolerance)
    seed: 0
    perturbations:
      gaussian_noise: {severities: [0.02, 0.05, 0.1]}
      jpeg: {severities: [50, 80], tolerance: 0.02}

Every family acts on the model's input as its preprocessing leaves it (C, H, W) or (C, D, H, W), with
severity 0 the identity and larger severities stronger; the random ones (noise, bias field, spike location)
draw from a generator seeded by the spec's seed and the case's index, so a run is deterministic. MONAI does
the smoothing, bias field and rotation; noise, contrast, gamma, resolution loss, k-space spikes and ghosting,
JPEG and slice thickness are a few lines each here.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from medfm.figures import pyplot, save_figure



def _noise(x, s, g):
    return x + torch.randn(x.shape, generator=g) * s


def _rician(x, s, g):
    """Magnitude of the image plus complex Gaussian noise, around the image's minimum (MR magnitude images)."""
    lo = x.min()
    return torch.sqrt((x - lo + torch.randn(x.shape, generator=g) * s) ** 2
                      + (torch.randn(x.shape, generator=g) * s) ** 2) + lo


def _blur(x, s, g):
    from monai.transforms import GaussianSmooth

    return torch.as_tensor(GaussianSmooth(sigma=s)(x))


def _contrast(x, s, g):
    m = x.mean()
    return m + (x - m) * (1 - s)


def _gamma(x, s, g):
    lo, hi = x.min(), x.max()
    span = (hi - lo).clamp_min(1e-8)
    return lo + span * ((x - lo) / span).clamp(0, 1) ** (1 + s)


def _bias_field(x, s, g):
    from monai.transforms import RandBiasField

    t = RandBiasField(degree=3, coeff_range=(s, s), prob=1.0)
    t.set_random_state(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    return torch.as_tensor(t(x))


def _resolution(x, s, g):
    size = x.shape[1:]
    small = [max(1, round(n / (1 + s))) for n in size]
    mode = "bilinear" if len(size) == 2 else "trilinear"
    y = F.interpolate(x[None].float(), size=small, mode="area")
    return F.interpolate(y, size=list(size), mode=mode, align_corners=False)[0]


def _kspace(x, fn):
    dims = tuple(range(1, x.ndim))
    k = torch.fft.fftn(x.float(), dim=dims)
    k = fn(k)
    return torch.fft.ifftn(k, dim=dims).real


def _spike(x, s, g):
    """One k-space spike (a stripe pattern across the image) of ``s`` times the largest k-space magnitude."""
    def add(k):
        loc = tuple(int(torch.randint(0, n, (1,), generator=g)) for n in k.shape[1:])
        k = k.clone()
        k[(slice(None), *loc)] += s * k.abs().max()
        return k
    return _kspace(x, add)


def _ghosting(x, s, g):
    """Motion between phase-encoding lines: every other line along the first spatial axis scaled by 1 - s,
    which puts a ghost of the image half a field of view away."""
    def ghost(k):
        k = k.clone()
        k[:, ::2] *= 1 - s
        return k
    return _kspace(x, ghost)


def _scale(x, s, g):
    return x * (1 + s)


def _rotation(x, s, g, mode="bilinear"):
    from monai.transforms import Rotate

    angle = math.radians(s)
    angles = angle if x.ndim == 3 else (0.0, 0.0, angle)
    return torch.as_tensor(Rotate(angle=angles, keep_size=True, padding_mode="zeros", mode=mode)(x))


def _flip(x, s, g, mode=None):
    return torch.flip(x, dims=[x.ndim - 1])  # left-right (the last axis of an image as the presets lay it out)


def _jpeg(x, s, g):
    from PIL import Image

    lo, hi = x.min(), x.max()
    span = float((hi - lo).clamp_min(1e-8))
    out = []
    for c in x:
        u8 = ((c - lo) / span * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="JPEG", quality=int(round(100 - s)))
        out.append(torch.as_tensor(np.asarray(Image.open(buf), dtype=np.float32)) / 255 * span + lo)
    return torch.stack(out)


def _slice_thickness(x, s, g):
    """Thicker slices: each slice the mean of ``1 + s`` neighbours along the volume's last axis."""
    k = int(round(s)) + 1
    pad = (k // 2, k - 1 - k // 2)
    y = F.pad(x.float()[None], (*pad, 0, 0, 0, 0), mode="replicate")
    return F.avg_pool3d(y, kernel_size=(1, 1, k), stride=1)[0]


@dataclass(frozen=True)
class Family:
    fn: Callable
    max_severity: float
    dims: tuple = (2, 3)
    integer: bool = False
    doc: str = ""


FAMILIES: dict[str, Family] = {
    "gaussian_noise": Family(_noise, 1.0, doc="additive Gaussian noise, std s (images in 0-1)"),
    "rician_noise": Family(_rician, 1.0, doc="Rician noise (MR magnitude), std s"),
    "blur": Family(_blur, 10.0, doc="Gaussian blur, sigma s voxels"),
    "contrast": Family(_contrast, 0.99, doc="contrast reduced by a share s around the mean"),
    "gamma": Family(_gamma, 4.0, doc="gamma 1 + s on the image's range"),
    "bias_field": Family(_bias_field, 1.0, doc="smooth multiplicative field, coefficients s (MONAI)"),
    "resolution": Family(_resolution, 7.0, doc="resolution loss: down by 1 + s, back up"),
    "kspace_spike": Family(_spike, 1.0, doc="a k-space spike of s times the peak magnitude"),
    "ghosting": Family(_ghosting, 1.0, doc="motion ghosting: alternate phase lines scaled by 1 - s"),
    "intensity_scale": Family(_scale, 10.0, doc="intensities times 1 + s (calibration drift)"),
    "rotation": Family(_rotation, 180.0, doc="in-plane rotation by s degrees"),
    "flip": Family(_flip, 1.0, integer=True, doc="left-right flip (s = 1); only where the spec allows it"),
    "jpeg": Family(_jpeg, 99.0, dims=(2,), doc="JPEG compression at quality 100 - s (2D)"),
    "slice_thickness": Family(_slice_thickness, 15.0, dims=(3,), integer=True,
                              doc="slices s + 1 times thicker (3D)"),
}


GEOMETRIC = ("rotation", "flip")  # families that move the anatomy: a segmentation mask moves with the image


def perturb(image: torch.Tensor, family: str, severity: float, seed: int = 0) -> torch.Tensor:
    """``image`` (C, *spatial) under ``family`` at ``severity`` (0: returned unchanged), deterministic per seed."""
    if severity == 0:
        return image
    g = torch.Generator().manual_seed(int(seed))
    x = torch.as_tensor(image).float()
    return FAMILIES[family].fn(x, float(severity), g).to(x.dtype)


@dataclass
class Spec:
    name: str
    perturbations: dict[str, dict]
    metric: str | None = None
    tolerance: float = 0.05
    seed: int = 0
    source: str = ""
    severities: dict[str, list[float]] = field(default_factory=dict)


def spec_path(name: str) -> Path:
    """A spec file, or a shipped spec's name (``cxr``, ``mr``, ``ct``) looked up in ``robustness/`` of the
    recipe roots (``$MEDFM_RECIPES``, the current folder, the source checkout)."""
    from medfm.run.recipe import recipe_roots

    if Path(name).is_file():
        return Path(name)
    stem = Path(name).name.removesuffix(".yaml")
    found = sorted({p.stem: p for r in recipe_roots() for p in (r / "robustness").glob("*.yaml")}.items())
    for s, p in found:
        if s == stem:
            return p
    raise FileNotFoundError(f"{name}: no such robustness spec file or name; shipped specs: "
                            f"{', '.join(s for s, _ in found) or '(none found)'}")


def load_spec(name: str, dims: int | None = None) -> Spec:
    """Read and check a spec: an unknown family, a severity that is not a number or lies outside what the
    family can do, or a family for the wrong dimension is an error naming the key."""
    path = spec_path(name)
    raw = yaml.safe_load(path.read_text()) or {}
    where = f"robustness spec {path}"
    if not isinstance(raw, dict) or not isinstance(raw.get("perturbations"), dict) or not raw["perturbations"]:
        raise ValueError(f"{where}: needs a 'perturbations' mapping (family: {{severities: [...]}})")
    unknown = sorted(set(raw) - {"name", "metric", "tolerance", "seed", "perturbations"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    spec = Spec(str(raw.get("name", path.stem)), raw["perturbations"], raw.get("metric"),
                float(raw.get("tolerance", 0.05)), int(raw.get("seed", 0)), str(path))
    for fam, entry in raw["perturbations"].items():
        key = f"perturbations.{fam}"
        if fam not in FAMILIES:
            raise ValueError(f"{where}: {key}: unknown perturbation; known: {', '.join(FAMILIES)}")
        f = FAMILIES[fam]
        if dims is not None and dims not in f.dims:
            raise ValueError(f"{where}: {key}: is for {' / '.join(f'{d}D' for d in f.dims)} inputs, the model "
                             f"reads {dims}D")
        entry = entry if isinstance(entry, dict) else {"severities": entry}
        sev = entry.get("severities")
        if not isinstance(sev, list) or not sev:
            raise ValueError(f"{where}: {key}.severities: give a list of severities")
        for s in sev:
            ok = isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= f.max_severity
            if not ok or (f.integer and float(s) != int(s)):
                raise ValueError(f"{where}: {key}.severities: {s!r} is impossible (a {'whole ' if f.integer else ''}"
                                 f"number in 0..{f.max_severity:g}: {f.doc})")
        extra = sorted(set(entry) - {"severities", "tolerance"})
        if extra:
            raise ValueError(f"{where}: {key}: unknown key(s) {', '.join(extra)}")
        spec.severities[fam] = sorted(float(s) for s in sev)
        spec.perturbations[fam] = {"tolerance": float(entry.get("tolerance", spec.tolerance))}
    return spec


class Perturbed(torch.utils.data.Dataset):
    """A dataset of sample dicts whose images are perturbed (family, severity; seeded by the case's index); a
    rotation or flip moves the sample's ``mask`` with it (nearest neighbour); every other attribute is the
    wrapped dataset's."""

    def __init__(self, dataset, family: str, severity: float, seed: int = 0):
        self.dataset, self.family, self.severity, self.seed = dataset, family, severity, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        s = dict(self.dataset[i])
        s["image"] = perturb(s["image"], self.family, self.severity, self.seed * 1_000_003 + i)
        if self.family in GEOMETRIC and self.severity and s.get("mask") is not None:  # labels move with anatomy
            m = torch.as_tensor(s["mask"])
            s["mask"] = FAMILIES[self.family].fn(m.float(), float(self.severity), None, mode="nearest").to(m.dtype)
        return s

    def __getattr__(self, name):
        return getattr(self.__dict__["dataset"], name)


def run_spec(spec: Spec, score: Callable[[object], float], dataset, progress: Callable = lambda s: None) -> dict:
    """The metric of ``score(dataset)`` clean and under every listed perturbation; drop, pass / fail."""
    clean = float(score(dataset))
    out: dict = {"spec": spec.name, "source": spec.source, "metric": spec.metric, "seed": spec.seed,
                 "clean": clean, "families": {}}
    for fam, sevs in spec.severities.items():
        tol = spec.perturbations[fam]["tolerance"]
        rows = {}
        for s in sevs:
            progress(f"{fam} {s:g}")
            v = float(score(Perturbed(dataset, fam, s, spec.seed)))
            rows[f"{s:g}"] = {"value": v, "drop": clean - v}
        worst = max(r["drop"] for r in rows.values())
        out["families"][fam] = {"severities": rows, "tolerance": tol, "worst_drop": worst, "passed": worst <= tol}
    out["passed"] = all(f["passed"] for f in out["families"].values())
    return out


def robustness_table(report: dict) -> list[str]:
    """Markdown: a row per family, its metric at each severity, the worst drop and pass / fail."""
    lines = [f"### {report['spec']}: {report['metric']} (clean {report['clean']:.4f})", "",
             "| perturbation | severities: metric | worst drop | tolerance | result |", "|---|---|---:|---:|---|"]
    for fam, f in report["families"].items():
        cells = ", ".join(f"{s}: {r['value']:.3f}" for s, r in f["severities"].items())
        lines.append(f"| {fam} | {cells} | {f['worst_drop']:.4f} | {f['tolerance']:g} | "
                     f"{'pass' if f['passed'] else '**fail**'} |")
    return lines


def robustness_png(report: dict, path: Path) -> Path:
    """One panel per family: the metric against severity, the clean value and the tolerance band."""
    fams = list(report["families"])
    cols = min(4, len(fams))
    rows = math.ceil(len(fams) / cols)
    plt = pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, fam in zip(axes.ravel(), fams):
        f = report["families"][fam]
        xs = [0.0] + [float(s) for s in f["severities"]]
        ys = [report["clean"]] + [r["value"] for r in f["severities"].values()]
        ax.plot(xs, ys, marker="o", color="tab:green" if f["passed"] else "tab:red")
        ax.axhspan(report["clean"] - f["tolerance"], report["clean"], color="0.85", zorder=0)
        ax.set_title(f"{fam} ({'pass' if f['passed'] else 'fail'})", fontsize=9)
        ax.set_xlabel("severity", fontsize=8)
        ax.set_ylabel(report["metric"], fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(fams):]:
        ax.axis("off")
    fig.suptitle(f"{report['spec']}: clean {report['metric']} {report['clean']:.3f}; grey = tolerated", fontsize=10)
    return save_figure(fig, path, dpi=110)
