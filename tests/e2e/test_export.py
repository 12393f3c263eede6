"""`genlab export --format hf`: transformers loads the folder and gives the same logits and greedy text."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")


def test_export_loads_in_transformers_with_same_logits_and_greedy_text(trained_gpt, tmp_path):
    from genlab import api

    out = tmp_path / "hf"
    p = run_cli("export", trained_gpt, "--format", "hf", out, check=True)
    assert "GPT2LMHeadModel" in p.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    run = api.load(trained_gpt)
    ids = torch.tensor([run.tokenizer.encode("First Citizen:\nBefore we proceed")[-run.model.config.block_size:]])
    with torch.no_grad():
        ours = run.model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    prompt = "KING"
    n = run.model.config.block_size - len(prompt)
    text = api.generate(run, prompt, temperature=0, max_new_tokens=n)[0]
    with torch.no_grad():
        g = hf.generate(torch.tensor([run.tokenizer.encode(prompt)]), max_new_tokens=n, do_sample=False,
                        pad_token_id=0)
    assert run.tokenizer.decode(g[0, len(prompt):].tolist()) == text


def test_export_rejects_non_gpt_runs(trained_ngram, tmp_path):
    p = run_cli("export", trained_ngram, tmp_path / "x")
    assert p.returncode == 2 and "only 'gpt' runs" in p.stderr
