"""Embeddings shared by the families: the sinusoidal embedding of a (possibly fractional) time step."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of time steps (Vaswani et al. 2017, sec. 3.5; as used by Ho et al. 2020).

    t: (B,) float or int time steps (fractional steps are fine) -> (B, dim) [cos | sin] features."""
    if dim % 2:
        raise ValueError(f"timestep embedding dim={dim} must be even")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)
