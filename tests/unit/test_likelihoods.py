"""The discretized logistic mixture (PixelCNN++ eq. 2) is a proper distribution over the 256 pixel values,
and its sampler draws from it."""

import torch

from genlab.nn.likelihoods import (
    discretized_logistic_mixture_log_prob,
    from_symmetric,
    sample_discretized_logistic_mixture,
    to_symmetric,
)


def _params(B=3, K=4, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (B, K, 1, 1, 1)
    logits = torch.randn(shape, generator=g).expand(B, K, 1, 1, n)
    means = (torch.rand(shape, generator=g) * 2.4 - 1.2).expand(B, K, 1, 1, n)  # some outside [-1, 1]
    log_scales = (torch.randn(shape, generator=g) - 3).expand(B, K, 1, 1, n)
    return logits, means, log_scales


def test_probabilities_of_all_256_values_sum_to_one():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(3, 1, 1, 256)
    lp = discretized_logistic_mixture_log_prob(x, *_params())
    assert lp.shape == (3, 1, 1, 256) and torch.isfinite(lp).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3, 1, 1), atol=1e-5)


def test_very_sharp_components_stay_finite():
    x = torch.tensor([[[[0, 1, 128, 254, 255]]]], dtype=torch.uint8)
    logits, means, _ = _params(B=1, K=1, n=5)
    lp = discretized_logistic_mixture_log_prob(x, logits, means, torch.full((1, 1, 1, 1, 5), -20.0))
    assert torch.isfinite(lp).all()


def test_sampler_draws_the_modelled_distribution():
    logits, means, log_scales = _params(n=1)
    n = 40000
    s = sample_discretized_logistic_mixture(logits.expand(3, 4, 1, 1, n), means.expand(3, 4, 1, 1, n),
                                            log_scales.expand(3, 4, 1, 1, n), generator=torch.Generator().manual_seed(0))
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 256).expand(3, 1, 1, 256)
    p = discretized_logistic_mixture_log_prob(x, *_params()).exp()[:, 0, 0]
    emp = torch.stack([torch.bincount(s[i].flatten().long(), minlength=256).float() / n for i in range(3)])
    assert (emp - p).abs().max() < 0.01
    mode = sample_discretized_logistic_mixture(logits, means, log_scales, temperature=0)
    assert mode.dtype == torch.uint8


def test_scalings_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(from_symmetric(to_symmetric(x)), x)
    assert to_symmetric(x)[0] == -1 and to_symmetric(x)[-1] == 1
