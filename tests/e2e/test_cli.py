"""The CLI as a user runs it: train, generate with every control, eval, export, and the error paths."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

VERBS = ["train", "generate", "sample", "eval", "export", "demo", "inpaint", "compare"]


def test_help_lists_verbs_and_each_verb_has_help():
    p = run_cli("--help", check=True)
    for v in VERBS:
        assert v in p.stdout
    for v in VERBS:
        h = run_cli(v, "--help", check=True).stdout
        assert "usage: genlab " + v in h
        assert "default" in h or v in ("export", "train")  # train: no option with a default to show


def test_train_generate_eval_roundtrip(tiny_config, tmp_path):
    cfg = tiny_config(name="cli")
    p = run_cli("train", cfg, "--set", "train.max_steps=12", cwd=tmp_path, check=True)
    assert "trained" in p.stdout and "12 steps" in p.stdout
    run = tmp_path / "runs" / "cli"
    for f in ("config.json", "model.safetensors", "train_config.json", "trainer_state.pt", "tokenizer.json",
              "metrics.jsonl"):
        assert (run / f).is_file(), f
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in recs) and any("train_loss" in r for r in recs)
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*tmp"))

    # the same seed gives the same text; another seed another text
    a = run_cli("generate", run, "--prompt", "KING", "--seed", "3", "--max-new-tokens", "40", check=True).stdout
    b = run_cli("generate", run, "--prompt", "KING", "--seed", "3", "--max-new-tokens", "40", check=True).stdout
    c = run_cli("generate", run, "--prompt", "KING", "--seed", "4", "--max-new-tokens", "40", check=True).stdout
    assert a == b and a != c and a.startswith("KING")
    assert len(a.rstrip("\n")) == len("KING") + 40

    # every control, batched, streamed
    p = run_cli("generate", run, "--prompt", "The ", "-n", "3", "--temperature", "0.8", "--top-k", "10",
                "--top-p", "0.9", "--repetition-penalty", "1.3", "--max-new-tokens", "30", "--seed", "1",
                check=True)
    assert p.stdout.count("--- sample") == 3
    greedy = run_cli("generate", run, "--prompt", "The ", "--temperature", "0", "--max-new-tokens", "30",
                     check=True).stdout
    streamed = run_cli("generate", run, "--prompt", "The ", "--temperature", "0", "--max-new-tokens", "30",
                       "--stream", check=True).stdout
    assert greedy == streamed
    stopped = run_cli("generate", run, "--prompt", "The ", "--seed", "0", "--max-new-tokens", "200",
                      "--stop", "e", check=True).stdout
    assert "e" not in stopped[len("The "):].rstrip("\n")

    ev = run_cli("eval", run, "--json", check=True).stdout
    res = json.loads(ev)
    assert res["family"] == "gpt" and res["perplexity"] > 1 and res["bits_per_char"] > 0
    text = run_cli("eval", run, check=True).stdout
    assert "perplexity" in text and "bits/char" in text


def test_ngram_through_the_same_verbs(tiny_config, tmp_path):
    cfg = tiny_config(name="ng", family="ngram", preset="char5", train={"max_steps": 1})
    run_cli("train", cfg, cwd=tmp_path, check=True)
    run = tmp_path / "runs" / "ng"
    out = run_cli("generate", run, "--prompt", "To be", "--seed", "0", "--max-new-tokens", "50",
                  "--top-k", "5", check=True).stdout
    assert out.startswith("To be") and len(out.rstrip("\n")) == 55
    res = json.loads(run_cli("eval", run, "--json", check=True).stdout)
    assert res["family"] == "ngram" and 1 < res["perplexity"] < res["tokenizer"].__len__() * 100


def test_existing_run_needs_resume_or_overwrite(tiny_config, tmp_path):
    cfg = tiny_config(name="again", train={"max_steps": 2})
    run_cli("train", cfg, cwd=tmp_path, check=True)
    p = run_cli("train", cfg, cwd=tmp_path)
    assert p.returncode == 2 and "--resume" in p.stderr
    run_cli("train", cfg, "--overwrite", cwd=tmp_path, check=True)


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr)
    err = p.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: "), p.stderr
    assert "Traceback" not in p.stderr
    for n in needles:
        assert n in err[-1], (n, err[-1])


def test_bad_config_inputs(tiny_config, tmp_path):
    cfg = tiny_config(name="bad")
    _one_line_error(run_cli("train", cfg, "--set", "train.lrr=1", cwd=tmp_path), "train.lrr", "allowed keys")
    _one_line_error(run_cli("train", cfg, "--set", "train.lr=fast", cwd=tmp_path), "train.lr", "number")
    _one_line_error(run_cli("train", cfg, "--set", "model.preset=huge", cwd=tmp_path), "huge", "baby")
    _one_line_error(run_cli("train", cfg, "--set", "model.family=nope", cwd=tmp_path), "nope", "gpt")
    _one_line_error(run_cli("train", cfg, "--set", "train.max_steps=-1", cwd=tmp_path), "max_steps")
    _one_line_error(run_cli("train", tmp_path / "missing.toml", cwd=tmp_path), "not found")
    assert not (tmp_path / "runs" / "bad").exists()


def test_bad_data_inputs(tiny_config, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    cfg = tiny_config(name="e", data={"source": "text", "path": str(empty), "max_chars": 0})
    _one_line_error(run_cli("train", cfg, cwd=tmp_path), "empty")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 500)
    cfg = tiny_config(name="l", data={"source": "text", "path": str(latin), "max_chars": 0})
    _one_line_error(run_cli("train", cfg, cwd=tmp_path), "latin1.txt", "UTF-8")
    cfg = tiny_config(name="m", data={"source": "text", "path": str(tmp_path / "nowhere"), "max_chars": 0})
    _one_line_error(run_cli("train", cfg, cwd=tmp_path), "does not exist")


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-3"], "top_k"),
    (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--max-new-tokens", "-5"], "max_new_tokens"),
    (["-n", "0"], "n=0"),
])
def test_impossible_sampling_values(trained_gpt, args, needle):
    _one_line_error(run_cli("generate", trained_gpt, *args), needle)


def test_prompt_with_unknown_characters(trained_gpt):
    _one_line_error(run_cli("generate", trained_gpt, "--prompt", "\u2603 snow"), "cannot encode", "\u2603")


def test_corrupt_and_missing_checkpoints(trained_gpt, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_gpt, run)
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])  # truncated
    _one_line_error(run_cli("generate", run), "model.safetensors", "truncated")
    _one_line_error(run_cli("eval", run), "model.safetensors")
    w.write_bytes(b"\x00garbage" * 10)
    _one_line_error(run_cli("generate", run), "model.safetensors")
    (run / "config.json").write_text("{not json")
    _one_line_error(run_cli("eval", run), "config.json", "corrupt")
    _one_line_error(run_cli("eval", tmp_path / "no_such_run"), "not found")
    st = tmp_path / "copy2"
    shutil.copytree(trained_gpt, st)
    (st / "trainer_state.pt").write_bytes(b"PK\x03\x04 broken zip")
    cfg = json.loads((st / "train_config.json").read_text())
    from tests.conftest import write_config

    toml = write_config(tmp_path / "copy2.toml", name="copy2", out_dir=tmp_path, data=cfg["data"],
                        model=cfg["model"], train=cfg["train"])
    p = run_cli("train", toml, "--resume", cwd=tmp_path)
    _one_line_error(p, "trainer_state.pt", "corrupt")


def test_bpe_run_through_the_cli(tiny_config, tmp_path):
    cfg = tiny_config(name="bpe", data={"tokenizer": "bpe", "vocab_size": 300}, train={"max_steps": 6})
    run_cli("train", cfg, cwd=tmp_path, check=True)
    run = tmp_path / "runs" / "bpe"
    from genlab.data.tokenizers import load_tokenizer

    assert load_tokenizer(run / "tokenizer.json").kind == "bpe"
    out = run_cli("generate", run, "--prompt", "Caf\u00e9 \u2603", "--seed", "0", "--max-new-tokens", "20",
                  check=True).stdout
    assert out.startswith("Caf\u00e9 \u2603")  # byte-level BPE encodes any UTF-8 prompt
    res = json.loads(run_cli("eval", run, "--json", check=True).stdout)
    assert res["tokenizer"] == "bpe" and res["bits_per_char"] < res["bits_per_token"]
