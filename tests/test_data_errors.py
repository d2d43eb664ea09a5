"""Bad input: every error names the file or manifest line, and on_error="skip" counts instead."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medfm.data import DataError, ManifestDataset, MissingFileError, NpzDataset, load, read_npz, samples


def test_missing_file(tmp_path):
    p = tmp_path / "nope.nii.gz"
    with pytest.raises(MissingFileError, match=str(p)):
        load(p)
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for code that catches that
        load(p)


def test_truncated_nifti(tmp_path):
    raw = samples.nibabel_file("anatomical.nii").read_bytes()
    bad = tmp_path / "truncated.nii"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match=r"truncated\.nii: cannot read as NIfTI"):
        load(bad)
    gz = samples.mni152("gm").read_bytes()
    badgz = tmp_path / "truncated.nii.gz"
    badgz.write_bytes(gz[: len(gz) // 3])
    with pytest.raises(DataError, match=r"truncated\.nii\.gz: cannot read as NIfTI"):
        load(badgz)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti header at all" * 20))
    with pytest.raises(DataError, match=r"junk\.nii\.gz"):
        load(junk)


def test_corrupt_dicom(tmp_path, ct_small):
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: cannot decode DICOM pixel data"):
        load(samples.pydicom_file("MR_truncated.dcm"))  # pydicom's own truncated test file
    raw = ct_small.read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(raw[:400])
    with pytest.raises(DataError, match=r"cut\.dcm"):
        load(bad)


def test_2d_file_where_3d_asked(ct_small):
    with pytest.raises(DataError, match=r"CT_small\.dcm: is a 2D image \(128, 128\), but a 3D volume was asked"):
        load(ct_small, spatial_dims=3)
    with pytest.raises(DataError, match=r"retina\.jpg: is a 2D image"):
        import skimage.data
        from pathlib import Path

        load(Path(skimage.data.__file__).parent / "retina.jpg", spatial_dims=3)


def test_3d_file_where_2d_asked(mni_t1):
    with pytest.raises(DataError, match=r"t1_tal_nlin_sym_09a_converted\.nii\.gz: is a 3D volume"):
        load(mni_t1, spatial_dims=2)


def test_one_slice_folder_is_not_a_volume(tmp_path, ct_small):
    (tmp_path / "s").mkdir()
    shutil.copy(ct_small, tmp_path / "s" / "only.dcm")
    with pytest.raises(DataError, match=r"holds one slice \(only\.dcm\)"):
        load(tmp_path / "s")


def test_mixed_orientation_series_names_the_slice(tmp_path):
    """pydicom's radial localizer (one series, a different orientation per slice) is not one volume."""
    src = samples.pydicom_file("dicomdirtests") / "98892003" / "MR700"
    shutil.copytree(src, tmp_path / "mr700")
    with pytest.raises(DataError, match=r"mr700/\d+: slice orientation .* differs"):
        load(tmp_path / "mr700")


def test_nan_and_constant_images(tmp_path):
    data = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 1 of 512 values are NaN or infinite"):
        load(tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 7, np.float32), np.eye(4)), tmp_path / "flat.nii.gz")
    with pytest.raises(DataError, match=r"flat\.nii\.gz: the image is constant"):
        load(tmp_path / "flat.nii.gz")
    assert load(tmp_path / "flat.nii.gz", allow_constant=True)["image"].shape == (1, 8, 8, 8)  # masks may be


def test_unknown_file_type(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unknown file type"):
        load(p)


def _manifest(tmp_path, rows, name="m.csv"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        keys = list(rows[0]) if rows else ["image", "label"]
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return path


def test_empty_manifest(tmp_path):
    with pytest.raises(DataError, match=r"m\.csv: the manifest has no rows"):
        ManifestDataset(_manifest(tmp_path, []))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"e\.jsonl: the manifest has no rows"):
        ManifestDataset(tmp_path / "e.jsonl")


def test_unknown_label_names_the_line(tmp_path, ct_small):
    shutil.copy(ct_small, tmp_path / "ct.dcm")
    rows = [{"image": "ct.dcm", "label": "normal"}, {"image": "ct.dcm", "label": "pneumonai"}]
    path = _manifest(tmp_path, rows)
    with pytest.raises(DataError, match=r"m\.csv line 3: label 'pneumonai' in column 'label' is not one of the classes"):
        ManifestDataset(path, label_keys="label", classes=["normal", "pneumonia"])


def test_missing_file_in_manifest_and_skip(tmp_path, ct_small):
    shutil.copy(ct_small, tmp_path / "ct.dcm")
    (tmp_path / "broken.dcm").write_bytes(ct_small.read_bytes()[:400])
    rows = [
        {"image": "ct.dcm", "label": "a"},
        {"image": "gone.dcm", "label": "a"},
        {"image": "broken.dcm", "label": "b"},
        {"image": "ct.dcm", "label": "b"},
    ]
    path = _manifest(tmp_path, rows)
    with pytest.raises(MissingFileError, match=r"m\.csv line 3: image file not found: .*gone\.dcm"):
        ManifestDataset(path, label_keys="label")
    # on_error="skip": the missing file is dropped up front, the corrupt one when read; both counted
    with pytest.warns(UserWarning, match="skipped 1 bad row"):
        ds = ManifestDataset(path, label_keys="label", on_error="skip")
    assert len(ds) == 3 and ds.num_skipped == 1
    with pytest.warns(UserWarning, match=r"line 4: .*broken\.dcm"):
        got = [ds[i] for i in range(len(ds))]
    assert ds.num_skipped == 2 and all(g["image"].shape == (1, 128, 128) for g in got)
    # raise mode names the manifest line and the file when a file is corrupt
    with pytest.warns(UserWarning):
        ds = ManifestDataset(path, label_keys="label", on_error="skip")
    ds.on_error = "raise"
    with pytest.raises(DataError, match=r"m\.csv line 4: .*broken\.dcm: DICOM file has no pixel data \(truncated"):
        ds[1]


def test_missing_column_and_split(tmp_path, ct_small):
    shutil.copy(ct_small, tmp_path / "ct.dcm")
    path = _manifest(tmp_path, [{"image": "ct.dcm", "split": "train"}])
    with pytest.raises(DataError, match=r"m\.csv: no column 'diagnosis'; columns are \['image', 'split'\]"):
        ManifestDataset(path, label_keys="diagnosis")
    with pytest.raises(DataError, match=r"m\.csv: no rows with split='test'; splits present: \['train'\]"):
        ManifestDataset(path, split="test")


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"image": "a.png"}\n{"image": oops}\n')
    with pytest.raises(DataError, match=r"m\.jsonl line 2: not valid JSON"):
        ManifestDataset(p)


def test_npz_missing_split(tmp_path):
    np.savez(tmp_path / "mini.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((2, 1)))
    with pytest.raises(DataError, match=r"mini\.npz: no 'test' split .*splits in this file: train"):
        read_npz(tmp_path / "mini.npz", "test")
    with pytest.raises(MissingFileError, match=r"absent\.npz"):
        NpzDataset(tmp_path / "absent.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"bad\.npz: cannot read as \.npz"):
        read_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "empty.npz", train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1)))
    with pytest.raises(DataError, match=r"empty\.npz: split 'train' is empty"):
        NpzDataset(tmp_path / "empty.npz")
