"""Robustness curves, random init against pretrained: a PneumoniaMNIST classifier under `robustness/cxr.yaml`
and an MSD hippocampus segmenter under `robustness/mr.yaml`, with the classifier's ECE before / after its
temperature. Prints the markdown tables of benchmarks/RESULTS.md ("Robustness curves") and writes
benchmarks/figures/robustness_<task>.png (each family's metric against severity, both inits).

    python benchmarks/robustness_curves.py [--steps 300] [--out runs/robustness_curves]

Every run is what a user gets at `--profile cpu`: `medfm pretrain mae_vit_2d|mae_vit_3d` on the set's own
training images (the pretrained init), `medfm finetune classify_2d --method linear_probe` (PneumoniaMNIST) and
`medfm finetune segment_3d --method full` (hippocampus, 3 classes, at 1 mm, 1,000 steps), then `medfm evaluate RUN --split val
--robustness cxr|mr`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfm.cli import main  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
TASKS = {
    "pneumonia": {"data": SHARED / "pneumoniamnist" / "pneumoniamnist_trainval.npz", "pretrain": "mae_vit_2d",
                  "task": "classify_2d", "spec": "cxr", "args": ["--method", "linear_probe"]},
    "hippocampus": {"data": SHARED / "msd_hippocampus" / "manifest.csv", "pretrain": "mae_vit_3d",
                    "task": "segment_3d", "spec": "mr", "pre_args": ["data.preset_args.spacing=1.0"],
                    # the hippocampus crops are 35 x 50 x 35 mm: at the CPU profile's 3 mm it is a few voxels
                    "args": ["--method", "full", "segmentation.num_classes=3", "data.preset_args.spacing=1.0",
                             "trainer.max_steps=1000"]},
}


def quiet(args: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(args)
    assert code == 0, f"medfm {' '.join(args)} failed"


def runs_for(name: str, t: dict, out: Path, steps: int) -> dict[str, Path]:
    pre = out / f"{name}_pretrain_mae"
    if not (pre / "encoder").exists():
        quiet(["pretrain", t["pretrain"], "--data", str(t["data"]), "--out", str(pre), "--profile", "cpu",
               "--max-steps", str(steps), "--overwrite", *t.get("pre_args", [])])
    runs = {}
    for init, extra in (("random", []), ("mae", ["--encoder", str(pre)])):
        run = out / f"{name}_{init}"
        if not (run / "metrics.json").exists():
            quiet(["finetune", t["task"], "--data", str(t["data"]), "--out", str(run), "--profile", "cpu",
                   "--overwrite", "data.test_split=null", *t["args"], *extra])
        if not (run / "robustness_val" / "metrics.json").exists():
            quiet(["evaluate", str(run), "--split", "val", "--robustness", t["spec"]])
        runs[init] = run
    return runs


def report(name: str, runs: dict[str, Path], figure: Path) -> None:
    rob = {init: json.loads((run / "robustness_val" / "metrics.json").read_text())["robustness"] for init, run in runs.items()}
    first = next(iter(rob.values()))
    metric = first["metric"]
    print(f"\n{name}: {metric} on val, clean " + ", ".join(f"{i} {r['clean']:.3f}" for i, r in rob.items())
          + f"; spec {first['spec']} (tolerance = largest drop allowed)\n")
    print("| family | severity | " + " | ".join(f"{i} {metric} (drop)" for i in rob) + " |")
    print("|---|---|" + "---:|" * len(rob))
    for fam, f in first["families"].items():
        for sev in f["severities"]:
            cells = [f"{r['families'][fam]['severities'][sev]['value']:.3f} ({r['families'][fam]['severities'][sev]['drop']:+.3f})"
                     for r in rob.values()]
            print(f"| {fam} | {sev} | " + " | ".join(cells) + " |")
    print("| **worst drop / passed** | | " + " | ".join(
        f"{max(f['worst_drop'] for f in r['families'].values()):+.3f} / "
        f"{sum(f['passed'] for f in r['families'].values())} of {len(r['families'])} families" for r in rob.values()) + " |")
    metrics = {init: json.loads((run / "metrics.json").read_text())["val"] for init, run in runs.items()}
    if "ece" in next(iter(metrics.values())):
        print("\n| init | val AUROC | temperature | ECE at T = 1 | ECE at T (fitted on val: in-sample) | NLL at T = 1 | NLL at T |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for init, m in metrics.items():
            print(f"| {init} | {m['auroc']:.3f} | {m['temperature']:.2f} | {m['ece_uncalibrated']:.3f} | {m['ece']:.3f} | "
                  f"{m['nll_uncalibrated']:.3f} | {m['nll']:.3f} |")
    fams = list(first["families"])
    cols = 4
    rows = -(-len(fams) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        for init, r in rob.items():
            sev = [0.0] + [float(s) for s in r["families"][fam]["severities"]]
            val = [r["clean"]] + [v["value"] for v in r["families"][fam]["severities"].values()]
            ax.plot(sev, val, marker="o", label=init)
        ax.set_title(fam, fontsize=9)
        ax.set_xlabel("severity", fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{name}: {metric} under {first['spec']} perturbations, random init vs MAE-pretrained", fontsize=10)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    plt.close(fig)


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="MAE pretraining steps")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--out", default=str(REPO / "runs" / "robustness_curves"))
    args = ap.parse_args()
    out = Path(args.out)
    for name in args.tasks:
        runs = runs_for(name, TASKS[name], out, args.steps)
        report(name, runs, REPO / "benchmarks" / "figures" / f"robustness_{name}.png")


if __name__ == "__main__":
    main_()
