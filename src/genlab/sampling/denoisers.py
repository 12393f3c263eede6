"""One denoiser contract for every parameterization (DESIGN.md 3): `D(x, sigma, cond) -> x0`.

x = x0 + sigma * eps is the variance-exploding view of a VP-trained network (sampling/schedules.py); the network
sees x_t = x / sqrt(1 + sigma^2) and the (fractional) training step t of sigma, and predicts eps, v or x0.
`Denoiser` converts that prediction to x0, so samplers never branch on the parameterization, and owns the
matching training loss. Classifier-free guidance is one function of the two denoiser outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.registry import Registry


@dataclass(frozen=True)
class Prediction:
    """What the network predicts, as functions of the VP coefficients a = sqrt(abar), s = sqrt(1 - abar)."""

    to_x0: Callable  # (out, x_t, a, s) -> x0
    target: Callable  # (x0, eps, a, s) -> the regression target
    mse_scale: Callable  # snr -> E|target err|^2 / E|x0 err|^2, for min-SNR weighting


PREDICTIONS: Registry[Prediction] = Registry("prediction")
PREDICTIONS.register("eps")(Prediction(  # Ho et al. 2020, eq. 11-12
    to_x0=lambda out, xt, a, s: (xt - s * out) / a, target=lambda x0, eps, a, s: eps, mse_scale=lambda snr: snr))
PREDICTIONS.register("v")(Prediction(  # v = a eps - s x0 (Salimans & Ho 2022, sec. 4 and appendix D)
    to_x0=lambda out, xt, a, s: a * xt - s * out, target=lambda x0, eps, a, s: a * eps - s * x0,
    mse_scale=lambda snr: snr + 1))
PREDICTIONS.register("x0")(Prediction(
    to_x0=lambda out, xt, a, s: out, target=lambda x0, eps, a, s: x0, mse_scale=lambda snr: torch.ones_like(snr)))


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """D(x, sigma, cond) -> x0 for a network net(x_t, t, cond) trained on the discrete VP schedule `abar`.

    `null_label` is the class id meaning "no class" for a class-conditional network (None: unconditional)."""

    def __init__(self, net: nn.Module, abar: torch.Tensor, prediction: str = "eps", null_label: int | None = None):
        super().__init__()
        self.net = net
        self.prediction = PREDICTIONS.get(prediction)
        self.null_label = null_label
        self.register_buffer("abar", abar.float(), persistent=False)
        self.register_buffer("log_sigmas", ((1 - abar) / abar).sqrt().log().float(), persistent=False)

    @property
    def sigmas(self) -> torch.Tensor:
        """The training steps' sigmas, ascending in t."""
        return self.log_sigmas.exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The fractional training step of each sigma, by interpolating log sigma between neighbouring steps
        (as k-diffusion's DiscreteSchedule.sigma_to_t)."""
        ls = self.log_sigmas
        lsig = sigma.float().log().clamp(float(ls[0]), float(ls[-1]))
        hi = torch.searchsorted(ls, lsig.contiguous()).clamp(1, len(ls) - 1)
        lo = hi - 1
        w = (lsig - ls[lo]) / (ls[hi] - ls[lo])
        return lo.float() + w

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        if self.null_label is None:
            raise ValueError("this denoiser is unconditional: it has no 'no class' label to guide against")
        return torch.full_like(cond, self.null_label)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, ...) = x0 + sigma * eps; sigma a scalar or (B,) -> the x0 estimate, float32 (B, ...)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        a = _bcast(1 / (1 + sigma**2).sqrt(), x)  # sqrt(abar) at this sigma
        s = _bcast(sigma, x) * a  # sqrt(1 - abar)
        xt = a * x
        out = self.net(xt, self.sigma_to_t(sigma), cond).float()
        return self.prediction.to_x0(out, xt, a, s)

    def loss(self, x0: torch.Tensor, cond: torch.Tensor | None = None, *, min_snr_gamma: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The DDPM regression loss per example (B,): t ~ U{0..T-1}, eps ~ N(0, I), MSE of the network's output
        against this parameterization's target (Ho et al. 2020, eq. 14, the "simple" loss). min_snr_gamma > 0
        weights each example by min(SNR, gamma) in x0 units (Hang et al. 2023, eq. 3)."""
        B = x0.shape[0]
        t = torch.randint(0, len(self.abar), (B,), generator=generator, device=x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device)
        ab = self.abar[t]
        a, s = _bcast(ab.sqrt(), x0), _bcast((1 - ab).sqrt(), x0)
        xt = a * x0 + s * eps
        out = self.net(xt, t, cond).float()
        mse = (out - self.prediction.target(x0, eps, a, s)).pow(2).flatten(1).mean(1)  # (B,)
        if min_snr_gamma > 0:
            snr = ab / (1 - ab)
            mse = mse * snr.clamp(max=min_snr_gamma) / self.prediction.mse_scale(snr)
        return mse


def classifier_free_guidance(d_cond: torch.Tensor, d_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """D = D_c + w (D_c - D_u) (Ho & Salimans 2022, eq. 6, applied to x0 estimates). w = 0 is exactly the
    conditional denoiser, w = -1 the unconditional one (up to rounding); w > 0 strengthens the class."""
    return d_cond + w * (d_cond - d_uncond)


def denoise(denoiser, x: torch.Tensor, sigma, cond: torch.Tensor | None = None, guidance: float = 0.0):
    """The denoiser's x0 estimate, guided when `guidance` != 0 (one batched call for both branches)."""
    if guidance == 0 or cond is None:
        return denoiser(x, sigma, cond)
    both = denoiser(torch.cat([x, x]), sigma, torch.cat([cond, denoiser.null_cond(cond)]))
    d_cond, d_uncond = both.chunk(2)
    return classifier_free_guidance(d_cond, d_uncond, guidance)


class ClippedDenoiser:
    """The x0 estimates of `denoiser` clipped to the data range [lo, hi] (Ho et al. 2020 clip x0 to [-1, 1] in
    their sampler; "static thresholding", Saharia et al. 2022, sec. 2.3). It keeps deterministic samplers of an
    eps-model from drifting to saturated images, where x0 = x - sigma eps amplifies eps errors by sigma."""

    def __init__(self, denoiser, lo: float = -1.0, hi: float = 1.0):
        self.denoiser, self.lo, self.hi = denoiser, lo, hi
        self.null_cond = getattr(denoiser, "null_cond", None)

    def __call__(self, x, sigma, cond=None):
        return self.denoiser(x, sigma, cond).clamp(self.lo, self.hi)
