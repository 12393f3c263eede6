"""`genlab export --format hf`: transformers loads the folder and gives the same logits and greedy text, and its
own tools (AutoTokenizer, pipeline) work on it as they are."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli, write_config

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO.\nWhat, ho!  Mr. Darcy -- 'nay'; is it so?\n\n  First Citizen:\n"


@pytest.fixture(scope="module")
def trained_bpe(tmp_path_factory):
    from genlab import api

    d = tmp_path_factory.mktemp("bpe")
    cfg = write_config(d / "bpe.toml", name="bpe", data={"tokenizer": "bpe", "vocab_size": 300},
                       train={"max_steps": 10})
    return api.train(cfg)[0]


@pytest.fixture(scope="module")
def char_export(trained_gpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "char"
    p = run_cli("export", trained_gpt, "--format", "hf", out, check=True)
    return out, p.stdout


def greedy_pipeline(out, prompt, **kw) -> tuple[str, list[int]]:
    """The pipeline's greedy continuation of `prompt` and the token ids of the whole sequence."""
    pipe = transformers.pipeline("text-generation", model=str(out))
    text = pipe(prompt, do_sample=False, return_full_text=False, **kw)[0]["generated_text"]
    ids = pipe(prompt, do_sample=False, return_tensors=True, **kw)[0]["generated_token_ids"]
    return text, list(ids)


def check_tools(run, out, n: int) -> None:
    """AutoTokenizer gives genlab's ids and decodes back exactly; the pipeline's greedy text is genlab's."""
    from genlab import api

    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(TEXT)["input_ids"]
    assert ids == run.tokenizer.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(tok) == run.tokenizer.vocab_size
    prompt = "ROMEO."
    text, seq = greedy_pipeline(out, prompt, max_new_tokens=n)
    assert text == api.generate(run, prompt, temperature=0, max_new_tokens=n)[0]
    assert len(seq) <= len(tok(prompt)["input_ids"]) + n <= run.model.config.block_size


def test_export_loads_in_transformers_with_same_logits_and_greedy_text(trained_gpt, char_export):
    from genlab import api

    out, stdout = char_export
    assert "GPT2LMHeadModel" in stdout
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
        g = hf.generate(torch.tensor([run.tokenizer.encode(prompt)]), max_new_tokens=n, do_sample=False)
    assert g.shape[1] == len(prompt) + n
    assert run.tokenizer.decode(g[0, len(prompt):].tolist()) == text


def test_char_export_works_with_autotokenizer_and_pipeline(trained_gpt, char_export):
    from genlab import api

    out, _ = char_export
    run = api.load(trained_gpt)
    check_tools(run, out, n=20)
    seq = greedy_pipeline(out, "ROMEO.", max_new_tokens=20)[1]
    assert len(seq) == 6 + 20  # exactly the tokens asked for: no end of text cut it short


def test_char_export_declares_no_character_as_end_of_text(trained_gpt, char_export):
    out, _ = char_export
    cfg, gen = (json.loads((out / f).read_text()) for f in ("config.json", "generation_config.json"))
    assert cfg["eos_token_id"] is None and cfg["bos_token_id"] is None and "eos_token_id" not in gen
    # a bias that makes "\n" the greedy choice every step: generation goes on through the newlines
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    nl = tok.convert_tokens_to_ids("\n")
    pipe = transformers.pipeline("text-generation", model=str(out))
    text = pipe("ROMEO.", max_new_tokens=10, do_sample=False, return_full_text=False,
                sequence_bias={(nl,): 100.0})[0]["generated_text"]
    assert text == "\n" * 10


def test_generation_stops_at_the_context_unless_asked_past_it(trained_gpt, char_export):
    from genlab import api

    out, stdout = char_export
    run = api.load(trained_gpt)
    ctx = run.model.config.block_size
    prompt = "ROMEO."
    # no length asked (the pipeline's own default is 256 new tokens): the sequence fills the context exactly
    text, seq = greedy_pipeline(out, prompt)
    assert len(seq) == ctx and text == api.generate(run, prompt, temperature=0, max_new_tokens=ctx - 6)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.generate(torch.tensor([run.tokenizer.encode(prompt)]), do_sample=False).shape == (1, ctx)
    # past the context, the pipeline's "hole" keeps the end of the prompt, or refuses what can never fit
    pipe = transformers.pipeline("text-generation", model=str(out))
    r = pipe(prompt, max_new_tokens=ctx - 2, do_sample=False, handle_long_generation="hole", return_tensors=True)
    assert len(r[0]["generated_token_ids"]) == ctx
    with pytest.raises(ValueError, match="exceeds the models max length"):
        pipe(prompt, max_new_tokens=ctx + 50, handle_long_generation="hole")
    assert f"context: {ctx} tokens" in stdout


def test_bpe_export_works_with_autotokenizer_and_pipeline(trained_bpe, tmp_path):
    from genlab import api

    out = tmp_path / "hf"
    p = run_cli("export", trained_bpe, out, check=True)
    run = api.load(trained_bpe)
    check_tools(run, out, n=12)
    eos = run.eos_id()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == eos == tok.pad_token_id
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == eos == gen["pad_token_id"]
    # prompts of different lengths in one batch: the pad token makes it work, each as if alone
    pipe = transformers.pipeline("text-generation", model=str(out))
    prompts = ["ROMEO.", "First Citizen:\nBefore"]
    batched = pipe(prompts, batch_size=2, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert [r[0]["generated_text"] for r in batched] == api.generate(run, prompts, temperature=0, max_new_tokens=8)
    assert f"<|endoftext|> (id {eos})" in p.stdout


def test_reexport_is_refused_without_overwrite_and_leaves_nothing_stale(trained_gpt, trained_bpe, tmp_path):
    from genlab import api

    out = tmp_path / "hf"
    run_cli("export", trained_bpe, out, check=True)
    p = run_cli("export", trained_gpt, out)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "pass --overwrite" in errors[0]
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token == "<|endoftext|>"  # untouched
    (out / "special_tokens_map.json").write_text("{}")  # as an earlier version may have left: not ours to keep
    run_cli("export", trained_gpt, out, "--overwrite", check=True)
    run = api.load(trained_gpt)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.get_vocab() == {c: i for i, c in enumerate(run.tokenizer.chars)} and tok.eos_token is None
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    assert [f.name for f in tmp_path.iterdir()] == ["hf"]  # no staging folder left beside it


def test_export_never_deletes_a_folder_that_is_not_an_export(trained_gpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "notes.txt").write_text("keep me")
    p = run_cli("export", trained_gpt, out, "--overwrite")
    assert p.returncode == 2 and "does not look like an earlier export" in p.stderr and "notes.txt" in p.stderr
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "notes.txt"]


def test_export_rejects_non_gpt_runs(trained_ngram, tmp_path):
    p = run_cli("export", trained_ngram, tmp_path / "x")
    assert p.returncode == 2 and "only 'gpt' and 'llama' runs" in p.stderr
