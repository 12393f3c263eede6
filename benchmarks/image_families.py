"""The image families on the same data and the same CPU budget: held-out bits/dim (where defined), training
images/s, time to sample 64 images, parameter count.

Each (data, family) pair trains its config `configs/<family>/<data>.toml` (the family's default preset) for
a wall-clock budget, then is evaluated on the whole held-out split outside the budget (`api.evaluate`: exact
for flow and pixelcnn, the IWAE bound for vae, none for gan). Targets on fashion-mnist with 10 minutes on
2 cores: flow <= 3.5, pixelcnn <= 3.3, vae <= 4.0 bits/dim.

    python benchmarks/image_families.py                                  # both datasets, 10 min each (~90 min)
    python benchmarks/image_families.py --data fashion_mnist --families flow pixelcnn
    python benchmarks/image_families.py --minutes 0.2 --eval-images 200  # a smoke run
Writes (merges into) benchmarks/results/image_families.json and a sample grid per run next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from genlab import api
from genlab.core.checkpoint import atomic_write_json
from genlab.sampling.image import save_grid

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"fashion_mnist": {"flow": 3.5, "pixelcnn": 3.3, "vae": 4.0}}


def bench_one(family: str, data: str, minutes: float, work: Path, eval_images: int | None, iwae_k: int) -> dict:
    cfg = ROOT / "configs" / family / f"{data}.toml"
    rc = api.resolve_config(cfg, [f"train.max_minutes={minutes}", "train.max_steps=0", "train.progress=false",
                                  f"out_dir={work}", f"name={family}_{data}", "train.checkpoint_every=0"])
    run_dir, res = api.train(rc, overwrite=True)
    rates = [r["items_per_s"] for r in res.history if "items_per_s" in r]
    run = api.load(run_dir)
    api.sample(run, 4, seed=1)  # warm-up
    t0 = time.perf_counter()
    images = api.sample(run, 64, seed=0)
    sample_s = time.perf_counter() - t0
    grid = save_grid(images, ROOT / "benchmarks" / "results" / f"samples_{family}_{data}.png", nrow=8)
    ev = api.evaluate(run, max_images=eval_images, iwae_k=iwae_k)
    target = TARGETS.get(data, {}).get(family)
    return {
        "family": family,
        "data": data,
        "config": str(cfg.relative_to(ROOT)),
        "preset": rc.model.get("preset"),
        "parameters": api.num_params(run.model),
        "train_minutes": minutes,
        "steps": res.step,
        "train_images_per_s": round(statistics.median(rates), 1) if rates else None,
        "heldout_images": ev["heldout_images"],
        "bits_per_dim": ev["bits_per_dim"],
        "likelihood": ev["likelihood"],
        **{k: v for k, v in ev.items() if k.startswith("bits_per_dim_")},
        "target_bits_per_dim": target,
        "target_met": None if target is None or ev["bits_per_dim"] is None else ev["bits_per_dim"] <= target,
        "sample_64_s": round(sample_s, 2),
        "eval_s": ev["seconds"],
        "grid": str(grid.relative_to(ROOT)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="*", default=["fashion_mnist", "mnist"])
    ap.add_argument("--families", nargs="*", default=["flow", "pixelcnn", "vae", "gan"])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--eval-images", type=int, default=None, help="cap the held-out images (default: all)")
    ap.add_argument("--iwae-k", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "image_families.json"))
    ap.add_argument("--workdir", default="/tmp/genlab_image_families")
    a = ap.parse_args()
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"runs": []}
    doc.update({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "command": "python benchmarks/image_families.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(a).items() if v is not None and k not in ("out", "workdir")),
    })
    for data in a.data:
        for family in a.families:
            r = bench_one(family, data, a.minutes, Path(a.workdir), a.eval_images, a.iwae_k)
            r["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            print(json.dumps(r), flush=True)
            doc["runs"] = [x for x in doc["runs"] if (x["family"], x["data"]) != (family, data)] + [r]
            atomic_write_json(out, doc)


if __name__ == "__main__":
    main()
