"""Callbacks: objects with any of these methods, called by `fit` (all optional)."""

from __future__ import annotations

from typing import Any, Protocol


class Callback(Protocol):
    def on_log(self, record: dict[str, Any]) -> None: ...  # every train.log_every steps and every eval

    def on_checkpoint(self, step: int, run_dir) -> None: ...  # after a checkpoint is on disk

    def on_eval(self, step: int, model, val_loss: float) -> None: ...  # after each held-out evaluation, with
    #                                                                     the model that was evaluated (the EMA)


def call(callbacks, name: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, name, None)
        if fn is not None:
            fn(*args)
