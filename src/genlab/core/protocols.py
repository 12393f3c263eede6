"""Capabilities as small Protocols (DESIGN.md 2): a family implements the ones it can honour."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from .outputs import StepOutput


@runtime_checkable
class GenerativeModel(Protocol):
    config: Any  # frozen dataclass; config.family names the family

    def loss(self, batch) -> StepOutput: ...

    def sample(self, n: int, *, generator: torch.Generator | None = None, **controls): ...


@runtime_checkable
class HasLogProb(Protocol):
    """Exact log-likelihood, nats per example, shape (B,)."""

    def log_prob(self, x) -> torch.Tensor: ...


@runtime_checkable
class HasELBO(Protocol):
    """A bound on the log-likelihood (k > 1: importance weighted)."""

    def elbo(self, x, *, k: int = 1) -> torch.Tensor: ...


@runtime_checkable
class HasCustomStep(Protocol):
    """Families with several optimizers or a manual backward (GANs): `fit` asks the model for its optimizers
    once, sets each param group's lr to `schedule(step) * group.get("lr_scale", 1)` every step, and lets
    `train_step` do the whole update, returning the numbers to log."""

    def make_optimizers(self, train_cfg) -> dict[str, torch.optim.Optimizer]: ...

    def train_step(self, batch, optimizers, step: int) -> dict[str, float]: ...


@runtime_checkable
class HasStepSchedule(Protocol):
    """Families whose training loss depends on the step (a VAE's KL warm-up): `fit` calls this before every
    optimizer step, resumed runs included, so no schedule hides in a counter."""

    def set_train_step(self, step: int) -> None: ...


@runtime_checkable
class HasClosedFormFit(Protocol):
    """Families estimated by counting rather than gradients (n-gram): `fit` calls this once."""

    def fit_data(self, data) -> dict[str, float]: ...


@runtime_checkable
class HasIncrementalDecode(Protocol):
    """Autoregressive token models: the one generate loop in sampling/text.py drives these.

    `new_cache(batch, max_len)` returns a fresh cache; `decode(ids, cache)` appends `ids` (B, T) to the
    cache and returns next-token logits (B, V) for the last position. `context_size` is the most
    tokens the model can attend to (None = unbounded)."""

    context_size: int | None

    def new_cache(self, batch: int, max_len: int) -> Any: ...

    def decode(self, ids: torch.Tensor, cache: Any) -> torch.Tensor: ...


class BatchSource(Protocol):
    """What `fit` trains on: random training batches and a fixed list of held-out batches."""

    def train_batch(self, batch_size: int, generator: torch.Generator): ...

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> list: ...
