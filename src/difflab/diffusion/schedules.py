"""Discrete variance-preserving noise schedules: betas, alpha_bar, SNR and the forward-process helpers.

Conventions follow Ho et al. 2020 (DDPM) and diffusers: T training steps indexed t = 0..T-1,
``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])`` and x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
All tables are float64; helpers return the dtype of their tensor input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from difflab.diffusion import parameterization as param

MIN_ALPHA_BAR = 2.0**-24  # floor of alpha_bar where sigma must stay finite (diffusers' Karras-style schedulers)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule (Ho et al. 2020, Sec. 4): betas evenly spaced from beta_start to beta_end."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Latent/Stable Diffusion's schedule: linear in sqrt(beta) (Rombach et al. 2022)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, Eq. 17), betas capped at ``max_beta``.

    abar(t) = f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2); beta_t = 1 - abar(t+1)/abar(t).
    diffusers calls this ``squaredcos_cap_v2``.
    """

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def sigmoid_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """GeoDiff's sigmoid schedule (Xu et al. 2022), as diffusers' DDPMScheduler ``sigmoid``."""
    ramp = torch.sigmoid(torch.linspace(-6, 6, num_timesteps, dtype=torch.float64))
    return ramp * (beta_end - beta_start) + beta_start


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the final step has SNR exactly 0 (Lin et al. 2023, Algorithm 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """A discrete variance-preserving forward process q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I).

    Build one by name (``NoiseSchedule.from_name("cosine")``, which reads conf/schedule), with a named constructor
    (``NoiseSchedule.cosine(num_timesteps=1000, s=0.008)``; these are the Hydra ``_target_``s), or from
    any betas. Tables: ``betas``, ``alphas``, ``alphas_cumprod``, ``snr`` (float64, CPU); helpers take a
    LongTensor t of shape (B,) and tensors of shape (B, ...).
    """

    def __init__(self, betas: Tensor, *, name: str = "custom", zero_terminal_snr: bool = False,
                 params: dict | None = None):  # the named constructor's arguments (what export maps to diffusers)
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        if betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must hold at least 2 values, each in (0, 1]")
        self.name = name
        self.params = dict(params or {})
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._device_tables: dict[torch.device, Tensor] = {}

    # ---- named constructors (one per schedule; Hydra targets these) ---------------------------------

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               zero_terminal_snr: bool = False) -> NoiseSchedule:
        return cls(linear_betas(num_timesteps, beta_start, beta_end), name="linear",
                   zero_terminal_snr=zero_terminal_snr, params=dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      zero_terminal_snr: bool = False) -> NoiseSchedule:
        return cls(scaled_linear_betas(num_timesteps, beta_start, beta_end), name="scaled_linear",
                   zero_terminal_snr=zero_terminal_snr, params=dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999,
               zero_terminal_snr: bool = False) -> NoiseSchedule:
        return cls(cosine_betas(num_timesteps, s, max_beta), name="cosine", zero_terminal_snr=zero_terminal_snr,
                   params=dict(s=s, max_beta=max_beta))

    @classmethod
    def sigmoid(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                zero_terminal_snr: bool = False) -> NoiseSchedule:
        return cls(sigmoid_betas(num_timesteps, beta_start, beta_end), name="sigmoid",
                   zero_terminal_snr=zero_terminal_snr, params=dict(beta_start=beta_start, beta_end=beta_end))

    @classmethod
    def edm(cls, num_timesteps: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0) -> NoiseSchedule:
        """EDM's noise levels (Karras et al. 2022, Table 1): sigma from ``sigma_min`` to ``sigma_max``, even in log
        sigma over the T timesteps, as a VP schedule (alpha_bar = 1 / (1 + sigma^2)). Fractional timesteps are exact
        here: t is affine in log sigma, so the network's t carries EDM's c_noise = log(sigma) / 4 up to an affine
        map (into the range the sinusoidal embeddings were built for), and ``sigma_to_t`` inverts it exactly."""
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"schedule=edm needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        log_sigma = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps, dtype=torch.float64)
        abar = 1 / (1 + log_sigma.exp() ** 2)
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return cls(betas, name="edm")

    @classmethod
    def flow(cls, num_timesteps: int = 1000, shift: float = 1.0) -> NoiseSchedule:
        """Flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023): x_s = (1 - s) x0 + s eps at
        s = shift u / (1 + (shift - 1) u), u = (t + 1) / T (diffusers' FlowMatchEulerDiscreteScheduler; SD3's
        shift, Esser et al. 2024, Eq. 23), as a VP schedule: alpha_bar = (1 - s)^2 / ((1 - s)^2 + s^2), 0 at the last
        timestep (pure noise)."""
        u = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        s = shift * u / (1 + (shift - 1) * u)
        abar = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        schedule = cls(betas, name="flow")
        schedule.zero_terminal_snr = True  # by construction, not by rescaling
        return schedule

    @staticmethod
    def from_name(name: str, num_timesteps: int = 1000, **kwargs) -> NoiseSchedule:
        """``schedule=<name>`` (conf/schedule/<name>.yaml: diffusers' default constants); kwargs override them."""
        from difflab.conf import build

        return build("schedule", name, num_timesteps=num_timesteps, **kwargs)

    # ---- tables ---------------------------------------------------------------------------------

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio abar / (1 - abar) per timestep."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def sigmas(self) -> Tensor:
        """The variance-exploding sigma = sqrt((1 - abar) / abar) per timestep (Karras et al. 2022, Eq. 4); an
        alpha_bar of exactly 0 (zero terminal SNR) counts as 2**-24, so that sigma_max is finite (as diffusers)."""
        abar = torch.where(self.alphas_cumprod > 0, self.alphas_cumprod,
                           torch.full_like(self.alphas_cumprod, MIN_ALPHA_BAR))
        return ((1 - abar) / abar).sqrt()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional timestep of each sigma: linear in log sigma between the two timesteps around it, clamped
        to [0, T - 1] (k-diffusion's ``DiscreteSchedule.sigma_to_t``, diffusers' ``_sigma_to_t``); float64."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
        table = self.sigmas.log()
        low = torch.searchsorted(table, log_sigma, right=True).sub(1).clamp(0, self.num_timesteps - 2)
        w = ((log_sigma - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
        return low + w

    def t_to_abar(self, t: Tensor) -> Tensor:
        """alpha_bar at fractional timesteps: log sigma interpolated linearly between the neighbouring timesteps
        (the inverse of ``sigma_to_t``; k-diffusion's ``t_to_sigma``); float64 on t's device."""
        t = t.to(torch.float64)
        log_sigmas = self.sigmas.log().to(t.device)
        low = t.floor().long().clamp(0, self.num_timesteps - 1)
        high = t.ceil().long().clamp(0, self.num_timesteps - 1)
        sigma = ((1 - t.frac()) * log_sigmas[low] + t.frac() * log_sigmas[high]).exp()
        return torch.where(t.frac() == 0, self.alphas_cumprod.to(t.device)[low], 1 / (1 + sigma**2))

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, num_timesteps={self.num_timesteps}, " \
               f"zero_terminal_snr={self.zero_terminal_snr})"

    def _abar(self, t: Tensor) -> Tensor:
        """alpha_bar at timesteps t, gathered on t's device (float64; float32 on MPS); fractional t (a sigma grid's)
        is interpolated by ``t_to_abar``."""
        device = t.device
        if t.is_floating_point() and not bool((t == t.round()).all()):
            dtype = torch.float32 if device.type == "mps" else torch.float64
            return self.t_to_abar(t.cpu()).to(device=device, dtype=dtype)
        table = self._device_tables.get(device)
        if table is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = self._device_tables[device] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return table[t.long()]

    def snr_at(self, t: Tensor) -> Tensor:
        """SNR(t) = abar_t / (1 - abar_t) at integer timesteps t: (B,), on t's device."""
        abar = self._abar(t)
        return abar / (1 - abar)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t) and sqrt(1 - abar_t) for t: (B,), shaped to broadcast against ``like`` (B, ...)."""
        abar = self._abar(t).reshape(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), (1 - abar).sqrt()

    # ---- forward process and conversions --------------------------------------------------------

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4).

        The coefficients come from the float64 table; the product is formed in x0's dtype, so the training
        step never moves a batch to float64."""
        alpha, sigma = (c.to(x0.dtype) for c in self.alpha_sigma(t, x0))
        return alpha * x0 + sigma * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, Sec. 4)."""
        return self._apply(param.v_from_x0_eps, t, x0, noise)

    def x0_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return self._apply(param.x0_from_eps, t, x_t, eps)

    def eps_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        return self._apply(param.eps_from_x0, t, x_t, x0)

    def x0_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        return self._apply(param.x0_from_v, t, x_t, v)

    def eps_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        return self._apply(param.eps_from_v, t, x_t, v)

    def _apply(self, fn: Callable[..., Tensor], t: Tensor, a: Tensor, b: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, a)
        return fn(a.to(alpha.dtype), b.to(alpha.dtype), alpha, sigma).to(a.dtype)

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_{t_prev} | x_t, x0) (Ho et al. 2020, Eqs. 6-7).

        ``t_prev`` defaults to t - 1; any t_prev < t works (strided sampling), and t_prev = -1 means the
        clean image (abar = 1). Returns (mean: like x_t, variance: (B, 1, ...)).
        """
        t_prev = t - 1 if t_prev is None else t_prev
        abar_t = self._abar(t)
        abar_prev = torch.where(t_prev >= 0, self._abar(t_prev.clamp(min=0)), torch.ones_like(abar_t))
        coef_x0, coef_xt, variance = param.posterior_coefficients(abar_t, abar_prev)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        coef_x0, coef_xt, variance = (c.reshape(shape) for c in (coef_x0, coef_xt, variance))
        mean = coef_x0 * x0.to(coef_x0.dtype) + coef_xt * x_t.to(coef_x0.dtype)
        return mean.to(x_t.dtype), variance

