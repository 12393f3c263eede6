"""Diffusion through the CLI as a user runs it: a tiny class-conditional model on digits, every sampler, guidance,
a denoising trajectory, inpainting that keeps the known pixels, and the bad inputs that must fail cleanly."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from genlab import api
from genlab.sampling.diffusion import SAMPLERS
from tests.conftest import run_cli
from tests.e2e.test_image_cli import _fails


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    from tests.conftest import write_config

    d = tmp_path_factory.mktemp("diffusion")
    cfg = write_config(d / "cdiff.toml", name="cdiff", family="diffusion", data={"source": "digits"},
                       model={"conditional": True},
                       train={"max_steps": 30, "batch_size": 16, "eval_every": 15, "eval_batches": 2,
                              "checkpoint_every": 15, "lr": 2e-3, "ema": 0.9})
    run_cli("train", cfg, check=True)
    return d / "runs" / "cdiff"


def _png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@pytest.mark.parametrize("sampler", SAMPLERS.names())
def test_every_sampler_from_the_cli_is_seeded(cond_run, sampler, tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    args = ("sample", cond_run, "-n", 4, "--sampler", sampler, "--steps", 8, "--guidance", 2, "--class", 7)
    run_cli(*args, "--seed", 0, "--out", a, check=True)
    run_cli(*args, "--seed", 0, "--out", b, check=True)
    run_cli(*args, "--seed", 1, "--out", c, check=True)
    assert np.array_equal(_png(a), _png(b)) and not np.array_equal(_png(a), _png(c))


def test_guidance_zero_is_the_conditional_path_and_classes_differ(cond_run):
    run = api.load(cond_run)
    kw = {"seed": 3, "sampler": "ddim", "steps": 10}
    plain = api.sample(run, 4, labels=[5], **kw)
    assert (plain == api.sample(run, 4, labels=[5], guidance=0.0, **kw)).all()
    assert not (plain == api.sample(run, 4, labels=[5], guidance=3.0, **kw)).all()
    assert not (plain == api.sample(run, 4, labels=[2], **kw)).all()


def test_bf16_sampling_from_the_cli_is_seeded_and_close_to_fp32(cond_run, tmp_path):
    """--precision bf16 samples through the bf16 copy of the U-Net, traced and fused by oneDNN Graph on a CPU;
    with guidance the net sees both branches in one batch of 2n."""
    a, b, f = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "f.png"
    args = ("sample", cond_run, "-n", 4, "--sampler", "dpmpp_2m", "--steps", 10, "--guidance", 1, "--class", 3,
            "--seed", 0)
    run_cli(*args, "--precision", "bf16", "--out", a, check=True)
    run_cli(*args, "--precision", "bf16", "--out", b, check=True)
    run_cli(*args, "--out", f, check=True)
    assert np.array_equal(_png(a), _png(b))
    diff = np.abs(_png(a).astype(int) - _png(f).astype(int))
    assert diff.mean() < 4 and np.percentile(diff, 99) < 40, (diff.mean(), diff.max())  # bf16 rounding only


def test_trajectory_png(cond_run, tmp_path):
    p = run_cli("sample", cond_run, "-n", 3, "--seed", 0, "--steps", 10, "--out", tmp_path / "g.png",
                "--trajectory", tmp_path / "t.png", "--frames", 5, check=True)
    assert "denoising path of 3 samples" in p.stdout
    t = _png(tmp_path / "t.png")  # 6 rows (noisy, x0 per sample) x 5 frames of 8x8 images, 2 px gaps, enlarged 4x
    assert t.shape == (4 * (2 + 6 * (8 + 2)), 4 * (2 + 5 * (8 + 2)))


def test_inpaint_keeps_the_known_pixels(cond_run, tmp_path):
    img = np.zeros((8, 8), dtype=np.uint8)
    img[:, 3:5] = 255
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[4:] = 255  # generate the bottom half
    Image.fromarray(img).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    p = run_cli("inpaint", cond_run, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png", "-n", 3,
                "--steps", 20, "--resample", 2, "--seed", 0, "--out", out, check=True)
    assert "completion" in p.stdout and out.exists()
    res = api.inpaint(cond_run, tmp_path / "in.png", tmp_path / "mask.png", 3, seed=0, steps=20, resample=2)
    assert res.shape == (3, 1, 8, 8)
    assert (res[:, 0, :4] == img[:4]).all()  # the kept half, bit for bit
    assert not (res[:, 0, 4:] == img[4:]).all()


def test_bad_diffusion_inputs(cond_run, tmp_path):
    o = tmp_path / "x.png"
    _fails(run_cli("sample", cond_run, "--sampler", "plms", "--out", o), "unknown sampler 'plms'", "dpmpp_2m",
           "euler", "heun")
    _fails(run_cli("sample", cond_run, "--steps", 0, "--out", o), "steps=0")
    _fails(run_cli("sample", cond_run, "--class", 12, "--out", o), "class ids in [0, 9]")
    _fails(run_cli("sample", cond_run, "--eta", 0.5, "--sampler", "euler", "--out", o), "eta applies to the ddim")
    _fails(run_cli("sample", cond_run, "--schedule", "cosine", "--out", o), "unknown schedule 'cosine'")
    _fails(run_cli("sample", cond_run, "--guidance", 1e6, "--out", o), "guidance=")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "in.png")
    Image.fromarray(np.full((6, 6), 255, dtype=np.uint8)).save(tmp_path / "small_mask.png")
    Image.fromarray(np.full((10, 10), 255, dtype=np.uint8)).save(tmp_path / "big.png")
    _fails(run_cli("inpaint", cond_run, "--image", tmp_path / "in.png", "--mask", tmp_path / "small_mask.png"),
           "the mask is 6x6 but the image is 8x8")
    _fails(run_cli("inpaint", cond_run, "--image", tmp_path / "big.png", "--mask", tmp_path / "small_mask.png"),
           "the image is 10x10 but the model makes 8x8")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    _fails(run_cli("inpaint", cond_run, "--image", tmp_path / "junk.png", "--mask", tmp_path / "in.png"),
           "cannot be read as an image")
    _fails(run_cli("inpaint", cond_run, "--image", tmp_path / "in.png", "--mask", tmp_path / "in.png"),
           "nothing to generate")
