"""The server RAG store against a real throwaway PostgreSQL + pgvector cluster (started once for the module)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("psycopg", reason='pip install "psycopg[binary]" pgvector')
pytest.importorskip("pgvector", reason='pip install "psycopg[binary]" pgvector')

from genlab.core.errors import DataError
from genlab.rag.ingest import Chunk
from genlab.rag.postgres import PostgresStore, TempCluster, connect

DIM = 16
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
         "mike", "november", "oscar", "papa"]


@pytest.fixture(scope="module")
def cluster():
    try:
        with TempCluster() as c:
            yield c
    except DataError as e:
        pytest.skip(f"PostgreSQL with pgvector is not available (run scripts/install-pgvector.sh): {e}")


@pytest.fixture
def store(cluster, request):
    s = PostgresStore(cluster.dsn, name=request.node.name, dim=DIM)
    yield s
    s.drop()
    s.close()


def _unit(rng, n):
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _chunks(source, n, first_word=0, **meta):
    return [Chunk(source, f"{WORDS[(first_word + i) % len(WORDS)]} zulu text {i}", 10 * i, 10 * i + 9,
                  f"part {i}", {"part": i, **meta}) for i in range(n)]


def test_round_trip(store):
    rng = np.random.default_rng(0)
    va, vb = _unit(rng, 6), _unit(rng, 5)
    store.add("a.md", "ha", _chunks("docs/a.md", 6, book="A"), va)
    store.add("b.md", "hb", _chunks("notes/b.md", 5, first_word=6, book="B"), vb)
    assert store.files() == {"a.md": "ha", "b.md": "hb"} and store.count() == 11

    # dense: the exact nearest chunk by cosine, scores = cosine similarity, best first
    q = _unit(rng, 1)[0]
    allv = np.concatenate([va, vb])
    alltext = [c.text for c in _chunks("", 6)] + [c.text for c in _chunks("", 5, first_word=6)]
    hits = store.dense(q, 3)
    assert [h.chunk.text for h in hits] == [alltext[i] for i in np.argsort(-(allv @ q))[:3]]
    assert hits[0].score == pytest.approx(float((allv @ q).max()), abs=1e-5)
    assert [h.chunk for h in hits] == store.get([h.chunk_id for h in hits])
    np.testing.assert_allclose(store.vectors([h.chunk_id for h in hits]), allv[np.argsort(-(allv @ q))[:3]])

    # sparse: a word finds its chunk; any word of a longer question is enough
    hits = store.sparse("Where is the charlie?", 5)
    assert [h.chunk.text for h in hits] == ["charlie zulu text 2"] and hits[0].score > 0
    assert {h.chunk.text for h in store.sparse("kilo or echo", 5)} == {"kilo zulu text 4", "echo zulu text 4"}
    assert store.sparse("?!", 5) == []

    # where: meta equality, source equality and prefix
    assert {h.chunk.source for h in store.dense(q, 20, where={"book": "B"})} == {"notes/b.md"}
    assert len(store.dense(q, 20, where={"book": "B"})) == 5
    assert [h.chunk.meta["part"] for h in store.sparse("zulu", 20, where={"source": "docs/*", "part": 3})] == [3]
    assert len(store.sparse("zulu", 20, where={"source": "notes/b.md"})) == 5
    assert store.sparse("zulu", 20, where={"source": "notes"}) == []

    # re-adding a file replaces its chunks; remove drops file and chunks
    store.add("a.md", "ha2", _chunks("docs/a.md", 2, first_word=10), va[:2])
    assert store.files()["a.md"] == "ha2" and store.count() == 7
    assert store.sparse("alpha", 5) == [] and len(store.sparse("kilo", 5)) == 2
    store.remove("b.md")
    assert store.files() == {"a.md": "ha2"} and store.count() == 2
    assert {h.chunk.source for h in store.dense(q, 10)} == {"docs/a.md"}


def test_indexes_are_separate_and_reopen(cluster, store):
    store.add("x", "hx", _chunks("x", 2), _unit(np.random.default_rng(1), 2))
    again = PostgresStore(cluster.dsn, name=store.schema.removeprefix("rag_"), dim=DIM)
    other = PostgresStore(cluster.dsn, name="another index", dim=DIM)
    try:
        assert again.count() == 2 and again.files() == {"x": "hx"}
        assert other.count() == 0 and other.files() == {}
    finally:
        other.drop()
        again.close()
        other.close()


def test_index_folder_with_postgres_backend(cluster, tmp_path):
    """rag/store.py's Index keeps the connection string in its manifest and reopens the same store."""
    from genlab.rag.store import Chunking, Index

    index = Index.create(tmp_path / "pgindex", "test-embedder", DIM, Chunking(), backend=cluster.dsn)
    index.store.add("x", "hx", _chunks("x", 3), _unit(np.random.default_rng(2), 3))
    index.save_manifest()
    index.close()
    index = Index.open(tmp_path / "pgindex", embedding="test-embedder")
    try:
        assert index.store.count() == 3 and index.manifest["files"] == {"x": "hx"}
    finally:
        index.store.drop()
        index.close()


def test_bad_inputs(cluster, store):
    with pytest.raises(DataError, match="vectors of shape"):
        store.add("x", "h", _chunks("x", 2), np.zeros((2, DIM + 1), np.float32))
    with pytest.raises(DataError, match="no chunk with id"):
        store.get([10**9])
    with pytest.raises(DataError, match="cannot reach PostgreSQL"):
        PostgresStore("host=/nonexistent-genlab-socket dbname=x password=secret")
    with pytest.raises(DataError, match=r"cannot reach PostgreSQL at 'postgresql://u:\*\*\*@"):
        PostgresStore("postgresql://u:secret@127.0.0.1:1/db")


def test_missing_extension_says_how_to_install(cluster):
    """A user who may not create the extension (as when it is not installed) is told what to run."""
    conn = connect(cluster.dsn)
    conn.execute("CREATE ROLE reader LOGIN")
    conn.execute("CREATE DATABASE bare")
    try:
        with pytest.raises(DataError, match="install-pgvector.sh"):
            connect(f"host={cluster.dir} user=reader dbname=bare")
    finally:
        conn.execute("DROP DATABASE bare")
        conn.execute("DROP ROLE reader")
        conn.close()
