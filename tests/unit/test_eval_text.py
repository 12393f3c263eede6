"""Text metrics (eval/text.py): perplexity and bits, distinct-n, self-BLEU, BLEU/ROUGE wrappers and the
longest overlap with the training text (against a brute force on small strings)."""

from __future__ import annotations

import math
import random
import sys

import pytest

from genlab.core.errors import ConfigError
from genlab.eval import text
from genlab.eval.text import (
    bits_per_char,
    bits_per_token,
    bleu,
    distinct_n,
    longest_overlap,
    perplexity,
    rouge,
    self_bleu,
)


def test_perplexity_and_bits():
    assert perplexity(0.0) == 1.0 and perplexity(math.log(65)) == pytest.approx(65)
    assert bits_per_token(math.log(2)) == pytest.approx(1.0)
    assert bits_per_char(math.log(4), tokens_per_char=0.25) == pytest.approx(0.5)  # 4 chars per token
    with pytest.raises(ValueError, match="nats_per_token=-1"):
        perplexity(-1.0)


def test_distinct_n_counts_unique_over_total_ngrams():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == 4 / 6  # the, cat, sat, ran
    assert distinct_n(texts, 2) == 3 / 4  # "the cat" twice
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["abab"], 2, unit="char") == 2 / 3  # ab, ba, ab
    assert distinct_n(["aaaa", "aa"], 1, unit="char") == 1 / 6
    with pytest.raises(ValueError, match="no 4-gram of words"):
        distinct_n(texts, 4)
    with pytest.raises(ValueError, match="not one string"):
        distinct_n("the cat", 1)
    with pytest.raises(ValueError, match="unit='byte'"):
        distinct_n(texts, 1, unit="byte")


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(["ale", "bee", "cow", "dim", "elk", "fog", "gnu", "hat", "ink", "jam",
                                "kit", "log", "mud", "nod", "oak", "pig"]) for _ in range(n))


def test_self_bleu_is_100_for_copies_and_low_for_unrelated_texts():
    assert self_bleu(["to be or not to be that is the question"] * 5) == pytest.approx(100)
    rng = random.Random(0)
    unrelated = [_words(rng, 30) for _ in range(12)]
    assert self_bleu(unrelated) < 20
    assert self_bleu(unrelated, max_texts=5, seed=1) == self_bleu(unrelated, max_texts=5, seed=1)
    with pytest.raises(ValueError, match="at least 2 strings"):
        self_bleu(["only one"])


def test_bleu_and_rouge_wrappers():
    hyps = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine"]
    same = bleu(hyps, hyps)
    assert same["bleu"] == pytest.approx(100) and same["bp"] == 1.0 and same["p4"] == pytest.approx(100)
    assert bleu(hyps, [[h, "something else entirely"] for h in hyps])["bleu"] == pytest.approx(100)
    assert bleu(hyps, ["completely different words here now", "nothing alike at all"])["bleu"] < 5
    r = rouge(hyps, hyps)
    assert r == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    partial = rouge(["the cat sat on the mat"], ["the cat lay on the mat"], types=["rougeL"])
    assert partial["rougeL"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="2 hypotheses"):
        bleu(hyps, ["one reference"])


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # `import sacrebleu` now raises ImportError
    with pytest.raises(ConfigError, match=r"bleu needs the sacrebleu package: pip install sacrebleu"):
        bleu(["a"], ["a"])
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(ConfigError, match=r"pip install rouge-score .*genlab\[eval\]"):
        rouge(["a"], ["a"])


def _longest_brute(s: str, t: str) -> int:
    return max((j - i for i in range(len(s)) for j in range(i + 1, len(s) + 1) if s[i:j] in t), default=0)


def test_longest_overlap_matches_brute_force_on_small_strings():
    rng = random.Random(1)
    train = "".join(rng.choice("abc") for _ in range(300))
    samples = ["".join(rng.choice("abcd") for _ in range(rng.randrange(0, 40))) for _ in range(15)]
    assert longest_overlap(samples, train)["lengths"] == [_longest_brute(s, train) for s in samples]


def test_longest_overlap_finds_a_planted_copy(monkeypatch):
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    train = "".join(rng.choice(alphabet) for _ in range(200_000))
    fresh = ["".join(rng.choice(alphabet) for _ in range(300)) for _ in range(5)]
    planted = fresh[0][:100] + train[123_456 : 123_456 + 60] + fresh[0][100:]
    monkeypatch.setattr(text, "MAX_AUTOMATON_SYMBOLS", 700)  # several automata, one pass each
    out = longest_overlap([planted, *fresh[1:]], train)
    assert 60 <= out["lengths"][0] <= 62 and max(out["lengths"][1:]) < 10
    assert out["max"] == out["lengths"][0] and out["copy_fraction"] == 0.2 and out["min_copy"] == 50
    words = longest_overlap(["x y the cat sat on z", "nothing here"], "a the cat sat on b", unit="word",
                            min_copy=4)
    assert words["lengths"] == [4, 0] and words["copy_fraction"] == 0.5
