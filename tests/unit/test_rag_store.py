"""The embedded RAG store (SQLite + FTS5 + exact vectors), the index manifest, fusion and MMR, citations and the
"not found" path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genlab.core.errors import ConfigError, DataError
from genlab.rag.answer import NOT_FOUND, parse_citations
from genlab.rag.ingest import Chunk
from genlab.rag.retrieve import Retriever, mmr, rrf
from genlab.rag.store import Chunking, Hit, Index, SQLiteStore


def unit(rng, n, d=8):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def chunks(source, texts, **meta):
    return [Chunk(source, t, 10 * i, 10 * i + len(t), f"part {i}", dict(meta)) for i, t in enumerate(texts)]


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "s.sqlite", dim=8)
    yield s
    s.close()


def test_the_store_round_trip_dense_is_exact_and_sparse_finds_words(store):
    rng = np.random.default_rng(0)
    va, vb = unit(rng, 3), unit(rng, 2)
    store.add("a.txt", "h1", chunks("a.txt", ["the cat sat", "on the mat", "a dog barked"], book="A"), va)
    store.add("b.txt", "h2", chunks("b.txt", ["perl regular expressions", "python lists"], book="B"), vb)
    assert store.count() == 5 and store.files() == {"a.txt": "h1", "b.txt": "h2"}
    q = unit(rng, 1)[0]
    hits = store.dense(q, 5)
    want = np.argsort(-(np.concatenate([va, vb]) @ q))
    assert [h.chunk.text for h in hits] == [(["the cat sat", "on the mat", "a dog barked", "perl regular expressions",
                                             "python lists"])[i] for i in want]
    assert hits[0].score == pytest.approx(float((np.concatenate([va, vb]) @ q).max()), abs=1e-6)
    top = store.sparse("How do I use regular expressions?", 3)
    assert top[0].chunk.text == "perl regular expressions" and top[0].chunk.meta == {"book": "B"}
    assert top[0].chunk.location == "part 0" and (top[0].chunk.start, top[0].chunk.end) == (0, 24)
    assert {h.chunk.source for h in store.dense(q, 5, where={"book": "A"})} == {"a.txt"}
    assert {h.chunk.source for h in store.sparse("the", 5, where={"source": "b*"})} <= {"b.txt"}
    assert store.sparse("?!", 3) == []  # no words: nothing to match, no FTS syntax error


def test_re_adding_a_file_replaces_its_chunks_and_remove_drops_them(store):
    rng = np.random.default_rng(1)
    store.add("a.txt", "h1", chunks("a.txt", ["one", "two"]), unit(rng, 2))
    store.add("a.txt", "h2", chunks("a.txt", ["three"]), unit(rng, 1))
    assert store.count() == 1 and store.files() == {"a.txt": "h2"}
    assert [h.chunk.text for h in store.sparse("three", 5)] == ["three"] and store.sparse("one", 5) == []
    store.remove("a.txt")
    assert store.count() == 0 and store.files() == {} and store.dense(unit(rng, 1)[0], 3) == []
    with pytest.raises(DataError, match="vectors of shape"):
        store.add("c.txt", "h", chunks("c.txt", ["x"]), unit(rng, 1, d=4))


def test_an_index_refuses_another_embedding_model_and_bad_manifests(tmp_path):
    idx = Index.create(tmp_path / "ix", "model-a", 8, Chunking(128, 16))
    idx.close()
    Index.open(tmp_path / "ix", "model-a").close()
    with pytest.raises(ConfigError, match="built with the embedding model 'model-a', not 'model-b'"):
        Index.open(tmp_path / "ix", "model-b")
    with pytest.raises(DataError, match="no RAG index at"):
        Index.open(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="already an index"):
        Index.create(tmp_path / "ix", "model-a", 8, Chunking())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"embedding": {}}))
    with pytest.raises(DataError, match="not a genlab RAG manifest"):
        Index.open(tmp_path / "bad")


def hit(i, score=0.0):
    return Hit(i, score, Chunk("s", f"t{i}", 0, 2))


def test_reciprocal_rank_fusion_adds_one_over_k_plus_rank():
    fused = rrf([[hit(1), hit(2), hit(3)], [hit(3), hit(1)]], k=60)
    assert [h.chunk_id for h in fused] == [1, 3, 2]
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 62) and fused[2].score == pytest.approx(1 / 62)


def test_mmr_skips_a_near_duplicate():
    q = np.array([1.0, 0.0, 0.0], np.float32)
    vecs = np.array([[0.9, 0.43, 0], [0.9, 0.43, 0.001], [0.7, 0, 0.71]], np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    picked = mmr(q, [hit(0), hit(1), hit(2)], vecs, k=2, lam=0.5)
    assert [h.chunk_id for h in picked] == [0, 2]  # not the duplicate of the first


def test_citations_parse_in_all_their_forms():
    assert parse_citations("Use split [1]. Or a regex [2, 3][1] and [4].") == [1, 2, 3, 4]
    assert parse_citations("no sources here") == []


class FakeEmbedder:
    name, dim = "fake", 8

    def __call__(self, texts):
        return unit(np.random.default_rng(len(texts[0])), 1)


def test_a_question_far_from_every_chunk_is_answered_not_found(store):
    from genlab import api

    store.add("a.txt", "h", chunks("a.txt", ["alpha"]), unit(np.random.default_rng(3), 1))
    r = Retriever(store, FakeEmbedder(), mode="dense", k=1, fetch_k=1)
    ans = api.rag_ask("unused", "what is beta?", retriever=r, threshold=1.01)  # no generator is loaded
    assert not ans.found and ans.text == NOT_FOUND and ans.cited == []
    s = api.rag_ask("unused", "what is beta?", retriever=r, threshold=1.01, stream=True)
    assert "".join(s) == NOT_FOUND and s.answer.found is False
    with pytest.raises(ConfigError, match="retrieval mode"):
        Retriever(store, FakeEmbedder(), mode="fuzzy")
    with pytest.raises(DataError, match="empty"):
        r.search("   ")


class WordEmbedder(FakeEmbedder):
    def __call__(self, texts):
        return unit(np.random.default_rng(7), len(texts))

    @staticmethod
    def count_tokens(text):
        return len(text.split())


def test_an_interrupted_ingest_resumes_and_reindexing_embeds_only_changes(tmp_path):
    from genlab.rag.ingest import update_index

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in "abc":
        (docs / f"{name}.txt").write_text(f"file {name} says hello.\n\nA second paragraph of {name}.\n")
    idx = Index.create(tmp_path / "ix", "fake", 8, Chunking(16, 2))

    def stop_after_first(done, total, chunks):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        update_index(idx, [str(docs)], WordEmbedder(), progress=stop_after_first)
    assert len(idx.store.files()) == 1  # the finished file is kept, whole
    rep = update_index(idx, [str(docs)], WordEmbedder())
    assert (len(rep.added), rep.unchanged, rep.removed) == (2, 1, [])
    (docs / "b.txt").write_text("changed.\n")
    (docs / "c.txt").unlink()
    rep = update_index(idx, [str(docs)], WordEmbedder())
    assert [k.rsplit("/", 1)[1] for k in rep.added] == ["b.txt"] and rep.unchanged == 1 and len(rep.removed) == 1
    with pytest.raises(DataError, match="no chunk"):
        idx.store.get([10_000])
    texts = {h.chunk.source: h.chunk.text for h in idx.store.sparse("changed hello", 10)}
    assert texts == {"a.txt": "file a says hello.\n\nA second paragraph of a.", "b.txt": "changed."}
    assert json.loads((tmp_path / "ix" / "manifest.json").read_text())["files"] == idx.store.files()
    idx.close()
