"""Evaluate a checkpoint or a folder of samples: ``python evaluate.py ckpt=PATH n=1000`` (see conf/evaluate.yaml)."""

from difflab.cli.evaluate import main

if __name__ == "__main__":
    main()
