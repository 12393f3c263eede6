"""Held-out loss of the `baby` GPT on Shakespeare as a function of wall-clock training seconds.

Each budget is its own run with a cosine schedule over that budget (so every point is a finished run, not a
snapshot of a longer one); the held-out loss is measured afterwards on the whole held-out split, outside the
budget. A peer recipe in the same run: the well-known minimal-GPT settings for this shape (batch 12, context
64, 2000 steps, lr 1e-3, fp32), trained with the same code, with the time at which it first reaches the
target, measured on the same fixed held-out batches during training.

    python benchmarks/lm_quality.py                # budgets 15 30 45 60 120 300 s + the peer (~13 min)
    python benchmarks/lm_quality.py --quick        # a smoke run
Writes benchmarks/results/lm_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from genlab import api
from genlab.core.checkpoint import atomic_write_json

TARGET = 1.88
OURS = {"batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.05, "weight_decay": 0.1,
        "beta2": 0.99, "precision": "bf16", "grad_clip": 1.0}
PEER = {"batch_size": 12, "lr": 1e-3, "warmup_steps": 100, "min_lr_ratio": 0.1, "weight_decay": 0.1,
        "beta2": 0.99, "precision": "fp32", "grad_clip": 1.0, "max_steps": 2000}


def run(name, out, train, model_extra=None, seed=1337):
    rc = api.resolve_config(base={
        "name": name, "out_dir": str(out), "seed": seed,
        "data": {"source": "shakespeare", "tokenizer": "char"},
        "model": {"family": "gpt", "preset": "baby", **(model_extra or {})},
        "train": {"progress": False, "checkpoint_every": 0, "log_every": 50, **train},
    })
    run_dir, res = api.train(rc, overwrite=True)
    t0 = time.perf_counter()
    ev = api.evaluate(run_dir)
    return run_dir, res, ev, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=float, nargs="*", default=[15, 30, 45, 60, 120, 300])
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/lm_quality.json")
    ap.add_argument("--workdir", default="/tmp/genlab_lm_quality")
    a = ap.parse_args()
    budgets = [5.0] if a.quick else a.budgets
    work = Path(a.workdir)
    points = []
    for b in budgets:
        _run_dir, res, ev, eval_s = run(f"t{int(b)}", work, {**OURS, "max_steps": 0, "max_minutes": b / 60,
                                                              "eval_every": 0, "eval_batches": 1})
        points.append({"budget_s": b, "train_s": round(res.elapsed_s, 2), "steps": res.step,
                       "tokens": res.step * OURS["batch_size"] * 64,
                       "heldout_loss": round(ev["loss_nats_per_token"], 4),
                       "heldout_bits_per_char": round(ev["bits_per_char"], 4),
                       "heldout_tokens": ev["heldout_tokens"], "eval_s": round(eval_s, 2)})
        print(json.dumps(points[-1]), flush=True)
    peer = None
    if not a.no_peer and not a.quick:
        _, res, ev, _ = run("peer", work, {**PEER, "eval_every": 100, "eval_batches": 40})
        curve = [(h["step"], h["time_s"], h["val_loss"]) for h in res.history if "val_loss" in h]
        hit = next(((s, t) for s, t, v in curve if v <= TARGET), None)
        peer = {"recipe": PEER, "train_s": round(res.elapsed_s, 2), "heldout_loss": round(ev["loss_nats_per_token"], 4),
                "first_step_at_or_below_target": hit[0] if hit else None,
                "seconds_to_target_incl_evals": hit[1] if hit else None, "curve": curve}
        print(json.dumps({k: v for k, v in peer.items() if k != "curve"}), flush=True)
    at45 = next((p for p in points if p["budget_s"] == 45), None)
    result = {
        "benchmark": "lm_quality", "model": "gpt baby (4x4x128, context 64), char-level Shakespeare",
        "recipe": OURS, "target": {"heldout_loss_nats_per_char": TARGET, "within_s": 45},
        "met": bool(at45 and at45["heldout_loss"] <= TARGET) if at45 else None,
        "points": points, "peer": peer,
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "note": "held-out = the last 10% of the corpus, every non-overlapping 64-character window",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
