"""GAN: a DCGAN-style generator and discriminator (Radford et al. 2016) with the standard losses and regularizers.

Generator: z (B, z_dim) [+ class embedding] -> linear -> (B, 2w, H/4, W/4) -> two stride-2 transposed convs ->
tanh image in [-1, 1] (batch norm + ReLU in between, as in DCGAN). Discriminator: two stride-2 convs with leaky
ReLU (no batch norm, so the gradient penalties are per-sample) -> flattened features phi(x) -> a linear score,
plus, when class-conditional, the projection term <embed(y), phi(x)>. Optional spectral norm on every layer of D.

Losses (config `loss`), with D(x) the real-valued score (logit / critic value):
- "ns":      D: softplus(-D(x)) + softplus(D(G(z))); G: softplus(-D(G(z)))   (Goodfellow et al. 2014, eq. 1 and
             the non-saturating generator of section 3)
- "hinge":   D: relu(1 - D(x)) + relu(1 + D(G(z))); G: -D(G(z))             (Lim & Ye 2017; Miyato et al. 2018, sec. 4)
- "wgan-gp": D: D(G(z)) - D(x) + gp_weight * (||grad D(x_hat)|| - 1)^2;  G: -D(G(z))  (Gulrajani et al. 2017, Alg. 1)

The default preset is hinge loss + spectral norm on D (Miyato et al. 2018), Adam(0.5, 0.999): the combination
that trains stably without tuning; `r1_gamma` adds the R1 penalty (Mescheder et al. 2018, eq. 9) to any loss.

Training goes through `HasCustomStep` (the trainer never sees the two players): every `train_step` call is ONE
discriminator update on the batch, and every `n_critic`-th call (`(step + 1) % n_critic == 0`) also ONE generator
update that reuses this call's fakes. So with n_critic = 5 (the WGAN-GP paper's setting) the trainer's step count
counts D updates and G is updated every 5th step. The Adam betas come from this config's `adam_betas` (the
trainer's beta1/beta2 are meant for likelihood models and are ignored here), there is no weight decay and no
gradient clipping (train.weight_decay and train.grad_clip are ignored); the trainer's lr schedule applies, times
`lr_scale_d` / `lr_scale_g` (param group key "lr_scale": a two-time-scale rule, Heusel et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from ..core.errors import ConfigError
from ..core.outputs import StepOutput
from ..nn.likelihoods import from_symmetric, to_symmetric
from . import check_image_fields, class_labels, register_family

LOSSES = ("ns", "hinge", "wgan-gp")


@dataclass(frozen=True)
class GANConfig:
    family: str = "gan"
    channels: int = 1  # filled from the data
    image_size: int = 28  # filled from the data; must be divisible by 4
    num_classes: int = 0  # filled from the data (0 = no labels)
    conditional: bool = False  # class-conditional G (embedding concatenated to z) and projection D
    z_dim: int = 64  # latent size
    g_width: int = 64  # G channels at H/2 (2 * g_width at H/4)
    d_width: int = 64  # D channels at H/2 (2 * d_width at H/4)
    loss: str = "hinge"  # one of LOSSES
    spectral_norm: bool = True  # spectral normalization of every D layer (Miyato et al. 2018)
    gp_weight: float = 10.0  # lambda of the WGAN-GP gradient penalty (used only with loss="wgan-gp")
    r1_gamma: float = 0.0  # R1 penalty gamma/2 * E||grad_x D(x_real)||^2 (0 = off)
    n_critic: int = 1  # D updates per G update (each train_step call is one D update)
    lr_scale_d: float = 1.0  # D lr = trainer lr * lr_scale_d
    lr_scale_g: float = 1.0  # G lr = trainer lr * lr_scale_g
    adam_betas: tuple[float, float] = (0.5, 0.999)  # replaces the trainer's beta1/beta2 for both players

    def validate(self):
        check_image_fields(self)
        if self.image_size < 4 or self.image_size % 4:
            raise ConfigError(f"model.image_size={self.image_size} must be a positive multiple of 4 "
                              "(the generator upsamples twice from image_size/4)")
        for k in ("z_dim", "g_width", "d_width", "n_critic"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.loss not in LOSSES:
            raise ConfigError(f"model.loss={self.loss!r} must be one of {', '.join(map(repr, LOSSES))}")
        if self.gp_weight < 0:
            raise ConfigError(f"model.gp_weight={self.gp_weight} must be >= 0")
        if self.r1_gamma < 0:
            raise ConfigError(f"model.r1_gamma={self.r1_gamma} must be >= 0 (0 = off)")
        for k in ("lr_scale_d", "lr_scale_g"):
            if not 0 < getattr(self, k) <= 100:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be in (0, 100]")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"model.adam_betas={list(self.adam_betas)} must be two numbers in [0, 1)")


PRESETS = {
    "tiny": {"z_dim": 16, "g_width": 8, "d_width": 8},
    # 28x28x1: G 0.53M params, D 0.14M; hinge + spectral norm; ~400 train images/s on one CPU thread
    "default": {"z_dim": 64, "g_width": 64, "d_width": 64},
}


def _dcgan_init(m: nn.Module):
    """N(0, 0.02) weights and zero biases (Radford et al. 2016, section 4), used for D. G keeps PyTorch's default
    init: with N(0, 0.02) its pre-batch-norm activations are ~100x smaller than the unit running variance, so an
    untrained G in eval mode would give the same flat grey image for every z and every label."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        w, self.s = cfg.g_width, cfg.image_size // 4
        self.embed = nn.Embedding(cfg.num_classes, cfg.z_dim) if cfg.conditional else None
        in_dim = cfg.z_dim * (2 if cfg.conditional else 1)
        self.fc = nn.Linear(in_dim, 2 * w * self.s * self.s, bias=False)
        self.bn0 = nn.BatchNorm2d(2 * w)
        self.up1 = nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.up2 = nn.ConvTranspose2d(w, cfg.channels, 4, 2, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, z_dim), y (B,) class ids or None -> images in [-1, 1] (B, C, H, W)."""
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], dim=1)  # (B, 2 z_dim)
        h = self.fc(z).view(z.size(0), -1, self.s, self.s)  # (B, 2w, H/4, W/4)
        h = F.relu(self.bn0(h))
        h = F.relu(self.bn1(self.up1(h)))  # (B, w, H/2, W/2)
        return torch.tanh(self.up2(h))  # (B, C, H, W)


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig):
        super().__init__()
        w, s = cfg.d_width, cfg.image_size // 4
        sn = spectral_norm if cfg.spectral_norm else (lambda m: m)
        self.conv1 = nn.Conv2d(cfg.channels, w, 4, 2, 1)
        self.conv2 = nn.Conv2d(w, 2 * w, 4, 2, 1)
        self.fc = nn.Linear(2 * w * s * s, 1)
        self.embed = nn.Embedding(cfg.num_classes, 2 * w * s * s) if cfg.conditional else None
        self.apply(_dcgan_init)  # before spectral_norm wraps the weights
        self.conv1, self.conv2, self.fc = sn(self.conv1), sn(self.conv2), sn(self.fc)
        if self.embed is not None:
            self.embed = sn(self.embed)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W) in [-1, 1], y (B,) or None -> scores (B,)."""
        h = F.leaky_relu(self.conv1(x), 0.2)  # (B, w, H/2, W/2)
        h = F.leaky_relu(self.conv2(h), 0.2)  # (B, 2w, H/4, W/4)
        phi = h.flatten(1)  # (B, F)
        out = self.fc(phi).squeeze(1)  # (B,)
        if self.embed is not None:  # projection discriminator (Miyato & Koyama 2018, eq. 3): + y^T V phi(x)
            out = out + (self.embed(y) * phi).sum(dim=1)
        return out


def _d_loss(kind: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    if kind == "ns":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    return d_fake.mean() - d_real.mean()  # wgan-gp, without the penalty


def _g_loss(kind: str, d_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-d_fake).mean() if kind == "ns" else -d_fake.mean()


@register_family("gan", GANConfig, PRESETS, modality="image")
class GAN(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The class ids the players see (None for an unconditional model); checks their range."""
        y = class_labels(self.config, y, n, "GAN")
        return None if y is None else y.to(self.generator.fc.weight.device)

    def _z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, generator=generator, device=self.generator.fc.weight.device)

    # -- monitoring loss (what the trainer evaluates on held-out batches) --
    loss_unit = "G+D loss, not a likelihood"  # what loss() returns, named wherever it is printed

    def loss(self, batch) -> StepOutput:
        """Generator loss + discriminator loss (no gradient penalty) on the batch: a number to watch, not a
        likelihood. D's term sees detached fakes and G's term sees D, so gradients reach every parameter (with
        the WGAN loss a shared D(G(z)) would cancel G's gradient)."""
        x, y = batch
        B = x.size(0)
        y = self._labels(y, B)
        real = to_symmetric(x)  # (B, C, H, W)
        fake = self.generator(self._z(B), y)  # (B, C, H, W)
        yy = None if y is None else y.repeat(3)
        d = self.discriminator(torch.cat([real, fake.detach(), fake]), yy)  # (3B,)
        d_real, d_fake, d_gen = d[:B], d[B : 2 * B], d[2 * B :]
        loss_d = _d_loss(self.config.loss, d_real, d_fake)
        loss_g = _g_loss(self.config.loss, d_gen)
        metrics = {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "d_real": d_real.mean().item(),
                   "d_fake": d_fake.mean().item()}
        return StepOutput(loss_d + loss_g, metrics, n_items=B)

    # -- HasCustomStep --
    def make_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]:
        """Adam for each player with this config's betas (not the trainer's), no weight decay; lr = train lr *
        lr_scale (the trainer rescales every step through the "lr_scale" key)."""
        c = self.config

        def adam(module: nn.Module, scale: float) -> torch.optim.Adam:
            group = {"params": list(module.parameters()), "lr": train_cfg.lr * scale, "lr_scale": scale}
            return torch.optim.Adam([group], lr=train_cfg.lr * scale, betas=tuple(c.adam_betas))

        return {"g": adam(self.generator, c.lr_scale_g), "d": adam(self.discriminator, c.lr_scale_d)}

    def train_step(self, batch, optimizers, step: int) -> dict[str, float]:
        """One D update on the batch; also one G update when (step + 1) % n_critic == 0 (reusing these fakes).

        Returns loss_d (without penalties), loss_g, d_real, d_fake (mean scores before the D update), loss
        (= loss_d + loss_g, the quantity `loss` reports), g_step (1 if G was updated), and gp / r1 when on.
        loss_g of a call without a G update is the generator loss on the same fakes, before the D update."""
        c = self.config
        was_training = self.training
        self.train()  # batch-norm statistics of the batch in G, power iteration of spectral norm in D
        x, y = batch
        B = x.size(0)
        y = self._labels(y, B)
        real = to_symmetric(x)  # (B, C, H, W)
        g_step = (step + 1) % c.n_critic == 0
        with torch.set_grad_enabled(g_step):
            fake = self.generator(self._z(B), y)  # (B, C, H, W); kept in the graph only for G's update
        out: dict[str, float] = {}

        # discriminator: real, fake (and interpolates for the gradient penalty) in one forward pass
        use_r1, use_gp = c.r1_gamma > 0, c.loss == "wgan-gp" and c.gp_weight > 0
        real = real.requires_grad_(use_r1)
        parts = [real, fake.detach()]
        if use_gp:  # x_hat = eps x + (1 - eps) x_fake, eps ~ U[0, 1] per image (Gulrajani et al. 2017, Alg. 1)
            eps = torch.rand(B, 1, 1, 1, device=real.device)
            x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
            parts.append(x_hat)
        d = self.discriminator(torch.cat(parts), None if y is None else y.repeat(len(parts)))  # (len(parts) B,)
        d_real, d_fake = d[:B], d[B : 2 * B]
        loss_d = _d_loss(c.loss, d_real, d_fake)
        total = loss_d
        if use_r1:  # R1 = gamma/2 E_real ||grad_x D(x)||^2 (Mescheder et al. 2018, eq. 9)
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)  # (B, C, H, W)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            total = total + 0.5 * c.r1_gamma * r1
            out["r1"] = r1.item()
        if use_gp:  # GP = lambda E (||grad D(x_hat)||_2 - 1)^2 (Gulrajani et al. 2017, eq. 3)
            (grad,) = torch.autograd.grad(d[2 * B :].sum(), x_hat, create_graph=True)  # (B, C, H, W)
            gp = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
            total = total + c.gp_weight * gp
            out["gp"] = gp.item()
        opt_d = optimizers["d"]
        opt_d.zero_grad(set_to_none=True)
        total.backward()
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)

        # generator: one update on the same fakes against the updated D (D's weights frozen for this pass)
        if g_step:
            self.discriminator.requires_grad_(False)
            try:
                loss_g = _g_loss(c.loss, self.discriminator(fake, y))
                opt_g = optimizers["g"]
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)
            finally:
                self.discriminator.requires_grad_(True)
        else:
            loss_g = _g_loss(c.loss, d_fake.detach())
        self.train(was_training)
        out.update(loss_d=loss_d.item(), loss_g=loss_g.item(), d_real=d_real.mean().item(),
                   d_fake=d_fake.mean().item(), loss=loss_d.item() + loss_g.item(), g_step=float(g_step))
        return out

    # -- sampling --
    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               temperature: float = 1.0, **controls) -> torch.Tensor:
        """n images, uint8 (n, C, H, W). z ~ N(0, temperature^2 I): temperature is the std of the latent (< 1
        trades diversity for typicality, like truncation; 0 gives the image of z = 0 for every row). Labels
        (n,) for a conditional model default to arange(n) % num_classes. Batch norm uses its running statistics."""
        if controls:
            raise ConfigError(f"unknown sampling control(s) for gan: {', '.join(sorted(controls))}; "
                              "known: labels, temperature")
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        if not 0 <= temperature <= 10:
            raise ValueError(f"temperature={temperature} must be in [0, 10]")
        c = self.config
        if labels is not None and not c.conditional:
            raise ConfigError("this GAN is not class-conditional: it takes no labels")
        if c.conditional and labels is None:
            labels = torch.arange(n) % c.num_classes
        y = self._labels(None if labels is None else torch.as_tensor(labels), n)
        was_training = self.training
        self.eval()
        try:
            z = self._z(n, generator) * temperature  # (n, z_dim)
            return from_symmetric(self.generator(z, y))  # (n, C, H, W)
        finally:
            self.train(was_training)
