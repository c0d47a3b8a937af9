"""Writes the checkpoints in tests/legacy/ with the code of the commit named in README.md beside this file.

    python tests/legacy/make_legacy.py     (from the repository root, at that commit)

They are models as users hold them today: whatever the loader becomes, these must still load and sample the same
images (tests/test_legacy_checkpoints.py). Never regenerate them with newer code: that would test nothing.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from configs import TINY_AUTOENCODER, make_cfg  # noqa: E402
from difflab.cli.train import run  # noqa: E402
from difflab.export import export  # noqa: E402
from difflab.loading import load  # noqa: E402
from network_contract import randomize  # noqa: E402

# what every fixture is sampled with: labels 1 and 2, two seeds each, 5 DDIM steps
REQUEST = dict(n=2, label=[1, 2], steps=5, seed=0, progress=False)
LATENT_NETWORK = ["network=latent_small", "network.model_channels=16", "network.head_dim=8", "network.norm_groups=8",
                  "network.num_res_blocks=1", "network.attention_resolutions=[]"]


def train(tmp: Path, name: str, *overrides: str) -> Path:
    trainer = run(make_cfg(tmp / name, "trainer.max_steps=2", *overrides))
    randomize(trainer.lightning_module.ema)  # a two-step EMA is nearly its zero-output initialisation
    ckpt = HERE / f"{name}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        samples = {}
        pixel = train(tmp, "pixel_class")
        samples["pixel_class"] = load(pixel, device="cpu")(**REQUEST)
        ae = run(make_cfg(tmp / "ae", "model=autoencoder", *TINY_AUTOENCODER, "trainer.max_steps=2"))
        ae_ckpt = tmp / "ae" / "checkpoints" / "last.ckpt"
        randomize(ae.lightning_module.autoencoder, seed=1)
        ae.save_checkpoint(ae_ckpt)
        latent = train(tmp, "latent_class", "model=ldm", f"first_stage.ckpt={ae_ckpt}", *LATENT_NETWORK)
        samples["latent_class"] = load(latent, device="cpu")(**REQUEST)
        exported = HERE / "pixel_class_export"
        shutil.rmtree(exported, ignore_errors=True)
        export(pixel, exported)
        samples["pixel_class_export"] = load(exported, device="cpu")(**REQUEST)
    save_file({k: v.contiguous() for k, v in samples.items()}, str(HERE / "samples.safetensors"))
    for path in sorted(HERE.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(HERE)}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
