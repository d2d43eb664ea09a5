"""The one way medfm draws and saves a figure: matplotlib on the Agg backend, imported when a figure is drawn
(matplotlib is slow to import, and a notebook keeps its own backend), and :func:`save_figure` (tight layout,
the folder made, written atomically, the figure closed)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from medfm.atomic import atomic_path

_DRAW = [True]  # False inside figures_off()


@contextmanager
def figures_off():
    """Inside it, :func:`save_figure` closes figures without drawing or writing them: for scores computed many
    times whose figures are not kept (a robustness spec's 20 perturbed passes drew 85 figures, 80 % of its time)."""
    _DRAW.append(False)
    try:
        yield
    finally:
        _DRAW.pop()


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """``fig`` as a PNG at ``path`` (a reader never sees a half-written file), then closed; returns the path
    (inside :func:`figures_off`: closed only, nothing written)."""
    path = Path(path)
    if not _DRAW[-1]:
        pyplot().close(fig)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    pyplot().close(fig)
    return path
