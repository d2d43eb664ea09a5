"""Every `medfm` command in the README parses (flags, recipe names), and the ones whose inputs exist here run,
in README order, at the `tiny` profile (``--profile tiny``: ViT-Micro, 32 px, 4 steps) in a scratch folder
where ``data/pneumoniamnist``, ``data/medpix2`` (what ``medfm data prepare NAME --dest data/NAME`` writes) point at
the team's copies when ``../shared/data`` is beside the repository.
The quickstart lines are run by tests/test_quickstart.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from medfm.cli import build_parser, main
from medfm.run import find_recipe

from .conftest import REPO, SHARED

pytestmark = pytest.mark.slow  # README commands run end to end: `make test` runs it, `make test-fast` leaves it out

PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b|\(|\||\.\.\.")  # synopsis lines: RECIPE, RUN, (a | b), ...
SMALLER = {"--n": "2", "--size": "32", "--max-steps": "4", "--devices": "1"}  # value flags shrunk for the run


def readme_commands() -> list[str]:
    """The `medfm ...` lines of the README's bash blocks, continuations joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("medfm "):
                commands.append(line)
    return commands


COMMANDS = readme_commands()


def _required(command: str) -> str:
    return re.sub(r"(?<=\s)\[[^\]]*\]", "", command)  # optional [parts] left out


def _argv(command: str) -> list[str]:
    return shlex.split(_required(command))[1:]


def _synopsis(command: str) -> bool:
    return bool(PLACEHOLDER.search(_required(command).split("medfm ", 1)[1]))


def test_the_readme_has_commands_for_every_subcommand():
    used = {_argv(c)[0] for c in COMMANDS}
    sub = build_parser()._subparsers._group_actions[0].choices
    assert used == set(sub), set(sub) ^ used


@pytest.mark.parametrize("command", COMMANDS)
def test_every_readme_command_parses(command):
    if _synopsis(command):
        assert _argv(command)[0] in build_parser()._subparsers._group_actions[0].choices
        return
    args, extra = build_parser().parse_known_args(_argv(command))
    assert all("=" in e and not e.startswith("-") for e in extra), extra
    if getattr(args, "recipe", None):
        assert find_recipe(args.recipe, kind="tasks" if args.command == "finetune" else ("encoders", "generators")).exists()


def _runnable(argv: list[str]) -> list[str] | None:
    """``argv`` shrunk to the tiny profile, or None when an input it names does not exist here."""
    if argv[0] == "quickstart":
        return None
    if argv[0] == "data" and argv[1] in ("fetch", "prepare") and argv[2] != "mni152":
        return None  # a download; tests/test_data_catalogue.py runs these against a local server
    named = [a for a in argv[1:] if not a.startswith("-") and a != "convert"][:1]  # a checkpoint, or a run
    if argv[0] in ("models", "evaluate", "export") and named and not Path(named[0]).exists():
        return None  # a public model's file or hf: id (tests/test_public_*.py convert stand-ins), a run not made here
    if argv[0] in ("select", "curate") and not Path(argv[1]).exists():
        return None
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in SMALLER and i + 1 < len(argv):
            out += [a, SMALLER[a]]
            i += 2
            continue
        if a == "--profile":
            i += 2
            continue
        if a in ("--data", "--encoder", "--model", "--masks") or (argv[0] in ("encode", "generate-report") and not a.startswith("-")
                                                              and i > 0 and argv[i - 1] not in ("--encoder", "--size", "--spacing", "--pretrained")):
            path = argv[i + 1] if a.startswith("--") else a
            if not Path(path.split("=")[-1]).exists():
                return None
        if a == "--split" and argv[i + 1] == "test":  # the team's copies withhold their test splits
            out += [a, "val"]
            i += 2
            continue
        out.append(a)
        i += 1
    if out[0] in ("pretrain", "finetune"):
        out += ["--profile", "tiny"]
    if out[0] == "evaluate" and any("=" in a for a in out):  # a generator's utility classifiers: ViT-Micro, 2 steps
        out += ["--n", "8", "trainer.max_steps=2", "data.num_workers=0", "encoder.name=vit_micro", "encoder.patch_size=8"]
    return out


def _first_cases(source: Path, dest: Path, n: dict | None = None) -> None:
    """The first cases of each split of a volume manifest (absolute paths): the plan reads every training case and
    the run predicts every validation volume; 12 and 4 show that they run."""
    import csv

    n = n or {"train": 12, "val": 4}
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    keep = []
    for split, k in n.items():
        keep += [{**r, "image": str(source.parent / r["image"]), "mask": str(source.parent / r["mask"])}
                 for r in rows if r["split"] == split][:k]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep)


def _first_images(source: Path, dest: Path, n: int = 400) -> None:
    """``n`` real images spread over each split of a MedMNIST npz, every class in its proportion (the commands
    read every image of a split: a few hundred show that they run, in a fraction of the time)."""
    import numpy as np

    from .pretrain_helpers import spread

    with np.load(source) as d:
        np.savez(dest, **{k: spread(d[k], n) for k in d.files})


OUTPUT_FLAGS = ("--out", "--dest")
SHORT = ("data", "models", "info", "encode", "synth")  # no training: these share one chain


def _paths(argv: list[str]) -> tuple[set[str], set[str]]:
    """What a command writes (the folders after ``--out`` / ``--dest``) and every path-like word it reads."""
    writes = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS}
    reads = set()
    for i, a in enumerate(argv):
        if a.startswith("-") or (i and argv[i - 1] in OUTPUT_FLAGS):
            continue
        for word in a.split("=")[-1].strip("[]").split(","):
            reads.add(word)
    return writes, reads


def readme_chains() -> list[list[str]]:
    """The README's runnable commands in independent chains: a command joins the chain of every earlier command whose
    output folder it reads (``runs/gen2d`` -> ``generate --model runs/gen2d`` -> ``data.train_from=[gen2d/...]``),
    so each chain runs alone, in README order, and the chains run side by side."""
    commands = [c for c in COMMANDS if not _synopsis(c)]
    chain_of = list(range(len(commands)))

    def root(i: int) -> int:
        while chain_of[i] != i:
            i = chain_of[i]
        return i

    # `data prepare NAME --dest data/NAME` is what the test's scratch folder stands in for: not a link
    writes = [_paths(_argv(c))[0] if _argv(c)[0] != "data" else set() for c in commands]
    for j, command in enumerate(commands):
        reads = _paths(_argv(command))[1] | writes[j]  # a second run into the same folder resumes the first
        for i in range(j):
            if any(r == w or r.startswith(w.rstrip("/") + "/") for w in writes[i] for r in reads):
                chain_of[root(j)] = root(i)
    chains: dict[int, list[str]] = {}
    for j, command in enumerate(commands):
        chains.setdefault(root(j), []).append(command)
    short = [c for chain in chains.values() if len(chain) == 1 for c in chain if _argv(c)[0] in SHORT]
    return [short] + [chain for chain in chains.values() if not (len(chain) == 1 and chain[0] in short)]


CHAINS = readme_chains()
# chains of several commands (a run and what reads it) that must stay together
FULL_CHAINS = ("pretrain-mae2d", "pretrain-gen2d", "pretrain-clip", "finetune-report2d", "select-round1")


def _chain_id(chain: list[str]) -> str:
    if all(_argv(c)[0] in SHORT for c in chain):
        return "short-commands"
    argv = _argv(chain[0])
    out = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUTPUT_FLAGS), None)
    return f"{argv[0]}-{Path(out).name}" if out else "-".join(argv[:2])


def _medpix_rows(source: Path, dest: Path, n: int = 48) -> None:
    """The first ``n`` cases' rows of each split of the MedPix manifest (absolute image paths): the report and CLIP
    chains read every row and embed every training image for their baselines; a few cases show that they run."""
    import csv

    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    keep, cases = [], {}
    for r in rows:
        seen = cases.setdefault(r["split"], [])
        if r["case_id"] not in seen and len(seen) < n:
            seen.append(r["case_id"])
        if r["case_id"] in seen:
            keep.append({**r, "image": str(source.parent / r["image"])})
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)


def test_the_chains_hold_every_command_once_and_keep_what_depends_together():
    flat = [c for chain in CHAINS for c in chain]
    assert sorted(flat) == sorted(c for c in COMMANDS if not _synopsis(c))
    by_command = {c: k for k, chain in enumerate(CHAINS) for c in chain}
    pretrain_mae = next(c for c in flat if "--out runs/mae2d" in c)
    assert by_command[pretrain_mae] == by_command[next(c for c in flat if "--encoder runs/mae2d" in c)]
    gen = next(c for c in flat if "--out runs/gen2d" in c)
    assert by_command[gen] == by_command[next(c for c in flat if "train_from=[gen2d" in c)]
    assert len(CHAINS) >= 8
    ids = [_chain_id(c) for c in CHAINS]
    assert set(FULL_CHAINS) <= set(ids) and all(len(CHAINS[ids.index(i)]) >= 2 for i in FULL_CHAINS), ids


@pytest.mark.parametrize("chain", CHAINS, ids=_chain_id)
def test_the_readme_commands_run_at_tiny_scale(chain, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    if SHARED.exists():
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared" / "data").symlink_to(SHARED)
        # where `medfm data prepare NAME --dest data/NAME` puts them (the team's copies have the same columns)
        (work / "data" / "pneumoniamnist").mkdir(parents=True)
        _first_images(SHARED / "pneumoniamnist" / "pneumoniamnist_trainval.npz",
                      work / "data" / "pneumoniamnist" / "pneumoniamnist.npz")
        _medpix_rows(SHARED / "medpix2" / "manifest.csv", work / "data" / "medpix2" / "manifest.csv")
        _first_cases(SHARED / "msd_hippocampus" / "manifest.csv", work / "data" / "msd_hippocampus" / "manifest.csv")
    monkeypatch.chdir(work)
    monkeypatch.setenv("MEDFM_RECIPES", str(REPO))
    ran = []
    for command in chain:
        argv = _runnable(_argv(command))
        if argv is None:  # a download, a user's own file, or a run this chain could not make here
            continue
        code = main(argv)
        assert code == 0, f"{command}\n-> medfm {' '.join(argv)}\n{capsys.readouterr().err[-2000:]}"
        ran.append(command)
    if not ran:
        pytest.skip(f"inputs not here (a download, a user's own files, or ../shared absent): {chain[0]}")


def test_the_architecture_example_of_a_new_encoder_family_runs_as_written():
    """The README's "Adding an encoder family" example, executed as it stands; the family it registers is removed."""
    from medfm.encoders import Encoder, unregister_encoder

    text = (REPO / "README.md").read_text().split("## Architecture", 1)[1]
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "register_encoder" in b)
    scope: dict = {}
    try:
        exec(compile(block, "README.md (Adding an encoder family)", "exec"), scope)
        assert isinstance(scope["enc"], Encoder) and scope["enc"].architecture == "two_conv"
        assert scope["enc"](scope["torch"].rand(2, 1, 32, 32, 32)).shape == (2, 32)
    finally:
        unregister_encoder("two_conv")
