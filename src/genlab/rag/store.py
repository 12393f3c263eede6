"""Where chunks live: one small interface (`Store`) with an embedded default and a server backend.

- `SQLiteStore` (the default, no server): one SQLite file holds the chunks, their metadata, their vectors and
  SQLite's own full-text index (FTS5, ranked by its built-in BM25). Dense search is exact: the vectors are read
  once into a matrix and scored by one matrix product, so recall is 1.0 by construction and a query over 100k
  chunks of 384-d costs a few milliseconds (benchmarks/rag.py measures it against FAISS and the others).
- `PostgresStore` (rag/postgres.py, for scale): PostgreSQL + pgvector (HNSW) and Postgres full-text search.

An index is a folder (DESIGN.md 4.1): `manifest.json` (embedding model, chunking settings, backend, versions,
files and their hashes) beside the store's own files. `Index` opens it and refuses a query made with another
embedding model than the one that built it.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..core.checkpoint import atomic_write_json
from ..core.errors import ConfigError, DataError
from .ingest import Chunk

MANIFEST = "manifest.json"


@dataclass
class Hit:
    chunk_id: int
    score: float
    chunk: Chunk


class Store(Protocol):
    def add(self, file_key: str, file_hash: str, chunks: list[Chunk], vectors: np.ndarray) -> None: ...
    def remove(self, file_key: str) -> None: ...
    def files(self) -> dict[str, str]: ...
    def dense(self, query_vec: np.ndarray, k: int, where: dict | None = None) -> list[Hit]: ...
    def sparse(self, query: str, k: int, where: dict | None = None) -> list[Hit]: ...
    def get(self, chunk_ids: list[int]) -> list[Chunk]: ...
    def vectors(self, chunk_ids: list[int]) -> np.ndarray: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


def fts_query(text: str) -> str:
    """A full-text query that any of the text's words may match (ranking, not filtering, decides), quoted so that
    no word is read as FTS syntax."""
    words = dict.fromkeys(w.lower() for w in re.findall(r"\w+", text))
    return " OR ".join(f'"{w}"' for w in words)


class SQLiteStore:
    """The embedded store: chunks, vectors and an FTS5 index in one SQLite file (see the module doc)."""

    def __init__(self, path: str | Path, dim: int):
        self.path, self.dim = Path(path), dim
        self.db = sqlite3.connect(self.path)
        self.db.executescript("""
            PRAGMA journal_mode=WAL;
            CREATE TABLE IF NOT EXISTS files (file_key TEXT PRIMARY KEY, file_hash TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, file_key TEXT NOT NULL, source TEXT NOT NULL,
                text TEXT NOT NULL, start_char INTEGER, end_char INTEGER, location TEXT, meta TEXT, vec BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS chunks_file ON chunks (file_key);
            CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (text, content='chunks', content_rowid='id');
            CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
                INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text); END;
            CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
                INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
        """)
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (ids, vectors), read on first dense query

    # -- writing: one transaction per file, so an interrupted ingest keeps every finished file
    def add(self, file_key: str, file_hash: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors) or (len(vectors) and vectors.shape[1] != self.dim):
            raise DataError(f"{len(chunks)} chunks but vectors of shape {tuple(vectors.shape)} (want (n, {self.dim}))")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE file_key = ?", (file_key,))
            self.db.executemany(
                "INSERT INTO chunks (file_key, source, text, start_char, end_char, location, meta, vec) VALUES (?,?,?,?,?,?,?,?)",
                [(file_key, c.source, c.text, c.start, c.end, c.location, json.dumps(c.meta), v.tobytes())
                 for c, v in zip(chunks, vectors)])
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (file_key, file_hash))
        self._matrix = None

    def remove(self, file_key: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE file_key = ?", (file_key,))
            self.db.execute("DELETE FROM files WHERE file_key = ?", (file_key,))
        self._matrix = None

    def files(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT file_key, file_hash FROM files"))

    # -- reading
    def _where(self, where: dict | None, alias: str = "chunks") -> tuple[str, list]:
        clauses, args = [], []
        for key, value in (where or {}).items():
            col = f"{alias}.source" if key == "source" else f"json_extract({alias}.meta, '$.{_key(key)}')"
            if isinstance(value, str) and value.endswith("*"):
                clauses.append(f"{col} LIKE ? ESCAPE '\\'")
                args.append(value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
            else:
                clauses.append(f"{col} = ?")
                args.append(value)
        return (" AND ".join(clauses) or "1"), args

    def _load_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        if self._matrix is None:
            rows = self.db.execute("SELECT id, vec FROM chunks ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
            self._matrix = (ids, vecs)
        return self._matrix

    def dense(self, query_vec: np.ndarray, k: int, where: dict | None = None) -> list[Hit]:
        ids, vecs = self._load_matrix()
        if not len(ids):
            return []
        scores = vecs @ np.asarray(query_vec, dtype=np.float32).reshape(-1)  # cosine: the vectors are unit
        if where:
            sql, args = self._where(where)
            allowed = np.array([r[0] for r in self.db.execute(f"SELECT id FROM chunks WHERE {sql}", args)], np.int64)
            scores = np.where(np.isin(ids, allowed), scores, -np.inf)
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k] if k else np.array([], dtype=np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return self._hits([int(ids[i]) for i in top], [float(scores[i]) for i in top])

    def sparse(self, query: str, k: int, where: dict | None = None) -> list[Hit]:
        q = fts_query(query)
        if not q:
            return []
        sql, args = self._where(where, "c")
        rows = self.db.execute(
            f"SELECT c.id, -bm25(chunks_fts) FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid "
            f"WHERE chunks_fts MATCH ? AND {sql} ORDER BY bm25(chunks_fts) LIMIT ?", [q, *args, k]).fetchall()
        return self._hits([r[0] for r in rows], [float(r[1]) for r in rows])

    def _hits(self, ids: list[int], scores: list[float]) -> list[Hit]:
        return [Hit(i, s, c) for i, s, c in zip(ids, scores, self.get(ids))]

    def get(self, chunk_ids: list[int]) -> list[Chunk]:
        if not chunk_ids:
            return []
        marks = ",".join("?" * len(chunk_ids))
        rows = {r[0]: r[1:] for r in self.db.execute(
            f"SELECT id, source, text, start_char, end_char, location, meta FROM chunks WHERE id IN ({marks})", chunk_ids)}
        if missing := [i for i in chunk_ids if i not in rows]:
            raise DataError(f"no chunk with id {missing[0]} in {self.path}")
        return [Chunk(s, t, a, b, loc, json.loads(m)) for s, t, a, b, loc, m in (rows[i] for i in chunk_ids)]

    def vectors(self, chunk_ids: list[int]) -> np.ndarray:
        marks = ",".join("?" * len(chunk_ids))
        rows = dict(self.db.execute(f"SELECT id, vec FROM chunks WHERE id IN ({marks})", chunk_ids))
        if missing := [i for i in chunk_ids if i not in rows]:
            raise DataError(f"no chunk with id {missing[0]} in {self.path}")
        return np.stack([np.frombuffer(rows[i], dtype=np.float32) for i in chunk_ids]) if chunk_ids else \
            np.zeros((0, self.dim), np.float32)

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM chunks").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def _key(key: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ConfigError(f"filter key {key!r}: use a metadata field name (letters, digits, _)")
    return key


@dataclass
class Chunking:
    max_tokens: int = 256
    overlap: int = 32


class Index:
    """A RAG index folder: the manifest plus its store. `Index.create` makes one, `Index.open` reads one."""

    def __init__(self, folder: Path, manifest: dict, store: Store):
        self.folder, self.manifest, self.store = folder, manifest, store

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def embedding(self) -> str:
        return self.manifest["embedding"]["name"]

    @property
    def chunking(self) -> Chunking:
        return Chunking(**self.manifest["chunking"])

    @classmethod
    def create(cls, folder: str | Path, embedding: str, dim: int, chunking: Chunking, backend: str = "sqlite"):
        from .. import __version__

        folder = Path(folder)
        if (folder / MANIFEST).exists():
            raise ConfigError(f"{folder} is already an index (open it, or remove the folder to rebuild)")
        if backend != "sqlite" and not backend.startswith("postgresql://") and not backend.startswith("postgres://"):
            raise ConfigError(f"backend {backend!r}: use 'sqlite' (embedded) or a postgresql:// connection string")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"format": "genlab-rag-index/1", "embedding": {"name": embedding, "dim": dim},
                    "chunking": asdict(chunking), "backend": backend, "genlab": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": {}}
        atomic_write_json(folder / MANIFEST, manifest)
        return cls(folder, manifest, _open_store(folder, manifest))

    @classmethod
    def open(cls, folder: str | Path, embedding: str | None = None) -> Index:
        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise DataError(f"no RAG index at {folder} (make one with: genlab rag index DOCS... --index {folder})")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            Chunking(**manifest["chunking"]), manifest["embedding"]["name"], manifest["embedding"]["dim"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{folder / MANIFEST} is not a genlab RAG manifest ({e})") from None
        if embedding is not None and embedding != manifest["embedding"]["name"]:
            raise ConfigError(f"index {folder.name} was built with the embedding model "
                              f"{manifest['embedding']['name']!r}, not {embedding!r}: query it with that model "
                              "or rebuild the index")
        return cls(folder, manifest, _open_store(folder, manifest))

    def save_manifest(self, **updates) -> None:
        self.manifest.update(updates, files=self.store.files())
        atomic_write_json(self.folder / MANIFEST, self.manifest)

    def close(self) -> None:
        self.store.close()


def _open_store(folder: Path, manifest: dict) -> Store:
    dim = manifest["embedding"]["dim"]
    if manifest.get("backend", "sqlite") == "sqlite":
        return SQLiteStore(folder / "store.sqlite", dim)
    from .postgres import PostgresStore

    return PostgresStore(manifest["backend"], name=folder.name, dim=dim)
