"""A U-Net for small images (Ronneberger et al. 2015), in the form DDPM uses (Ho et al. 2020, appendix B):
residual blocks with GroupNorm and a time embedding, self-attention at the low resolutions, an optional class
embedding. It maps (x, t, y) -> an output of x's shape and knows nothing about noise schedules or sampling
(DESIGN.md 3): the diffusion family and sampling/denoisers.py give that output its meaning.

Layout, for channel_mults (1, 2, 2) and base 32 on 28x28 images:
    conv_in 3x3                                          (B, 32, 28, 28)
    down:  level 0: res x n        -> downsample         (B, 32, 14, 14)
           level 1: res x n [+attn] -> downsample        (B, 64, 7, 7)
           level 2: res x n [+attn]                      (B, 64, 7, 7)
    mid:   res, attn, res
    up:    level 2..0: res x (n + 1) on [h, skip] [+attn] -> upsample (nearest + conv 3x3, as one
           stride-2 transposed convolution)
    out:   GroupNorm, SiLU, conv 3x3                     (B, C, 28, 28)
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.embeddings import timestep_embedding


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-5)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected embedding, GN-SiLU-dropout-conv, + (1x1) skip (Ho et al. 2020, appendix B)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-GroupNorm, residual."""

    def __init__(self, channels: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


def _nearest_up_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """3 taps of a convolution after 2x nearest upsampling -> the 4 taps of the stride-2 transposed convolution
    it equals along `dim`: out[2i] = w0 x[i-1] + (w1 + w2) x[i], out[2i+1] = (w0 + w1) x[i] + w2 x[i+1]."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)


class UpsampleConv(nn.Sequential):
    """2x nearest upsampling, then a 3x3 convolution (DDPM's upsampler), computed as the one stride-2 4x4
    transposed convolution that equals it (the resize-convolution of Odena et al. 2016, folded): the same function
    and parameters (the 3x3 convolution's, `.1.weight`, `.1.bias`), 2.25x fewer multiply-adds."""

    def __init__(self, channels: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self[1]
        w = _nearest_up_taps(_nearest_up_taps(conv.weight, 2), 3)  # (C_out, C_in, 4, 4)
        return F.conv_transpose2d(x, w.transpose(0, 1), conv.bias, stride=2, padding=1)


class UNet(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_levels: tuple[int, ...] = (2,),
        num_classes: int = 0,
        dropout: float = 0.0,
        groups: int = 8,
    ):
        """num_classes > 0 adds a class embedding with num_classes + 1 rows: the last row is the "no class" label
        that classifier-free guidance trains with (label dropout) and samples against."""
        super().__init__()
        chans = [base_channels * m for m in channel_mults]
        self.base = base_channels
        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips, c = [chans[0]], chans[0]
        for lvl, ch in enumerate(chans):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(c, ch, emb_dim, groups, dropout),
                                                 Attention(ch, groups) if lvl in attn_levels else nn.Identity()]))
                c = ch
                skips.append(c)
            if lvl < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid1 = ResBlock(c, c, emb_dim, groups, dropout)
        self.mid_attn = Attention(c, groups)
        self.mid2 = ResBlock(c, c, emb_dim, groups, dropout)
        self.up = nn.ModuleList()
        for lvl in reversed(range(len(chans))):
            ch = chans[lvl]
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(c + skips.pop(), ch, emb_dim, groups, dropout),
                                               Attention(ch, groups) if lvl in attn_levels else nn.Identity()]))
                c = ch
            if lvl > 0:
                self.up.append(UpsampleConv(c))
        self.norm_out = _norm(c, groups)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W), t (B,) time steps (float ok), y (B,) class ids (num_classes = no class) or None."""
        dtype = self.conv_in.weight.dtype  # the inputs follow the weights (fp32, or a bf16 copy for sampling)
        emb = self.time_mlp(timestep_embedding(t, self.base).to(dtype))  # (B, 4 base)
        if self.class_emb is not None:
            if y is None:
                raise ValueError("this U-Net is class-conditional: pass y (use num_classes for 'no class')")
            emb = emb + self.class_emb(y)
        h = self.conv_in(x.to(dtype))
        hs = [h]
        for block in self.down:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](h, emb))
            else:  # downsample
                h = block(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](torch.cat([h, hs.pop()], dim=1), emb))
            else:  # upsample
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)


@contextlib.contextmanager
def _onednn_fusion():
    prev = torch.jit.onednn_fusion_enabled()
    torch.jit.enable_onednn_fusion(True)
    try:
        yield
    finally:
        torch.jit.enable_onednn_fusion(prev)


class FusedUNet(nn.Module):
    """A network net(x, t[, y]) for CPU inference (this U-Net, or any module called that way): traced to
    TorchScript, frozen (the weights become constants) and run with oneDNN Graph fusion, which fuses the
    convolutions with their bias and the adds that follow into oneDNN kernels; GroupNorm and SiLU stay
    PyTorch ops. A bf16 U-Net samples 2-15% faster than its eager forward on AVX512-BF16 CPUs
    (benchmarks/diffusion.py). Traced on the first call of each input form (with or without y) in well under a
    second; the first two calls of a new input shape profile the graph, later ones run fused. If tracing fails
    the net runs eagerly, with a RuntimeWarning. Inference only: `net` must not be trained meanwhile."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval()
        self._traced: dict[bool, nn.Module] = {}

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("FusedUNet is for inference: call it under torch.no_grad() or inference_mode()")
        args = (x, t) + (() if y is None else (y,))
        traced = self._traced.get(y is not None)
        if traced is None:
            try:
                with warnings.catch_warnings():  # TorchScript's deprecation notices, GroupNorm's batch-size check
                    warnings.simplefilter("ignore")
                    traced = torch.jit.freeze(torch.jit.trace(self.net, args, check_trace=False))
            except Exception as e:  # noqa: BLE001  (any tracing failure; the net's own errors come back below)
                out = self.net(*args)
                warnings.warn(f"FusedUNet: tracing failed ({type(e).__name__}: {e}); running the U-Net eagerly",
                              RuntimeWarning, stacklevel=2)
                self._traced[y is not None] = self.net
                return out
            self._traced[y is not None] = traced
        with _onednn_fusion():
            return traced(*args)
