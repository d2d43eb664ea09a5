"""The ``medfm`` command: installed entry point, ``info``, ``encode``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from medfm.cli import main
from medfm.encoders import list_encoders


def test_info_lists_versions_device_encoders(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("torch", "monai", "timm", "device", "cpu", "recipes", *list_encoders()):
        assert text in out


def test_entry_point_is_installed():
    exe = Path(sys.executable).parent / "medfm"
    assert exe.exists(), f"{exe} missing: pip did not install the console script"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "info" in out and "encode" in out


def test_encode_mni152(capsys):
    assert main(["encode", "--encoder", "vit_micro", "--size", "32", "--spacing", "6"]) == 0
    out = capsys.readouterr().out
    assert "mni_icbm152_t1" in out and "embedding  (1, 48)" in out and "encode" in out


def test_encode_reports_bad_input(tmp_path, capsys):
    assert main(["encode", str(tmp_path / "missing.nii.gz")]) == 2
    assert "missing.nii.gz: no such file" in capsys.readouterr().err
