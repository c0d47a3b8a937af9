"""``python -m difflab.probe ckpt=PATH probe=NAME``: see difflab.cli.probe."""

from difflab.cli.probe import main

if __name__ == "__main__":
    main()
