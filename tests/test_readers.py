"""Readers on real files: NIfTI (nibabel, nilearn), DICOM (pydicom, nibabel), PNG, multi-frame."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medfm.data import load, samples

from .conftest import shared_path


def test_mni152_template(mni_t1):
    s = load(mni_t1, spatial_dims=3)
    assert s["image"].shape == (1, 197, 233, 189)
    assert s["meta"]["spacing"] == pytest.approx((1.0, 1.0, 1.0))
    assert s["meta"]["orientation"] == "RAS"
    assert s["image"].dtype == torch.float32 and s["image"].max() > 0


def test_nifti_round_trip_keeps_affine_and_spacing(tmp_path):
    src = samples.nibabel_file("anatomical.nii")
    s = load(src)
    ref = nib.load(src)
    np.testing.assert_allclose(s["meta"]["affine"], ref.affine)
    assert s["meta"]["spacing"] == pytest.approx(ref.header.get_zooms()[:3])
    np.testing.assert_array_equal(s["image"][0].numpy(), np.asarray(ref.dataobj, dtype=np.float32))
    # write it back with nibabel, read again: same array, affine, spacing, orientation
    out = tmp_path / "copy.nii.gz"
    nib.save(nib.Nifti1Image(s["image"][0].numpy(), s["meta"]["affine"]), out)
    again = load(out)
    torch.testing.assert_close(again["image"], s["image"])
    np.testing.assert_allclose(again["meta"]["affine"], s["meta"]["affine"], atol=1e-5)
    assert again["meta"]["spacing"] == pytest.approx(s["meta"]["spacing"])
    assert again["meta"]["orientation"] == s["meta"]["orientation"] == "LAS"


def test_nifti_4d_becomes_channels():
    s = load(samples.nibabel_file("example4d.nii.gz"))
    assert s["image"].shape == (2, 128, 96, 24)


def test_dicom_ct_in_hounsfield_units(ct_small):
    ds = pydicom.dcmread(ct_small)
    s = load(ct_small)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(s["image"][0].numpy(), expected)
    assert s["image"].shape == (1, 128, 128) and s["meta"]["spatial_dims"] == 2
    assert s["meta"]["spacing"] == pytest.approx([float(v) for v in ds.PixelSpacing])
    assert s["image"].min() < -800  # air in HU, not raw stored values


def test_dicom_mr_file():
    s = load(samples.pydicom_file("MR_small.dcm"))
    assert s["image"].shape == (1, 64, 64)


def _series(folder, names_and_files):
    folder.mkdir()
    for name, src in names_and_files:
        shutil.copy(src, folder / name)
    return folder


def test_dicom_series_order_does_not_matter(tmp_path):
    """nibabel's real two-slice MR series, under names that list in opposite orders."""
    a, b = samples.nibabel_file("0.dcm"), samples.nibabel_file("1.dcm")
    one = load(_series(tmp_path / "one", [("a.dcm", a), ("b.dcm", b)]))
    two = load(_series(tmp_path / "two", [("a.dcm", b), ("b.dcm", a)]))
    torch.testing.assert_close(one["image"], two["image"])
    np.testing.assert_allclose(one["meta"]["affine"], two["meta"]["affine"])
    assert one["image"].shape == (1, 256, 256, 2)
    # slice k is the file whose position comes k-th along the slice normal (here 0.dcm, then 1.dcm)
    np.testing.assert_array_equal(one["image"][0, :, :, 0].numpy(), pydicom.dcmread(a).pixel_array.T.astype(np.float32))
    assert one["meta"]["spacing"][2] == pytest.approx(3.0)


def test_dicom_series_geometry(tmp_path, ct_small):
    """A 5-slice series built from the real CT header: positions, spacing and affine follow the headers."""
    folder = tmp_path / "ct"
    folder.mkdir()
    order = [3, 0, 4, 1, 2]
    base = pydicom.dcmread(ct_small)
    for name_idx, k in enumerate(order):
        ds = pydicom.dcmread(ct_small)
        ds.ImagePositionPatient = [float(v) for v in base.ImagePositionPatient[:2]] + [float(base.ImagePositionPatient[2]) + 2.5 * k]
        ds.InstanceNumber = k + 1
        arr = ds.pixel_array.copy()
        arr[0, 0] = 1000 + k  # mark the slice
        ds.PixelData = arr.tobytes()
        ds.save_as(folder / f"IM{name_idx:04d}")  # no suffix, as scanners write them
    s = load(folder, spatial_dims=3)
    img = s["image"][0]
    assert img.shape == (128, 128, 5)
    marks = [img[0, 0, k].item() for k in range(5)]
    assert marks == [1000 + k + float(base.RescaleIntercept) for k in range(5)]
    assert s["meta"]["spacing"] == pytest.approx((0.661468, 0.661468, 2.5))
    affine = s["meta"]["affine"]
    # voxel (i=column, j=row, k) -> RAS = LPS flipped in x and y
    ipp = np.array([float(v) for v in base.ImagePositionPatient])
    world = affine @ np.array([3, 7, 2, 1.0])
    lps = ipp + 3 * 0.661468 * np.array([1, 0, 0]) + 7 * 0.661468 * np.array([0, 1, 0]) + 2 * np.array([0, 0, 2.5])
    np.testing.assert_allclose(world[:3], lps * np.array([-1, -1, 1]), atol=1e-4)
    assert s["meta"]["orientation"] == "LPS"


def test_dicom_multiframe_rtdose():
    ds = pydicom.dcmread(samples.pydicom_file("rtdose.dcm"))
    s = load(samples.pydicom_file("rtdose.dcm"), spatial_dims=3)
    assert s["image"].shape == (1, 10, 10, 15)
    assert s["meta"]["spacing"] == pytest.approx((10.0, 10.0, 5.0))
    np.testing.assert_allclose(s["image"][0, :, :, 0].numpy(), ds.pixel_array[0].T * float(ds.DoseGridScaling), rtol=1e-6)


def test_png_grayscale_from_shared_medpix():
    png = shared_path("medpix2", "images", "MPX1007_synpic46719.png")
    s = load(png)
    assert s["image"].shape[0] == 1 and s["meta"]["spatial_dims"] == 2 and s["image"].max() <= 255


def test_rgb_jpeg_fundus():
    """scikit-image's retina.jpg (a real fundus photograph) reads as 3 channels."""
    import skimage.data
    from pathlib import Path

    s = load(Path(skimage.data.__file__).parent / "retina.jpg")
    assert s["image"].shape[0] == 3 and s["image"].shape[1] > 100


def test_a_0_255_png_mask_reads_as_one_foreground_class():
    """BUS-BRA's lesion masks are 8-bit 0 / 255 PNGs: label 1 (one class), not 255 of 256 (the plan said 256
    classes before); a mask with other values and a 0 / 1 mask are read as they are."""
    from medfm.data import load_mask

    mask = shared_path("breast_us", "busbra", "masks", "bus_0001-l.png")
    raw, read = load(mask, allow_constant=True)["image"], load_mask(mask)
    assert set(torch.unique(raw).tolist()) == {0.0, 255.0}
    assert set(torch.unique(read["image"]).tolist()) == {0.0, 1.0} and read["meta"]["binary_255"]
    assert torch.equal(read["image"] * 255, torch.as_tensor(raw))
    labels = shared_path("lgg_flair_seg", "masks", "TCGA_CS_4942_19970222_10.png")
    assert set(torch.unique(load_mask(labels)["image"]).tolist()) == {0.0, 1.0}
    assert "binary_255" not in load_mask(labels)["meta"]
