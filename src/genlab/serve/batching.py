"""The server's concurrency for language models: one engine thread per model runs continuous batching
(sampling/text.py `BatchDecoder`): requests join the running batch between decode steps and leave it when done,
so many clients share each forward pass. A bounded queue refuses work beyond it (the app answers 429 with
Retry-After); a cancelled request (its client went away) or one past its deadline leaves at the next step.
Models without continuous batching (the n-gram baseline), and any model given one slot, are served one request at
a time by the same thread through the ordinary generate loop."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..sampling.text import BatchDecoder, SamplingConfig, Sequence, iter_tokens

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: float):
        super().__init__("the server is busy: too many requests are waiting")
        self.retry_after = retry_after


@dataclass(eq=False)
class Job:
    """One sample to generate. `emit(text, done, finish_reason)` is called from the engine thread for every new
    piece of text; `finish_reason` is "stop", "length", "cancelled" or "timeout" on the last call, or "error"."""

    prompt: list[int]
    cfg: SamplingConfig
    eos: set[int]
    emit: Callable[[str, bool, str | None], None]
    generator: torch.Generator | None = None
    deadline: float = float("inf")  # time.monotonic() after which the sample ends with "timeout"
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    completion_tokens: int = 0
    error: Exception | None = None

    def cancel(self) -> None:
        self.cancelled = True


class TextEngine:
    def __init__(self, model, tokenizer, *, slots: int = 16, max_queue: int = 64, name: str = "",
                 max_len: int | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.slots, self.max_queue = slots, max_queue
        # one slot: genlab's single-stream decode loop (its fastest path at batch 1), one request at a time
        batching = slots > 1 and getattr(model, "continuous_batching", False)
        self.decoder = BatchDecoder(model, slots, max_len) if batching else None
        self.context = self.decoder.max_len if self.decoder else model.context_size  # what one request may use
        self.waiting: deque[Job] = deque()
        self.active: list[tuple[Job, Sequence]] = []  # row r of the decoder is active[r]
        self.tokens_generated = 0
        self._cv = threading.Condition()
        self._stop = False
        self._step_time = 0.05  # a running estimate of one decode step, for Retry-After
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- the client side (any thread) --
    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(retry_after=max(1.0, self._step_time * job.cfg.max_new_tokens))
            self.waiting.append(job)
            self._cv.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        return len(self.active)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # -- the engine thread --
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.active:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                if self.decoder is None:
                    self._serve_one()
                else:
                    self._admit()
                    self._step()
            except Exception as e:
                log.exception("engine %s failed", self.name)
                for job, _ in self.active:
                    self._fail(job, e)
                while self.decoder is not None and self.decoder.rows:
                    self.decoder.remove(self.decoder.rows - 1)
                self.active.clear()
        for job, _ in self.active:
            job.emit("", True, "cancelled")
        for job in self.waiting:
            job.emit("", True, "cancelled")

    def _fail(self, job: Job, e: Exception) -> None:
        job.error = e
        job.emit("", True, "error")

    def _next(self) -> Job | None:
        with self._cv:
            while self.waiting:
                job = self.waiting.popleft()
                if not job.cancelled:
                    return job
                job.emit("", True, "cancelled")
        return None

    def _admit(self) -> None:
        """Move waiting jobs into the free rows: their prompts are prefilled together in one forward pass."""
        joining: list[Job] = []
        while self.decoder.rows + len(joining) < self.slots and (job := self._next()) is not None:
            if job.cfg.max_new_tokens == 0:
                job.emit("", True, "length")
            elif not 1 <= len(job.prompt) < self.decoder.max_len:
                self._fail(job, ValueError(f"a prompt of {len(job.prompt)} tokens does not fit the context"))
            else:
                joining.append(job)
        if not joining:
            return
        first = self.decoder.rows
        try:
            logits = self.decoder.add_many([job.prompt for job in joining])
        except Exception as e:  # noqa: BLE001 - reported to their clients
            for job in joining:
                self._fail(job, e)
            return
        done = []
        for i, job in enumerate(joining):
            seq = Sequence(job.prompt, job.cfg, self.tokenizer, job.eos, job.generator)
            self.active.append((job, seq))
            if self._deliver(job, seq, seq.next_token(logits[i]), first + i):
                done.append(first + i)
        self._remove(done)

    def _step(self) -> None:
        if not self.active:
            return
        t0 = time.perf_counter()
        logits = self.decoder.step([int(seq.history[0, -1]) for _, seq in self.active])
        done = [r for r, (job, seq) in enumerate(self.active) if self._deliver(job, seq, seq.next_token(logits[r]), r)]
        self._remove(done)
        self._step_time = 0.9 * self._step_time + 0.1 * (time.perf_counter() - t0)

    def _remove(self, rows: list[int]) -> None:
        for r in sorted(rows, reverse=True):  # the last row moves into a freed one: free from the end
            moved = self.decoder.remove(r)
            if moved is not None:
                self.active[r] = self.active[moved]
            self.active.pop()

    def _deliver(self, job: Job, seq: Sequence, token: int, row: int | None) -> bool:
        """Hand one new token to its job -> whether the job is finished."""
        self.tokens_generated += 1
        if job.first_token is None:
            job.first_token = time.monotonic()
        piece = seq.text.push(token)
        job.completion_tokens = seq.new_tokens
        reason = None
        if seq.text.done:
            reason = "stop"
        elif seq.new_tokens >= job.cfg.max_new_tokens:
            reason = "length"
        elif row is not None and self.decoder.length(row) >= self.decoder.max_len:
            reason = "length"  # the context is full
        elif job.cancelled:
            reason = "cancelled"
        elif time.monotonic() > job.deadline:
            reason = "timeout"
        if reason is not None and not seq.text.done:
            piece += seq.text.finish(reason)
        if piece or reason:
            job.emit(piece, reason is not None, reason)
        return reason is not None

    def _serve_one(self) -> None:
        job = self._next()
        if job is None:
            return
        if job.cfg.max_new_tokens == 0:
            job.emit("", True, "length")
            return
        seq = Sequence(job.prompt, job.cfg, self.tokenizer, job.eos, job.generator)
        prompt = torch.tensor([job.prompt], dtype=torch.long)
        try:
            for tok in iter_tokens(self.model, prompt, seq.cfg, seq.generator):
                seq.new_tokens += 1
                if self._deliver(job, seq, int(tok), None):
                    return
        except Exception as e:  # noqa: BLE001 - reported to its client
            self._fail(job, e)
