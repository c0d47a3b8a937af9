"""``python -m difflab.ema reconstruct RUN_DIR sigma_rel=0.07``: see difflab.cli.ema."""

from difflab.cli.ema import main

if __name__ == "__main__":
    main()
