"""One ``run()`` skeleton for every kind of training run, and the plug-in interface it drives.

A *plug-in* is one pretraining method (MAE, DINO, CLIP, ...) or one fine-tuning task (classification,
segmentation). It declares its recipe section once (``Config``, a dataclass; :mod:`medfm.run.recipe`)
and its needs through hooks:

* ``build(cfg, folder) -> Built``: the LightningModule, the step-keyed data and extra callbacks
  (what data or views it wants is decided here);
* ``before_fit(built, folder, resumed)``: rank 0, before training (e.g. a baseline measurement);
* ``export(module, folder, trainer, built)``: rank 0, at the end of training: what the run saves (artifact
  folders, figures); the main artifact's sub-folder is ``model_folder``;
* ``after_fit(built, trainer, folder)``: rank 0, after training (evaluation, metrics.json);
* ``evaluate(run, **options)``: ``medfm evaluate RUN`` for a run of this plug-in (``summary``: its
  headline numbers for the console).

A :class:`RecipeKind` (pretraining, fine-tuning, generator) is the one path from a recipe file to a run:
``load`` (schema, profile, overrides, checks) and ``run``.

``run(plugin, cfg, out)`` does what every run shares: the run folder (refuse to overwrite, resume from
``checkpoints/last.ckpt``), seeding, the Trainer (logs, checkpoints, RNG state, finite-loss guard),
``recipe.yaml`` and ``run.json`` written atomically, the speed switches (``trainer.compile``,
``channels_last``, ``activation_checkpointing``), fit, export.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import callbacks as callbacks_mod
from .callbacks import Export, StopCheckpoint
from .folder import RunFolder
from .module import apply_speed_switches
from .recipe import adopt_saved_architecture, load_config, merge, read_yaml, section
from .trainer import make_trainer, quiet_known_noise


@dataclass
class Built:
    """What a plug-in builds for one run: the module to fit, its data, extra callbacks, the recipe
    completed from the data (``cfg``, e.g. the number of classes; written as recipe.yaml) and any state
    its later hooks need."""

    module: L.LightningModule
    data: L.LightningDataModule
    callbacks: list = field(default_factory=list)
    cfg: dict | None = None
    state: dict = field(default_factory=dict)


class RunPlugin:
    """Base of every plug-in (see the module docstring). ``kind`` names the recipe family
    (``pretrain`` | ``finetune``), ``name`` the value that selects it and its recipe section."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    model_folder: ClassVar[str] = "model"
    # the keyword options ``evaluate`` takes besides the run (``medfm evaluate RUN --OPTION``): the contract the
    # command checks, so an option this kind of run does not take is an error, never silently ignored
    evaluate_options: ClassVar[tuple[str, ...]] = ()

    def config(self, cfg: dict):
        """This plug-in's own recipe section, typed."""
        return self.Config(**cfg[self.name]) if self.Config is not None else None

    def section(self, cfg: dict, name: str):
        """The recipe section ``name`` as the dataclass its kind's schema declares (``data``, ``optim``, an
        adaptation method's, ...), so hooks read typed fields instead of nested dict keys."""
        return section(cfg, name, KINDS[self.kind].schema()[name])

    def build(self, cfg: dict, folder: RunFolder) -> Built:  # pragma: no cover - abstract
        raise NotImplementedError

    def before_fit(self, built: Built, folder: RunFolder, resumed: bool) -> None:
        pass

    def export(self, module: L.LightningModule, folder: RunFolder, trainer: L.Trainer, built: Built) -> None:
        pass

    def after_fit(self, built: Built, trainer: L.Trainer, folder: RunFolder) -> None:
        pass

    def evaluate(self, run: Path) -> dict:
        raise NotImplementedError(f"{self.kind} plug-in {self.name!r} has no evaluation")

    @classmethod
    def unknown_evaluate_options(cls, options: Sequence[str]) -> list[str]:
        """The names in ``options`` this plug-in's ``evaluate`` does not take (:attr:`evaluate_options`)."""
        return [o for o in options if o not in cls.evaluate_options]

    def summary(self, metrics: dict) -> list[str]:
        """The headline numbers of ``evaluate``'s metrics, as lines for the console."""
        lines = []
        for key, value in metrics.items():
            if isinstance(value, dict):
                lines.append(f"  {key:<14} " + "  ".join(f"{k} {v:.4f}" for k, v in value.items() if isinstance(v, float)))
            elif isinstance(value, float):
                lines.append(f"  {key:<14} {value:.4f}")
        return lines


class Registry(dict):
    """Plug-ins of one kind by name; ``register`` is the one line a new plug-in file adds."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, cls: type[RunPlugin]) -> type[RunPlugin]:
        if not cls.name:
            raise ValueError(f"{cls.__name__}: a plug-in needs a name")
        if cls.name in self and self[cls.name] is not cls:
            raise ValueError(f"{self.kind} plug-in {cls.name!r} is registered twice")
        cls.kind = self.kind
        self[cls.name] = cls
        return cls

    def get_plugin(self, name: str) -> RunPlugin:
        if name not in self:
            raise ValueError(f"unknown {self.kind} method {name!r}; available: {', '.join(self)}")
        return self[name]()

    def sections(self) -> dict[str, type]:
        """Every registered plug-in's recipe section, by name."""
        return {name: cls.Config for name, cls in self.items() if cls.Config is not None}


@dataclass
class RecipeKind:
    """One kind of recipe (pretraining, fine-tuning, generator): its plug-in ``registry``, the top-level key that
    picks the plug-in (``selector``: ``method`` | ``task``), its ``schema`` (common sections + every
    registered plug-in's own), the kind's checks of a loaded recipe (``check``) and the folder its recipes
    live in. ``load`` and ``run`` are the one recipe path every kind goes through."""

    registry: Registry
    selector: str
    schema: Callable[[], dict]
    check: Callable[[dict], None] | None = None
    folder: str = "encoders"
    # the plug-in of a recipe, when it is not simply the registry's entry its selector names (a fine-tuning
    # recipe with a ``site_adaptation`` section runs the site-adaptation plug-in of its task)
    choose: Callable[[dict], RunPlugin] | None = None

    def __post_init__(self) -> None:
        KINDS[self.registry.kind] = self

    def plugin(self, cfg: dict) -> RunPlugin:
        if self.choose is not None:
            return self.choose(cfg)
        return self.registry.get_plugin(cfg[self.selector])

    def load(self, path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = (),
             profile: str | None = None, resolved: bool = False) -> dict:
        """The recipe at ``path`` (or the defaults) with the ``profile`` and ``overrides`` applied, the encoder
        built as a pretrained folder saved it, checked (an unknown plug-in names the known ones).
        ``resolved``: a run's own recipe.yaml, whose encoder was resolved when the run started, so its source
        (a public folder, a hub id) is not read again: a run evaluates after its source is gone."""
        cfg = load_config(self.schema(), path, overrides, profile)
        if isinstance(cfg.get("encoder"), dict) and not resolved:
            adopt_saved_architecture(cfg)
        self.plugin(cfg)
        if self.check is not None:
            self.check(cfg)
        return cfg

    def run(self, cfg: dict, out: str | os.PathLike, data_path: str | None = None, resume: bool = False,
            callbacks: Sequence[L.Callback] = (), **run_options: Any) -> Path:
        """Train as the recipe says (``data_path`` sets ``data.path``); returns the run folder."""
        if data_path:
            cfg = merge(cfg, {"data": {"path": str(data_path)}})
        return run(self.plugin(cfg), cfg, out, resume=resume, callbacks=callbacks, **run_options)


KINDS: dict[str, RecipeKind] = {}  # by the registry's kind: pretrain | finetune | generate


def run_plugin(run: str | os.PathLike) -> RunPlugin:
    """The plug-in that made a run folder, from its ``run.json`` (a folder without one is taken for a
    fine-tuning run written before run.json existed: its recipe's task)."""
    folder = RunFolder(run)
    if not (folder.path / "run.json").exists():
        if not (folder.path / "recipe.yaml").exists():
            raise FileNotFoundError(f"{run}: not a finished fine-tuning run, nor any other medfm run (no run.json, "
                                    "no recipe.yaml)")
        kind = KINDS["finetune"]
        return kind.registry.get_plugin(folder.read_recipe()[kind.selector])
    info = folder.info()
    kind = KINDS.get(info.get("kind"))
    if kind is None:
        raise ValueError(f"{run}: unknown run kind {info.get('kind')!r} in run.json")
    return kind.registry.get_plugin(info["plugin"])


def recipe_kind(path: str | os.PathLike, among: Sequence[str] | None = None) -> RecipeKind:
    """The kind of the recipe file at ``path``, read from the recipe itself: the kind whose registry holds the
    plug-in its selector key names (``method: diffusion`` is a generator, ``method: mae`` pretraining)."""
    raw = read_yaml(Path(path).read_text(), str(path)) or {}
    kinds = [KINDS[k] for k in (among or KINDS) if k in KINDS]
    for kind in kinds:
        if isinstance(raw, dict) and raw.get(kind.selector) in kind.registry:
            return kind
    return kinds[0]  # no or an unknown plug-in name: the first kind's loader says what is wrong


def run(plugin: RunPlugin, cfg: dict, out: str | os.PathLike, resume: bool = False,
        callbacks: Sequence[L.Callback] = (), overwrite: bool = False, changes: dict | None = None) -> Path:
    """Train as ``cfg`` says with ``plugin``; returns the run folder. ``resume=True`` continues from
    ``out/checkpoints/last.ckpt`` (model, optimizer, scheduler, step, RNG): the resumed run ends with
    the weights an uninterrupted run would have. ``overwrite=True`` replaces the run outputs in ``out``.
    ``changes`` (a resume's changed recipe keys) are recorded in run.json.

    The folder is locked while the run lives; a folder this call created is removed again when the run
    cannot start (a bad recipe value or data file), so an error never leaves a half-made run. SIGTERM (a
    scheduler's stop) writes the checkpoint and ends with :class:`Stopped` (exit 143)."""
    steps = cfg["trainer"].get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # -1 would train forever, 0 not at all
        raise ValueError(f"trainer.max_steps (--max-steps) must be a whole number >= 1, got {steps!r}")
    quiet_known_noise()
    folder = RunFolder(out)
    created = not folder.path.exists()
    try:
        folder.lock()
        ckpt = folder.prepare(resume, overwrite)
        L.seed_everything(cfg["seed"], workers=True, verbose=False)
        try:
            built = plugin.build(cfg, folder)
            apply_speed_switches(built.module, cfg["trainer"])
            export = Export(plugin, folder, built)
            trainer = make_trainer(cfg["trainer"], folder.path, [*built.callbacks, export,
                                                                 StopCheckpoint(folder.checkpoint), *callbacks])
        except TypeError as e:  # a free-form section's key that its constructor does not take (e.g. view.scael)
            raise recipe_key_error(e, cfg) or e
    except BaseException:
        folder.unlock()
        if created and folder.path.exists():
            shutil.rmtree(folder.path, ignore_errors=True)
        raise
    try:
        if trainer.is_global_zero:
            folder.write_recipe(built.cfg or cfg)
            folder.write_info(kind=plugin.kind, plugin=plugin.name)
            if changes:
                history = folder.info().get("resumed_with_changes", [])
                folder.write_info(resumed_with_changes=[*history, changes])
            plugin.before_fit(built, folder, resumed=ckpt is not None)
        try:
            trainer.fit(built.module, datamodule=built.data, ckpt_path=str(ckpt) if ckpt else None)
        except SIGTERMException:
            raise Stopped(f"stopped by SIGTERM at step {trainer.global_step}: checkpoint {folder.checkpoint} written; "
                          "continue with the same command and --resume") from None
        if callbacks_mod.sharded_parameters(trainer):
            export_gathered(plugin, cfg, folder, trainer, export)
        if trainer.is_global_zero:
            # resumed at the last step (a kill during the export): nothing trained, export now. Not where the ranks
            # were child processes (ddp_fork / ddp_spawn): rank 0 exported there, and this process holds its weights
            if not export.done and not ranks_were_children(trainer):
                export.export(trainer, built.module)
            folder.write_info(model=plugin.model_folder)
            plugin.after_fit(built, trainer, folder)
            print(folder.summary_line(plugin.model_folder))
    finally:
        folder.unlock()
    return folder.path


def ranks_were_children(trainer: L.Trainer) -> bool:
    """Whether the training ranks ran in processes forked or spawned from this one (Lightning's ``ddp_fork`` /
    ``ddp_spawn``): their callbacks (the export) ran there, and Lightning brought rank 0's weights back here."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


def export_gathered(plugin: RunPlugin, cfg: dict, folder: RunFolder, trainer: L.Trainer, export: Export) -> None:
    """The export of a run whose weights are sharded over the ranks (FSDP): every rank writes the final
    checkpoint (Lightning gathers the full state dict into rank 0's file), then rank 0 builds the plug-in's
    module afresh, loads those weights (``weights_only``) and exports them as any run does."""
    import torch

    trainer.save_checkpoint(folder.checkpoint)
    if trainer.is_global_zero:
        module = plugin.build(cfg, folder).module
        state = torch.load(folder.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        export.export(trainer, module)


def recipe_key_error(error: TypeError, cfg: dict) -> KeyError | None:
    """A constructor's "unexpected keyword argument 'k'" turned into the recipe error: which section holds
    ``k`` and the nearest key that section's other entries use (None when ``k`` is not from the recipe)."""
    import difflib
    import re

    m = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    sections = [name for name, sec in cfg.items() if isinstance(sec, dict) and m and m.group(1) in sec]
    if not sections:
        return None
    key, sec = m.group(1), sections[0]
    near = difflib.get_close_matches(key, [k for k in cfg[sec] if k != key], n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return KeyError(f"unknown recipe key '{sec}.{key}'{hint} ({error})")


class Stopped(SystemExit):
    """A run stopped from outside (SIGTERM) after writing its checkpoint: exit status 143 (128 + SIGTERM), so
    job chains and schedulers see that it did not finish; the message says how to continue."""

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message
