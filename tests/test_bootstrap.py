"""Bootstrap intervals: exact figures on the whole sets, and coverage in simulations with known answers."""

from __future__ import annotations

import pytest
import torch

from difflab.metrics.bootstrap import (
    _GramFrechet,
    basic_interval,
    bootstrap,
    difference,
    fid_statistic,
    kid_statistic,
    mean_statistic,
    wilson_interval,
)
from difflab.metrics.frechet import FeatureStatistics, frechet_distance_of, frechet_distances
from difflab.metrics.scores import kernel_inception_distance


def fid(a, b):
    return frechet_distance_of(FeatureStatistics.of(a), FeatureStatistics.of(b))


def gaussian(n, d, generator, scale=1.0, shift=0.0):
    return torch.randn(n, d, generator=generator, dtype=torch.float64) * scale + shift


def test_statistics_on_the_whole_sets_are_the_figures():
    g = torch.Generator().manual_seed(0)
    real, fake = gaussian(60, 8, g), gaussian(60, 8, g, 1.3, 0.2)
    whole = torch.arange(60)[None]
    assert fid_statistic(real, [fake])(whole, whole)[0, 0].item() == pytest.approx(fid(real, fake), rel=1e-10)
    kid, _ = kernel_inception_distance(real, fake, subsets=3, subset_size=60)  # one subset = the whole sets
    assert kid_statistic(real, [fake])(whole, whole)[0, 0].item() == pytest.approx(kid, rel=1e-9)
    correct = torch.tensor([1.0, 0.0, 1.0, 1.0])
    assert mean_statistic([correct, 1 - correct])(whole[:, :4], torch.tensor([[0, 0, 1, 3]])).tolist() == [[0.75, 0.25]]


def test_the_gram_route_equals_the_covariance_route_on_resamples():
    """Fewer samples than dimensions: the nuclear-norm form gives the Fréchet distance of the covariances."""
    g = torch.Generator().manual_seed(1)
    real, fake = gaussian(30, 64, g), gaussian(40, 64, g, 1.2, 0.1)
    i, j = torch.randint(0, 30, (3, 30), generator=g), torch.randint(0, 40, (3, 40), generator=g)
    expected = [fid(real[i[r]], fake[j[r]]) for r in range(3)]
    torch.testing.assert_close(_GramFrechet(real, fake)(i, j), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-7, atol=0)  # FeatureStatistics sums outer products: ~1e-8
    assert isinstance(fid_statistic(real, [fake]).__closure__[0].cell_contents[0], _GramFrechet)


def test_batched_frechet_distances_equal_one_at_a_time():
    g = torch.Generator().manual_seed(2)
    x = gaussian(4 * 50, 6, g).view(4, 50, 6)
    mu, cov = x.mean(1), torch.stack([torch.cov(s.T) for s in x])
    batched = frechet_distances(mu[:2], cov[:2], mu[2:], cov[2:])
    assert batched.tolist() == pytest.approx([fid(x[0], x[2]), fid(x[1], x[3])], rel=1e-10)


@pytest.mark.slow
def test_the_paired_difference_covers_zero_for_one_distribution_and_not_for_two(record_property):
    """50 seeds, n = 200 in 16 dimensions: two sample sets of the real distribution (the difference's truth is 0),
    and one of a distribution shifted by 0.3 per coordinate."""
    covered = excluded = 0
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        real, a, b = (gaussian(200, 16, g) for _ in range(3))
        shifted = gaussian(200, 16, g, shift=0.3)
        replicates = bootstrap({"fid": fid_statistic(real, [a, b, shifted])}, 200, 200, reps=200, seed=seed)["fid"]
        estimates = [fid(real, a), fid(real, b), fid(real, shifted)]
        covered += difference(estimates[:2], replicates[:, :2]).covers(0.0)
        excluded += not difference([estimates[0], estimates[2]], replicates[:, [0, 2]]).covers(0.0)
    # the figures themselves, on a pass too (pytest -rP shows the print; junit XML holds the properties)
    record_property("zero_covered_of_50", covered)
    record_property("shift_excluded_of_50", excluded)
    print(f"paired difference: 0 covered in {covered}/50 seeds, a 0.3 shift excluded in {excluded}/50")
    assert covered >= 45 and excluded >= 45, (covered, excluded)


@pytest.mark.slow
def test_a_single_fid_interval_covers_the_expected_fid_at_that_n(record_property):
    """The interval targets E[FID_n] (Monte Carlo over 4000 draws): covered in >= 90 % of 100 seeds."""
    n, d = 200, 16
    g = torch.Generator().manual_seed(123)
    draws = [(gaussian(n, d, g), gaussian(n, d, g, 1.1, 0.2)) for _ in range(4000)]
    mu = torch.stack([torch.stack([r.mean(0), f.mean(0)]) for r, f in draws])
    cov = torch.stack([torch.stack([torch.cov(r.T), torch.cov(f.T)]) for r, f in draws])
    expected = frechet_distances(mu[:, 0], cov[:, 0], mu[:, 1], cov[:, 1]).mean().item()
    covered = 0
    for seed in range(100):
        real, fake = draws[seed]
        replicates = bootstrap({"fid": fid_statistic(real, [fake])}, n, n, reps=200, seed=seed)["fid"][:, 0]
        covered += basic_interval(fid(real, fake), replicates, minimum=0.0).covers(expected)
    record_property("expected_fid_covered_of_100", covered)
    print(f"single FID interval (95 %): E[FID_n] = {expected:.4f} covered in {covered}/100 seeds")
    assert covered >= 90, f"E[FID_n] covered in {covered}/100 seeds, expected >= 90 at a 95 % level"


def test_basic_interval_reflects_the_replicates_about_the_estimate():
    replicates = torch.tensor([10.0, 11.0, 12.0, 13.0, 20.0])  # mean 13.2, right-skewed
    interval = basic_interval(5.0, replicates, level=0.5)  # quartiles 11 and 13
    assert (interval.low, interval.high) == pytest.approx((5.0 - (13 - 13.2), 5.0 - (11 - 13.2)))
    left_skewed = torch.tensor([0.0, 7.0, 8.0, 9.0, 10.0])  # mean 6.8, quartiles 7 and 9: low = 1 - 2.2 < 0
    assert basic_interval(1.0, left_skewed, level=0.5, minimum=0.0).low == 0.0


def test_wilson_interval_against_its_closed_form_values():
    interval = wilson_interval(10, 100)  # the textbook example: 0.0552 to 0.1744
    assert (interval.low, interval.high) == pytest.approx((0.0552, 0.1744), abs=1e-4)
    assert wilson_interval(200, 200).low == pytest.approx(0.98115, abs=1e-4) and wilson_interval(200, 200).high == 1.0
