"""Bootstrap confidence intervals for evaluation figures (FID, KID, class accuracy) and for the differences
between sample sets generated with the same seeds (paired: sample i of every set shares its initial noise and
condition, so much of the sampling noise cancels in the difference).

A replicate resamples the real features and the generated ones with replacement (the same generated indices for
every set of a comparison) and recomputes the figures from features extracted once (Efron & Tibshirani 1993).
FID and KID from n samples are biased at that n, and a resample, which repeats points, is biased once more; so
the interval is the basic bootstrap interval re-centred on the replicates' mean m, [t - (q_hi - m), t - (q_lo - m)]:
it covers the figure's expected value at this n (what reruns with fresh samples scatter around), and for a
difference at equal n, where the biases cancel, the true difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from difflab.metrics.frechet import frechet_distances

# (real indices (R, M), generated indices (R, N)) -> (R, K): K figures on each of R resamples
Statistic = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Interval:
    """An estimate with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float = 0.95

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level}

    def __str__(self) -> str:
        return f"{self.estimate:.4g} [{self.low:.4g}, {self.high:.4g}]"


def basic_interval(estimate: float, replicates: Tensor, level: float = 0.95,
                   minimum: float = -math.inf) -> Interval:
    """The basic bootstrap interval of ``estimate`` from its replicates (R,), re-centred on their mean; its low end
    no lower than ``minimum`` (0 for a FID, which the skewed replicates can reflect below 0 at small n)."""
    replicates = replicates.double()
    alpha = (1 - level) / 2
    low_q, high_q = torch.quantile(replicates, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    shift = replicates.mean().item()
    return Interval(estimate, max(minimum, estimate - (high_q - shift)), estimate - (low_q - shift), level)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> Interval:
    """The Wilson score interval of a proportion (Wilson 1927): unlike a bootstrap, not degenerate at 0 % or 100 %."""
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64)).item()
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level)


def bootstrap(statistics: dict[str, Statistic], n_real: int, n_fake: int, reps: int = 200, seed: int = 0,
              chunk: int = 25, progress: bool = False) -> dict[str, Tensor]:
    """Each statistic on ``reps`` resamples, the same for all, computed ``chunk`` resamples at a time:
    {name: (reps, K)}."""
    generator = torch.Generator().manual_seed(seed)
    real_index = torch.randint(0, n_real, (reps, n_real), generator=generator)
    fake_index = torch.randint(0, n_fake, (reps, n_fake), generator=generator)
    out: dict[str, list[Tensor]] = {name: [] for name in statistics}
    for start in tqdm(range(0, reps, chunk), desc="bootstrap", leave=False, disable=not progress):
        rows = slice(start, start + chunk)
        for name, statistic in statistics.items():
            out[name].append(statistic(real_index[rows], fake_index[rows]))
    return {name: torch.cat(values) for name, values in out.items()}


def _gather(matrix: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """matrix[rows_r][:, columns_r] for each resample r: (R, M, N)."""
    return matrix[rows[:, :, None], columns[:, None, :]]


def _moments(features: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Means (R, D) and unbiased covariances (R, D, D) of the resamples features[index_r]."""
    x = features[index]
    centred = x - x.mean(1, keepdim=True)
    return x.mean(1), centred.mT @ centred / (x.shape[1] - 1)


def fid_statistic(real: Tensor, fakes: Sequence[Tensor]) -> Statistic:
    """The Fréchet distance of each generated feature set (N, D) against the real features (M, D)."""
    real, fakes = real.double(), [fake.double() for fake in fakes]
    if min(len(real), *(len(f) for f in fakes)) < real.shape[1]:  # fewer samples than dimensions
        parts = [_GramFrechet(real, fake) for fake in fakes]
        return lambda i, j: torch.stack([part(i, j) for part in parts], dim=1)

    def statistic(i: Tensor, j: Tensor) -> Tensor:
        mu, sigma = _moments(real, i)
        return torch.stack([frechet_distances(mu, sigma, *_moments(fake, j)) for fake in fakes], dim=1)

    return statistic


class _GramFrechet:
    """The Fréchet distance from Gram matrices, for fewer samples than feature dimensions (Inception's 2048 at
    n < 2048), where it is much cheaper than the covariances' square roots: with A_i the centred features over
    sqrt(n_i - 1), Tr((S_1^{1/2} S_2 S_1^{1/2})^{1/2}) is the nuclear norm of A_1 A_2^T (the eigenvalues of
    S_1 S_2 are the squared singular values of A_1 A_2^T), and the means and traces come from the Gram matrices."""

    def __init__(self, real: Tensor, fake: Tensor):
        self.rr, self.ff, self.rf = real @ real.T, fake @ fake.T, real @ fake.T

    def __call__(self, i: Tensor, j: Tensor) -> Tensor:
        rr, ff, rf = _gather(self.rr, i, i), _gather(self.ff, j, j), _gather(self.rf, i, j)
        m, n = i.shape[1], j.shape[1]
        mean_r, mean_f, cross = rr.mean((1, 2)), ff.mean((1, 2)), rf.mean((1, 2))  # |mu_r|^2, |mu_f|^2, mu_r.mu_f
        trace_r = (torch.diagonal(rr, dim1=1, dim2=2).sum(1) - m * mean_r) / (m - 1)
        trace_f = (torch.diagonal(ff, dim1=1, dim2=2).sum(1) - n * mean_f) / (n - 1)
        centred = rf - rf.mean(2, keepdim=True) - rf.mean(1, keepdim=True) + cross[:, None, None]
        centred = centred / math.sqrt((m - 1) * (n - 1))
        small = centred @ centred.mT if m <= n else centred.mT @ centred
        trace_sqrt = torch.linalg.eigvalsh(small).clamp_min(0).sqrt().sum(1)
        return (mean_r + mean_f - 2 * cross + trace_r + trace_f - 2 * trace_sqrt).clamp_min(0)


KID_MAX_PAIRS = 25_000_000  # kernel matrices past 5000 x 5000 samples are not kept (memory): no KID interval


def kid_statistic(real: Tensor, fakes: Sequence[Tensor]) -> Statistic | None:
    """The unbiased MMD^2 with KID's cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018) of
    each generated feature set against the real one, over the whole (resampled) sets; None past KID_MAX_PAIRS."""
    if any(len(real) * len(f) > KID_MAX_PAIRS for f in fakes):
        return None
    real, fakes = real.double(), [fake.double() for fake in fakes]
    d = real.shape[1]

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return (x @ y.T / d + 1) ** 3

    rr = kernel(real, real)
    parts = [(kernel(fake, fake), kernel(real, fake)) for fake in fakes]

    def off_diagonal_mean(k: Tensor) -> Tensor:  # over pairs of distinct positions (a resample's repeats count)
        n = k.shape[1]
        return (k.sum((1, 2)) - torch.diagonal(k, dim1=1, dim2=2).sum(1)) / (n * (n - 1))

    def statistic(i: Tensor, j: Tensor) -> Tensor:
        within_real = off_diagonal_mean(_gather(rr, i, i))
        return torch.stack([within_real + off_diagonal_mean(_gather(ff, j, j)) - 2 * _gather(rf, i, j).mean((1, 2))
                            for ff, rf in parts], dim=1)

    return statistic


def mean_statistic(values: Sequence[Tensor]) -> Statistic:
    """The mean of per-sample values (N,) of each set (e.g. 1 where the classifier saw the asked class)."""
    stacked = torch.stack([v.double() for v in values])  # (K, N)
    return lambda i, j: stacked[:, j].mean(2).T


def intervals(estimates: dict[str, Sequence[float]], replicates: dict[str, Tensor],
              level: float = 0.95) -> dict[str, list[Interval]]:
    """{name: [Interval per set]} from the estimates and ``bootstrap``'s replicates."""
    return {name: [basic_interval(float(e), replicates[name][:, k], level) for k, e in enumerate(values)]
            for name, values in estimates.items()}


def difference(estimates: Sequence[float], replicates: Tensor, level: float = 0.95) -> Interval:
    """The interval of estimates[1] - estimates[0] from paired replicates (R, 2)."""
    return basic_interval(float(estimates[1]) - float(estimates[0]), replicates[:, 1] - replicates[:, 0], level)
