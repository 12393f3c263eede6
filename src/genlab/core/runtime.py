"""Process settings: how many CPU threads torch uses, and whether other work is slowing this machine down.

PyTorch starts one thread per core. On a machine that other processes share this oversubscribes the cores:
measured on 2 cores with one busy neighbour (benchmarks/threads.py), 300 generated tokens took 2.9 s with 2
threads and 0.96 s with 1, and 60 training steps 20.0 s against 12.4 s. So the CLI picks the threads itself (DESIGN.md 8):
`--threads N` (which sets `GENLAB_THREADS`) > `GENLAB_THREADS` > the run config's `train.threads` > the cores
that other processes leave free, measured over a quarter of a second at start.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV = "GENLAB_THREADS"
_configured = False  # set once the CLI has chosen the threads


def cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]), idle


def busy_cores(window_s: float = 0.25) -> float:
    """How many cores other processes keep busy right now (this process sleeps while it measures); the
    1-minute load average where /proc/stat is not available."""
    a = _cpu_times()
    if a is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    time.sleep(window_s)
    b = _cpu_times()
    total, idle = b[0] - a[0], b[1] - a[1]
    return max(0.0, (total - idle) / max(total, 1) * (os.cpu_count() or 1))


def threads_from_env() -> int | None:
    """GENLAB_THREADS as an int, None when unset; a bad value is a ConfigError."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= 1024:
        raise ConfigError(f"{ENV}={raw!r} must be a number of threads in [1, 1024]")
    return n


def check_threads(n: int, what: str = "--threads") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ConfigError(f"{what}={n!r} must be a number of threads in [1, 1024]")
    return n


def configure_threads(requested: int | None = None, *, announce: bool = True) -> int:
    """Set torch's intra-op threads: `requested`, else GENLAB_THREADS, else the free cores (at least 1).
    With `announce` (long jobs), says in the log (INFO) when the machine is busy, since times then fall short of
    the README's figures; otherwise says it at DEBUG level."""
    import torch

    global _configured
    _configured = True
    if requested is not None:
        check_threads(requested)
    n, why = (requested, "--threads") if requested is not None else (threads_from_env(), ENV)
    ncores = cores()
    busy = busy_cores()
    if n is None:
        n, why = max(1, min(ncores, round(ncores - busy))), "auto"
    torch.set_num_threads(n)
    say = log.info if announce else log.debug
    if busy + n > ncores + 0.5:
        say("the machine is busy: other processes keep %.1f of %d cores busy and genlab uses %d thread(s) "
                    "(%s), so times will be slower than on a quiet machine", busy, ncores, n, why)
    elif why == "auto" and n < ncores:
        say("the machine is busy: other processes keep %.1f of %d cores busy, so genlab uses %d thread(s) "
                    "and times will be slower than on a quiet machine (--threads N or %s=N to choose)",
                    busy, ncores, n, ENV)
    else:
        log.debug("using %d thread(s) (%s) on %d cores", n, why, ncores)
    return n


def warn_if_loaded() -> None:
    """One cheap check for long jobs started from Python: the 1-minute load average above the cores."""
    if _configured:
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return
    import torch

    if load > cores():
        log.warning("the machine is busy (load %.1f on %d cores, genlab uses %d threads): times will be slower "
                    "than on a quiet machine; torch.set_num_threads or train.threads choose the threads",
                    load, cores(), torch.get_num_threads())


# bfloat16 on the CPU is fast only where the hardware multiplies it (AVX512-BF16 or AMX on x86, BF16 on Arm);
# elsewhere PyTorch emulates it: the baby GPT trained at 967 tokens/s in bf16 against 16,240 in fp32 on an
# AVX2-only 2-core machine, 17x slower.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products in hardware."""
    import torch

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except (RuntimeError, OSError):
            pass
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return bool(_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


_told: set[str] = set()


def resolve_precision(precision: str, what: str = "train.precision") -> str:
    """"auto" -> "bf16" where the CPU has native bfloat16, else "fp32"; an explicit "bf16" without it is kept
    and warned about once per process, since it runs many times slower than fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"{what}={precision!r} must be 'auto', 'fp32' or 'bf16'")
    if precision == "fp32":
        return precision
    native = native_bf16()
    if precision == "auto":
        if "auto" not in _told:
            _told.add("auto")
            log.info("%s = auto: %s", what, "bf16 (this CPU has native bfloat16)" if native else
                     "fp32 (this CPU has no native bfloat16: no AVX512-BF16 or AMX)")
        return "bf16" if native else "fp32"
    if not native and what not in _told:
        _told.add(what)
        log.warning("%s = bf16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): PyTorch emulates it, "
                    "many times slower than fp32 (measured 17x for the baby GPT); use 'auto' or 'fp32'", what)
    return precision


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4


def _mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's mallopt(param, value) for each setting; False where there is no glibc to set (its defaults stay)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        done = [libc.mallopt(param, value) for param, value in settings]  # every one, even after a refusal
        return all(map(bool, done))
    except (OSError, AttributeError):
        return False


def tune_malloc() -> None:
    """The malloc thresholds the Makefile exports (DESIGN.md 8), applied by the CLI at start when the environment
    does not set them: glibc otherwise unmaps and re-maps big tensor buffers at every step (25-30% of U-Net
    sampling time on these CPUs). The threshold stops at 32 MB (glibc's cap): training goes further
    (reuse_freed_memory)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _mallopt((M_MMAP_THRESHOLD, 32 * 1024 * 1024), (M_TRIM_THRESHOLD, 1024 * 1024 * 1024))


_HEAP: list[bool] = []  # [applied], once per process


def reuse_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and keep what is freed there for the next step, instead of a fresh
    mmap (and munmap) per large tensor: what `fit` does on a CPU. tune_malloc's threshold cannot go past 32 MB, and
    a training step's largest tensors are bigger (the logits and their gradients: 100 MB for SmolLM2 at 512
    tokens), mmapped anew each step with every page faulting on first touch; measured on a SmolLM2 LoRA step this
    costs ~6-8% of it. The process's memory then stays at its peak (a trained step needs it again). glibc only
    (elsewhere: False); GENLAB_HEAP=0 turns it off. PyTorch's CPU tuning guide recommends a caching allocator
    (jemalloc, tcmalloc) for the same reason."""
    if _HEAP:
        return _HEAP[0]
    ok = False
    if os.environ.get("GENLAB_HEAP", "1") != "0":
        import platform

        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            ok = _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
    log.debug("allocator: freed memory kept for reuse: %s", ok)
    _HEAP.append(ok)
    return ok
