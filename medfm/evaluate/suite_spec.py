"""A downstream suite file: which tasks ``medfm suite`` scores an encoder on, with frozen features.

A suite is a YAML file a user can write (``medfm/evaluate/suites/default_2d.yaml`` is medfm's): a ``name``, the
labelled examples per class to probe with (``shots``), and ``tasks``, each a :class:`SuiteTask`. A task's
``data`` is relative to the suite's data root (``--data-root``, else ``$MEDFM_SUITE_DATA``) unless absolute;
where the root does not hold it, ``fetch`` names the ``medfm data`` set that prepares it. Pretraining reads the
same file to keep every evaluation split out of its mixture (``data.exclude_suite``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SUITES = Path(__file__).parent / "suites"
KINDS = ("classify", "segment")


@dataclass
class SuiteTask:
    name: str
    data: str  # a manifest / npz, relative to the data root unless absolute
    kind: str = "classify"  # classify (linear probe + k-NN) | segment (linear probe on the last feature map)
    label: str | None = None  # manifest label column (npz: its labels)
    train: str = "train"
    val: str = "val"
    fetch: str | None = None  # the `medfm data` name that prepares it
    max_train: int | None = None  # cap on the training pool (spread evenly over it)
    max_val: int | None = None
    zero_shot: dict | None = None  # class -> prompt: zero-shot scores for an encoder with a text tower
    min_train: int = 10  # classes with fewer training examples (or none to evaluate on) are left out


@dataclass
class Suite:
    name: str
    tasks: list[SuiteTask]
    shots: list = field(default_factory=lambda: [1, 10, "all"])
    path: str = ""


def suite_path(suite: str | os.PathLike) -> Path:
    """A suite file: a path, or the name of one of medfm's (``default`` = ``default_2d``)."""
    p = Path(str(suite))
    if p.is_file():
        return p
    name = {"default": "default_2d"}.get(str(suite), str(suite))
    if (SUITES / f"{name}.yaml").is_file():
        return SUITES / f"{name}.yaml"
    known = ", ".join(sorted(f.stem for f in SUITES.glob("*.yaml")))
    raise FileNotFoundError(f"suite {suite}: no such file, and not one of medfm's suites (default, {known})")


def read_suite(suite: str | os.PathLike) -> Suite:
    """The suite file ``suite`` (a path or a medfm suite name), checked: one line naming what is wrong."""
    path = suite_path(suite)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise ValueError(f"{path}: a suite needs a non-empty `tasks` list")
    tasks = []
    for k, t in enumerate(raw["tasks"]):
        try:
            task = SuiteTask(**t)
        except TypeError as e:
            raise ValueError(f"{path}: tasks[{k}]: {e} (keys: {', '.join(SuiteTask.__dataclass_fields__)})") from None
        if task.kind not in KINDS:
            raise ValueError(f"{path}: task {task.name}: unknown kind {task.kind!r} ({', '.join(KINDS)})")
        tasks.append(task)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: two tasks share a name ({names})")
    shots = raw.get("shots", [1, 10, "all"])
    for s in shots:
        if s != "all" and not (isinstance(s, int) and s > 0):
            raise ValueError(f"{path}: shots are whole numbers > 0 or `all`, got {s!r}")
    return Suite(str(raw.get("name", path.stem)), tasks, list(shots), str(path))


def data_root(root: str | os.PathLike | None = None) -> Path | None:
    given = root or os.environ.get("MEDFM_SUITE_DATA")
    return Path(given).expanduser() if given else None


def task_data(task: SuiteTask, root: str | os.PathLike | None = None, prepare: bool = False) -> str | None:
    """Where a task's data is: under the data root (or absolute), else a prepared ``medfm data`` set (prepared
    now when ``prepare``); None when neither holds it."""
    base = data_root(root)
    p = Path(task.data).expanduser()
    p = p if p.is_absolute() or base is None else base / p
    if p.exists():
        return str(p)
    if task.fetch:
        from medfm.data import catalogue

        if prepare or catalogue.folder(task.fetch).exists():
            return str(catalogue.prepare(task.fetch, progress=False))
    return None


def evaluation_splits(suite: str | os.PathLike, root: str | os.PathLike | None = None) -> list[tuple[str, str, str]]:
    """(task name, data path, split) of every evaluation split of a suite whose data is here."""
    out = []
    for task in read_suite(suite).tasks:
        path = task_data(task, root)
        if path is not None:
            out.append((f"{task.name}:{task.val}", path, task.val))
    return out
