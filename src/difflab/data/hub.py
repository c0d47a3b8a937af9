"""Hugging Face datasets as image-caption data (``data=huggingface``): a Hub id, a local dataset folder (Hub layout
or ``save_to_disk``) or parquet / arrow files, with the image, label and caption columns named in the config.

Loaded with ``datasets`` (whose loaders since 4.0 run no code from a repository); images are taken as their stored
bytes and decoded by difflab's bounded decoder, so a bad or oversized one is an ``UnreadableImageError`` naming its
row, which ``data.on_error`` handles as it does for folders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from difflab.data.datamodule import ImageCaptionDataModule
from difflab.data.fingerprint import data_fingerprint
from difflab.data.images import MAX_ASPECT_RATIO, MAX_PIXELS, UnreadableImageError, decode_image, fit_transform
from difflab.data.layout import AUTO, NO_LABEL
from difflab.errors import MissingExtraError, UsageError


def load(path: str, name: str | None = None, split: str = "train", revision: str | None = None,
         data_files: str | Sequence[str] | None = None):
    """The ``datasets.Dataset`` of one split: a ``save_to_disk`` folder, else ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError as err:
        raise MissingExtraError("data=huggingface needs datasets: pip install \"difflab[hub-data]\"") from err
    folder = Path(str(path)).expanduser()
    if folder.is_dir() and ((folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UsageError(f"data.path={path} has the splits {list(loaded)}, not data.dataset.split={split}")
            return loaded[split]
        return loaded
    files = list(data_files) if data_files is not None and not isinstance(data_files, str) else data_files
    try:
        return datasets.load_dataset(str(path), name, split=split, revision=revision, data_files=files)
    except (FileNotFoundError, ValueError) as err:  # no such dataset / split / files
        raise UsageError(f"data.path={path}: {str(err).splitlines()[0]}") from err


class HubImages(Dataset):
    """One split of a Hugging Face dataset as {image, label, caption, index} items: images (shorter side resized,
    center-cropped to ``image_size``, in [-1, 1]) from ``image_column``; labels from ``label_column`` (a ClassLabel
    gives the class names) or none; captions from ``caption_column``, else "a photo of a <class>" for labelled rows."""

    def __init__(self, path: str, image_column: str = "image", label_column: str | None = None,
                 caption_column: str | None = None, name: str | None = None, split: str = "train",
                 revision: str | None = None, data_files=None, image_size: int = 32, channels: int = 3,
                 random_flip: bool = False, class_names: Sequence[str] | None = None,
                 max_pixels: int | None = MAX_PIXELS, max_aspect_ratio: float | None = MAX_ASPECT_RATIO):
        import datasets

        data = load(path, name, split, revision, data_files)
        for role, column in (("image", image_column), ("label", label_column), ("caption", caption_column)):
            if column is not None and column not in data.column_names:
                raise UsageError(f"data.{role}_column={column}: {path} has the columns {data.column_names}")
        if not isinstance(data.features[image_column], datasets.Image):
            raise UsageError(f"data.image_column={image_column} of {path} holds {data.features[image_column]}, "
                             "not images")
        self.data = data.cast_column(image_column, datasets.Image(decode=False))  # bytes: decoded by difflab
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column
        self.class_names = list(class_names) if class_names else label_names(data, label_column)
        self.root = str(path)  # where skip messages say the data is
        self.name = f"hf_{str(path).strip('/').replace('/', '_')}_{split}"  # names cached statistics (FID)
        self.fingerprint = data_fingerprint({"path": str(path), "name": name, "split": split, "revision": revision,
                                             "rows": len(data), "hash": getattr(data, "_fingerprint", "")})
        self.channels, self.random_flip = channels, random_flip
        self.max_pixels, self.max_aspect_ratio = max_pixels, max_aspect_ratio
        self.transform = fit_transform(image_size, channels, random_flip)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        row = self.data[int(index)]
        where = f"{self.root}[{index}]"
        stored = row[self.image_column] or {}
        if not stored.get("bytes"):  # a row that only names a file elsewhere: not read (paths are not followed)
            raise UnreadableImageError(f"cannot read image {where}: no image bytes in the row", path=where)
        image = self.transform(decode_image(stored["bytes"], self.channels, where, self.max_pixels,
                                            self.max_aspect_ratio))
        label = NO_LABEL if self.label_column is None else int(row[self.label_column])
        if self.caption_column is not None:
            caption = str(row[self.caption_column] or "")
        elif label != NO_LABEL and self.class_names:
            caption = f"a photo of a {self.class_names[label]}"
        else:
            caption = ""
        return {"image": image, "label": label, "caption": caption, "index": index}


class HubDataModule(ImageCaptionDataModule):
    """``data=huggingface``: the image-caption DataModule over ``HubImages``, with the dataset's id or folder and its
    columns named at the top of the data config (``data.path=``, ``data.label_column=``, ...)."""

    def __init__(self, dataset: HubImages, path: str, image_column: str = "image", label_column: str | None = None,
                 caption_column: str | None = None, **kwargs):
        self.path = path  # the columns are the dataset's (given to it by the config); named here for the config
        super().__init__(dataset, root=str(path), **kwargs)


def label_names(data, label_column: str | None) -> list[str] | None:
    """The class names of a ClassLabel column; None for an integer column (or no labels)."""
    import datasets

    if label_column is None:
        return None
    feature = data.features[label_column]
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def resolve_hub_config(data) -> None:
    """``num_classes: auto`` (and ``class_names: null``) of a data=huggingface config from its label column: the
    ClassLabel's classes, else the largest label + 1; no label column: null."""
    if data.get("num_classes") != AUTO and data.get("class_names", ()) is not None:
        return
    dataset = data.dataset
    column = dataset.get("label_column")
    names, count = None, None
    if column is not None:
        loaded = load(dataset.path, dataset.get("name"), dataset.get("split", "train"), dataset.get("revision"),
                      dataset.get("data_files"))
        if column not in loaded.column_names:
            raise UsageError(f"data.label_column={column}: {dataset.path} has the columns {loaded.column_names}")
        names = label_names(loaded, column)
        count = len(names) if names else int(max(loaded[column])) + 1
    if data.get("num_classes") == AUTO:
        data.num_classes = count
    if "class_names" in data and data.class_names is None and names:
        data.class_names = names
