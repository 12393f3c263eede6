"""The first hour of a new user: the README's own commands and snippet as written, naming and resuming runs,
threads, partial evaluations, units, file modes, class names and the smaller rough edges of the CLI."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from genlab import api
from tests.conftest import ROOT, run_cli, write_config

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _readme_command(verb: str) -> list[str]:
    """The README's first `genlab VERB ...` command (continuation lines joined), split as bash would."""
    lines = README.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"genlab {verb} "):
            cmd = line
            while cmd.rstrip().endswith("\\"):
                i += 1
                cmd = cmd.rstrip()[:-1] + " " + lines[i].strip()
            return shlex.split(cmd.split("  #")[0])[1:]
    raise AssertionError(f"no 'genlab {verb}' line in the README")


# ------------------------------------------------------------------ 2. --stop "\n\n" as the README writes it


def test_readme_generate_line_stops_at_a_blank_line(trained_ngram):
    args = _readme_command("generate")
    assert '\\n\\n' in args  # bash hands the two characters backslash, n to genlab
    args[1] = str(trained_ngram)  # the README's run folder -> the test's
    args = [a for a in args if a != "--stream"]
    out = run_cli(*args, check=True).stdout
    samples = re.split(r"^--- sample \d+/3 ---\n", out, flags=re.MULTILINE)[1:]
    assert len(samples) == 3
    for s in samples:
        assert s.startswith("ROMEO.") and "\n\n" not in s.rstrip("\n")
    # the n-gram writes blank lines often: with the stop decoded, some sample ends well before 300 characters
    assert min(len(s) for s in samples) < 250
    streamed = run_cli(*args, "--stream", check=True).stdout
    assert streamed == out


def test_escapes_are_decoded_as_a_shell_user_expects():
    from genlab.cli import unescape

    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb") == "a\tb" and unescape(r"caf\u00e9") == "café"
    assert unescape(r"C:\path") == r"C:\path" and unescape(r"\\n") == r"\n"


# ------------------------------------------------------------------ 3. threads


def test_threads_option_env_and_config(trained_gpt, tmp_path, monkeypatch):
    code = "import torch, genlab.cli as c, sys; c.main(sys.argv[1:]); print('threads', torch.get_num_threads())"
    env = dict(os.environ)
    env.pop("GENLAB_THREADS", None)
    p = subprocess.run([sys.executable, "-c", code, "--threads", "1", "eval", str(trained_gpt)], env=env,
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0 and "threads 1" in p.stdout
    p = run_cli("eval", trained_gpt, env={"GENLAB_THREADS": "lots"})
    assert p.returncode == 2 and "GENLAB_THREADS='lots'" in p.stderr
    p = run_cli("--threads", "0", "eval", trained_gpt)
    assert p.returncode == 2 and "--threads=0" in p.stderr

    monkeypatch.delenv("GENLAB_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        cfg = write_config(tmp_path / "t.toml", name="t", out_dir=tmp_path, train={"max_steps": 2, "threads": 1})
        api.train(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_auto_threads_leave_busy_cores_alone_and_say_so(monkeypatch, caplog):
    from genlab.core import runtime

    assert 0 <= runtime.busy_cores(0.05) <= (os.cpu_count() or 1) + 0.01
    monkeypatch.delenv("GENLAB_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "busy_cores", lambda: 1.1)
        with caplog.at_level("INFO", logger="genlab"):
            assert runtime.configure_threads() == 1
        assert "busy" in caplog.text and "slower" in caplog.text
        monkeypatch.setattr(runtime, "busy_cores", lambda: 0.1)
        assert runtime.configure_threads() == 2
        monkeypatch.setenv("GENLAB_THREADS", "2")
        monkeypatch.setattr(runtime, "busy_cores", lambda: 1.9)
        caplog.clear()
        with caplog.at_level("INFO", logger="genlab"):
            assert runtime.configure_threads() == 2  # asked for: kept, with the warning
        assert "busy" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_precision_auto_takes_bf16_only_where_the_cpu_has_it(monkeypatch, caplog):
    """bf16 autocast is emulated (17x slower for the baby GPT) on CPUs without AVX512-BF16/AMX: the shipped
    configs say "auto", which picks fp32 there, and an explicit bf16 is kept but warned about."""
    from genlab.core import runtime
    from genlab.core.errors import ConfigError

    for config in (ROOT / "configs").rglob("*.toml"):
        assert 'precision = "bf16"' not in config.read_text(), config
    if os.path.exists("/proc/cpuinfo") and os.uname().machine in ("x86_64", "AMD64"):  # the real probe
        flags = (Path("/proc/cpuinfo")).read_text().split()
        assert runtime.native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    monkeypatch.setattr(runtime, "_told", set())
    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    with caplog.at_level("INFO", logger="genlab"):
        assert runtime.resolve_precision("auto") == "fp32"
        assert runtime.resolve_precision("bf16") == "bf16"
        assert runtime.resolve_precision("fp32") == "fp32"
    assert "no native bfloat16" in caplog.text and "slower than fp32" in caplog.text
    monkeypatch.setattr(runtime, "native_bf16", lambda: True)
    assert runtime.resolve_precision("auto") == "bf16"
    with pytest.raises(ConfigError, match="'auto', 'fp32' or 'bf16'"):
        runtime.resolve_precision("fp16")


# ------------------------------------------------------------------ 4. partial evaluations


def test_eval_max_tokens_zero_is_all_and_a_partial_eval_keeps_the_full_one(trained_gpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_gpt, run)
    full = json.loads(run_cli("eval", run, "--json", check=True).stdout)
    assert full["heldout_fraction_covered"] == 1 and full["heldout_tokens"] == full["heldout_tokens_total"]
    zero = json.loads(run_cli("eval", run, "--json", "--max-tokens", "0", check=True).stdout)
    assert zero["heldout_tokens"] == full["heldout_tokens"] and zero["loss_nats_per_token"] == full["loss_nats_per_token"]
    saved = (run / "eval.json").read_text()
    p = run_cli("eval", run, "--max-tokens", "1000", check=True)
    assert "1,000 of" in p.stdout and "eval_partial.json" in p.stdout and "%" in p.stdout
    assert (run / "eval.json").read_text() == saved  # the full evaluation is kept
    part = json.loads((run / "eval_partial.json").read_text())
    assert part["heldout_tokens"] == 1000 and part["heldout_fraction_covered"] < 1
    assert run_cli("eval", run, "--max-tokens", "-5").returncode == 2


# ------------------------------------------------------------------ 7. naming and resuming


def test_resume_a_run_folder_by_itself_without_repeating_set(tmp_path):
    cfg = write_config(tmp_path / "c.toml", name="default_name", out_dir=tmp_path / "runs", train={"max_steps": 6})
    run_cli("train", cfg, "--set", "name=austen", "--set", "model.n_embd=24", "--set", "train.lr=2e-3",
            check=True)
    run = tmp_path / "runs" / "austen"
    assert not (tmp_path / "runs" / "default_name").exists()
    p = run_cli("train", "--resume", run, "--set", "train.max_steps=9", check=True)
    assert "9 steps" in p.stdout
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["model"]["n_embd"] == 24 and saved["train"]["lr"] == 2e-3 and saved["train"]["max_steps"] == 9
    # the config + --resume form finds the run by the name given now, and needs no other earlier --set
    p = run_cli("train", cfg, "--set", "name=austen", "--resume", "--set", "train.max_steps=11", check=True)
    assert "11 steps" in p.stdout
    p = run_cli("train", "--resume", run, "--set", "model.n_layer=3")
    assert p.returncode == 2 and "model.n_layer" in p.stderr
    p = run_cli("train", "--resume", tmp_path / "nowhere")
    assert p.returncode == 2 and "not found" in p.stderr
    p = run_cli("train")
    assert p.returncode == 2 and "--resume runs/NAME" in p.stderr


def test_readme_shows_naming_runs():
    assert "--set name=" in README
    snippet = _readme_python()
    assert "name=" in snippet and "overwrite=True" in snippet  # the snippet's overwrite replaces only its own run


# ------------------------------------------------------------------ 8. progress when stdout is not a terminal


def test_progress_lines_when_not_a_terminal_and_quiet_means_quiet(tmp_path):
    cfg = write_config(tmp_path / "p.toml", name="p", out_dir=tmp_path / "runs",
                       train={"max_steps": 0, "max_minutes": 0.05, "progress": True, "eval_every": 0})
    p = run_cli("train", cfg, check=True)
    assert "\r" not in p.stderr  # no carriage-return bar in a file or pipe
    lines = [line for line in p.stderr.splitlines() if "genlab.training.trainer: step" in line]
    assert lines and "of 3 s" in lines[0] and "nats/token" in lines[0]
    q = run_cli("-q", "train", cfg, "--overwrite", check=True)
    assert q.stderr.strip() == ""


def test_time_budget_bar_counts_seconds(monkeypatch):
    from genlab.training import trainer

    monkeypatch.setattr(trainer.sys.stderr, "isatty", lambda: True, raising=False)
    import logging

    logging.getLogger("genlab").setLevel(logging.INFO)
    cfg = trainer.TrainConfig(max_steps=5000, max_minutes=1.0)
    bar = trainer._Progress(cfg, 60.0, 0, 0.0, "nats/token")
    try:
        assert bar.bar is not None and bar.bar.total == 60 and bar.bar.unit == "s"
        bar.step(854, 30.0, 1.5)
        assert bar.bar.n == 30.0 and "854/5000" in bar.bar.postfix
    finally:
        bar.close()


# ------------------------------------------------------------------ 9. file modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_run_file_follows_the_umask(tmp_path, umask):
    cfg = write_config(tmp_path / "u.toml", name="u", out_dir=tmp_path / "runs", train={"max_steps": 2})
    old = os.umask(umask)
    try:
        run_dir, _ = api.train(cfg)
        api.evaluate(run_dir)
    finally:
        os.umask(old)
    files = [f for f in run_dir.rglob("*") if f.is_file()]
    assert any(f.name == "model.safetensors" for f in files)
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name


# ------------------------------------------------------------------ 10. class names of an own image folder


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("own_images")
    rng = np.random.default_rng(0)
    for k, cls in enumerate(["cats", "dogs", "faces"]):
        (d / "img" / cls).mkdir(parents=True)
        for i in range(12):
            a = (rng.random((8, 8)) * 80 + 60 * k).astype(np.uint8)
            Image.fromarray(a).save(d / "img" / cls / f"{i}.png")
    cfg = write_config(d / "c.toml", name="cgan", family="gan", out_dir=d / "runs",
                       data={"source": "images", "path": str(d / "img")}, model={"conditional": True},
                       train={"max_steps": 2, "batch_size": 8, "eval_every": 0, "eval_batches": 1})
    run_cli("train", cfg, check=True)
    return d / "runs" / "cgan"


def test_class_names_are_stored_and_accepted(faces_run, tmp_path):
    assert json.loads((faces_run / "config.json").read_text())["class_names"] == ["cats", "dogs", "faces"]
    run = api.load(faces_run)
    assert run.class_names == ["cats", "dogs", "faces"]
    by_name = api.sample(run, 4, seed=0, labels=["faces"])
    by_id = api.sample(run, 4, seed=0, labels=[2])
    assert torch.equal(by_name, by_id)
    out = tmp_path / "faces.png"
    p = run_cli("sample", faces_run, "-n", 4, "--labels", "faces", "--seed", 0, "--out", out, check=True)
    assert "faces.png" in p.stdout
    plain = tmp_path / "plain.png"
    run_cli("sample", faces_run, "-n", 4, "--labels", "2", "--seed", 0, "--out", plain, check=True)
    with Image.open(out) as a, Image.open(plain) as b:
        assert a.size == b.size  # the same grid, the names written under the images
    p = run_cli("sample", faces_run, "--labels", "horses")
    assert p.returncode == 2 and "cats, dogs, faces" in p.stderr and p.stderr.count("\n") == 1


def test_grids_show_the_class_names(faces_run, tmp_path):
    out = tmp_path / "grid.png"
    run_cli("sample", faces_run, "-n", 6, "--seed", 0, "--out", out, check=True)
    with Image.open(out) as im:
        a = np.asarray(im.convert("L"))
    # the default cycles the classes: 3 columns (one per class), a caption strip under each row of images
    h = 8 * 4
    assert a.shape[1] == 3 * (h + 8) + 8 and a.shape[0] > 2 * (h + 8) + 8
    strip = a[8 + h: 8 + h + 12]
    assert (strip < 128).any()  # dark caption text on the white strip


# ------------------------------------------------------------------ 11. units


def test_training_says_the_unit_of_its_loss(tmp_path, faces_run):
    cfg = write_config(tmp_path / "g.toml", name="g", out_dir=tmp_path / "runs", train={"max_steps": 2})
    p = run_cli("train", cfg, check=True)
    assert re.search(r"held-out loss \d+\.\d+ nats/token \(\d+\.\d+ bits/token\)", p.stdout)
    cfg = write_config(tmp_path / "n.toml", name="n", family="ngram", out_dir=tmp_path / "runs",
                       train={"max_steps": 1})
    p = run_cli("train", cfg, check=True)
    assert p.stdout.startswith("fitted ") and "stored n-grams" in p.stdout and "1 steps" not in p.stdout
    assert "0 parameters" not in p.stderr
    assert api.load(faces_run).model.loss_unit == "G+D loss, not a likelihood"
    from genlab.core.outputs import format_loss

    assert format_loss(1.0, "G+D loss, not a likelihood") == "1.0000 (G+D loss, not a likelihood)"
    assert format_loss(3.3194, "nats/dim (negative ELBO)") == "3.3194 nats/dim (4.7889 bits/dim, negative ELBO)"


# ------------------------------------------------------------------ 12. smaller


def test_sample_writes_the_format_its_name_asks_for(faces_run, tmp_path):
    run_cli("sample", faces_run, "-n", 4, "--out", tmp_path / "x.jpg", check=True)
    assert (tmp_path / "x.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG
    run_cli("sample", faces_run, "-n", 4, "--out", tmp_path / "x.png", check=True)
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = run_cli("sample", faces_run, "-n", 4, "--out", tmp_path / "x.xyz")
    assert p.returncode == 2 and ".png" in p.stderr and not (tmp_path / "x.xyz").exists()


def test_options_of_other_families_are_one_line_errors(faces_run, trained_gpt):
    p = run_cli("sample", faces_run, "--sampler", "ddim")
    assert p.returncode == 2 and "diffusion" in p.stderr and p.stderr.count("\n") == 1
    p = run_cli("sample", trained_gpt, "--guidance", "3")
    assert p.returncode == 2 and "diffusion" in p.stderr and "gpt" in p.stderr and p.stderr.count("\n") == 1
    p = run_cli("sample", trained_gpt, "--out", "x.png")
    assert p.returncode == 2 and "--out" in p.stderr
    p = run_cli("sample", faces_run, "--max-new-tokens", "5")
    assert p.returncode == 2 and "language models" in p.stderr
    with pytest.raises(api.ConfigError, match="diffusion"):
        api.generate(trained_gpt, "x", guidance=3.0)


def test_nan_weights_are_a_one_line_error(trained_gpt, tmp_path):
    run = tmp_path / "nan"
    shutil.copytree(trained_gpt, run)
    w = load_file(str(run / "model.safetensors"))
    name = next(iter(w))
    w[name][0] = float("nan")
    save_file(w, str(run / "model.safetensors"))
    for verb in ("generate", "eval", "sample"):
        p = run_cli(verb, run)
        assert p.returncode == 2 and "NaN" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_help_texts_say_each_default_once():
    for verb in ("train", "generate", "sample", "inpaint", "eval", "export", "compare", "demo"):
        text = run_cli(verb, "--help", check=True).stdout
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: [])" not in flat, verb
        assert not re.search(r"\(default: [^)]*\)\s*\(default:", flat), verb


def test_readme_stream_snippet_ends_its_line():
    snippet = _readme_python()
    after_loop = snippet[snippet.index("stream=True"):].split("\n")[2]  # the line after the loop's body
    assert after_loop.startswith("print()")


def _readme_python() -> str:
    m = re.search(r"From Python:\n\n```python\n(.*?)```", README, re.DOTALL)
    assert m, "the README's Python snippet"
    return m.group(1)


@pytest.mark.slow
def test_the_readme_python_snippet_runs_as_written(tmp_path):
    """The snippet, verbatim, in a fresh folder with the project's configs (it trains for 500 steps)."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    p = subprocess.run([sys.executable, "-c", _readme_python()], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.splitlines()
    assert len(lines) >= 3
    assert float(lines[-1]) < 4.0  # bits/char after 500 steps (a uniform guess over ~65 characters is 6)
