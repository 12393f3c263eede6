"""Variational autoencoder (Kingma & Welling 2014) with an importance-weighted bound (Burda et al. 2016).

A convolutional encoder q(z | x) = N(mu(x), diag sigma(x)^2) and a convolutional decoder p(x | z) that is
factorized over sub-pixels, with the prior p(z) = N(0, I) on a `latent_dim` vector. Training maximizes the ELBO
    log p(x) >= E_q[log p(x | z)] - KL(q(z | x) || p(z))                    (Kingma & Welling 2014, eq. 3)
with the reparameterization z = mu + sigma * eps, eps ~ N(0, I) (eq. 4 / appendix C.2), the KL in closed form
(appendix B). `elbo(x, k=K)` for K > 1 is the importance-weighted bound
    L_K = E[log (1/K) sum_k p(x, z_k) / q(z_k | x)],  z_k ~ q(z | x)       (Burda et al. 2016, eq. 8)
which is >= L_1 and tends to log p(x) as K grows.

Decoder likelihoods (config.decoder):
- "logistic" (default): a discretized logistic mixture (PixelCNN++, Salimans et al. 2017, eq. 2) of n_mix
  components per sub-pixel over the 256 values of 8-bit data (genlab.nn.likelihoods), with a learned per-sub-pixel
  mean, scale and mixture weight. A proper likelihood of the 8-bit images: -ELBO / (D ln 2) is an upper bound on
  bits/dim comparable with flows and PixelCNNs.
- "gaussian": a discretized Gaussian: the N(mu, s^2) mass of each value's bin of width 2/255 in [-1, 1], the edge
  bins reaching out to -inf and +inf (the same bins as the logistic). Also a proper 8-bit likelihood.
- "bernoulli": pixels binarized, Bernoulli(sigmoid(logit)) per sub-pixel. Training binarizes dynamically
  (x/255 > u, u ~ U[0, 1) from the global RNG); `elbo` and the eval-mode loss use the fixed threshold x > 127.5.
  The bound is a bound on log P(binarized x), NOT on the 8-bit data: its nats/dim are not comparable with the other
  decoders or with other families. `likelihood_note` says so for callers.

Training-only terms: `beta` weights the KL (beta-VAE, Higgins et al. 2017) and the KL weight ramps linearly from 0
to beta over `kl_warmup_steps` optimizer steps (Bowman et al. 2016; Sonderby et al. 2016), driven by
`set_train_step(step)` which the trainer calls before every step (a model never told its step uses the full
beta). In eval mode the loss is always the honest negative ELBO (beta = 1, no warm-up) in nats per sub-pixel.

Networks: conv3x3 -> two stride-2 4x4 convs (h, 2h, 4h maps; optional residual blocks) -> a linear layer to
(mu, log sigma^2); the decoder mirrors it with transposed convs. No normalization layers, so every image is
encoded and decoded independently of its batch. Samples: z ~ N(0, temperature^2 I), decoded to the decoder's mean
(mean=True, the usual clean VAE grid) or to a draw from p(x | z) (mean=False).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError
from ..core.outputs import StepOutput
from ..nn.likelihoods import (
    LOG_HALF_BIN,
    discretized_logistic_mixture_log_prob,
    from_symmetric,
    sample_discretized_logistic_mixture,
    to_symmetric,
)
from . import check_image_fields, register_family

DECODERS = ("logistic", "gaussian", "bernoulli")
LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    family: str = "vae"
    channels: int = 1  # filled from the data
    image_size: int = 28  # filled from the data (must be divisible by 4: two stride-2 stages)
    num_classes: int = 0  # filled from the data (0 = no labels)
    conditional: bool = False  # class-conditional: a class embedding feeds both encoder and decoder
    latent_dim: int = 64  # size of the diagonal Gaussian latent z
    hidden: int = 32  # h: feature maps at full resolution; 2h at 1/2, 4h at 1/4 resolution
    n_res: int = 0  # residual blocks at each of the 1/2 and 1/4 resolutions, in encoder and decoder
    decoder: str = "logistic"  # "logistic" (mixture), "gaussian" (discretized) or "bernoulli" (binarized data)
    n_mix: int = 5  # logistic mixture components per sub-pixel (decoder="logistic")
    beta: float = 1.0  # KL weight in training (beta-VAE); eval is always beta = 1
    kl_warmup_steps: int = 500  # KL weight ramps linearly 0 -> beta over this many steps (0 = no warm-up)
    class_dim: int = 16  # size of the class embedding (conditional models)

    def validate(self):
        check_image_fields(self)
        if self.image_size < 4 or self.image_size % 4:
            raise ConfigError(f"model.image_size={self.image_size} must be a positive multiple of 4 (>= 4)")
        if self.decoder not in DECODERS:
            raise ConfigError(f"model.decoder={self.decoder!r} must be one of {', '.join(map(repr, DECODERS))}")
        if not 1 <= self.n_mix <= 32:
            raise ConfigError(f"model.n_mix={self.n_mix} must be in [1, 32]")
        for k in ("latent_dim", "hidden", "class_dim"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.n_res < 0:
            raise ConfigError(f"model.n_res={self.n_res} must be >= 0")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"model.beta={self.beta} must be a finite number >= 0")
        if self.kl_warmup_steps < 0:
            raise ConfigError(f"model.kl_warmup_steps={self.kl_warmup_steps} must be >= 0 (0 = no warm-up)")


PRESETS = {
    # ~14k params at 8x8, ~41k at 28x28
    "tiny": {"latent_dim": 8, "hidden": 6, "n_res": 0, "n_mix": 2, "class_dim": 4, "kl_warmup_steps": 0},
    # 1.54M params at 28x28 (most in the two linear layers); one core: ~270 train images/s in fp32, ~350-550
    # under bf16 autocast. Fashion-MNIST: 3.50 bits/dim held-out -ELBO after 2 minutes on one core (bf16)
    "default": {"latent_dim": 64, "hidden": 32, "n_res": 0, "n_mix": 5, "kl_warmup_steps": 500},
}


# ---------------------------------------------------------------------------------------------------------------
# The discretized Gaussian (the logistic lives in genlab.nn.likelihoods)
# ---------------------------------------------------------------------------------------------------------------


def _log_diff_ndtr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, stably: reflect to the lower tail (Phi(b) - Phi(a) = Phi(-a) - Phi(-b)),
    then log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b)))."""
    upper = a > 0
    a, b = torch.where(upper, -b, a), torch.where(upper, -a, b)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    d = (la - lb).clamp(max=-1e-12)  # < 0
    log1mexp = torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))
    return lb + log1mexp


def discretized_gaussian_log_prob(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) in nats per sub-pixel of 8-bit x under a discretized N(mean, exp(log_scale)^2) on [-1, 1] units.

    x: uint8 (B, C, H, W); means, log_scales: (B, C, H, W). Value v owns the bin [c_v - 1/255, c_v + 1/255] around
    its centre c_v = v / 127.5 - 1; the bins of 0 and 255 reach out to -inf and +inf, so the 256 masses sum to 1."""
    xs = to_symmetric(x)
    log_scales = log_scales.clamp(min=-7.0)
    inv_s = torch.exp(-log_scales)
    centred = xs - means
    plus = inv_s * (centred + 1 / 255)
    minus = inv_s * (centred - 1 / 255)
    log_cdf_plus = torch.special.log_ndtr(plus)  # the lowest bin, value 0
    log_sf_minus = torch.special.log_ndtr(-minus)  # the highest bin, value 255
    interior = _log_diff_ndtr(minus, plus)
    # a bin far narrower than the scale: its mass is the density at the centre times the bin width (2/255)
    mid = inv_s * centred
    log_pdf_mid = -0.5 * mid * mid - 0.5 * LOG_2PI - log_scales - LOG_HALF_BIN
    interior = torch.where(plus - minus > 1e-3, interior, log_pdf_mid)
    return torch.where(xs < -0.999, log_cdf_plus, torch.where(xs > 0.999, log_sf_minus, interior))


def _repeat(t: torch.Tensor, m: int) -> torch.Tensor:
    """(B, ...) -> (m * B, ...): m copies of the batch, copy-major (matches z.reshape(m * B, L))."""
    return t.expand(m, *t.shape).reshape(m * t.shape[0], *t.shape[1:])


# ---------------------------------------------------------------------------------------------------------------
# The networks
# ---------------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))): keeps shape (B, c, H, W)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    """uint8-scaled x (B, C, S, S) [+ class embedding (B, e)] -> mu, logvar (B, L)."""

    def __init__(self, c: VAEConfig, cond_dim: int):
        super().__init__()
        h, s4 = c.hidden, c.image_size // 4
        self.conv_in = nn.Conv2d(c.channels, h, 3, padding=1)  # (B, h, S, S)
        self.down1 = nn.Conv2d(h, 2 * h, 4, stride=2, padding=1)  # (B, 2h, S/2, S/2)
        self.res1 = nn.Sequential(*[ResBlock(2 * h) for _ in range(c.n_res)])
        self.down2 = nn.Conv2d(2 * h, 4 * h, 4, stride=2, padding=1)  # (B, 4h, S/4, S/4)
        self.res2 = nn.Sequential(*[ResBlock(4 * h) for _ in range(c.n_res)])
        self.head = nn.Linear(4 * h * s4 * s4 + cond_dim, 2 * c.latent_dim)

    def forward(self, x, cond=None):
        a = self.down1(F.silu(self.conv_in(x)))  # (B, 2h, S/2, S/2)
        a = self.down2(F.silu(self.res1(a)))  # (B, 4h, S/4, S/4)
        a = F.silu(self.res2(a)).flatten(1)  # (B, 4h * S/4 * S/4)
        if cond is not None:
            a = torch.cat([a, cond], dim=1)
        mu, logvar = self.head(a).chunk(2, dim=1)  # (B, L) each
        return mu, logvar


class Decoder(nn.Module):
    """z (B, L) [+ class embedding (B, e)] -> likelihood parameters (B, P, S, S)."""

    def __init__(self, c: VAEConfig, cond_dim: int, n_out: int):
        super().__init__()
        h, self.s4 = c.hidden, c.image_size // 4
        self.fc = nn.Linear(c.latent_dim + cond_dim, 4 * h * self.s4 * self.s4)
        self.res2 = nn.Sequential(*[ResBlock(4 * h) for _ in range(c.n_res)])
        self.up2 = nn.ConvTranspose2d(4 * h, 2 * h, 4, stride=2, padding=1)  # (B, 2h, S/2, S/2)
        self.res1 = nn.Sequential(*[ResBlock(2 * h) for _ in range(c.n_res)])
        self.up1 = nn.ConvTranspose2d(2 * h, h, 4, stride=2, padding=1)  # (B, h, S, S)
        self.conv_out = nn.Conv2d(h, n_out, 3, padding=1)  # (B, P, S, S)

    def forward(self, z, cond=None):
        if cond is not None:
            z = torch.cat([z, cond], dim=1)
        a = self.res2(self.fc(z).unflatten(1, (-1, self.s4, self.s4)))  # (B, 4h, S/4, S/4)
        a = self.res1(self.up2(F.silu(a)))  # (B, 2h, S/2, S/2)
        a = self.up1(F.silu(a))  # (B, h, S, S)
        return self.conv_out(F.silu(a))  # (B, P, S, S)


@register_family("vae", VAEConfig, PRESETS, modality="image")
class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        C = c.channels
        # parameters per sub-pixel: logistic K>1: logits, means, log-scales; K=1: mean, log-scale
        n_out = {"logistic": (3 * c.n_mix if c.n_mix > 1 else 2) * C, "gaussian": 2 * C, "bernoulli": C}[c.decoder]
        cond_dim = c.class_dim if c.conditional else 0
        self.y_emb = nn.Embedding(c.num_classes, c.class_dim) if c.conditional else None
        self.encoder = Encoder(c, cond_dim)
        self.decoder = Decoder(c, cond_dim, n_out)
        self._kl_weight = c.beta  # the full weight until set_train_step(step) is called (the trainer always does)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- bookkeeping ----
    @property
    def likelihood_note(self) -> str:
        """What the bound in `elbo` / the eval loss is a bound on (callers print this next to bits/dim)."""
        if self.config.decoder == "bernoulli":
            return ("ELBO of binarized pixels (Bernoulli decoder; eval threshold 127.5): NOT a bound on the "
                    "8-bit likelihood, not comparable with other decoders or families")
        return f"ELBO (a lower bound) on log P(x) of the 8-bit images, discretized {self.config.decoder} decoder"

    @property
    def is_8bit_likelihood(self) -> bool:
        return self.config.decoder != "bernoulli"

    def set_train_step(self, step: int) -> None:
        """KL weight = beta * min(1, step / kl_warmup_steps) for the training loss (linear warm-up)."""
        w = self.config.kl_warmup_steps
        self._kl_weight = self.config.beta * (min(1.0, max(step, 0) / w) if w > 0 else 1.0)

    @property
    def kl_weight(self) -> float:
        return self._kl_weight

    def _cond(self, y, n: int) -> torch.Tensor | None:
        """The class embedding (n, e) of a conditional model, None for an unconditional one (y ignored)."""
        c = self.config
        if not c.conditional:
            return None
        if y is None:
            raise ConfigError("this VAE is class-conditional: pass y (class ids)")
        y = torch.as_tensor(y, dtype=torch.long).flatten()
        if len(y) != n or int(y.min()) < 0 or int(y.max()) >= c.num_classes:
            raise ConfigError(f"labels must be {n} class ids in [0, {c.num_classes - 1}]; got {y.tolist()[:12]}")
        return self.y_emb(y)

    def _target(self, x: torch.Tensor, binarize_random: bool) -> torch.Tensor:
        """The data the decoder models: x itself (uint8), or for "bernoulli" a float 0/1 image."""
        if self.config.decoder != "bernoulli":
            return x
        if binarize_random:  # dynamic binarization (training)
            return (x.float() / 255 > torch.rand(x.shape, device=x.device)).float()
        return (x.float() > 127.5).float()

    # ---- the model ----
    def _encode_target(self, target: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The modelled image (uint8, or 0/1 floats for bernoulli) (B, C, S, S) -> mu, logvar (B, L) in fp32."""
        xin = to_symmetric(target) if self.config.decoder != "bernoulli" else 2.0 * target - 1.0  # [-1, 1]
        mu, logvar = self.encoder(xin, cond)
        return mu.float(), logvar.float()

    def encode(self, x: torch.Tensor, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z | x): uint8 (B, C, S, S) -> mu, logvar (B, L) in fp32 (bernoulli: of x binarized at 127.5)."""
        return self._encode_target(self._target(x, binarize_random=False), cond)

    def _split(self, params: torch.Tensor):
        """Decoder output (B, P, S, S) -> the likelihood's parameters, fp32."""
        c = self.config
        params = params.float()
        B, _, H, W = params.shape
        if c.decoder == "logistic":
            if c.n_mix == 1:
                means, log_scales = params.reshape(B, 2, 1, c.channels, H, W).unbind(1)
                return torch.zeros_like(means), means, log_scales  # (B, 1, C, H, W) each
            return params.reshape(B, 3, c.n_mix, c.channels, H, W).unbind(1)  # logits, means, log_scales
        if c.decoder == "gaussian":
            return params.reshape(B, 2, c.channels, H, W).unbind(1)  # means, log_scales
        return (params,)  # Bernoulli logits (B, C, H, W)

    def log_px_given_z(self, target: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | z) in nats per image, (B,): target (B, C, S, S) (uint8, or 0/1 floats for bernoulli)."""
        c, p = self.config, self._split(params)
        if c.decoder == "logistic":
            lp = discretized_logistic_mixture_log_prob(target, *p)
        elif c.decoder == "gaussian":
            lp = discretized_gaussian_log_prob(target, *p)
        else:
            lp = -F.binary_cross_entropy_with_logits(p[0], target, reduction="none")
        return lp.flatten(1).sum(dim=1)

    def _decode_mean(self, params: torch.Tensor) -> torch.Tensor:
        """The decoder's mean image as uint8 (B, C, S, S): the mixture mean of the (clamped) component means, the
        Gaussian mean, or 255 * the Bernoulli probability."""
        c, p = self.config, self._split(params)
        if c.decoder == "logistic":
            logits, means, _ = p
            return from_symmetric((F.softmax(logits, dim=1) * means.clamp(-1, 1)).sum(dim=1))
        if c.decoder == "gaussian":
            return from_symmetric(p[0])
        return (torch.sigmoid(p[0]) * 255).round().to(torch.uint8)

    def _decode_sample(self, params: torch.Tensor, generator) -> torch.Tensor:
        """One draw from p(x | z) as uint8 (B, C, S, S) (bernoulli: 0 or 255)."""
        c, p = self.config, self._split(params)
        if c.decoder == "logistic":
            return sample_discretized_logistic_mixture(*p, generator=generator)
        if c.decoder == "gaussian":
            means, log_scales = p
            eps = torch.randn(means.shape, generator=generator, device=means.device)
            return from_symmetric(means + torch.exp(log_scales) * eps)  # the nearest bin (edges reach +-inf)
        u = torch.rand(p[0].shape, generator=generator, device=p[0].device)
        return ((u < torch.sigmoid(p[0])).to(torch.uint8)) * 255

    @staticmethod
    def _kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, diag exp(logvar)) || N(0, I)) in nats, (B,) (Kingma & Welling 2014, appendix B)."""
        return 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar).sum(dim=1)

    def _neg_elbo_terms(self, x, y, eps: torch.Tensor, binarize_random: bool):
        """-log p(x | z) and KL per image (B,) for z = mu + sigma * eps, eps (B, L)."""
        cond = self._cond(y, x.shape[0])
        target = self._target(x, binarize_random)
        mu, logvar = self._encode_target(target, cond)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterization (Kingma & Welling 2014, eq. 4)
        params = self.decoder(z, cond)
        recon = -self.log_px_given_z(target, params)
        return recon, self._kl(mu, logvar)

    loss_unit = "nats/dim (negative ELBO)"  # what loss() returns, named wherever it is printed

    def loss(self, batch) -> StepOutput:
        """Training: (recon + kl_weight * KL) / D; eval: the negative ELBO (beta 1) / D, nats per sub-pixel."""
        x, y = batch
        B, D = x.shape[0], x[0].numel()
        eps = torch.randn(B, self.config.latent_dim, device=x.device)  # global RNG (the trainer seeds it)
        recon, kl = self._neg_elbo_terms(x, y, eps, binarize_random=self.training)
        w = self._kl_weight if self.training else 1.0
        recon, kl = recon.mean() / D, kl.mean() / D
        loss = recon + w * kl
        metrics = {"recon": float(recon.detach()), "kl": float(kl.detach()), "kl_weight": float(w)}
        return StepOutput(loss, metrics, n_items=B)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, *, k: int = 1, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, chunk_images: int = 2048) -> torch.Tensor:
        """A lower bound on log P(x) in nats per image, shape (B,), for uint8 x (B, C, S, S) (bernoulli decoder:
        on log P of the image binarized at 127.5, see `likelihood_note`). k = 1: the ELBO with the KL in closed
        form; k > 1: the IWAE bound log (1/k) sum_k p(x, z_k) / q(z_k | x) (Burda et al. 2016, eq. 8), the k
        samples decoded `chunk_images` images at a time. `generator` draws the latent noise (reproducible)."""
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        B, L = x.shape[0], self.config.latent_dim
        if k == 1:
            eps = torch.randn(B, L, generator=generator, device=x.device)
            recon, kl = self._neg_elbo_terms(x, y, eps, binarize_random=False)
            return -(recon + kl)
        cond = self._cond(y, B)
        target = self._target(x, binarize_random=False)
        mu, logvar = self._encode_target(target, cond)  # (B, L)
        std = torch.exp(0.5 * logvar)
        per = max(1, chunk_images // B)  # importance samples per chunk
        log_w = []
        for start in range(0, k, per):
            m = min(per, k - start)
            # one (B, L) draw per importance sample, so the noise does not depend on the chunking
            eps = torch.stack([torch.randn(B, L, generator=generator, device=x.device) for _ in range(m)])  # (m, B, L)
            z = mu + std * eps
            log_q = (-0.5 * eps * eps - 0.5 * LOG_2PI - 0.5 * logvar).sum(-1)  # (m, B)
            log_p = (-0.5 * z * z - 0.5 * LOG_2PI).sum(-1)  # (m, B)
            params = self.decoder(z.reshape(m * B, L), _repeat(cond, m) if cond is not None else None)
            log_px = self.log_px_given_z(_repeat(target, m), params).view(m, B)  # (m, B)
            log_w.append(log_px + log_p - log_q)
        log_w = torch.cat(log_w)  # (k, B)
        return torch.logsumexp(log_w, dim=0) - math.log(k)

    # ---- pictures ----
    def _eval_run(self, fn):
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            self.train(was_training)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, C, S, S) -> uint8 (B, C, S, S): the decoder's mean at the posterior mean z = mu(x)."""
        def run():
            cond = self._cond(y, x.shape[0])
            mu, _ = self.encode(x, cond)
            return self._decode_mean(self.decoder(mu, cond))
        return self._eval_run(run)

    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8,
                    y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder means along the straight line between the posterior means of two images x1, x2 ((C, S, S) or
        (1, C, S, S) uint8) -> uint8 (steps, C, S, S); the ends are reconstruct(x1) and reconstruct(x2). y: one
        class id (or (1,)) for a conditional model, used for both ends and the whole path."""
        if steps < 2:
            raise ValueError(f"steps={steps} must be >= 2")
        x1, x2 = (t if t.dim() == 4 else t.unsqueeze(0) for t in (x1, x2))
        if x1.shape[0] != 1 or x2.shape[0] != 1:
            raise ValueError(f"interpolate takes two single images; got shapes {tuple(x1.shape)}, {tuple(x2.shape)}")

        def run():
            cond = self._cond(None if y is None else torch.as_tensor(y).reshape(1), 1)
            m1, _ = self.encode(x1, cond)
            m2, _ = self.encode(x2, cond)
            t = torch.linspace(0, 1, steps, device=m1.device).unsqueeze(1)  # (steps, 1)
            z = torch.lerp(m1, m2, t)  # (steps, L)
            z[0], z[-1] = m1[0], m2[0]
            # decode one at a time so each end goes through exactly the computation reconstruct does
            out = [self._decode_mean(self.decoder(z[i : i + 1], cond)) for i in range(steps)]
            return torch.cat(out)
        return self._eval_run(run)

    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               temperature: float = 1.0, mean: bool = True) -> torch.Tensor:
        """n images, uint8 (n, C, S, S): z ~ N(0, temperature^2 I) decoded to the decoder's mean image (mean=True,
        the usual clean VAE grid) or to one draw from p(x | z) (mean=False: the model's actual distribution, noisy
        pixels). `labels` (n,) class ids for a conditional model (default: cycling through the classes)."""
        c = self.config
        if labels is not None and not c.conditional:
            raise ConfigError("this VAE is not class-conditional: it takes no labels")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ConfigError(f"temperature={temperature} must be a finite number >= 0")
        if c.conditional and labels is None:
            labels = torch.arange(n) % c.num_classes

        def run():
            cond = self._cond(labels, n)
            z = temperature * torch.randn(n, c.latent_dim, generator=generator)  # (n, L)
            params = self.decoder(z, cond)
            return self._decode_mean(params) if mean else self._decode_sample(params, generator)
        return self._eval_run(run)
