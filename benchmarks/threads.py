"""Threads on a busy machine: torch's default (one thread per core) against genlab's auto choice.

A neighbour process keeps one core busy (a Python loop), as another job on a shared laptop or server would.
In that setting we time two everyday jobs, each with every thread count from 1 to the number of cores:

- generating 300 tokens with the `baby` GPT (batch 1, temperature 0.8), the `genlab generate` path;
- 60 training steps of the `baby` GPT on Shakespeare characters (batch 32 x 64, fp32).

Each job runs in a fresh subprocess with its thread count set by `genlab --threads N`'s variable
(GENLAB_THREADS), so nothing is shared between measurements; the same jobs are also timed with no neighbour.
The subprocess with no thread setting shows what `auto` picks.

    python benchmarks/threads.py            # a few minutes on 2 cores
    python benchmarks/threads.py --quick    # smoke run

Writes benchmarks/results/threads.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genlab.core.checkpoint import atomic_write_json
from genlab.core.runtime import cores, native_bf16

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "threads.json"

JOB = r"""
import json, sys, time, torch
from genlab import api
from genlab.core import runtime
kind, steps, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n = runtime.configure_threads(announce=False)
if kind == "generate":
    torch.manual_seed(0)
    model = api.build({"family": "gpt", "preset": "baby"}, vocab_size=65).eval()
    from genlab.sampling.text import generate_ids
    ids = [[0] * 8]
    generate_ids(model, ids, max_new_tokens=20, temperature=0.8, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    generate_ids(model, ids, max_new_tokens=new, temperature=0.8, generator=torch.Generator().manual_seed(0))
else:
    cfg = api.resolve_config(base={"name": "t", "out_dir": sys.argv[4], "seed": 0,
        "data": {"source": "shakespeare", "tokenizer": "char", "val_fraction": 0.1},
        "model": {"family": "gpt", "preset": "baby"},
        "train": {"max_steps": steps, "batch_size": 32, "lr": 3e-3, "precision": "fp32", "eval_every": 0,
                  "eval_batches": 1, "checkpoint_every": 0, "progress": False}})
    _, res = api.train(cfg, overwrite=True)
    t0 = time.perf_counter() - res.elapsed_s  # the training loop's own clock, without loading the corpus
print(json.dumps({"threads": n, "seconds": time.perf_counter() - t0}))
"""


def _spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _time(kind: str, threads: int | None, steps: int, new: int, tmp: Path) -> dict:
    env = dict(os.environ)
    env.pop("GENLAB_THREADS", None)
    if threads is not None:
        env["GENLAB_THREADS"] = str(threads)
    p = subprocess.run([sys.executable, "-c", JOB, kind, str(steps), str(new), str(tmp)], env=env,
                       capture_output=True, text=True, timeout=1800, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{kind} with threads={threads} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and tokens (a smoke run)")
    a = ap.parse_args()
    steps, new = (6, 30) if a.quick else (60, 300)
    ncores = cores()
    settings = [*range(1, ncores + 1), None]  # None: nothing set, genlab's auto choice
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="genlab_threads_"))
    for neighbour in (False, True):
        stop = mp.Event()
        proc = mp.Process(target=_spin, args=(stop,), daemon=True) if neighbour else None
        if proc:
            proc.start()
            time.sleep(1.0)  # let the load show in /proc/stat
        try:
            for kind in ("generate", "train"):
                for t in settings:
                    r = _time(kind, t, steps, new, tmp)
                    rows.append({"busy_neighbour": neighbour, "job": kind, "requested": t or "auto", **r})
                    print(f"neighbour={neighbour!s:5} {kind:8} threads={t or 'auto'!s:4} -> {r['threads']} "
                          f"threads, {r['seconds']:.2f} s", flush=True)
        finally:
            if proc:
                stop.set()
                proc.join(5)
    shutil.rmtree(tmp, ignore_errors=True)
    res = {"benchmark": "threads", "quick": a.quick, "cores": ncores, "native_bf16": native_bf16(),
           "jobs": {"generate": f"{new} tokens, baby GPT, batch 1", "train": f"{steps} steps, baby GPT, fp32"},
           "python": platform.python_version(), "rows": rows}
    atomic_write_json(OUT, res)
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
