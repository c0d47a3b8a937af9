"""KID, precision/recall and the Inception Score on features with known answers."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torch_fidelity")
from difflab.metrics.scores import inception_score, kernel_inception_distance, precision_recall  # noqa: E402


def test_inception_score_closed_forms():
    # confident and balanced over 10 classes: exp(KL) = exp(log 10) = 10
    confident = torch.eye(10).repeat(50, 1) * 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)  # one split: balanced
    # every sample the same distribution: p(y|x) = p(y), IS = 1
    assert inception_score(torch.randn(1, 10).repeat(500, 1))[0] == pytest.approx(1.0, abs=1e-9)
    # two equiprobable classes, each sample 90 % sure: exp(log 2 - H(0.9))
    two = torch.tensor([[math.log(9.0), 0.0], [0.0, math.log(9.0)]]).repeat(100, 1)
    entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert inception_score(two, splits=1)[0] == pytest.approx(math.exp(math.log(2) - entropy), rel=1e-6)


def test_kid_is_unbiased_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    real, same = torch.randn(600, 16, generator=g), torch.randn(600, 16, generator=g)
    near, far = same + 0.2, same + 1.0
    kid_same, spread = kernel_inception_distance(real, same, subsets=50, subset_size=300)
    assert abs(kid_same) < 2 * spread  # the unbiased estimator: 0 within its subset spread for equal distributions
    kid_near = kernel_inception_distance(real, near, 50, 300)[0]
    kid_far = kernel_inception_distance(real, far, 50, 300)[0]
    assert 10 * abs(kid_same) < kid_near < kid_far


def test_precision_recall_of_identical_and_disjoint_sets():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
