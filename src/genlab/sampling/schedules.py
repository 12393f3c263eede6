"""Noise schedules as pure functions (DESIGN.md 3).

Training uses a discrete variance-preserving (VP) schedule: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
t = 0..T-1. The samplers work in the equivalent variance-exploding form x = x_t / sqrt(abar_t) = x_0 + sigma eps
with sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, sec. 2 and table 1), so one sampler serves every
schedule. A sampling schedule is a descending tensor of sigmas that ends with 0.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import ConfigError
from ..core.registry import Registry

BETA_SCHEDULES: Registry = Registry("noise schedule")
SIGMA_SCHEDULES: Registry = Registry("sampling schedule")


@BETA_SCHEDULES.register("linear")
def linear_betas(T: int) -> torch.Tensor:
    """beta_t linear from 1e-4 to 0.02 for T = 1000, rescaled to other T (Ho et al. 2020, sec. 4)."""
    scale = 1000 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


@BETA_SCHEDULES.register("cosine")
def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """abar_t = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at 0.999 (Nichol & Dhariwal 2021, eq. 17)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alphas_cumprod(kind: str, T: int) -> torch.Tensor:
    """abar_t for t = 0..T-1 (float64)."""
    if T < 2:
        raise ConfigError(f"timesteps={T} must be >= 2")
    return torch.cumprod(1 - BETA_SCHEDULES.get(kind)(T), dim=0)


def vp_sigmas(abar: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t): the VE noise level of each training step (ascending in t)."""
    return ((1 - abar) / abar).sqrt()


def _check_steps(steps: int, limit: int | None = None) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be an integer >= 1")
    if limit is not None and steps > limit:
        raise ConfigError(f"steps={steps} must be <= {limit}, the number of training timesteps")


@SIGMA_SCHEDULES.register("model")
def model_sigmas(train_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """The training schedule's own timesteps: `steps` of them evenly spaced from T-1 down to 0 ("trailing"
    spacing, Lin et al. 2024, table 2, so the first step starts from pure noise), then sigma = 0.
    With steps = T this is every training step, the schedule of DDPM's ancestral sampler."""
    T = len(train_sigmas)
    _check_steps(steps, T)
    t = torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.cat([train_sigmas[t], train_sigmas.new_zeros(1)]).float()


@SIGMA_SCHEDULES.register("karras")
def karras_sigmas(train_sigmas: torch.Tensor, steps: int, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, then 0 (Karras et al. 2022, eq. 5),
    between the training schedule's smallest and largest sigma."""
    _check_steps(steps)
    s_min, s_max = float(train_sigmas.min()), float(train_sigmas.max())
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sig = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).float()


def sampling_sigmas(name: str, train_sigmas: torch.Tensor, steps: int) -> torch.Tensor:
    """A sampling schedule by name ("model" or "karras"): descending sigmas, steps + 1 of them, ending with 0."""
    return SIGMA_SCHEDULES.get(name)(train_sigmas, steps)
