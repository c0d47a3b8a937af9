"""Image-caption data as webdataset tar shards: writing them from a folder, reading them per rank.

    python -m difflab.data.make_shards SRC DST [--shard-size 1000]     # SRC: an image folder (see ImageFolder)
    python train.py data=webdataset data.train_urls=DST data.num_classes=10

Each sample is ``<key>.png`` (the image; ``.jpg`` / ``.jpeg`` / ``.webp`` as img2dataset writes are read too),
``<key>.txt`` (its caption; absent: "") and ``<key>.cls`` (its label; absent or -1: none);
with ``--text-encoder NAME`` (a conf/text_encoder option) also the caption's encoding, computed once when the
shards are written instead of at every step: ``<key>.text.npy`` (its tokens' hidden states, float16, (L, D)) and
``<key>.pooled.npy`` (D,). Batches then carry ``context`` / ``context_mask`` / ``cond``, which the text
conditioner uses as they are (``conditioning=text``; the run's text encoder must be the one that wrote them).
Training reads shards resampled with replacement, independently per rank and worker, with a fixed number of
samples per epoch (webdataset's recommended multi-node setup: no rank waits for another's shorter epoch);
evaluation reads every sample exactly once, shards split across ranks and then workers.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from torchvision.transforms import v2

from difflab.data.fingerprint import data_fingerprint
from difflab.data.images import MAX_ASPECT_RATIO, MAX_PIXELS, UnreadableImageError, decode_image
from difflab.data.layout import NO_LABEL
from difflab.data.unreadable import CountsSkippedFiles, SkippedFiles, check_on_error, collate_skipped
from difflab.errors import UsageError
from difflab.extras import require


def write_shards(source: str | Path, destination: str | Path, shard_size: int = 1000, text_encoder=None,
                 encode_batch: int = 256) -> list[Path]:
    """Write the images of an image folder (class subfolders or metadata.jsonl) to DST/shard-XXXXXX.tar; with
    ``text_encoder`` (a ``difflab.conditioning.TextEncoder``) each caption's encoding too, in batches of
    ``encode_batch`` captions."""
    from PIL import Image

    from difflab.data.datasets import NO_LABEL, ImageFolder

    wds = require("webdataset", "webdataset", "difflab.data.make_shards")

    folder = ImageFolder(source, image_size=8)  # only its file list and captions are used
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    items = [(path, label, text if label == NO_LABEL else f"a photo of a {text}")
             for path, label, text in folder.items]
    with wds.ShardWriter(str(destination / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for start in range(0, len(items), encode_batch):
            chunk = items[start:start + encode_batch]
            encodings = _encode_captions(text_encoder, [caption for _, _, caption in chunk])
            for offset, (path, label, caption) in enumerate(chunk):
                buffer = io.BytesIO()
                with Image.open(path) as image:
                    image.save(buffer, format="PNG")
                sample = {"__key__": f"{start + offset:09d}", "png": buffer.getvalue(), "txt": caption, "cls": label}
                if encodings is not None:
                    sample["text.npy"], sample["pooled.npy"] = encodings[offset]
                sink.write(sample)
    return sorted(destination.glob("shard-*.tar"))


def _encode_captions(text_encoder, captions: list[str]):
    """[(hidden states (L_i, D) trimmed to the caption's tokens, pooled (D,)), ...] as float16 arrays."""
    if text_encoder is None:
        return None
    hidden, mask, pooled = text_encoder.encode(captions)
    lengths = mask.sum(1).tolist()
    return [(hidden[i, :n].half().cpu().numpy(), pooled[i].half().cpu().numpy()) for i, n in enumerate(lengths)]


def shard_urls(urls: str | list[str]) -> list[str]:
    """A directory (its *.tar files), a brace pattern ("shards/shard-{000000..000009}.tar") or a list."""
    braceexpand = require("braceexpand", "webdataset", "data=webdataset")
    if isinstance(urls, (list, tuple)):
        return [str(u) for u in urls]
    path = Path(urls).expanduser()
    if path.is_dir():
        found = sorted(str(p) for p in path.glob("*.tar"))
        if not found:
            raise UsageError(f"no .tar shards in {path} (write some: python -m difflab.data.make_shards SRC {path})")
        return found
    return list(braceexpand.braceexpand(str(urls)))


IMAGE_MEMBERS = ("png", "jpg", "jpeg", "webp")


def usable_shards(urls: list[str], on_error: str, max_skip_fraction: float) -> list[str]:
    """The shards that can be opened as tar files (local paths; URLs are left to the reader). A missing or
    unopenable shard is refused under ``on_error=raise``; under ``skip`` it is dropped with a warning and counted like
    an unreadable image: more than ``max_skip_fraction`` of the shards, or all of them, stop the run here (a
    resampled stream of none would never yield a sample)."""
    import tarfile
    import warnings

    from difflab.errors import RunStopped

    def opens(url: str) -> bool:
        if "://" in url or url.startswith("pipe:"):
            return True
        try:
            with tarfile.open(url) as tar:
                tar.next()
            return True
        except (OSError, tarfile.TarError, EOFError):
            return False

    bad = [url for url in urls if not opens(url)]
    if not bad:
        return urls
    which = f"{len(bad)} of the {len(urls)} shards are missing or not tar files (e.g. {bad[0]})"
    if len(bad) == len(urls):
        raise UsageError(f"none of the {len(urls)} shards can be read (e.g. {bad[0]}): check data.train_urls / "
                         "data.val_urls (a folder, a brace pattern DIR/shard-{000000..000099}.tar or a list)")
    if on_error != "skip":
        raise UsageError(f"{which}: fix data.train_urls / data.val_urls, or data.on_error=skip to train on the rest")
    if len(bad) / len(urls) > max_skip_fraction:
        raise RunStopped(f"{which}, more than data.max_skip_fraction={max_skip_fraction}: fix the shard list or "
                         "raise data.max_skip_fraction")
    warnings.warn(f"{which}: skipped (data.on_error=skip)", stacklevel=2)
    return [url for url in urls if url not in bad]


def decode_members(sample: dict) -> dict:
    """A sample's members as ``_sample`` reads them: ``.cls`` an integer, ``.txt`` text, ``.npy`` arrays (no pickled
    objects), the image left as bytes; every other member (``.pyd``, ``.pickle``, ``.pth``, ...) is dropped unread.
    Hand-written rather than ``wds.decode()``, whose default handlers unpickle ``.pyd`` / ``.pickle`` members and
    ``torch.load`` ``.pth`` ones: a shard is a stranger's file."""
    import numpy as np

    out = {}
    for key, value in sample.items():
        try:
            if key.startswith("__") or key in IMAGE_MEMBERS:
                out[key] = value
            elif key == "cls":
                out[key] = int(value.decode("ascii").strip())
            elif key == "txt":
                out[key] = value.decode("utf-8")
            elif key.endswith(".npy"):
                out[key] = np.load(io.BytesIO(value), allow_pickle=False)
        except (ValueError, UnicodeDecodeError) as err:  # np.load refuses object arrays with a ValueError
            raise UsageError(f"{sample.get('__url__')}:{sample.get('__key__')}.{key} cannot be read as difflab "
                             f"writes it ({type(err).__name__}: {err})") from err
    return out


def _drop_private_keys(samples):
    """webdataset's map puts ``__key__`` / ``__url__`` back: batches carry only our keys."""
    for sample in samples:
        yield {k: v for k, v in sample.items() if not k.startswith("__")}


class ShardedImages(IterableDataset):
    """Samples {image, label, caption, key} from tar shards; ``resampled``: an endless stream drawn per rank and
    worker (seeded), cut into epochs of ``epoch_length`` samples per process; otherwise each sample once.
    ``on_error="skip"``: a sample whose image cannot be decoded is dropped, and the next one yielded lists it
    (``SHARD:KEY.png``) in ``sample["skipped"]``; a shard missing or not a tar file at the start is dropped and
    counted (``usable_shards``), one that fails while read is listed as the samples are. Images over
    ``max_pixels`` or ``max_aspect_ratio`` are unreadable ones (``difflab.data.images``)."""

    def __init__(self, urls: str | list[str], image_size: int = 32, channels: int = 3, resampled: bool = False,
                 epoch_length: int | None = None, seed: int = 0, shuffle_buffer: int = 1000, text_length: int = 77,
                 on_error: str = "raise", max_skip_fraction: float = 0.01, max_pixels: int | None = MAX_PIXELS,
                 max_aspect_ratio: float | None = MAX_ASPECT_RATIO):
        super().__init__()
        self.on_error = on_error  # raise | skip
        self._pending_skipped: list[str] = []  # dropped samples not yet reported (one list per worker process)
        self.text_length = text_length  # precomputed caption encodings are padded to this many tokens
        self.max_pixels, self.max_aspect_ratio = max_pixels, max_aspect_ratio
        self.urls = usable_shards(shard_urls(urls), on_error, max_skip_fraction)
        self.image_size, self.channels = image_size, channels
        self.resampled, self.epoch_length, self.seed = resampled, epoch_length, seed
        self.shuffle_buffer = shuffle_buffer
        self.transform = v2.Compose([
            v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels),
        ])
        self.name = f"webdataset_{Path(self.urls[0]).parent.name}"
        self.fingerprint = data_fingerprint({"urls": self.urls})  # keys cached statistics: stale when a shard changes

    def _sample(self, sample: dict) -> dict | None:
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        if member is None:
            members = sorted(k for k in sample if not k.startswith("__")) or ["none"]
            raise UsageError(f"{sample.get('__url__')}:{sample.get('__key__')} has no image ({', '.join(members)}; "
                             f"expected one of .{', .'.join(IMAGE_MEMBERS)})")
        name = f"{sample.get('__url__')}:{sample['__key__']}.{member}"
        try:
            pixels = decode_image(sample[member], self.channels, name, self.max_pixels, self.max_aspect_ratio)
        except UnreadableImageError as err:
            if self.on_error == "skip":
                self._pending_skipped.append(name)
                return None  # webdataset's map drops it
            folder = Path(str(sample.get("__url__"))).parent
            raise UnreadableImageError(f"{err} (find every unreadable image: python -m difflab.data.check {folder}; "
                                       f"skip them while training: data.on_error=skip)", path=name) from err
        # class-only and image-only shards: no caption is "", no label is NO_LABEL (as in an image folder)
        out = {"image": self.transform(pixels), "label": int(sample.get("cls", NO_LABEL)),
               "caption": sample.get("txt", ""), "key": sample["__key__"]}
        if "text.npy" in sample:  # the caption's precomputed encoding, padded so that batches stack
            hidden = torch.from_numpy(sample["text.npy"]).float()[: self.text_length]
            out["context"] = hidden.new_zeros(self.text_length, hidden.shape[-1])
            out["context"][: len(hidden)] = hidden
            out["context_mask"] = torch.arange(self.text_length) < len(hidden)
            out["cond"] = torch.from_numpy(sample["pooled.npy"]).float()
        return out

    def _attach_skipped(self, samples):
        """Each sample lists the samples dropped before it; held back by one, so that the last one yielded lists
        those dropped at the stream's end too."""
        held = None
        for sample in samples:
            if held is not None:
                held["skipped"], self._pending_skipped = self._pending_skipped, []
                yield held
            held = sample
        if held is not None:
            held["skipped"], self._pending_skipped = self._pending_skipped, []
            yield held

    def _shard_failed(self, error: Exception) -> bool:
        """webdataset's handler for a shard that fails while read (``on_error=skip``): listed as a skipped file."""
        url = next((a for a in reversed(error.args) if isinstance(a, str) and a.endswith(".tar")), "a shard")
        self._pending_skipped.append(f"{url} ({type(error).__name__})")
        return True

    def head(self, n: int) -> list[dict]:
        """The first ``n`` samples of the shards in order, read here (not split across ranks or workers, not
        resampled): the same on every rank, for FID statistics, evaluation and probes."""
        wds = require("webdataset", "webdataset", "data=webdataset")
        skip = self.on_error == "skip"
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(handler=self._shard_failed if skip else wds.reraise_exception),
            wds.map(decode_members), wds.map(self._sample), _drop_private_keys)
        samples = []
        for sample in pipeline:
            samples.append(sample)
            if len(samples) == n:
                break
        self._pending_skipped = []
        return samples

    def pipeline(self):
        wds = require("webdataset", "webdataset", "data=webdataset")
        skip = self.on_error == "skip"
        to_samples = wds.tarfile_to_samples(handler=self._shard_failed if skip else wds.reraise_exception)
        if self.resampled:
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng = random.Random(f"{self.seed}/{rank}/{worker}")  # a stream per (seed, rank, worker)
            stages = [wds.ResampledShards(self.urls, seed=self.seed, deterministic=True), to_samples,
                      wds.shuffle(self.shuffle_buffer, rng=rng)]
        else:
            stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker, to_samples]
        # decode_members decodes the text, label and .npy members; _sample the image, to name a file it cannot read
        pipeline = wds.DataPipeline(*stages, wds.map(decode_members), wds.map(self._sample), _drop_private_keys,
                                    *([self._attach_skipped] if skip else []))
        if self.resampled and self.epoch_length:
            info = torch.utils.data.get_worker_info()
            workers = info.num_workers if info is not None else 1
            pipeline = pipeline.with_epoch(-(-self.epoch_length // workers))  # per worker
        return pipeline

    def __iter__(self):
        return iter(self.pipeline())


class WebDataModule(CountsSkippedFiles, L.LightningDataModule):
    """Batches of {image, label, caption} from shards (``data=webdataset``): training resampled per rank with
    ``epoch_length`` samples per rank per epoch, validation each sample of ``val_urls`` once across ranks;
    ``on_error="skip"`` drops undecodable images and counts them (``difflab.data.unreadable``)."""

    def __init__(self, train_urls: str | list[str], val_urls: str | list[str] | None = None, image_size: int = 32,
                 channels: int = 3, batch_size: int = 64, epoch_length: int = 10000, seed: int = 0,
                 num_workers: int = 2, num_classes: int | None = None, split_seed: int = 0, text_length: int = 77,
                 on_error: str = "raise", max_skip_fraction: float = 0.01, max_pixels: int | None = MAX_PIXELS,
                 max_aspect_ratio: float | None = MAX_ASPECT_RATIO):
        super().__init__()
        check_on_error(on_error, max_skip_fraction)
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.num_workers, self.num_classes, self.split_seed = num_workers, num_classes, split_seed
        self.on_error = on_error
        reading = {"text_length": text_length, "on_error": on_error, "max_skip_fraction": max_skip_fraction,
                   "max_pixels": max_pixels, "max_aspect_ratio": max_aspect_ratio}
        self.train_set = ShardedImages(train_urls, image_size, channels, resampled=True, epoch_length=epoch_length,
                                       seed=seed, **reading)
        self.val_set = ShardedImages(val_urls or train_urls, image_size, channels, **reading)
        self.dataset = self.train_set
        if on_error == "skip":  # a stream has no file count: the share of failed reads, over at least an epoch's
            source = train_urls if isinstance(train_urls, str) else str(Path(self.train_set.urls[0]).parent)
            self.skipped = SkippedFiles(max_skip_fraction, source, min_reads=epoch_length)

    def _loader(self, dataset: IterableDataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipped if self.on_error == "skip" else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)
