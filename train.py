"""Train a diffusion model: ``python train.py [group=option ...]`` (see conf/train.yaml)."""

from difflab.cli.train import main

if __name__ == "__main__":
    main()
