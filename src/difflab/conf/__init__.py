"""difflab's Hydra configs, shipped in the package: ``pkg://difflab.conf`` (``CONFIG_DIR`` is its folder).

Add your own config folders beside them with ``hydra.searchpath=[file://DIR]``: a ``DIR/network/mine.yaml`` is then
selectable as ``network=mine`` (Hydra searches the shipped configs first: give your files new names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab.errors import UsageError

CONFIG_DIR = str(Path(__file__).resolve().parent)
CONFIG_PACKAGE = "pkg://difflab.conf"


def options(group: str) -> list[str]:
    """The option names of a config group (its yaml files)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def build(group: str, name: str, **overrides: Any) -> Any:
    """What ``group=name`` builds (``conf/<group>/<name>.yaml`` with ``overrides``): the one source of truth behind
    the Python helpers (``get_sampler``, ``NoiseSchedule.from_name``, ``get_prediction``). For flat groups (no
    defaults list or interpolations)."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    path = Path(CONFIG_DIR) / group / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"unknown {group} {name!r}; valid: {', '.join(options(group))}")
    kwargs = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), overrides), resolve=True)
    # called directly rather than through hydra's instantiate, so a bad value raises its own one-line error
    return get_object(kwargs.pop("_target_"))(**kwargs)
