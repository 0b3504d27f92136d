"""Every notebook in notebooks/ runs top to bottom (nbclient, the venv's python3 kernel, a time limit).

Notebooks are committed without outputs; here they execute in a fresh temporary folder
(FVL_NOTEBOOK_DIR), so nothing is written into the repository."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # one cell; the whole notebook is meant to take < 60 s on 2 cores


def test_the_five_notebooks_exist_without_outputs():
    import nbformat

    names = [p.stem for p in NOTEBOOKS]
    assert names == ["01_quickstart", "02_depth_breadth", "03_alignment", "04_attribution", "05_compare_encoders"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("FVL_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend (Agg-based) shows figures
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
             if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
    assert shown, f"{path.name} drew no figure"
    print(f"{path.stem}: {seconds:.1f} s")
