"""KV-cache decoding speed: genlab's GPT vs transformers' GPT2LMHeadModel.generate on identical weights.

Both models are built in this process from one randomly initialised genlab GPT (the HF copy gets the
same weights through `genlab.adapt.hf`), so the comparison is the decode machinery, not the weights.
For each case (shape x vocab x batch x decoding mode) we generate `--new-tokens` tokens after a short
prompt, warm up, then interleave genlab / HF repeats and report medians of new tokens per second and
their ratio (genlab / HF). Greedy runs also report how many generated tokens the two agree on.

    python benchmarks/lm_generate.py            # full run (a few minutes on 2 cores)
    python benchmarks/lm_generate.py --quick    # smoke run

Writes benchmarks/results/lm_generate.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from genlab.core.checkpoint import atomic_write_json

SHAPES = {
    # the `baby` preset's shape with a context long enough for prompt + 200 new tokens
    "baby@256": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256},
    # the `small` preset (6x6x384, ctx 256)
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
}
MODES = {
    "sample": {"temperature": 0.8, "top_k": 20},
    "greedy": {"temperature": 0.0},
}


def build_pair(shape: dict, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from genlab.adapt.hf import gpt2_config, gpt2_state_dict
    from genlab.models.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, dropout=0.0, **shape)
    ours = GPT(cfg).eval()
    hf = GPT2LMHeadModel(GPT2Config(**gpt2_config(cfg))).eval()
    missing, unexpected = hf.load_state_dict(gpt2_state_dict(ours), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weight mapping mismatch: missing={missing} unexpected={unexpected}")
    if hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr():
        raise RuntimeError("HF lm_head is not tied to wte")
    hf.generation_config.eos_token_id = None  # never stop early: always exactly the requested new tokens
    hf.generation_config.pad_token_id = 0
    with torch.inference_mode():
        x = torch.randint(0, vocab, (2, 16))
        err = (hf(x).logits - ours(x)).abs().max().item()
    if err > 1e-4:
        raise RuntimeError(f"genlab and HF logits differ by {err}")
    return ours, hf, err


def run_genlab(model, prompt: torch.Tensor, new: int, mode: dict, seed: int) -> torch.Tensor:
    from genlab.sampling.text import SamplingConfig, iter_tokens

    cfg = SamplingConfig(max_new_tokens=new, **mode)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        steps = list(iter_tokens(model, prompt, cfg, g))
        return torch.stack(steps, dim=1)  # (B, new)


def run_hf(model, prompt: torch.Tensor, new: int, mode: dict, seed: int) -> torch.Tensor:
    from transformers import GenerationConfig

    if mode.get("temperature", 1.0) == 0:
        gc = GenerationConfig(do_sample=False)
    else:
        gc = GenerationConfig(do_sample=True, temperature=mode["temperature"],
                              top_k=mode.get("top_k", 0) or None, top_p=mode.get("top_p", 1.0))
    gc.max_new_tokens = new
    gc.min_new_tokens = None
    gc.eos_token_id = None  # never stop early: always exactly `new` tokens
    gc.pad_token_id = 0
    gc.bos_token_id = 0
    gc.use_cache = True
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gc)
    return out[:, prompt.size(1):]


def timed(fn, *a) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t0, out


def bench_case(ours, hf, *, vocab: int, batch: int, mode: dict, new: int, prompt_len: int, repeats: int,
               seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=g)
    run_genlab(ours, prompt, new, mode, seed)  # warm-up (allocator, kernels, HF's generation setup)
    run_hf(hf, prompt, new, mode, seed)
    t_ours, t_hf = [], []
    for r in range(repeats):  # interleaved, alternating who goes first
        pair = [("ours", run_genlab, ours), ("hf", run_hf, hf)]
        if r % 2:
            pair.reverse()
        for name, fn, m in pair:
            dt, out = timed(fn, m, prompt, new, mode, seed + r)
            if out.shape != (batch, new):
                raise RuntimeError(f"{name} produced {tuple(out.shape)}, expected {(batch, new)}")
            (t_ours if name == "ours" else t_hf).append(dt)
    res = {
        "genlab_tok_s": batch * new / statistics.median(t_ours),
        "hf_tok_s": batch * new / statistics.median(t_hf),
        "genlab_s": t_ours,
        "hf_s": t_hf,
    }
    res["ratio"] = res["genlab_tok_s"] / res["hf_tok_s"]  # of the medians
    res["ratio_paired_median"] = statistics.median(h / o for o, h in zip(t_ours, t_hf))  # per interleaved pair
    if mode.get("temperature", 1.0) == 0:
        a, b = run_genlab(ours, prompt, new, mode, seed), run_hf(hf, prompt, new, mode, seed)
        same = (a == b).all(dim=0).int()
        first_diff = int(same.argmin()) if not bool(same.all()) else new
        res["greedy_agree_prefix"] = first_diff  # tokens before the first disagreement (fp ties can differ)
    return res


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return platform.processor()


def machine_info() -> dict:
    import transformers

    import genlab

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "genlab": getattr(genlab, "__version__", None),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer tokens, repeats and cases")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per generation (200)")
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default 5)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--vocabs", type=int, nargs="+", default=None, help="65 (char) and 2048 (BPE-sized)")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results/lm_generate.json")
    args = ap.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    new = args.new_tokens or (32 if args.quick else 200)
    repeats = args.repeats or (2 if args.quick else 5)
    vocabs = args.vocabs or ([65] if args.quick else [65, 2048])
    if args.prompt_len + new > min(s["block_size"] for s in SHAPES.values()):
        ap.error("prompt + new tokens must fit the 256-token context (HF cannot slide the window)")

    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)

    rows = []
    machine = machine_info()
    t_start = time.perf_counter()
    for shape_name in args.shapes:
        for vocab in vocabs:
            ours, hf, err = build_pair(SHAPES[shape_name], vocab, args.seed)
            n_params = ours.num_params()
            for batch in args.batches:
                for mode_name in args.modes:
                    res = bench_case(ours, hf, vocab=vocab, batch=batch, mode=MODES[mode_name], new=new,
                                     prompt_len=args.prompt_len, repeats=repeats, seed=args.seed)
                    row = {"shape": shape_name, **SHAPES[shape_name], "vocab": vocab, "params": n_params,
                           "batch": batch, "mode": mode_name, **MODES[mode_name],
                           "logits_max_abs_diff": err, **res}
                    rows.append(row)
                    agree = row.get("greedy_agree_prefix")
                    tail = f"   greedy agree {agree}/{new}" if agree is not None else ""
                    print(f"{shape_name:9s} V={vocab:<5d} B={batch:<3d} {mode_name:6s} "
                          f"genlab {row['genlab_tok_s']:9.0f} tok/s   HF {row['hf_tok_s']:9.0f} tok/s   "
                          f"ratio {row['ratio']:5.2f}{tail}", flush=True)
    result = {
        "benchmark": "lm_generate",
        "what": "new tokens/s with the KV cache, genlab iter_tokens vs transformers GPT2LMHeadModel.generate "
                "(use_cache=True), identical weights, torch.inference_mode, medians of interleaved repeats",
        "command": " ".join(["python benchmarks/lm_generate.py", *argv_used]),
        "argv": argv_used,
        "quick": args.quick,
        "new_tokens": new,
        "prompt_len": args.prompt_len,
        "repeats": repeats,
        "hf_attn_implementation": hf.config._attn_implementation,
        "machine": {**machine, "loadavg_end": os.getloadavg()},
        "elapsed_s": time.perf_counter() - t_start,
        "results": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
