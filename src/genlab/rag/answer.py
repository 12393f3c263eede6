"""From retrieved chunks to a cited answer: numbered sources in the prompt, [n] citations in the answer, the cited
sources listed with their locations, and "not found" instead of an answer from nothing."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from .evaluate import content_words, parse_citations, sentences, support
from .store import Hit

NOT_FOUND = "I could not find this in the indexed documents."
SYSTEM = ("Answer the question using only the numbered sources. Cite the sources you use like [1]. "
          "If the sources do not contain the answer, say that you do not know.")


def source_label(hit: Hit) -> str:
    c = hit.chunk
    return f"{c.source}, {c.location}" if c.location else c.source


def sources_block(hits: list[Hit]) -> str:
    return "\n\n".join(f"[{n}] ({source_label(h)}) {h.chunk.text}" for n, h in enumerate(hits, 1))


def build_messages(question: str, hits: list[Hit], system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"Sources:\n{sources_block(hits)}\n\nQuestion: {question}"}]


def build_completion(question: str, hits: list[Hit]) -> str:
    """The same for a plain language model (no chat template): text it continues."""
    return f"{SYSTEM}\n\nSources:\n{sources_block(hits)}\n\nQuestion: {question}\nAnswer:"


def attribute(text: str, hits: list[Hit], threshold: float = 0.5) -> list[int]:
    """Sources for an answer that cites none (small models rarely do): for each sentence, the given source that
    holds the largest share of its content words, if that share is at least `threshold` (the measure of
    rag/evaluate.py's faithfulness). Word overlap, not entailment: it says where the words came from."""
    words = [content_words(h.chunk.text) for h in hits]
    out: list[int] = []
    for sentence in sentences(text):
        shares = [support(sentence, w) or 0.0 for w in words]
        if shares and max(shares) >= threshold and (n := shares.index(max(shares)) + 1) not in out:
            out.append(n)
    return out


@dataclass
class Answer:
    question: str
    text: str
    hits: list[Hit]  # the sources given to the model, numbered from 1
    relevance: float  # the best chunk's cosine with the question
    found: bool = True
    cited: list[int] = field(default_factory=list)  # valid source numbers cited in `text` by the model
    attributed: list[int] = field(default_factory=list)  # when it cites none: sources found by word overlap

    def sources(self) -> list[dict]:
        """Each cited (or, failing that, attributed) source: its number, file or corpus, location, character
        offsets, and `by`: "model" (an [n] in the answer) or "overlap" (see `attribute`)."""
        by = "model" if self.cited else "overlap"
        return [{"n": n, "source": self.hits[n - 1].chunk.source, "location": self.hits[n - 1].chunk.location,
                 "start": self.hits[n - 1].chunk.start, "end": self.hits[n - 1].chunk.end, "by": by}
                for n in (self.cited or self.attributed)]

    def to_dict(self) -> dict:
        return {"question": self.question, "answer": self.text, "found": self.found,
                "relevance": None if math.isnan(self.relevance) else round(self.relevance, 4),
                "sources": self.sources()}


def finish(question: str, text: str, hits: list[Hit], relevance: float) -> Answer:
    text = text.strip()
    cited = [n for n in parse_citations(text) if 1 <= n <= len(hits)]
    return Answer(question, text, hits, relevance, True, cited, [] if cited else attribute(text, hits))


class AnswerStream:
    """Iterate for the answer's text as it is generated; `.answer` holds the finished `Answer` afterwards."""

    def __init__(self, question: str, pieces: Iterator[str], hits: list[Hit], relevance: float,
                 done: Answer | None = None):
        self._q, self._pieces, self._hits, self._rel, self._done = question, pieces, hits, relevance, done
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        text = ""
        for piece in self._pieces:
            text += piece
            yield piece
        self.answer = self._done or finish(self._q, text, self._hits, self._rel)


def not_found(question: str, hits: list[Hit], relevance: float) -> Answer:
    return Answer(question, NOT_FOUND, hits, relevance, found=False)
