"""Optional dependencies (pyproject's extras): imported where they are used, never at package import, and a
missing one fails with the pip command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from difflab.errors import MissingExtraError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` and return it; if it is not installed, raise a one-line ``MissingExtraError`` (an
    ``ImportError``) naming the option that needs it and the extra to install, e.g.
    ``conditioning=text needs transformers: pip install "difflab[text]"``.

    An ``ImportError`` raised for another module (a broken dependency of an installed package) goes through
    unchanged: installing the extra would not fix it.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise
    package = module.partition(".")[0].replace("_", "-")
    raise MissingExtraError(f'{what} needs {package}: pip install "difflab[{extra}]"', name=module) from None
