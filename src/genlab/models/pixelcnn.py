"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders").

An exact autoregressive image model: log p(x) = sum over pixels in raster order of log p(x_ij | x_<ij) (eq. 1).
Each gated layer has two stacks that together see the whole region above and to the left without the blind spot
of the masked PixelCNN (section 2.2):
- the vertical stack: a (k//2 + 1) x k convolution over the rows above, so that every vertical feature at row i
  depends only on rows < i (the first layer shifts its input down one row: mask type A; later layers may look at
  their own row of the previous vertical features, which already only see rows < i: mask type B);
- the horizontal stack: a 1 x (k//2 + 1) convolution over the pixels to the left in the same row (the first layer
  shifts its input right one pixel: mask type A), plus a 1x1 convolution of the vertical pre-activation, gated,
  projected by a 1x1 convolution and added residually (Fig. 2).
Gated units y = tanh(W_f * x + V_f h) * sigmoid(W_g * x + V_g h) (eq. 2, eq. 4 with the class embedding h as a
per-layer bias: the paper's conditioning on a one-hot class).

No convolution pads at the bottom, so the outputs for rows [0, i] depend only on input rows [0, i]: running the
network on the image cropped to rows [0, i] gives exactly those rows. Sampling goes further and keeps a cache:
the vertical stack is evaluated once per row, the horizontal stack once per pixel at that one position.

Output likelihood (config.output):
- "logistic_mixture" (default): the discretized logistic mixture of PixelCNN++ (Salimans et al. 2017, eq. 2) via
  genlab.nn.likelihoods, n_mix components per sub-pixel. For RGB the channels of a pixel are predicted in order
  R, G, B through PixelCNN++'s linear dependence of the means on the earlier channels of the same pixel (eq. 3):
  mu_G = mu_G' + a * x_R, mu_B = mu_B' + b * x_R + c * x_G (no channel masking in the network).
- "softmax": a 256-way softmax per sub-pixel; for RGB the three channels of a pixel are predicted independently
  given the previous pixels (a valid likelihood, a little weaker than channel masking).
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
    discretized_logistic_mixture_log_prob,
    sample_discretized_logistic_mixture,
    to_symmetric,
)
from . import check_image_fields, register_family

OUTPUTS = ("logistic_mixture", "softmax")


@dataclass(frozen=True)
class PixelCNNConfig:
    family: str = "pixelcnn"
    channels: int = 1  # filled from the data
    image_size: int = 28  # filled from the data
    num_classes: int = 0  # filled from the data (0 = no labels)
    conditional: bool = False  # class-conditional: a class embedding is a bias of every gated layer
    output: str = "logistic_mixture"  # or "softmax" (256-way per sub-pixel)
    n_mix: int = 5  # logistic mixture components per sub-pixel
    n_layers: int = 6  # gated layers (the first one is mask type A)
    hidden: int = 32  # feature maps p of each stack (gates compute 2p)
    kernel: int = 3  # k: vertical (k//2 + 1) x k, horizontal 1 x (k//2 + 1)
    head_hidden: int = 64  # the 1x1 output network: relu -> 1x1 (head_hidden) -> relu -> 1x1 (params)

    def validate(self):
        check_image_fields(self)
        if self.image_size < 1:
            raise ConfigError(f"model.image_size={self.image_size} must be >= 1")
        if self.output not in OUTPUTS:
            raise ConfigError(f"model.output={self.output!r} must be one of {', '.join(map(repr, OUTPUTS))}")
        if not 1 <= self.n_mix <= 64:
            raise ConfigError(f"model.n_mix={self.n_mix} must be in [1, 64]")
        for k in ("n_layers", "hidden", "head_hidden"):
            if getattr(self, k) < 1:
                raise ConfigError(f"model.{k}={getattr(self, k)} must be >= 1")
        if self.kernel < 3 or self.kernel % 2 == 0:
            raise ConfigError(f"model.kernel={self.kernel} must be an odd integer >= 3")


PRESETS = {
    "tiny": {"n_layers": 3, "hidden": 16, "kernel": 3, "head_hidden": 32, "n_mix": 3},
    # ~118k params; on Fashion-MNIST, per image seen, as good as 48-wide, 8-deep or 5x5 variants in the first
    # epochs, and 2-3x faster (scratch runs, bf16 autocast, Adam 3e-3, batch 32)
    "default": {"n_layers": 6, "hidden": 32, "kernel": 3, "head_hidden": 64, "n_mix": 5},
}


def gate(x: torch.Tensor) -> torch.Tensor:
    """tanh(a) * sigmoid(b) over the two halves of the channels (eq. 2): (B, 2p, ...) -> (B, p, ...)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer of both stacks (Fig. 2). Convolutions are 'valid' on explicitly padded inputs
    (pad_v / pad_h), so that the same weights serve the full pass and the cached one-row / one-pixel steps."""

    def __init__(self, c_in: int, p: int, k: int, mask_a: bool, num_classes: int):
        super().__init__()
        self.k, self.kh, self.kw, self.mask_a = k, k // 2 + 1, k // 2 + 1, mask_a
        self.residual = not mask_a  # the first layer changes the channel count
        self.v_conv = nn.Conv2d(c_in, 2 * p, (self.kh, k))  # rows i-kh+1..i of its (already causal) input
        self.v_to_h = nn.Conv2d(2 * p, 2 * p, 1)  # vertical pre-activation -> horizontal stack
        self.h_conv = nn.Conv2d(c_in, 2 * p, (1, self.kw))  # pixels j-kw+1..j of its input row
        self.h_out = nn.Conv2d(p, p, 1)
        self.cond = nn.Embedding(num_classes, 4 * p) if num_classes else None  # V_v h and V_h h (eq. 4)
        if self.cond is not None:
            nn.init.normal_(self.cond.weight, std=0.1)  # small, but labels matter from the start

    # padded layouts: v (B, C, H + kh - 1, W + 2(k//2)); h (B, C, H, W + kw - 1)
    def pad_v(self, v: torch.Tensor) -> torch.Tensor:
        s = self.k // 2
        if self.mask_a:  # shift down one row: row i sees input rows i-kh..i-1
            return F.pad(v, (s, s, self.kh, 0))[:, :, :-1]
        return F.pad(v, (s, s, self.kh - 1, 0))

    def pad_h(self, h: torch.Tensor) -> torch.Tensor:
        if self.mask_a:  # shift right one pixel: (i, j) sees input (i, j-kw..j-1)
            return F.pad(h, (self.kw, 0, 0, 0))[..., :-1]
        return F.pad(h, (self.kw - 1, 0, 0, 0))

    def forward(self, v, h, cond):
        """v, h: (B, c_in, H', W) -> (B, p, H', W) each; cond: (B, 4p) or None."""
        v_pre = self.v_conv(self.pad_v(v))  # (B, 2p, H', W)
        h_pre = self.h_conv(self.pad_h(h)) + self.v_to_h(v_pre)  # (B, 2p, H', W)
        if cond is not None:
            cv, ch = cond[:, :, None, None].chunk(2, dim=1)
            v_pre, h_pre = v_pre + cv, h_pre + ch
        h_new = self.h_out(gate(h_pre))
        return gate(v_pre), (h + h_new if self.residual else h_new)


@register_family("pixelcnn", PixelCNNConfig, PRESETS, modality="image")
class PixelCNN(nn.Module):
    def __init__(self, config: PixelCNNConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        C, p, K = c.channels, c.hidden, c.n_mix
        if c.output == "softmax":
            self.n_params = 256 * C
        else:  # logits, means, log-scales per channel and component (+ 3 channel coefficients for RGB)
            self.n_params = 3 * K * C + (3 * K if C == 3 else 0)
        n_cond = c.num_classes if c.conditional else 0
        # input: the image in [-1, 1] plus a channel of ones, so that zero padding is told apart from pixels
        self.layers = nn.ModuleList(
            GatedLayer(C + 1 if i == 0 else p, p, c.kernel, i == 0, n_cond) for i in range(c.n_layers)
        )
        self.head1 = nn.Conv2d(p, c.head_hidden, 1)
        self.head2 = nn.Conv2d(c.head_hidden, self.n_params, 1)

    def num_params(self) -> int:
        return sum(q.numel() for q in self.parameters())

    # ---- the network ----
    def _labels(self, y, n: int) -> torch.Tensor | None:
        """Class ids (n,) for a conditional model, None for an unconditional one (whose y is ignored)."""
        if not self.config.conditional:
            return None
        if y is None:
            raise ConfigError("this PixelCNN is class-conditional: pass y (class ids)")
        y = torch.as_tensor(y, dtype=torch.long).flatten()
        if len(y) != n or int(y.min()) < 0 or int(y.max()) >= self.config.num_classes:
            raise ConfigError(f"labels must be {n} class ids in [0, {self.config.num_classes - 1}]; "
                              f"got {y.tolist()[:12]}")
        return y

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H', W) -> (B, C + 1, H', W): the image in [-1, 1] and a channel of ones."""
        xs = to_symmetric(x)
        return torch.cat([xs, torch.ones_like(xs[:, :1])], dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 x (B, C, H', W) with H' <= image_size rows (a crop to rows [0, i] gives exactly those rows of the
        full output) -> distribution parameters (B, n_params, H', W); params at (i, j) see only x before (i, j)."""
        return self.net(self._input(x), self._labels(y, x.shape[0]))

    def net(self, inp: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The network on the float input (B, C + 1, H', W) of `_input`; y: checked class ids or None."""
        v = h = inp
        for layer in self.layers:
            v, h = layer(v, h, layer.cond(y) if y is not None else None)  # (B, p, H', W) each
        return self.head2(F.relu(self.head1(F.relu(h))))  # (B, n_params, H', W)

    # ---- the likelihood ----
    def _mixture(self, params: torch.Tensor):
        """(B, P, H, W) -> logits, means, log_scales (B, K, C, H, W) and the RGB coefficients (B, K, 3, H, W)."""
        B, _, H, W = params.shape
        C, K = self.config.channels, self.config.n_mix
        logits, means, log_scales = params[:, : 3 * K * C].reshape(B, 3, K, C, H, W).unbind(1)
        coeffs = torch.tanh(params[:, 3 * K * C :].reshape(B, K, 3, H, W)) if C == 3 else None
        return logits, means, log_scales, coeffs

    def _log_prob_params(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x_sub-pixel | its context) in nats, (B, C, H, W); params (B, P, H, W), computed in fp32."""
        params = params.float()
        B, _, H, W = params.shape
        if self.config.output == "softmax":
            logp = F.log_softmax(params.reshape(B, self.config.channels, 256, H, W), dim=2)
            return logp.gather(2, x.long().unsqueeze(2)).squeeze(2)
        logits, means, log_scales, coeffs = self._mixture(params)
        if coeffs is not None:  # PixelCNN++ eq. 3: the means of G and B depend linearly on R (and G)
            xs = to_symmetric(x).unsqueeze(1)  # (B, 1, 3, H, W)
            means = torch.stack([
                means[:, :, 0],
                means[:, :, 1] + coeffs[:, :, 0] * xs[:, :, 0],
                means[:, :, 2] + coeffs[:, :, 1] * xs[:, :, 0] + coeffs[:, :, 2] * xs[:, :, 1],
            ], dim=2)
        return discretized_logistic_mixture_log_prob(x, logits, means, log_scales)

    def log_prob(self, x: torch.Tensor, *, y: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Exact log P(x) in nats per image of the 8-bit images x (uint8 (B, C, H, W)), shape (B,). `generator` is
        unused (a discrete likelihood needs no dequantization noise); y: class ids for a conditional model."""
        return self._log_prob_params(x, self(x, y)).flatten(1).sum(dim=1)

    loss_unit = "nats/dim"  # what loss() returns, named wherever it is printed

    def loss(self, batch) -> StepOutput:
        x, y = batch
        lp = self.log_prob(x, y=y if self.config.conditional else None)  # (B,)
        loss = -lp.mean() / x[0].numel()  # nats per sub-pixel; the same in train and eval mode
        return StepOutput(loss, {"bits_per_dim": float(loss.detach()) / math.log(2)}, n_items=x.shape[0])

    # ---- sampling ----
    def _sample_pixel(self, params: torch.Tensor, generator, temperature: float) -> torch.Tensor:
        """One draw from the per-sub-pixel distribution: params (B, P, H, W) -> uint8 (B, C, H, W)."""
        params = params.float()
        B, _, H, W = params.shape
        C = self.config.channels
        if self.config.output == "softmax":
            logits = params.reshape(B, C, 256, H, W)
            if temperature <= 0:
                return logits.argmax(dim=2).to(torch.uint8)
            u = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-7)
            return (logits / temperature - torch.log(-torch.log(u))).argmax(dim=2).to(torch.uint8)  # Gumbel-max
        logits, means, log_scales, coeffs = self._mixture(params)
        if coeffs is None:
            return sample_discretized_logistic_mixture(logits, means, log_scales, generator=generator,
                                                       temperature=temperature)
        out = []  # R, then G given R, then B given R and G (PixelCNN++ eq. 3)
        for ch in range(3):
            mu = means[:, :, ch : ch + 1]  # (B, K, 1, H, W)
            if ch == 1:
                mu = mu + coeffs[:, :, 0:1] * to_symmetric(out[0]).unsqueeze(1)
            elif ch == 2:
                mu = mu + coeffs[:, :, 1:2] * to_symmetric(out[0]).unsqueeze(1) + coeffs[:, :, 2:3] * to_symmetric(
                    out[1]).unsqueeze(1)
            out.append(sample_discretized_logistic_mixture(
                logits[:, :, ch : ch + 1], mu, log_scales[:, :, ch : ch + 1], generator=generator,
                temperature=temperature))  # (B, 1, H, W)
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, labels: torch.Tensor | None = None,
               temperature: float = 1.0, cache: bool = True) -> torch.Tensor:
        """n images, uint8 (n, C, H, W), pixel by pixel in raster order. `temperature` scales the logistic spread and
        the mixture / softmax logits (1 = the model, 0 = the mode). `labels` (n,) class ids for a conditional model
        (default: cycling through the classes). cache=True (default) runs the vertical stack once per row and the
        horizontal stack once per pixel; cache=False reruns the network on the rows [0, i] for every pixel (slow;
        the reference the cache is tested against)."""
        c = self.config
        if labels is not None and not c.conditional:
            raise ConfigError("this PixelCNN is not class-conditional: it takes no labels")
        if c.conditional and labels is None:
            labels = torch.arange(n) % c.num_classes
        y = self._labels(labels, n)
        was_training = self.training
        self.eval()
        try:
            return (self._sample_cached if cache else self._sample_cropped)(n, y, generator, temperature)
        finally:
            self.train(was_training)

    def _sample_cropped(self, n, y, generator, temperature):
        C, S = self.config.channels, self.config.image_size
        x = torch.zeros(n, C, S, S, dtype=torch.uint8)
        for i in range(S):
            for j in range(S):
                params = self(x[:, :, : i + 1], y)[:, :, i : i + 1, j : j + 1]  # (n, P, 1, 1)
                x[:, :, i : i + 1, j : j + 1] = self._sample_pixel(params, generator, temperature)
        return x

    def _sample_cached(self, n, y, generator, temperature):
        C, S = self.config.channels, self.config.image_size
        layers = self.layers
        conds = [layer.cond(y) if y is not None else None for layer in layers]  # (n, 4p) each
        # padded input buffers of every layer: vertical (n, c_in, S + kh - 1, S + 2(k//2)) and horizontal, kept
        # channels-last (n, S, S + kw - 1, c_in) so that the window of one pixel is a (n, kw * c_in) view.
        x0 = self._input(torch.zeros(n, C, S, S, dtype=torch.uint8))
        x0[:, :C] = 0.0  # unknown pixels: never read before they are written (causality)
        vbuf = [layers[0].pad_v(x0)] + [layers[l].pad_v(torch.zeros(n, layers[l].h_out.out_channels, S, S))
                                        for l in range(1, len(layers))]
        hbuf = [layers[0].pad_h(x0).permute(0, 2, 3, 1).contiguous()] + [
            layers[l].pad_h(torch.zeros(n, layers[l].h_out.out_channels, S, S)).permute(0, 2, 3, 1).contiguous()
            for l in range(1, len(layers))]
        hfinal = torch.zeros(n, layers[-1].h_out.out_channels)
        # the per-pixel weights, as matrices over channels-last windows
        wh = [layer.h_conv.weight.permute(0, 2, 3, 1).reshape(layer.h_conv.out_channels, -1) for layer in layers]
        wo = [layer.h_out.weight.flatten(1) for layer in layers]
        w1, w2 = self.head1.weight.flatten(1), self.head2.weight.flatten(1)
        x = torch.zeros(n, C, S, S, dtype=torch.uint8)
        for i in range(S):
            links = []  # per layer: the horizontal pre-activation's part from above, (n, S, 2p)
            for l, layer in enumerate(layers):
                v_pre = F.conv2d(vbuf[l][:, :, i : i + layer.kh], layer.v_conv.weight, layer.v_conv.bias)  # (n,2p,1,S)
                link = layer.v_to_h(v_pre) + layer.h_conv.bias[None, :, None, None]  # (n, 2p, 1, S)
                if conds[l] is not None:
                    cv, ch = conds[l][:, :, None, None].chunk(2, dim=1)
                    v_pre, link = v_pre + cv, link + ch
                links.append(link[:, :, 0].transpose(1, 2).contiguous())  # (n, S, 2p)
                if l + 1 < len(layers):
                    nxt = layers[l + 1]
                    vbuf[l + 1][:, :, i + nxt.kh - 1, nxt.k // 2 : nxt.k // 2 + S] = gate(v_pre)[:, :, 0]
            for j in range(S):
                for l, layer in enumerate(layers):
                    win = hbuf[l][:, i, j : j + layer.kw].reshape(n, -1)  # (n, kw * c_in)
                    h = F.linear(gate(torch.addmm(links[l][:, j], win, wh[l].t())), wo[l], layer.h_out.bias)
                    if layer.residual:
                        h = h + hbuf[l][:, i, j + layer.kw - 1]  # (n, p)
                    if l + 1 < len(layers):
                        hbuf[l + 1][:, i, j + layers[l + 1].kw - 1] = h
                    else:
                        hfinal = h
                params = F.linear(F.relu(F.linear(F.relu(hfinal), w1, self.head1.bias)), w2, self.head2.bias)
                px = self._sample_pixel(params[:, :, None, None], generator, temperature)[:, :, 0, 0]  # (n, C)
                x[:, :, i, j] = px
                xs = to_symmetric(px)
                first = layers[0]  # mask A: pixel (i, j) enters the padded buffers one row / one pixel later
                if i + 1 < S:
                    vbuf[0][:, :C, i + first.kh, first.k // 2 + j] = xs
                if j + 1 < S:
                    hbuf[0][:, i, j + first.kw, :C] = xs
        return x
