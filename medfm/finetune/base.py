"""The plug-in base every fine-tuning task derives from (:class:`FinetuneTask`); the artifact a task model is
(:class:`medfm.heads.TaskModel`) and the parts tasks share are in :mod:`medfm.heads`, the registry ``TASKS`` in
:mod:`medfm.finetune.registry`, the recipe runner in :mod:`medfm.finetune.recipe`.

A task is one module of this package holding its recipe section, its model, its training module, its
metrics and evaluation, and its plug-in, registered with ``@TASKS.register``; this base knows none of
them. A task supplies its section (``Config``), its model class (``model_class``, a :class:`TaskModel`),
what its manifests must hold (``split_args``), the head's arguments (``head``), the LightningModule
(``module``), its evaluation (``evaluate_split``) and its headline metrics (``headline``); it may reshape
the training set first (``prepare``: labels, few-shot subsets) and replace it (``training_set``: cached
features). What one hook computes for the next lives in the run's ``state`` dict (``Built.state``).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

import lightning as L
from monai.transforms import Compose

from medfm.atomic import write_json, write_text
from medfm.data import DataError, JoinedDataset, open_dataset
from medfm.data.cache import dataset_cache
from medfm.data.preprocess import Preprocess
from medfm.data.transforms import with_channels
from medfm.evaluate.robustness import load_spec, robustness_png, robustness_table, run_spec
from medfm.figures import figures_off
from medfm.progress import progress_bar
from medfm.synthetic import RandAppearanced
from medfm.heads import TaskModel
from medfm.tuning import count_parameters, export_encoder, freezes_encoder, is_lora, method_sections
from medfm.run import Built, KeyedDataset, RunFolder, RunPlugin, StepData

from .recipe import check_splits, load_run

def validation_metrics(run: Path, val_split: str) -> dict:
    """A finished run's own metrics on its validation split (what it chose there: thresholds), {} without them."""
    path = run / "metrics.json"
    return json.loads(path.read_text()).get(val_split, {}) if path.exists() else {}


# ----------------------------------------------------------------- the plug-in base
class FinetuneTask(RunPlugin):
    """Base plug-in of a fine-tuning task (see the module docstring). ``evaluate`` and ``summary`` serve
    ``medfm evaluate RUN``; ``optim.lr: auto`` asks ``default_lr``."""

    model_class: ClassVar[type[TaskModel]]
    keys: ClassVar[tuple[str, ...]] = ("image", "label", "mask", "features")
    headline: ClassVar[tuple[str, ...]] = ()  # the metrics ``summary`` prints per split, the first one required
    evaluate_options: ClassVar[tuple[str, ...]] = ("data", "split", "out", "robustness")
    few_shot: ClassVar[bool] = False  # takes ``shots`` (few-shot sampling) and ``selection`` (classification does)

    def validate(self, cfg: dict) -> None:
        """Checks of the recipe before anything is built (a task adds its own after this one)."""
        if not self.few_shot and (cfg["shots"] or cfg.get("selection")):
            raise ValueError("shots (few-shot sampling) and selection apply to classification")

    def frozen_encoder(self, cfg: dict) -> bool:
        """Whether the recipe's tuning method keeps the encoder frozen (:func:`medfm.tuning.freezes_encoder`)."""
        return freezes_encoder(cfg["method"])

    def default_lr(self, cfg: dict) -> float:
        """``optim.lr: auto``: the LR of the trained part (head, adapter, decoder) for ``cfg['method']``."""
        return 1e-3

    # ------------------------------------------------------------ data
    def transform(self, cfg: dict, train: bool):
        """Training: the preset at the encoder's size with its augmentation/random crop (and, with
        ``data.appearance``, the synthesis engine's random appearance); evaluation: the same size without
        augmentation; first, images made the encoder's channel count (colour -> grey)."""
        d = self.section(cfg, "data")
        steps = self.preprocess(cfg).transform(train=train and d.augment,
                                               size=cfg["encoder"]["img_size"] if train else self.eval_size(cfg))
        if train and d.appearance:  # robustness to scanners: bias field, gamma, noise, inversion (the engine's)
            steps = Compose([*steps.transforms, RandAppearanced("image", prob=d.appearance)])
        return with_channels(steps, cfg["encoder"]["in_chans"])

    def preprocess(self, cfg: dict) -> Preprocess:
        """How the task model's inputs are prepared at evaluation (saved in its spec and its ``encoder/``)."""
        d = self.section(cfg, "data")
        return Preprocess(d.preset, self.eval_size(cfg), d.preset_args)

    def eval_size(self, cfg: dict):
        return cfg["encoder"]["img_size"]

    def split_args(self, cfg: dict, path: str) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def split_cache(self, cfg: dict, train: bool):
        """``data.cache`` for the sets this task opens (a disk cache keyed by the task, preset and size)."""
        d = self.section(cfg, "data")
        return dataset_cache(d.cache, d.cache_dir, {"task": cfg["task"], "train": train, **self.preprocess(cfg).record(),
                                                    "dims": cfg["encoder"]["spatial_dims"]})

    def open_split(self, cfg: dict, split: str | None, train: bool = False, path: str | None = None):
        """One split of the recipe's data with what the task needs (labels, masks)."""
        d = self.section(cfg, "data")
        path = str(path or d.path)
        return open_dataset(path, split=split, spatial_dims=cfg["encoder"]["spatial_dims"],
                            transform=self.transform(cfg, train), cache=self.split_cache(cfg, train), on_error=d.on_error,
                            preflight=d.preflight, **self.split_args(cfg, path))

    def extra_split_args(self, cfg: dict, path: str, real) -> dict:
        """How to open a ``train_from`` set so that its labels agree with the real training split's."""
        return self.split_args(cfg, path)

    def training_split(self, cfg: dict, train: bool = True):
        """The training set: the real training split, plus (or, with ``train_real: false``, only) every
        ``train_from`` set, whole."""
        d = self.section(cfg, "data")
        real = self.open_split(cfg, d.train_split, train=train)
        if not d.train_from:
            return real
        parts = [real] if d.train_real else []
        for p in d.train_from:
            parts.append(open_dataset(p, split=None, spatial_dims=cfg["encoder"]["spatial_dims"],
                                      transform=self.transform(cfg, train), cache=self.split_cache(cfg, train), on_error=d.on_error,
                                      preflight=d.preflight, **self.extra_split_args(cfg, p, real)))
        return parts[0] if len(parts) == 1 else JoinedDataset(parts)

    def resolve(self, cfg: dict) -> dict:
        """The recipe's ``auto`` choices made concrete before any data opens (the run's recipe.yaml records what
        they became); ``cfg`` is the run's own copy."""
        return cfg

    def prepare(self, cfg: dict, train, state: dict) -> tuple[dict, Any]:
        """The recipe completed from the training data, and the training set to use; what later hooks need
        goes into ``state``."""
        return cfg, train

    def training_set(self, cfg: dict, model, train, state: dict):
        return train

    def collate(self, cfg: dict, state: dict):
        """How training samples form a batch (None: torch's default collation; the multimodal LM tokenises its
        conversations here, with ``state["model"]``'s tokenizer)."""
        return None

    def train_record(self, state: dict) -> dict:
        """What metrics.json records about the training set beyond its size (classification: the few-shot rows)."""
        return {}

    # ------------------------------------------------------------ model
    def head(self, cfg: dict, state: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self, cfg: dict, state: dict) -> dict:
        """What the task model's ``config.json`` holds (:class:`TaskModel`)."""
        method = cfg["method"]
        return {"task": self.name, "encoder": dict(cfg["encoder"]), "method": method,
                **({method: dict(cfg[method])} if method in method_sections() else {}), "head": self.head(cfg, state),
                "preprocess": self.preprocess(cfg).record()}

    def module(self, cfg: dict, model, train, state: dict) -> L.LightningModule:  # pragma: no cover - abstract
        raise NotImplementedError

    def optim(self, cfg: dict) -> dict:
        return dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"],
                    layer_decay=self.section(cfg, "full").layer_decay if cfg["method"] == "full" else None)

    # ------------------------------------------------------------ run hooks
    def build(self, cfg: dict, folder: RunFolder) -> Built:
        d = self.section(cfg, "data")
        if not d.path:
            raise ValueError("fine-tuning needs data: give --data PATH (an npz or a manifest) or set data.path")
        check_splits(cfg)
        cfg = self.resolve(copy.deepcopy(cfg))
        state: dict = {"t0": time.perf_counter()}
        cfg, train = self.prepare(cfg, self.training_split(cfg, train=True), state)
        model = self.model_class.from_spec(self.spec(cfg, state))
        trainable, total = count_parameters(model)
        print(f"{cfg['task']} / {cfg['method']}: {trainable:,} trainable of {total:,} parameters "
              f"({100 * trainable / total:.2f} %), {len(train)} training samples")
        module = self.module(cfg, model, train, state)
        state.update(trainable=trainable, total=total, n_train=len(train), model=model)
        train = self.training_set(cfg, model, train, state)
        keyed = KeyedDataset(train, seed=cfg["seed"], keys=self.keys)
        data = StepData(keyed, len(train), d.batch_size, d.num_workers, cfg["seed"], collate_fn=self.collate(cfg, state))
        return Built(module, data, cfg=cfg, state=state)

    def export(self, module, folder: RunFolder, trainer, built: Built) -> None:
        """``model/`` (the whole task model), ``encoder/`` (plain, merged, with its preprocessing) and, for
        LoRA, ``adapter/`` (peft's adapter folder)."""
        model = module.model
        folder.save(model, "model")
        encoder = export_encoder(model.encoder)
        encoder.preprocess = model.spec["preprocess"]
        folder.save(encoder, "encoder")
        if is_lora(model.encoder):
            model.encoder.save_pretrained(str(folder / "adapter"))

    def after_fit(self, built: Built, trainer, folder: RunFolder) -> None:
        cfg, state = built.cfg, built.state
        train_time = time.perf_counter() - state["t0"]
        metrics = {"task": cfg["task"], "method": cfg["method"], "encoder": cfg["encoder"]["name"],
                   "pretrained": cfg["encoder"]["pretrained"], "shots": cfg["shots"], "steps": trainer.global_step,
                   "trainable_params": state["trainable"], "total_params": state["total"], "n_train": state["n_train"],
                   **self.train_record(state), "train_time_s": round(train_time, 1)}
        metrics.update(self.evaluate_splits(state["model"], cfg, folder.path))
        metrics["wall_time_s"] = round(time.perf_counter() - state["t0"], 1)
        write_json(folder / "metrics.json", metrics)

    # ------------------------------------------------------------ evaluation
    def evaluate_split(self, model, ds, cfg: dict, out: Path, split: str, state: dict) -> dict:  # pragma: no cover
        raise NotImplementedError

    def evaluate_splits(self, model, cfg: dict, out: Path, data_path: str | None = None,
                        splits: Sequence[str] | None = None, state: dict | None = None) -> dict:
        """Metrics and figures for the validation split and the test split where they exist (``splits``:
        only these, and a missing one is an error). ``state`` carries what one split passes to the next
        (classification: thresholds chosen on validation)."""
        d = self.section(cfg, "data")
        state = {"val_split": d.val_split, **(state or {})}
        results: dict = {}
        for split in splits or [s for s in (d.val_split, d.test_split) if s]:
            try:
                ds = self.open_split(cfg, split, path=data_path)
            except DataError as e:
                if splits:  # asked for explicitly
                    raise
                print(f"split {split!r} not evaluated: {e}")
                continue
            if len(ds):
                results[split] = self.evaluate_split(model, ds, cfg, out, split, state)
        return results

    def evaluate(self, run: Path, data: str | None = None, split: str = "test", out: str | None = None,
                 robustness: str | None = None) -> dict:
        """Evaluate a finished run on ``split`` of ``data`` (default: the run's data) with what it chose on
        validation; writes ``metrics.json`` and figures into ``out`` (default RUN/eval_<split>). Beside a split
        other than validation, ``shift`` compares its headline metrics with the run's own validation ones
        (in-domain). ``robustness``: a spec (``medfm.evaluate.robustness``) to score the split under instead.
        A task with more options (classification's ``groups``) declares them in ``evaluate_options`` and
        passes them on in ``options``."""
        return self.run_evaluation(run, data, split, out, robustness)

    def run_evaluation(self, run: Path, data: str | None, split: str, out: str | None, robustness: str | None,
                     **options: Any) -> dict:
        """:meth:`evaluate` with the task's own options (``options``: what ``evaluate_split`` reads from its state)."""
        if robustness:
            return self.evaluate_robustness(run, robustness, data, split, out)
        model, cfg = load_run(run)
        d = self.section(cfg, "data")
        dest = Path(out) if out else run / f"eval_{split}"
        dest.mkdir(parents=True, exist_ok=True)
        # held-out splits use what the run chose on validation; the validation split itself is scored as the run
        # scored it (so `evaluate --split val` reproduces the run's own metrics.json)
        val = validation_metrics(run, d.val_split) if split != d.val_split else {}
        state = {**self.saved_state(val), **options}
        res = self.evaluate_splits(model, cfg, dest, data_path=data, splits=[split], state=state)
        metrics = {"run": str(run), "data": str(data or d.path), **res}
        if val and split in res:
            metrics["shift"] = {k: {"in_domain": val[k], split: res[split][k], "change": res[split][k] - val[k]}
                                for k in self.headline if isinstance(val.get(k), (int, float))
                                and isinstance(res[split].get(k), (int, float))}
        write_json(dest / "metrics.json", metrics)
        return metrics

    def evaluate_robustness(self, run: Path, spec_name: str, data: str | None, split: str,
                            out: str | None) -> dict:
        """The split scored clean and under every perturbation of the spec, with the thresholds the run chose
        on validation and nothing refitted; ``metrics.json``, ``robustness.md`` and ``robustness.png`` in
        ``out`` (default RUN/robustness_<split>)."""
        model, cfg = load_run(run)
        d = self.section(cfg, "data")
        spec = load_spec(spec_name, dims=cfg["encoder"]["spatial_dims"])
        spec.metric = spec.metric or self.headline[0]
        dest = Path(out) if out else run / f"robustness_{split}"
        dest.mkdir(parents=True, exist_ok=True)
        state = {**self.saved_state(validation_metrics(run, d.val_split)), "val_split": None}  # nothing is fitted on perturbed cases
        ds = self.open_split(cfg, split, path=data)
        bar = progress_bar(total=1 + sum(len(v) for v in spec.severities.values()), desc="robustness", unit="pass")

        def score(dataset) -> float:
            with tempfile.TemporaryDirectory() as scratch, figures_off():  # the per-pass figures are not kept
                res = self.evaluate_split(model, dataset, cfg, Path(scratch), split, dict(state))
            bar.update(1)
            if spec.metric not in res:
                raise ValueError(f"robustness spec {spec.source}: metric {spec.metric!r} is not one of this task's "
                                 f"({', '.join(k for k, v in res.items() if isinstance(v, float))})")
            return res[spec.metric]

        report = run_spec(spec, score, ds, progress=lambda what: bar.set_postfix_str(what))
        bar.close()
        metrics = {"run": str(run), "data": str(data or d.path), "split": split, "robustness": report}
        write_json(dest / "metrics.json", metrics)
        write_text(dest / "robustness.md", "\n".join(robustness_table(report)) + "\n")
        robustness_png(report, dest / "robustness.png")
        return metrics

    def summary(self, metrics: dict) -> list[str]:
        """Parameters and wall time, then one line per evaluated split with the task's ``headline`` metrics."""
        lines = []
        if "trainable_params" in metrics:
            lines.append(f"{metrics['method']}: {metrics['trainable_params']:,} trainable / "
                         f"{metrics['total_params']:,} parameters, {metrics['wall_time_s']} s")
        for split, v in metrics.items():
            if isinstance(v, dict) and split != "shift" and self.headline and self.headline[0] in v:
                lines.append(f"  {split:<8} " + "  ".join(f"{k} {v[k]:.4f}" for k in self.headline if k in v)
                             + f"  (n={v.get('n')})" + self.summary_note(v))
        if "robustness" in metrics:
            r = metrics["robustness"]
            lines += robustness_table(r)[4:] + [f"robustness ({r['spec']}): {'passed' if r['passed'] else 'failed'}; "
                                                f"clean {r['metric']} {r['clean']:.4f}"]
        for k, s in metrics.get("shift", {}).items():
            held = next(n for n in s if n not in ("in_domain", "change"))
            lines.append(f"  shift    {k}: in-domain (validation) {s['in_domain']:.4f} -> {held} {s[held]:.4f} "
                         f"({s['change']:+.4f})")
        return lines

    def summary_note(self, split_metrics: dict) -> str:
        """What follows a split's headline numbers (classification: how the decision thresholds were set)."""
        return ""

    def saved_state(self, val_metrics: dict) -> dict:
        """What ``evaluate_splits`` needs from the run's own validation metrics."""
        return {}
