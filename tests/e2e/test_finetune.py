"""`genlab finetune` and `genlab merge` as a user runs them: a LoRA adapter beside its base that lowers the
held-out loss on the new text, generation with `--adapter`, merging to a run with the same outputs, a full
fine-tune to a new run, and one-line errors for bad requests."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, write_config

STYLE = "My love is like a rose that blooms in May, and fades at dusk.\nSONNET: " * 400  # characters the base knows


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from genlab import api

    d = tmp_path_factory.mktemp("ft")
    # a base that has learned the characters (~3 s): LoRA adapts what the frozen weights can already express
    run_dir, _ = api.train(write_config(d / "llama.toml", name="llama", family="llama",
                                        train={"max_steps": 300, "lr": 3e-3}))
    (d / "style.txt").write_text(STYLE)
    return run_dir, d / "style.txt"


def test_lora_finetune_generate_and_merge(base, tmp_path):
    from genlab import api

    run_dir, text = base
    p = run_cli("finetune", run_dir, text, "--name", "sonnets", "--rank", "4", "--compare", "--set", "block_size=32",
                "--set", "train.max_steps=150", "--set", "train.lr=1e-2", "--set", "train.batch_size=8",
                "--set", "train.progress=false", check=True)
    folder = run_dir / "adapters" / "sonnets"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()  # the base is not copied
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "q_proj" in cfg["target_modules"]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("fine-tuned"))
    after, before = (float(v.split()[0]) for v in line.split("held-out loss ")[1].split("(before: "))
    assert after < 0.6 * before, line  # the adapter learned the new text
    p = run_cli("generate", run_dir, "--adapter", "sonnets", "--prompt", "SONNET", "--max-new-tokens", "40",
                "--temperature", "0", check=True)
    plain = run_cli("generate", run_dir, "--prompt", "SONNET", "--max-new-tokens", "40", "--temperature", "0",
                    check=True)
    assert p.stdout != plain.stdout  # the adapter is on (what it learned is measured by the held-out loss above:
    # the words a tiny model writes after 150 steps vary with the thread count, so they are not asserted)
    run_cli("merge", run_dir, "sonnets", tmp_path / "merged", check=True)
    with_adapter, merged = api.load(run_dir, adapter="sonnets"), api.load(tmp_path / "merged")
    x = torch.randint(0, merged.model.config.vocab_size, (2, 32))
    with torch.no_grad():
        assert torch.allclose(with_adapter.model(x), merged.model(x), atol=1e-5)
        assert not torch.allclose(api.load(run_dir).model(x), merged.model(x), atol=1e-3)


def test_full_finetune_writes_a_new_run(base, tmp_path):
    from genlab import api

    run_dir, text = base
    out = tmp_path / "full"
    run_cli("finetune", run_dir, text, "--method", "full", "--out", out, "--set", "block_size=32",
            "--set", "train.max_steps=20", "--set", "train.lr=1e-3", "--set", "train.progress=false", check=True)
    run = api.load(out)
    before = api.evaluate_loss_on(run_dir, text, ["block_size=32"])
    assert api.evaluate_loss_on(run, text, ["block_size=32"]) < before
    assert (out / "tokenizer.json").read_text() == (run_dir / "tokenizer.json").read_text()


@pytest.mark.parametrize(("args", "says"), [
    (["--rank", "0"], "rank must be an integer >= 1"),
    (["--targets", "qkv_proj"], "match no Linear or Conv2d layer"),
    (["--method", "full"], "give its folder (--out"),
    (["--set", "train.lr=-1"], "train.lr"),
])
def test_bad_finetune_requests_are_one_line(base, args, says):
    run_dir, text = base
    p = run_cli("finetune", run_dir, text, "--name", "bad", "--set", "train.max_steps=1", *args)
    assert p.returncode != 0 and says in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_chat_data_needs_a_chat_model_and_adapters_are_named(base, tmp_path):
    run_dir, _ = base
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    p = run_cli("finetune", run_dir, chat, "--set", "train.max_steps=1")
    assert p.returncode != 0 and "has no chat template" in p.stderr
    p = run_cli("generate", run_dir, "--adapter", "nope", "--max-new-tokens", "5")
    assert p.returncode != 0 and "adapter 'nope' not found" in p.stderr


def test_lora_over_an_int8_run(base, tmp_path):
    """QLoRA-style: the frozen base is the int8 run, the adapter trains in fp32 and is used on that base."""
    from genlab import api

    run_dir, text = base
    q = tmp_path / "int8"
    run_cli("quantize", run_dir, q, check=True)
    p = run_cli("finetune", q, text, "--name", "q", "--rank", "4", "--compare", "--set", "block_size=32",
                "--set", "train.max_steps=60", "--set", "train.lr=1e-2", "--set", "train.batch_size=8",
                "--set", "train.progress=false", check=True)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("fine-tuned"))
    after, before = (float(v.split()[0]) for v in line.split("held-out loss ")[1].split("(before: "))
    assert after < 0.8 * before, line
    run = api.load(q, adapter="q")
    assert api.generate(run, "My love", max_new_tokens=10, temperature=0)[0]
    p = run_cli("merge", q, "q", tmp_path / "m")
    assert p.returncode != 0 and "quantized" in p.stderr


def test_an_image_model_takes_a_lora_adapter_on_new_images(tmp_path):
    """A tiny class-conditional diffusion model on scikit-learn's 8x8 digits, adapted with LoRA (its convolutions
    and Linear layers) to MNIST, resized to 8x8: the denoising loss on MNIST falls, `sample --adapter` draws from
    the adapted model, and the merged run draws the same images from the same seed."""
    from genlab import api
    from genlab.sampling.image import read_image

    base, _ = api.train(write_config(tmp_path / "d.toml", name="diff", family="diffusion", data={"source": "digits"},
                                     model={"conditional": True}, train={"max_steps": 60, "batch_size": 32}))
    p = run_cli("finetune", base, "mnist", "--name", "mnist", "--compare", "--set", "train.max_steps=40",
                "--set", "train.progress=false", check=True)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("fine-tuned"))
    after, before = (float(v.split()[0]) for v in line.split("held-out loss ")[1].split("(before: "))
    assert after < 0.95 * before, line
    assert "genlab sample" in p.stdout
    cfg = json.loads((base / "adapters" / "mnist" / "adapter_config.json").read_text())
    assert any("conv" in t for t in cfg["target_modules"])
    args = ["-n", "4", "--seed", "3", "--sampler", "ddim", "--steps", "5"]
    run_cli("sample", base, "--adapter", "mnist", *args, "--out", tmp_path / "a.png", check=True)
    run_cli("sample", base, *args, "--out", tmp_path / "b.png", check=True)
    run_cli("merge", base, "mnist", tmp_path / "merged", check=True)
    run_cli("sample", tmp_path / "merged", *args, "--out", tmp_path / "c.png", check=True)
    a, b, c = (read_image(tmp_path / f"{k}.png", 1).float() for k in "abc")
    assert (a - c).abs().max() <= 2  # merged = adapter (up to a rounding of the 8-bit pixels)
    assert (a - b).abs().mean() > 1  # the adapter changes what is drawn
    p = run_cli("finetune", base, "shakespeare", "--set", "train.max_steps=1")
    assert p.returncode != 0 and "is text" in p.stderr


def test_an_interrupted_finetune_resumes_to_the_same_adapter(base, tmp_path):
    from safetensors.torch import load_file

    run_dir, text = base
    # a constant learning rate: a budget extended on resume then follows the same schedule as one long run
    common = ["--set", "block_size=32", "--set", "train.warmup_steps=0", "--set", "train.min_lr_ratio=1",
              "--set", "train.checkpoint_every=3", "--set", "dropout=0", "--set", "train.progress=false"]
    env = {"GENLAB_THREADS": "1"}
    run_cli("finetune", run_dir, text, "--name", "straight", *common, "--set", "train.max_steps=6", check=True,
            env=env)
    run_cli("finetune", run_dir, text, "--name", "halves", *common, "--set", "train.max_steps=3", check=True, env=env)
    p = run_cli("finetune", run_dir, text, "--name", "halves", "--resume", "--set", "train.max_steps=6", check=True,
                env=env)
    assert "6 steps" in p.stdout and "(lora)" in p.stdout
    a = load_file(str(run_dir / "adapters" / "straight" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "adapters" / "halves" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for args, says in [(("--name", "never", "--resume"), "holds no interrupted fine-tune"),
                       (("--name", "halves", "--resume", "--rank", "16"), "r cannot change"),
                       (("--name", "halves", "--resume", "--method", "full"), "is lora, not full")]:
        p = run_cli("finetune", run_dir, text, *args)
        assert p.returncode == 2 and says in p.stderr, p.stderr
