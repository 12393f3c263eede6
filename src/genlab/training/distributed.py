"""Training on several processes with PyTorch's own engine: `torchrun` starts the processes, `torch.distributed`
connects them (gloo on CPU, NCCL on GPUs) and DistributedDataParallel averages the gradients (DESIGN.md 2).

    torchrun --standalone --nproc-per-node 2 -m genlab train configs/gpt/shakespeare_char.toml
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m genlab train configs/gpt/shakespeare_char.toml          # the same command on every node

`train.batch_size` is per process: a step of N processes sees a global batch of N x batch_size examples. Every
process draws the same global batch from the same seeded generator and keeps its own contiguous slice of the rows
(the distributed sampler of genlab's random-window data), so N processes with batch B take the same steps as one
process with batch N x B (tests/e2e/test_distributed.py checks the weights). Only rank 0 writes checkpoints,
metrics, logs and the progress bar; every rank reads the same checkpoint to resume.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import ConfigError

log = logging.getLogger(__name__)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True in a process that torchrun started with more than one process in the job."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> None:
    """Join the process group that torchrun describes in the environment (idempotent; nothing to do without
    torchrun). Each process takes its share of this node's cores unless GENLAB_THREADS says otherwise, and a
    process that is not rank 0 logs only warnings."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: train on one process")
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    from ..core import runtime

    if runtime.threads_from_env() is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, runtime.cores() // local))
    if not is_main():
        logging.getLogger("genlab").setLevel(logging.WARNING)
    log.info("process group: %d processes (%s), %d threads each", world_size(), backend, torch.get_num_threads())


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the body first (it writes files: a tokenizer, a run folder); the other ranks wait, then run it
    (they read what rank 0 wrote)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(batch, r: int | None = None, n: int | None = None):
    """This rank's contiguous slice of the rows of a global batch (a tensor, or a tuple/list/dict of them)."""
    r, n = rank() if r is None else r, world_size() if n is None else n
    if n == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        per = batch.size(0) // n
        return batch[r * per:(r + 1) * per]
    if isinstance(batch, dict):
        return {k: shard(v, r, n) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, r, n) for v in batch)
    return batch


def mean(values: list[float]) -> list[float]:
    """The mean over ranks of each value (one all-reduce)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world_size()).tolist()


def total(values: list[float]) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def from_main(value: float) -> float:
    """Rank 0's value on every rank (so that every rank takes the same decision, e.g. to stop on a time budget)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(t, 0)
    return float(t.item())


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


class _Loss(nn.Module):
    """DDP and FSDP act on what runs through forward(): genlab's models train through loss(batch)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)

    def loss(self, batch):  # the held-out evaluation of a sharded model goes through forward too
        return self(batch)


class Sharded(_Loss):
    """The FSDP-sharded model (fully_shard turns an instance of this class into an FSDP module)."""


def wrap(model: nn.Module, how: str = "ddp") -> nn.Module:
    """A module whose forward(batch) is model.loss(batch), under DistributedDataParallel (`ddp`: it broadcasts rank
    0's weights at construction, so every rank starts equal) or FSDP2's fully_shard (`fsdp`: each block of a
    ModuleList, then the rest, is sharded over the ranks and gathered for its forward and backward; Zhao et al. 2023).
    """
    device = next(model.parameters()).device
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        with torch.no_grad():  # start from rank 0's weights, as DDP does
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, 0)
        root = Sharded(model)
        for m in list(model.modules()):
            if isinstance(m, nn.ModuleList):
                for block in m:
                    fully_shard(block)
        fully_shard(root)
        return root
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(_Loss(model), device_ids=ids)


def plain_copy(model: nn.Module) -> nn.Module:
    """An unsharded copy of the model on rank 0, into which the gathered weights are copied to write them (one copy of
    the weights: no gradients or optimizer state; tied weights stay tied)."""
    import copy

    return copy.deepcopy(model).requires_grad_(False)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model: nn.Module) -> dict:
    """The whole state dict of a sharded model, on rank 0 (on the CPU); a collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_state(model: nn.Module, optimizer, weights: dict, optim_state: dict, *, strict: bool) -> None:
    """Load whole (unsharded) model and optimizer states into the sharded model, each rank keeping its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_options(strict=strict))
    set_optimizer_state_dict(model, optimizer, optim_state, options=_options())


def value(t) -> float:
    """A scalar tensor's value; a DTensor (a sharded model's gradient norm) is gathered first."""
    full = getattr(t, "full_tensor", None)
    return float((full() if callable(full) else t).item())

