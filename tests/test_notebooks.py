"""Every notebook in notebooks/ runs top to bottom at its tiny scale (``MEDFM_NOTEBOOK_TINY=1``) and is stored
without outputs.

The notebooks' cells run in an IPython shell inside the test process (a fresh shell per notebook, in the
notebook's folder), so the ~10 s of importing torch, MONAI and medfm is paid once per test worker rather than
once per notebook in a new kernel; one notebook also runs through a real Jupyter kernel (nbclient), as a user
runs it."""

from __future__ import annotations

import pytest

from .conftest import REPO, SHARED

pytestmark = pytest.mark.slow  # every notebook executed: `make test` runs it, `make test-fast` leaves it out

nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency (pip install -e '.[dev]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency (pip install -e '.[dev]')")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NEEDS_SHARED = {"05_segmentation.ipynb", "08_vqa.ipynb", "11_mllm.ipynb", "12_promptable.ipynb"}  # a user's run downloads its sets; here the team's copies stand in


def test_the_notebooks_are_there_and_stored_without_outputs():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 14)]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name


@pytest.fixture
def tiny_notebook_env(tmp_path, monkeypatch):
    """What a notebook reads at test time: its tiny scale, a scratch output folder, the prepared data copies."""
    monkeypatch.setenv("MEDFM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MEDFM_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MEDFM_NOTEBOOK_DATA", str(SHARED))  # prepared copies, so no test downloads
    monkeypatch.setenv("MPLBACKEND", "agg")


def run_in_shell(path, monkeypatch) -> int:
    """Run the code cells of ``path`` in order in a fresh IPython shell in the notebook's folder; fail on the
    first cell that raises (its traceback in the message). Returns how many outputs the cells displayed."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from traitlets.config import Config

    monkeypatch.chdir(path.parent)
    config = Config()
    config.HistoryManager.enabled = False  # no history database in the user's ~/.ipython
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance(config=config)
    shown = 0
    try:
        for i, cell in enumerate(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"):
            with capture_output() as cap:
                result = shell.run_cell(cell.source, store_history=False)
            shown += len(cap.outputs)
            if not result.success:
                pytest.fail(f"{path.name}, code cell {i + 1}: {result.error_in_exec or result.error_before_exec!r}"
                            f"\n{cap.stdout[-3000:]}", pytrace=False)
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
        InteractiveShell.clear_instance()
    return shown


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_tiny_scale(path, tiny_notebook_env, monkeypatch):
    if path.name in NEEDS_SHARED and not SHARED.exists():
        pytest.skip(f"{path.name} downloads its data sets (`medfm data prepare`); the tests give it the prepared "
                    f"copies in {SHARED}, which is only beside the repository on the team's machines and in CI")
    assert run_in_shell(path, monkeypatch) > 0, "the notebook shows nothing"


def test_a_notebook_runs_in_a_jupyter_kernel(tiny_notebook_env):
    """The path a user takes: a kernel started by Jupyter's client, outputs stored in the notebook."""
    path = REPO / "notebooks" / "06_report_generation.ipynb"
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type in ("display_data", "execute_result") for o in outputs), "the notebook shows nothing"
