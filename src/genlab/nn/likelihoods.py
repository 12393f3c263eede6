"""Pixel likelihoods shared by the image families: the discretized logistic mixture of PixelCNN++
(Salimans et al. 2017, eq. 2) over 8-bit values, and the scalings between uint8 pixels and [-1, 1].

Each of the 256 values of a sub-pixel owns a bin of width 2/255 in [-1, 1]; the edge bins reach out to
-inf and +inf, so the probabilities of the 256 values sum to exactly one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG_HALF_BIN = math.log(127.5)  # log of 1 / (half the bin width)


def to_symmetric(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (or floats in 0..255) -> bin centres in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def from_symmetric(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> the nearest uint8 pixel values."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def bits_per_dim(log_prob_nats: torch.Tensor, dims: int) -> torch.Tensor:
    """log P(x) of 8-bit images in nats, shape (B,) -> bits per sub-pixel."""
    return -log_prob_nats / (dims * math.log(2))


def discretized_logistic_mixture_log_prob(
    x: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) in nats for each sub-pixel of 8-bit images under a K-component discretized logistic mixture.

    x: uint8 (B, C, H, W); logits, means, log_scales: (B, K, C, H, W) (means in [-1, 1] units).
    Returns (B, C, H, W). K = 1 with zero logits is a single discretized logistic."""
    xs = to_symmetric(x).unsqueeze(1)  # (B, 1, C, H, W)
    log_scales = log_scales.clamp(min=-7.0)
    inv_s = torch.exp(-log_scales)
    centred = xs - means
    plus = inv_s * (centred + 1 / 255)
    minus = inv_s * (centred - 1 / 255)
    log_cdf_plus = F.logsigmoid(plus)  # log sigma(plus): the lowest bin, value 0
    log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 - sigma(minus)): the highest bin, value 255
    # interior bins: log(sigma(plus) - sigma(minus)), computed stably; where the bin mass underflows, use the
    # density at the centre times the bin width
    mid = inv_s * centred
    log_pdf_mid = mid - log_scales - 2.0 * F.softplus(mid) - LOG_HALF_BIN
    delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    log_delta = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf_mid)
    lp = torch.where(xs < -0.999, log_cdf_plus, torch.where(xs > 0.999, log_one_minus_cdf_minus, log_delta))
    return torch.logsumexp(lp + F.log_softmax(logits, dim=1), dim=1)


def sample_discretized_logistic_mixture(
    logits: torch.Tensor,
    means: torch.Tensor,
    log_scales: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """One uint8 draw per sub-pixel; params (B, K, C, H, W). temperature scales the logistic spread and the
    component logits (1 = the model's distribution, 0 = the mode of the most likely component)."""
    if temperature <= 0:
        k = logits.argmax(dim=1, keepdim=True)
        return from_symmetric(means.gather(1, k).squeeze(1))
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-5, 1 - 1e-5)
    k = (logits / temperature - torch.log(-torch.log(u))).argmax(dim=1, keepdim=True)  # Gumbel-max
    mu = means.gather(1, k).squeeze(1)
    s = torch.exp(log_scales.gather(1, k).squeeze(1)) * temperature
    v = torch.rand(mu.shape, generator=generator, device=mu.device).clamp(1e-5, 1 - 1e-5)
    return from_symmetric(mu + s * (torch.log(v) - torch.log1p(-v)))
