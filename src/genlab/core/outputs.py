"""Small result records shared across families."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers to log (detached floats)
    n_items: int = 0  # tokens or images in the batch, for throughput


def format_loss(value: float, unit: str = "") -> str:
    """A loss with its unit: '1.5600 nats/token (2.2506 bits/token)', or '1.0000 (G+D loss, not a likelihood)'."""
    if unit.startswith("nats/"):
        per, _, note = unit[len("nats/"):].partition(" ")
        bits = f"{value / math.log(2):.4f} bits/{per}"
        return f"{value:.4f} nats/{per} ({bits}{', ' + note.strip('()') if note else ''})"
    return f"{value:.4f} ({unit})" if unit else f"{value:.4f}"


def loss_unit(model) -> str:
    """The unit of `model.loss()`, as the family names it (empty for a model that does not say)."""
    return getattr(model, "loss_unit", "")
