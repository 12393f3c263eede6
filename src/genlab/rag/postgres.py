"""The server backend of the RAG store: PostgreSQL + pgvector.

`PostgresStore` keeps one index in its own schema (`rag_<name>`): a `files` table (file_key -> file_hash) and a
`chunks` table with the text, offsets, location, metadata (jsonb), the embedding (`vector(d)`, HNSW index with
cosine distance; score = 1 - distance) and a generated `tsvector` (GIN index). `sparse()` is Postgres' own
full-text search ranked by `ts_rank_cd` (cover density), *not* BM25: its scores are not comparable with the
SQLite backend's. Install the server and the extension with `scripts/install-pgvector.sh`.

`TempCluster` starts a throwaway cluster on a private unix socket, for tests and demos.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, DataError
from .ingest import Chunk
from .store import Hit

INSTALL_HINT = "run scripts/install-pgvector.sh (as root)"
_COLUMNS = 'source, text, start, "end", location, meta'


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _safe(dsn: str) -> str:
    """The connection string with any password masked, for messages."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn))


def connect(dsn: str):
    """A psycopg connection (autocommit; explicit transactions) with the vector extension and type registered."""
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError:
        raise DataError('the PostgreSQL backend needs: pip install "psycopg[binary]" pgvector') from None
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        raise DataError(f"cannot reach PostgreSQL at {_safe(dsn)!r}: {_first_line(e)}") from None
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        register_vector(conn)
    except psycopg.Error as e:
        conn.close()
        raise DataError(f"the pgvector extension is missing or not enabled ({_first_line(e)}): {INSTALL_HINT}") from None
    conn.execute("SET hnsw.iterative_scan = strict_order")  # pgvector >= 0.8: filtered queries still return k rows
    return conn


class PostgresStore:
    """A `Store` (rag/store.py) in PostgreSQL: one schema per index, HNSW dense search, full-text sparse search."""

    def __init__(self, dsn: str, name: str = "default", dim: int = 384):
        from psycopg import sql

        self.dim, self.schema = dim, ("rag_" + re.sub(r"\W", "_", name.lower()))[:63]
        self.conn = connect(dsn)
        s = sql.Identifier(self.schema)
        self._files, self._chunks = sql.Identifier(self.schema, "files"), sql.Identifier(self.schema, "chunks")
        with self.conn.transaction():
            self.conn.execute(sql.SQL("""
                CREATE SCHEMA IF NOT EXISTS {s};
                CREATE TABLE IF NOT EXISTS {f} (file_key text PRIMARY KEY, file_hash text NOT NULL);
                CREATE TABLE IF NOT EXISTS {c} (id bigserial PRIMARY KEY, file_key text NOT NULL, source text NOT NULL,
                    text text NOT NULL, start integer, "end" integer, location text, meta jsonb NOT NULL,
                    embedding vector({d}) NOT NULL,
                    tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED);
                CREATE INDEX IF NOT EXISTS chunks_file ON {c} (file_key);
                CREATE INDEX IF NOT EXISTS chunks_embedding ON {c} USING hnsw (embedding vector_cosine_ops);
                CREATE INDEX IF NOT EXISTS chunks_tsv ON {c} USING gin (tsv);
            """).format(s=s, f=self._files, c=self._chunks, d=sql.Literal(int(dim))))
        have = self.conn.execute("SELECT atttypmod FROM pg_attribute WHERE attrelid = %s::regclass "
                                 "AND attname = 'embedding'", [f"{self.schema}.chunks"]).fetchone()[0]
        if have != dim:
            self.conn.close()
            raise ConfigError(f"index schema {self.schema} holds {have}-d vectors, not {dim}-d")

    def _q(self, query: str):
        """A query with {files} and {chunks} filled in with this index's tables."""
        from psycopg import sql

        return sql.SQL(query).format(files=self._files, chunks=self._chunks)

    # -- writing: one transaction per file, so an interrupted ingest keeps every finished file
    def add(self, file_key: str, file_hash: str, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """Replace every chunk of `file_key` (in one transaction)."""
        from psycopg.types.json import Jsonb

        if len(chunks) != len(vectors) or (len(vectors) and vectors.shape[1] != self.dim):
            raise DataError(f"{len(chunks)} chunks but vectors of shape {tuple(vectors.shape)} (want (n, {self.dim}))")
        vectors = np.asarray(vectors, dtype=np.float32)
        with self.conn.transaction(), self.conn.cursor(binary=True) as cur:
            cur.execute(self._q("DELETE FROM {chunks} WHERE file_key = %s"), [file_key])
            cur.executemany(
                self._q(f"INSERT INTO {{chunks}} (file_key, {_COLUMNS}, embedding) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)"),
                [(file_key, c.source, c.text, c.start, c.end, c.location, Jsonb(c.meta), v)
                 for c, v in zip(chunks, vectors)])
            cur.execute(self._q("INSERT INTO {files} VALUES (%s, %s) ON CONFLICT (file_key) "
                                "DO UPDATE SET file_hash = excluded.file_hash"), [file_key, file_hash])

    def remove(self, file_key: str) -> None:
        with self.conn.transaction():
            self.conn.execute(self._q("DELETE FROM {chunks} WHERE file_key = %s"), [file_key])
            self.conn.execute(self._q("DELETE FROM {files} WHERE file_key = %s"), [file_key])

    def files(self) -> dict[str, str]:
        return dict(self.conn.execute(self._q("SELECT file_key, file_hash FROM {files}")).fetchall())

    # -- reading
    @staticmethod
    def _where(where: dict | None) -> tuple[str, list]:
        """SQL conditions for a metadata filter: `source` by equality (or prefix with a trailing "*"), other keys by
        jsonb equality on `meta`."""
        from psycopg.types.json import Jsonb

        clauses, args = ["TRUE"], []
        for key, value in (where or {}).items():
            if key == "source" and isinstance(value, str) and value.endswith("*"):
                clauses.append("source LIKE %s")
                args.append(re.sub(r"([\\%_])", r"\\\1", value[:-1]) + "%")
            elif key == "source":
                clauses.append("source = %s")
                args.append(value)
            else:
                clauses.append("meta @> %s")
                args.append(Jsonb({key: value}))
        return " AND ".join(clauses), args

    def dense(self, query_vec: np.ndarray, k: int, where: dict | None = None) -> list[Hit]:
        """The k nearest chunks by cosine (HNSW: approximate at scale), score = cosine similarity."""
        cond, args = self._where(where)
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        with self.conn.transaction():
            self.conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(min(max(40, k), 1000))])
            rows = self.conn.execute(self._q(
                f"SELECT id, 1 - (embedding <=> %s) AS score, {_COLUMNS} FROM {{chunks}} WHERE {cond} "
                "ORDER BY embedding <=> %s LIMIT %s"), [q, *args, q, k]).fetchall()
        return [Hit(r[0], float(r[1]), Chunk(*r[2:])) for r in rows]

    def sparse(self, query: str, k: int, where: dict | None = None) -> list[Hit]:
        """Postgres full-text search: chunks matching ANY of the query's words (English stemming, stop words
        dropped), ranked by `ts_rank_cd` (higher = better; not BM25)."""
        words = dict.fromkeys(w.lower() for w in re.findall(r"\w+", query))
        if not words:
            return []
        cond, args = self._where(where)
        rows = self.conn.execute(self._q(
            f"SELECT id, ts_rank_cd(tsv, q) AS score, {_COLUMNS} FROM {{chunks}}, to_tsquery('english', %s) q "
            f"WHERE tsv @@ q AND {cond} ORDER BY score DESC, id LIMIT %s"), [" | ".join(words), *args, k]).fetchall()
        return [Hit(r[0], float(r[1]), Chunk(*r[2:])) for r in rows]

    def _by_id(self, columns: str, chunk_ids: list[int]) -> list[tuple]:
        with self.conn.cursor(binary=True) as cur:  # binary: vectors arrive as raw float32, not text
            rows = {r[0]: r[1:] for r in cur.execute(
                self._q(f"SELECT id, {columns} FROM {{chunks}} WHERE id = ANY(%s)"), [list(chunk_ids)])}
        missing = [i for i in chunk_ids if i not in rows]
        if missing:
            raise DataError(f"no chunk with id {missing[0]} in index {self.schema}")
        return [rows[i] for i in chunk_ids]

    def get(self, chunk_ids: list[int]) -> list[Chunk]:
        """The chunks of these ids, in this order."""
        return [Chunk(*r) for r in self._by_id(_COLUMNS, chunk_ids)]

    def vectors(self, chunk_ids: list[int]) -> np.ndarray:
        """(n, d) float32 embeddings of these ids, in this order."""
        rows = self._by_id("embedding", chunk_ids)
        return np.stack([r[0].to_numpy() for r in rows]).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)

    def count(self) -> int:
        return self.conn.execute(self._q("SELECT count(*) FROM {chunks}")).fetchone()[0]

    def drop(self) -> None:
        """Delete this index (its schema and everything in it) from the database."""
        from psycopg import sql

        self.conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))

    def close(self) -> None:
        self.conn.close()


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian's /usr/lib/postgresql/<newest>/bin first, then PATH."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    if found := shutil.which(name):
        return found
    raise DataError(f"PostgreSQL's {name} was not found: {INSTALL_HINT}")


class TempCluster:
    """A throwaway PostgreSQL cluster in a temp dir, listening only on a unix socket there (no TCP), with pgvector
    enabled; `.dsn` (a postgresql:// URL) connects to it as the superuser `postgres`. Stopped and deleted on exit.
    As root, the server runs as the `postgres` user (PostgreSQL refuses to run as root). Starts in 1-5 s."""

    def __init__(self):
        self.dir: Path | None = None
        self.dsn = ""

    @staticmethod
    def _run(*cmd: str, check: bool = True) -> None:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, *cmd], check=check, capture_output=True, text=True)

    def __enter__(self) -> TempCluster:  # noqa: PYI034
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self.dir = Path(tempfile.mkdtemp(prefix="genlab-pg-"))
        try:
            if os.geteuid() == 0:
                shutil.chown(self.dir, "postgres", "postgres")
            data = self.dir / "data"
            self._run(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
                      "--no-sync", "--no-instructions")
            opts = f"-k {self.dir} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
            self._run(pg_ctl, "-D", str(data), "-l", str(self.dir / "log"), "-o", opts, "-w", "-s", "start")
            self.dsn = f"postgresql://postgres@/postgres?host={self.dir}"  # a URL, as Index.create expects
            connect(self.dsn).close()  # creates the vector extension, or says how to install it
        except BaseException as e:
            log = self.dir / "log"
            detail = log.read_text() if log.exists() else ""
            self.__exit__()
            if isinstance(e, subprocess.CalledProcessError):
                last = ((e.stderr or "").strip() or detail.strip() or "no output").splitlines()[-1]
                raise DataError(f"could not start a PostgreSQL cluster ({last}): {INSTALL_HINT}") from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.dir is None:
            return
        if (self.dir / "data" / "postmaster.pid").exists():
            self._run(_pg_bin("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "-s", "stop",
                      check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
