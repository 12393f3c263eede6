"""Training on several processes (torchrun + DistributedDataParallel, gloo) against one process, same global batch.

The `baby` GPT on Shakespeare characters (configs/gpt/shakespeare_char.toml), a global batch of 32 x 64 tokens,
`--steps` optimizer steps, timed from the run's own metrics (tokens/s after the first logs):

- 1 process on all the cores (the usual way on one machine),
- 1 process on 1 core,
- N processes on 1 core each (`torchrun --standalone --nproc-per-node N -m genlab train ...`, batch 32/N each).

The held-out losses of the runs must agree (the same steps); the all-reduce of the model's gradients is timed on
its own (gloo over loopback), which says what share of a step the communication takes, and so what scaling to
expect where each process has cores of its own. With `--smollm2 RUN`, a full fine-tune of SmolLM2-135M on N processes
with DDP (a whole copy of weights, gradients and AdamW state in each) and with FSDP (sharded) gives each process's
peak memory.

    python benchmarks/distributed.py               # ~3 min on 2 cores
    python benchmarks/distributed.py --steps 40    # smoke run
    python benchmarks/distributed.py --smollm2 runs/smollm2   # + peak memory per process, DDP vs FSDP

Writes benchmarks/results/distributed.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from genlab.core.checkpoint import atomic_write_json
from genlab.core.runtime import cores

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "distributed.json"
CONFIG = ROOT / "configs" / "gpt" / "shakespeare_char.toml"
GLOBAL_BATCH = 32

ALLREDUCE = r"""
import json, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
n = int(sys.argv[1])
t = torch.randn(n)
for _ in range(3):
    dist.all_reduce(t)
times = []
for _ in range(20):
    dist.barrier(); t0 = time.perf_counter(); dist.all_reduce(t); times.append(time.perf_counter() - t0)
if dist.get_rank() == 0:
    times.sort(); print(json.dumps({"params": n, "allreduce_ms": 1000 * times[len(times) // 2]}))
dist.destroy_process_group()
"""


MEMORY = r"""
import json, sys, time
from pathlib import Path
from genlab import api
from genlab.training import distributed
run, data, out, parallel, steps = sys.argv[1:6]
t0 = time.perf_counter()
api.finetune(run, data, out=out, overwrite=True, overrides=["method=full", f"train.parallel={parallel}",
             f"train.max_steps={steps}", "train.batch_size=2", "block_size=128", "train.progress=false",
             "train.eval_every=0", "train.checkpoint_every=0"])
status = {l.split(":")[0]: int(l.split()[1]) / 1024 for l in Path("/proc/self/status").read_text().splitlines()
          if l.startswith(("VmHWM:", "VmRSS:"))}
rows = distributed.gather({"rank": distributed.rank(), "peak_rss_mb": round(status["VmHWM"]),
                           "rss_mb_after": round(status["VmRSS"]), "seconds": round(time.perf_counter() - t0, 1)})
if distributed.is_main():
    print(json.dumps(rows))
distributed.teardown()
"""


def memory(tmp: Path, run: str, procs: int, steps: int) -> list[dict]:
    """Full fine-tuning of SmolLM2-135M on `procs` processes with DDP and with FSDP: each process's peak memory."""
    script = tmp / "memory.py"
    script.write_text(MEMORY)
    rows = []
    for parallel in ("ddp", "fsdp"):
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={procs}", str(script), run, "shakespeare", str(tmp / f"ft_{parallel}"),
                            parallel, str(steps)], capture_output=True, text=True,
                           env={**os.environ, "GENLAB_THREADS": "1", "OMP_NUM_THREADS": "1"}, check=False)
        if p.returncode != 0:
            raise SystemExit(f"memory {parallel} failed:\n{p.stderr[-3000:]}")
        ranks = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append({"parallel": parallel, "processes": procs, "steps": steps,
                     "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in ranks],
                     "rss_mb_after_per_process": [r["rss_mb_after"] for r in ranks],
                     "seconds": max(r["seconds"] for r in ranks)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def train(tmp: Path, name: str, steps: int, procs: int, threads: int) -> dict:
    env = {**os.environ, "GENLAB_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    sets = [f"name={name}", f"out_dir={tmp}", f"train.max_steps={steps}", f"train.batch_size={GLOBAL_BATCH // procs}",
            "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=10", "train.progress=false",
            "train.precision=fp32"]
    args = ["-m", "genlab", "train", str(CONFIG), *[a for s in sets for a in ("--set", s)]]
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                             if procs > 1 else []), *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["items_per_s"] for r in recs if "items_per_s" in r][2:]  # past the first 20 steps (warm-up)
    val = next(r["val_loss"] for r in reversed(recs) if "val_loss" in r)
    return {"setup": name, "processes": procs, "threads_per_process": threads, "steps": steps,
            "tokens_per_s": round(statistics.median(rates), 1), "wall_s": round(wall, 1), "val_loss": round(val, 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--smollm2", help="an imported SmolLM2 run: also measure each process's peak memory in a full "
                    "fine-tune with DDP and with FSDP")
    ap.add_argument("--memory-steps", type=int, default=3)
    a = ap.parse_args()
    n = cores()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, procs, threads in (("1 process, all cores", 1, n), ("1 process, 1 core", 1, 1),
                                     (f"{a.procs} processes, 1 core each", a.procs, 1)):
            rows.append(train(tmp, name, a.steps, procs, threads))
            print(json.dumps(rows[-1]))
        import torch
        from safetensors.torch import load_file

        params = sum(v.numel() for v in load_file(str(tmp / rows[0]["setup"] / "model.safetensors")).values())
        script = tmp / "allreduce.py"
        script.write_text(ALLREDUCE)
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc-per-node={a.procs}", str(script), str(params)], capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        comm = json.loads(p.stdout.strip().splitlines()[-1])
        mem = memory(tmp, a.smollm2, a.procs, a.memory_steps) if a.smollm2 else None
    one_core = rows[1]["tokens_per_s"]
    step_s = GLOBAL_BATCH * 64 / rows[2]["tokens_per_s"]
    share = comm["allreduce_ms"] / 1000 / step_s
    c = GLOBAL_BATCH * 64 / one_core
    result = {
        "machine": {"cores": n, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "model": "gpt baby (configs/gpt/shakespeare_char.toml)", "global_batch": f"{GLOBAL_BATCH} x 64 tokens",
        "rows": rows,
        "speedup_vs_one_core": round(rows[2]["tokens_per_s"] / one_core, 2),
        "speedup_vs_one_process_all_cores": round(rows[2]["tokens_per_s"] / rows[0]["tokens_per_s"], 2),
        "allreduce": comm, "allreduce_share_of_step": round(share, 3),
        # k processes on cores of their own: each computes 1/k of a step (c / k, c = one core's step time) and then
        # waits for the all-reduce (a, about constant in k for a ring): speedup c / (c / k + a)
        "expected_speedup_on_own_cores": {str(k): round(c / (c / k + comm["allreduce_ms"] / 1000), 2)
                                          for k in (2, 4, 8, 16)},
        "loss_agrees": max(r["val_loss"] for r in rows) - min(r["val_loss"] for r in rows) < 1e-3,
    }
    if mem:
        result["memory_full_finetune_smollm2"] = {"batch": "2 x 128 tokens per process", "rows": mem}
    atomic_write_json(OUT, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
