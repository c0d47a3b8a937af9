"""The network's loss against the Bayes-optimal loss, per range of t, on data whose optimal denoiser is known
(``data=gmm``: i.i.d. Gaussian-mixture pixels, difflab.data.gmm).

The training loss never reaches zero: its floor is the loss of the posterior mean E[target | x_t], which is all any
denoiser can know. Reported against that floor, the excess is what training could still gain at each noise level,
which no loss curve shows. Because the optimal prediction is the conditional mean of the target, the excess equals
E||pred - pred*||^2 exactly (the cross term vanishes); it is estimated that way, with far less noise than the
difference of the two losses (both are reported, and agree in expectation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.data.gmm import GaussianMixture
from difflab.errors import UsageError
from difflab.pipeline import Pipeline
from difflab.registry import target_of


@dataclass
class BayesGap:
    """Per range k of t (``edges[k] <= t < edges[k + 1]``), the unweighted mean squared error in the network's own
    prediction space (``prediction``: epsilon, sample or v): the network's ``loss``, the Bayes-optimal ``bayes``,
    and ``excess`` = E||pred - pred*||^2 (= loss - bayes in expectation)."""

    edges: list[int]
    prediction: str
    loss: Tensor
    bayes: Tensor
    excess: Tensor

    def scalars(self) -> dict[str, float]:
        return {**{f"bayes_excess_t{k}": float(v) for k, v in enumerate(self.excess)},
                "bayes_excess_mean": float(self.excess.mean())}

    def to_dict(self) -> dict:
        return {"probe": "bayes_gap", "edges": self.edges, "prediction": self.prediction, "loss": self.loss.tolist(),
                "bayes": self.bayes.tolist(), "excess": self.excess.tolist(), **self.scalars()}

    def table(self) -> str:
        lines = [f"| t | loss ({self.prediction}) | Bayes loss | excess |", "|---|---|---|---|"]
        for k in range(len(self.loss)):
            lines.append(f"| {self.edges[k]}-{self.edges[k + 1] - 1} | {self.loss[k]:.5f} | {self.bayes[k]:.5f} | "
                         f"{self.excess[k]:.5f} |")
        return "\n".join(lines) + "\n"

    def figure(self, title: str = ""):
        from difflab.plots import bayes_gap_figure

        return bayes_gap_figure(self, title=title)


@torch.no_grad()
def bayes_gap(pipe: Pipeline, mixture: GaussianMixture, n: int = 256, buckets: int = 10, seed: int = 0,
              batch_size: int = 256) -> BayesGap:
    """Estimate on ``n`` fresh draws of ``mixture`` per range of t (t uniform within it, the null condition)."""
    generator = torch.Generator().manual_seed(seed)
    num_timesteps = pipe.schedule.num_timesteps
    edges = [k * num_timesteps // buckets for k in range(buckets + 1)]
    prediction, device = pipe.prediction, pipe.device
    sums = torch.zeros(3, buckets, dtype=torch.float64)
    was_training = pipe.network.training
    pipe.network.eval()
    try:
        for k in range(buckets):
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                x0 = mixture.sample((b, *pipe.image_shape), generator)
                eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
                t = torch.randint(edges[k], edges[k + 1], (b,), generator=generator)
                alpha, sigma = (c.double().cpu() for c in pipe.schedule.alpha_sigma(t.to(device), x0))
                x_t = alpha * x0 + sigma * eps
                target = prediction.target(x0, eps, alpha, sigma)
                denoiser = pipe.denoiser(None, b)
                x0_hat, eps_hat = denoiser(x_t.to(device), t.to(device), model_dtype=torch.float32)
                pred = prediction.target(x0_hat.cpu().double(), eps_hat.cpu().double(), alpha, sigma)
                x0_star = mixture.posterior_mean(x_t, alpha, sigma)
                eps_star = (x_t - alpha * x0_star) / sigma
                best = prediction.target(x0_star, eps_star, alpha, sigma)
                for row, value in enumerate(((pred - target) ** 2, (best - target) ** 2, (pred - best) ** 2)):
                    sums[row, k] += value.flatten(1).mean(1).sum()
    finally:
        pipe.network.train(was_training)
    loss, bayes, excess = (sums / n).unbind(0)
    return BayesGap(edges, prediction.name, loss, bayes, excess)


def mixture_of(run_config: dict) -> GaussianMixture:
    """The Gaussian mixture a ``data=gmm`` run trained on, from its run config (``module.run_config``)."""
    dataset = run_config["data"].get("dataset", {})
    if target_of(dataset) != "difflab.data.gmm.gmm":
        raise UsageError("probe=bayes_gap needs a model trained on data=gmm (its optimal denoiser is known); this "
                         f"one trained on {target_of(dataset) or 'other data'}")
    return GaussianMixture(dataset["weights"], dataset["means"], dataset["stds"])
