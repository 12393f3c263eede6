"""Diffusion: DDPM training (Ho et al. 2020) of a U-Net, sampled by any sampler of sampling/diffusion.py.

The family holds the network (models/unet.py) and the discrete noise schedule; `sampling/denoisers.py` turns the
network's eps / v / x0 prediction into one denoiser D(x, sigma, y) -> x0 and owns the loss, and the samplers are
stateless functions chosen by name (DESIGN.md 3). The weights that are saved and sampled are the trainer's EMA
weights when `train.ema` > 0 (the configs use 0.999).

- noise schedules: "linear" (Ho et al. 2020) or "cosine" (Nichol & Dhariwal 2021); `timesteps` training steps
- prediction: "eps" (Ho et al.), "v" (Salimans & Ho 2022) or "x0"; `min_snr_gamma` > 0: min-SNR-gamma weighting
  (Hang et al. 2023)
- class-conditional (`conditional = true`): the label is dropped to "no class" with probability `p_uncond`
  during training (Ho & Salimans 2022), so one network gives both branches of classifier-free guidance
- sampling controls: sampler (ddpm, ddim, euler, heun, dpmpp_2m), steps, schedule ("model": the training
  timesteps, "karras": Karras et al. 2022 sigmas; default: "model" for ddpm/ddim, "karras" for the others),
  guidance (w of D_c + w (D_c - D_u); 0 = plain conditional sampling), eta (ddim), labels, precision ("bf16":
  a bfloat16 copy of the U-Net), clip (x0 estimates clipped to [-1, 1]; on by default), callback (previews)
- inpainting: `inpaint(image, keep)` keeps the known pixels (replacement method, optional RePaint resampling)
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch

from ..core import runtime
from ..core.errors import ConfigError
from ..core.outputs import StepOutput
from ..nn.likelihoods import from_symmetric, to_symmetric
from ..sampling import diffusion as samplers
from ..sampling.denoisers import PREDICTIONS, ClippedDenoiser, Denoiser
from ..sampling.schedules import BETA_SCHEDULES, SIGMA_SCHEDULES, alphas_cumprod, sampling_sigmas
from . import check_image_fields, class_labels, register_family
from .unet import FusedUNet, UNet


def _inductor_freezing(on: bool):
    """Inductor's weight freezing (constant-folded weights, oneDNN-packed convolutions) while a compiled U-Net
    is first called; a no-op context otherwise."""
    if not on:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


@dataclass(frozen=True)
class DiffusionConfig:
    family: str = "diffusion"
    channels: int = 1  # filled from the data
    image_size: int = 28  # filled from the data; divisible by 2^(len(channel_mults) - 1)
    num_classes: int = 0  # filled from the data (0 = no labels)
    conditional: bool = False  # class embedding + label dropout (classifier-free guidance)
    # the U-Net
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)  # channels per resolution level, times base_channels
    num_res_blocks: int = 1  # residual blocks per level (the up path has one more)
    attn_levels: tuple[int, ...] = (2,)  # levels (0 = full resolution) with self-attention
    dropout: float = 0.0
    groups: int = 8  # GroupNorm groups
    # the diffusion
    timesteps: int = 1000
    noise_schedule: str = "linear"  # "linear" or "cosine"
    prediction: str = "eps"  # "eps", "v" or "x0"
    min_snr_gamma: float = 0.0  # > 0: min-SNR-gamma loss weighting (5 is the paper's choice); 0 = off
    p_uncond: float = 0.1  # conditional models: probability of training with the "no class" label
    # default sampling
    sampler: str = "dpmpp_2m"
    steps: int = 20

    def validate(self):
        check_image_fields(self)
        levels = len(self.channel_mults)
        if levels < 1 or any(m < 1 for m in self.channel_mults):
            raise ConfigError(f"model.channel_mults={list(self.channel_mults)} must be one or more integers >= 1")
        if self.image_size < 1 or self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"model.image_size={self.image_size} must be a positive multiple of "
                              f"{2 ** (levels - 1)} (the U-Net halves it {levels - 1} times)")
        if any(not 0 <= lv < levels for lv in self.attn_levels):
            raise ConfigError(f"model.attn_levels={list(self.attn_levels)} must be levels in [0, {levels - 1}]")
        for k in ("base_channels", "num_res_blocks", "groups"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.base_channels % 2 or self.base_channels % min(self.groups, self.base_channels):
            raise ConfigError(f"model.base_channels={self.base_channels} must be even and divisible by "
                              f"model.groups={self.groups}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not 2 <= self.timesteps <= 100_000:
            raise ConfigError(f"model.timesteps={self.timesteps} must be in [2, 100000]")
        if self.noise_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"model.noise_schedule={self.noise_schedule!r} unknown; known: "
                              f"{', '.join(BETA_SCHEDULES.names())}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"model.prediction={self.prediction!r} unknown; known: {', '.join(PREDICTIONS.names())}")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"model.min_snr_gamma={self.min_snr_gamma} must be >= 0 (0 = off)")
        if not 0 <= self.p_uncond < 1:
            raise ConfigError(f"model.p_uncond={self.p_uncond} must be in [0, 1)")
        if self.sampler not in samplers.SAMPLERS:
            raise ConfigError(f"model.sampler={self.sampler!r} unknown; known: {', '.join(samplers.SAMPLERS.names())}")
        if not 1 <= self.steps <= self.timesteps:
            raise ConfigError(f"model.steps={self.steps} must be in [1, {self.timesteps}]")


PRESETS = {
    "tiny": {"base_channels": 8, "channel_mults": (1, 2), "attn_levels": (1,), "groups": 4, "timesteps": 100},
    # 28x28x1: 1.11M parameters (diffusers UNet2DModel (32, 64, 64), 1 layer per block, is of this size)
    "default": {"base_channels": 32, "channel_mults": (1, 2, 2), "attn_levels": (2,)},
}


@register_family("diffusion", DiffusionConfig, PRESETS, modality="image")
class Diffusion(torch.nn.Module):
    likelihood_note = "a diffusion model has a variational bound, which genlab does not compute yet"

    def __init__(self, config: DiffusionConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        unet = UNet(in_channels=c.channels, out_channels=c.channels, base_channels=c.base_channels,
                    channel_mults=c.channel_mults, num_res_blocks=c.num_res_blocks, attn_levels=c.attn_levels,
                    num_classes=c.num_classes if c.conditional else 0, dropout=c.dropout, groups=c.groups)
        abar = alphas_cumprod(c.noise_schedule, c.timesteps)
        self.denoiser = Denoiser(unet, abar, c.prediction, null_label=c.num_classes if c.conditional else None)

    @property
    def unet(self) -> UNet:
        return self.denoiser.net

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        return class_labels(self.config, y, n, "diffusion model")

    loss_unit = "denoising loss, not a likelihood"  # what loss() returns, named wherever it is printed

    def loss(self, batch) -> StepOutput:
        """Mean DDPM loss of the batch (uint8 images scaled to [-1, 1]). In eval mode the noise and time steps are
        drawn from a fixed seed, so held-out losses are comparable between evaluations."""
        x, y = batch
        B = x.shape[0]
        y = self._labels(y, B)
        g = None if self.training else torch.Generator(device=x.device).manual_seed(0)
        if y is not None and self.training and self.config.p_uncond > 0:  # label dropout (Ho & Salimans 2022)
            drop = torch.rand(B, device=x.device) < self.config.p_uncond
            y = torch.where(drop, torch.full_like(y, self.config.num_classes), y)
        per_example = self.denoiser.loss(to_symmetric(x), y, min_snr_gamma=self.config.min_snr_gamma, generator=g)
        return StepOutput(per_example.mean(), {}, n_items=B)

    # -- sampling --
    def _plan(self, sampler, steps, schedule, guidance, eta):
        c = self.config
        sampler = sampler or c.sampler
        if sampler not in samplers.SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; known: {', '.join(samplers.SAMPLERS.names())}")
        steps = c.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps={steps!r} must be an integer >= 1")
        schedule = schedule or ("model" if sampler in ("ddpm", "ddim") else "karras")
        if schedule not in SIGMA_SCHEDULES:
            raise ConfigError(f"unknown schedule {schedule!r}; known: {', '.join(SIGMA_SCHEDULES.names())}")
        if not (math.isfinite(guidance) and -1 <= guidance <= 50):
            raise ConfigError(f"guidance={guidance} must be in [-1, 50] (0 = no guidance, -1 = unconditional)")
        if guidance != 0 and not c.conditional:
            raise ConfigError("guidance needs a class-conditional model (model.conditional = true); this one is not")
        extra = {}
        if eta is not None:
            if sampler != "ddim":
                raise ConfigError(f"eta applies to the ddim sampler, not to {sampler}")
            if not 0 <= eta <= 1:
                raise ConfigError(f"eta={eta} must be in [0, 1]")
            extra["eta"] = float(eta)
        sigmas = sampling_sigmas(schedule, self.denoiser.sigmas.double(), steps)
        return sampler, sigmas, extra

    def _denoiser_for(self, precision: str, clip: bool, compiled: bool = False):
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision={precision!r} must be 'fp32' or 'bf16'")
        d = self.denoiser
        if precision == "bf16" or compiled:
            c = self.config
            d = Denoiser(self._sampling_unet(precision, compiled), alphas_cumprod(c.noise_schedule, c.timesteps),
                         c.prediction, null_label=d.null_label)
        return ClippedDenoiser(d) if clip else d

    def _sampling_unet(self, precision: str, compiled: bool):
        """A bfloat16 copy of the U-Net, on a CPU run fused by oneDNN Graph (unet.FusedUNet), or the copy's
        torch.compile'd form (inductor, frozen weights); kept between calls and rebuilt when the weights change
        (an optimizer step or a load bumps their version counters)."""
        stamp = (precision, compiled, *((p.data_ptr(), p._version) for p in self.unet.parameters()))
        cache = self.__dict__.setdefault("_sampling_nets", {})
        if cache.get((precision, compiled), (None,))[0] != stamp:
            net = copy.deepcopy(self.unet).eval()
            if precision == "bf16":
                net = net.to(torch.bfloat16)
            if compiled:
                net = torch.compile(net, dynamic=False)
            elif precision == "bf16" and next(net.parameters()).device.type == "cpu":
                net = FusedUNet(net)
            cache[(precision, compiled)] = (stamp, net)
        return cache[(precision, compiled)][1]

    def _noise(self, n, sigmas, generator):
        c = self.config
        shape = (n, c.channels, c.image_size, c.image_size)
        # x_T ~ N(0, I) in the VP variable, i.e. std sqrt(1 + sigma_max^2) in the VE one
        return torch.randn(shape, generator=generator) * (1 + sigmas[0] ** 2).sqrt()

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               sampler: str | None = None, steps: int | None = None, schedule: str | None = None,
               guidance: float = 0.0, eta: float | None = None, precision: str = "fp32", clip: bool = True,
               compile: bool = False, callback=None, **controls) -> torch.Tensor:
        """n images, uint8 (n, C, H, W). Labels (n,) for a conditional model default to cycling the classes.
        precision "bf16" runs a bfloat16 copy of the U-Net, on a CPU traced and fused by oneDNN Graph (faster on
        CPUs with AVX512-BF16 or AMX, many times slower without; "auto" picks; the first call traces it); the sampler's state stays fp32.
        clip (default on) clips the x0 estimates to the pixel range [-1, 1]. compile=True runs the
        U-Net through torch.compile (inductor, weights frozen): tens of seconds on the first call and on each new
        batch size, then faster calls; worth it for many batches in one process (a server), not for one grid."""
        if controls:
            raise ConfigError(f"unknown sampling control(s) for diffusion: {', '.join(sorted(controls))}; known: "
                              "labels, sampler, steps, schedule, guidance, eta, precision, clip, compile")
        c = self.config
        precision = runtime.resolve_precision(precision, "precision")
        if labels is not None and not c.conditional:
            raise ConfigError("this diffusion model is not class-conditional: it takes no labels")
        if c.conditional and labels is None:
            labels = torch.arange(n) % c.num_classes
        y = self._labels(labels, n)
        name, sigmas, extra = self._plan(sampler, steps, schedule, guidance, eta)
        was_training = self.training
        self.eval()
        try:
            with _inductor_freezing(compile):
                x = samplers.run_sampler(name, self._denoiser_for(precision, clip, compile),
                                         self._noise(n, sigmas, generator), sigmas, generator=generator,
                                         callback=callback, cond=y, guidance=guidance, **extra)
        finally:
            self.train(was_training)
        return from_symmetric(x)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, keep: torch.Tensor, n: int = 1, *,
                generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
                sampler: str = "ddpm", steps: int | None = None, schedule: str | None = None,
                guidance: float = 0.0, resample: int = 1, precision: str = "fp32", clip: bool = True,
                callback=None) -> torch.Tensor:
        """`n` completions of one uint8 image (C, H, W): pixels where `keep` (H, W) is true are kept exactly, the
        others are generated. Default: DDPM with every training step (steps = timesteps). A class-conditional
        model without `labels` completes the image unconditionally (the "no class" label of its label dropout);
        with `labels` (n,) each completion is of that class."""
        c = self.config
        precision = runtime.resolve_precision(precision, "precision")
        shape = (c.channels, c.image_size, c.image_size)
        if tuple(image.shape) != shape:
            raise ConfigError(f"the image is {tuple(image.shape)} but the model makes {shape} images")
        if tuple(keep.shape) != shape[1:]:
            raise ConfigError(f"the mask is {tuple(keep.shape)} but the image is {shape[1:]}")
        if not isinstance(resample, int) or not 1 <= resample <= 50:
            raise ConfigError(f"resample={resample!r} must be an integer in [1, 50]")
        if labels is not None and not c.conditional:
            raise ConfigError("this diffusion model is not class-conditional: it takes no labels")
        y = None if labels is None else self._labels(labels, n)
        if c.conditional and labels is None:  # complete the image as it is: the "no class" label
            if c.p_uncond <= 0:
                raise ConfigError("this class-conditional model was trained without label dropout "
                                  "(model.p_uncond = 0), so it cannot complete an image without a class: pass "
                                  f"labels (--class, 0..{c.num_classes - 1})")
            if guidance != 0:
                raise ConfigError("guidance needs a class to guide towards: pass labels (--class) with it")
            y = torch.full((n,), c.num_classes, dtype=torch.long)
        name, sigmas, _ = self._plan(sampler, c.timesteps if steps is None else steps, schedule, guidance, None)
        known = to_symmetric(image).expand(n, *shape)
        keep_t = keep.to(torch.float32).expand(n, 1, *shape[1:])
        was_training = self.training
        self.eval()
        try:
            x = samplers.inpaint(self._denoiser_for(precision, clip), known, keep_t, self._noise(n, sigmas, generator),
                                 sigmas,
                                 sampler=name, resample=resample, generator=generator, callback=callback, cond=y,
                                 guidance=guidance)
        finally:
            self.train(was_training)
        out = from_symmetric(x)
        out[:, :, keep.bool()] = image[:, keep.bool()]  # the known pixels, bit for bit
        return out
