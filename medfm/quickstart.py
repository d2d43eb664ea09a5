"""``medfm quickstart``: the main job end to end, small enough for a laptop CPU, with no data and no network.

Six steps, each an ordinary run of the run layer (the same recipes as ``medfm pretrain`` / ``finetune``,
shrunk by :class:`Scale`), on real data that ships with the installed packages:

1. ``pretrain_3d``: a 3D ViT pretrained on the randomized-synthesis engine alone (``synth_seg``: segment
   the engine's random label maps; no real image seen);
2. ``segment_3d``: brain-tissue segmentation of the MNI152 template (nilearn): trained on the left
   hemisphere, Dice on the right one, from that encoder and from random init;
3. ``pretrain_2d``: MAE pretraining of a 2D ViT on axial MNI152 slices (``train`` split);
4. ``probe_2d``: a linear probe of that encoder against random init (which quarter of the brain's height
   a slice is from);
5. ``report``: report generation on engine volumes with templated reports (3D, the step-1 encoder);
6. ``diffusion``: a class-conditioned 2D diffusion generator on the slices, sampled into a grid.

It prints a table and writes ``OUT/report.md`` (what ran, what came out, where the weights are),
``OUT/results.json`` and ``OUT/summary.png``; each step's run folder holds its own figures. ``data``
points a step at the user's own files (see :data:`DATA_KEYS`). ``fast`` is the ~1-minute version the
test suite runs (numbers from it show that the job works, not how well).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from medfm.atomic import write_json, write_text
from medfm.data import samples
from medfm.finetune import load_task_recipe, run_finetune
from medfm.generate import export_generated, load_generator_recipe, run_generator
from medfm.pretrain import load_recipe, run_pretrain
from medfm.run import find_recipe


@dataclass(frozen=True)
class Scale:
    """Step budgets and sizes (the recipes' other values are their own defaults)."""

    pretrain_3d_steps: int
    segment_steps: int
    pretrain_2d_steps: int
    probe_steps: int
    report_volumes: int
    report_steps: int
    diffusion_steps: int
    slices: int
    spacing: float = 3.0  # mm: MNI152 hemispheres at 3 mm are about 33 x 78 x 63 voxels
    size_2d: int = 32
    size_3d: int = 32


FULL = Scale(pretrain_3d_steps=600, segment_steps=400, pretrain_2d_steps=1500, probe_steps=200, report_volumes=96,
             report_steps=300, diffusion_steps=1500, slices=96)
FAST = Scale(pretrain_3d_steps=4, segment_steps=4, pretrain_2d_steps=4, probe_steps=4, report_volumes=8,
             report_steps=3, diffusion_steps=4, slices=16, spacing=4.0)

DATA_KEYS = {
    "segment_3d": "a manifest with image, mask (label maps 0..K-1) and split train/val columns",
    "images_2d": "an npz (MedMNIST) or a manifest with image, split and a `level`-like label column "
                 "(--label); used by pretrain_2d, probe_2d and diffusion",
    "report": "a manifest with image, text and split train/dev columns (3D volumes)",
}
STEPS = ("pretrain_3d", "segment_3d", "pretrain_2d", "probe_2d", "report", "diffusion")
NEEDS = {"segment_3d": "pretrain_3d", "probe_2d": "pretrain_2d", "report": "pretrain_3d"}  # the encoder they use

TINY_VIT_3D = {"name": "vit_micro", "spatial_dims": 3, "img_size": 32, "patch_size": 4}
TINY_VIT_2D = {"name": "vit_micro", "spatial_dims": 2, "img_size": 32, "patch_size": 4}


def _trainer(steps: int) -> dict:
    return {"max_steps": steps, "log_every_n_steps": max(1, min(10, steps // 4)),
            "checkpoint_every_n_steps": max(steps, 1)}


def _losses(run: Path) -> list[float]:
    with open(run / "logs" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _loss_drop(run: Path) -> str:
    curve = _losses(run)
    return f"loss {curve[0]:.3f} -> {curve[-1]:.3f}" if curve else "loss not logged"


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _num_labels(manifest: str | Path, column: str = "mask") -> int:
    """Label values in the masks of a manifest (max + 1), read once so a user's set needs no class count."""
    import numpy as np

    from medfm.data import load, read_records

    records, _, _ = read_records(manifest, mask_key=column)  # paths resolved, bad rows named by their line
    masks = [r.mask for r in records if r.mask]
    if not masks:
        raise ValueError(f"{manifest}: no row names a {column!r} file")
    return 1 + max(int(np.asarray(load(m)["image"]).max()) for m in masks)


class Quickstart:
    """The quickstart's steps; ``run()`` executes them in order and writes the report (see the module)."""

    def __init__(self, out: str | os.PathLike, fast: bool = False, data: dict[str, str] | None = None,
                 label: str = "level"):
        self.out = Path(out)
        self.scale = FAST if fast else FULL
        self.fast = fast
        self.data = dict(data or {})
        unknown = set(self.data) - set(DATA_KEYS)
        if unknown:
            raise ValueError(f"--data {sorted(unknown)[0]}=...: unknown step; steps that take data: "
                             + "; ".join(f"{k} ({v})" for k, v in DATA_KEYS.items()))
        self.label = label
        if self.out.exists() and any(self.out.iterdir()):
            if not (self.out / "results.json").exists() and not (self.out / "data").exists():
                raise FileExistsError(f"{self.out} exists and is not an earlier quickstart folder; give another --out")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.runs: dict[str, Path] = {}

    # ------------------------------------------------------------- steps
    def pretrain_3d(self) -> dict:
        s = self.scale
        cfg = load_recipe(find_recipe("synth_seg_3d"), {
            "encoder": TINY_VIT_3D, "synth_seg": {"feature_size": 8},
            "data": {"batch_size": 2, "num_workers": 0, "synthetic": {"size": s.size_3d}},
            "optim": {"lr": 1e-3, "warmup_steps": min(20, s.pretrain_3d_steps // 5)},
            "trainer": _trainer(s.pretrain_3d_steps)})
        run = self.runs["pretrain_3d"] = run_pretrain(cfg, self.out / "pretrain_3d")
        return {"result": _loss_drop(run) + " (Dice + CE on engine label maps)", "where": run / "encoder"}

    def segment_3d(self) -> dict:
        manifest = self.data.get("segment_3d") or samples.mni152_hemispheres(self.out / "data" / "mni152_hemispheres",
                                                                                csf=True)
        n = _num_labels(manifest)
        names = list(samples.TISSUE_NAMES[:n]) if "segment_3d" not in self.data else None
        with warnings.catch_warnings():  # the demo's own MNI152 at its documented coarse spacing: not a note for the user to act on
            if "segment_3d" not in self.data:
                warnings.filterwarnings("ignore", message=".*resampled from its native spacing")
            dice = self._segment_3d_runs(manifest, n, names)
        detail = ", ".join(f"{k} {v:.2f}" for k, v in dice["pretrained"]["dice"].items())
        return {"result": f"mean Dice {dice['pretrained']['mean_dice']:.3f} ({detail})",
                "baseline": f"mean Dice {dice['random init']['mean_dice']:.3f}",
                "value": dice["pretrained"]["mean_dice"], "metric": "mean Dice", "baseline_value": dice["random init"]["mean_dice"],
                "where": self.runs["segment_3d"] / "model"}

    def _segment_3d_runs(self, manifest, n: int, names) -> dict[str, dict]:
        s = self.scale
        return self._against_random_init("segment_3d", "pretrain_3d", manifest, lambda weights: load_task_recipe(
            find_recipe("segment_3d", kind="tasks"), {
                "method": "full", "encoder": {**TINY_VIT_3D, "pretrained": weights},
                "segmentation": {"num_classes": n, "class_names": names, "feature_size": 8, "hd95": False},
                "data": {"preset_args": {"spacing": s.spacing}, "batch_size": 2, "num_workers": 0, "test_split": None},
                "optim": {"lr": 1e-3, "warmup_steps": min(10, s.segment_steps // 5)},
                "trainer": _trainer(s.segment_steps)}))

    def _against_random_init(self, step: str, encoder_step: str, data, recipe) -> dict[str, dict]:
        """The same fine-tuning (``recipe(weights)``) from ``encoder_step``'s encoder and from random init, in
        the run folders ``step`` and ``step_random``: their validation metrics by init."""
        val = {}
        for init, weights in (("pretrained", str(self.runs[encoder_step] / "encoder")), ("random init", None)):
            key = step + ("" if weights else "_random")
            run = self.runs[key] = run_finetune(recipe(weights), self.out / key, data_path=str(data))
            val[init] = _metrics(run)["val"]
        return val

    @functools.cached_property
    def images_2d(self) -> tuple[str, str | None]:
        """The 2D set (the MNI152 slices are written once, for the three steps that use them) and its label
        column (None for an npz, which carries its labels)."""
        if "images_2d" in self.data:
            path = self.data["images_2d"]
            return path, None if str(path).endswith(".npz") else self.label
        return str(samples.mni152_slices(self.out / "data" / "mni152_slices", n=self.scale.slices, size=64)), "level"

    def pretrain_2d(self) -> dict:
        s = self.scale
        path, _ = self.images_2d
        cfg = load_recipe(find_recipe("mae_vit_2d"), {
            "encoder": TINY_VIT_2D, "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
            "data": {"batch_size": 16, "num_workers": 0}, "probe": {"every_n_steps": 0},
            "optim": {"lr": 1e-3, "warmup_steps": min(20, s.pretrain_2d_steps // 5)},
            "trainer": _trainer(s.pretrain_2d_steps)})
        run = self.runs["pretrain_2d"] = run_pretrain(cfg, self.out / "pretrain_2d", data_path=path)
        return {"result": _loss_drop(run) + " (masked-patch reconstruction)", "where": run / "encoder"}

    def probe_2d(self) -> dict:
        s = self.scale
        path, label = self.images_2d
        val = self._against_random_init("probe_2d", "pretrain_2d", path, lambda weights: load_task_recipe(
            find_recipe("classify_2d", kind="tasks"), {
                "method": "linear_probe", "encoder": {**TINY_VIT_2D, "pretrained": weights},
                "classification": {"label": label}, "data": {"batch_size": 16, "num_workers": 0, "test_split": None},
                "optim": {"lr": 1e-2, "warmup_steps": 0}, "trainer": _trainer(s.probe_steps)}))
        auroc = {init: m["auroc"] for init, m in val.items()}
        return {"result": f"val AUROC {auroc['pretrained']:.3f}", "baseline": f"val AUROC {auroc['random init']:.3f}",
                "value": auroc["pretrained"], "metric": "val AUROC", "baseline_value": auroc["random init"], "where": self.runs["probe_2d"] / "model"}

    def report(self) -> dict:
        from medfm.synthetic.reports import ATTRIBUTES, synthetic_report_set

        s = self.scale
        manifest = self.data.get("report") or synthetic_report_set(s.report_volumes, self.out / "data" / "reports",
                                                                    size=s.size_3d, progress=False)
        attributes = {} if "report" in self.data else {k: list(v) for k, v in ATTRIBUTES.items()}
        cfg = load_task_recipe(find_recipe("report_3d", kind="tasks"), {
            "method": "linear_probe", "encoder": {**TINY_VIT_3D, "pretrained": str(self.runs["pretrain_3d"] / "encoder")},
            "report_generation": {"decoder_layers": 1, "vocab_size": 400, "max_length": 32, "eval_batch_size": 8,
                                  "examples": 4, "meteor": False, "attributes": attributes,
                                  "generation": {"num_beams": 2, "max_new_tokens": 24, "no_repeat_ngram_size": 3}},
            "data": {"val_split": "dev", "test_split": None, "preset": "mr_3d", "preset_args": {"spacing": 1.0},
                     "batch_size": 4, "num_workers": 0},
            "optim": {"lr": 1e-3, "warmup_steps": 2}, "trainer": _trainer(s.report_steps)})
        run = self.runs["report"] = run_finetune(cfg, self.out / "report", data_path=str(manifest))
        dev = _metrics(run)["dev"]
        model = dev["model"]
        named = "".join(f", {a} named right {v['accuracy']:.2f}" for a, v in model.get("attributes", {}).items())
        baseline = next((k for k in dev if k not in ("n", "model") and isinstance(dev[k], dict)), None)
        row = {"result": f"BLEU-4 {model['bleu_4']:.3f}{named}", "value": model["bleu_4"], "metric": "dev BLEU-4",
               "where": run / "model", "extra": _loss_drop(run)}
        if baseline:
            row.update(baseline=f"{baseline}: BLEU-4 {dev[baseline]['bleu_4']:.3f}", baseline_value=dev[baseline]["bleu_4"])
        return row

    def diffusion(self) -> dict:
        from medfm.artifacts import load as load_artifact

        s = self.scale
        path, label = self.images_2d
        cfg = load_generator_recipe(find_recipe("diffusion_2d", kind="generators"), {
            "diffusion": {"image_size": s.size_2d, "channels": [16, 32], "attention": [False, True],
                          "head_channels": 16, "sample_steps": 10 if self.fast else 25, "preview": 8},
            "data": {"batch_size": 16, "num_workers": 0, **({"label": label} if label else {})},
            "optim": {"lr": 2e-3, "warmup_steps": min(20, s.diffusion_steps // 5)},
            "trainer": _trainer(s.diffusion_steps)})
        run = self.runs["diffusion"] = run_generator(cfg, self.out / "diffusion", data_path=path)
        generator = load_artifact(run)
        names = generator.spec.class_names or []
        manifest = export_generated(generator, self.out / "diffusion" / "generated", classes=[names[i % len(names)]
                                    for i in range(8)], steps=10 if self.fast else 25, progress=False)
        return {"result": _loss_drop(run) + f"; 8 samples ({', '.join(names)})", "where": manifest.parent / "grid.png"}

    # ------------------------------------------------------------- driver
    def run(self, steps: tuple[str, ...] = STEPS) -> list[dict]:
        unknown = set(steps) - set(STEPS)
        if unknown:
            raise ValueError(f"unknown quickstart step(s) {sorted(unknown)}; steps: {', '.join(STEPS)}")
        wanted = set(steps) | {NEEDS[s] for s in steps if s in NEEDS}
        steps = tuple(s for s in STEPS if s in wanted)
        titles = {"pretrain_3d": "3D encoder pretrained on the synthesis engine",
                  "segment_3d": "3D tissue segmentation (MNI152 right hemisphere)",
                  "pretrain_2d": "2D encoder, MAE on brain slices",
                  "probe_2d": "2D linear probe (slice level)",
                  "report": "report generation (3D, templated reports)",
                  "diffusion": "class-conditioned 2D diffusion"}
        if "segment_3d" in self.data:
            titles["segment_3d"] = f"3D segmentation ({self.data['segment_3d']})"
        if "images_2d" in self.data:
            titles["probe_2d"] = f"2D linear probe ({self.data['images_2d']})"
        if "report" in self.data:
            titles["report"] = f"report generation ({self.data['report']})"
        for i, step in enumerate(steps, 1):
            print(f"\n[{i}/{len(steps)}] {titles[step]}", flush=True)
            t0 = time.perf_counter()
            row = getattr(self, step)()
            row.update(step=step, title=titles[step], seconds=round(time.perf_counter() - t0, 1))
            self.rows.append(row)
            print(f"[{i}/{len(steps)}] {row['result']}" + (f"  (vs {row['baseline']})" if row.get("baseline") else "")
                  + f"  [{row['seconds']:.0f} s]", flush=True)
        self.write_report()
        return self.rows

    def table(self) -> str:
        lines = ["| step | result | baseline | time (s) |", "|---|---|---|---|"]
        lines += [f"| {r['title']} | {r['result']} | {r.get('baseline', '')} | {r['seconds']:.0f} |" for r in self.rows]
        return "\n".join(lines)

    def write_report(self) -> Path:
        """``report.md`` (what ran, what came out, where the weights are), ``results.json``, ``summary.png``."""
        from medfm.run.trainer import device_description

        total = sum(r["seconds"] for r in self.rows)
        figure = self.summary_png()
        md = [f"# medfm quickstart ({'fast' if self.fast else 'full'})", "",
              f"{time.strftime('%Y-%m-%d %H:%M')}, {device_description()}, {total / 60:.1f} min in all. "
              "Every number below was measured in this run.", "", self.table(), "",
              f"![summary]({figure.name})", ""]
        for r in self.rows:
            run = self.runs.get(r["step"])
            md += [f"## {r['title']}", "", f"- result: {r['result']}" + (f" (baseline: {r['baseline']})" if r.get("baseline") else "")]
            if r.get("extra"):
                md.append(f"- training: {r['extra']}")
            if run is not None:
                md.append(f"- run folder: `{run}` (recipe: `recipe.yaml`, logs: `logs/metrics.csv`)")
                md += [f"- figure: ![{p.stem}]({p.relative_to(self.out)})" for p in sorted(run.glob("*.png"))]
            md += [f"- weights: `{r['where']}` (reload with `medfm.load(path)`)" if Path(r["where"]).is_dir()
                   else f"- output: `{r['where']}`", ""]
        md += ["## Scale", "", "```", json.dumps(asdict(self.scale), indent=1), "```", "",
               "Each step is an ordinary recipe run: repeat one at full size with `medfm pretrain` / `medfm finetune` "
               "and the recipe in the run folder (`recipe.yaml`).", ""]
        write_json(self.out / "results.json", {"scale": asdict(self.scale), "fast": self.fast,
                                                "steps": [{k: str(v) if isinstance(v, Path) else v for k, v in r.items()}
                                                          for r in self.rows]})
        write_text(self.out / "report.md", "\n".join(md))
        return self.out / "report.md"

    def summary_png(self) -> Path:
        """Loss curves of every training run, and each measured result beside its baseline."""
        from medfm.figures import pyplot, save_figure

        plt = pyplot()
        compared = [r for r in self.rows if "baseline_value" in r]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for key, run in self.runs.items():
            curve = _losses(run)
            if len(curve) > 1:
                axes[0].plot([i / (len(curve) - 1) for i in range(len(curve))], [c / curve[0] for c in curve], label=key)
        axes[0].set(title="training loss, relative to its first logged value", xlabel="fraction of the run's steps",
                    ylabel="loss / first loss")
        axes[0].legend(fontsize=7)
        for i, r in enumerate(compared):
            axes[1].bar([i - 0.2, i + 0.2], [r["value"], r["baseline_value"]], width=0.4,
                        color=["tab:blue", "tab:gray"], label=["pretrained", "baseline"] if i == 0 else None)
            axes[1].text(i - 0.2, r["value"], f"{r['value']:.3f}", ha="center", va="bottom", fontsize=8)
            axes[1].text(i + 0.2, r["baseline_value"], f"{r['baseline_value']:.3f}", ha="center", va="bottom", fontsize=8)
        axes[1].set_xticks(range(len(compared)), [f"{r['step']}\n{r['metric']}" for r in compared])
        axes[1].set(title="pretrained encoder vs baseline (higher is better)", ylim=(0, 1.08))
        if compared:
            axes[1].legend()
        return save_figure(fig, self.out / "summary.png", dpi=100)


def quickstart(out: str | os.PathLike = "runs/quickstart", fast: bool = False, data: dict[str, str] | None = None,
               label: str = "level", steps: tuple[str, ...] = STEPS) -> Path:
    """Run the quickstart into ``out`` (an earlier quickstart folder there is replaced); returns ``out``."""
    q = Quickstart(out, fast=fast, data=data, label=label)
    q.run(steps)
    print("\n" + q.table() + f"\n\nreport: {q.out / 'report.md'}  (figures: {q.out / 'summary.png'}, "
          + ", ".join(str(q.runs[k].relative_to(q.out)) + '/' for k in q.runs) + ")")
    return q.out
