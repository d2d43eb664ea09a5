"""Every notebook in notebooks/ runs top to bottom at its tiny scale (``MEDFM_NOTEBOOK_TINY=1``) and is stored
without outputs."""

from __future__ import annotations

import pytest

from .conftest import REPO, SHARED

pytestmark = pytest.mark.slow  # every notebook executed: `make test` runs it, `make test-fast` leaves it out

nbformat = pytest.importorskip("nbformat", reason="nbformat is a dev dependency (pip install -e '.[dev]')")
nbclient = pytest.importorskip("nbclient", reason="nbclient is a dev dependency (pip install -e '.[dev]')")

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NEEDS_SHARED = {"05_segmentation.ipynb", "08_vqa.ipynb", "11_mllm.ipynb"}  # a user's run downloads its sets; here the team's copies stand in


def test_the_notebooks_are_there_and_stored_without_outputs():
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, 12)]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_tiny_scale(path, tmp_path, monkeypatch):
    if path.name in NEEDS_SHARED and not SHARED.exists():
        pytest.skip(f"{path.name} downloads its data sets (`medfm data prepare`); the tests give it the prepared "
                    f"copies in {SHARED}, which is only beside the repository on the team's machines and in CI")
    monkeypatch.setenv("MEDFM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MEDFM_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("MEDFM_NOTEBOOK_DATA", str(SHARED))  # prepared copies, so no test downloads
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type in ("display_data", "execute_result") for o in outputs), "the notebook shows nothing"
