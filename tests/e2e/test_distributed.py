"""`torchrun --nproc-per-node 2 -m genlab train ...` (gloo, DistributedDataParallel) takes the same steps as one
process with the same global batch, writes its files from rank 0 only, and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

pytestmark = pytest.mark.slow
# a constant learning rate after no warm-up: a run resumed with a longer budget then follows the same schedule
TRAIN = {"max_steps": 6, "eval_every": 3, "eval_batches": 4, "checkpoint_every": 3, "log_every": 1,
         "precision": "fp32", "warmup_steps": 0, "min_lr_ratio": 1.0}
MODEL = {"dropout": 0.0}  # dropout masks differ with the batch layout; the equivalence is about the gradients


def torchrun(*args, cwd, nproc=2, verb="train"):
    env = dict(os.environ, PYTHONUNBUFFERED="1", GENLAB_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "genlab", verb, *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    return p


def _close(a: dict, b: dict, tol=2e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, f"weights differ by {worst}"
    return worst


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_global_batch_and_resume(tiny_config, tmp_path, parallel):
    one = tiny_config(name="one", train={**TRAIN, "batch_size": 8}, model=MODEL)
    run_cli("train", one, cwd=tmp_path, check=True, env={"GENLAB_THREADS": "1"})
    # 2 x 4 = the same 8 rows; fsdp shards the weights, gradients and optimizer state over the 2 processes
    two = tiny_config(name="two", train={**TRAIN, "batch_size": 4, "parallel": parallel}, model=MODEL)
    p = torchrun(two, cwd=tmp_path)
    assert "on 2 processes" in p.stdout and p.stdout.count("trained ") == 1  # rank 0 reports, once
    runs = tmp_path / "runs"
    w_one, w_two = load_file(str(runs / "one" / "model.safetensors")), load_file(str(runs / "two" / "model.safetensors"))
    _close(w_one, w_two)
    # the held-out loss is sharded over the ranks and summed back: the same number as one process computes
    val = [json.loads(line)["val_loss"] for r in ("one", "two")
           for line in (runs / r / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert len(val) == 4 and abs(val[1] - val[3]) < 1e-4 and abs(val[0] - val[2]) < 1e-4
    # rank 0 alone wrote the metrics: one record per step, not two
    steps = [json.loads(line)["step"] for line in (runs / "two" / "metrics.jsonl").read_text().splitlines()
             if "train_loss" in line]
    assert steps == list(range(1, 7))
    state = torch.load(runs / "two" / "trainer_state.pt", weights_only=True)
    assert len(state["torch_rng_ranks"]) == 2

    # resume on 2 processes with a longer budget == one process trained straight through to the end
    torchrun("--resume", runs / "two", "--set", "train.max_steps=9", cwd=tmp_path)
    ref = tiny_config(name="ref", train={**TRAIN, "batch_size": 8, "max_steps": 9}, model=MODEL)
    run_cli("train", ref, cwd=tmp_path, check=True, env={"GENLAB_THREADS": "1"})
    _close(load_file(str(runs / "ref" / "model.safetensors")), load_file(str(runs / "two" / "model.safetensors")))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_finetune_on_two_processes_equals_one(tiny_config, tmp_path, parallel):
    base = tiny_config(name="base", family="llama", train={"max_steps": 30, "lr": 3e-3})
    run_cli("train", base, cwd=tmp_path, check=True, env={"GENLAB_THREADS": "1"})
    text = tmp_path / "style.txt"
    text.write_text("My love is like a rose that blooms in May.\n" * 300)
    run = tmp_path / "runs" / "base"
    common = ["--rank", "4", "--set", "dropout=0", "--set", "block_size=32", "--set", "train.max_steps=5",
              "--set", "train.warmup_steps=0", "--set", "train.progress=false"]
    run_cli("finetune", run, text, "--name", "one", *common, "--set", "train.batch_size=4", check=True,
            env={"GENLAB_THREADS": "1"})
    p = torchrun(run, text, "--name", "two", *common, "--set", "train.batch_size=2", "--set",
                 f"train.parallel={parallel}", cwd=tmp_path, verb="finetune")
    assert p.stdout.count("fine-tuned") == 1
    a = load_file(str(run / "adapters" / "one" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapters" / "two" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)  # it trained
    _close(a, b)


def test_a_family_that_cannot_train_on_several_processes_says_so(tiny_config, tmp_path):
    cfg = tiny_config(name="ng", family="ngram", preset="tiny")
    env = dict(os.environ, GENLAB_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "genlab", "train", str(cfg)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env, check=False)
    assert p.returncode != 0
    assert "train it on one process" in p.stderr
