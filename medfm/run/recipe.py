"""YAML recipes: declared sections with defaults and types, safe loading, strict merging, overrides.

A recipe is a nested mapping merged onto the defaults of its *schema*: ``{section name: spec}`` where a
spec is

* a dataclass: a typed section; each field's default is the section's default, its annotation the
  type a value must have; a field whose default is a dict is a free-form sub-section;
* :class:`FreeForm`: a section whose keys go straight to a constructor (``encoder``, ``trainer``), with
  defaults;
* anything else: a top-level scalar and its default (``seed: 0``).

Each plug-in declares its own section once (its ``Config`` dataclass); the run kinds assemble schemas
from the common sections below and the registered plug-ins. A key that is not in the schema (outside
free-form sections) is an error naming the key, the file and the nearest valid key; a value of the
wrong type is an error naming the key and the type.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .folder import RECIPE_NAME
from .profiles import profile_overrides
from .trainer import TRAINER_DEFAULTS


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_yaml(text: str, source: str = "YAML") -> Any:
    """Parse YAML text safely (no Python objects), with ``1e-3`` read as a float; a tag such as
    ``!!python/object`` or a syntax error is a ValueError naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        why = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{source}{line}: not a plain YAML recipe: {why}") from None


@dataclass(frozen=True)
class FreeForm:
    """A section whose keys are passed on as they are (to a constructor), with these defaults. ``accepts``
    (called lazily with the section) lists the keys the constructor takes: any other key is an error naming
    the nearest one, except those ``other`` lists (keys of a sibling constructor, e.g. a ViT's
    ``patch_size`` in a recipe switched to a ResNet), which are dropped with a note."""

    defaults: dict = field(default_factory=dict)
    accepts: Any = None
    other: Any = None


def _parameters(*targets: Any) -> set[str]:
    """The keyword names of callables / classes (their ``__init__``)."""
    names: set[str] = set()
    for t in targets:
        fn = t.__init__ if isinstance(t, type) else t
        names |= {p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
    return names


def _encoder_keys(section: dict) -> set[str]:
    """What the chosen encoder takes: ``create_encoder``'s arguments and the family's own (its builder's,
    and its class's when the builder passes keywords on); every family's when the name is unknown (the
    build then names the registered ones)."""
    from medfm.encoders import create_encoder, encoder_arguments, list_encoders

    name = section.get("name")
    if name not in list_encoders():
        return _all_encoder_keys(section)
    return _parameters(create_encoder) | encoder_arguments(name)


def _all_encoder_keys(section: dict) -> set[str]:
    from medfm.encoders import create_encoder, encoder_arguments, list_encoders

    return _parameters(create_encoder).union(*(encoder_arguments(n) for n in list_encoders()))


def _trainer_keys(section: dict) -> set[str]:
    import lightning as L

    return set(TRAINER_DEFAULTS) | _parameters(L.Trainer)


# ----------------------------------------------------------------- common sections
@dataclass
class OptimConfig:
    """``optim``: AdamW and the warm-up + cosine (or nnU-Net's poly) schedule (every run kind)."""

    lr: float = 1.5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | poly: (1 - step / max_steps)^0.9 after the warm-up (nnU-Net's)


@dataclass
class DataConfig:
    """The part of ``data`` every run kind shares (each kind's section derives from it and adds its own keys):
    where the data is, how it is preprocessed, loaded and checked."""

    path: str | None = None  # npz, CSV/TSV/JSONL manifest or folder (or give --data)
    preset: str = "radiograph_2d"  # intensity/geometry preprocessing: radiograph_2d | ct_3d | mr_3d
    preset_args: dict = field(default_factory=dict)  # e.g. {spacing: 2.0} for the 3D presets
    batch_size: int = 32  # per device
    num_workers: int | str = "auto"  # DataLoader workers: auto = usable cores - 1 (at most 8); capped at the cores
    cache: bool | str = True  # the preprocessed samples: true (in memory) | false | disk (persistent, data.cache_dir)
    cache_dir: str | None = None  # disk cache folder (default $MEDFM_CACHE/preprocessed or ~/.cache/medfm/preprocessed)
    on_error: str = "raise"  # raise: a bad file stops the run naming its row | skip: its row is dropped and counted
    preflight: bool | str = "auto"  # read every file's header before training (auto: manifests up to 5000 rows)


ENCODER = FreeForm({"name": "vit_small", "spatial_dims": 2, "in_chans": 1, "img_size": 224, "pretrained": None},
                   accepts=_encoder_keys, other=_all_encoder_keys)
TRAINER = FreeForm(TRAINER_DEFAULTS, accepts=_trainer_keys)


def adopt_saved_architecture(cfg: dict) -> None:
    """When ``encoder.pretrained`` is a medfm encoder folder (a pretraining run's ``encoder/``), the encoder is
    built as saved there (registered name, patch size): the recipe's defaults name a GPU-scale ViT-S/16, the
    weights may be a ViT-Tiny/8 from a ``--profile cpu`` run. Its readout (``global_pool``, ``fc_norm``: how
    the method that trained it pools tokens) is taken too unless the recipe sets it. Says what it changes."""
    from medfm.encoders import saved_architecture
    from medfm.encoders.factory import READOUT

    enc = cfg.get("encoder")
    arch = saved_architecture(enc["pretrained"], enc.get("spatial_dims")) if isinstance(enc, dict) and enc.get("pretrained") else None
    changed = {k: v for k, v in (arch or {}).items() if enc.get(k) != v and not (k in READOUT and k in enc)}
    if changed:
        said = lambda k: k in enc or k in READOUT or k == "patch_size"  # noqa: E731  keys a recipe speaks of
        shown = [f"{k} {enc.get(k)} -> {v}" for k, v in changed.items() if said(k)]
        rest = [k for k in changed if not said(k)]  # a public family's sizes, which the recipe never names
        more = f"; {', '.join(rest)} as saved" if rest else ""
        print(f"encoder: {', '.join(shown) or 'architecture'}{more} (from {enc['pretrained']})")
        enc.update(changed)
        known = _encoder_keys(enc)
        for key in [k for k in enc if k not in known]:  # e.g. a ViT's patch_size, the weights being a CNN's
            _drop_key(enc, "encoder", key)
        _fit_img_size(enc)  # after: a dropped ViT patch size must not round a CNN's size


def _fit_img_size(enc: dict) -> None:
    """A public model's patch (DINOv2's 14) may not divide the recipe's size (a profile's 32 or 64 px): the size
    becomes the nearest multiple of the patch, said in one line."""
    patch, size = enc.get("patch_size"), enc.get("img_size")
    if not isinstance(patch, int) or patch < 2 or size is None:
        return
    sizes = [size] if isinstance(size, int) else list(size)
    fitted = [max(patch, round(s / patch) * patch) for s in sizes]
    if fitted != sizes:
        enc["img_size"] = fitted[0] if isinstance(size, int) else fitted
        print(f"encoder: img_size {size} -> {enc['img_size']} (a multiple of the patch size {patch})")


def _drop_key(sec: dict, name: str, key: str) -> None:
    """Remove a key of a free-form section that the section's constructor does not take, saying so."""
    value = sec.pop(key)
    if value is not None:
        print(f"{name}.{key}: {value!r} dropped ({name} {sec.get('name')!r} does not take it)")


def section(cfg: dict, name: str, cls: type):
    """The recipe section ``name`` as its dataclass (typed access for the plug-in that owns it)."""
    return cls(**cfg[name])


def with_defaults(cls: type, **defaults: Any) -> type:
    """A subclass of the dataclass ``cls`` with other defaults (e.g. fine-tuning's larger learning rate)."""
    new = [(k, typing.get_type_hints(cls)[k], field(default_factory=lambda v=v: copy.deepcopy(v)))
           for k, v in defaults.items()]
    return dataclasses.make_dataclass(cls.__name__, new, bases=(cls,))


# ----------------------------------------------------------------- schema walk
def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return copy.deepcopy(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise TypeError(f"recipe field {f.name} needs a default")


def describe(schema: dict) -> tuple[dict, set[str], dict[str, Any]]:
    """(defaults, free-form paths, ``{path: type}``) of a schema."""
    defaults: dict = {}
    free: set[str] = set()
    hints: dict[str, Any] = {}
    for name, spec in schema.items():
        if dataclasses.is_dataclass(spec) and isinstance(spec, type):
            types_ = typing.get_type_hints(spec)
            sec = {}
            for f in dataclasses.fields(spec):
                sec[f.name] = _field_default(f)
                hints[f"{name}.{f.name}"] = types_[f.name]
                if isinstance(sec[f.name], dict):
                    free.add(f"{name}.{f.name}")
            defaults[name] = sec
        elif isinstance(spec, FreeForm):
            defaults[name] = copy.deepcopy(spec.defaults)
            free.add(name)
        else:
            defaults[name] = copy.deepcopy(spec)
    return defaults, free, hints


def _unknown(source: str, name: str, key: str, known: Sequence[str]) -> KeyError:
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return KeyError(f"{source}: unknown recipe key {name!r}{hint} (valid keys here: {', '.join(sorted(known)) or 'none'})")


def merge(base: dict, extra: dict, free_form: set[str] | Sequence[str] = (), source: str = "recipe",
          prefix: str = "") -> dict:
    """``extra`` merged into a copy of ``base``; unknown keys outside ``free_form`` sections raise KeyError."""
    out = copy.deepcopy(base)
    if not isinstance(extra, dict):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'the recipe'} must be a mapping, got {extra!r}")
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if key not in out and prefix.rstrip(".") not in free_form:
            raise _unknown(source, name, str(key), list(out))
        if isinstance(value, dict) and isinstance(out.get(key), dict) and name not in free_form:
            out[key] = merge(out[key], value, free_form, source, f"{name}.")
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------- types
def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def matches(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field annotation (int for float is fine; bool is not an int)."""
    if hint is Any or hint is object:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return not args or all(matches(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check_types(cfg: dict, hints: dict[str, Any], source: str) -> None:
    for path, hint in hints.items():
        sec, key = path.split(".", 1)
        value = cfg[sec][key]
        if not matches(value, hint):
            raise ValueError(f"{source}: recipe key {path!r} must be {_type_name(hint)}, got {value!r}")


# ----------------------------------------------------------------- loading
def parse_overrides(items: Sequence[str]) -> dict:
    """``["trainer.max_steps=10", "mae.mask_ratio=0.6"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. trainer.max_steps=100)")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = read_yaml(raw, f"override {item!r}")
    return out


def load_config(schema: dict, path: str | os.PathLike | None = None, overrides: Sequence[str] | dict = (),
                profile: str | None = None) -> dict:
    """The schema's defaults, then the YAML file at ``path``, then a size ``profile`` (``cpu``;
    :mod:`medfm.run.profiles`), then ``overrides`` (a dict or ``KEY=VALUE`` strings); unknown keys and wrong
    types raise errors that name the file (or "override")."""
    cfg, free, hints = describe(schema)
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such recipe")
        raw = read_yaml(p.read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
        source = str(path)
        cfg = merge(cfg, raw, free, source)
    if overrides and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    if profile:
        # the profile sees the recipe as the overrides leave it (e.g. --encoder WEIGHTS keeps the architecture)
        seen = merge(cfg, overrides or {}, free, "override")
        cfg = merge(cfg, profile_overrides(profile, seen, overrides), free, f"profile {profile}")
        source = f"{source} (profile {profile})"
    if overrides:
        source = "override" if path is None else f"{source} (with overrides)"
        cfg = merge(cfg, overrides, free, "override")
    check_types(cfg, hints, source)
    for name, spec in schema.items():
        if isinstance(spec, FreeForm) and spec.accepts is not None:
            known = spec.accepts(cfg[name])
            other = spec.other(cfg[name]) if spec.other is not None else set()
            for key in list(cfg[name]):
                if key in known:
                    continue
                if key not in other:
                    raise _unknown(source, f"{name}.{key}", str(key), sorted(known))
                _drop_key(cfg[name], name, key)
    return cfg


# ----------------------------------------------------------------- finding recipe files
def recipe_roots() -> list[Path]:
    """Where recipes are looked for: ``$MEDFM_RECIPES``, the current folder, the source checkout."""
    roots = [Path(p) for p in os.environ.get("MEDFM_RECIPES", "").split(os.pathsep) if p]
    roots += [Path.cwd(), Path(__file__).resolve().parents[2]]
    seen, out = set(), []
    for r in roots:
        r = r.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


RECIPE_FOLDERS = ("encoders", "generators", "tasks")  # pretraining, generator and fine-tuning recipes


def list_recipes() -> dict[str, list[Path]]:
    """``{"encoders": [...], "generators": [...], "tasks": [...]}``: every ``*.yaml`` recipe found, first root
    wins per name."""
    found: dict[str, dict[str, Path]] = {kind: {} for kind in RECIPE_FOLDERS}
    for root in recipe_roots():
        for kind in found:
            for p in sorted((root / kind).glob("*.yaml")):
                found[kind].setdefault(p.name, p)
    return {kind: list(v.values()) for kind, v in found.items()}


def find_recipe(name: str, kind: str | Sequence[str] = "encoders") -> Path:
    """A recipe path, or a bare name (``mae_vit_2d``) looked up in the recipe folder(s) ``kind`` (a path that
    does not exist is looked up by its name too: ``generators/diffusion_2d.yaml`` finds ``generators/``'s)."""
    if Path(name).exists():
        return Path(name)
    stem = Path(name).name.removesuffix(".yaml")
    kinds = [kind] if isinstance(kind, str) else list(kind)
    kind = " / ".join(kinds)
    found = [p for k in kinds for p in list_recipes()[k]]
    for p in found:
        if p.stem == stem:
            return p
    known = ", ".join(p.stem for p in found) or "(none found)"
    raise FileNotFoundError(f"{name}: no such recipe file or name; {kind} recipes: {known}")


# ----------------------------------------------------------------- sections from code
def config_from_signature(target: Any, name: str, exclude: Sequence[str] = ("self",)) -> type:
    """A recipe-section dataclass whose fields are ``target``'s keyword arguments (defaults and type hints
    from its signature), so a model's defaults are declared once, in the model."""
    fn = target.__init__ if isinstance(target, type) else target
    hints = typing.get_type_hints(fn)
    fields_ = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in exclude or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"{name}: argument {p.name!r} of {target.__qualname__} has no default")
        fields_.append((p.name, hints.get(p.name, Any), field(default_factory=lambda v=p.default: copy.deepcopy(v))))
    cls = dataclasses.make_dataclass(name, fields_)
    cls.__doc__ = f"Recipe section: the keyword arguments of {target.__module__}.{target.__qualname__}."
    return cls


def split_kwargs(cls: type, kwargs: dict) -> tuple[Any, dict]:
    """``kwargs`` split into the dataclass ``cls`` (its fields) and the rest (e.g. optimizer arguments)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items() if k not in names}


# ----------------------------------------------------------------- resuming
# keys a resumed run may change without --allow-change (how long and how it reports, not what it learns)
FREE_ON_RESUME = ("trainer.max_steps", "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps",
                  "trainer.enable_progress_bar", "trainer.devices", "data.num_workers")


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_config(loader, run: str | os.PathLike, overrides: Sequence[str] = (), allow: Sequence[str] = ()
                  ) -> tuple[dict, dict]:
    """The recipe a resumed run continues with: the run's own ``recipe.yaml`` (what ran), then ``overrides``.
    An override that changes a saved value is an error naming the key and both values, unless the key is in
    ``FREE_ON_RESUME`` or ``allow`` (``--allow-change KEY``); returns the recipe and ``{key: {"from", "to"}}``
    of what changed, for run.json. ``loader(path, overrides, resolved=True)`` reads a recipe of the run's kind
    (:meth:`medfm.run.RecipeKind.load`)."""
    saved = Path(run) / RECIPE_NAME
    if not saved.exists():
        raise FileNotFoundError(f"{saved}: nothing to resume ({run} holds no {RECIPE_NAME}: not a run folder)")
    cfg = loader(saved, list(overrides), resolved=True)  # the encoder was resolved when the run started
    before, after = flatten(loader(saved, resolved=True)), flatten(cfg)
    changes = {k: {"from": before.get(k), "to": v} for k, v in after.items() if before.get(k) != v}
    refused = [k for k in changes if k not in FREE_ON_RESUME and k not in allow]
    if refused:
        k = refused[0]
        raise ValueError(f"--resume continues {run} with its own recipe ({saved}); {k} would change from "
                         f"{changes[k]['from']!r} to {changes[k]['to']!r}: drop that override, or pass --allow-change {k} "
                         "to change it on purpose (recorded in run.json)")
    return cfg, changes
