"""Continuous batching (sampling/text.py BatchDecoder): sequences that join and leave a shared decode step get the
same logits as each decoded alone."""

from __future__ import annotations

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.models.gpt import GPT, GPTConfig
from genlab.models.llama import Llama, LlamaConfig
from genlab.models.ngram import NGram, NGramConfig
from genlab.sampling.text import BatchDecoder, SamplingConfig, Sequence


def model(family: str):
    torch.manual_seed(0)
    if family == "gpt":
        return GPT(GPTConfig(vocab_size=50, block_size=40, n_layer=2, n_head=2, n_embd=32)).eval()
    return Llama(LlamaConfig(vocab_size=50, block_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=64)).eval()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_rows_joining_and_leaving_match_the_full_forward(family, device):
    m = model(family).to(device)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (30, 7, 12, 3)]
    with torch.no_grad():
        full = [m(torch.tensor([s], device=device))[0] for s in seqs]  # (T, V) logits of each alone
    dec = BatchDecoder(m, slots=3)
    fed = {}  # sequence index -> tokens fed so far; row order is tracked in `rows`
    rows = []

    def join(i, prompt_len):
        logits = dec.add(seqs[i][:prompt_len])
        assert torch.allclose(logits, full[i][prompt_len - 1], atol=1e-5)
        fed[i] = prompt_len
        rows.append(i)

    join(0, 20)
    join(1, 2)
    for _ in range(3):  # two rows at different positions
        logits = dec.step([seqs[i][fed[i]] for i in rows])
        for r, i in enumerate(rows):
            assert torch.allclose(logits[r], full[i][fed[i]], atol=1e-5), (family, i, fed[i])
            fed[i] += 1
    join(2, 9)  # a third joins between steps
    moved = dec.remove(rows.index(1))  # the second leaves: the last row moves into its place
    assert moved == 2
    rows[rows.index(1)] = rows.pop()
    join(3, 1)
    for _ in range(2):
        logits = dec.step([seqs[i][fed[i]] for i in rows])
        for r, i in enumerate(rows):
            assert torch.allclose(logits[r], full[i][fed[i]], atol=1e-5), (family, i, fed[i])
            fed[i] += 1
    assert [dec.length(r) for r in range(dec.rows)] == [fed[i] for i in rows]


def test_seeded_sequences_do_not_depend_on_their_batch_mates():
    m = model("gpt")

    class Tok:
        def decode(self, ids):
            return "".join(chr(65 + i % 26) for i in ids)

    def run(prompts):
        dec = BatchDecoder(m, slots=len(prompts))
        seqs = [Sequence(p, SamplingConfig(temperature=1.0, top_k=10), Tok(), set(),
                         torch.Generator().manual_seed(7)) for p in prompts]
        toks = [s.next_token(dec.add(s.prompt)) for s in seqs]
        for _ in range(8):
            logits = dec.step(toks)
            toks = [s.next_token(logits[r]) for r, s in enumerate(seqs)]
        return [s.history[0, len(s.prompt):].tolist() for s in seqs]

    alone = run([[1, 2, 3]])[0]
    assert run([[5, 6], [1, 2, 3], [9]])[1] == alone


def test_what_it_refuses():
    with pytest.raises(ConfigError, match="continuous batching"):
        BatchDecoder(NGram(NGramConfig(vocab_size=5)), slots=2)
    dec = BatchDecoder(model("gpt"), slots=1)
    with pytest.raises(ConfigError, match="40 tokens must have 1 to 39"):
        dec.add(list(range(40)))
    dec.add([1])
    with pytest.raises(RuntimeError, match="no free row"):
        dec.add([2])


def test_the_engine_gives_each_job_what_it_would_get_alone():
    """Six greedy jobs of different lengths through 3 slots (so some wait, join mid-batch and leave early) give
    the tokens each gets decoded alone."""
    import threading

    from genlab.sampling.text import generate_ids
    from genlab.serve.batching import Job, TextEngine

    class Tok:
        def decode(self, ids):
            return " ".join(map(str, ids))

    m = model("llama")
    engine = TextEngine(m, Tok(), slots=3, max_queue=10)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11], [12] * 7, [13, 14, 15]]
    lengths = [6, 3, 8, 1, 5, 4]
    texts, done = [""] * 6, [threading.Event() for _ in prompts]

    def emitter(i):
        def emit(text, finished, reason):
            texts[i] += text
            if finished:
                assert reason == "length"
                done[i].set()
        return emit

    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        engine.submit(Job(p, SamplingConfig(max_new_tokens=n, temperature=0), set(), emitter(i)))
    assert all(d.wait(30) for d in done)
    engine.close()
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        alone = generate_ids(m, [p], max_new_tokens=n, temperature=0)[0]
        assert texts[i].split() == [str(t) for t in alone], i


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_prompts_prefilled_together_equal_each_prefilled_alone(family):
    m = model(family)
    prompts = [[3, 4, 5, 6, 7], [8], [9, 10, 11]]
    together, alone = BatchDecoder(m, slots=4), BatchDecoder(m, slots=4)
    alone.add([1, 2])
    together.add([1, 2])
    first = together.add_many(prompts)
    for i, p in enumerate(prompts):
        assert torch.allclose(first[i], alone.add(p), atol=1e-5)
    assert [together.length(r) for r in range(4)] == [2, 5, 1, 3]
    tokens = [12, 13, 14, 15]
    assert torch.allclose(together.step(tokens), alone.step(tokens), atol=1e-5)  # the padding is never read


def test_a_sequence_samples_from_its_distribution():
    """Inverse-CDF draws follow softmax(logits / T) after top-k (a chi-square-free check: frequencies of 20,000
    draws within 0.015 of the probabilities), and never pick a token the processors removed."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    cfg = SamplingConfig(temperature=0.7, top_k=4)
    seq = Sequence([0], cfg, None, set(), torch.Generator().manual_seed(0))
    counts = torch.zeros(6)
    for _ in range(20_000):
        seq.history = seq.history[:, :1]
        counts[seq.next_token(logits)] += 1
    want = torch.softmax(torch.cat([logits[:4] / 0.7, torch.full((2,), float("-inf"))]), dim=0)
    assert counts[4:].sum() == 0 and torch.allclose(counts / 20_000, want, atol=0.015)


@pytest.mark.parametrize("rows", [3, 12])  # 12 rows: the compiled step's projections go through BLAS
def test_the_compiled_ragged_step_equals_the_full_forward(rows):
    """Llama's compiled CPU layer step (nn/kernels.cpp) with each row at its own position, against the forward."""
    from genlab.nn.kernels import kernels

    if kernels() is None:
        pytest.skip("genlab's CPU kernels cannot be built here")
    m = model("llama")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 50, (10 + 2 * i,), generator=g).tolist() for i in range(rows)]
    with torch.no_grad():
        full = [m(torch.tensor([s]))[0] for s in seqs]
    dec = BatchDecoder(m, slots=rows)
    assert dec.cache.plan is not None and dec.cache.plan[-1] is not None  # the compiled step is what runs
    dec.add_many([s[: 3 + i % 5] for i, s in enumerate(seqs)])
    fed = [3 + i % 5 for i in range(rows)]
    for _ in range(4):
        logits = dec.step([s[f] for s, f in zip(seqs, fed)])
        for r in range(rows):
            assert torch.allclose(logits[r], full[r][fed[r]], atol=1e-4), (r, fed[r])
            fed[r] += 1
