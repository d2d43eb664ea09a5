"""Real files that ship inside installed packages, for demos and tests (no download)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path


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


def mni152_tissue_manifest(out: str | Path) -> Path:
    """The MNI152 T1 brain and its tissue label map (0 background, 1 grey matter, 2 white matter: the larger
    of nilearn's GM / WM probabilities where it exceeds 0.5) written into ``out`` with a manifest
    (``image``, ``mask``): real 3D data for mask-conditioned generation and segmentation demos."""
    import nibabel as nib
    import numpy as np

    from .writers import write_nifti

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t1 = nib.load(str(mni152("t1")))
    gm = np.asarray(nib.load(str(mni152("gm"))).dataobj, dtype=np.float32)
    wm = np.asarray(nib.load(str(mni152("wm"))).dataobj, dtype=np.float32)
    labels = np.where(np.maximum(gm, wm) > 0.5, np.where(gm >= wm, 1, 2), 0).astype(np.uint8)
    (out / "t1.nii.gz").write_bytes(mni152("t1").read_bytes())
    write_nifti(labels, out / "tissue.nii.gz", t1.affine)
    manifest = out / "manifest.csv"
    manifest.write_text("image,mask,split\nt1.nii.gz,tissue.nii.gz,train\n")
    return manifest
