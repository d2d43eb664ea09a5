"""Reliability: kill -9 and SIGTERM at each stage of a pretraining and a fine-tuning run, then `--resume`,
checked against an uninterrupted run; and each hostile-input class through the command line. Prints the
markdown table of benchmarks/RESULTS.md ("Reliability").

    python benchmarks/reliability.py [--out runs/reliability]

Tiny runs (`--profile tiny`, ViT-Micro, 8 steps, checkpoints every 2) on 32 axial MNI152 slices that ship
with nilearn; the fault harness is tests/fault_injection.py (the same one the test suite uses).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfm.cli import main  # noqa: E402
from medfm.data import samples  # noqa: E402
from tests.fault_injection import partial_files, run_killed, same_result, tiny_argv as argv  # noqa: E402

STAGES = [("pretrain", "step", "SIGKILL"), ("pretrain", "step", "SIGTERM"), ("pretrain", "checkpoint", "SIGKILL"),
          ("pretrain", "export", "SIGKILL"), ("finetune", "step", "SIGKILL"), ("finetune", "step", "SIGTERM"),
          ("finetune", "checkpoint", "SIGKILL"), ("finetune", "evaluation", "SIGKILL"), ("finetune", "export", "SIGKILL")]


def quiet(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(args)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("medfm ")]
    return code, lines[-1] if lines else ""


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "reliability"))
    out = Path(ap.parse_args().out)
    shutil.rmtree(out, ignore_errors=True)
    data = str(samples.mni152_slices(out / "slices", n=32, size=32))
    whole = {k: out / f"whole_{k}" for k in ("pretrain", "finetune")}
    for kind, run in whole.items():
        assert quiet(argv(kind, data, run))[0] == 0
    print("| case | stage / input | signal | exit code | resumed with `--resume` | nothing lost (vs uninterrupted) |")
    print("|---|---|---|---|---|---|")
    for kind, stage, sig in STAGES:
        run = out / f"{kind}_{stage}_{sig}"
        killed = run_killed(stage, sig, argv(kind, data, run), at=3, cwd=REPO)
        code, _ = quiet([*argv(kind, data, run), "--resume"])
        ok, why = same_result(run, whole[kind]) if code == 0 else (False, "resume failed")
        left = partial_files(run)
        verdict = "yes: bit-identical weights, same metrics, no partial files" if ok and not left else f"NO: {why} {left}"
        print(f"| {kind} | {stage} | {sig} | {killed.returncode} | exit {code} | {verdict} |", flush=True)
    bad_inputs(out, data)


def bad_inputs(out: Path, data: str) -> None:
    """Every hostile file of the test corpus through `medfm encode`, and bad recipe values / arguments."""
    from tests.test_hostile_inputs import CORPUS

    files = out / "hostile"
    files.mkdir()
    print("\n| hostile input | command | exit code | the one line printed |")
    print("|---|---|---|---|")
    for name, (make, _) in CORPUS.items():
        path = make(files)
        code, line = quiet(["encode", str(path)])
        print(f"| {name} | `medfm encode FILE` | {code} | {line.replace(str(files) + '/', '')[:160]} |", flush=True)
    run = ["pretrain", "mae_vit_2d", "--profile", "tiny", "--data", data, "--out", str(out / "x")]
    import os

    import torch

    from tests.test_faults import _Planted

    planted = files / "planted.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "hook": _Planted(str(files / "pwned"))}, planted)
    resumable = out / "whole_pretrain"
    ckpt = torch.load(resumable / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"] = {"x": _Planted(str(files / "pwned"))}
    torch.save(ckpt, resumable / "checkpoints" / "last.ckpt")
    evil = files / "evil.yaml"
    evil.write_text("method: mae\nseed: !!python/object/apply:os.system ['true']\n")
    for name, args in (("misspelled trainer key", [*run, "trainer.max_step=3"]),
                       ("misspelled encoder key", [*run, "encoder.patch_sise=4"]),
                       ("absurd img_size", [*run, "encoder.img_size=100000"]),
                       ("negative step budget", [*run, "--max-steps", "-5"]),
                       ("misspelled split", [*run[:-2], "--out", str(out / "y"), "data.split=training"]),
                       ("YAML python tag", ["pretrain", str(evil), "--out", str(out / "z")]),
                       ("unwritable --out", [*run[:-2], "--out", "/proc/medfm"]),
                       ("3D preset on a PNG", ["encode", str(next(Path(data).parent.glob("*.png"))), "--preset", "ct_3d"]),
                       ("planted pickle as --encoder weights", ["finetune", "classify_2d", "--profile", "tiny",
                                                                "--encoder", str(planted), "--data", data, "--out",
                                                                str(out / "w"), "classification.label=level"]),
                       ("planted pickle in the resume checkpoint", [*argv("pretrain", data, resumable), "--resume"])):
        code, line = quiet(args)
        if os.path.exists(files / "pwned"):
            line = "CODE RAN: " + line
        print(f"| {name} | `medfm {args[0]} ...` | {code} | {line.replace(str(out) + '/', '')[:160]} |", flush=True)


if __name__ == "__main__":
    main_()
