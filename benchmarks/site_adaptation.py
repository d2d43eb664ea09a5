"""Adaptation to a new site without its labels, on breast ultrasound (../shared/data/breast_us): source-only,
in-domain, an oracle trained on the target's own labels, each `medfm adapt` method and the appearance
augmentation, in three directions. Prints the markdown tables of benchmarks/RESULTS.md ("Adaptation to a new
site") and writes benchmarks/figures/site_adaptation.png.

    python benchmarks/site_adaptation.py [--seeds 0 1 2] [--steps 200] [--out runs/site_adaptation]

Directions (the target rows split into an *adapt* half, whose images the methods see without labels and on
whose labels the oracle trains, and an *eval* half that scores everyone, by near-duplicate group / patient):

* BUS-BRA -> BUSI: source trained on BUS-BRA train (val: BUS-BRA val); target BUSI;
* BUSI -> BUS-BRA: source trained on BUSI's adapt half (val: its eval half); target adapt = BUS-BRA train,
  eval = BUS-BRA val (the oracle is then the BUS-BRA model of the first direction, the same budget);
* GE Logiq 5 -> GE Logiq 7 (both BUS-BRA): source on Logiq 5 train (val: Logiq 5 val), target Logiq 7.

Every model is what a user gets from `medfm finetune classify_2d --profile cpu --method lora` (ViT-Tiny/8, 64 px,
random init) with ``--steps`` steps; every adaptation is `medfm adapt RUN --method M` with its defaults. The
share of the gap closed is (method - source) / (oracle - source) in mean target AUROC, given only where the
oracle is above the source. BUSI's 53 "normal" images
are left out (benign vs malignant only).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medfm.cli import main  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "breast_us"
METHODS = ("norm", "tent", "lora_entropy", "shot")


def halves(rows: list[dict], seed: int = 0, share: float = 0.6) -> tuple[list[dict], list[dict]]:
    """Rows split by group (near-duplicate group, else patient, else the image itself): ``share`` of the groups
    in the first part."""
    key = lambda r: r["near_dup_group"] or (f"{r['dataset']}:{r['patient']}" if r["patient"] else r["image"])  # noqa: E731
    groups = sorted({key(r) for r in rows})
    rng = np.random.default_rng(seed)
    first = set(rng.permutation(groups)[: int(round(share * len(groups)))].tolist())
    return [r for r in rows if key(r) in first], [r for r in rows if key(r) not in first]


def manifests(out: Path) -> dict[str, Path]:
    """One manifest per direction with splits train / val / adapt / eval (absolute image paths)."""
    rows = [r for r in csv.DictReader(open(DATA / "manifest.csv")) if r["label"] in ("benign", "malignant")]
    for r in rows:
        r["image"] = str(DATA / r["image"])
        r["mask"] = str(DATA / r["mask"]) if r["mask"] else ""
    bra = [r for r in rows if r["dataset"] == "BUS-BRA"]
    busi_adapt, busi_eval = halves([r for r in rows if r["dataset"] == "BUSI"])
    tr, va = [r for r in bra if r["split"] == "train"], [r for r in bra if r["split"] == "val"]
    l5, l7 = (lambda rs: [r for r in rs if "Logiq 5" in r["device"]]), (lambda rs: [r for r in rs if "Logiq 7" in r["device"]])
    plans = {
        "busbra_to_busi": {"train": tr, "val": va, "adapt": busi_adapt, "eval": busi_eval},
        "busi_to_busbra": {"train": busi_adapt, "val": busi_eval, "adapt": tr, "eval": va},
        "logiq5_to_logiq7": {"train": l5(tr), "val": l5(va), "adapt": l7(tr), "eval": l7(va)},
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, splits in plans.items():
        paths[name] = out / f"{name}.csv"
        with open(paths[name], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for split, rs in splits.items():
                w.writerows([{**r, "split": split} for r in rs])
    return paths


def quiet(args: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(args)


def train(data: Path, out: Path, seed: int, steps: int, train_split: str = "train", val_split: str = "val",
          appearance: float = 0.0) -> Path:
    if not (out / "model" / "model.safetensors").exists():
        code = quiet(["finetune", "classify_2d", "--data", str(data), "--out", str(out), "--profile", "cpu",
                      "--method", "lora", "--overwrite", "classification.label=label", f"seed={seed}",
                      f"trainer.max_steps={steps}", f"data.train_split={train_split}", f"data.val_split={val_split}",
                      "data.test_split=null", f"data.appearance={appearance}"])
        assert code == 0, f"training {out} failed"
    return out


def auroc(run: Path, data: Path, split: str) -> float:
    dest = run / f"eval_{data.stem}_{split}"
    if not (dest / "metrics.json").exists():
        assert quiet(["evaluate", str(run), "--data", str(data), "--split", split, "--out", str(dest)]) == 0
    return json.loads((dest / "metrics.json").read_text())[split]["auroc"]


def in_domain(run: Path) -> float:
    m = json.loads((run / "metrics.json").read_text())
    val = next(v for k, v in m.items() if isinstance(v, dict) and "auroc" in v)
    return val["auroc"]


def direction(name: str, data: Path, out: Path, seed: int, steps: int, models: dict) -> dict:
    """Every row of one direction and seed: {row name: (target AUROC, in-domain AUROC or None)}."""
    source = models[(name, "source")]
    res = {"source-only": (auroc(source, data, "eval"), in_domain(source)),
           "oracle (target labels)": (auroc(models[(name, "oracle")], data, "eval"), None)}
    for method in METHODS:
        run = out / f"{name}_s{seed}_{method}"
        if not (run / "metrics.json").exists():
            quiet(["adapt", str(source), "--data", str(data), "--split", "adapt", "--method", method,
                   "--out", str(run), "--overwrite"])
        if not (run / "model").exists():  # collapsed (the guard kept its weights out) or failed
            res[method] = (float("nan"), float("nan"))
            continue
        res[method] = (auroc(run, data, "eval"), in_domain(run))
    app = models[(name, "appearance")]
    res["appearance augmentation"] = (auroc(app, data, "eval"), in_domain(app))
    return res


def main_() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--directions", nargs="+", default=["busbra_to_busi", "busi_to_busbra", "logiq5_to_logiq7"])
    ap.add_argument("--out", default=str(REPO / "runs" / "site_adaptation"))
    ap.add_argument("--report", action="store_true", help="tables and figure from OUT/results.json, nothing run")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report:
        results = json.loads((out / "results.json").read_text())
        table(results)
        figure(results, REPO / "benchmarks" / "figures" / "site_adaptation.png")
        return
    paths = manifests(out / "data")
    results: dict = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for seed in args.seeds:
        bra = train(paths["busbra_to_busi"], out / f"busbra_s{seed}", seed, args.steps)
        busi = train(paths["busi_to_busbra"], out / f"busi_s{seed}", seed, args.steps)
        m = {("busbra_to_busi", "source"): bra, ("busbra_to_busi", "oracle"): busi,
             ("busi_to_busbra", "source"): busi, ("busi_to_busbra", "oracle"): bra}
        for name in args.directions:
            if name == "logiq5_to_logiq7":
                m[(name, "source")] = train(paths[name], out / f"logiq5_s{seed}", seed, args.steps)
                m[(name, "oracle")] = train(paths[name], out / f"logiq7_s{seed}", seed, args.steps, "adapt", "adapt")
            m[(name, "appearance")] = train(paths[name], out / f"{name}_s{seed}_appearance", seed, args.steps,
                                            appearance=0.8)
            res = direction(name, paths[name], out, seed, args.steps, m)
            results.setdefault(name, {})[str(seed)] = res
            (out / "results.json").write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in res.items()), flush=True)
    table(results)
    figure(results, REPO / "benchmarks" / "figures" / "site_adaptation.png")


def figure(results: dict, path: Path) -> None:
    """Target AUROC per model and direction (mean and each seed), source-only and oracle as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, by_seed) in zip(axes[0], results.items()):
        rows = list(next(iter(by_seed.values())))
        vals = np.array([[by_seed[s][r][0] for r in rows] for s in sorted(by_seed)], dtype=float)
        ax.bar(range(len(rows)), np.nanmean(vals, 0), color=["grey", "black"] + ["tab:blue"] * (len(rows) - 3) + ["tab:orange"])
        for v in vals:
            ax.plot(range(len(rows)), v, "k.", ms=4)
        for i, style in ((0, "--"), (1, ":")):
            ax.axhline(np.nanmean(vals[:, i]), color="k", ls=style, lw=0.8)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.replace(" (target labels)", "").replace(" augmentation", "") for r in rows], rotation=40,
                           ha="right", fontsize=8)
        ax.set_ylim(0.4, 0.9)
        ax.set_title(name.replace("_to_", " -> "), fontsize=10)
        ax.set_ylabel("target AUROC (eval half)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> None:
    for name, by_seed in results.items():
        seeds = sorted(by_seed)
        rows = list(by_seed[seeds[0]])
        get = lambda row, i: np.array([by_seed[s][row][i] if by_seed[s][row][i] is not None else np.nan  # noqa: E731
                                       for s in seeds], dtype=float)
        src, orc = get("source-only", 0), get("oracle (target labels)", 0)
        src_in = get("source-only", 1)
        print(f"\n{name} ({len(seeds)} seed(s): {', '.join(seeds)})\n")
        print("| model | target AUROC (eval half) | share of the source-to-oracle gap closed | in-domain AUROC | "
              "in-domain change |")
        print("|---|---:|---:|---:|---:|")
        gap = np.mean(orc) - np.mean(src)
        for row in rows:
            t, d = get(row, 0), get(row, 1)
            # the share is only meaningful where the oracle beats the source (by more than seed noise)
            closed = ("" if row in ("source-only", "oracle (target labels)") else
                      "n/a: oracle not above source" if gap <= 0.01 else f"{(np.nanmean(t) - np.mean(src)) / gap:+.2f}")
            if np.isnan(t).any():
                closed += f" ({int(np.isnan(t).sum())} collapsed)"
            dom = "" if np.all(np.isnan(d)) else f"{np.nanmean(d):.3f} ± {np.nanstd(d):.3f}"
            change = "" if np.all(np.isnan(d)) or row == "source-only" else f"{np.nanmean(d - src_in):+.3f}"
            print(f"| {row} | {np.nanmean(t):.3f} ± {np.nanstd(t):.3f} | {closed} | {dom} | {change} |")


if __name__ == "__main__":
    main_()
