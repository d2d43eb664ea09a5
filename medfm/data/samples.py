"""Real files that ship inside installed packages, for demos and tests (no download)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from .writers import write_manifest, write_nifti


def _package_dir(package: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {package})")
    return Path(list(spec.submodule_search_locations)[0])


def mni152(kind: str = "t1") -> Path:
    """nilearn's MNI152 2009a template (197x233x189, 1 mm): ``t1``, ``gm`` (grey matter) or ``wm`` (white matter)."""
    if kind not in ("t1", "gm", "wm"):
        raise ValueError(f"kind must be t1, gm or wm, got {kind!r}")
    return _package_dir("nilearn") / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"


def iu_xray_reports() -> Path:
    """The 3,955 Indiana University chest X-ray reports (XML in a .tgz) that torchxrayvision ships."""
    return _package_dir("torchxrayvision") / "data" / "NLMCXR_reports.tgz"


def pydicom_file(name: str = "CT_small.dcm") -> Path:
    """A test file bundled with pydicom (``CT_small.dcm``, ``MR_small.dcm``, ``rtdose.dcm``, ...)."""
    return _package_dir("pydicom") / "data" / "test_files" / name


def nibabel_file(name: str = "anatomical.nii") -> Path:
    """A test file bundled with nibabel (``anatomical.nii``, ``example4d.nii.gz``, ``0.dcm``, ...)."""
    return _package_dir("nibabel") / "tests" / "data" / name


TISSUE_NAMES = ("background", "grey matter", "white matter", "CSF")


def mni152_tissue(csf: bool = False):
    """The MNI152 T1 image (nibabel) and its tissue label map (uint8 array): 1 grey matter, 2 white matter
    (nilearn's probability maps above 0.5) and, with ``csf``, 3 CSF = dark T1 (below 0.35 after 0.5-99.5
    percentile scaling) inside the brain dilated by 4 mm that is neither."""
    import nibabel as nib
    import numpy as np

    t1 = nib.load(str(mni152("t1")))
    gm, wm = (np.asarray(nib.load(str(mni152(k))).dataobj, dtype=np.float32) for k in ("gm", "wm"))
    labels = np.zeros(t1.shape, np.uint8)
    if csf:
        from scipy.ndimage import maximum_filter

        x = np.asarray(t1.dataobj, dtype=np.float32)
        lo, hi = np.percentile(x, [0.5, 99.5])
        brain = maximum_filter((gm + wm) > 0.2, size=9)
        labels[brain & ((x - lo) / (hi - lo) < 0.35)] = 3
    labels[gm > 0.5] = 1
    labels[wm > 0.5] = 2
    return t1, labels


def midline_index(img) -> int:
    """Voxel index along the first axis where the world x coordinate crosses 0 (the brain's midline)."""
    import numpy as np

    return int(round(float(np.linalg.solve(img.affine, [0.0, 0.0, 0.0, 1.0])[0])))


def mni152_tissue_manifest(out: str | Path) -> Path:
    """The whole MNI152 T1 brain and its tissue label map (0 background, 1 grey matter, 2 white matter)
    written into ``out`` with a manifest (``image``, ``mask``, ``split`` train): real 3D data for
    mask-conditioned generation demos."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t1, labels = mni152_tissue()
    (out / "t1.nii.gz").write_bytes(mni152("t1").read_bytes())
    write_nifti(labels, out / "tissue.nii.gz", t1.affine)
    return write_manifest(out / "manifest.csv", [{"image": "t1.nii.gz", "mask": "tissue.nii.gz", "split": "train"}])


def mni152_hemispheres(out: str | Path, csf: bool = False, slab_mm: float | None = None) -> Path:
    """A 3D segmentation set from one real brain: the left hemisphere of the MNI152 T1 (world x < 0) is the
    ``train`` volume, the right one the ``val`` volume, each with its tissue label map (:func:`mni152_tissue`)
    and its world affine, as NIfTI + ``manifest.csv`` (``image``, ``mask``, ``split``, ``side``).

    ``slab_mm``: the training volume is only an axial slab this thick of the left hemisphere, centred 20 mm
    above the AC-PC plane (through the ventricles and the basal ganglia): a few labelled slices, the
    few-label case; validation is still the whole right hemisphere."""
    import nibabel as nib

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t1, labels = mni152_tissue(csf)
    mid = midline_index(t1)
    labimg = nib.Nifti1Image(labels, t1.affine)
    z = slice(None)
    if slab_mm is not None:
        import numpy as np

        centre = int(round(float(np.linalg.solve(t1.affine, [0.0, 0.0, 20.0, 1.0])[2])))
        half = max(1, int(round(slab_mm / 2 / abs(float(t1.affine[2, 2])))))
        z = slice(centre - half, centre + half)
    rows = []
    for side, sl, split in (("left", (slice(0, mid), slice(None), z), "train"), ("right", slice(mid, None), "val")):
        nib.save(t1.slicer[sl], out / f"{side}_t1.nii.gz")
        nib.save(labimg.slicer[sl], out / f"{side}_tissue.nii.gz")
        rows.append({"image": f"{side}_t1.nii.gz", "mask": f"{side}_tissue.nii.gz", "split": split, "side": side})
    return write_manifest(out / "manifest.csv", rows)


LEVELS = ("q1", "q2", "q3", "q4")  # mni152_slices: quarters of -30..60 mm above the AC-PC plane, q1 lowest


def mni152_slices(out: str | Path, n: int = 48, size: int | None = None) -> Path:
    """A 2D set from one real brain: ``n`` axial MNI152 T1 slices (PNG, 8-bit) between 30 mm below and 60 mm
    above the AC-PC plane, each with its tissue label map (PNG) and a ``level`` label: which quarter of that
    range the slice is in (``q1`` lowest .. ``q4`` highest); every 4th slice is ``val``, the rest ``train``.
    ``size``: resize to size x size (nearest neighbour for the labels).

    Each voxel plane is used once: the range holds 91 planes at 1 mm, so ``n`` above that gives 91 slices
    (two rows of one plane would put the same image in two splits)."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t1, labels = mni152_tissue()
    vol = np.asarray(t1.dataobj, dtype=np.float32)
    vol = np.clip(vol / np.percentile(vol, 99.5), 0, 1)
    rows = []
    planes = sorted({int(round(float(np.linalg.solve(t1.affine, [0.0, 0.0, z_mm, 1.0])[2])))
                     for z_mm in np.linspace(-30, 60, n)})
    for i, k in enumerate(planes):
        z_mm = float((t1.affine @ [0.0, 0.0, k, 1.0])[2])
        image = Image.fromarray((255 * np.rot90(vol[:, :, k])).astype(np.uint8))
        mask = Image.fromarray(np.ascontiguousarray(np.rot90(labels[:, :, k])))
        if size:
            image, mask = image.resize((size, size), Image.BILINEAR), mask.resize((size, size), Image.NEAREST)
        image.save(out / f"t1_z{k}.png")
        mask.save(out / f"tissue_z{k}.png")
        rows.append({"image": f"t1_z{k}.png", "mask": f"tissue_z{k}.png", "level": LEVELS[min(int((z_mm + 30) // 22.5), 3)],
                     "split": "val" if i % 4 == 3 else "train"})
    return write_manifest(out / "manifest.csv", rows)
