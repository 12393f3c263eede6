"""Shared fixtures: tiny configs on a slice of the real Shakespeare corpus, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_config(path: Path, *, name="tiny", family="gpt", preset="tiny", out_dir=None, data=None, model=None,
                 train=None) -> Path:
    """A TOML run config for a few seconds of training on 30k characters of Shakespeare."""
    data = {"source": "shakespeare", "tokenizer": "char", "max_chars": 30000, **(data or {})}
    model = {"family": family, "preset": preset, **(model or {})}
    train = {"max_steps": 20, "batch_size": 8, "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10,
             "log_every": 5, "warmup_steps": 2, "progress": False, **(train or {})}

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines = [f"name = {val(name)}", f"out_dir = {val(str(out_dir or path.parent / 'runs'))}", "seed = 7"]
    for section, d in (("data", data), ("model", model), ("train", train)):
        lines.append(f"[{section}]")
        lines += [f"{k} = {val(v)}" for k, v in d.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args, cwd=None, check=False, timeout=300, env=None, input=None) -> subprocess.CompletedProcess:
    """Run `genlab ARGS` as a user would, in a subprocess (`input`: text piped to its stdin)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    p = subprocess.run([sys.executable, "-m", "genlab", *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env=e, check=False, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"genlab {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p


@pytest.fixture
def tiny_config(tmp_path):
    def make(**kw):
        return write_config(tmp_path / f"{kw.get('name', 'tiny')}.toml", **kw)

    return make


@pytest.fixture(scope="session")
def trained_gpt(tmp_path_factory):
    """A tiny GPT run trained once for the whole session (through the API, as the CLI does)."""
    from genlab import api

    d = tmp_path_factory.mktemp("gpt")
    cfg = write_config(d / "gpt.toml", name="gpt", train={"max_steps": 30})
    run_dir, _ = api.train(cfg)
    return run_dir


@pytest.fixture(scope="session")
def trained_ngram(tmp_path_factory):
    from genlab import api

    d = tmp_path_factory.mktemp("ngram")
    cfg = write_config(d / "ngram.toml", name="ngram", family="ngram", preset="tiny", train={"max_steps": 1})
    run_dir, _ = api.train(cfg)
    return run_dir
