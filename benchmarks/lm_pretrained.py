"""SmolLM2-135M-Instruct, batch 1, greedy, fp32: genlab vs transformers `generate` on the same GGUF weights.

A first cut of the issue's benchmark: load time and tokens/s for both, measured in one run (llama.cpp, batch 8,
bf16 and the quantized runs are still to come). Writes benchmarks/results/lm_pretrained.json.
usage: python benchmarks/lm_pretrained.py [--new-tokens 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from genlab import api
from genlab.adapt.gguf import builtin_path, import_gguf
from genlab.core.checkpoint import atomic_write_json
from genlab.sampling.text import generate_ids

PROMPT = "Once upon a time, in a small village,"


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    path = builtin_path("smollm2")
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        import_gguf("smollm2", Path(d) / "run")
        import_s = time.perf_counter() - t
        t = time.perf_counter()
        run = api.load(Path(d) / "run")
        load_s = time.perf_counter() - t
        ids = run.tokenizer.encode(PROMPT)
        n = a.new_tokens
        with torch.no_grad():
            s = timed(lambda: generate_ids(run.model, [ids], max_new_tokens=n, temperature=0), a.repeats)
        rows["genlab"] = {"import_s": round(import_s, 2), "load_s": round(load_s, 2), "tokens_per_s": round(n / s, 1)}
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hf_load = time.perf_counter() - t
    x = torch.tensor([ids])
    with torch.no_grad():
        s = timed(lambda: hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=2),
                  a.repeats)
    rows["transformers"] = {"load_s": round(hf_load, 2), "tokens_per_s": round(n / s, 1)}
    out = {"benchmark": "lm_pretrained", "model": path.name, "batch": 1, "new_tokens": n, "precision": "fp32",
           "threads": torch.get_num_threads(), "rows": rows,
           "ratio_genlab_over_transformers": round(rows["genlab"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"], 2)}
    res = Path(__file__).parent / "results" / "lm_pretrained.json"
    atomic_write_json(res, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
