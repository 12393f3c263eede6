"""The multi-scale flow (RealNVP / Glow): an exact bijection whose closed-form log-determinant equals the brute-force
Jacobian's, actnorm initialised once (and never again after a reload), Glow's temperature, class conditioning."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_model, save_model

import genlab.models.flow  # noqa: F401  (registration)
from genlab.core.errors import ConfigError
from genlab.models import build_config, build_model
from genlab.models.flow import ActNorm, Flow, FlowConfig


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(size=8, channels=1, seed=0, **kw) -> Flow:
    cfg = build_config({"family": "flow", "preset": "tiny", "image_size": size, "channels": channels, **kw})
    torch.manual_seed(seed)
    return build_model(cfg)


def _images(n=8, channels=1, size=8, seed=0):
    x = torch.randint(0, 256, (n, channels, size, size), generator=g(seed), dtype=torch.uint8)
    x[:, :, : size // 2] //= 8  # some structure, so that training moves the weights somewhere
    return x, torch.arange(n) % 3


def _train(model: Flow, x, y, steps=5, lr=1e-2):
    """A few updates, so that actnorm, the 1x1 convolutions and the couplings are far from the identity."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        model.loss((x, y)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _actnorms(model):
    return [m for m in model.modules() if isinstance(m, ActNorm)]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"channels": 3},
        {"n_levels": 1},
        {"n_levels": 3},
        {"coupling": "additive", "preprocess": "center"},
        {"conditional": True, "num_classes": 3},
    ],
    ids=["gray", "rgb", "1-level", "3-levels", "additive-center", "conditional"],
)
def test_inverse_of_forward_is_the_identity_after_training(kw):
    model = _model(**kw)
    c = model.config.channels
    x, y = _images(channels=c)
    _train(model, x, y)
    an = _actnorms(model)[0]
    assert bool(an.initialized) and an.scale_and_shift()[0].abs().max() > 0.05  # not the identity any more
    labels = y[:4] if model.config.conditional else None
    x_cont = 2 * torch.randn(4, c, 8, 8, generator=g(1))
    with torch.no_grad():
        eps, logdet = model(x_cont, labels)
        back = model.inverse(eps, labels)
    assert [tuple(e.shape[1:]) for e in eps] == model.latent_shapes()
    assert sum(e[0].numel() for e in eps) == c * 64 and logdet.shape == (4,)
    assert (back - x_cont).abs().max() < 1e-4


@pytest.mark.parametrize(
    "kw",
    [{}, {"coupling": "additive", "preprocess": "center"}, {"conditional": True, "num_classes": 3}],
    ids=["affine-logit", "additive-center", "conditional"],
)
def test_log_prob_equals_the_brute_force_jacobian(kw):
    """log P(x) = log N(eps(y); 0, I) + log |det d eps / d y| - D log 256 with the Jacobian of the whole map
    y -> eps (preprocessing and flow) computed by autograd on a 1x4x4 image: the closed-form log-dets agree."""
    model = _model(size=4, **kw)
    x, y = _images(n=6, size=4)
    _train(model, x, y)
    with torch.no_grad():  # move every weight, the near-zero last layers included, off its initial value
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g(2)))
    cfg = model.config
    labels = y[:1] if cfg.conditional else None
    u = torch.rand((1, 1, 4, 4), generator=g(3))
    y_cont = (
        (x[:1].float() + u) / 256
    ).flatten()  # the same dequantization noise as log_prob(generator=g(3))

    def to_eps(yf):  # (16,) -> (16,)
        yy = yf.view(1, 1, 4, 4)
        if cfg.preprocess == "logit":
            p = cfg.logit_alpha + (1 - 2 * cfg.logit_alpha) * yy
            w = torch.log(p) - torch.log1p(-p)
        else:
            w = yy - 0.5
        eps, _ = model(w, labels)
        return torch.cat([e.flatten() for e in eps])

    jac = torch.autograd.functional.jacobian(to_eps, y_cont)  # (16, 16)
    sign, logabsdet = torch.linalg.slogdet(jac.double())
    eps = to_eps(y_cont).detach().double()
    ref = -0.5 * (eps**2 + math.log(2 * math.pi)).sum() + logabsdet - 16 * math.log(256)
    with torch.no_grad():
        lp = model.log_prob(x[:1], y=labels, generator=g(3))
        w = model.preprocess(x[:1], g(3))[0]
        _, logdet = model(w, labels)
    assert sign != 0
    assert abs(float(lp[0]) - float(ref)) < 1e-3
    # the flow's own log-det against the Jacobian of the flow alone (x_cont -> eps)
    jac_flow = torch.autograd.functional.jacobian(
        lambda wf: torch.cat([e.flatten() for e in model(wf.view(1, 1, 4, 4), labels)[0]]), w.flatten()
    )
    assert abs(float(torch.linalg.slogdet(jac_flow.double())[1]) - float(logdet[0])) < 1e-3


def test_actnorm_initialises_once_and_survives_save_load(tmp_path):
    model = _model(conditional=True, num_classes=3)
    x, y = _images()
    assert not any(bool(a.initialized) for a in _actnorms(model))
    with torch.no_grad():  # eval mode on a fresh model: no data-dependent init, deterministic
        model.eval()
        lp0 = model.log_prob(x, y=y, generator=g(0))
        assert torch.equal(lp0, model.log_prob(x, y=y, generator=g(0)))
    assert not any(bool(a.initialized) for a in _actnorms(model))

    model.train()
    model.loss((x, y))  # the first training forward initialises
    assert all(bool(a.initialized) for a in _actnorms(model))
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    model.loss((255 - x, y))  # another, very different batch: no second init
    assert all(torch.equal(init_state[k], v) for k, v in model.state_dict().items())

    _train(model, x, y, steps=3)
    path = tmp_path / "flow.safetensors"
    save_model(model, str(path))
    again = _model(conditional=True, num_classes=3, seed=1)
    load_model(again, str(path))
    assert all(bool(a.initialized) for a in _actnorms(again))
    with torch.no_grad():
        ref = model.log_prob(x, y=y, generator=g(4))
        assert torch.equal(ref, again.log_prob(x, y=y, generator=g(4)))
    saved = {k: v.clone() for k, v in again.state_dict().items()}
    again.train()
    again.loss((255 - x, y))  # a loaded (or resumed) model never re-initialises
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())
    assert torch.equal(
        model.sample(3, generator=g(5), labels=y[:3]), again.sample(3, generator=g(5), labels=y[:3])
    )


def test_the_init_lives_in_buffers_so_an_ema_copied_before_the_first_step_follows_it():
    """The trainer deep-copies the model for its EMA before the first step, then lerps the parameters and copies
    the buffers after each step: the copy must then equal the model (the init never writes to a parameter)."""
    model = _model()
    ema = copy.deepcopy(model).eval()
    x, y = _images()
    model.initialize((x, y))
    for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
        b_ema.copy_(b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.log_prob(x, generator=g(0)), ema.log_prob(x, generator=g(0)))


def test_initialize_runs_the_data_dependent_init_without_changing_the_mode():
    model = _model().eval()
    x, y = _images()
    model.initialize((x, y))
    assert not model.training and all(bool(a.initialized) for a in _actnorms(model))


def test_log_prob_is_reproducible_and_matches_the_loss():
    model = _train(_model(), *_images())
    x, y = _images(seed=1)
    with torch.no_grad():
        a, b = model.log_prob(x, generator=g(7)), model.log_prob(x, generator=g(7))
        c = model.log_prob(x, generator=g(8))
        torch.manual_seed(7)  # the loss draws from the global RNG: the same stream as g(7)
        loss = model.loss((x, y))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8,) and (a < 0).all()
    assert torch.allclose(loss.loss, -a.mean() / 64, rtol=1e-6)
    assert loss.metrics["bits_per_dim"] == pytest.approx(float(loss.loss) / math.log(2), rel=1e-6)


def test_temperature_zero_gives_the_prior_mean_and_scales_the_spread():
    model = _train(_model(), *_images())
    a = model.sample(3, generator=g(1), temperature=0.0)
    b = model.sample(3, generator=g(2), temperature=0.0)
    assert torch.equal(a, b) and torch.equal(a[0], a[1]) and torch.equal(a[0], a[2])
    hot = model.sample(64, generator=g(1), temperature=1.0).float().std(0).mean()
    cool = model.sample(64, generator=g(1), temperature=0.5).float().std(0).mean()
    assert cool < hot
    assert torch.equal(model.sample(4, generator=g(3)), model.sample(4, generator=g(3)))
    with pytest.raises(ValueError):
        model.sample(2, temperature=-1.0)


def test_conditional_model_uses_its_labels():
    model = _train(_model(conditional=True, num_classes=3), *_images())
    x, _ = _images(n=4)
    with torch.no_grad():
        lp0 = model.log_prob(x, y=torch.zeros(4, dtype=torch.long), generator=g(0))
        lp2 = model.log_prob(x, y=torch.full((4,), 2), generator=g(0))
    assert not torch.equal(lp0, lp2)
    s0 = model.sample(4, generator=g(1), labels=torch.zeros(4, dtype=torch.long), temperature=0.0)
    s2 = model.sample(4, generator=g(1), labels=torch.full((4,), 2), temperature=0.0)
    assert torch.equal(s0[0], s0[3]) and not torch.equal(s0, s2)
    assert model.sample(4, generator=g(1)).shape == (4, 1, 8, 8)  # default labels arange(n) % num_classes
    for bad in (None, torch.full((4,), 3), torch.zeros(3, dtype=torch.long)):
        with pytest.raises(ValueError):
            model.log_prob(x, y=bad)
    with pytest.raises(ValueError):
        model.loss((x, torch.full((4,), -1)))  # an unlabelled source cannot train a conditional flow
    with pytest.raises(ValueError):
        _model().log_prob(x, y=torch.zeros(4, dtype=torch.long))


def test_bf16_autocast_keeps_the_log_dets_in_fp32():
    model = _train(_model(), *_images())
    x, _ = _images(seed=2)
    with torch.no_grad():
        ref = model.log_prob(x, generator=g(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = model.log_prob(x, generator=g(0))
            eps, logdet = model(model.preprocess(x, g(0))[0])
    assert (
        lp.dtype == torch.float32
        and logdet.dtype == torch.float32
        and all(e.dtype == torch.float32 for e in eps)
    )
    assert torch.allclose(lp, ref, rtol=2e-2)


@pytest.mark.parametrize(
    "bad",
    [
        {"image_size": 28, "n_levels": 3},
        {"image_size": 6},
        {"image_size": 0},
        {"channels": 2},
        {"n_levels": 0},
        {"n_steps": 0},
        {"hidden": 0},
        {"coupling": "spline"},
        {"preprocess": "dither"},
        {"logit_alpha": 0.5},
        {"num_classes": -1},
        {"conditional": True, "num_classes": 0},
    ],
)
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ConfigError):
        build_config({"family": "flow", "preset": "tiny", **bad})
    with pytest.raises(ConfigError):
        Flow(FlowConfig(**{"n_steps": 1, "hidden": 4, "image_size": 8, **bad}))


def test_default_preset_size():
    cfg = build_config({"family": "flow", "preset": "default"})
    assert cfg.image_size == 28 and cfg.n_levels == 2
    assert 0.3e6 < build_model(cfg).num_params() < 3e6
    assert build_model(build_config({"family": "flow", "preset": "tiny"})).num_params() < 50_000
