"""The notebooks in notebooks/: committed without outputs, and each one runs top to bottom in a fresh kernel.

Every ``notebooks/*.ipynb`` is picked up: a new notebook needs no change here. The slow test runs a copy of each in
a kernel of this Python (the one running pytest, whatever kernelspecs the machine has), with a temporary folder as
its working directory, and fails with the failing cell's traceback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
by_notebook = pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])


@by_notebook
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    dirty = [i for i, cell in enumerate(notebook["cells"])
             if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.relative_to(REPO)}: code cells {dirty} hold outputs or execution counts; clear them "
                       f"before committing: `nbstripout {path.relative_to(REPO)}` (pip install nbstripout) or, in "
                       "Jupyter, Edit > Clear Outputs of All Cells, then save")


def python_kernel(folder: Path):
    """A KernelManager for the kernel ``python3`` run by this interpreter (``sys.executable``): a python3 kernelspec
    of the user's or the system's could point at another Python without difflab."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = folder / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python 3 ({sys.executable})", "language": "python"}))
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


@pytest.mark.slow
@by_notebook
def test_notebook_runs(path, tmp_path, tmp_path_factory):
    why = 'the notebook tests need the dev extra: pip install -e ".[dev]"'
    nbformat = pytest.importorskip("nbformat", reason=why)
    nbclient = pytest.importorskip("nbclient", reason=why)
    pytest.importorskip("ipykernel", reason=why)
    notebook = nbformat.read(path, as_version=4)
    workdir = tmp_path / "cwd"  # the notebook's working directory: whatever it writes lands here
    workdir.mkdir()
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     km=python_kernel(tmp_path_factory.mktemp("kernelspec")),
                                     resources={"metadata": {"path": str(workdir)}})
    executed = tmp_path / path.name
    error = None
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:  # its message holds the cell and its traceback
        error = err
    finally:
        nbformat.write(notebook, executed)  # with the outputs so far, to look at
    if error is not None:
        traceback = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # without IPython's colours
        pytest.fail(f"{path.relative_to(REPO)} failed (executed copy: {executed}):\n{traceback}", pytrace=False)
