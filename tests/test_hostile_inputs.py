"""A hostile-input corpus for every reader and the pre-flight scan, and property-based fuzzing (Hypothesis) of
the manifest reader and recipe parsing: bad input is always a medfm error naming the file / line / key,
never another exception type."""

from __future__ import annotations

import gzip
import os
import struct

import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medfm.data import DataError, load, samples
from medfm.data.manifest import read_records
from medfm.data.preflight import header_problem
from medfm.pretrain.method import pretrain_schema
from medfm.run.recipe import load_config, parse_overrides


def _write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _nifti(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def _enormous_header(path):
    """A valid NIfTI-1 header claiming a 60000^3 volume, followed by a few bytes of data."""
    _nifti(path, np.zeros((4, 4, 4), np.float32))
    raw = bytearray(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)
    path.write_bytes(bytes(raw))
    return path


def _dicom_without_pixels(path):
    ds = pydicom.dcmread(str(samples.pydicom_file("CT_small.dcm")))
    del ds.PixelData
    ds.save_as(str(path))
    return path


CORPUS = {  # name -> (maker(tmp) -> path, whether a header read already finds it)
    "zero-byte NIfTI": (lambda t: _write(t / "a.nii.gz", b""), True),
    "truncated NIfTI": (lambda t: _write(t / "b.nii.gz", samples.mni152("t1").read_bytes()[:2000]), False),
    "random-bytes NIfTI": (lambda t: _write(t / "c.nii", os.urandom(600)), True),
    "random-bytes DICOM": (lambda t: _write(t / "d.dcm", os.urandom(600)), True),
    "random-bytes PNG": (lambda t: _write(t / "e.png", b"\x89PNG\r\n\x1a\n" + os.urandom(200)), True),
    "text named .png": (lambda t: _write(t / "f.png", "not an image"), True),
    "NIfTI named .png": (lambda t: _write(t / "g.png", samples.mni152("gm").read_bytes()), True),
    "NaN volume": (lambda t: _nifti(t / "h.nii.gz", np.full((8, 8, 8), np.nan, np.float32)), False),
    "inf volume": (lambda t: _nifti(t / "i.nii.gz", np.full((8, 8, 8), np.inf, np.float32)), False),
    "constant volume": (lambda t: _nifti(t / "j.nii.gz", np.ones((8, 8, 8), np.float32)), False),
    "header claiming an enormous volume": (lambda t: _enormous_header(t / "k.nii"), True),
    "DICOM without pixel data": (lambda t: _dicom_without_pixels(t / "l.dcm"), True),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_every_hostile_file_is_a_data_error_naming_it(name, tmp_path):
    make, header_finds_it = CORPUS[name]
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        load(path)
    assert str(path) in str(e.value), str(e.value)
    problem = header_problem(path)
    assert (problem is not None) == header_finds_it, problem  # the pre-flight's cheap check, where it can tell


def test_good_files_pass_the_preflight():
    for path in (samples.mni152("t1"), samples.pydicom_file("CT_small.dcm"), samples.nibabel_file("anatomical.nii")):
        assert header_problem(path) is None


CELL = st.one_of(st.text(max_size=12), st.sampled_from(["", "train", "val", "a.png", "../x", "1", "nan", "a|b"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.lists(st.sampled_from(["image", "label", "split", "mask", "text", "x", ""]), min_size=0, max_size=5),
       rows=st.lists(st.lists(CELL, min_size=0, max_size=6), max_size=6),
       label=st.sampled_from([None, "label", "missing"]), split=st.sampled_from([None, "train", "test"]))
def test_the_manifest_reader_fails_only_with_data_errors(tmp_path, header, rows, label, split):
    lines = [",".join(header)] + [",".join('"' + c.replace('"', '""') + '"' for c in r) for r in rows]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    try:
        records, classes, bad = read_records(manifest, split=split, label_keys=label, on_error="skip")
    except DataError as e:
        assert str(manifest) in str(e)
    else:
        assert all(r.line >= 2 for r in records)


KEYS = st.sampled_from(["mae.mask_ratio", "trainer.max_steps", "encoder.img_size", "data.batch_size", "seed",
                        "optim.lr", "mae.mask_ration", "trainer.max_step", "encoder.nmae", "view.scale", "nope.x", ""])
VALUES = st.one_of(st.sampled_from(["0.5", "-1", "abc", "[1, 2]", "{a: 1}", "null", "true", "1e-3", "!!python/none",
                                    "[", "{", "'", "!!binary AAAA", "*x"]), st.text(max_size=8))


@settings(max_examples=80, deadline=None)
@given(items=st.lists(st.tuples(KEYS, VALUES), max_size=4))
def test_recipe_overrides_fail_only_with_recipe_errors(items):
    try:
        cfg = load_config(pretrain_schema(), None, parse_overrides([f"{k}={v}" for k, v in items]))
    except (KeyError, ValueError) as e:
        assert str(e)
    else:
        assert isinstance(cfg["trainer"], dict)


def test_duplicate_rows_are_warned_about_and_leakage_across_splits_is_named(tmp_path):
    ct = samples.pydicom_file("CT_small.dcm")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,split\n{ct},train\n{ct},val\n")
    with pytest.warns(UserWarning, match=r"1 image\(s\) appear in more than one split.*line 2 \(train\), line 3 \(val\)"):
        read_records(manifest, split="train")
    manifest.write_text(f"image,split\n{ct},train\n{ct},train\n")
    with pytest.warns(UserWarning, match=r"1 image\(s\) are listed more than once"):
        read_records(manifest)
