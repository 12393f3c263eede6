"""Diffusion on a CPU: genlab's U-Net and samplers against diffusers, measured in the same run.

Peer: `diffusers.UNet2DModel(block_out_channels=(32, 64, 64), layers_per_block=1, down blocks Down, Down,
AttnDown, norm groups 8)`, 1,112,801 parameters, and genlab's `default` diffusion preset of the same shape
(1,112,801 unconditional: the same residual blocks, attention at 7x7 and in the middle). 28x28x1 images.

- train: images/s of one training step (forward, MSE on eps, backward, AdamW) at batch 64. genlab as its
  trainer runs it (`Diffusion.loss`, bf16 autocast, channels-last) and in fp32; the peer in fp32 (its default)
  and under the same bf16 autocast. Repeats interleaved, medians.
- sample: seconds for 16 images with DDIM 50 steps and DPM-Solver++(2M) 20 steps: genlab's samplers on its
  U-Net vs diffusers' DDIMScheduler / DPMSolverMultistepScheduler driving its UNet2DModel, same step counts.
- quality (with --run RUN, a trained fashion-mnist diffusion run): FID in the feature space of genlab's
  fashion-mnist domain classifier (eval/features.py), of DPM-Solver++(2M) at 10/20/50 steps, DDIM 50 and DDPM
  at 1000 steps, each on the same number of samples against the held-out test images, plus the classifier's
  accuracy on the requested classes.

    python benchmarks/diffusion.py                      # speed, writes benchmarks/results/diffusion.json
    python benchmarks/diffusion.py --quick              # smoke run
    python benchmarks/diffusion.py --only quality --run runs/fashion_mnist_diffusion --samples 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from genlab.core.checkpoint import atomic_write_json
from genlab.models.unet import FusedUNet
from genlab.sampling.image import save_grid

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "diffusion.json"
SIZE, BATCH = 28, 64


def build_genlab(channels_last: bool = False):
    from genlab.models import build_config, build_model

    torch.manual_seed(0)
    m = build_model(build_config({"family": "diffusion", "preset": "default", "channels": 1, "image_size": SIZE}))
    return m.to(memory_format=torch.channels_last) if channels_last else m


def build_peer():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=32)


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _images(g):
    return torch.randint(0, 256, (BATCH, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)


def train_step_genlab(model, opt, bf16, channels_last, g):
    x = _images(g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with _autocast(bf16):
        loss = model.loss((x, None)).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def train_step_peer(model, opt, bf16, g):
    x0 = _images(g).float() / 127.5 - 1
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)[t].view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with _autocast(bf16):
        out = model(xt, t).sample
    loss = F.mse_loss(out.float(), eps)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_train(repeats: int, steps: int) -> dict:
    variants = {
        "genlab_bf16_cl": (build_genlab(True), lambda m, o, g: train_step_genlab(m, o, True, True, g)),
        "genlab_bf16": (build_genlab(False), lambda m, o, g: train_step_genlab(m, o, True, False, g)),
        "genlab_fp32": (build_genlab(False), lambda m, o, g: train_step_genlab(m, o, False, False, g)),
        "diffusers_fp32": (build_peer(), lambda m, o, g: train_step_peer(m, o, False, g)),
        "diffusers_bf16": (build_peer(), lambda m, o, g: train_step_peer(m, o, True, g)),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    g = torch.Generator().manual_seed(0)
    for k, (m, step) in variants.items():  # warm-up
        m.train()
        for _ in range(2):
            step(m, opts[k], g)
    order = list(variants)
    for r in range(repeats):
        for k in order if r % 2 == 0 else order[::-1]:
            m, step = variants[k]
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m, opts[k], g)
            times[k].append(BATCH * steps / (time.perf_counter() - t0))
    res = {k: round(statistics.median(v), 1) for k, v in times.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in variants.items()}
    return {"images_per_s": res, "parameters": {"genlab": params["genlab_fp32"], "diffusers": params["diffusers_fp32"]},
            "batch": BATCH, "repeats": repeats, "steps_per_repeat": steps,
            "ratio_best_genlab_vs_diffusers_fp32": round(max(res["genlab_bf16_cl"], res["genlab_bf16"])
                                                          / res["diffusers_fp32"], 2),
            "ratio_best_genlab_vs_best_diffusers": round(max(res["genlab_bf16_cl"], res["genlab_bf16"])
                                                         / max(res["diffusers_fp32"], res["diffusers_bf16"]), 2)}


@torch.inference_mode()
def sample_genlab(model, sampler, steps, n, precision, seed=0, compile=False):
    return model.sample(n, generator=torch.Generator().manual_seed(seed), sampler=sampler, steps=steps,
                        precision=precision, compile=compile)


@contextlib.contextmanager
def eager_bf16():
    """genlab's bf16 sampling net as an eager bfloat16 copy, without the oneDNN Graph fusion (unet.FusedUNet)
    that a CPU run gets: for the models whose bf16 net is first built inside this context."""
    import genlab.models.diffusion as family

    fused, family.FusedUNet = family.FusedUNet, lambda net: net
    try:
        yield
    finally:
        family.FusedUNet = fused


class PeerForward(torch.nn.Module):
    """diffusers' UNet2DModel called as net(x, t) -> tensor, so that genlab's FusedUNet (TorchScript + oneDNN
    Graph fusion, the lever of genlab's bf16 sampling) can run the peer too."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t):
        return self.unet(x, t, return_dict=False)[0]


@torch.inference_mode()
def sample_peer(unet, sampler, steps, n, seed=0):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", timestep_spacing="trailing",
                            clip_sample=True, set_alpha_to_one=True)  # genlab clips x0 to [-1, 1] too
    else:
        sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear", solver_order=2,
                                          algorithm_type="dpmsolver++", use_karras_sigmas=True)
    sch.set_timesteps(steps)
    x = torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * sch.init_noise_sigma
    dtype = next(unet.parameters()).dtype
    for t in sch.timesteps:
        out = unet(sch.scale_model_input(x, t).to(dtype), t)
        eps = (out if isinstance(out, torch.Tensor) else out.sample).float()
        x = sch.step(eps, t, x).prev_sample
    return x


def bench_sample(repeats: int, n: int, plans) -> dict:
    """genlab fp32 and bf16 (`precision="bf16"`: a bfloat16 copy of the U-Net, on a CPU traced and fused by oneDNN
    Graph; the sampler state in fp32), the same bf16 copy eager, and the opt-in `compile=True` (torch.compile,
    inductor freezing) of the bf16 copy, warm, with its first call's time (the compile) reported apart; against
    diffusers' schedulers driving its UNet2DModel in fp32 (its default), as a bfloat16 copy, and as that copy
    traced and fused the same way. Medians of interleaved repeats after one warm-up call each (for the traced nets
    it holds the two profiling runs of their graph); each ratio is the median of the ratios within a repeat, which
    cancels the machine's drift between repeats."""
    ours, peer = build_genlab(False).eval(), build_peer().eval()
    with eager_bf16():
        ours_eager = build_genlab(False).eval()
        sample_genlab(ours_eager, "ddim", 1, n, "bf16")  # builds its (eager) bf16 copy inside the context
    peer16 = build_peer().eval().to(torch.bfloat16)
    peer16_fused = FusedUNet(PeerForward(build_peer().eval().to(torch.bfloat16)))
    out = {}
    for sampler, steps in plans:
        variants = {
            "genlab_fp32": lambda s=sampler, k=steps: sample_genlab(ours, s, k, n, "fp32"),
            "genlab_bf16": lambda s=sampler, k=steps: sample_genlab(ours, s, k, n, "bf16"),
            "genlab_bf16_eager": lambda s=sampler, k=steps: sample_genlab(ours_eager, s, k, n, "bf16"),
            "genlab_bf16_compiled": lambda s=sampler, k=steps: sample_genlab(ours, s, k, n, "bf16", compile=True),
            "diffusers_fp32": lambda s=sampler, k=steps: sample_peer(peer, s, k, n),
            "diffusers_bf16": lambda s=sampler, k=steps: sample_peer(peer16, s, k, n),
            "diffusers_bf16_fused": lambda s=sampler, k=steps: sample_peer(peer16_fused, s, k, n),
        }
        first = {}
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()  # warm-up (and, for the compiled variant, the compile; for the traced ones, the profiling runs)
            first[k] = round(time.perf_counter() - t0, 2)
        times: dict[str, list[float]] = {k: [] for k in variants}
        order = list(variants)
        for r in range(repeats):
            for k in order if r % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                variants[k]()
                times[k].append(time.perf_counter() - t0)
        sec = {k: round(statistics.median(v), 3) for k, v in times.items()}

        def ratio(peer_key, ours_key, times=times):
            return round(statistics.median(a / b for a, b in zip(times[peer_key], times[ours_key])), 2)

        out[f"{sampler}_{steps}"] = {
            "images": n, "seconds": sec, "first_call_seconds": first,
            "ratio_fp32": ratio("diffusers_fp32", "genlab_fp32"),
            "ratio_bf16_vs_diffusers_fp32": ratio("diffusers_fp32", "genlab_bf16"),
            "ratio_bf16_vs_diffusers_bf16": ratio("diffusers_bf16", "genlab_bf16"),
            "ratio_bf16_vs_diffusers_bf16_fused": ratio("diffusers_bf16_fused", "genlab_bf16"),
            "ratio_bf16_eager_vs_diffusers_fp32": ratio("diffusers_fp32", "genlab_bf16_eager"),
            "ratio_bf16_compiled_vs_diffusers_fp32": ratio("diffusers_fp32", "genlab_bf16_compiled"),
            "repeats": repeats}
    return out


def bench_quality(run_dir: str, n: int, plans) -> dict:
    from genlab import api
    from genlab.eval.features import domain_classifier
    from genlab.eval.image import class_accuracy, extract_features, fid_from_features

    run = api.load(run_dir)
    data = api.load_dataset(run.train_config.data)
    clf = domain_classifier(run.train_config.data)
    real = extract_features(clf, data.val.x)
    labels = torch.arange(n) % run.model.config.num_classes if run.model.config.conditional else None
    res = {"run": str(run_dir), "samples": n, "classifier_heldout_accuracy": clf.heldout_accuracy,
           "reference": f"{len(data.val.x)} held-out images", "fid_heldout_vs_train_same_n": None, "rows": []}
    res["fid_heldout_vs_train_same_n"] = round(fid_from_features(real, extract_features(clf, data.train.x[:n])), 3)
    for sampler, steps, guidance, precision in plans:
        t0 = time.perf_counter()
        imgs = api.sample(run, n, seed=0, labels=labels, sampler=sampler, steps=steps, guidance=guidance,
                          precision=precision)
        sec = time.perf_counter() - t0
        save_grid(imgs[:100], OUT.parent / f"diffusion_{sampler}_{steps}_w{guidance:g}_{precision}.png", nrow=10)
        row = {"sampler": sampler, "steps": steps, "guidance": guidance, "precision": precision,
               "seconds": round(sec, 1),
               "fid_domain": round(fid_from_features(real, extract_features(clf, imgs)), 3)}
        if labels is not None:
            row["class_accuracy"] = round(class_accuracy(clf, imgs, labels), 4)
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    return res


def _row(text: str, ap: argparse.ArgumentParser) -> tuple[str, int, float, str]:
    """'sampler:steps:guidance:precision' -> a quality plan row; a malformed one stops with the expected form."""
    parts = text.split(":")
    try:
        if len(parts) != 4 or parts[3] not in ("fp32", "bf16"):
            raise ValueError
        return parts[0], int(parts[1]), float(parts[2]), parts[3]
    except ValueError:
        ap.error(f"--rows: {text!r} is not sampler:steps:guidance:precision (e.g. dpmpp_2m:20:0:bf16; "
                 "precision fp32 or bf16)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["train", "sample", "quality"], nargs="*", default=["train", "sample"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--run", default=None, help="a trained diffusion run for the quality part")
    ap.add_argument("--samples", type=int, default=1000, help="quality: samples per sampler setting")
    ap.add_argument("--rows", default=None,
                    help="quality: only these rows, sampler:steps:guidance:precision,... (e.g. dpmpp_2m:20:0:bf16)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(),
                      "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
    if "train" in a.only:
        doc["train"] = bench_train(repeats=2 if a.quick else 7, steps=2 if a.quick else 6)
        print(json.dumps(doc["train"]), flush=True)
    if "sample" in a.only:
        plans = [("ddim", 5), ("dpmpp_2m", 4)] if a.quick else [("ddim", 50), ("dpmpp_2m", 20)]
        previous = [doc["sample"]] if "sample" in doc and "measured_at" in doc["sample"] else []
        doc["sample"] = bench_sample(repeats=2 if a.quick else 9, n=16, plans=plans)
        doc["sample"]["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        # the runs before (newest first), to show the machine's drift between runs
        doc["sample_earlier_runs"] = (previous + doc.get("sample_earlier_runs", []))[:4]
        print(json.dumps(doc["sample"]), flush=True)
    if "quality" in a.only:
        if not a.run:
            ap.error("--only quality needs --run RUN (a trained diffusion run)")
        plans = ([("dpmpp_2m", 10, 0.0, "fp32")] if a.quick else
                 [("dpmpp_2m", 10, 0.0, "fp32"), ("dpmpp_2m", 20, 0.0, "fp32"), ("dpmpp_2m", 50, 0.0, "fp32"),
                  ("ddim", 50, 0.0, "fp32"), ("ddpm", 1000, 0.0, "fp32"), ("dpmpp_2m", 20, 0.0, "bf16"),
                  ("dpmpp_2m", 20, 1.0, "fp32"), ("dpmpp_2m", 20, 3.0, "fp32")])
        if a.rows:  # a subset, re-measured: it replaces those rows of the last full measurement
            plans = [_row(r, ap) for r in a.rows.split(",")]
        res = bench_quality(a.run, 64 if a.quick else a.samples, plans)
        if a.rows and doc.get("quality", {}).get("samples") == res["samples"]:
            new = {(r["sampler"], r["steps"], r["guidance"], r["precision"]): r for r in res["rows"]}
            old = doc["quality"]["rows"]
            keys = [(r["sampler"], r["steps"], r["guidance"], r["precision"]) for r in old]
            res["rows"] = [new.pop(k, r) for k, r in zip(keys, old)] + list(new.values())
        doc["quality"] = res
    command = "python benchmarks/diffusion.py " + " ".join(
        f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(a).items()
        if v not in (None, False) and k != "out" and (k != "samples" or "quality" in a.only))
    doc.pop("command", None)
    doc["commands"] = {**doc.get("commands", {}), **{part: command for part in a.only}}  # what measured each part
    if not a.quick:
        atomic_write_json(out, doc)


if __name__ == "__main__":
    main()
