"""RAG metrics as pure functions: retrieval against a gold passage, answers against a reference, and how well
an answer sticks to (and cites) what was retrieved. No model code.

Chunks and gold passages are anything with `source`, `start`, `end` (a `Chunk`, a `Hit` via its `.chunk`, or
a dict such as a question of `rag.faq`). A retrieved chunk is *relevant* iff it comes from the gold source and
its character range [start, end) overlaps the gold range [start, end).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..eval.prompting import normalize


def _span(x: Any) -> tuple[str, int, int]:
    x = getattr(x, "chunk", x)  # a store Hit
    if isinstance(x, dict):
        return x["source"], int(x["start"]), int(x["end"])
    return x.source, int(x.start), int(x.end)


def _text(x: Any) -> str:
    x = getattr(x, "chunk", x)
    return x if isinstance(x, str) else x["text"] if isinstance(x, dict) else x.text


def is_relevant(chunk: Any, gold: Any) -> bool:
    """Same source and overlapping character ranges."""
    source, start, end = _span(chunk)
    g_source, g_start, g_end = _span(gold)
    return source == g_source and start < g_end and g_start < end


# ---------------------------------------------------------------------------------------------- retrieval

def hit_at_k(ranked: Sequence[Any], gold: Any, k: int) -> float:
    """1.0 if any of the top-k chunks is relevant, else 0.0."""
    return float(any(is_relevant(c, gold) for c in ranked[:k]))


def recall_at_k(ranked: Sequence[Any], gold: Any, k: int) -> float:
    """The share of the gold passage's characters covered by the top-k chunks: |union of (chunk range ∩ gold
    range)| / (gold end - gold start). 1.0 when the top k together contain the whole answer; a chunk that
    holds half of it gives 0.5. An empty gold range gives 0.0."""
    g_source, g_start, g_end = _span(gold)
    pieces = sorted((max(s, g_start), min(e, g_end)) for src, s, e in map(_span, ranked[:k])
                    if src == g_source and s < g_end and g_start < e)
    covered, reach = 0, g_start
    for s, e in pieces:  # union of intervals, left to right
        covered += max(0, e - max(s, reach))
        reach = max(reach, e)
    return covered / (g_end - g_start) if g_end > g_start else 0.0


def reciprocal_rank(ranked: Sequence[Any], gold: Any) -> float:
    """1 / rank of the first relevant chunk (rank 1 = first) in the whole list given; 0.0 if none. Its mean over
    questions is the MRR (truncate `ranked` yourself for MRR@k)."""
    return next((1.0 / r for r, c in enumerate(ranked, 1) if is_relevant(c, gold)), 0.0)


def ndcg_at_k(ranked: Sequence[Any], gold: Any, k: int = 10, n_relevant: int | None = None) -> float:
    """nDCG@k with binary gains: DCG = sum over the top k of rel_i / log2(i + 1) (i = 1-based rank), divided by
    the DCG of an ideal ranking with min(R, k) relevant chunks on top.

    R is `n_relevant` when given (the relevant chunks in the whole index, if the caller knows it); otherwise
    the number of relevant chunks in `ranked` (the retrieved list is the judged pool, as in TREC pooling), so
    nDCG then measures how high the relevant chunks that were found sit. No relevant chunk gives 0.0."""
    rels = [is_relevant(c, gold) for c in ranked]
    n = n_relevant if n_relevant is not None else sum(rels)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(n, k) + 1))
    dcg = sum(1.0 / math.log2(i + 1) for i, rel in enumerate(rels[:k], 1) if rel)
    return dcg / ideal if ideal else 0.0


def retrieval_metrics(ranked: Sequence[Any], gold: Any, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """hit@k and recall@k for each k, "mrr" (reciprocal rank) and "ndcg@10" of one question."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(ranked, gold, k)
        out[f"recall@{k}"] = recall_at_k(ranked, gold, k)
    out["mrr"] = reciprocal_rank(ranked, gold)
    out["ndcg@10"] = ndcg_at_k(ranked, gold, 10)
    return out


# ---------------------------------------------------------------------------------------------- answers

def _refs(reference: str | Sequence[str]) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 if the SQuAD-normalised prediction equals a normalised reference (the best over several)."""
    return max((float(normalize(prediction) == normalize(r)) for r in _refs(reference)), default=0.0)


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD token F1 after normalisation (lower case, no punctuation, articles or extra spaces): the harmonic
    mean of token precision and recall with multiset overlap, the best over several references. If either
    side has no tokens, 1.0 when both are empty else 0.0."""
    def f1(pred: list[str], ref: list[str]) -> float:
        if not pred or not ref:
            return float(pred == ref)
        same = sum((Counter(pred) & Counter(ref)).values())
        if same == 0:
            return 0.0
        p, r = same / len(pred), same / len(ref)
        return 2 * p * r / (p + r)

    pred = normalize(prediction).split()
    return max((f1(pred, normalize(r).split()) for r in _refs(reference)), default=0.0)


# ---------------------------------------------------------------------------------------------- grounding

_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[a-z0-9_]+")
_STOPWORDS = """
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing don down during each few for from further had has have having he her
here hers him his how i if in into is it its itself just let me more most my no nor not now of off on once only
or other our ours out over own same she should so some such than that the their theirs them then there these
they this those through to too under until up very was we were what when where which while who whom why will
with would you your yours s t ll re ve d m
"""
STOPWORDS = frozenset(_STOPWORDS.split())


def parse_citations(answer: str) -> list[int]:
    """The citation numbers of an answer in order of first appearance, each once: "[1]", "[2, 3]" and "[1][3]"
    give 1, 2, 3."""
    seen: dict[int, None] = {}
    for group in _CITATION.findall(answer):
        seen.update((int(n), None) for n in group.split(","))
    return list(seen)


def cited(answer: str, chunks: Sequence[Any]) -> list[Any]:
    """The chunks an answer cites: [n] is chunks[n - 1] (numbered from 1 as in the prompt); numbers out of range
    are ignored."""
    return [chunks[n - 1] for n in parse_citations(answer) if 1 <= n <= len(chunks)]


def content_words(text: str) -> set[str]:
    """Lower-cased words (letters, digits, _) that are not in the small built-in STOPWORDS list."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def sentences(answer: str) -> list[str]:
    """The answer's sentences, its [n] markers removed: split after . ! ? and at line breaks."""
    return [x for x in _SENTENCE.split(_CITATION.sub(" ", answer)) if x.strip()]


def support(sentence: str, context_words: set[str]) -> float | None:
    """The share of the sentence's content words found in `context_words`; None if it has none."""
    words = content_words(sentence)
    return len(words & context_words) / len(words) if words else None


def faithfulness(answer: str, context: Sequence[Any], *, threshold: float = 0.5) -> float | None:
    """The share of the answer's sentences supported by `context` (texts or chunks; pass `cited(answer,
    chunks)` to judge against the cited chunks only).

    Sentences: the answer with its [n] markers removed, split after . ! ? and at line breaks. A sentence is
    *supported* iff at least `threshold` of its content words (see `content_words`) occur among the content
    words of the union of the context texts. Sentences without content words are skipped; None if none is left
    (nothing to judge). A word-overlap proxy, not entailment: it catches invented content, not negations."""
    words = set().union(*(content_words(_text(c)) for c in context))
    scores = [share >= threshold for x in sentences(answer) if (share := support(x, words)) is not None]
    return sum(scores) / len(scores) if scores else None


def citation_precision(answer: str, chunks: Sequence[Any], gold: Any) -> float | None:
    """The share of the distinct citation numbers in the answer whose chunk (chunks[n - 1]) is relevant to the
    gold passage; a number with no chunk counts as wrong. None when the answer cites nothing."""
    numbers = parse_citations(answer)
    if not numbers:
        return None
    good = sum(1 <= n <= len(chunks) and is_relevant(chunks[n - 1], gold) for n in numbers)
    return good / len(numbers)


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """The mean of each numeric metric over the per-question rows, skipping rows where it is None or absent
    (so "faithfulness" averages over the answers that had something to judge); "n" = the number of rows.
    Non-numeric fields (ids, texts) are ignored; rows should hold metrics only, not e.g. gold offsets."""
    rows = list(rows)
    sums: dict[str, list[float]] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, (int, float)):  # bool included (hit, em)
                sums.setdefault(key, []).append(float(value))
    return {"n": len(rows), **{k: sum(v) / len(v) for k, v in sums.items()}}
