"""difflab's Hydra configs, shipped in the package: ``pkg://difflab.conf`` (``CONFIG_DIR`` is its folder).

Add your own config folders in front of them with ``hydra.searchpath=[file://DIR]``: a ``DIR/network/mine.yaml``
is then selectable as ``network=mine``.
"""

from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parent)
CONFIG_PACKAGE = "pkg://difflab.conf"
