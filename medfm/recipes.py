"""Find the YAML recipes: top-level ``encoders/`` (pretraining) and ``tasks/`` (fine-tuning)."""

from __future__ import annotations

import os
from pathlib import Path


def recipe_roots() -> list[Path]:
    """Where recipes are looked for: ``$MEDFM_RECIPES``, the current folder, the source checkout."""
    roots = [Path(p) for p in os.environ.get("MEDFM_RECIPES", "").split(os.pathsep) if p]
    roots += [Path.cwd(), Path(__file__).resolve().parents[1]]
    seen, out = set(), []
    for r in roots:
        r = r.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def list_recipes() -> dict[str, list[Path]]:
    """``{"encoders": [...], "tasks": [...]}``: every ``*.yaml`` recipe found, first root wins per name."""
    found: dict[str, dict[str, Path]] = {"encoders": {}, "tasks": {}}
    for root in recipe_roots():
        for kind in found:
            for p in sorted((root / kind).glob("*.yaml")):
                found[kind].setdefault(p.name, p)
    return {kind: list(v.values()) for kind, v in found.items()}


def find_recipe(name: str, kind: str = "encoders") -> Path:
    """A recipe path, or a bare name (``mae_vit_2d``) looked up in the recipe folders."""
    if Path(name).exists():
        return Path(name)
    stem = Path(name).name.removesuffix(".yaml")
    found = list_recipes()[kind]
    for p in found:
        if p.stem == stem:
            return p
    known = ", ".join(p.stem for p in found) or "(none found)"
    raise FileNotFoundError(f"{name}: no such recipe file or name; {kind} recipes: {known}")
