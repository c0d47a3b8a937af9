"""Power-function EMA profiles and their post-hoc combination (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", section 3 and appendix C; EDM2's ``training/phema.py``).

An EMA with exponent gamma averages the weights of steps 1..t with weights proportional to u^gamma over [0, t]: its
length is set by ``sigma_rel``, the profile's standard deviation over its extent, not by a decay that means a
different length at every step count. Averages of two exponents snapshotted along the run combine by least squares
into the profile of any other exponent and step. In float64: the system is badly conditioned."""

from __future__ import annotations

import numpy as np


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the profile u^gamma on [0, 1] (EDM2 eq. 4's sigma_rel)."""
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def gamma_of(sigma_rel: float) -> float:
    """The exponent gamma whose profile has relative standard deviation ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) (EDM2's ``std_to_exp``)."""
    if not 0 < sigma_rel < 12 ** -0.5:  # gamma = 0 (a plain running mean) has sigma_rel = 1 / sqrt(12)
        raise ValueError(f"sigma_rel={sigma_rel} must lie in (0, {12 ** -0.5:.4f})")
    inverse = np.float64(sigma_rel) ** -2
    return float(np.roots([1.0, 7.0, 16.0 - inverse, 12.0 - inverse]).real.max())


def beta(gamma: float, t: int) -> float:
    """The decay of the update after step t (t = 1, 2, ...): ema = beta ema + (1 - beta) theta_t. The product of
    the betas telescopes, so the weight of step k in the EMA at step t is (k^(gamma+1) - (k-1)^(gamma+1)) /
    t^(gamma+1): exactly the profile's mass over (k - 1, k]."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """Integral over u of p_a(u) p_b(u) for the normalised profiles p(u) = (gamma + 1) u^gamma / t^(gamma + 1) on
    [0, t] (EDM2's ``p_dot_p``), elementwise over broadcast arrays."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio ** exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def combination(steps, gammas, target_step: float, target_gamma: float) -> np.ndarray:
    """Weights x (one per snapshot) minimising the L2 distance between sum_i x_i p_i and the target profile, for
    snapshots of exponents ``gammas`` taken at ``steps``, subject to sum_i x_i = 1.

    EDM2 solves the unconstrained problem; its weights then sum to 1 + e, which adds e times the weights themselves
    to the result, an error far larger than the profiles' differences (weights barely move late in training). The
    constraint (solved through its KKT system) makes constant weights come back exactly."""
    steps = np.asarray(steps, dtype=np.float64).reshape(-1, 1)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1, 1)
    n = len(steps)
    system = np.ones((n + 1, n + 1))
    system[:n, :n] = profile_inner_product(steps, gammas, steps.T, gammas.T)
    system[n, n] = 0.0
    right = np.ones(n + 1)
    right[:n] = profile_inner_product(steps, gammas, np.float64(target_step), np.float64(target_gamma)).reshape(-1)
    return np.linalg.lstsq(system, right, rcond=None)[0][:n]


def fit_error(steps, gammas, weights, target_step: float, target_gamma: float) -> float:
    """The L2 distance between the combined profile and the target, relative to the target's norm."""
    steps, gammas, weights = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (steps, gammas, weights))
    gram = profile_inner_product(steps[:, None], gammas[:, None], steps[None], gammas[None])
    cross = profile_inner_product(steps, gammas, target_step, target_gamma)
    own = profile_inner_product(target_step, target_gamma, target_step, target_gamma)
    squared = weights @ gram @ weights - 2 * weights @ cross + own
    return float(np.sqrt(max(squared, 0.0) / own))
