"""Small result records shared across families."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar to minimise
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers to log (detached floats)
    n_items: int = 0  # tokens or images in the batch, for throughput
