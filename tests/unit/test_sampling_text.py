import logging

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.data.tokenizers import CharTokenizer
from genlab.models import build_config, build_model
from genlab.sampling.text import (
    SamplingConfig,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate_text,
    iter_tokens,
    stream_text,
)

TOK = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .,\n")


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    m = build_model(build_config({"family": "gpt", "preset": "tiny", "vocab_size": TOK.vocab_size,
                                  "block_size": 16}))
    return m.eval()


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    keep = lambda p: torch.isfinite(apply_top_p(probs.log(), p)).tolist()[0]
    assert keep(0.45) == [True, False, False, False]
    assert keep(0.6) == [True, True, False, False]
    assert keep(0.79) == [True, True, False, False]
    assert keep(0.81) == [True, True, True, False]
    assert keep(1.0) == [True, True, True, True]


def test_repetition_penalty_is_ctrl_formula():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("kw", [{"temperature": -0.1}, {"temperature": float("nan")}, {"top_p": 0.0},
                                {"top_p": 1.01}, {"top_k": -1}, {"repetition_penalty": 0.0},
                                {"max_new_tokens": -1}, {"stop": ("",)}])
def test_invalid_values_name_the_allowed_range(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        SamplingConfig(**kw)


def test_greedy_is_argmax_and_ignores_the_generator(gpt):
    cfg = SamplingConfig(max_new_tokens=5, temperature=0)
    a = torch.stack(list(iter_tokens(gpt, torch.tensor([[1, 2, 3]]), cfg, torch.Generator().manual_seed(0))), 1)
    b = torch.stack(list(iter_tokens(gpt, torch.tensor([[1, 2, 3]]), cfg, torch.Generator().manual_seed(9))), 1)
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(gpt(torch.tensor([ids]))[0, -1].argmax()))
    assert a.tolist() == b.tolist() == [ids[3:]]


def test_sliding_window_past_the_context_equals_uncached_cropping(gpt):
    """Past block_size tokens, each step sees exactly the last block_size tokens (as nanoGPT's loop)."""
    cfg = SamplingConfig(max_new_tokens=30, temperature=0)
    out = torch.stack(list(iter_tokens(gpt, torch.tensor([[1, 2, 3]]), cfg)), 1)[0].tolist()
    ids = [1, 2, 3]
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(gpt(torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert out == ids[3:]


def test_streaming_concatenates_to_the_batch_result_and_batching_mixed_lengths(gpt):
    cfg = SamplingConfig(max_new_tokens=20, temperature=0)
    prompts = ["ab", "hello there", "ab", "x"]
    batch = generate_text(gpt, TOK, prompts, cfg)
    single = [generate_text(gpt, TOK, [p], cfg)[0] for p in prompts]
    assert batch == single and all(len(t) == 20 for t in batch)
    pieces = [""] * 4
    done = set()
    for d in stream_text(gpt, TOK, prompts, cfg):
        assert d.index not in done
        pieces[d.index] += d.text
        done |= {d.index} if d.done else set()
    assert pieces == batch and done == {0, 1, 2, 3}


def test_stop_strings_end_the_sample_and_are_not_shown(gpt):
    free = generate_text(gpt, TOK, ["ab"], SamplingConfig(max_new_tokens=40, temperature=0))[0]
    stop = free[5:7]
    cut = generate_text(gpt, TOK, ["ab"], SamplingConfig(max_new_tokens=40, temperature=0, stop=(stop,)))[0]
    assert cut == free[: free.index(stop)]
    streamed = "".join(d.text for d in stream_text(gpt, TOK, ["ab"], SamplingConfig(max_new_tokens=40,
                                                                                    temperature=0, stop=(stop,))))
    assert streamed == cut


def test_seeded_sampling_is_reproducible(gpt):
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=5, top_p=0.9, repetition_penalty=1.2)
    g = lambda s: torch.Generator().manual_seed(s)
    a = generate_text(gpt, TOK, ["ab", "cd"], cfg, generator=g(1))
    assert a == generate_text(gpt, TOK, ["ab", "cd"], cfg, generator=g(1))
    assert a != generate_text(gpt, TOK, ["ab", "cd"], cfg, generator=g(2))


def test_long_prompt_is_cropped_from_the_left_and_said_once(gpt, caplog):
    cfg = SamplingConfig(max_new_tokens=5, temperature=0)
    long = "abcdefghij" * 5
    with caplog.at_level(logging.WARNING):
        out = generate_text(gpt, TOK, [long, long], cfg)
    assert out[0] == generate_text(gpt, TOK, [long[-16:]], cfg)[0]
    assert sum("longer than the context" in r.message for r in caplog.records) == 1


class _Scripted:
    """A decode-protocol model that emits a fixed token sequence (greedy picks the scripted id each step)."""

    context_size = None

    def __init__(self, script: list[int], vocab: int):
        self.script, self.vocab = script, vocab

    def new_cache(self, B, max_len):
        class C:
            pos = 0

        return C()

    def decode(self, ids, cache):
        cache.pos += ids.size(1)
        logits = torch.zeros(ids.size(0), self.vocab)
        logits[:, self.script[min(cache.pos - 1, len(self.script) - 1)]] = 10.0
        return logits


def test_streamed_bpe_text_holds_incomplete_utf8_until_complete():
    from genlab.data.tokenizers import BPETokenizer

    tok = BPETokenizer.train(["abc " * 20], 300)  # no merges over é or the emoji: each byte is its own token
    byte_ids = [tok.encode(ch)[0] for ch in "ab"]
    ids = tok.encode("é☃")
    assert len(ids) == len("é☃".encode())  # one token per byte: every character arrives over several tokens
    lead = ids[0]  # the first byte of é, which alone is an incomplete character
    script = [byte_ids[0], *ids, byte_ids[1], lead]  # ends after half a character
    model = _Scripted(script, tok.vocab_size)
    cfg = SamplingConfig(max_new_tokens=len(script), temperature=0)
    pieces = [d.text for d in stream_text(model, tok, ["a"], cfg)]
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == "aé☃b"  # the cut-off last character is dropped, not shown as U+FFFD
    assert generate_text(model, tok, ["a"], cfg) == ["aé☃b"]
