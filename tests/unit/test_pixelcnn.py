"""Gated PixelCNN: causality without a blind spot, normalised likelihoods, row-cropped and cached computation
equal to the full one, reproducible and label-dependent sampling, config checks."""

from __future__ import annotations

import math

import pytest
import torch

import genlab.models.pixelcnn  # noqa: F401  (registration)
from genlab.core.errors import ConfigError
from genlab.models import build_config, build_model

S = 8


def _model(seed=0, **kw):
    cfg = build_config({"family": "pixelcnn", "preset": "tiny", "image_size": S, **kw})
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():  # larger random weights, so that every path is clearly non-zero
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def _images(n=4, c=1, seed=0):
    return torch.randint(0, 256, (n, c, S, S), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _grad_map(m, i, j, c=1, y=None):
    """|d params(i, j) / d input| summed over the batch and the image channels: (S, S)."""
    x = _images(2, c)
    inp = m._input(x).requires_grad_(True)
    out = m.net(inp, y)  # (2, P, S, S)
    out[:, :, i, j].sum().backward()
    return inp.grad.abs().sum(dim=(0, 1))  # all input channels, the channel of ones included


@pytest.mark.parametrize("kw", [{}, {"channels": 3}, {"output": "softmax"},
                                {"conditional": True, "num_classes": 3}])
def test_causal_and_no_blind_spot(kw):
    m = _model(**kw)
    c = m.config.channels
    y = torch.tensor([0, 2]) if m.config.conditional else None
    n_layers, r = m.config.n_layers, m.config.kernel // 2
    for i, j in [(0, 0), (3, 4), (4, 1), (S - 1, S - 1), (5, S - 1)]:
        g = _grad_map(m, i, j, c, y)
        raster = torch.arange(S * S).view(S, S)
        future = raster >= i * S + j
        assert g[future].abs().max() == 0, (i, j)  # nothing at or after (i, j) in raster order
        if (i, j) != (0, 0):
            assert g[~future].sum() > 0
        if i >= 1:
            # no blind spot: the whole up-right cone within reach of the stacks influences (i, j)
            assert g[i - 1, min(j + 1, S - 1)] > 0
            for col in range(max(j - n_layers * r, 0), min(j + n_layers * r, S - 1) + 1):
                assert g[i - 1, col] > 0, (i, j, col)
        if j >= 1:
            assert g[i, j - 1] > 0


@pytest.mark.parametrize("kw", [{"output": "softmax"}, {"output": "softmax", "channels": 3}, {},
                                {"channels": 3}])
def test_the_256_values_of_a_sub_pixel_sum_to_one(kw):
    m = _model(**kw)
    C = m.config.channels
    x = _images(1, C).repeat(256, 1, 1, 1)
    i, j, ch = 3, 5, C - 1  # the last channel: for RGB mixtures it is conditioned on R and G of the pixel
    x[:, ch, i, j] = torch.arange(256, dtype=torch.uint8)
    with torch.no_grad():
        lp = m._log_prob_params(x, m(x))[:, ch, i, j]  # (256,) log p(value | context)
    assert abs(float(torch.logsumexp(lp.double(), 0))) < 1e-4
    if C == 3 and m.config.output == "logistic_mixture":  # and G depends on R through the mixture means
        x2 = x.clone()
        x2[:, 0, i, j] ^= 128
        with torch.no_grad():
            lp2 = m._log_prob_params(x2, m(x2))[:, ch, i, j]
        assert not torch.allclose(lp, lp2)


def test_log_prob_is_the_loss_and_finite():
    for kw in ({}, {"output": "softmax"}, {"channels": 3}):
        m = _model(**kw)
        x = _images(3, m.config.channels)
        x[0] = 0
        x[1] = 255
        with torch.no_grad():
            lp = m.log_prob(x)
            out = m.loss((x, torch.full((3,), -1)))
        assert lp.shape == (3,) and torch.isfinite(lp).all() and (lp < 0).all()
        assert torch.allclose(-lp.mean() / x[0].numel(), out.loss, rtol=1e-6)
        assert math.isclose(out.metrics["bits_per_dim"], float(out.loss) / math.log(2), rel_tol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"channels": 3, "output": "softmax"}, {"conditional": True, "num_classes": 3}])
def test_cropped_rows_equal_the_full_computation(kw):
    m = _model(**kw)
    x = _images(3, m.config.channels)
    y = torch.tensor([0, 1, 2]) if m.config.conditional else None
    with torch.no_grad():
        full = m(x, y)
        for rows in (1, 3, S - 1):
            torch.testing.assert_close(m(x[:, :, :rows], y), full[:, :, :rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"channels": 3}, {"output": "softmax"}, {"channels": 3, "output": "softmax"},
                                {"conditional": True, "num_classes": 3}])
def test_cached_sampling_equals_the_cropped_reference(kw):
    m = _model(**kw)
    g = lambda: torch.Generator().manual_seed(7)
    labels = torch.tensor([0, 1, 2]) if m.config.conditional else None
    a = m.sample(3, generator=g(), labels=labels)
    b = m.sample(3, generator=g(), labels=labels, cache=False)
    assert a.dtype == torch.uint8 and a.shape == (3, m.config.channels, S, S)
    assert torch.equal(a, b)
    assert a.float().std() > 0


def test_sampling_reproducible_temperature_and_mode_restored():
    m = _model().train()
    g = lambda s: torch.Generator().manual_seed(s)
    a, b, c = m.sample(2, generator=g(1)), m.sample(2, generator=g(1)), m.sample(2, generator=g(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert m.training
    assert torch.equal(m.sample(2, generator=g(1), temperature=0), m.sample(2, generator=g(2), temperature=0))
    s = _model(output="softmax")
    assert torch.equal(s.sample(2, generator=g(1), temperature=0), s.sample(2, generator=g(2), temperature=0))


def test_conditional_samples_depend_on_labels():
    m = _model(conditional=True, num_classes=3)
    g = lambda: torch.Generator().manual_seed(3)
    a = m.sample(2, generator=g(), labels=torch.tensor([0, 0]))
    b = m.sample(2, generator=g(), labels=torch.tensor([2, 2]))
    assert not torch.equal(a, b)
    assert torch.equal(m.sample(3, generator=g()), m.sample(3, generator=g(), labels=torch.tensor([0, 1, 2])))
    with pytest.raises(ConfigError):
        m.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ConfigError):
        m.log_prob(_images(2))  # a conditional model needs y
    with pytest.raises(ConfigError):
        _model().sample(2, labels=torch.tensor([0, 1]))


def test_training_lowers_the_loss():
    cfg = build_config({"family": "pixelcnn", "preset": "tiny", "image_size": S})
    torch.manual_seed(0)
    m = build_model(cfg)
    x = _images(8)
    x[:, :, :, : S // 2] = 0  # something to learn
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    first = float(m.loss((x, torch.full((8,), -1))).loss.detach())
    for _ in range(30):
        loss = m.loss((x, torch.full((8,), -1))).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert float(loss.detach()) < first - 0.3


@pytest.mark.parametrize("bad", [{"channels": 2}, {"image_size": 0}, {"num_classes": -1},
                                 {"conditional": True, "num_classes": 0}, {"output": "gaussian"}, {"n_mix": 0},
                                 {"n_layers": 0}, {"hidden": 0}, {"head_hidden": 0}, {"kernel": 4},
                                 {"kernel": 1}])
def test_bad_config_raises(bad):
    with pytest.raises(ConfigError):
        build_config({"family": "pixelcnn", "preset": "tiny", **bad})


def test_presets():
    tiny = build_model(build_config({"family": "pixelcnn", "preset": "tiny"}))
    assert 1_000 <= tiny.num_params() <= 50_000
    default = build_model(build_config({"family": "pixelcnn", "preset": "default"}))
    assert default.num_params() > tiny.num_params()
