"""Adapting SmolLM2-135M-Instruct to Shakespeare: genlab LoRA (r=8, r=32) and full fine-tuning vs `peft` +
`transformers` LoRA, on the same batches, measured in one run.

Every engine runs in its own process (its peak memory is its own) on the same pre-drawn training batches (windows
of Shakespeare's plays, tokenized with SmolLM2's tokenizer) and is scored on the same held-out windows (the last
10% of the corpus) before and after. genlab trains through its one `fit` loop; peft's run is a plain PyTorch
loop over `get_peft_model(AutoModelForCausalLM)` with the same optimizer (AdamW, same lr, warm-up and schedule
left out on both sides), loss and LoRA settings. Writes benchmarks/results/adapt.json.
usage: python benchmarks/adapt.py [--steps 30] [--batch 4] [--block 128] [--minutes 0] [--engines ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _engines import rss_mb, run_worker  # benchmarks/_engines.py

RESULTS = Path(__file__).parent / "results" / "adapt.json"
THREADS = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Batches:
    """The pre-drawn batches as a BatchSource for genlab's fit (in order, the same for every engine)."""

    def __init__(self, train, val):
        self.train, self.val, self.i = train, val, 0

    def train_batch(self, batch_size, generator):
        b = self.train[self.i % len(self.train)]
        self.i += 1
        return b

    def eval_batches(self, batch_size, max_batches=None, **_):
        return self.val


def held_out(loss_fn, val) -> float:
    import torch

    with torch.no_grad():
        total = sum(loss_fn(x, y) * y.numel() for x, y in val)
    return float(torch.tensor(total / sum(y.numel() for _, y in val)).exp())


def worker(engine: str, a) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    res = {"engine": engine}
    if engine.endswith("-heap"):  # peft with the allocator setting genlab's fit makes (runtime.reuse_freed_memory)
        from genlab.core.runtime import reuse_freed_memory

        reuse_freed_memory()
        engine = engine[: -len("-heap")]
    data = torch.load(a.batches)
    steps = len(data["train"]) if a.minutes else a.steps  # with a time budget, the clock ends the run
    train, val = data["train"][:steps], data["val"]
    t0 = time.perf_counter()
    if engine.startswith("genlab"):
        from genlab import api
        from genlab.nn.lora import add_lora
        from genlab.training.trainer import TrainConfig, fit

        run = api.load(a.run)
        model = run.model
        res["load_s"] = round(time.perf_counter() - t0, 2)
        model.eval()
        res["ppl_before"] = round(held_out(lambda x, y: model.loss((x, y)).loss.item(), val), 3)
        if engine == "genlab-full":
            lr = a.lr_full
        else:
            r = int(engine.rsplit("r", 1)[1])
            add_lora(model, TARGETS, r=r, alpha=2 * r, dropout=0.05)
            lr = a.lr
        res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cfg = TrainConfig(max_steps=steps, batch_size=a.batch, lr=lr, warmup_steps=0, min_lr_ratio=1.0,
                          weight_decay=0.0, eval_every=0, checkpoint_every=0, log_every=10 ** 6, progress=False,
                          max_minutes=a.minutes)
        out = fit(model, Batches(train, val), cfg)
        dt, steps = out.elapsed_s, out.step  # the training loop's own time (its closing evaluation left out)
        model.eval()
        res["ppl_after"] = round(held_out(lambda x, y: model.loss((x, y)).loss.item(), val), 3)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=torch.float32)
        res["load_s"] = round(time.perf_counter() - t0, 2)

        def loss_of(x, y):
            logits = model(input_ids=x).logits
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))

        model.eval()
        res["ppl_before"] = round(held_out(lambda x, y: loss_of(x, y).item(), val), 3)
        r = int(engine.rsplit("r", 1)[1])
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS))
        res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0,
                                betas=(0.9, 0.99), fused=True)
        model.train()
        t = time.perf_counter()
        steps = 0
        for x, y in train:
            if a.minutes and time.perf_counter() - t > a.minutes * 60:
                break
            loss = loss_of(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        dt = time.perf_counter() - t
        model.eval()
        res["ppl_after"] = round(held_out(lambda x, y: loss_of(x, y).item(), val), 3)
    res.update(steps=steps, train_s=round(dt, 1), tokens_per_s=round(steps * a.batch * a.block / dt, 1),
               peak_rss_mb=round(rss_mb()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=0.0, help="a wall-clock budget per engine instead (0 = none)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    ap.add_argument("--lr-full", type=float, default=5e-5, help="full fine-tuning learning rate")
    ap.add_argument("--engines", default="genlab-lora-r8,peft-lora-r8,genlab-lora-r32,genlab-full",
                    help="comma-separated, from genlab-lora-rN, peft-lora-rN, genlab-full; peft-lora-rN-heap is "
                         "peft with the allocator setting genlab's fit makes")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_args", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._worker:
        for k, v in json.loads(a._args).items():
            setattr(a, k, v)
        print(json.dumps(worker(a._worker, a)))
        return 0

    import torch

    from genlab import api
    from genlab.adapt.gguf import import_gguf
    from genlab.adapt.hf import export_hf
    from genlab.nn.kernels import kernels

    kernels()  # built once per machine (~45 s): here, not inside an engine's timed run

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        import_gguf("smollm2", d / "run")
        export_hf(api.load(d / "run"), d / "hf")
        run = api.load(d / "run")
        data = api._finetune_data(run, "shakespeare", a.block, 0.1)
        g = torch.Generator().manual_seed(0)
        n = a.steps if not a.minutes else 2_000
        train = [data.train_batch(a.batch, g) for _ in range(n)]
        val = data.eval_batches(a.batch, a.val_batches)
        torch.save({"train": train, "val": val}, d / "batches.pt")
        del run, data
        args = {"run": str(d / "run"), "hf": str(d / "hf"), "batches": str(d / "batches.pt")}
        rows = []
        for e in a.engines.split(","):
            cmd = [sys.executable, __file__, "--_worker", e, "--_args", json.dumps(args), "--steps", str(a.steps),
                   "--batch", str(a.batch), "--block", str(a.block), "--lr", str(a.lr), "--lr-full", str(a.lr_full),
                   "--minutes", str(a.minutes)]
            r = run_worker(e, cmd, THREADS)
            rows.append(r)
            if "error" not in r:
                print(json.dumps(r), flush=True)
    by = {r["engine"]: r for r in rows}
    ratio = None
    if "tokens_per_s" in by.get("genlab-lora-r8", {}) and "tokens_per_s" in by.get("peft-lora-r8", {}):
        ratio = round(by["genlab-lora-r8"]["tokens_per_s"] / by["peft-lora-r8"]["tokens_per_s"], 2)
    heap = None  # the part of the gain that is not the allocator setting
    if "tokens_per_s" in by.get("genlab-lora-r8", {}) and "tokens_per_s" in by.get("peft-lora-r8-heap", {}):
        heap = round(by["genlab-lora-r8"]["tokens_per_s"] / by["peft-lora-r8-heap"]["tokens_per_s"], 2)
    out = {"benchmark": "adapt", "model": "SmolLM2-135M-Instruct", "data": "shakespeare (SmolLM2 tokens)",
           "threads": THREADS, "steps": a.steps, "minutes": a.minutes, "batch": a.batch, "block": a.block,
           "lr_lora": a.lr, "lr_full": a.lr_full, "targets": TARGETS, "val_tokens": a.val_batches * a.batch * a.block,
           "cpu": torch.backends.cpu.get_cpu_capability(), "rows": rows, "genlab_vs_peft_lora_r8": ratio,
           "genlab_vs_peft_heap_lora_r8": heap}
    from genlab.core.checkpoint import atomic_write_json

    atomic_write_json(Path(a.out), out)
    print(json.dumps({"genlab_vs_peft_lora_r8": ratio, "genlab_vs_peft_heap_lora_r8": heap}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
