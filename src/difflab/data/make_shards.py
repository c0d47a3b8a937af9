"""``python -m difflab.data.make_shards SRC DST [--shard-size 1000]``: an image folder to webdataset tar shards."""

from __future__ import annotations

import argparse

from difflab.data.shards import write_shards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="an image folder: class subfolders, or images with a metadata.jsonl")
    parser.add_argument("dst", help="the folder the shard-XXXXXX.tar files go to")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = parser.parse_args(argv)
    shards = write_shards(args.src, args.dst, args.shard_size)
    print(f"wrote {len(shards)} shards to {args.dst}")


if __name__ == "__main__":
    main()
