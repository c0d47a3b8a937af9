"""The notebooks in notebooks/: committed with the outputs of their last run (at least one figure each, no error),
and each one still runs top to bottom in a fresh kernel.

Every ``notebooks/*.ipynb`` is picked up: a new notebook needs no change here. ``python notebooks/execute.py``
re-runs them in place; the slow test runs a copy of each the same way, with a temporary folder as its working
directory, and fails with the failing cell's traceback.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
by_notebook = pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
MAX_BYTES = 1_500_000  # outputs are figures and short text: the repository stays light
RERUN = "re-run it with: python notebooks/execute.py"


def executor():
    spec = importlib.util.spec_from_file_location("execute_notebooks", REPO / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@by_notebook
def test_notebook_is_committed_with_the_outputs_of_its_last_run(path):
    name = path.relative_to(REPO)
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes: smaller figures, shorter output"
    code = [cell for cell in json.loads(path.read_text(encoding="utf-8"))["cells"] if cell["cell_type"] == "code"]
    counts = [cell.get("execution_count") for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{name} was not run top to bottom in one kernel: {RERUN}"
    outputs = [output for cell in code for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{name} holds an error: {RERUN}"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} shows no figure"


@pytest.mark.slow
@by_notebook
def test_notebook_runs(path, tmp_path):
    why = 'the notebook tests need the dev extra: pip install -e ".[dev]"'
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason=why)
    workdir = tmp_path / "cwd"  # the notebook's working directory: whatever it writes lands here
    workdir.mkdir()
    executed = tmp_path / path.name
    error = executor().execute(path, workdir, destination=executed)
    if error is not None:
        pytest.fail(f"{path.relative_to(REPO)} failed (executed copy: {executed}):\n{error}", pytrace=False)


@pytest.mark.slow
def test_the_kernel_is_shut_down_after_its_notebook(tmp_path):
    """Each notebook's kernel holds the models it trained: it must not outlive its notebook."""
    for module in ("nbformat", "nbclient", "ipykernel"):
        pytest.importorskip(module, reason='the notebook tests need the dev extra: pip install -e ".[dev]"')
    import os

    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os; print(os.getpid())")])
    path, executed = tmp_path / "pid.ipynb", tmp_path / "executed.ipynb"
    nbformat.write(notebook, path)
    assert executor().execute(path, tmp_path, destination=executed) is None
    pid = int(nbformat.read(executed, as_version=4).cells[0].outputs[0]["text"])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
