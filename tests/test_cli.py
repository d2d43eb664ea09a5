"""The ``medfm`` command: installed entry point, ``info``, ``encode``."""

from __future__ import annotations

import pytest

import sys
from pathlib import Path

from medfm.cli import main
from medfm.encoders import list_encoders


def test_info_lists_versions_device_encoders(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in ("torch", "monai", "timm", "device", "cpu", "recipes", *list_encoders()):
        assert text in out


def test_entry_point_is_installed(capsys):
    """The console script exists and points at ``medfm.cli:main`` (test_quickstart.py runs it, as `make demo` does)."""
    from importlib.metadata import entry_points

    exe = Path(sys.executable).parent / "medfm"
    assert exe.exists(), f"{exe} missing: pip did not install the console script"
    [script] = [e for e in entry_points(group="console_scripts") if e.name == "medfm"]
    assert script.value == "medfm.cli:main" and script.load() is main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "info" in out and "encode" in out and "quickstart" in out


def test_encode_mni152(capsys):
    assert main(["encode", "--encoder", "vit_micro", "--size", "32", "--spacing", "6"]) == 0
    out = capsys.readouterr().out
    assert "mni_icbm152_t1" in out and "embedding  (1, 48)" in out and "encode" in out


def test_encode_reports_bad_input(tmp_path, capsys):
    assert main(["encode", str(tmp_path / "missing.nii.gz")]) == 2
    assert "missing.nii.gz: no such file" in capsys.readouterr().err


def test_evaluate_options_are_a_contract(mae_run, classification_run, slices, capsys):
    """Each run kind declares the options its evaluation takes: one it does not take is one line and exit 2
    (before, `medfm evaluate MAE_RUN --groups site` ignored --groups without a word)."""
    capsys.readouterr()
    assert main(["evaluate", str(mae_run), "--data", slices, "--label", "level", "--groups", "site"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--groups does not apply" in err and "pretrain run of mae" in err, err
    assert "--label" in err  # what it does take
    assert main(["evaluate", str(classification_run), "--label", "level"]) == 2
    assert "--label does not apply" in capsys.readouterr().err
    # what the kinds do take still runs
    assert main(["evaluate", str(mae_run), "--data", slices, "--label", "level", "--split", "val"]) == 0
    assert main(["evaluate", str(classification_run), "--split", "val", "--out", str(mae_run.parent / "eval")]) == 0
    assert "auroc" in capsys.readouterr().out


def test_every_plugin_declares_what_its_evaluate_takes():
    """``evaluate_options`` names exactly the keyword arguments of the plug-in's ``evaluate`` (no ``**_`` that
    swallows an option), for every registered plug-in of every kind."""
    import inspect

    from medfm.run import KINDS

    for kind in KINDS.values():
        for name, cls in kind.registry.items():
            params = [p for p in inspect.signature(cls.evaluate).parameters.values() if p.name not in ("self", "run")]
            assert all(p.kind is not p.VAR_KEYWORD for p in params), f"{kind.registry.kind} {name}: **kwargs in evaluate"
            assert set(cls.evaluate_options) == {p.name for p in params}, (name, cls.evaluate_options, params)
