"""The VAE family (models/vae.py): the bound and its IWAE tightening, the eval loss as the honest negative ELBO,
proper 8-bit likelihoods, the KL warm-up, reconstructions, interpolations, samples, conditioning, config checks."""

from __future__ import annotations

import math

import pytest
import torch

import genlab.models.vae  # noqa: F401  (registration)
from genlab.core.errors import ConfigError
from genlab.models import build_config, build_model
from genlab.models.vae import discretized_gaussian_log_prob
from genlab.nn.likelihoods import discretized_logistic_mixture_log_prob

torch.set_num_threads(1)
DECODERS = ["logistic", "gaussian", "bernoulli"]


def _model(size=8, channels=1, **kw):
    cfg = build_config({"family": "vae", "preset": "tiny", "channels": channels, "image_size": size,
                        "num_classes": 3, **kw})
    torch.manual_seed(0)
    return build_model(cfg)


def _batch(n=6, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    x[:, :, : size // 2] //= 4
    x[0, 0, 0, 0], x[0, 0, -1, -1] = 0, 255
    return x, torch.arange(n) % 3


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("size,channels", [(8, 1), (28, 1), (12, 3)])
def test_elbo_shape_finite_and_negative(decoder, size, channels):
    model = _model(size, channels, decoder=decoder).eval()
    x, _ = _batch(4, channels, size)
    for k in (1, 3):
        lb = model.elbo(x, k=k, generator=_gen(0))
        assert lb.shape == (4,) and torch.isfinite(lb).all() and (lb < 0).all()
    assert torch.equal(model.elbo(x, generator=_gen(1)), model.elbo(x, generator=_gen(1)))


@pytest.mark.parametrize("decoder", DECODERS)
def test_iwae_bound_is_tighter_than_the_elbo(decoder):
    model = _model(decoder=decoder).eval()
    x, _ = _batch(16)
    l1 = torch.stack([model.elbo(x, k=1, generator=_gen(s)) for s in range(8)]).mean()
    l8 = torch.stack([model.elbo(x, k=8, generator=_gen(100 + s)) for s in range(8)]).mean()
    assert l8 > l1
    # the importance samples may be decoded in chunks: the noise and so the bound do not depend on the chunking
    a = model.elbo(x, k=8, generator=_gen(3))
    b = model.elbo(x, k=8, generator=_gen(3), chunk_images=16 * 3)  # chunks of 3, 3 and 2 samples
    assert torch.allclose(a, b, rtol=0, atol=1e-3)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("conditional", [False, True])
def test_eval_loss_is_the_negative_elbo_per_dim_with_the_same_noise(decoder, conditional):
    model = _model(decoder=decoder, conditional=conditional, beta=3.0, kl_warmup_steps=100)
    model.set_train_step(10)
    model.eval()
    x, y = _batch()
    torch.manual_seed(5)  # the loss draws its latent noise from the global RNG ...
    out = model.loss((x, y))
    lb = model.elbo(x, y=y if conditional else None, generator=_gen(5))  # ... elbo from the generator
    D = x[0].numel()
    assert math.isclose(float(out.loss.detach()), float(-lb.mean() / D), rel_tol=1e-5)
    assert out.metrics["kl_weight"] == 1.0  # eval: beta 1, no warm-up
    assert math.isclose(out.metrics["recon"] + out.metrics["kl"], out.loss.item(), rel_tol=1e-5)


@pytest.mark.parametrize("decoder", ["logistic", "gaussian"])
def test_eight_bit_likelihoods_sum_to_one_over_the_256_values(decoder):
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(5, 1, 1, 256)
    g = _gen(0)
    means = (torch.rand(5, 1, 1, 1, generator=g) * 2.4 - 1.2).expand(5, 1, 1, 256)  # some outside [-1, 1]
    log_scales = torch.tensor([-6.0, -3.0, -1.0, 0.0, 2.0]).view(5, 1, 1, 1).expand(5, 1, 1, 256)
    if decoder == "gaussian":
        lp = discretized_gaussian_log_prob(x, means, log_scales)
    else:
        logits = torch.randn(5, 3, 1, 1, 1, generator=g).expand(5, 3, 1, 1, 256)
        k_means = means.unsqueeze(1) + torch.tensor([-0.3, 0.0, 0.4]).view(1, 3, 1, 1, 1)
        lp = discretized_logistic_mixture_log_prob(x, logits, k_means, log_scales.unsqueeze(1).expand(5, 3, 1, 1, 256))
    assert torch.isfinite(lp).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5, 1, 1), atol=1e-5)


def test_discretized_gaussian_matches_the_cdf_and_has_finite_gradients():
    x = torch.tensor([[[[0, 1, 100, 128, 200, 254, 255]]]], dtype=torch.uint8)
    means = torch.tensor([[[[-1.0, 0.9, -0.5, 0.0, 0.5, 0.99, 1.3]]]], requires_grad=True)
    log_scales = torch.tensor([[[[-3.0, -8.0, 0.5, -2.0, -5.0, -1.0, -4.0]]]], requires_grad=True)
    lp = discretized_gaussian_log_prob(x, means, log_scales)
    xs, m, s = x.double() / 127.5 - 1, means.detach().double(), log_scales.detach().double().clamp(min=-7).exp()
    N = torch.distributions.Normal(m, s)
    hi = torch.where(x == 255, torch.ones_like(xs), N.cdf(xs + 1 / 255))
    lo = torch.where(x == 0, torch.zeros_like(xs), N.cdf(xs - 1 / 255))
    ref = torch.log((hi - lo).clamp(min=1e-300))
    ok = ref > -30  # where float64 CDF differences are still accurate
    assert torch.allclose(lp.double()[ok], ref[ok], atol=1e-4)
    lp.sum().backward()
    assert torch.isfinite(means.grad).all() and torch.isfinite(log_scales.grad).all()


def test_bernoulli_says_its_bound_is_for_binarized_data():
    assert not _model(decoder="bernoulli").is_8bit_likelihood
    assert "binarized" in _model(decoder="bernoulli").likelihood_note
    assert _model().is_8bit_likelihood and "8-bit" in _model().likelihood_note


def test_kl_warmup_follows_set_train_step():
    model = _model(beta=2.0, kl_warmup_steps=100).train()
    x, y = _batch()
    for step, w in [(0, 0.0), (25, 0.5), (50, 1.0), (100, 2.0), (1000, 2.0)]:
        model.set_train_step(step)
        assert model.loss((x, y)).metrics["kl_weight"] == pytest.approx(w)
    no_warmup = _model(beta=0.5)
    no_warmup.set_train_step(0)
    assert no_warmup.loss((x, y)).metrics["kl_weight"] == 0.5
    # the training loss is recon + weight * kl
    model.set_train_step(25)
    torch.manual_seed(1)
    out = model.loss((x, y))
    assert out.loss.item() == pytest.approx(out.metrics["recon"] + 0.5 * out.metrics["kl"], rel=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_reconstruct_and_interpolate(decoder):
    model = _model(decoder=decoder)
    model.train()
    x, _ = _batch(4)
    r = model.reconstruct(x)
    assert r.dtype == torch.uint8 and r.shape == x.shape and model.training
    path = model.interpolate(x[1], x[2][None], steps=5)
    assert path.dtype == torch.uint8 and path.shape == (5, 1, 8, 8)
    assert torch.equal(path[0], model.reconstruct(x[1:2])[0])
    assert torch.equal(path[-1], model.reconstruct(x[2:3])[0])
    with pytest.raises(ValueError):
        model.interpolate(x[:2], x[2], steps=5)


@pytest.mark.parametrize("decoder", DECODERS)
def test_sample_controls(decoder):
    model = _model(decoder=decoder)
    a = model.sample(4, generator=_gen(1))
    assert a.dtype == torch.uint8 and a.shape == (4, 1, 8, 8)
    assert torch.equal(a, model.sample(4, generator=_gen(1)))
    noisy = model.sample(4, generator=_gen(1), mean=False)
    assert noisy.shape == (4, 1, 8, 8) and torch.equal(noisy, model.sample(4, generator=_gen(1), mean=False))
    # temperature 0: every sample is the decoded prior mean
    t0 = model.sample(3, generator=_gen(2), temperature=0.0)
    assert torch.equal(t0[0], t0[1]) and torch.equal(t0[1], t0[2])
    with pytest.raises(ConfigError):
        model.sample(2, temperature=-1.0)


def test_conditional_model():
    model = _model(conditional=True)
    x, y = _batch()
    out = model.loss((x, y))
    out.loss.backward()
    assert model.y_emb.weight.grad.abs().sum() > 0
    model.eval()
    assert model.elbo(x, y=y, k=4, generator=_gen(0)).shape == (6,)
    assert model.reconstruct(x, y).shape == x.shape
    assert model.interpolate(x[0], x[1], steps=3, y=torch.tensor(1)).shape == (3, 1, 8, 8)
    a = model.sample(3, generator=_gen(0), labels=torch.tensor([0, 0, 0]))
    b = model.sample(3, generator=_gen(0), labels=torch.tensor([2, 2, 2]))
    assert not torch.equal(a, b)
    assert model.sample(4, generator=_gen(0)).shape == (4, 1, 8, 8)  # default labels cycle the classes
    with pytest.raises(ConfigError):
        model.elbo(x)  # a conditional model needs y
    with pytest.raises(ConfigError):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ConfigError):
        _model().sample(2, labels=torch.tensor([0, 1]))  # unconditional: no labels


def test_a_few_steps_lower_the_loss():
    model = _model(decoder="logistic")
    x = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 2:6, 2:6] = 200
    y = torch.zeros(8, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    torch.manual_seed(0)
    first = model.loss((x, y)).loss.item()
    for _ in range(80):
        loss = model.loss((x, y)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


@pytest.mark.parametrize("bad", [
    {"channels": 2}, {"image_size": 10}, {"image_size": -4}, {"image_size": 0},
    {"conditional": True, "num_classes": 0}, {"decoder": "poisson"}, {"n_mix": 0}, {"latent_dim": 0},
    {"hidden": -1}, {"n_res": -1}, {"beta": -0.1}, {"beta": float("nan")}, {"kl_warmup_steps": -5},
    {"class_dim": 0}, {"num_classes": -1}, {"beta": "one"},
])
def test_bad_config_values_raise(bad):
    with pytest.raises(ConfigError):
        build_config({"family": "vae", "preset": "tiny", **bad})


def test_presets():
    assert _model(8).num_params() < 50_000
    tiny = _model(28)
    assert tiny.num_params() < 50_000
    default = build_model(build_config({"family": "vae", "preset": "default", "image_size": 28}))
    assert default.config.decoder == "logistic" and default.num_params() > tiny.num_params()
