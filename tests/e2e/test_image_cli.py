"""The image families through the CLI as a user runs them: train a tiny preset for a few steps, sample a PNG
grid, reload, evaluate; and every bad input gives one clear line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from genlab import api
from genlab.models import MODELS
from tests.conftest import run_cli

FAMILIES = [n for n in MODELS.names() if MODELS.get(n).modality == "image"]
TRAIN = {"max_steps": 6, "batch_size": 16, "eval_every": 3, "eval_batches": 2, "checkpoint_every": 3}


@pytest.mark.parametrize("family", FAMILIES)
def test_train_sample_reload_eval(family, tiny_config, tmp_path):
    cfg = tiny_config(name=f"{family}_digits", family=family, data={"source": "digits"}, train=TRAIN)
    cfg.write_text(cfg.read_text().replace('seed = 7', 'seed = 7\npreview = 9'))
    p = run_cli("train", cfg, check=True)
    run = tmp_path / "runs" / f"{family}_digits"
    assert "trained" in p.stdout and (run / "model.safetensors").exists()
    assert (run / "samples" / "step_0000003.png").exists() and (run / "samples" / "latest.png").exists()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in log) and any("train_loss" in r for r in log)
    if family == "gan":  # the loss log shows both players
        assert any("loss_d" in r and "loss_g" in r for r in log)

    out1, out2 = tmp_path / "a.png", tmp_path / "b.png"
    run_cli("sample", run, "-n", 16, "--seed", 0, "--out", out1, check=True)
    temperature = ["--temperature", "1.0"] if family != "diffusion" else ["--sampler", "dpmpp_2m"]  # the default
    run_cli("sample", run, "-n", 16, "--seed", 0, "--out", out2, *temperature, check=True)
    with Image.open(out1) as a, Image.open(out2) as b:
        assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))  # same seed, same grid
        assert a.size[0] > 4 * 8 * 4  # 4 per row, enlarged 4x for 8x8 images

    loaded = api.load(run)  # reload: the same samples as the CLI wrote
    imgs = api.sample(loaded, 16, seed=0)
    assert imgs.shape == (16, 1, 8, 8) and imgs.dtype == torch.uint8

    p = run_cli("eval", run, "--json", "--iwae-k", 4, check=True)
    res = json.loads(p.stdout)
    assert json.loads((run / "eval.json").read_text())["family"] == family
    assert res["heldout_images"] == 180 and res["dims"] == 64
    if family in ("gan", "diffusion"):
        assert res["bits_per_dim"] is None and "no likelihood" in res["likelihood"]
    else:
        assert 0 < res["bits_per_dim"] < 12
    if family == "vae":
        assert res["bits_per_dim_iwae_4"] <= res["bits_per_dim_elbo"] + 0.05
        assert "IWAE" in res["likelihood"] and (run / "eval_reconstructions.png").exists()
    p = run_cli("eval", run)
    assert "bits/dim" in p.stdout


def test_conditional_run_samples_the_asked_classes(tiny_config, tmp_path):
    cfg = tiny_config(name="cvae", family="vae", data={"source": "digits"}, model={"conditional": True}, train=TRAIN)
    run_cli("train", cfg, check=True)
    run = tmp_path / "runs" / "cvae"
    run_cli("sample", run, "-n", 4, "--seed", 1, "--labels", "3", "--out", tmp_path / "c.png", check=True)
    p = run_cli("sample", run, "-n", 4, "--labels", "11", "--out", tmp_path / "d.png")
    assert p.returncode == 2 and "class ids in [0, 9]" in p.stderr


def test_user_folder_through_the_cli(tiny_config, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(24):
        d = tmp_path / "pics" / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = tiny_config(name="mine", family="flow", data={"source": "images", "path": str(tmp_path / "pics")},
                      train={**TRAIN, "max_steps": 2})
    run_cli("train", cfg, check=True)
    assert api.load(tmp_path / "runs" / "mine").model.config.channels == 3


def _fails(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "Traceback" not in p.stderr, p.stderr[-2000:]
    for n in needles:
        assert n in line, line


def test_bad_image_inputs(tiny_config, tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(4):
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(pics / f"{i}.png")
    (pics / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    base = {"family": "vae", "train": TRAIN}
    _fails(run_cli("train", tiny_config(name="c", data={"source": "images", "path": str(pics)}, **base)),
           "cannot be read", "broken.jpg")
    (tmp_path / "empty").mkdir()
    _fails(run_cli("train", tiny_config(name="e", data={"source": "images", "path": str(tmp_path / "empty")}, **base)),
           "holds no images")
    (pics / "broken.jpg").unlink()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(pics / "colour.png")
    _fails(run_cli("train", tiny_config(name="m", data={"source": "images", "path": str(pics)}, **base)),
           "mixes grayscale", "data.channels")
    _fails(run_cli("train", tiny_config(name="r", data={"source": "digits"}, model={"channels": 3}, **base)),
           "model.channels=3", "data.channels")
    _fails(run_cli("train", tiny_config(name="p", data={"source": "digits"}, model={"latent_dim": -3}, **base)),
           "latent_dim")
    _fails(run_cli("train", tiny_config(name="q", data={"source": "digits"}, preset="huge", **base)),
           "unknown preset 'huge'")
    _fails(run_cli("train", tiny_config(name="t", data={"source": "shakespeare"}, **base)), "learns image")
    _fails(run_cli("train", tiny_config(name="u", data={"source": "digits"}, family="gpt")), "learns text")
