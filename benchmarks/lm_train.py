"""Training throughput of genlab's `baby` GPT against transformers' GPT2LMHeadModel of the same shape.

Peer: `transformers.GPT2LMHeadModel` (4 layers, 4 heads, 128 wide, context 64, vocabulary 65, no
dropout, exact GELU, tied head), started from the SAME weights as the genlab model (copied with
genlab.adapt.hf.gpt2_state_dict; a parity check confirms both give the same fp32 loss), trained on the
same batches with the same step: forward + cross-entropy, backward, clip_grad_norm_(1.0), AdamW
(lr 3e-4, weight decay 0.1 on matrices only, betas (0.9, 0.99)). genlab uses its own optimizer factory
(genlab.training.optim.adamw); the peer uses torch.optim.AdamW with torch's default implementation.
Both are measured in the same run, repeats interleaved (A B, B A, ...), medians reported; bf16 means
the forward runs under torch.autocast("cpu", dtype=torch.bfloat16), backward outside it, as in
genlab's trainer.

Model FLOPs utilisation (MFU, PaLM, Chowdhery et al. 2022, appendix B):
    flops/token = 6 * N + 6 * V * C + 12 * n_layer * T * C
N = parameters excluding the token and position embeddings (the tied head's matmul is the 6*V*C term),
T = context length, C = width (= n_head * head_dim). The attention term counts the full T x T score and
value matmuls (no causal halving), as in PaLM. MFU = tokens/s * flops/token / peak, where peak is this
CPU's matmul rate measured in the same run: torch.mm of 2048 x 2048 fp32 tensors (fp32 MFU) and of
bf16 tensors (bf16 MFU), median of repeats, sampled before, between and after the training configs.

    python benchmarks/lm_train.py            # full run, writes benchmarks/results/lm_train.json
    python benchmarks/lm_train.py --quick    # smoke run (seconds)
    python benchmarks/lm_train.py --profile  # also a short torch.profiler pass (top ops per model)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genlab.core.checkpoint import atomic_write_json

VOCAB = 65  # char-level Shakespeare
LR = 3e-4
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.99)
GRAD_CLIP = 1.0
ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "lm_train.json"


# --------------------------------------------------------------------------------------------- models
def build_genlab():
    from genlab.models import build_config, build_model

    torch.manual_seed(0)
    model = build_model(build_config({"family": "gpt", "preset": "baby", "vocab_size": VOCAB}))
    return model.train()


def build_hf(genlab_model):
    from transformers import GPT2Config, GPT2LMHeadModel

    from genlab.adapt.hf import gpt2_state_dict

    c = genlab_model.config
    cfg = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
        n_head=c.n_head, n_inner=4 * c.n_embd, activation_function="gelu", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
        use_cache=False,  # a training step needs no KV cache
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    missing, unexpected = model.load_state_dict(gpt2_state_dict(genlab_model), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to wte
    if missing or unexpected:
        raise RuntimeError(f"weight copy mismatch: missing={missing} unexpected={unexpected}")
    return model.train()


def genlab_loss(model, x, y):
    return model.loss((x, y)).loss


def hf_loss(model, x, y):
    # the same next-token loss as genlab's (logits on x, targets y = x shifted by one, all T positions)
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def decay_groups(model):
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def genlab_opt(model):
    from genlab.training.optim import adamw

    return adamw(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)


def hf_opt(model):
    return torch.optim.AdamW(decay_groups(model), lr=LR, betas=BETAS)  # torch's default implementation


def opt_impl(opt) -> str:
    d = opt.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default (for-loop on CPU)"


def count_params(model) -> dict:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return {"total": total}


def flops_per_token(model) -> dict:
    c = model.config
    L, C, T, V = c.n_layer, c.n_embd, c.block_size, c.vocab_size
    total = count_params(model)["total"]
    n_embedding = V * C + T * C  # wte (tied with the head) + wpe
    n = total - n_embedding
    terms = {"6N": 6 * n, "6VC": 6 * V * C, "12LTC": 12 * L * T * C}
    return {"N_nonembedding": n, "N_total": total, "terms": terms, "flops_per_token": sum(terms.values()),
            "formula": "6*N_nonembedding + 6*V*C + 12*n_layer*T*C (PaLM appendix B)"}


# ------------------------------------------------------------------------------------------- timing
def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


class Runner:
    """One model + optimizer + loss fn; `steps(n)` runs n full training steps and returns per-phase times."""

    def __init__(self, name, model, opt, loss_fn, precision, batches):
        self.name, self.model, self.opt, self.loss_fn = name, model, opt, loss_fn
        self.precision, self.batches, self.i = precision, batches, 0
        self.last_loss = float("nan")

    def steps(self, n: int) -> dict:
        ph = {"forward": 0.0, "backward": 0.0, "clip": 0.0, "optimizer": 0.0}
        pc = time.perf_counter
        t_start = pc()
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            t0 = pc()
            with autocast(self.precision):
                loss = self.loss_fn(self.model, x, y)
            t1 = pc()
            loss.backward()
            t2 = pc()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            t3 = pc()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            t4 = pc()
            ph["forward"] += t1 - t0
            ph["backward"] += t2 - t1
            ph["clip"] += t3 - t2
            ph["optimizer"] += t4 - t3
        total = pc() - t_start
        self.last_loss = float(loss.detach())
        return {"total_s": total, "phases_ms_per_step": {k: 1e3 * v / n for k, v in ph.items()}}


def _busy_jiffies() -> int | None:
    """Busy CPU time of the whole machine in clock ticks (user+nice+system+irq+softirq+steal), or None."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)


class Contention:
    """CPU seconds that OTHER processes used while the block ran, as a fraction of the block's wall time per
    core: 0 on a quiet machine; 0.5 means another process took half of the cores' time."""

    def __enter__(self):
        self.j0, self.o0, self.t0 = _busy_jiffies(), os.times(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        j1, o1, t1 = _busy_jiffies(), os.times(), time.perf_counter()
        if self.j0 is None or j1 is None:
            self.frac = None
            return
        hz = os.sysconf("SC_CLK_TCK")
        own = (o1.user - self.o0.user) + (o1.system - self.o0.system)
        foreign = (j1 - self.j0) / hz - own
        self.frac = max(0.0, foreign) / ((t1 - self.t0) * (os.cpu_count() or 1))


def make_batches(batch: int, T: int, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        seq = torch.randint(0, VOCAB, (batch, T + 1), generator=g)
        out.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return out


def median(xs):
    return statistics.median(xs)


QUIET = 0.05  # a repeat counts as quiet when other processes used < 5% of the cores' time during it


def wait_quiet(max_wait_s: float, threshold: float = QUIET) -> float:
    """Sleep in 1 s windows until other processes use < threshold of the CPU (at most max_wait_s); returns the
    seconds waited. With OpenMP's spinning threads, a busy neighbour on 2 cores slows a step 2-10x."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        with Contention() as c:
            time.sleep(1.0)
        if c.frac is None or c.frac < threshold:
            break
    return round(time.perf_counter() - t0, 1)


def bench_config(batch: int, precision: str, *, repeats: int, target_s: float, warmup_s: float,
                 max_wait_s: float) -> dict:
    waited = wait_quiet(max_wait_s)
    gl = build_genlab()
    hf = build_hf(gl)
    T = gl.config.block_size
    batches = make_batches(batch, T)
    runners = [
        Runner("genlab", gl, genlab_opt(gl), genlab_loss, precision, batches),
        Runner("hf", hf, hf_opt(hf), hf_loss, precision, batches),
    ]
    tokens_per_step = batch * T

    # warm-up: at least 3 steps and warmup_s seconds each; the faster of several 1-step timings of the
    # slower model sets the steps per repeat (robust to a neighbour's burst during warm-up)
    step_s = {}
    for r in runners:
        r.steps(2)
        n, t, best = 0, 0.0, float("inf")
        while n < 3 or t < warmup_s:
            dt = r.steps(1)["total_s"]
            t, n, best = t + dt, n + 1, min(best, dt)
        step_s[r.name] = best
    n_steps = max(2, round(target_s / max(step_s.values())))

    # interleaved repeats (A B, B A, ...); a repeat during which other processes took >= QUIET of the CPU is
    # kept in the record but not in the medians; up to 3x `repeats` attempts to collect `repeats` quiet ones
    attempts = []
    while len(attempts) < 3 * repeats and sum(a["quiet"] for a in attempts) < repeats:
        order = runners if len(attempts) % 2 == 0 else runners[::-1]
        rec = {}
        with Contention() as c:
            for r in order:
                res = r.steps(n_steps)
                res["tokens_per_s"] = n_steps * tokens_per_step / res["total_s"]
                rec[r.name] = res
        rec["foreign"] = c.frac
        rec["quiet"] = c.frac is None or c.frac < QUIET
        attempts.append(rec)
        if not rec["quiet"]:
            wait_quiet(min(max_wait_s, 20.0))
    used = [a for a in attempts if a["quiet"]]
    contended = len(used) < min(3, repeats)
    if contended:
        used = attempts  # not enough quiet repeats: report all of them, flagged
    per = {r.name: [a[r.name] for a in used] for r in runners}

    out = {"batch": batch, "context": T, "precision": precision, "tokens_per_step": tokens_per_step,
           "steps_per_repeat": n_steps, "repeats_used": len(used), "repeats_attempted": len(attempts),
           "contended": contended, "waited_for_quiet_s": waited,
           "foreign_cpu_frac_attempts": [None if a["foreign"] is None else round(a["foreign"], 3)
                                         for a in attempts]}
    for r in runners:
        reps = per[r.name]
        out[r.name] = {
            "tokens_per_s": median(x["tokens_per_s"] for x in reps),
            "tokens_per_s_repeats": [round(x["tokens_per_s"], 1) for x in reps],
            "step_ms": 1e3 * median(x["total_s"] / n_steps for x in reps),
            "phases_ms_per_step": {k: round(median(x["phases_ms_per_step"][k] for x in reps), 3)
                                   for k in reps[0]["phases_ms_per_step"]},
            "final_loss": round(r.last_loss, 4),
            "optimizer": opt_impl(r.opt),
        }
    paired = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(per["genlab"], per["hf"], strict=True)]
    out["ratio_genlab_over_hf"] = median(paired)
    out["ratio_repeats"] = [round(x, 3) for x in paired]
    out["ratio_of_medians"] = out["genlab"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------------------------- matmul peak
def matmul_gflops(n: int, dtype: torch.dtype, reps: int) -> float:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    for _ in range(2):
        torch.mm(a, b)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / median(ts) / 1e9


def linear_gflops(m: int, k: int, n: int, precision: str, reps: int) -> float:
    """fp32 tensors through F.linear (the model's own op), optionally under bf16 autocast."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    with autocast(precision):
        for _ in range(3):
            F.linear(x, w)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            F.linear(x, w)
            ts.append(time.perf_counter() - t)
    return 2 * m * k * n / median(ts) / 1e9


def peak_sample(n: int, reps: int, max_wait_s: float, tries: int = 3) -> dict:
    """Median-of-reps GFLOP/s of fp32 and bf16 torch.mm; retried (after waiting for quiet) if contended."""
    for _ in range(tries):
        wait_quiet(max_wait_s)
        with Contention() as c:
            out = {"fp32": matmul_gflops(n, torch.float32, reps), "bf16": matmul_gflops(n, torch.bfloat16, reps)}
        out["foreign_cpu_frac"] = c.frac
        out["quiet"] = c.frac is None or c.frac < QUIET
        if out["quiet"]:
            break
    return out


# ---------------------------------------------------------------------------------------- profiler
def profile(batch: int, precision: str, steps: int, top: int, max_wait_s: float) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    gl = build_genlab()
    hf = build_hf(gl)
    batches = make_batches(batch, gl.config.block_size)
    out = {}
    for r in (Runner("genlab", gl, genlab_opt(gl), genlab_loss, precision, batches),
              Runner("hf", hf, hf_opt(hf), hf_loss, precision, batches)):
        r.steps(3)
        wait_quiet(max_wait_s)
        with Contention() as c, tprofile(activities=[ProfilerActivity.CPU]) as prof:
            r.steps(steps)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[r.name] = {
            "ms_per_step_profiled": total / 1e3 / steps,
            "top_ops_self_cpu": [
                {"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                 "pct": round(100 * e.self_cpu_time_total / total, 1), "calls_per_step": e.count // steps}
                for e in events[:top]
            ],
            "ops_called_per_step": sum(e.count for e in events) // steps,
            "foreign_cpu_frac": None if c.frac is None else round(c.frac, 3),
        }
    return out


# ------------------------------------------------------------------------------------------ report
def cpu_info() -> dict:
    info = {"model_name": platform.processor() or "unknown"}
    try:
        text = Path("/proc/cpuinfo").read_text()
        first = text.split("\n\n")[0]
        kv = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        kv = {k.strip(): v.strip() for k, v in kv.items()}
        flags = set(kv.get("flags", "").split())
        info = {"model_name": kv.get("model name", "unknown"), "cpu_family": kv.get("cpu family"),
                "model": kv.get("model"), "mhz": kv.get("cpu MHz"),
                "logical_cpus": text.count("processor\t:"),
                "flags_of_interest": sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))}
    except OSError:
        pass
    return info


def machine_info() -> dict:
    import transformers

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": cpu_info(),
        "os_cpu_count": os.cpu_count(), "platform": platform.platform(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_", "LD_PRELOAD",
                                                                      "DNNL_", "ONEDNN_"))},
        "genlab_commit": git("rev-parse", "--short", "HEAD"),
        "genlab_src_dirty": bool(git("status", "--porcelain", "--", "src")),
    }


def parity_check() -> dict:
    gl = build_genlab()
    hf = build_hf(gl)
    x, y = make_batches(4, gl.config.block_size, n=1)[0]
    with torch.no_grad():
        a, b = gl(x), hf(input_ids=x).logits
        la, lb = genlab_loss(gl, x, y).item(), hf_loss(hf, x, y).item()
    return {"max_abs_logit_diff_fp32": float((a - b).abs().max()), "loss_genlab": la, "loss_hf": lb,
            "params_genlab": count_params(gl)["total"], "params_hf": count_params(hf)["total"],
            "hf_attn_implementation": hf.config._attn_implementation}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--batches", default="64,12", help="comma-separated batch sizes (default 64,12)")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 7; quick 2)")
    ap.add_argument("--seconds", type=float, default=None, help="target seconds per repeat (default 2; quick 0.3)")
    ap.add_argument("--profile", action="store_true", help="add a torch.profiler pass (batch = first of --batches)")
    ap.add_argument("--max-wait", type=float, default=None,
                    help="seconds to wait for other processes to go quiet before each measurement (default 120; quick 5)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 7)
    target_s = args.seconds or (0.3 if args.quick else 2.0)
    warmup_s = 0.3 if args.quick else 2.0
    peak_n, peak_reps = (1024, 3) if args.quick else (2048, 7)
    max_wait = args.max_wait if args.max_wait is not None else (5.0 if args.quick else 120.0)
    batches = [int(b) for b in args.batches.split(",")]
    precisions = args.precisions.split(",")
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise SystemExit(f"--precisions: {p!r} is not one of fp32, bf16")

    t_start = time.time()
    info = machine_info()
    info["loadavg_start"] = os.getloadavg()
    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    log(f"torch {info['torch']}  transformers {info['transformers']}  threads {info['torch_threads']}  "
        f"cpu {info['cpu'].get('model_name')}")

    parity = parity_check()
    log(f"parity: max|logit diff| {parity['max_abs_logit_diff_fp32']:.2e}  loss {parity['loss_genlab']:.5f} "
        f"vs {parity['loss_hf']:.5f}  params {parity['params_genlab']} vs {parity['params_hf']}  "
        f"hf attention {parity['hf_attn_implementation']}")
    fpt = flops_per_token(build_genlab())

    def log_peak(s):
        log(f"matmul {peak_n}^3: fp32 {s['fp32']:.1f} GFLOP/s  bf16 {s['bf16']:.1f} GFLOP/s  "
            f"(other processes' CPU {s['foreign_cpu_frac'] if s['foreign_cpu_frac'] is None else round(s['foreign_cpu_frac'], 3)})")

    peaks = [peak_sample(peak_n, peak_reps, max_wait)]
    log_peak(peaks[-1])

    def run_config(batch, prec):
        r = bench_config(batch, prec, repeats=repeats, target_s=target_s, warmup_s=warmup_s, max_wait_s=max_wait)
        log(f"B={batch:3d} {prec}: genlab {r['genlab']['tokens_per_s']:9.0f} tok/s  "
            f"hf {r['hf']['tokens_per_s']:9.0f} tok/s  ratio {r['ratio_genlab_over_hf']:.3f}  "
            f"({'ALL' if r['contended'] else 'quiet'} repeats {r['ratio_repeats']}; other processes' CPU per "
            f"attempt {r['foreign_cpu_frac_attempts']}{'; CONTENDED' if r['contended'] else ''})")
        peaks.append(peak_sample(peak_n, peak_reps, max_wait))
        log_peak(peaks[-1])
        return r

    results = [run_config(batch, prec) for batch in batches for prec in precisions]
    for i, r in enumerate(results):  # one more try, later, for a config that never saw a quiet machine
        if r["contended"]:
            log(f"B={r['batch']} {r['precision']} was contended: measuring it again")
            again = run_config(r["batch"], r["precision"])
            again["earlier_contended_attempt"] = {k: r[k] for k in ("ratio_genlab_over_hf", "foreign_cpu_frac_attempts")}
            results[i] = again

    # the peak is the median over quiet samples (a busy neighbour only ever lowers it); if none was quiet,
    # the best sample, flagged
    quiet_peaks = [s for s in peaks if s["quiet"]]
    peak_contended = not quiet_peaks
    peak = {p: (median(s[p] for s in quiet_peaks) if quiet_peaks else max(s[p] for s in peaks))
            for p in ("fp32", "bf16")}
    for r in results:
        for name in ("genlab", "hf"):
            achieved = r[name]["tokens_per_s"] * fpt["flops_per_token"] / 1e9
            r[name]["model_gflops"] = round(achieved, 2)
            r[name]["mfu"] = round(achieved / peak[r["precision"]], 4)
            r[name]["tokens_per_s"] = round(r[name]["tokens_per_s"], 1)
            r[name]["step_ms"] = round(r[name]["step_ms"], 3)
        r["ratio_genlab_over_hf"] = round(r["ratio_genlab_over_hf"], 4)
        r["ratio_of_medians"] = round(r["ratio_of_medians"], 4)

    shape_reps = 5 if args.quick else 15
    C = 128
    at_shapes = {}
    for batch in batches:
        m = batch * 64
        for prec in precisions:
            at_shapes[f"B{batch}_{prec}"] = {
                f"{m}x{k}@{k}x{n}": round(linear_gflops(m, k, n, prec, shape_reps), 1)
                for k, n in ((C, 3 * C), (C, 4 * C), (4 * C, C), (C, VOCAB))
            }

    out = {
        "benchmark": "lm_train",
        "what": "training tokens/s, genlab GPT 'baby' vs transformers GPT2LMHeadModel of the same shape",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "machine": info,
        "model": {"preset": "baby", "n_layer": 4, "n_head": 4, "n_embd": 128, "context": 64, "vocab": VOCAB},
        "step": {"lr": LR, "weight_decay": WEIGHT_DECAY, "betas": BETAS, "grad_clip": GRAD_CLIP,
                 "loss": "cross-entropy over all B*T positions on fp32 logits",
                 "bf16": "forward under torch.autocast('cpu', bfloat16); backward, clip and optimizer outside"},
        "parity": parity,
        "flops": fpt,
        "matmul_peak_gflops": {"n": peak_n, "reps_per_sample": peak_reps,
                               "fp32": round(peak["fp32"], 1), "bf16": round(peak["bf16"], 1),
                               "contended": peak_contended,
                               "samples": [{k: v if v is None or isinstance(v, bool) else
                                            round(v, 3 if k.startswith("foreign") else 1)
                                            for k, v in s.items()} for s in peaks],
                               "how": "torch.mm of n x n tensors (fp32; bf16 tensors), median of reps per "
                                      "sample; median over the quiet samples taken before/between/after configs"},
        "contention": {"quiet_threshold": QUIET,
                       "how": "other processes' CPU time (from /proc/stat minus this process's os.times()) as a "
                              "fraction of wall time x cores; repeats at or above the threshold are recorded in "
                              "foreign_cpu_frac_attempts but left out of the medians"},
        "linear_gflops_at_model_shapes": at_shapes,
        "results": results,
    }
    if args.profile:
        log("profiling ...")
        out["profile"] = {p: profile(batches[0], p, 3 if args.quick else 10, 15, max_wait) for p in precisions}
        out["profile_batch"] = batches[0]
    info["loadavg_end"] = os.getloadavg()
    out["wall_s"] = round(time.time() - t_start, 1)
    atomic_write_json(args.out, out)

    print(f"\n{'batch':>5} {'prec':>5} {'genlab tok/s':>13} {'HF tok/s':>10} {'genlab/HF':>9} "
          f"{'MFU genlab':>10} {'MFU HF':>7}")
    for r in results:
        print(f"{r['batch']:>5} {r['precision']:>5} {r['genlab']['tokens_per_s']:>13.0f} {r['hf']['tokens_per_s']:>10.0f} "
              f"{r['ratio_genlab_over_hf']:>9.3f} {100 * r['genlab']['mfu']:>9.1f}% {100 * r['hf']['mfu']:>6.1f}%"
              f"{'  (CONTENDED)' if r['contended'] else ''}")
    print(f"peak matmul: fp32 {peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s; "
          f"{fpt['flops_per_token'] / 1e6:.3f} MFLOP/token; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
