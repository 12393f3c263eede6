"""Text metrics: perplexity and bits, diversity (distinct-n, self-BLEU), BLEU and ROUGE against references
(thin wrappers over sacrebleu and rouge-score: `pip install 'genlab[eval]'`), and memorization as the
longest stretch of each sample that also occurs in the training text."""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Hashable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..core.errors import ConfigError

log = logging.getLogger(__name__)

UNITS = ("word", "char")
MAX_AUTOMATON_SYMBOLS = 200_000  # samples per suffix automaton (one pass over the training text each)


def _require(module: str, package: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{what} needs the {package} package: pip install {package} "
                          f"(or pip install 'genlab[eval]')") from e


def _check_nats(nats: float, name: str) -> float:
    if not math.isfinite(nats) or nats < 0:
        raise ValueError(f"{name}={nats} must be a finite number >= 0")
    return float(nats)


def perplexity(nats_per_token: float) -> float:
    """exp(mean negative log-likelihood per token, in nats)."""
    return math.exp(_check_nats(nats_per_token, "nats_per_token"))


def bits_per_token(nats_per_token: float) -> float:
    return _check_nats(nats_per_token, "nats_per_token") / math.log(2)


def bits_per_char(nats_per_token: float, *, tokens_per_char: float = 1.0) -> float:
    """Bits per character from nats per token: tokens_per_char is 1 for a character-level model, else the
    number of tokens over the number of characters of the evaluated text."""
    if not tokens_per_char > 0:
        raise ValueError(f"tokens_per_char={tokens_per_char} must be > 0")
    return bits_per_token(nats_per_token) * tokens_per_char


def _texts(texts: Sequence[str], name: str = "texts", *, min_count: int = 1) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) < min_count:
        raise ValueError(f"{name} must be a sequence of at least {min_count} strings (not one string); got "
                         f"{type(texts).__name__} of length {len(texts)}")
    return list(texts)


def _units(text: str, unit: str) -> Sequence[str]:
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} must be one of {UNITS}")
    return text.split() if unit == "word" else text


def distinct_n(texts: Sequence[str], n: int, *, unit: str = "word") -> float:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
    Models"): distinct n-grams over the total count of n-grams in all texts, of whitespace words or of
    characters (`unit="char"`)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    seen: set[tuple[str, ...] | str] = set()
    total = 0
    for text in _texts(texts):
        u = _units(text, unit)
        grams = [u[i : i + n] if isinstance(u, str) else tuple(u[i : i + n]) for i in range(len(u) - n + 1)]
        seen.update(grams)
        total += len(grams)
    if total == 0:
        raise ValueError(f"the texts hold no {n}-gram of {unit}s")
    return len(seen) / total


def self_bleu(texts: Sequence[str], *, max_texts: int = 100, tokenize: str = "13a", seed: int = 0) -> float:
    """Self-BLEU (Zhu et al. 2018, "Texygen: A Benchmarking Platform for Text Generation Models"): the mean
    sentence BLEU (sacrebleu, 0-100) of each text against all the others as references; lower is more
    diverse. Over at most `max_texts` texts, drawn without replacement with numpy `seed` when there are more.
    `tokenize` is sacrebleu's ("13a" words, "char" characters, ...)."""
    sacrebleu = _require("sacrebleu", "sacrebleu", "self_bleu")
    texts = _texts(texts, min_count=2)
    if max_texts < 2:
        raise ValueError(f"max_texts={max_texts} must be >= 2")
    if len(texts) > max_texts:
        texts = [texts[i] for i in np.random.default_rng(seed).choice(len(texts), max_texts, replace=False)]
    scores = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :], tokenize=tokenize).score
              for i, t in enumerate(texts)]
    return float(np.mean(scores))


def _reference_streams(hypotheses: list[str], references: Sequence[str] | Sequence[Sequence[str]]
                       ) -> list[list[str]]:
    """One reference per hypothesis, or a list of them (the same count for each): the per-hypothesis lists."""
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(hypotheses) or not refs or len({len(r) for r in refs}) != 1 or not refs[0] \
            or not all(isinstance(s, str) for r in refs for s in r):
        raise ValueError(f"references must give each of the {len(hypotheses)} hypotheses one string or the "
                         f"same number of strings; got {len(refs)} entries")
    return refs


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
         tokenize: str = "13a") -> dict[str, float]:
    """Corpus BLEU (Papineni et al. 2002) by sacrebleu: score 0-100, brevity penalty, n-gram precisions
    p1..p4 (percent) and the hypothesis and reference lengths."""
    sacrebleu = _require("sacrebleu", "sacrebleu", "bleu")
    hyps = _texts(hypotheses, "hypotheses")
    refs = _reference_streams(hyps, references)
    res = sacrebleu.corpus_bleu(hyps, [list(s) for s in zip(*refs, strict=True)], tokenize=tokenize)
    return {"bleu": float(res.score), "bp": float(res.bp),
            **{f"p{i + 1}": float(p) for i, p in enumerate(res.precisions)},
            "hyp_len": float(res.sys_len), "ref_len": float(res.ref_len)}


def rouge(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
          use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE F-measures (Lin 2004) by rouge-score, 0-1, over hypothesis/reference pairs; with several
    references per hypothesis, the best one counts. rouge-score lowercases and keeps only [a-z0-9] tokens."""
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score", "rouge")
    hyps = _texts(hypotheses, "hypotheses")
    refs = _reference_streams(hyps, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    scores = [scorer.score_multi(r, h) for h, r in zip(hyps, refs, strict=True)]
    return {t: float(np.mean([s[t].fmeasure for s in scores])) for t in types}


def _suffix_automaton(seq: Sequence[Hashable]) -> tuple[list[dict], list[int], list[int], list[int]]:
    """Suffix automaton of `seq` (Blumer et al. 1985, "The smallest automaton recognizing the subwords of a
    text"): transitions, suffix links and longest lengths per state, and the state of each prefix
    seq[: i + 1]."""
    nxt: list[dict] = [{}]
    link, length, prefix_state = [-1], [0], []
    last = 0
    for c in seq:
        cur = len(length)
        nxt.append({})
        link.append(0)
        length.append(length[last] + 1)
        p = last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # split q: a clone takes the shorter strings
                clone = len(length)
                nxt.append(dict(nxt[q]))
                link.append(link[q])
                length.append(length[p] + 1)
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        last = cur
        prefix_state.append(cur)
    return nxt, link, length, prefix_state


def _longest_in_text(samples: list[Sequence[str]], train: Sequence[str]) -> list[int]:
    """For each sample, the length of its longest substring that also occurs in `train`: one suffix automaton
    over the samples (unique int separators, which match nothing in `train`), one pass of `train` through it
    recording the longest match at each state; a match also covers the state's suffix-link ancestors."""
    seq: list[Hashable] = []
    owner: list[int] = []
    for j, s in enumerate(samples):
        seq.extend(s)
        seq.append(-1 - j)
        owner.extend([j] * len(s) + [-1])
    nxt, link, length, prefix_state = _suffix_automaton(seq)
    best = [0] * len(length)
    v = matched = 0
    for c in train:  # matching statistics of train against the samples
        t = nxt[v].get(c)
        if t is None:
            while v and c not in nxt[v]:
                v = link[v]
            matched = length[v]
            t = nxt[v].get(c)
            if t is None:
                v = matched = 0
                continue
        v, matched = t, matched + 1
        if matched > best[v]:  # noqa: PLR1730 (a comparison beats a max() call in this 5M-step loop)
            best[v] = matched
    by_length = sorted(range(1, len(length)), key=length.__getitem__)
    for u in reversed(by_length):  # a matched state's ancestors occur in full
        if best[u] and best[link[u]] < length[link[u]]:
            best[link[u]] = length[link[u]]
    for u in by_length:  # longest matched suffix along the path to the root
        best[u] = max(best[u], best[link[u]])
    out = [0] * len(samples)
    for j, state in zip(owner, prefix_state, strict=True):
        if j >= 0 and best[state] > out[j]:
            out[j] = best[state]
    return out


def longest_overlap(samples: Sequence[str], train_text: str, *, unit: str = "char",
                    min_copy: int = 50) -> dict[str, Any]:
    """Memorization of a language model: for each sample, the length (in characters or whitespace words) of
    its longest substring that also occurs in the training text; their max and median, and the fraction of
    samples holding a copy of at least `min_copy` units. Exact: a suffix automaton over the samples and one
    pass over the training text (~1 s per 5 MB per 200k sample characters)."""
    samples = _texts(samples, "samples")
    if not isinstance(train_text, str) or not train_text:
        raise ValueError("train_text must be a non-empty string")
    if min_copy < 1:
        raise ValueError(f"min_copy={min_copy} must be >= 1")
    units = [_units(s, unit) for s in samples]
    train = _units(train_text, unit)
    lengths: list[int] = []
    start = size = 0
    for i, u in enumerate(units):  # groups of at most MAX_AUTOMATON_SYMBOLS symbols bound the memory
        if size and size + len(u) > MAX_AUTOMATON_SYMBOLS:
            lengths += _longest_in_text(units[start:i], train)
            start, size = i, 0
        size += len(u)
    lengths += _longest_in_text(units[start:], train)
    arr = np.array(lengths)
    return {"lengths": lengths, "max": int(arr.max()), "median": float(np.median(arr)),
            "copy_fraction": float((arr >= min_copy).mean()), "min_copy": min_copy, "unit": unit}
