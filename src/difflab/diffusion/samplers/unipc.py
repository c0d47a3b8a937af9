"""UniPC (Zhao et al. 2023): the unified predictor-corrector multistep solver in data prediction."""

from __future__ import annotations

import math

import torch

from difflab.diffusion.samplers.dpm_solver import DPMSolverPlusPlus2MSampler, log_snr_half
from difflab.errors import UsageError


def unipc_coefficients(h: float, rks: list[float], order: int, solver_type: str) -> tuple[float, float, list, list]:
    """h phi_1(h), B(h), and the linear system (R, b) of UniPC's Eq. 8-9 for the data-prediction form (-h), with
    rks the ratios (lambda_{s_k} - lambda_s) / h of the earlier points and 1 last; B(h) = -h (bh1) or e^{-h} - 1
    (bh2, the default)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else math.expm1(hh)
    factorial, R, b = 1, [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, R, b


class UniPCSampler(DPMSolverPlusPlus2MSampler):
    """UniPC-p with the B(h) variant ``solver_type`` (Zhao et al. 2023, Algorithms 2-3), as diffusers'
    UniPCMultistepScheduler (predict_x0, lower_order_final): at every grid point after the first, UniC corrects x
    with the model evaluation just made there (no extra evaluation), then UniP predicts the next point from the
    last ``solver_order`` data predictions. Orders warm up from 1 and fall back to 1 on the last step, which lands
    on the data prediction. Same grid as DPM-Solver++ (diffusers' two schedulers share it).

    x_t = (sigma_t / sigma_s) x - alpha_t h phi_1 x0_s - alpha_t B(h) sum_k rho_k D_k, D_k = (x0_{s_k} - x0_s) / r_k,
    in lambda = log(alpha / sigma), h = lambda_t - lambda_s; the corrector adds rho_c (x0_t - x0_s).
    """

    name = "unipc"

    def __init__(self, num_steps: int = 20, *, solver_order: int = 2, solver_type: str = "bh2",
                 disable_corrector: list[int] | tuple[int, ...] = (), **kwargs):
        super().__init__(num_steps, **kwargs)
        if solver_order not in (1, 2, 3):
            raise UsageError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        if solver_type not in ("bh1", "bh2"):
            raise UsageError(f"solver_type must be bh1 or bh2, got {solver_type!r}")
        self.solver_order, self.solver_type = solver_order, solver_type
        self.disable_corrector = list(disable_corrector)  # grid steps whose result is not corrected (UniP only)

    def _update(self, x, x0s, lambdas, lambda_t, abar_t, abar_s, order, x0_t=None):
        """UniP (x0_t None) or UniC from x at level s = lambdas[-1] to lambda_t with the newest-last history."""
        h = lambda_t - lambdas[-1]
        rks = [(lambdas[-1 - k] - lambdas[-1]) / h for k in range(1, order)] + [1.0]
        h_phi_1, b_h, R, b = unipc_coefficients(h, rks, order, self.solver_type)
        d1s = [(x0s[-1 - k] - x0s[-1]) / rks[k - 1] for k in range(1, order)]
        R, b = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        if x0_t is None:  # predictor: rho solves the first order - 1 equations (1/2 at order 2)
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist() if order > 2 else []
        else:  # corrector: all order equations, the last weight on x0_t - x0_s (1/2 at order 1)
            rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        alpha_t, sigma_t, sigma_s = abar_t**0.5, (1 - abar_t) ** 0.5, (1 - abar_s) ** 0.5
        out = (sigma_t / sigma_s) * x - alpha_t * h_phi_1 * x0s[-1]
        correction = sum(rho * d for rho, d in zip(rhos, d1s, strict=False))
        if x0_t is not None:
            correction = correction + rhos[-1] * (x0_t - x0s[-1])
        if isinstance(correction, torch.Tensor):
            out = out - alpha_t * b_h * correction
        return out

    def step(self, denoise, x, grid, i, *, generator=None, memory=None):
        memory = {} if memory is None else memory
        x0, _ = denoise(x, i)
        abar = grid.alphas_cumprod[i]
        lam = log_snr_half(abar)
        x0s, lambdas = memory.setdefault("x0s", []), memory.setdefault("lambdas", [])
        # UniC: x at point i again from the last point, with x0 here; not from pure noise (lambda = -inf, h = inf)
        if x0s and i - 1 not in self.disable_corrector and math.isfinite(lambdas[-1]):
            x = self._update(memory["last_sample"], x0s, lambdas, lam, abar, memory["abar"], memory["order"],
                             x0_t=x0)
        x0s.append(x0)
        lambdas.append(lam)
        del x0s[:-self.solver_order], lambdas[:-self.solver_order]
        # lower order on the last step and while warming up; a pure-noise point (lambda = -inf) adds no information
        order = max(1, min(self.solver_order, len(grid) - i, sum(math.isfinite(v) for v in lambdas)))
        abar_next = grid.alphas_cumprod[i + 1]
        memory.update(last_sample=x, abar=abar, order=order)
        if abar_next == 1.0 and order == 1:  # sigma_next = 0: the update reduces to x0
            return x0, x0
        return self._update(x, x0s, lambdas, log_snr_half(abar_next), abar_next, abar, order), x0
