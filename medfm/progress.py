"""One progress bar for all of medfm: tqdm on a terminal, whole lines in a log.

tqdm redraws its bar with carriage returns, which is right on a terminal and wrong in a file: a demo
redirected to a log wrote ~4,000 redraws (470 kB). :func:`progress_bar` returns a tqdm bar when the stream is a
terminal and a :class:`LineProgress` otherwise, which writes one ordinary line every ``every`` percent (and
at the end), so a log shows the progress and stays small. Everything else (``update``, ``set_postfix_str``,
``tqdm.write``, iteration) is tqdm's own.
"""

from __future__ import annotations

import io
import os
import sys

from tqdm.auto import tqdm
from tqdm.std import tqdm as std_tqdm

EVERY = 10  # percent between two lines when the output is not a terminal


def wants_bar(stream=None) -> bool:
    """Whether progress on ``stream`` (default stderr, where bars go) should redraw as a bar: an interactive
    terminal, or a Jupyter kernel (tqdm's widget). ``MEDFM_PROGRESS=lines`` or ``=bar`` forces one or the
    other (for a notebook whose output is logged, or a CI log that wants bars)."""
    forced = os.environ.get("MEDFM_PROGRESS", "").lower()
    if forced in ("lines", "bar"):
        return forced == "bar"
    if _in_jupyter_kernel():
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _in_jupyter_kernel() -> bool:
    """Running inside a Jupyter kernel, tested as tqdm.autonotebook does (IPython's shell configured by an
    IPKernelApp): ``ipykernel`` merely imported, as nbclient does in the test process, is not a notebook."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class LineProgress(std_tqdm):
    """A tqdm bar that prints a whole line each time it passes another ``every`` percent of its total, and
    a last line when it closes (a bar without a total prints at most one line a minute). tqdm's own
    redraws and clearing go to a discarded buffer; the lines go to ``file`` (default stderr)."""

    def __init__(self, *args, every: int = EVERY, file=None, **kwargs):
        self._out = sys.stderr if file is None else file
        self._every, self._shown, self._last_line = max(1, int(every)), -1, ""
        kwargs.setdefault("mininterval", 0.5)
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("bar_format", "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                        "{rate_fmt}{postfix}]" if _total(args, kwargs) else
                                        "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]")
        super().__init__(*args, file=io.StringIO(), **kwargs)

    def _mark(self) -> int:
        if self.total:
            return int(100 * self.n / self.total) // self._every
        return int(self.format_dict["elapsed"] // 60)

    def display(self, msg=None, pos=None):
        if msg is not None:  # tqdm clearing or overwriting its line: nothing to clear in a log
            return True
        closing = self.disable  # close() sets disable before its last display
        mark = self._mark()
        line = self.__str__()
        if (mark > self._shown or closing) and line != self._last_line:
            self._shown, self._last_line = mark, line
            self._out.write(line.rstrip() + "\n")
            self._out.flush()
        return True

    def close(self):
        if not self.disable and self.leave is False:
            self.leave = True  # a log keeps the last line of every bar: there is nothing to clear
        super().close()


def _total(args: tuple, kwargs: dict):
    if kwargs.get("total") is not None:
        return kwargs["total"]
    try:
        return len(args[0]) if args else None
    except TypeError:
        return None


def progress_bar(*args, **kwargs):
    """``tqdm(*args, **kwargs)`` on a terminal or in a notebook, :class:`LineProgress` otherwise."""
    if kwargs.get("disable") or wants_bar(kwargs.get("file")):
        return tqdm(*args, **kwargs)
    return LineProgress(*args, **kwargs)
