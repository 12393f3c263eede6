"""Kill training with SIGKILL at random moments (checkpoint writes included), resume, and get the same
weights as an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

TRAIN = {"max_steps": 40, "checkpoint_every": 1, "eval_every": 10, "log_every": 2, "precision": "fp32"}
MODEL = {"dropout": 0.1}  # dropout draws from the global RNG: resume must restore it too
# the same thread count in every process: "auto" follows the machine's load, and a matrix product split over
# another number of threads may round differently, which bit-for-bit equality would catch
ONE_THREAD = {**os.environ, "GENLAB_THREADS": "1"}


def _weights(run):
    return load_file(str(run / "model.safetensors"))


def _val_losses(run):
    import json

    return [json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_uninterrupted(tiny_config, tmp_path):
    ref_cfg = tiny_config(name="ref", train=TRAIN, model=MODEL)
    run_cli("train", ref_cfg, cwd=tmp_path, check=True, env={"GENLAB_THREADS": "1"})
    ref = tmp_path / "runs" / "ref"

    cfg = tiny_config(name="killed", train=TRAIN, model=MODEL)
    run = tmp_path / "runs" / "killed"
    rng = random.Random(0)
    kills = 0
    for attempt in range(12):
        resume = (run / "trainer_state.pt").exists()
        args = [sys.executable, "-m", "genlab", "train", str(cfg)] + (["--resume"] if resume else ["--overwrite"])
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ONE_THREAD)
        if attempt < 4:
            # wait until training is writing checkpoints (one per step), then kill at a random moment
            t0 = time.time()
            start_mtime = (run / "trainer_state.pt").stat().st_mtime if resume else 0
            while time.time() - t0 < 60 and proc.poll() is None:
                st = run / "trainer_state.pt"
                if st.exists() and st.stat().st_mtime != start_mtime:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            proc.wait()
            continue
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
        break
    assert kills >= 2, "the run finished before it could be killed; make it longer"
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _val_losses(ref) == _val_losses(run)
    assert not list(run.glob(".*.tmp"))


def test_crash_inside_a_checkpoint_write_keeps_the_old_files(tiny_config, tmp_path, monkeypatch):
    """A failure between the temp file and the rename leaves the previous checkpoint whole and resumable."""
    from genlab import api
    from genlab.core import checkpoint as ckpt

    cfg = tiny_config(name="crash", train={**TRAIN, "max_steps": 6, "checkpoint_every": 3})
    run_dir, _ = api.train(cfg)
    before = (run_dir / "trainer_state.pt").read_bytes(), (run_dir / "model.safetensors").read_bytes()

    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise SystemExit("killed mid-write")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(SystemExit):
        api.train(api.resolve_config(cfg, ["train.max_steps=9"]), resume=True)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert (run_dir / "model.safetensors").read_bytes() == before[1]  # the old weights, whole
    assert (run_dir / "trainer_state.pt").read_bytes() != before[0]  # the new state was already written
    _, res = api.train(api.resolve_config(cfg, ["train.max_steps=9"]), resume=True)
    assert res.step == 9
    assert run_cli("eval", run_dir).returncode == 0
