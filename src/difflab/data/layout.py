"""What an image folder says about itself: its files with their labels (class subfolders) or captions
(``metadata.jsonl``), and whether its images are grayscale or colour. ``data.num_classes``, ``data.channels`` and
``data.class_names`` left at ``auto`` / null are read from it, as torchvision's ImageFolder users expect."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difflab.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
NO_LABEL = -1
AUTO = "auto"
# PIL modes with one value per pixel; "P" (palette) images are grey when every palette entry is
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


@dataclass(frozen=True)
class FolderLayout:
    """The images of ``root``: (path, label or NO_LABEL, class name or caption) for each, and the class names
    (empty for a captioned folder)."""

    root: Path
    items: list[tuple[Path, int, str]]
    class_names: list[str]

    @classmethod
    def read(cls, root: str | Path, class_names: Sequence[str] | None = None) -> FolderLayout:
        """Class subfolders (sorted by name, or in the order of ``class_names``), or a ``metadata.jsonl`` of
        {"file_name", "text"} records (the Hugging Face imagefolder convention)."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root} (set data.root=DIR)")
        metadata = root / "metadata.jsonl"
        if metadata.exists():
            items = []
            for n, line in enumerate(metadata.read_text().splitlines(), 1):
                if line.strip():
                    items.append(_metadata_record(metadata, n, line))
            names: list[str] = []
        else:
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            names = list(class_names) if class_names else found
            missing = [name for name in names if not (root / name).is_dir()]
            if missing:
                raise UsageError(f"class folder(s) {missing} not in {root} (its class folders: {', '.join(found)})")
            items = [(path, label, name) for label, name in enumerate(names)
                     for path in sorted((root / name).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        if not items:
            raise UsageError(f"no images found in {root}: expected class subfolders or a metadata.jsonl")
        return cls(root, items, names)

    def channels(self, skip_unreadable: bool = False) -> int:
        """1 if every image is grayscale, 3 if every one is colour (read from the files' headers); a folder that
        mixes them is refused, naming an example of each. ``skip_unreadable`` (``data.on_error=skip``): a file whose
        header cannot be read does not vote (training skips and counts it); otherwise it is refused, named."""
        gray, colour, unreadable = [], [], []
        for path, _, _ in self.items:
            try:
                (gray if is_grayscale_file(path) else colour).append(path)
            except OSError:
                if not skip_unreadable:
                    raise
                unreadable.append(path)
        if not gray and not colour:
            raise UsageError(f"none of the {len(unreadable)} images in {self.root} can be read (e.g. {unreadable[0]})")
        if gray and colour:
            raise UsageError(f"{self.root} mixes grayscale ({len(gray)}, e.g. {gray[0]}) and colour ({len(colour)}, "
                             f"e.g. {colour[0]}) images: set data.channels=1 or data.channels=3 to convert them all")
        return 1 if gray else 3


def _metadata_record(metadata: Path, n: int, line: str) -> tuple[Path, int, str]:
    """Line ``n`` of a metadata.jsonl as (path, NO_LABEL, caption): a JSON object whose ``file_name`` is a relative
    path inside the folder (an absolute path or ``..`` would read any file of the machine as a training image)."""
    where = f"{metadata}:{n}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: not JSON ({err}); expected {{\"file_name\": ..., \"text\": ...}}") from err
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str):
        raise UsageError(f"{where}: expected an object with a \"file_name\" string, got {line.strip()[:80]}")
    # lexically, not resolved: a symlink inside the folder to a shared store is the user's own choice
    name = os.path.normpath(record["file_name"])
    if os.path.isabs(name) or name == ".." or name.startswith(".." + os.sep):
        raise UsageError(f"{where}: file_name {record['file_name']!r} is outside {metadata.parent}; metadata.jsonl "
                         "names files inside its own folder")
    return metadata.parent / record["file_name"], NO_LABEL, str(record.get("text", ""))


def is_grayscale_file(path: Path) -> bool:
    """Whether an image file holds one value per pixel (its mode, or a palette of greys). Only the header is read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode in ("P", "PA"):
                palette = image.getpalette() or []
                return all(palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3))
            return image.mode in GRAY_MODES
    except (OSError, UnidentifiedImageError) as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def resolve_folder_config(data) -> None:
    """Fill an image-folder data config in place: ``channels: auto`` from the images, ``num_classes: auto`` from the
    class subfolders (null for a captioned folder), ``class_names: null`` with their names. Explicit values win;
    configs without a ``root`` (the embedded datasets, shards) are left as they are; a Hugging Face dataset's
    (``path``) from its label column."""
    if "path" in data and "dataset" in data:
        from difflab.data.hub import resolve_hub_config

        return resolve_hub_config(data)
    if "root" not in data:
        return
    if AUTO not in (data.get("channels"), data.get("num_classes")) and data.get("class_names", ()) is not None:
        return
    layout = FolderLayout.read(data.root, data.get("class_names"))
    names = layout.class_names
    if data.get("channels") == AUTO:
        data.channels = layout.channels(skip_unreadable=data.get("on_error") == "skip")
    if data.get("num_classes") == AUTO:
        data.num_classes = len(names) or None
    elif data.get("num_classes") is not None and names and data.num_classes < len(names):
        raise UsageError(f"data.num_classes={data.num_classes} but {layout.root} has {len(names)} class folders "
                         f"({', '.join(names)}): drop data.num_classes (auto) or raise it")
    if "class_names" in data and data.class_names is None and names:
        data.class_names = names
