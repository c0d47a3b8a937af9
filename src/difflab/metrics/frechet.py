"""Fréchet distance between Gaussians fitted to features (FID when the features are Inception's; Heusel et al.
2017), with streaming, mergeable feature statistics.

d^2 = |mu_1 - mu_2|^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}).

Why not ``scipy.linalg.sqrtm(S_1 S_2)`` as torch-fidelity and pytorch-fid do: S_1 S_2 is not symmetric, its
square root goes complex with rank-deficient covariances (fewer samples than feature dimensions) and needs an
ad-hoc imaginary-part check. S_1^{1/2} S_2 S_1^{1/2} is symmetric positive semi-definite with the same
eigenvalues as S_1 S_2, so two symmetric eigendecompositions in float64 give the trace term exactly, with
negative round-off eigenvalues clamped to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FeatureStatistics:
    """Running count, sum and sum of outer products of feature vectors, in float64. ``update`` with batches,
    ``merge`` across processes or shards; ``mean`` and ``covariance`` (unbiased, as numpy.cov) at any time."""

    count: int
    total: Tensor  # (D,)
    outer: Tensor  # (D, D)

    @classmethod
    def empty(cls, dim: int) -> FeatureStatistics:
        return cls(0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    @classmethod
    def of(cls, features: Tensor) -> FeatureStatistics:
        stats = cls.empty(features.shape[-1])
        stats.update(features)
        return stats

    def update(self, features: Tensor) -> FeatureStatistics:
        """Add a batch of features (N, D)."""
        if features.ndim != 2 or features.shape[1] != self.total.shape[0]:
            raise ValueError(f"features must be (N, {self.total.shape[0]}), got {tuple(features.shape)}")
        x = features.detach().to(device="cpu", dtype=torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x
        return self

    def merge(self, other: FeatureStatistics) -> FeatureStatistics:
        return FeatureStatistics(self.count + other.count, self.total + other.total, self.outer + other.outer)

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @property
    def covariance(self) -> Tensor:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.mean
        return (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)

    def state_dict(self) -> dict:
        return {"count": torch.tensor(self.count), "total": self.total, "outer": self.outer}

    @classmethod
    def from_state_dict(cls, state: dict) -> FeatureStatistics:
        return cls(int(state["count"]), state["total"].double(), state["outer"].double())


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.mT


def _symmetric(matrix: Tensor) -> Tensor:
    return (matrix + matrix.mT) / 2


def frechet_distances(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared Fréchet distances, batched over leading dimensions (means (..., D), covariances (..., D, D)), in
    float64."""
    mu1, sigma1, mu2, sigma2 = (t.to(torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrt_psd(_symmetric(sigma1))
    trace_sqrt = torch.linalg.eigvalsh(_symmetric(root1 @ sigma2 @ root1)).clamp_min(0).sqrt().sum(-1)
    trace = torch.diagonal(sigma1, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(sigma2, dim1=-2, dim2=-1).sum(-1)
    return ((mu1 - mu2).square().sum(-1) + trace - 2 * trace_sqrt).clamp_min(0)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    return float(frechet_distances(mu1, sigma1, mu2, sigma2))


def frechet_distance_of(a: FeatureStatistics, b: FeatureStatistics) -> float:
    return frechet_distance(a.mean, a.covariance, b.mean, b.covariance)
