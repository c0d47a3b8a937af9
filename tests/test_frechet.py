"""Fréchet distance against closed forms and the sqrtm formula of pytorch-fid / torch-fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.metrics.frechet import FeatureStatistics, frechet_distance, frechet_distance_of


def test_closed_form_for_diagonal_gaussians():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum()  # 5 + (4 + 1 + 0)
    assert frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(float(expected), rel=1e-12)
    assert frechet_distance(mu1, torch.diag(var1), mu1, torch.diag(var1)) == pytest.approx(0.0, abs=1e-12)


def test_agrees_with_the_sqrtm_formula_of_pytorch_fid():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 16)), rng.normal(size=(40, 16)) @ rng.normal(size=(16, 16)) * 0.5
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    s1, s2 = a.T @ a / 40, b.T @ b / 40
    covmean = linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    ours = frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(reference, rel=1e-9)


def test_rank_deficient_covariances_stay_real_and_nonnegative():
    torch.manual_seed(0)
    few = torch.randn(5, 32, dtype=torch.float64)  # 5 samples in 32 dimensions: rank 4
    stats = FeatureStatistics.of(few)
    assert frechet_distance_of(stats, stats) == pytest.approx(0.0, abs=1e-9)
    other = FeatureStatistics.of(torch.randn(6, 32, dtype=torch.float64) + 1)
    assert frechet_distance_of(stats, other) > 0


def test_streamed_and_merged_statistics_equal_numpy():
    torch.manual_seed(0)
    features = torch.randn(300, 8) * torch.arange(1, 9) + 3
    streamed = FeatureStatistics.empty(8)
    for chunk in features.split(64):
        streamed.update(chunk)
    merged = FeatureStatistics.of(features[:100]).merge(FeatureStatistics.of(features[100:]))
    x = features.double().numpy()
    for stats in (streamed, merged):
        assert stats.count == 300
        np.testing.assert_allclose(stats.mean.numpy(), x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.covariance.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    restored = FeatureStatistics.from_state_dict(streamed.state_dict())
    assert restored.count == 300 and torch.equal(restored.outer, streamed.outer)
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        streamed.update(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="at least 2"):
        _ = FeatureStatistics.of(torch.zeros(1, 8)).covariance


def test_classifier_features_separate_real_from_noise():
    """FID on the shipped digit classifier's features: real vs real (disjoint halves) is far below real vs noise."""
    from difflab.metrics.classifier import load_digit_classifier, mnist_split

    _, _, test_x, _ = mnist_split()
    net = load_digit_classifier()
    with torch.no_grad():
        a, b = net.features(test_x[:500]), net.features(test_x[500:])
        noise = net.features(torch.rand(500, 1, 32, 32) * 2 - 1)
    real_real = frechet_distance_of(FeatureStatistics.of(a), FeatureStatistics.of(b))
    real_noise = frechet_distance_of(FeatureStatistics.of(a), FeatureStatistics.of(noise))
    assert real_noise > 20 * real_real
