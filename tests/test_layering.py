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
