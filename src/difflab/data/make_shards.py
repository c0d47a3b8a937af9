"""``python -m difflab.data.make_shards SRC DST [--shard-size 1000] [--text-encoder minilm]``: an image folder to
webdataset tar shards; with ``--text-encoder`` (an option of conf/text_encoder) the captions' encodings too,
computed once here rather than at every training step."""

from __future__ import annotations

import argparse

from difflab.data.shards import write_shards


def text_encoder_from_config(name: str):
    """The text encoder of ``conf/text_encoder/<name>.yaml``, built as ``train.py text_encoder=<name>`` builds it
    (an unknown name fails with Hydra's list of the available ones)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from difflab.conf import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return instantiate(compose("train", overrides=[f"text_encoder={name}"]).text_encoder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="an image folder: class subfolders, or images with a metadata.jsonl")
    parser.add_argument("dst", help="the folder the shard-XXXXXX.tar files go to")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--text-encoder", default=None,
                        help="store each caption's encoding by this conf/text_encoder option (e.g. minilm, clip); "
                             "train with the same text_encoder=")
    args = parser.parse_args(argv)
    encoder = text_encoder_from_config(args.text_encoder) if args.text_encoder else None
    shards = write_shards(args.src, args.dst, args.shard_size, text_encoder=encoder)
    print(f"wrote {len(shards)} shards to {args.dst}" + (f" with {args.text_encoder} encodings" if encoder else ""))


if __name__ == "__main__":
    main()
