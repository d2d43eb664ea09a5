"""Adaptation of a fine-tuned classifier to a new site without the site's labels (``medfm adapt``).

A model trained at one hospital or on one scanner meets images whose intensities, textures and noise differ.
These methods change a copy of the model using the new site's *unlabelled* images only, and write a new run
that reloads alone (``RUN/model``) and evaluates like any fine-tuning run (``medfm evaluate``):

* ``norm``: re-estimate the batch-norm statistics on the target images (AdaBN, Li et al. 2016). A ViT's layer
  norms compute their statistics per token at every forward, so there the re-estimated statistics are those
  of the feature standardisation before the head (``classification.head_norm``) and of any CNN's batch norms;
  a model with no batch norm at all is an error, not a silent no-op;
* ``tent``: entropy minimisation on the affine parameters of the normalisation layers (Wang et al., ICLR 2021);
* ``lora_entropy``: entropy minimisation on the LoRA parameters of a LoRA run;
* ``shot``: SHOT's source-hypothesis transfer (Liang et al., ICML 2020): the head stays frozen; the encoder
  (its LoRA parameters for a LoRA run, all of it otherwise) learns with information maximisation (confident
  per image, diverse over the set) plus cross-entropy to pseudo-labels from prediction-weighted class centroids
  in feature space, refreshed every ``shot_refresh`` steps.

After the steps of the other methods, every batch norm's statistics are recomputed on the target with the final
weights. The
class prior of the predictions on the target is recorded before and after; an adaptation whose predictions
collapse onto one class (:func:`collapse_reason`) is reported and its weights are not written.

It runs through the one run layer (:func:`medfm.run.run`: step-keyed batches, checkpoints, ``--resume``);
its recipe is the source run's with the ``site_adaptation`` section filled in (:class:`SiteAdaptationConfig`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from medfm.artifacts import load
from medfm.atomic import write_json
from medfm.data import DataError, open_dataset
from medfm.evaluate.probe import embed_dataset, sample_batches
from medfm.tuning import is_lora
from medfm.run import Built, KeyedDataset, RunFolder, RunPlugin, StepData, TrainingModule, evaluating
from medfm.run.recipe import merge

from .recipe import SiteAdaptationConfig, run_finetune, run_recipe
from .registry import SITE_ADAPTERS, TASKS



@dataclass(frozen=True)
class SiteMethod:
    """One way to adapt a model to a new site without its labels: its learning rate for ``--lr auto``
    (``optim.lr``), which parameters learn by default (``site_adaptation.params: auto``), and its loss on a batch
    of target images (``loss(module, batch) -> (loss or None, logs)``; None: the forward pass itself adapts)."""

    name: str
    lr: float
    params: str
    loss: Callable[["SiteAdaptationModule", dict], tuple[torch.Tensor | None, dict]]


SITE_METHODS: dict[str, SiteMethod] = {}  # every site-adaptation method by name (`medfm adapt --method`)


def register_site_method(name: str, lr: float, params: str):
    """Decorator: register ``loss(module, batch)`` as the site-adaptation method ``name``."""

    def register(loss):
        if name in SITE_METHODS:
            raise ValueError(f"site-adaptation method {name!r} is registered twice")
        SITE_METHODS[name] = SiteMethod(name, lr, params, loss)
        return loss

    return register


NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


class AdaptationCollapsed(ValueError):
    """The adapted model predicts (almost) one class for every target image: reported, weights not written."""


# ----------------------------------------------------------------- the parts
def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def select_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """Freeze ``model`` and make trainable what ``which`` names: ``norm`` (affine weights and biases of every
    layer / group / batch norm), ``lora`` (the LoRA matrices), ``encoder`` (all encoder weights), ``none``."""
    for p in model.parameters():
        p.requires_grad_(False)
    if which == "none":
        return []
    if which == "norm":
        params = [p for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)]
    elif which == "lora":
        if not is_lora(model.encoder):
            raise ValueError("this run's encoder has no LoRA parameters (it was not fine-tuned with method: lora); "
                             "adapt it with --method tent or shot")
        params = [p for n, p in model.encoder.named_parameters() if "lora_" in n]
    elif which == "encoder":
        params = list(model.encoder.parameters())
    else:
        raise ValueError(f"site_adaptation.params must be auto, norm, lora, encoder or none, got {which!r}")
    if not params:
        raise ValueError(f"the model has no {which} parameters to adapt")
    for p in params:
        p.requires_grad_(True)
    return params


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of probabilities."""
    return -(probs * probs.clamp_min(1e-8).log()).sum(-1)


def information_maximisation(logits: torch.Tensor) -> torch.Tensor:
    """SHOT's IM loss: mean per-image entropy (be confident) minus the entropy of the mean prediction (be
    diverse: the second term is what keeps entropy minimisation from collapsing onto one class)."""
    p = logits.float().softmax(-1)
    return entropy(p).mean() - entropy(p.mean(0))


def centroid_pseudo_labels(features: torch.Tensor, probs: torch.Tensor, rounds: int = 2) -> torch.Tensor:
    """SHOT's self-supervised pseudo-labels: class centroids weighted by the predictions, each image labelled by
    its nearest centroid in cosine distance; then centroids from those hard labels, and again."""
    f = torch.cat([features.float(), torch.ones(len(features), 1)], 1)
    f = f / f.norm(dim=1, keepdim=True)
    weights = probs.float()
    labels = weights.argmax(1)
    for _ in range(rounds):
        centroids = weights.T @ f / weights.sum(0).clamp_min(1e-8)[:, None]
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp_min(1e-8)
        labels = (f @ centroids.T).argmax(1)
        weights = torch.nn.functional.one_hot(labels, probs.shape[1]).float()
    return labels


def class_prior(probs: torch.Tensor) -> list[float]:
    """Share of the images predicted as each class (argmax)."""
    return (torch.bincount(probs.argmax(1), minlength=probs.shape[1]).float() / max(len(probs), 1)).tolist()


def collapse_reason(before: list[float], after: list[float], share: float = 0.9) -> str | None:
    """Why an adaptation counts as collapsed, or None: after it one class takes ``share`` or more of the target
    predictions, 5 points more than before it (a site where one class already dominated is not a collapse)."""
    top = max(range(len(after)), key=after.__getitem__)
    if after[top] >= share and after[top] - before[top] >= 0.05:
        return (f"the adapted model predicts class {top} for {100 * after[top]:.1f} % of the target images "
                f"({100 * before[top]:.1f} % before adaptation): it collapsed onto one class")
    return None


@torch.no_grad()
def predict(model: nn.Module, ds: Dataset, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) and class probabilities (N, K) of ``model`` on ``ds``, in eval mode."""
    features, _ = embed_dataset(model.encoder, ds, batch_size)
    with evaluating(model):
        logits = model.head(features) / float(getattr(model, "temperature", 1.0))
    return features, logits.softmax(-1)


@torch.no_grad()
def recompute_batch_norms(model: nn.Module, ds: Dataset, batch_size: int = 64) -> int:
    """Every batch norm's running statistics recomputed from scratch on ``ds`` (a cumulative average over
    one pass, everything else in eval mode); returns the number of batch norms."""
    norms = batch_norms(model)
    if not norms:
        return 0
    with evaluating(model):
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average
            m.train()
        device = next(model.parameters()).device
        for _, x in sample_batches(ds, batch_size, device):
            if len(x) > 1:  # a batch norm cannot take statistics from one image
                model(x)
        for m in norms:
            m.momentum = 0.1
    return len(norms)


class _Indexed(Dataset):
    """The target images with their position in the target set (SHOT's pseudo-labels are per image); no label."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.ds[i]["image"], "index": i}


# ----------------------------------------------------------------- the training module
class SiteAdaptationModule(TrainingModule):
    """One adaptation step on a batch of target images: no labels, the method's loss (see the module docstring).
    Everything runs in eval mode (no dropout) except the batch norms, which normalise with the batch's
    statistics as TENT prescribes; ``norm`` only passes the images through them and learns nothing."""

    def __init__(self, model: nn.Module, method: str, target: Dataset, shot_beta: float = 0.3,
                 shot_refresh: int = 20, batch_size: int = 32, **optim):
        super().__init__(**optim)
        self.model, self.method = model, method
        self.target, self.shot_beta, self.shot_refresh, self.eval_batch = target, shot_beta, shot_refresh, batch_size
        self.pseudo: torch.Tensor | None = None

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def param_groups(self) -> list[dict]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:  # norm: an optimizer Lightning can step, over parameters that never get a gradient
            params = [p for m in self.model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)]
        return [{"params": params, "weight_decay": 0.0}]

    def _modes(self) -> None:
        self.model.eval()
        for m in batch_norms(self.model):
            m.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.pseudo is not None:  # SHOT: a resumed run continues with the pseudo-labels it had
            checkpoint["shot_pseudo_labels"] = self.pseudo

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.pseudo = checkpoint.get("shot_pseudo_labels")

    def refresh_pseudo_labels(self) -> None:
        features, probs = predict(self.model, self.target, self.eval_batch)
        self.pseudo = centroid_pseudo_labels(features, probs)

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor | None, dict]:
        self._modes()
        return SITE_METHODS[self.method].loss(self, batch)

    def training_step(self, batch: dict, batch_idx: int):
        loss, logs = self.compute_loss(batch)
        if loss is None:  # norm: the statistics moved in the forward pass, nothing to optimise
            return None
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
            for k, v in logs.items():
                self.log(f"train/{k}", v)
        return loss


# ----------------------------------------------------------------- the methods
@register_site_method("norm", lr=0.0, params="none")
def _norm_pass(module: SiteAdaptationModule, batch: dict) -> tuple[None, dict]:
    """AdaBN: the forward pass re-estimates the batch-norm statistics; nothing is optimised."""
    with torch.no_grad():
        module.model(batch["image"])
    return None, {}


def _entropy(module: SiteAdaptationModule, batch: dict) -> tuple[torch.Tensor, dict]:
    """TENT's objective: the mean prediction entropy of the batch."""
    return entropy(module.model(batch["image"]).float().softmax(-1)).mean(), {}


register_site_method("tent", lr=1e-3, params="norm")(_entropy)  # on the normalisation layers' affine parameters
register_site_method("lora_entropy", lr=1e-4, params="lora")(_entropy)  # on a LoRA run's LoRA parameters


@register_site_method("shot", lr=1e-4, params="auto")
def _shot(module: SiteAdaptationModule, batch: dict) -> tuple[torch.Tensor, dict]:
    """SHOT: information maximisation plus cross-entropy to centroid pseudo-labels (refreshed every
    ``shot_refresh`` steps; they ride in the checkpoint)."""
    if module.pseudo is None or module.global_step % module.shot_refresh == 0:
        module.refresh_pseudo_labels()
        module._modes()
    logits = module.model(batch["image"])
    target = module.pseudo.to(logits.device)[batch["index"]]
    ce = nn.functional.cross_entropy(logits.float(), target)
    im = information_maximisation(logits)
    return im + module.shot_beta * ce, {"im": im.detach(), "pseudo_ce": ce.detach()}


# ----------------------------------------------------------------- the plug-in
class SiteAdaptation(RunPlugin):
    """Run-layer plug-in of ``medfm adapt``: builds from the source run, exports like its task (``model/``,
    ``encoder/``), so the adapted run is a fine-tuning run of the same task."""

    kind = "finetune"
    Config = SiteAdaptationConfig

    def __init__(self, task: str):
        self.task = TASKS.get_plugin(task)
        self.name = task  # run.json names the task: `medfm evaluate` treats the adapted run as one of its runs

    def config(self, cfg: dict) -> SiteAdaptationConfig:
        return SiteAdaptationConfig(**cfg["site_adaptation"])

    def target_set(self, cfg: dict):
        """The target split opened without labels, preprocessed as the model expects."""
        a = self.config(cfg)
        ds = open_dataset(a.data, split=a.split, spatial_dims=cfg["encoder"]["spatial_dims"],
                          transform=self.task.transform(cfg, train=False))
        if len(ds) < 2:
            raise DataError(f"{a.data}: split {a.split!r} holds {len(ds)} image(s); adaptation needs at least 2")
        return ds

    def build(self, cfg: dict, folder: RunFolder) -> Built:
        a = self.config(cfg)
        model = load(Path(a.source) / "model")
        if not hasattr(model, "head") or model.spec["head"].get("multi_label"):
            raise ValueError(f"{a.source}: site adaptation works on single-label classification runs")
        target = self.target_set(cfg)
        which = a.params if a.params != "auto" else SITE_METHODS[a.method].params
        if which == "auto":  # shot: the LoRA matrices of a LoRA run, the whole encoder otherwise
            which = "lora" if is_lora(model.encoder) else "encoder"
        if a.method == "norm" and not batch_norms(model):
            raise ValueError(f"{a.source}: the model has no batch norm whose statistics could be re-estimated (a ViT's "
                             "layer norms compute theirs per token; its head has no feature standardisation); "
                             "use --method tent or shot")
        params = select_parameters(model, which)
        _, before = predict(model, target)  # the source model's predictions, before anything changes
        if a.method == "norm":  # the steps' forward passes are the re-estimation: a cumulative average from zero
            warnings.filterwarnings("ignore", message=".*training_step.*returned `None`")
            for m in batch_norms(model):
                m.reset_running_stats()
                m.momentum = None
        print(f"adapt / {a.method}: {sum(p.numel() for p in params):,} parameters learn ({which}) on "
              f"{len(target)} unlabelled images of {a.data} [{a.split}]")
        d = self.task.section(cfg, "data")
        module = SiteAdaptationModule(model, a.method, target, a.shot_beta, a.shot_refresh, d.batch_size,
                                      **dict(cfg["optim"], max_steps=cfg["trainer"]["max_steps"]))
        keyed = KeyedDataset(_Indexed(target), seed=cfg["seed"], keys=("image", "index"))
        data = StepData(keyed, len(target), d.batch_size, d.num_workers, cfg["seed"])
        return Built(module, data, cfg=cfg, state={"model": model, "target": target, "before": before,
                                                   "params": which, "n_params": sum(p.numel() for p in params)})

    def export(self, module, folder: RunFolder, trainer, built: Built) -> None:
        """Batch-norm statistics recomputed with the final weights (``norm``: its steps did that); the target's
        predictions after adaptation and the collapse guard; then, unless it collapsed, the model saved as the
        task saves its models (a collapsed adaptation's weights are never written)."""
        a, state = self.config(built.cfg), built.state
        if a.method != "norm":
            recompute_batch_norms(module.model, state["target"], self.task.section(built.cfg, "data").batch_size)
        for m in batch_norms(module.model):
            m.momentum = 0.1
        _, state["after"] = predict(module.model, state["target"])
        state["collapse"] = collapse_reason(class_prior(state["before"]), class_prior(state["after"]), a.collapse_share)
        if state["collapse"] is None:
            self.task.export(module, folder, trainer, built)

    def after_fit(self, built: Built, trainer, folder: RunFolder) -> None:
        """The class prior before and after, the collapse report, and the adapted model scored in-domain on the
        source's validation split (adaptation should not cost the source site)."""
        cfg, state, a = built.cfg, built.state, self.config(built.cfg)
        before, after, reason = state["before"], state["after"], state["collapse"]
        record = {"method": a.method, "source": a.source, "data": a.data, "split": a.split, "steps": trainer.global_step,
                  "params": state["params"], "trainable_params": state["n_params"], "n_target": len(state["target"]),
                  "class_prior_before": class_prior(before), "class_prior_after": class_prior(after),
                  "entropy_before": float(entropy(before).mean()), "entropy_after": float(entropy(after).mean()),
                  "collapsed": reason is not None}
        metrics = {"task": cfg["task"], "method": cfg["method"], "encoder": cfg["encoder"]["name"], "adaptation": record}
        if reason:
            write_json(folder / "metrics.json", metrics)
            raise AdaptationCollapsed(f"{folder.path}: {reason}; weights not written (prior and entropy in metrics.json); "
                                      "try a lower --lr, fewer --steps or --method shot")
        try:
            metrics.update(self.task.evaluate_splits(state["model"], cfg, folder.path, splits=[self.task.section(cfg, "data").val_split]))
        except (DataError, OSError) as e:
            print(f"in-domain validation not evaluated: {e}")
        write_json(folder / "metrics.json", metrics)

    def summary(self, metrics: dict) -> list[str]:
        r = metrics["adaptation"]
        prior = lambda p: "/".join(f"{100 * x:.0f}" for x in p)  # noqa: E731
        lines = [f"adapt / {r['method']}: {r['steps']} steps on {r['n_target']} target images; predicted class shares "
                 f"{prior(r['class_prior_before'])} % -> {prior(r['class_prior_after'])} %, mean entropy "
                 f"{r['entropy_before']:.3f} -> {r['entropy_after']:.3f}"]
        return lines + self.task.summary({k: v for k, v in metrics.items() if k != "adaptation"})


def adaptation_recipe(source: str | Path, method: str, data: str, split: str = "target", steps: int | None = None,
                      lr: float | str = "auto", overrides: dict | None = None) -> dict:
    """The recipe of an adaptation run: the source run's, with ``site_adaptation`` filled in, ``steps`` (default:
    one pass over the target for ``norm``, 50 steps otherwise) and the method's LR."""
    if method not in SITE_METHODS:
        raise ValueError(f"unknown adaptation method {method!r}; available: {', '.join(SITE_METHODS)}")
    cfg = run_recipe(source)
    if cfg["task"] != "classification":
        raise ValueError(f"{source}: a {cfg['task']} run; site adaptation works on classification runs")
    section = {"method": method, "source": str(source), "data": str(data), "split": split}
    cfg = merge(merge(cfg, {"site_adaptation": section}), overrides or {})
    if steps is None:
        n = len(open_dataset(str(data), split=split, spatial_dims=cfg["encoder"]["spatial_dims"]))
        steps = -(-n // cfg["data"]["batch_size"]) if method == "norm" else 50
    lr = SITE_METHODS[method].lr if lr == "auto" else float(lr)
    return merge(cfg, {"trainer": {"max_steps": int(steps)},
                       "optim": {"lr": lr, "warmup_steps": 0, "weight_decay": 0.0}})


def adapt_run(source: str | Path, out: str | Path, method: str, data: str, split: str = "target",
              steps: int | None = None, lr: float | str = "auto", resume: bool = False, overwrite: bool = False,
              overrides: dict | None = None, callbacks=()) -> Path:
    """Adapt the classification run ``source`` to ``split`` of ``data`` with ``method``; the new run in ``out``
    (``resume``: continue a stopped adaptation from its last checkpoint)."""
    cfg = adaptation_recipe(source, method, data, split, steps, lr, overrides)
    return run_finetune(cfg, out, resume=resume, overwrite=overwrite, callbacks=callbacks)


SITE_ADAPTERS["classification"] = SiteAdaptation
