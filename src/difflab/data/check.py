"""``python -m difflab.data.check SOURCE``: decode every image training would read and list the unreadable ones,
before a run meets them hours in. SOURCE: an image folder (class subfolders, a metadata.jsonl, or images directly
in it), or webdataset .tar shards (a folder of them, a glob or a brace pattern). Exit code 0: every image is
readable; 1: some are not (each printed with its reason); 2: a bad argument."""

from __future__ import annotations

import argparse
import glob
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from difflab.data.images import UnreadableImageError, decode_image, image_files, read_image
from difflab.data.layout import IMAGE_SUFFIXES, FolderLayout


class BadSource(ValueError):
    """The argument names nothing to check."""


def shard_files(source: str) -> list[Path] | None:
    """The .tar shards SOURCE names (a folder of them, a glob, a brace pattern), or None if it names an image
    folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        return shards or None
    if path.suffix == ".tar" and path.is_file():
        return [path]
    patterns = [source]
    if "{" in source:
        try:
            import braceexpand
        except ImportError as err:
            raise BadSource(f"a brace pattern needs braceexpand: pip install 'difflab[webdataset]' ({source})") from err
        patterns = list(braceexpand.braceexpand(source))
    found = sorted({Path(p) for pattern in patterns for p in glob.glob(str(Path(pattern).expanduser()))})
    if not found:
        raise BadSource(f"no such folder or shards: {source}")
    return found


def folder_images(folder: Path) -> list[Path]:
    """The files ``data=imagefolder`` would read (class subfolders or metadata.jsonl), else the images in it."""
    try:
        return [path for path, _, _ in FolderLayout.read(folder).items]
    except ValueError:
        try:
            return image_files(folder)
        except ValueError as err:
            raise BadSource(f"no images in {folder}: expected class subfolders, a metadata.jsonl or image files") \
                from err


def reason(err: UnreadableImageError) -> str:
    """PIL's words for why (the path is printed beside them)."""
    return str(err.__cause__ or err) or type(err.__cause__).__name__


def check_files(files: list[Path]) -> Iterator[tuple[str, str | None]]:
    """(path, None if readable else why not) for each file, every pixel decoded."""
    for path in files:
        try:
            read_image(path, 3)
            yield str(path), None
        except FileNotFoundError:
            yield str(path), "no such file"
        except UnreadableImageError as err:
            yield str(path), reason(err)


def check_shards(shards: list[Path]) -> Iterator[tuple[str, str | None]]:
    """(shard:member, None if readable else why not) for each image member of the shards; a shard that is not a
    readable tar file is reported as a whole."""
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                        continue
                    name = f"{shard}:{member.name}"
                    try:
                        decode_image(tar.extractfile(member).read(), 3, name)
                        yield name, None
                    except UnreadableImageError as err:
                        yield name, reason(err)
        except (tarfile.TarError, OSError, EOFError) as err:
            yield str(shard), f"not a readable tar file: {err}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m difflab.data.check", description=__doc__)
    parser.add_argument("source", help="an image folder, or .tar shards (a folder of them, a glob or a brace pattern)")
    args = parser.parse_args(argv)
    try:
        shards = shard_files(args.source)
        if shards is None:
            files = folder_images(Path(args.source).expanduser())
            results, total, unit = check_files(files), len(files), "file"
        else:
            results, total, unit = check_shards(shards), None, "image"
    except (BadSource, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = bad = 0
    with tqdm(results, total=total, unit=unit, desc="decoding", file=sys.stderr, dynamic_ncols=True) as bar:
        for name, reason in bar:
            n += 1
            if reason is not None:
                bad += 1
                tqdm.write(f"unreadable: {name}: {reason}", file=sys.stdout)
    what = f"{len(shards)} shards" if shards is not None else args.source
    print(f"{n} files, {bad} unreadable ({what})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
