"""``python -m difflab.export ckpt=PATH out=DIR [format=diffusers|safetensors] [push_to_hub=REPO]``."""

if __name__ == "__main__":
    from difflab.cli.export import main

    main()
