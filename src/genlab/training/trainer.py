"""The one training loop: `fit(model, data, cfg)` for every family (DESIGN.md 2).

It owns precision, gradient accumulation, clipping, the LR schedule, the step/time budget, EMA, the
NaN guard, periodic held-out evaluation, checkpoint/resume and the progress bar. It knows nothing of a
family's loss: the model's `loss(batch)` returns a `StepOutput`. Families estimated in closed form
(`HasClosedFormFit`, the n-gram) are fitted once and then evaluated and saved through the same path.

Resume is exact: the trainer state holds the raw and EMA weights, optimizer moments, step, elapsed time
and the states of the data generator and the global RNG (dropout), so a run killed at any moment and
resumed reaches the same weights as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import checkpoint as ckpt
from ..core import runtime
from ..core.config import to_dict
from ..core.errors import CheckpointError, ConfigError, TrainingDiverged
from ..core.outputs import format_loss, loss_unit
from ..core.protocols import HasClosedFormFit, HasCustomStep, HasStepSchedule
from . import callbacks as cb
from . import distributed
from .optim import adamw, lr_at

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps; 0 = no step limit (then max_minutes is required)
    max_minutes: float = 0.0  # wall-clock training budget; 0 = none
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 = off
    precision: str = "fp32"  # "fp32", "bf16" (autocast; fast only with AVX512-BF16/AMX) or "auto" (bf16 where fast)
    ema: float = 0.0  # EMA decay of the weights that are saved and evaluated; 0 = off
    eval_every: int = 250  # steps; 0 = only at the end
    eval_batches: int = 20  # held-out batches per evaluation
    checkpoint_every: int = 500  # steps; 0 = only at the end
    log_every: int = 10
    progress: bool = True  # a progress bar on a terminal, else a log line every few seconds; false = neither
    threads: int = 0  # CPU threads for torch; 0 = the process's setting (the CLI: --threads, GENLAB_THREADS or auto)
    parallel: str = "ddp"  # under torchrun: "ddp" (a whole copy per process) or "fsdp" (weights, gradients and
    # optimizer state sharded over the processes: for a model that does not fit one; training/distributed.py)

    def validate(self):
        checks = [
            ("max_steps", self.max_steps >= 0, ">= 0"),
            ("max_minutes", self.max_minutes >= 0, ">= 0"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("lr", 0 < self.lr < 10, "in (0, 10)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 = off)"),
            ("precision", self.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
            ("ema", 0 <= self.ema < 1, "in [0, 1) (0 = off)"),
            ("eval_every", self.eval_every >= 0, ">= 0"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("threads", 0 <= self.threads <= 1024, "in [0, 1024] (0 = the process's setting)"),
            ("parallel", self.parallel in ("ddp", "fsdp"), "'ddp' or 'fsdp'"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be {allowed}")
        if self.max_steps == 0 and self.max_minutes == 0:
            raise ConfigError("set a budget: train.max_steps > 0 or train.max_minutes > 0")


@dataclass
class FitResult:
    step: int
    elapsed_s: float
    train_loss: float | None
    val_loss: float | None
    stopped_by: str
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_unit: str = ""  # the unit of train_loss / val_loss, as the family names it


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list, precision: str = "fp32") -> float:
    """Mean held-out loss per item (token, pixel...) over fixed batches."""
    total, n = _loss_sums(model, batches, precision)
    return total / max(n, 1)


@torch.no_grad()
def _loss_sums(model: nn.Module, batches: list, precision: str) -> tuple[float, int]:
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with _autocast(precision):
            for batch in batches:
                out = model.loss(batch)
                k = out.n_items or 1
                total += out.loss.float().item() * k
                n += k
    finally:
        model.train(was_training)
    return total, n


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))


class _Metrics:
    """metrics.jsonl: one JSON object per line, flushed as written; trimmed back on resume."""

    def __init__(self, path: Path | None):
        self.path = path
        self._f = None

    def open(self, keep_until_step: int | None):
        if self.path is None:
            return
        if keep_until_step is None:
            ckpt.atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line)
            ckpt.atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- open for the run; close() closes

    def write(self, rec: dict[str, Any]):
        if self._f is not None:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()

    def close(self):
        if self._f is not None:
            self._f.close()


def fit(
    model: nn.Module,
    data,
    cfg: TrainConfig,
    *,
    run_dir: str | Path | None = None,
    seed: int = 0,
    resume: bool = False,
    callbacks=(),
    write_weights=None,
) -> FitResult:
    """Train `model` on `data` (a BatchSource) under `cfg`. With `run_dir`, checkpoints go there.

    A model with frozen parameters (a LoRA fine-tune) checkpoints only the parameters that train: the frozen
    ones come from its base. `write_weights(run_dir, model)` replaces the default weights file (model.safetensors),
    e.g. with an adapter folder."""
    run_dir = Path(run_dir) if run_dir is not None else None
    if any(getattr(m, "quantized", False) for m in model.modules()) and \
            any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n):  # LoRA over it may train
        raise ConfigError("this model has quantized weights (int8/int4): they are for inference and cannot be "
                          "trained; train or fine-tune the full-precision run, then quantize it")
    cfg = dataclasses.replace(cfg, precision=runtime.resolve_precision(cfg.precision))
    if resume and run_dir is None:
        raise ConfigError("resume needs a run folder")
    if distributed.world_size() > 1 and isinstance(model, HasClosedFormFit):
        raise ConfigError(f"{type(model).__name__} is counted in closed form in seconds: train it on one process "
                          "(without torchrun)")
    if run_dir is not None and distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed in the middle of a write
            stale.unlink(missing_ok=True)
    with torch.random.fork_rng(devices=[]):  # seed dropout without touching the caller's global RNG
        torch.manual_seed(seed + distributed.rank())  # each process its own dropout masks
        if isinstance(model, HasClosedFormFit):
            return _fit_closed_form(model, data, cfg, run_dir, callbacks)
        return _fit_gradient(model, data, cfg, run_dir, seed, resume, callbacks, write_weights)


def _fit_closed_form(model, data, cfg, run_dir, callbacks) -> FitResult:
    t0 = time.perf_counter()
    stats = model.fit_data(data)
    elapsed = time.perf_counter() - t0
    val = evaluate_loss(model, data.eval_batches(cfg.batch_size, cfg.eval_batches))
    log.info("fitted in closed form in %.1f s; held-out loss %s", elapsed, format_loss(val, loss_unit(model)))
    rec = {"step": 1, "time_s": round(elapsed, 3), "val_loss": val, **stats}
    metrics = _Metrics(run_dir / ckpt.METRICS if run_dir else None)
    metrics.open(None)
    metrics.write(rec)
    metrics.close()
    cb.call(callbacks, "on_log", rec)
    if run_dir is not None:
        ckpt.save_weights(run_dir / ckpt.WEIGHTS, model)
        ckpt.save_trainer_state(run_dir / ckpt.TRAINER_STATE, {"step": 1, "elapsed_s": elapsed, "done": True})
        cb.call(callbacks, "on_checkpoint", 1, run_dir)
    return FitResult(1, elapsed, None, val, "closed_form", [rec], loss_unit(model))


def _fit_gradient(model, data, cfg: TrainConfig, run_dir, seed, resume, callbacks, write_weights=None) -> FitResult:
    model.train()
    if next(model.parameters()).device.type == "cpu":
        runtime.reuse_freed_memory()  # no mmap + page faults per large tensor per step
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError(f"{type(model).__name__} has no trainable parameter (all are frozen)")
    partial = len(trainable) < len(dict(model.named_parameters()))

    custom = isinstance(model, HasCustomStep)
    world, main = distributed.world_size(), distributed.is_main()
    fsdp = world > 1 and cfg.parallel == "fsdp"
    if custom and world > 1:
        raise ConfigError(f"{type(model).__name__} makes its own update steps with several optimizers, which "
                          "DistributedDataParallel does not cover here: train it on one process (without torchrun)")
    if fsdp and cfg.ema:
        raise ConfigError("train.ema is not kept with train.parallel='fsdp' (an averaged copy would not be sharded); "
                          "set train.ema=0 or use train.parallel='ddp'")
    # DDP averages the gradients over processes; FSDP also shards the weights (before the optimizer sees them)
    shell = distributed.plain_copy(model) if fsdp and main else None  # rank 0 writes full weights through it
    step_loss = distributed.wrap(model, cfg.parallel) if world > 1 else model.loss

    def model_state():  # a frozen base is not checkpointed: only what trains
        sd = distributed.full_state_dict(model) if fsdp else model.state_dict()  # FSDP: every rank gathers
        return {k: v for k, v in sd.items() if k in trainable} if partial else sd

    if custom and cfg.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={cfg.grad_accum}: {type(model).__name__} makes its own update steps; "
                          "use train.grad_accum=1 and a larger train.batch_size")
    if custom:  # a family with several players owns its optimizers and its update (GANs)
        opts = dict(model.make_optimizers(cfg))
    else:
        opts = {"model": adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))}
    scheduled = isinstance(model, HasStepSchedule)
    ema_model = None
    if cfg.ema > 0:
        ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    step, elapsed = 0, 0.0
    resumed_val = None
    if resume:
        state = ckpt.load_trainer_state(run_dir / ckpt.TRAINER_STATE)
        try:
            if partial and set(state["model"]) != trainable:
                raise KeyError("the checkpoint holds other trainable parameters than this model")
            if state.get("sharded", False) != fsdp:
                raise KeyError(f"it was saved with train.parallel={'fsdp' if state.get('sharded') else 'ddp'} "
                               "(or one process): resume it the same way")
            if fsdp:
                distributed.load_full_state(model, opts["model"], state["model"], state["optimizers"]["model"],
                                            strict=not partial)
            else:
                model.load_state_dict(state["model"], strict=not partial)
            if set(state["optimizers"]) != set(opts):
                raise KeyError(f"optimizers {sorted(state['optimizers'])} != {sorted(opts)}")
            for k, o in opts.items():
                if not fsdp:
                    o.load_state_dict(state["optimizers"][k])
            if ema_model is not None:
                ema_model.load_state_dict(state["ema"])
            gen.set_state(state["data_rng"])
            rngs = state.get("torch_rng_ranks") or [state["torch_rng"]]
            if len(rngs) != world:
                log.warning("the run was saved by %d process(es) and resumes on %d: the global batch is now %d, and "
                            "dropout draws new masks", len(rngs), world, world * cfg.batch_size)
            torch.set_rng_state(rngs[distributed.rank()] if len(rngs) == world else rngs[0])
            step, elapsed = int(state["step"]), float(state["elapsed_s"])
            resumed_val = state.get("last_val")
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{run_dir / ckpt.TRAINER_STATE} does not match this model/config ({str(e)[:200]})"
            ) from None
        log.info("resuming %s from step %d", run_dir, step)
    metrics = _Metrics(run_dir / ckpt.METRICS if run_dir and main else None)  # rank 0 writes, the others compute
    metrics.open(step if resume else None)
    eval_batches = data.eval_batches(cfg.batch_size * world, cfg.eval_batches)  # global batches; ranks share them
    budget_s = cfg.max_minutes * 60

    def progress_of(step, elapsed):
        parts = []
        if cfg.max_steps:
            parts.append(step / cfg.max_steps)
        if budget_s:
            parts.append(elapsed / budget_s)
        return max(parts)

    def save(step, elapsed):
        rngs = distributed.gather(torch.get_rng_state())  # every rank's dropout stream, for an exact resume
        if run_dir is None:
            return
        weights = model_state()
        optimizers = {k: distributed.full_optimizer_state(model, o) if fsdp else o.state_dict()
                      for k, o in opts.items()}
        if not main:
            return
        ckpt.save_trainer_state(
            run_dir / ckpt.TRAINER_STATE,
            {
                "step": step,
                "elapsed_s": elapsed,
                "model": weights,
                "sharded": fsdp,
                "optimizers": optimizers,
                "ema": ema_model.state_dict() if ema_model is not None else {},
                "data_rng": gen.get_state(),
                "torch_rng": rngs[0],
                "torch_rng_ranks": rngs,
                "train_config": to_dict(cfg),
                "last_val": last_val,
            },
        )
        best = ema_model if ema_model is not None else model
        if fsdp:  # the gathered weights in a plain (unsharded) copy of the model
            best = shell
            with torch.no_grad():
                best.load_state_dict(weights, strict=not partial)
        if write_weights is not None:
            write_weights(run_dir, best)
        else:
            ckpt.save_weights(run_dir / ckpt.WEIGHTS, best)
        cb.call(callbacks, "on_checkpoint", step, run_dir)

    report = _Progress(cfg, budget_s, step, elapsed, loss_unit(model), show=main)
    callbacks = callbacks if main else ()  # previews, logs: rank 0 only
    history: list[dict[str, Any]] = []
    last_train, last_val, stopped_by = None, resumed_val, ""
    last_ckpt = step if resume else None
    window_items, window_t = 0, time.perf_counter()
    seg_start = time.perf_counter() - elapsed  # wall clock of this segment, offset by time already spent
    try:
        while True:
            elapsed = distributed.from_main(time.perf_counter() - seg_start)  # every rank stops at the same step
            if cfg.max_steps and step >= cfg.max_steps:
                stopped_by = "max_steps"
                break
            if budget_s and elapsed >= budget_s:
                stopped_by = "max_minutes"
                break
            lr = lr_at(progress_of(step, elapsed), step, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio)
            for o in opts.values():
                for g in o.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
            if scheduled:
                model.set_train_step(step)
            if custom:
                batch = data.train_batch(cfg.batch_size, gen)
                extra = {k: float(v) for k, v in model.train_step(batch, opts, step).items()}
                for k, v in extra.items():
                    if not _finite(v):
                        raise _diverged(v, step, last_ckpt, run_dir, what=k)
                last_train, items, gnorm = extra.get("loss", 0.0), len(batch[0]), 0.0
            else:
                loss_sum, items, extra = 0.0, 0, {}
                for micro in range(cfg.grad_accum):
                    # every rank draws the same global batch and keeps its own rows (the distributed sampler)
                    batch = distributed.shard(data.train_batch(cfg.batch_size * world, gen))
                    sync = world == 1 or micro == cfg.grad_accum - 1  # DDP averages once, after the last micro-batch
                    with contextlib.nullcontext() if sync else step_loss.no_sync():
                        with _autocast(cfg.precision):
                            out = step_loss(batch)
                        loss_val = out.loss.item()
                        if world == 1 and not _finite(loss_val):  # several ranks check the averaged loss below
                            raise _diverged(loss_val, step, last_ckpt, run_dir)
                        (out.loss / cfg.grad_accum).backward()
                    loss_sum += loss_val
                    items += out.n_items
                    for k, v in out.metrics.items():
                        extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
                if world > 1:
                    keys = sorted(extra)
                    loss_sum, *vals = distributed.mean([loss_sum, *(extra[k] for k in keys)])
                    extra = dict(zip(keys, vals, strict=True))
                    items = int(distributed.total([items])[0])
                    if not _finite(loss_sum):
                        raise _diverged(loss_sum, step, last_ckpt, run_dir)
                gnorm = (
                    distributed.value(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
                    if cfg.grad_clip else 0.0
                )
                if not _finite(gnorm):
                    raise _diverged(gnorm, step, last_ckpt, run_dir, what="gradient norm")
                for o in opts.values():
                    o.step()
                    o.zero_grad(set_to_none=True)
                last_train = loss_sum / cfg.grad_accum
            if ema_model is not None:
                _ema_update(ema_model, model, ema_decay(cfg.ema, step))
            step += 1
            window_items += items
            report.step(step, time.perf_counter() - seg_start, last_train)
            if step % cfg.log_every == 0:
                now = time.perf_counter()
                rate = window_items / max(now - window_t, 1e-9)
                window_items, window_t = 0, now
                rec = {"step": step, "time_s": round(now - seg_start, 3), "train_loss": round(last_train, 5),
                       "lr": lr, "grad_norm": round(gnorm, 4), "items_per_s": round(rate, 1),
                       **{k: round(v, 5) for k, v in extra.items() if k != "loss"}}
                metrics.write(rec)
                history.append(rec)
                cb.call(callbacks, "on_log", rec)
                report.rate = rate
            if cfg.eval_every and step % cfg.eval_every == 0:
                last_val = _eval(ema_model or (step_loss if fsdp else model), eval_batches, cfg, step, seg_start,
                                 metrics, history, callbacks)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(step, time.perf_counter() - seg_start)
                last_ckpt = step
        elapsed = time.perf_counter() - seg_start
        if not (cfg.eval_every and step % cfg.eval_every == 0 and last_val is not None):
            last_val = _eval(ema_model or (step_loss if fsdp else model), eval_batches, cfg, step, seg_start, metrics,
                             history, callbacks)
        if last_ckpt != step:
            save(step, elapsed)
        distributed.barrier()  # the files are written when any rank returns
    finally:
        report.close()
        metrics.close()
    return FitResult(step, elapsed, last_train, last_val, stopped_by, history, loss_unit(model))


class _Progress:
    """Progress on stderr: a bar on a terminal (over the wall-clock budget when there is one, else over the
    steps); otherwise a log line at the first speed reading and every `every_s` seconds after it (a file or a
    pipe gets lines, not carriage returns); nothing when train.progress is false or the log is quiet (-q)."""

    every_s = 10.0

    def __init__(self, cfg: TrainConfig, budget_s: float, step: int, elapsed: float, unit: str, show: bool = True):
        self.cfg, self.budget_s, self.unit, self.rate = cfg, budget_s, unit, None
        self.items = "tokens" if unit.endswith("/token") else "images"
        on = show and cfg.progress and log.isEnabledFor(logging.INFO)
        self.bar, self.lines, self.last_line = None, False, None
        if on and sys.stderr.isatty():
            from tqdm import tqdm

            if budget_s:  # the budget that stops the run sets the bar: seconds, with steps as a postfix
                self.bar = tqdm(total=round(budget_s), initial=min(round(elapsed), round(budget_s)), file=sys.stderr,
                                dynamic_ncols=True, desc="train", unit="s", leave=True,
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
            else:
                self.bar = tqdm(total=cfg.max_steps, initial=step, file=sys.stderr, dynamic_ncols=True, desc="train",
                                unit="step", leave=True)
        else:
            self.lines = on

    def _fraction(self, step: int, elapsed: float) -> float:
        parts = [step / self.cfg.max_steps] if self.cfg.max_steps else []
        return max(parts + ([elapsed / self.budget_s] if self.budget_s else []))

    def step(self, step: int, elapsed: float, loss: float | None) -> None:
        if self.bar is not None:
            if self.budget_s:
                self.bar.n = min(elapsed, self.budget_s)
                steps = f"{step}/{self.cfg.max_steps}" if self.cfg.max_steps else str(step)
                self.bar.set_postfix_str(f"step {steps}" + (f", loss {loss:.3f}" if loss is not None else ""),
                                         refresh=False)
                if step % 10 == 0:
                    self.bar.refresh()
            else:
                self.bar.update(1)
                if loss is not None and step % 10 == 0:
                    self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            return
        now = time.perf_counter()
        first = self.last_line is None and self.rate is not None  # as soon as a speed is known, then every_s
        if not self.lines or not (first or (self.last_line is not None and now - self.last_line >= self.every_s)):
            return
        self.last_line = now
        frac = self._fraction(step, elapsed)
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        total = f"/{self.cfg.max_steps}" if self.cfg.max_steps else ""
        budget = f" of {self.budget_s:.0f} s" if self.budget_s else ""
        rate = f", {self.rate:,.0f} {self.items}/s" if self.rate else ""
        loss_text = f", train loss {format_loss(loss, self.unit)}" if loss is not None else ""
        log.info("step %d%s (%.0f%%), %.0f s%s, about %.0f s left%s%s", step, total, 100 * frac, elapsed, budget,
                 eta, loss_text, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def ema_decay(decay: float, step: int) -> float:
    """The EMA decay after `step` updates, warmed up as min(decay, (1 + step) / (10 + step)) (the schedule of
    diffusers' EMAModel), so the average does not drag the random initial weights through a short run."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def _ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * live, for the parameters and for the floating-point buffers (batch-norm
    running statistics follow the averaged weights they normalise, as in timm's ModelEmaV2); integer and bool
    buffers (counters, flags, permutations) are copied."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    for b_ema, b in zip(ema_model.buffers(), model.buffers(), strict=True):
        if b.is_floating_point():
            b_ema.lerp_(b, 1 - decay)
        else:
            b_ema.copy_(b)


def _eval(model, batches, cfg, step, seg_start, metrics, history, callbacks) -> float:
    if isinstance(model, distributed.Sharded):  # every forward is collective: every rank scores every batch
        total, items = _loss_sums(model, batches, cfg.precision)
        callbacks = [c for c in callbacks if not hasattr(c, "on_eval")]  # a preview would sample on rank 0 alone
    else:
        r, n = distributed.rank(), distributed.world_size()
        total, items = distributed.total(list(_loss_sums(model, batches[r::n], cfg.precision)))  # each rank a share
    val = total / max(items, 1)
    rec = {"step": step, "time_s": round(time.perf_counter() - seg_start, 3), "val_loss": round(val, 5)}
    metrics.write(rec)
    history.append(rec)
    cb.call(callbacks, "on_log", rec)
    cb.call(callbacks, "on_eval", step, model, val)
    return val


def _diverged(value, step, last_ckpt, run_dir, what="loss") -> TrainingDiverged:
    kept = (
        f"the last good checkpoint (step {last_ckpt}) is kept in {run_dir}"
        if last_ckpt is not None and run_dir is not None
        else "no checkpoint had been written yet"
    )
    return TrainingDiverged(f"{what} became {value} at step {step + 1}; training stopped and {kept}. "
                            "Try a lower train.lr, train.grad_clip > 0, or train.precision='fp32'")
