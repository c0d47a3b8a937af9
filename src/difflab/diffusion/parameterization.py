"""What the network predicts (eps, x0 or v) and the exact conversions between them.

Every function takes the VP coefficients alpha = sqrt(abar_t) and sigma = sqrt(1 - abar_t), so that
x_t = alpha x0 + sigma eps. ``Prediction`` objects adapt a network's output to the (x0, eps) pair that
samplers and losses work with, so one sampler serves every parameterisation (STYLE.md §3).
"""

from __future__ import annotations

from torch import Tensor


def x0_from_eps(x_t: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t: Tensor, x0: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4)."""
    return alpha * eps - sigma * x0


def x0_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return alpha * x_t - sigma * v  # uses alpha^2 + sigma^2 = 1


def eps_from_v(x_t: Tensor, v: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    return sigma * x_t + alpha * v


def posterior_coefficients(abar_t, abar_prev):
    """Coefficients of q(x_prev | x_t, x0) = N(c_x0 x0 + c_xt x_t, var) for abar_prev > abar_t.

    The step may skip timesteps: beta = 1 - abar_t / abar_prev is the effective beta between the two
    levels (Ho et al. 2020 Eqs. 6-7 with t-1 replaced by prev). Works on floats or tensors.
    """
    beta = 1 - abar_t / abar_prev
    coef_x0 = abar_prev**0.5 * beta / (1 - abar_t)
    coef_xt = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    variance = (1 - abar_prev) / (1 - abar_t) * beta
    return coef_x0, coef_xt, variance


class Prediction:
    """A network parameterisation: its training target and its conversion to (x0, eps)."""

    name: str

    def target(self, x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def to_x0_eps(self, output: Tensor, x_t: Tensor, alpha, sigma) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def to_x0(self, output: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
        return self.to_x0_eps(output, x_t, alpha, sigma)[0]

    def scale_input(self, x_t: Tensor, alpha, sigma) -> Tensor:
        """What the network is given for x_t: x_t itself, unless the parameterisation preconditions its input."""
        return x_t

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class EpsilonPrediction(Prediction):
    """The network predicts the noise eps (Ho et al. 2020)."""

    name = "epsilon"

    def target(self, x0, eps, alpha, sigma):
        return eps

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return x0_from_eps(x_t, output, alpha, sigma), output


class SamplePrediction(Prediction):
    """The network predicts the clean sample x0."""

    name = "sample"

    def target(self, x0, eps, alpha, sigma):
        return x0

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return output, eps_from_x0(x_t, output, alpha, sigma)


class VPrediction(Prediction):
    """The network predicts the velocity v = alpha eps - sigma x0 (Salimans & Ho 2022)."""

    name = "v_prediction"

    def target(self, x0, eps, alpha, sigma):
        return v_from_x0_eps(x0, eps, alpha, sigma)

    def to_x0_eps(self, output, x_t, alpha, sigma):
        return x0_from_v(x_t, output, alpha, sigma), eps_from_v(x_t, output, alpha, sigma)


class EDMPrediction(Prediction):
    """EDM's preconditioned network (Karras et al. 2022, Table 1 and Eq. 7): D(x; sigma) = c_skip x + c_out F(c_in x),
    c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2), c_in = 1 / sqrt(sigma^2 + s_d^2),
    with x = x_t / alpha and sigma = sigma_t / alpha the variance-exploding state and level, s_d = ``sigma_data``.

    The target F* = (x0 - c_skip x) / c_out has unit variance at every level when the data has std s_d, and the
    plain MSE on it is EDM's loss lambda(sigma) ||D - x0||^2 (lambda = 1 / c_out^2). With s_d = 1 F is -v: EDM's
    preconditioning is v-prediction on data scaled to unit variance.
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):  # the data's standard deviation (0.5 for images in [-1, 1])
        self.sigma_data = float(sigma_data)

    def __repr__(self) -> str:
        return f"EDMPrediction(sigma_data={self.sigma_data})"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.sigma_data == other.sigma_data

    def __hash__(self) -> int:
        return hash((type(self), self.sigma_data))

    def _norm(self, alpha, sigma):
        """sqrt(sigma_t^2 + s_d^2 alpha^2) = alpha sqrt(sigma^2 + s_d^2): the coefficients in the VP frame."""
        return (sigma**2 + self.sigma_data**2 * alpha**2) ** 0.5

    def scale_input(self, x_t, alpha, sigma):
        return x_t / self._norm(alpha, sigma)  # c_in x = x_t / (alpha sqrt(sigma^2 + s_d^2))

    def target(self, x0, eps, alpha, sigma):
        return (sigma * x0 - self.sigma_data**2 * alpha * eps) / (self.sigma_data * self._norm(alpha, sigma))

    def to_x0_eps(self, output, x_t, alpha, sigma):
        norm = self._norm(alpha, sigma)
        x0 = self.sigma_data**2 * alpha * x_t / norm**2 + sigma * self.sigma_data * output / norm
        return x0, eps_from_x0(x_t, x0, alpha, sigma)


class FlowPrediction(Prediction):
    """The network predicts the velocity u = eps - x0 of x_s = (1 - s) x0 + s eps (flow matching, Lipman et al.
    2023; rectified flow, Liu et al. 2023) and sees x_s itself. In the VP frame x_s = x_t / (alpha + sigma) and
    s = sigma / (alpha + sigma); x0 = x_s - s u, eps = x_s + (1 - s) u, finite at pure noise (alpha = 0)."""

    name = "flow"

    def scale_input(self, x_t, alpha, sigma):
        return x_t / (alpha + sigma)

    def target(self, x0, eps, alpha, sigma):
        return eps - x0

    def to_x0_eps(self, output, x_t, alpha, sigma):
        x_s, s = x_t / (alpha + sigma), sigma / (alpha + sigma)
        return x_s - s * output, x_s + (1 - s) * output


def get_prediction(prediction: str | Prediction) -> Prediction:
    """A ``Prediction`` itself, or ``prediction=<name>`` (conf/prediction: edm, epsilon, flow, sample, v_prediction)."""
    if isinstance(prediction, Prediction):
        return prediction
    from difflab.conf import build

    return build("prediction", prediction)
