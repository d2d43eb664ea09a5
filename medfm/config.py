"""YAML recipes shared by pretraining and fine-tuning: safe loading, strict merging, ``KEY=VALUE`` overrides.

A recipe is a nested mapping merged onto its defaults. A key that is neither in
the defaults nor inside a *free-form* section (e.g. ``encoder``, ``trainer``:
their keys go straight to a constructor) is an error, so typos never pass
silently.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Collection, Sequence

import yaml


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)$|^[-+]?\d+\.\d*$|^[-+]?\.\d+$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML text safely (no Python objects), with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)


def merge(base: dict, extra: dict, free_form: Collection[str] = (), prefix: str = "") -> dict:
    """``extra`` merged into a copy of ``base``; unknown keys outside ``free_form`` sections raise KeyError."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        name = f"{prefix}{key}"
        if key not in out and prefix.rstrip(".") not in free_form:
            known = ", ".join(sorted(out)) if out else "(none)"
            raise KeyError(f"unknown recipe key {name!r}; known keys here: {known}")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and name not in free_form:
            out[key] = merge(out[key], value, free_form, f"{name}.")
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


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
        node[parts[-1]] = read_yaml(raw)
    return out


def load_config(defaults: dict, free_form: Collection[str], path: str | os.PathLike | None = None,
                overrides: Sequence[str] | dict = ()) -> dict:
    """``defaults``, then the YAML file at ``path``, then ``overrides`` (a dict or ``KEY=VALUE`` strings)."""
    cfg = copy.deepcopy(defaults)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{path}: no such recipe")
        raw = read_yaml(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a YAML mapping, got {type(raw).__name__}")
        cfg = merge(cfg, raw, free_form)
    return merge(cfg, overrides if isinstance(overrides, dict) else parse_overrides(overrides), free_form)
