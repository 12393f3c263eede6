"""`genlab import`: a local transformers GPT-2 or Llama folder becomes a genlab run with the same logits, exports
back to a folder transformers loads to the same logits, and bad folders get one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A byte-level BPE as transformers saves it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["To be, or not to be, that is the question."] * 20, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def hf_model(kind: str, vocab: int, **kw):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=10000.0, **kw)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=[("llama", {"tie_word_embeddings": False}), ("llama", {"tie_word_embeddings": True}),
                                        ("gpt2", {})], ids=["llama", "llama-tied", "gpt2"])
def hf_folder(request, hf_tokenizer, tmp_path_factory):
    kind, kw = request.param
    d = tmp_path_factory.mktemp(kind) / "model"
    model = hf_model(kind, len(hf_tokenizer), **kw)
    model.save_pretrained(d)
    hf_tokenizer.save_pretrained(d)
    return kind, d, model


def test_import_gives_transformers_logits_and_exports_back(hf_folder, tmp_path):
    from genlab import api

    kind, src, hf = hf_folder
    p = run_cli("import", src, tmp_path / "run", check=True)
    assert f"genlab {'gpt' if kind == 'gpt2' else 'llama'} run" in p.stdout
    run = api.load(tmp_path / "run")
    x = torch.randint(0, hf.config.vocab_size, (2, 60))
    with torch.no_grad():
        want = hf(x).logits
        assert (run.model(x) - want).abs().max() < 1e-4
    # the tokenizer came along: genlab encodes as transformers does
    tok = transformers.AutoTokenizer.from_pretrained(src)
    text = "To be, or not to be"
    assert run.tokenizer.encode(text) == tok(text)["input_ids"]
    # greedy generation continues the prompt as transformers does
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.size(1):].tolist()
    from genlab.sampling.text import generate_ids

    got = generate_ids(run.model, ids.tolist(), max_new_tokens=8, temperature=0)[0]
    assert got == ref
    assert api.generate(run, text, max_new_tokens=4, temperature=0)  # the text path runs too
    # and back out: transformers' own loaders read genlab's export to the same logits
    run_cli("export", tmp_path / "run", tmp_path / "hf", check=True)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (back(x).logits - want).abs().max() < 1e-4
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    out = pipe(text, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert list(out)[ids.size(1):] == got


def test_an_existing_run_is_kept_without_overwrite(hf_folder, tmp_path):
    src = hf_folder[1]
    run_cli("import", src, tmp_path / "run", check=True)
    p = run_cli("import", src, tmp_path / "run")
    assert p.returncode == 2 and "--overwrite" in p.stderr
    assert run_cli("import", src, tmp_path / "run", "--overwrite").returncode == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    p = run_cli("import", src, tmp_path / "other", "--overwrite")
    assert p.returncode == 2 and (tmp_path / "other" / "notes.txt").read_text() == "mine"


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_folders_get_one_clear_line(hf_folder, tmp_path):
    src = hf_folder[1]
    cases = {}
    d = copy_folder(src, tmp_path / "arch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    cases["arch"] = (d, "'mamba' (MambaForCausalLM) is not supported; genlab imports gpt2")
    d = copy_folder(src, tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    cases["notok"] = (d, "no tokenizer.json")
    d = copy_folder(src, tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200])
    cases["corrupt"] = (d, "cannot be read")
    d = copy_folder(src, tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    cases["noweights"] = (d, "has no weights")
    cases["missing"] = (tmp_path / "nowhere", "is not a folder")
    for name, (folder, says) in cases.items():
        p = run_cli("import", folder, tmp_path / f"run_{name}")
        assert p.returncode == 2, (name, p.stderr)
        assert says in p.stderr and len(p.stderr.strip().splitlines()) == 1, (name, p.stderr)
        assert not (tmp_path / f"run_{name}").exists()


def hf_perplexity(model, ids: list[int], window: int, stride: int) -> float:
    """transformers' perplexity guide (sliding windows, labels -100 on tokens already scored), token-weighted."""
    x = torch.tensor([ids])
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, x.size(1), stride):
        end = min(begin + window, x.size(1))
        trg = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            out = model(inp, labels=labels)
        k = (labels[:, 1:] != -100).sum().item()
        nll += out.loss.item() * k
        n += k
        prev_end = end
        if end == x.size(1):
            break
    return float(torch.tensor(nll / n).exp())


def test_perplexity_on_a_text_equals_transformers_sliding_windows(hf_folder, tmp_path):
    from genlab import api

    _kind, src, hf = hf_folder
    run_cli("import", src, tmp_path / "run", check=True)
    run = api.load(tmp_path / "run")
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4
    ids = run.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 100
    for window, stride in ((64, 32), (40, 7), (64, 63)):
        res = api.perplexity(run, text, window=window, stride=stride)
        assert res["tokens"] == len(ids) - 1
        assert res["perplexity"] == pytest.approx(hf_perplexity(hf, ids, window, stride), rel=1e-5)
    (tmp_path / "t.txt").write_text(text)
    p = run_cli("eval", tmp_path / "run", "--text", tmp_path / "t.txt", "--window", "64", "--json", check=True)
    assert json.loads(p.stdout)["perplexity"] == pytest.approx(api.perplexity(run, text, window=64)["perplexity"])
    from genlab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="window=65 must be in"):
        api.perplexity(run, text, window=65)
    with pytest.raises(ConfigError, match="too short"):
        api.perplexity(run, "")
