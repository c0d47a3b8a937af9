"""Run the notebooks top to bottom in a fresh kernel and save them with their outputs, in place, so that a reader
on the web or in an editor sees the figures and numbers of their last run:

    python notebooks/execute.py                               every notebooks/*.ipynb
    python notebooks/execute.py notebooks/04_sampling.ipynb   one of them

Each runs with a temporary folder as its working directory (what it writes is not kept) in a kernel of this Python.
A failing notebook is left as it was and the failing cell's traceback is printed. Needs the dev extra:
``pip install -e ".[dev]"``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def python_kernel(folder: Path):
    """A KernelManager for a kernel run by this interpreter (``sys.executable``): a python3 kernelspec of the user's
    or the system's could point at another Python, without difflab."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = folder / "python3"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder)]))


def execute(path: Path, workdir: Path, destination: Path | None = None) -> str | None:
    """Run ``path`` with ``workdir`` as its working directory and write it, outputs included, to ``destination``
    (default: ``path`` itself, only if every cell ran). Returns the failing cell's traceback, or None."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        kernel = python_kernel(Path(kernels))
        # record_timing=False: no per-cell timestamps, so that a re-run changes only what its outputs change
        client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3", record_timing=False,
                                         km=kernel, resources={"metadata": {"path": str(workdir)}})
        error = None
        try:
            client.execute()
        except nbclient.exceptions.CellExecutionError as err:  # its message holds the cell and its traceback
            error = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # without IPython's colours
        finally:  # given a km, nbclient does not own the kernel and leaves it running, with its trained models
            if kernel.has_kernel:
                kernel.shutdown_kernel(now=True)
    if destination is not None or error is None:
        notebook.metadata.pop("widgets", None)
        shrink_figures(notebook)
        nbformat.write(notebook, destination or path)
    return error


def shrink_figures(notebook) -> None:
    """Re-encode each PNG output with a 256-colour palette where that is smaller: matplotlib's figures and sample
    grids use few colours, and the committed notebooks stay light (a grid of panels is ~1 MB as saved)."""
    from PIL import Image

    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" not in data:
                continue
            original = base64.b64decode(data["image/png"])
            image = Image.open(io.BytesIO(original))
            palette = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            buffer = io.BytesIO()
            palette.save(buffer, format="PNG", optimize=True)
            if buffer.tell() < len(original):
                data["image/png"] = base64.b64encode(buffer.getvalue()).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    paths = parser.parse_args(argv).notebooks or sorted(HERE.glob("*.ipynb"))
    failed = []
    for path in paths:
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as workdir:
            error = execute(path, Path(workdir))
        if error is None:
            print(f"{path}: ran in {time.monotonic() - start:.0f} s, saved with its outputs", flush=True)
        else:
            failed.append(path)
            print(f"{path}: failed, left unchanged\n{error}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
