"""The real configs, shrunk for tests: composed as the entry points compose them (shared by the test modules)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from PIL import Image

from difflab.cli import CONFIG_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def compose_config(name: str, *overrides: str):
    """conf/<name>.yaml composed with the overrides, as the entry point's Hydra main would."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def make_cfg(tmp_path: Path, *overrides: str):
    """The real config, shrunk: 8x8 digits, tiny network, a few steps, few sampler steps."""
    base = [f"paths.output_dir={tmp_path}", "data=digits", "network=tiny", "data.batch_size=16",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "~callbacks.progress_bar",
            "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_samples=4",
            "callbacks.checkpoint.every_n_train_steps=2", "trainer.limit_val_batches=1"]
    chosen = {o.split("=")[0] for o in overrides if "=" in o and "." not in o.split("=")[0]}
    base = [o for o in base if o.split("=")[0] not in chosen]  # a group chosen in overrides replaces ours
    return compose_config("train", *base, *overrides)


TINY_AUTOENCODER = ["model.autoencoder.channels=8", "model.autoencoder.channel_mult=[1,2]",
                    "model.autoencoder.norm_groups=4"]  # f = 2: 4x4x4 latents of the 8x8 digits
TINY_LATENT_NETWORK = ["network=latent_small", "network.model_channels=16", "network.head_dim=8",
                       "network.norm_groups=8", "network.num_res_blocks=1"]


def sample_cfg(*overrides: str):
    return compose_config("sample", *overrides)


def write_shards(tmp_path: Path) -> Path:
    """26 RGB images in two classes (cat, dog) written as webdataset shards of 5 by make_shards."""
    from difflab.data.make_shards import main as make_shards

    for label, name in enumerate(["cat", "dog"]):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(13):
            Image.new("RGB", (12, 10), (label * 200, i * 15, 0)).save(tmp_path / "src" / name / f"{i}.png")
    make_shards([str(tmp_path / "src"), str(tmp_path / "shards"), "--shard-size", "5"])
    return tmp_path / "shards"


SHAPES = ("circle", "square", "triangle")


def write_shapes(root: Path, per_class: int = 12, size: int = 16, seed: int = 0, mode: str = "RGB") -> Path:
    """An image folder of coloured shapes in class subfolders (circle, square, triangle): random colours, sizes and
    positions on a random light background."""
    import random

    from PIL import ImageDraw

    rng = random.Random(seed)
    for name in SHAPES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (size, size), tuple(rng.randrange(180, 256) for _ in range(3)))
            r = rng.uniform(0.25, 0.45) * size
            cx, cy = (rng.uniform(r, size - r) for _ in range(2))
            colour = tuple(rng.randrange(0, 160) for _ in range(3))
            draw = ImageDraw.Draw(image)
            if name == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
            elif name == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            image.convert(mode).save(root / name / f"{i:03d}.png")
    return root
