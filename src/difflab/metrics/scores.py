"""KID, precision/recall and the Inception Score from features, through torch-fidelity's own functions (so the
figures are torch-fidelity's), with our extractors' features as input."""

from __future__ import annotations

from torch import Tensor

from difflab.extras import require


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 with the cubic polynomial kernel over random subsets (Binkowski et al.
    2018), torch-fidelity's ``kid``; subsets are capped at the smaller set's size."""
    kid = require("torch_fidelity.metric_kid", "eval", "KID")
    size = min(subset_size, len(real), len(fake))
    # torch-fidelity's order (generated first): its subsets are drawn from the first set first
    out = kid.kid_features_to_metric(fake.double().cpu(), real.double().cpu(), kid_subsets=subsets,
                                     kid_subset_size=size, rng_seed=seed, verbose=False)
    return out[kid.KEY_METRIC_KID_MEAN], out[kid.KEY_METRIC_KID_STD]


def precision_recall(real: Tensor, fake: Tensor, neighborhood: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of samples inside the real
    manifold (k-NN balls, k = ``neighborhood``) and of real images inside the samples', torch-fidelity's ``prc``."""
    prc = require("torch_fidelity.metric_prc", "eval", "precision/recall")
    out = prc.prc_features_to_metric(fake.float().cpu(), real.float().cpu(), prc_neighborhood=neighborhood,
                                     prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return out[prc.KEY_METRIC_PRECISION], out[prc.KEY_METRIC_RECALL]


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """(mean, std) of exp E_x KL(p(y|x) || p(y)) over ``splits`` (Salimans et al. 2016), torch-fidelity's ``isc``,
    from classifier logits (Inception's unbiased logits, or any classifier's)."""
    isc = require("torch_fidelity.metric_isc", "eval", "the Inception Score")
    out = isc.isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return out[isc.KEY_METRIC_ISC_MEAN], out[isc.KEY_METRIC_ISC_STD]
