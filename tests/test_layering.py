"""The dependency direction of the package: the math, networks and data never import the command-line layer,
and the diffusion math never imports Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package,forbidden", [("data", "difflab.cli"), ("nn", "difflab.cli"),
                                               ("diffusion", "difflab.cli"), ("diffusion", "lightning"),
                                               ("nn", "lightning"), ("diffusion", "difflab.lightning")])
def test_layer_does_not_import(package, forbidden):
    offenders = [f"{path.relative_to(SRC)} imports {name}" for path in sorted((SRC / package).rglob("*.py"))
                 for name in imported_modules(path) if name == forbidden or name.startswith(forbidden + ".")]
    assert not offenders, offenders


# everything below the Lightning glue and the command line: the library's model, reading, sampling and scoring
BELOW_LIGHTNING = ("data", "nn", "diffusion", "metrics", "conditioning", "latent", "probe", "export", "model.py",
                   "pipeline.py", "loading.py", "registry.py", "evaluation.py", "errors.py", "files.py", "extras.py")


def sources(*parts: str) -> list[Path]:
    """The .py files of these packages and modules, without the ``python -m`` shims (``__main__.py``)."""
    files = []
    for part in parts:
        path = SRC / part
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [path for path in files if path.name != "__main__.py"]


@pytest.mark.parametrize("forbidden", ["difflab.lightning", "difflab.cli"])
def test_nothing_below_lightning_imports_it_or_the_command_line(forbidden):
    offenders = [f"{path.relative_to(SRC)} imports {name}" for path in sources(*BELOW_LIGHTNING)
                 for name in imported_modules(path) if name == forbidden or name.startswith(forbidden + ".")]
    assert not offenders, offenders


def test_only_the_command_line_imports_the_command_line():
    library = [p for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts and p.name != "__main__.py"]
    bench = sorted((SRC.parents[1] / "bench").glob("*.py"))
    offenders = [f"{path} imports {name}" for path in library + bench for name in imported_modules(path)
                 if name == "difflab.cli" or name.startswith("difflab.cli.")]
    assert not offenders, offenders


def string_literals(path: Path) -> list[str]:
    """The string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_the_checkpoint_layout_is_known_in_one_module():
    """Only loading.py names the checkpoint's keys and its weights' prefixes; only it and registry.py (and the
    shipped options' own builder, conf/__init__.py) spell ``_target_``."""
    layout = ("difflab_config", "difflab_network", "difflab_first_stage", "difflab_layout", "ema.", "model.network.",
              "autoencoder.")
    offenders = []
    for path in SRC.rglob("*.py"):
        name = str(path.relative_to(SRC))
        for text in string_literals(path):
            if name != "loading.py" and text in layout:
                offenders.append(f"{name}: {text!r}")
            if name not in ("loading.py", "registry.py", "conf/__init__.py") and "_target_" in text:
                offenders.append(f"{name}: {text!r}")
    assert not offenders, offenders
