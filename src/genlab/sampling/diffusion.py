"""Diffusion samplers as stateless functions, chosen by name (DESIGN.md 3).

Every sampler has the signature `sample_x(denoiser, x, sigmas, *, generator, callback, cond, guidance)`:
`denoiser(x, sigma, cond) -> x0` (sampling/denoisers.py), `x` the starting noise at sigmas[0] in the
variance-exploding scale (x = x0 + sigma eps), `sigmas` descending and ending with 0 (sampling/schedules.py).
They return the final x0 and call `callback({"i", "sigma", "sigma_next", "x", "denoised"})` after each step, so
a caller can stream previews. Nothing is kept between calls: one loaded model serves any number of requests.
"""

from __future__ import annotations

import torch

from ..core.registry import Registry
from .denoisers import denoise

SAMPLERS: Registry = Registry("sampler")


def _report(callback, i, sigmas, x, denoised):
    if callback is not None:
        callback({"i": i, "sigma": float(sigmas[i]), "sigma_next": float(sigmas[i + 1]), "x": x,
                  "denoised": denoised})


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _abar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma**2)


@SAMPLERS.register("ddpm")
@torch.no_grad()
def sample_ddpm(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, guidance=0.0):
    """Ancestral sampling from the DDPM posterior q(x_{t-1} | x_t, x0_hat) (Ho et al. 2020, eq. 6-7), written for
    any pair of steps (abar_prev in place of abar_{t-1}); with every training step this is Ho et al.'s Alg. 2."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, s, cond, guidance)
        a_t, a_prev = _abar(s), _abar(s_next)
        alpha = a_t / a_prev
        xt = x * a_t.sqrt()  # the VP variable
        mean = (a_prev.sqrt() * (1 - alpha) / (1 - a_t)) * x0 + (alpha.sqrt() * (1 - a_prev) / (1 - a_t)) * xt
        if s_next > 0:
            var = (1 - a_prev) / (1 - a_t) * (1 - alpha)  # beta tilde
            mean = mean + var.sqrt() * _noise(x, generator)
        x = mean / a_prev.sqrt()
        _report(callback, i, sigmas, x, x0)
    return x


@SAMPLERS.register("ddim")
@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, guidance=0.0, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z with
    s = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); eta = 0 is deterministic, eta = 1
    matches DDPM's posterior variance."""
    if not 0 <= eta <= 1:
        raise ValueError(f"eta={eta} must be in [0, 1]")
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, s, cond, guidance)
        if s_next == 0:
            x = x0
        else:
            eps = (x - x0) / s
            a_t, a_prev = _abar(s), _abar(s_next)
            std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            x_vp = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
            if eta > 0:
                x_vp = x_vp + std * _noise(x, generator)
            x = x_vp / a_prev.sqrt()
        _report(callback, i, sigmas, x, x0)
    return x


@SAMPLERS.register("euler")
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, guidance=0.0):
    """Euler steps on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 1
    without the second-order correction)."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, s, cond, guidance)
        x = x + (x - x0) / s * (s_next - s)
        _report(callback, i, sigmas, x, x0)
    return x


@SAMPLERS.register("heun")
@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, guidance=0.0):
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1, S_churn = 0); the last
    step to sigma = 0 is an Euler step. Two denoiser calls per step but the last."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, s, cond, guidance)
        d = (x - x0) / s
        x_euler = x + d * (s_next - s)
        if s_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(denoiser, x_euler, s_next, cond, guidance)) / s_next
            x = x + (d + d_next) / 2 * (s_next - s)
        _report(callback, i, sigmas, x, x0)
    return x


@SAMPLERS.register("dpmpp_2m")
@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None, cond=None, guidance=0.0):
    """DPM-Solver++(2M), the multistep second-order solver in data prediction (Lu et al. 2022, Alg. 2), in
    lambda = -log sigma; the first step is first order (= DDIM) and the last jumps to the final x0."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(denoiser, x, s, cond, guidance)
        if s_next == 0:
            x = x0
        else:
            h = s.log() - s_next.log()  # lambda_next - lambda
            d = x0
            if old is not None:
                r = (sigmas[i - 1].log() - s.log()) / h  # h_last / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
            x = (s_next / s) * x - torch.expm1(-h) * d
        old = x0
        _report(callback, i, sigmas, x, x0)
    return x


def run_sampler(name: str, denoiser, x, sigmas, **kw):
    """The sampler called `name` (unknown names list the known ones)."""
    return SAMPLERS.get(name)(denoiser, x, sigmas, **kw)


class _KeepKnown:
    """A denoiser that knows part of the image: the sampler's state is replaced in the known region by a fresh
    forward-noised copy of the known pixels before each call (Lugmayr et al. 2022, eq. 8), and the known pixels
    are returned as their own x0."""

    def __init__(self, denoiser, known: torch.Tensor, keep: torch.Tensor, generator):
        self.denoiser, self.known, self.keep, self.generator = denoiser, known, keep, generator
        self.null_cond = getattr(denoiser, "null_cond", None)

    def __call__(self, x, sigma, cond=None):
        reps = x.shape[0] // self.known.shape[0]  # 2 when guidance batches both branches
        known, keep = self.known.repeat(reps, 1, 1, 1), self.keep.repeat(reps, 1, 1, 1)
        noisy = self.known + sigma * _noise(self.known, self.generator)
        x = keep * noisy.repeat(reps, 1, 1, 1) + (1 - keep) * x
        return keep * known + (1 - keep) * self.denoiser(x, sigma, cond)


@torch.no_grad()
def inpaint(denoiser, known: torch.Tensor, keep: torch.Tensor, x: torch.Tensor, sigmas: torch.Tensor, *,
            sampler: str = "ddpm", resample: int = 1, generator=None, callback=None, cond=None, guidance=0.0):
    """Fill in the pixels where `keep` is 0, keeping those where it is 1 (known (B, C, H, W) in [-1, 1]; keep
    (B, 1 or C, H, W) in {0, 1}; x the starting noise). Each step replaces the known region by the noised known
    image (the replacement method); `resample` > 1 repeats each step after noising back to the previous sigma,
    RePaint's resampling with jump length 1 (Lugmayr et al. 2022, Alg. 1), which harmonises the two regions.
    The sampler runs one step at a time, so multistep samplers act as their first-order form here."""
    if resample < 1:
        raise ValueError(f"resample={resample} must be >= 1")
    keep = keep.to(known.dtype).expand_as(known)
    step = SAMPLERS.get(sampler)
    D = _KeepKnown(denoiser, known, keep, generator)
    for i in range(len(sigmas) - 1):
        pair = sigmas[i : i + 2]
        for u in range(resample):
            last = {}
            x = step(D, x, pair, generator=generator, cond=cond, guidance=guidance, callback=last.update)
            if u < resample - 1:
                x = x + (pair[0] ** 2 - pair[1] ** 2).sqrt() * _noise(x, generator)
        _report(callback, i, sigmas, x, last["denoised"])
    return keep * known + (1 - keep) * x


class Trajectory:
    """A sampler `callback` that records the denoising path of the first `rows` images: after sampling, `images()`
    gives for each image one row of its noisy states x_t (VP scale) and one row of the model's x0 estimates at
    `frames` evenly spaced steps (the last step included), as uint8 (2 rows frames, C, H, W)."""

    def __init__(self, rows: int = 4, frames: int = 8):
        if rows < 1 or frames < 2:
            raise ValueError(f"a trajectory needs rows >= 1 and frames >= 2; got rows={rows}, frames={frames}")
        self.rows, self.frames = rows, frames
        self._x: list[torch.Tensor] = []
        self._x0: list[torch.Tensor] = []

    def __call__(self, info: dict) -> None:
        self._x.append(info["x"][: self.rows] / (1 + info["sigma_next"] ** 2) ** 0.5)
        self._x0.append(info["denoised"][: self.rows])

    def images(self) -> torch.Tensor:
        from ..nn.likelihoods import from_symmetric

        if not self._x:
            raise ValueError("the trajectory is empty: pass it as callback= to a sampler first")
        n = len(self._x)
        idx = torch.linspace(0, n - 1, min(self.frames, n)).round().long().tolist()
        xs, x0s = torch.stack([self._x[i] for i in idx], 1), torch.stack([self._x0[i] for i in idx], 1)  # (R, F, ..)
        rows = torch.stack([xs, x0s], 1).flatten(0, 2)  # image 0: noisy row, x0 row; image 1: ...
        return from_symmetric(rows)
