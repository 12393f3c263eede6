"""What the benchmarks that measure each engine in its own process share: the process's peak memory, and running
one engine's worker (this script again, with --_worker) to one JSON row of results."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path


def rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's peak over
    fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(engine: str, cmd: list[str], threads: int) -> dict:
    """Run one engine's worker process on `threads` threads; its last stdout line is its JSON row. A worker that
    fails gives a row with the error (its stderr's tail is printed), so the other engines still run."""
    p = subprocess.run(cmd, capture_output=True, text=True, check=False,
                       env={**os.environ, "GENLAB_THREADS": str(threads)})
    if p.returncode != 0:
        print(f"{engine}: failed\n{p.stderr[-2000:]}")
        return {"engine": engine, "error": p.stderr.strip().splitlines()[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])
