"""Schedules, the denoiser contract and every sampler against closed forms (DESIGN.md 6).

For Gaussian data x0 ~ N(0, v) the exact denoiser is D(x, s) = x v / (v + s^2); a correct sampler started from
the prior lands on samples of variance v."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genlab.core.errors import ConfigError
from genlab.sampling import diffusion as S
from genlab.sampling.denoisers import PREDICTIONS, Denoiser, classifier_free_guidance, denoise
from genlab.sampling.schedules import alphas_cumprod, karras_sigmas, model_sigmas, sampling_sigmas, vp_sigmas

V = 0.25  # data variance
TRAIN_SIGMAS = vp_sigmas(alphas_cumprod("linear", 1000))


def gaussian_denoiser(x, sigma, cond=None):
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return x * V / (V + sigma**2)


def prior(n, sigmas, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1, 1, generator=g) * (1 + sigmas[0] ** 2).sqrt()


CASES = [("ddpm", "model", 1000), ("ddim", "model", 200), ("euler", "karras", 120), ("heun", "karras", 40),
         ("dpmpp_2m", "karras", 40), ("dpmpp_2m", "model", 160), ("ddim", "karras", 120)]


@pytest.mark.parametrize(("sampler", "schedule", "steps"), CASES, ids=[f"{a}-{b}-{c}" for a, b, c in CASES])
def test_sampler_lands_on_the_data_variance(sampler, schedule, steps):
    sigmas = sampling_sigmas(schedule, TRAIN_SIGMAS, steps)
    x = S.run_sampler(sampler, gaussian_denoiser, prior(20_000, sigmas), sigmas,
                      generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(x).all()
    assert float(x.var()) == pytest.approx(V, rel=0.05)
    assert abs(float(x.mean())) < 0.02


@pytest.mark.parametrize(("sampler", "order"), [("euler", 1), ("ddim", 1), ("heun", 2), ("dpmpp_2m", 2)])
def test_deterministic_samplers_converge_at_their_order(sampler, order):
    """Doubling the steps divides the final variance error by about 2^order (float64, one exact trajectory)."""

    def error(steps):
        sigmas = karras_sigmas(TRAIN_SIGMAS, steps).double()
        x = torch.ones(1, dtype=torch.float64) * (V + sigmas[0] ** 2).sqrt()  # x(s) = sqrt(V + s^2) exactly
        return abs(float(S.run_sampler(sampler, gaussian_denoiser, x, sigmas) ** 2) - V)

    ratio = error(40) / error(80)
    assert 2**order * 0.8 < ratio < 2**order * 1.3, ratio


def test_ddim_matches_its_closed_form_on_gaussian_data():
    """With D linear, one DDIM step maps x to x (v + s s') / (v + s^2): the whole run is one known factor."""
    sigmas = sampling_sigmas("model", TRAIN_SIGMAS, 50).double()
    x = prior(10, sigmas).double()
    out = S.sample_ddim(gaussian_denoiser, x, sigmas)
    factor = torch.prod((V + sigmas[:-1] * sigmas[1:]) / (V + sigmas[:-1] ** 2))
    assert torch.allclose(out, x * factor, rtol=1e-9)


def test_ddim_with_eta_one_is_stochastic_and_lands_on_the_variance():
    sigmas = sampling_sigmas("model", TRAIN_SIGMAS, 500)
    g = lambda: torch.Generator().manual_seed(3)
    a = S.sample_ddim(gaussian_denoiser, prior(20_000, sigmas), sigmas, generator=g(), eta=1.0)
    b = S.sample_ddim(gaussian_denoiser, prior(20_000, sigmas), sigmas, generator=g(), eta=0.0)
    assert float(a.var()) == pytest.approx(V, rel=0.05) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="eta"):
        S.sample_ddim(gaussian_denoiser, prior(4, sigmas), sigmas, eta=2.0)


def test_callback_streams_every_step():
    sigmas = karras_sigmas(TRAIN_SIGMAS, 7)
    seen = []
    S.sample_euler(gaussian_denoiser, prior(8, sigmas), sigmas, callback=seen.append)
    assert [d["i"] for d in seen] == list(range(7)) and seen[-1]["sigma_next"] == 0
    assert seen[0]["denoised"].shape == (8, 1, 1, 1)


def test_schedules():
    abar = alphas_cumprod("linear", 1000)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    assert float(betas[0]) == pytest.approx(1e-4) and float(betas[-1]) == pytest.approx(0.02)
    cos = alphas_cumprod("cosine", 1000)
    assert (cos[1:] < cos[:-1]).all() and 0 < float(cos[-1]) < 1e-3
    k = karras_sigmas(TRAIN_SIGMAS, 10)
    assert len(k) == 11 and k[-1] == 0 and (k[1:] < k[:-1]).all()
    assert float(k[0]) == pytest.approx(float(TRAIN_SIGMAS.max()), rel=1e-5)
    assert float(k[-2]) == pytest.approx(float(TRAIN_SIGMAS.min()), rel=1e-4)
    m = model_sigmas(TRAIN_SIGMAS, 1000)
    assert torch.allclose(m[:-1].double(), TRAIN_SIGMAS.flip(0), rtol=1e-6)
    with pytest.raises(ConfigError, match="steps=1001"):
        model_sigmas(TRAIN_SIGMAS, 1001)
    with pytest.raises(ConfigError, match="steps=0"):
        karras_sigmas(TRAIN_SIGMAS, 0)
    with pytest.raises(ConfigError, match="known: karras, model"):
        sampling_sigmas("exponential", TRAIN_SIGMAS, 10)
    with pytest.raises(ConfigError, match="known: .*dpmpp_2m.*euler"):
        S.run_sampler("plms", gaussian_denoiser, torch.zeros(1), torch.zeros(2))


class PointMassNet(nn.Module):
    """The exact network for data that is always X0: it predicts eps, v or x0 exactly from (x_t, t)."""

    def __init__(self, abar, prediction):
        super().__init__()
        self.abar, self.prediction = abar.float(), prediction

    def forward(self, xt, t, y=None):
        lo = t.floor().long().clamp(max=len(self.abar) - 2)
        w = (t - lo).float()
        # the model's abar at fractional t, from the same log-sigma interpolation the denoiser uses
        ls = ((1 - self.abar) / self.abar).sqrt().log()
        sig = (ls[lo] * (1 - w) + ls[lo + 1] * w).exp()
        a = (1 / (1 + sig**2)).sqrt().view(-1, 1, 1, 1)
        s = (sig.view(-1, 1, 1, 1)) * a
        eps = (xt - a * X0) / s
        return {"eps": eps, "v": a * eps - s * X0, "x0": X0.expand_as(xt)}[self.prediction]


X0 = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)


@pytest.mark.parametrize("prediction", PREDICTIONS.names())
def test_every_parameterization_gives_the_same_x0(prediction):
    abar = alphas_cumprod("cosine", 200)
    D = Denoiser(PointMassNet(abar, prediction), abar, prediction)
    for sigma in (0.05, 0.7, 3.0, 40.0):
        x = X0 + sigma * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(D(x, sigma), X0.expand(3, -1, -1, -1), atol=2e-3 * max(1.0, sigma))
    assert float(D.loss(X0.expand(5, -1, -1, -1)).max()) < 1e-6  # the exact network has zero loss
    t = D.sigma_to_t(D.sigmas[[0, 17, 199]])
    assert torch.allclose(t, torch.tensor([0.0, 17.0, 199.0]), atol=1e-3)


def test_guidance_identity_and_formula():
    class Cond(nn.Module):
        null_label = 3

        def forward(self, x, sigma, cond):
            return x * 0 + cond.float().view(-1, 1, 1, 1)  # the class id as the "image"

        def null_cond(self, cond):
            return torch.full_like(cond, self.null_label)

    D = Cond()
    x, y = torch.randn(2, 1, 2, 2), torch.tensor([1, 2])
    assert torch.equal(denoise(D, x, 1.0, y, guidance=0.0), D(x, 1.0, y))  # w = 0: exactly the conditional path
    assert torch.allclose(denoise(D, x, 1.0, y, guidance=-1.0), D(x, 1.0, torch.tensor([3, 3])))  # unconditional
    assert torch.allclose(denoise(D, x, 1.0, y, guidance=2.0), classifier_free_guidance(D(x, 1.0, y),
                                                                                          D(x, 1.0, D.null_cond(y)),
                                                                                          2.0))
    assert float(denoise(D, x, 1.0, y, guidance=2.0)[0, 0, 0, 0]) == pytest.approx(1 + 2 * (1 - 3))


def test_inpaint_keeps_the_known_pixels_and_fills_the_rest_from_the_data():
    sigmas = sampling_sigmas("model", TRAIN_SIGMAS, 50)
    known = torch.full((64, 1, 4, 4), 0.5)
    keep = torch.zeros(64, 1, 4, 4)
    keep[..., :2, :] = 1
    x = S.inpaint(gaussian_denoiser, known, keep, prior(64, sigmas).expand(-1, 1, 4, 4).clone(), sigmas,
                  sampler="ddim", resample=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[..., :2, :], known[..., :2, :])
    assert not torch.allclose(x[..., 2:, :], known[..., 2:, :])
    with pytest.raises(ValueError, match="resample"):
        S.inpaint(gaussian_denoiser, known, keep, known, sigmas, resample=0)


def test_clipped_denoiser_keeps_x0_in_the_pixel_range():
    from genlab.sampling.denoisers import ClippedDenoiser

    class Wild:
        def __call__(self, x, sigma, cond=None):
            return x * 10

        def null_cond(self, cond):
            return cond * 0

    D = ClippedDenoiser(Wild())
    x = torch.linspace(-1, 1, 9)
    assert torch.equal(D(x, 1.0), (x * 10).clamp(-1, 1)) and D.null_cond(torch.tensor([2])).item() == 0
