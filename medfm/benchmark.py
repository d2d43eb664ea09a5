"""``medfm benchmark``: label efficiency. Does a pretrained encoder need fewer labels than random init?

For each task, each encoder init and each adaptation method, fine-tune with K labelled examples per class
(K = 1, 5, 10, 25, 100, all) over several seeds (the few-shot draw differs per seed and is the same for
every init), and report mean ± std on the task's held-in validation split:

* ``pneumonia``: PneumoniaMNIST ``val`` (AUROC, balanced accuracy), data = the npz;
* ``medpix_region`` / ``medpix_modality``: MedPix 2.0 ``dev`` body region (``location_category``, 5 classes)
  and modality (``type``: CT or MR) (macro AUROC, balanced accuracy), data = its ``manifest.csv``;
* ``breastmnist``: BreastMNIST ``val`` (ultrasound, benign vs malignant), data = the npz;
* ``breast_us``: BUS-BRA ``val`` (ultrasound, benign vs malignant, ``label``), data = the breast_us ``manifest.csv``;
* ``mni_tissue``: MNI152 tissue segmentation (nilearn's template: grey / white matter, CSF), trained on one
  labelled axial slab of the left hemisphere or on the whole hemisphere, Dice on the right one.

Encoder inits: ``random``; ``mae`` and ``dino`` (self-supervised on the task's own training images, labels
unused); ``clip`` (the image tower of image-caption pretraining on MedPix ``train``, started LiT-style from
the MedPix MAE encoder when there is one); ``synth`` (the synthesis engine alone: 2D MAE on engine images,
3D ``synth_seg`` for the MNI task); any other name given with ``--encoder NAME=PATH`` (a run folder, an
``encoder/`` folder, a weight file such as a timm checkpoint). Every pretraining run is an ordinary run of
a recipe in ``encoders/`` whose step count is the ``--pretrain-budget``; every fine-tuning run is one of
``tasks/``. Finished runs are kept, so an interrupted benchmark continues where it stopped.

Which K examples get labels is the strategy axis (``--strategies``): ``balanced`` (the default) draws K
per class at random, which needs the labels; every ``medfm select`` strategy (``random``, ``kmeans``,
``typiclust``, ``probcover``, ``coreset``) picks K x classes items from the training pool without them, from
the init's own embeddings of the pool (cached under ``OUT/embeddings``). Besides the fine-tuning methods,
``probe`` fits an L-BFGS logistic regression on the frozen embeddings of the picked items: seconds a cell, the
protocol of the active-learning literature.

Writes ``OUT/results.csv`` (one row per fine-tuning run), ``OUT/label_efficiency.md`` (the tables) and
one ``OUT/<task>.png`` per task (metric against K, one line per init, error bars = std over seeds).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from medfm.progress import progress_bar

from medfm.atomic import atomic_path, write_text
from medfm.data import samples
from medfm.figures import pyplot, save_figure
from medfm.tuning import few_shot_indices
from medfm.encoders import build_encoder
from medfm.encoders.source import encoder_folder
from medfm.evaluate.probe import logistic_probe
from medfm.finetune import TASKS as TASKS_REGISTRY, load_task_recipe, run_finetune
from medfm.select import NEEDS_MODEL, STRATEGIES as SELECT_STRATEGIES, select
from medfm.select.embeddings import Embedder, embed
from medfm.pretrain import load_recipe, run_pretrain
from medfm.run import RunFolder, find_recipe
from medfm.run.recipe import flatten


@dataclass(frozen=True)
class Task:
    """One benchmark task: which data (``domain``), recipe, label column, split and metrics."""

    name: str
    domain: str  # pneumonia | medpix | mni: the data it reads and the pretraining runs it shares
    recipe: str  # a recipe in tasks/
    label: str | None  # manifest label column (None: the npz's labels)
    val_split: str
    metrics: tuple[str, str]  # (primary, secondary) keys of the run's metrics.json


TASKS = {
    "pneumonia": Task("pneumonia", "pneumonia", "classify_2d", None, "val", ("auroc", "balanced_accuracy")),
    "medpix_region": Task("medpix_region", "medpix", "classify_2d", "location_category", "dev",
                          ("auroc", "balanced_accuracy")),
    "medpix_modality": Task("medpix_modality", "medpix", "classify_2d", "type", "dev", ("auroc", "balanced_accuracy")),
    "breastmnist": Task("breastmnist", "breastmnist", "classify_2d", None, "val", ("auroc", "balanced_accuracy")),
    "breast_us": Task("breast_us", "breast_us", "classify_2d", "label", "val", ("auroc", "balanced_accuracy")),
    "mni_tissue": Task("mni_tissue", "mni", "segment_3d", None, "val", ("mean_dice", "mean_hd95")),
}
INITS = ("random", "mae", "dino", "clip", "synth")


def default_tasks(data: dict[str, str]) -> list[str]:
    """The tasks whose data was given (``--data DOMAIN=PATH``), in the table's order, and MNI152 tissue
    segmentation (its data ships with nilearn)."""
    return [name for name, task in TASKS.items() if task.domain in data or task.domain == "mni"]
# On a CPU (profiles cpu / tiny) CLIP trains what a CPU affords: the last two blocks of each tower (the image
# tower starts from the MAE encoder, LiT-style), captions cut to 48 tokens (a full MiniLM backward pass costs
# seconds a step here)
SMALL_PROFILE_PRETRAIN = {"clip": {"clip": {"lock_text": True, "unlocked_layers": 2, "max_length": 48}}}
METHODS = ("linear_probe", "lora")
PROBE = "probe"  # frozen embeddings + logistic regression, outside the run layer (no training run)
STRATEGIES = ("balanced",)  # K per class at random (labels known); others: medfm.select.STRATEGIES' cold-start ones
SHOTS = ("1", "5", "10", "25", "100", "all")
MNI_SHOTS = ("slab", "all")  # one labelled axial slab of the left hemisphere, or all of it
RESULT_COLUMNS = ["task", "init", "method", "strategy", "shots", "seed", "auroc", "balanced_accuracy", "mean_dice", "mean_hd95",
                  "n_train", "wall_s", "run"]
SLAB_MM = 12.0  # thickness of the MNI "slab": a few labelled slices


def pretraining(init: str, domain: str) -> tuple[str, dict] | None:
    """The recipe and overrides that pretrain ``init`` for ``domain`` (None: not defined there)."""
    if init == "synth":
        if domain == "mni":
            return "synth_seg_3d", {}
        return "mae_vit_2d", {"data": {"regime": "synthetic", "path": None}}
    if domain == "mni":
        return None
    if init in ("mae", "dino"):
        return f"{init}_vit_2d", {}
    if init == "clip":
        return "clip_vit_2d", {}
    return None


class LabelEfficiency:
    """The benchmark's state: where runs go, which data, budgets; ``run()`` does everything."""

    def __init__(self, out: str | Path, data: dict[str, str], tasks: Sequence[str], inits: Sequence[str],
                 methods: Sequence[str] = METHODS, shots: Sequence[str] = SHOTS, seeds: Sequence[int] = (0, 1, 2),
                 pretrain_budget: dict[str, int] | int = 500, finetune_steps: dict[str, int] | None = None,
                 profile: str | None = "cpu", encoders: dict[str, str] | None = None, pool: str = "avg",
                 overrides: dict | None = None, progress: bool = True, strategies: Sequence[str] = STRATEGIES):
        self.out = Path(out)
        self.data = {k: str(v) for k, v in data.items()}
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(TASKS)}")
        for t in tasks:
            if TASKS[t].domain != "mni" and TASKS[t].domain not in self.data:
                raise ValueError(f"task {t} needs --data {TASKS[t].domain}=PATH")
        self.tasks, self.inits, self.methods = list(tasks), list(inits), list(methods)
        self.shots, self.seeds = [str(s) for s in shots], [int(s) for s in seeds]
        budget = pretrain_budget if isinstance(pretrain_budget, dict) else {"default": int(pretrain_budget)}
        self.budget = budget
        self.finetune_steps = finetune_steps or {}
        self.profile, self.pool, self.progress = profile, pool, progress
        self.encoders = {k: str(v) for k, v in (encoders or {}).items()}
        self.overrides = overrides or {}
        stray = sorted(set(self.overrides) - {"pretrain", "finetune"})
        if stray:
            raise ValueError(f"benchmark overrides go to 'pretrain.' or 'finetune.' recipes, got {', '.join(stray)} "
                             "(e.g. finetune.optim.lr=1e-2)")
        self.strategies = list(strategies)
        bad = [x for x in self.strategies if x != "balanced" and (x not in SELECT_STRATEGIES or x in NEEDS_MODEL)]
        if bad:
            raise ValueError(f"unknown strategy {', '.join(bad)}; strategies: balanced, "
                             f"{', '.join(k for k in SELECT_STRATEGIES if k not in NEEDS_MODEL)}")
        if any(TASKS[t].domain == "mni" for t in tasks) and self.strategies != ["balanced"]:
            raise ValueError("selection strategies apply to the classification tasks, not mni_tissue")
        self.rows: list[dict] = []
        self._pools: dict[tuple, tuple] = {}

    # ---------------------------------------------------------------- pretraining
    def steps_for(self, init: str) -> int:
        return int(self.budget.get(init, self.budget.get("default", 500)))

    def encoder_for(self, init: str, domain: str) -> str | None:
        """The encoder weights of ``init`` for ``domain``: given (``--encoder``), pretrained here (once), or
        None for random init. Raises ValueError when ``init`` has no meaning for the domain."""
        if init == "random":
            return None
        given = self.encoders.get(f"{init}@{domain}") or self.encoders.get(init)
        if given:
            return encoder_folder(given)
        spec = pretraining(init, domain)
        if spec is None:
            raise ValueError(f"init {init!r} is not defined for {domain} (give --encoder {init}@{domain}=PATH)")
        recipe, extra = spec
        if init == "clip":
            if "medpix" not in self.data:
                raise ValueError("the clip init pretrains on MedPix captions: give --data medpix=manifest.csv")
            # LiT: the image tower starts from the self-supervised MedPix encoder
            extra = {"encoder": {"pretrained": self.encoder_for("mae", "medpix")}}
        # the data it pretrains on (the engine's runs are named by dimension), which names its run folder
        where = {"clip": "medpix", "synth": "3d" if domain == "mni" else "2d"}.get(init, domain)
        run = self.out / "pretrain" / f"{init}_{where}"
        if not (run / "encoder" / "config.json").exists():
            data = {} if init == "synth" else {"data": {"path": self.data[where]}}
            small = SMALL_PROFILE_PRETRAIN.get(init, {}) if self.profile in ("cpu", "tiny") else {}
            cfg = load_recipe(find_recipe(recipe), _merge(data, extra, small, self.overrides.get("pretrain", {}), {
                "trainer": {"max_steps": self.steps_for(init), "enable_progress_bar": self.progress}}),
                profile=self.profile)
            print(f"pretraining {init} for {domain}: {recipe} x {self.steps_for(init)} steps -> {run}", flush=True)
            resume = (run / "checkpoints" / "last.ckpt").exists()
            run_pretrain(cfg, run, resume=resume, **({} if resume else {"overwrite": run.exists()}))
        else:
            self.check_kept(run, "pretrain")
        return str(run / "encoder")

    def check_kept(self, run: Path, kind: str) -> None:
        """A finished run is reused only if its recipe has this benchmark's ``--set`` overrides: a kept run
        trained otherwise would mix two settings in one table without a word."""
        wanted = flatten(self.overrides.get(kind, {}))
        if not wanted:
            return
        have = flatten(RunFolder(run).read_recipe())
        differ = [f"{k}={have.get(k)!r} (asked {v!r})" for k, v in wanted.items() if have.get(k) != v]
        if differ:
            raise ValueError(f"{run} is a finished run trained with {', '.join(differ)}: give another --out for these "
                             "overrides, or remove the run to retrain it")

    # ---------------------------------------------------------------- fine-tuning
    def data_for(self, task: Task, shots: str) -> str:
        if task.domain != "mni":
            return self.data[task.domain]
        folder = self.out / "data" / f"mni_{shots}"
        if not (folder / "manifest.csv").exists():
            samples.mni152_hemispheres(folder, csf=True, slab_mm=SLAB_MM if shots == "slab" else None)
        return str(folder / "manifest.csv")

    def task_recipe(self, task: Task, weights: str | None, method: str, seed: int, extra: dict | None = None) -> dict:
        """The task recipe of one fine-tuning run (and of the ``probe`` method's encoder and preprocessing)."""
        steps = self.finetune_steps.get(method)
        ov = _merge({"method": method if method != PROBE else "linear_probe", "seed": seed,
                     "encoder": {"pretrained": weights},
                     "data": {"val_split": task.val_split, "test_split": None},
                     "trainer": {"enable_progress_bar": False, **({"max_steps": steps} if steps else {})}},
                    self.overrides.get("finetune", {}), extra or {})
        if task.domain != "mni":
            ov = _merge(ov, {"encoder": {"global_pool": self.pool, "fc_norm": False}})
        if task.label:
            ov = _merge(ov, {"classification": {"label": task.label}})
        return load_task_recipe(find_recipe(task.recipe, "tasks"), ov, profile=self.profile)

    def embeddings(self, task: Task, init: str, weights: str | None) -> tuple:
        """(train embeddings, train labels, val embeddings, val labels) of the init's frozen encoder, read out
        as the fine-tuning runs read it, at their evaluation preprocessing (cached under ``OUT/embeddings``)."""
        key = (task.name, init)
        if key not in self._pools:
            cfg = self.task_recipe(task, weights, PROBE, 0)
            plugin = TASKS_REGISTRY.get_plugin(cfg["task"])
            torch.manual_seed(0)
            model = build_encoder(cfg["encoder"])
            embedder = Embedder(model.eval(), plugin.transform(cfg, train=False), plugin.preprocess(cfg), f"{init} ({task.name})")
            parts = []
            for split in (cfg["data"]["train_split"], task.val_split):
                _, x, y = embed(embedder, self.data[task.domain], split, label=task.label,
                                cache=self.out / "embeddings", progress=self.progress)
                parts += [x, y]
            self._pools[key] = tuple(parts)
        return self._pools[key]

    def picks(self, task: Task, init: str, weights: str | None, strategy: str, shots: str, seed: int) -> list[int] | None:
        """Training positions of one cell: None for all, K per class at random (``balanced``), or K x classes
        picked by a selection strategy from the init's embeddings of the training pool."""
        if shots == "all":
            return None
        train_x, train_y, _, _ = self.embeddings(task, init, weights)
        if strategy == "balanced":
            return few_shot_indices(train_y, int(shots), seed)
        classes = len(np.unique(train_y))  # how many, not which: the picks never read a label
        return sorted(select(strategy, train_x, int(shots) * classes, seed=seed, n_classes=classes))

    def probe(self, task: Task, init: str, weights: str | None, strategy: str, shots: str, seed: int) -> dict:
        """The ``probe`` method: a logistic regression on the frozen embeddings of the picked items."""
        t0 = time.perf_counter()
        train_x, train_y, val_x, val_y = self.embeddings(task, init, weights)
        idx = self.picks(task, init, weights, strategy, shots, seed)
        idx = np.arange(len(train_x)) if idx is None else np.asarray(idx)
        k = int(max(train_y.max(), val_y.max())) + 1
        m = logistic_probe(torch.as_tensor(train_x[idx]), torch.as_tensor(train_y[idx]), torch.as_tensor(val_x),
                           torch.as_tensor(val_y), num_classes=k)
        return {"task": task.name, "init": init, "method": PROBE, "strategy": strategy, "shots": shots, "seed": seed,
                "auroc": m["auroc"], "balanced_accuracy": m["balanced_accuracy"], "n_train": len(idx),
                "wall_s": round(time.perf_counter() - t0, 2),
                "run": f"{PROBE}:{task.name}/{init}/{strategy}/k{shots}_s{seed}"}

    def finetune(self, task: Task, init: str, weights: str | None, method: str, shots: str, seed: int,
                 strategy: str = "balanced") -> dict:
        if method == PROBE:
            return self.probe(task, init, weights, strategy, shots, seed)
        name = f"k{shots}_s{seed}" if strategy == "balanced" else f"{strategy}_k{shots}_s{seed}"
        run = self.out / "finetune" / task.name / init / method / name
        if not (run / "metrics.json").exists():
            extra = {}
            if task.domain != "mni" and strategy == "balanced":
                extra = {"shots": None if shots == "all" else int(shots)}
            elif task.domain != "mni" and shots != "all":
                chosen = self.out / "selections" / task.name / init / f"{name}.csv"
                chosen.parent.mkdir(parents=True, exist_ok=True)
                write_text(chosen, "position\n" + "".join(
                    f"{i}\n" for i in self.picks(task, init, weights, strategy, shots, seed)))
                extra = {"selection": str(chosen)}
            if task.domain == "mni":
                extra = {"segmentation": {"num_classes": len(samples.TISSUE_NAMES),
                                          "class_names": list(samples.TISSUE_NAMES)}}
            cfg = self.task_recipe(task, weights, method, seed, extra)
            if run.exists():  # an interrupted run: start it again
                shutil.rmtree(run)
            run_finetune(cfg, run, data_path=self.data_for(task, shots))
        else:
            self.check_kept(run, "finetune")
        m = json.loads((run / "metrics.json").read_text())
        v = m[task.val_split]
        return {"task": task.name, "init": init, "method": method, "strategy": strategy, "shots": shots, "seed": seed,
                task.metrics[0]: v[task.metrics[0]], task.metrics[1]: v.get(task.metrics[1], float("nan")),
                "n_train": m.get("n_train"), "wall_s": m["wall_time_s"], "run": str(run)}

    def plan(self) -> list[tuple]:
        """Every fine-tuning run (or probe), in order: (task, init, method, strategy, shots, seed); "all" labels
        once per method, whatever the strategies."""
        jobs = []
        for t in self.tasks:
            task = TASKS[t]
            shots = MNI_SHOTS if task.domain == "mni" else self.shots
            inits = [i for i in self.inits if i == "random" or i in self.encoders or f"{i}@{task.domain}" in self.encoders
                     or pretraining(i, task.domain) is not None]
            for init in inits:
                for method in self.methods:
                    for strategy in self.strategies:
                        for k in shots:
                            if k == "all" and strategy != self.strategies[0]:
                                continue
                            for seed in self.seeds:
                                jobs.append((task, init, method, strategy, k, seed))
        return jobs

    def run(self) -> list[dict]:
        jobs = self.plan()
        weights: dict[tuple[str, str], str | None] = {}
        t0 = time.perf_counter()
        bar = progress_bar(jobs, desc="label efficiency", unit="run", disable=not self.progress)
        for task, init, method, strategy, k, seed in bar:
            key = (init, task.domain)
            if key not in weights:
                weights[key] = self.encoder_for(init, task.domain)
            bar.set_postfix_str(f"{task.name} {init} {method} {strategy} K={k} seed {seed}")
            self.rows.append(self.finetune(task, init, weights[key], method, k, seed, strategy))
            self.write_rows()
        self.write()
        print(f"label efficiency: {len(jobs)} runs in {time.perf_counter() - t0:.0f} s -> {self.out}", flush=True)
        return self.rows

    # ---------------------------------------------------------------- results
    def write_rows(self) -> None:
        """``results.csv`` as it stands (rewritten after every run, so a stopped benchmark keeps its rows). Rows
        an earlier benchmark over the same folder wrote for other runs (other tasks, inits, K) are kept."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "results.csv"
        mine = {r["run"] for r in self.rows}
        kept = []
        if path.exists():
            with open(path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r["run"] not in mine]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept + self.rows)

    def write(self) -> None:
        """``results.csv``, the tables (``label_efficiency.md``, also printed) and one plot per task, over every
        row of ``results.csv`` (this benchmark's and earlier ones' in the same folder)."""
        self.write_rows()
        rows = read_results(self.out / "results.csv")
        write_text(self.out / "label_efficiency.md", "\n".join(tables(rows)) + "\n")
        for t in dict.fromkeys(r["task"] for r in rows):
            plot_task(rows, TASKS[t], self.out / f"{t}.png")
        print("\n".join(tables([r for r in rows if r["task"] in self.tasks])))


def read_results(path: Path) -> list[dict]:
    """The rows of a ``results.csv`` with their numbers as floats (None where a task has no such metric)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("auroc", "balanced_accuracy", "mean_dice", "mean_hd95"):
            r[k] = float(r[k]) if r.get(k) not in (None, "") else None
    return rows


def summarise(rows: list[dict], metric: str) -> dict[tuple, tuple[float, float, int]]:
    """(task, method, init, strategy, shots) -> (mean, std over seeds, number of seeds) of ``metric`` (rows
    written before the strategy axis are ``balanced``)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            key = (r["task"], r["method"], r["init"], r.get("strategy") or "balanced", r["shots"])
            groups.setdefault(key, []).append(float(v))
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def _shot_order(s: str) -> float:
    return math.inf if s == "all" else -1.0 if s == "slab" else float(s)


def tables(rows: list[dict]) -> list[str]:
    """One markdown table per task and metric: a row per (method, init, strategy), a column per K (mean ± std)."""
    lines: list[str] = []
    for name in dict.fromkeys(r["task"] for r in rows):
        task = TASKS[name]
        for metric in task.metrics:
            stats = summarise([r for r in rows if r["task"] == name], metric)
            if not stats:
                continue
            shots = sorted({k[4] for k in stats}, key=_shot_order)
            lines += [f"### {name}: {metric} ({task.val_split}; mean ± std over seeds)", "",
                      "| method | init | strategy | " + " | ".join(f"K={s}" for s in shots) + " |",
                      "|---|---|---|" + "---|" * len(shots)]
            for line in dict.fromkeys(k[1:4] for k in stats):
                cells = [stats.get((name, *line, s)) for s in shots]
                lines.append(f"| {' | '.join(line)} | " + " | ".join(f"{m[0]:.3f} ± {m[1]:.3f}" if m else ""
                                                                       for m in cells) + " |")
            lines.append("")
    return lines


def plot_task(rows: list[dict], task: Task, path: Path) -> Path | None:
    """Primary metric against K, error bars = std over seeds: one panel per method and one line per init; with
    several strategies, one panel per (method, init) and one line per strategy."""
    stats = summarise([r for r in rows if r["task"] == task.name], task.metrics[0])
    if not stats:
        return None
    plt = pyplot()
    by_strategy = len({k[3] for k in stats}) > 1
    panels = list(dict.fromkeys(k[1:3] if by_strategy else k[1:2] for k in stats))
    shots = sorted({k[4] for k in stats}, key=_shot_order)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [k for k in stats if k[1:1 + len(panel)] == panel]
        for line in dict.fromkeys(k[3] if by_strategy else k[2] for k in mine):
            keys = {k[4]: k for k in mine if (k[3] if by_strategy else k[2]) == line}
            xs = [i for i, s in enumerate(shots) if s in keys]
            ms = [stats[keys[shots[i]]] for i in xs]
            ax.errorbar(xs, [m[0] for m in ms], yerr=[m[1] for m in ms], marker="o", capsize=3, label=line)
        ax.set_xticks(range(len(shots)), [s if s in ("all", "slab") else f"K={s}" for s in shots])
        ax.set_xlabel("labelled examples per class" if task.domain != "mni" else "labelled training volume")
        ax.set_ylabel(f"{task.metrics[0]} ({task.val_split})")
        ax.set_title(f"{task.name}: {' / '.join(panel)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def _merge(*parts: dict) -> dict:
    """Nested dicts merged left to right."""
    out: dict = {}
    for p in parts:
        for k, v in (p or {}).items():
            out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
