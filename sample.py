"""Sample from a trained checkpoint: ``python sample.py ckpt=PATH [n=64 sampler=ddim steps=50 seed=0 out=DIR]``."""

from difflab.cli.sample import main

if __name__ == "__main__":
    main()
