"""The audit trail: one row per request (time, key id, endpoint, model, parameters, SHA-256 of the prompt and of
the output, the verdicts of any filter, the status), appended to SQLite as a hash chain: each row's hash covers
its fields and the previous row's hash, so `genlab audit verify` finds a row edited, deleted or inserted.

Each row is committed (WAL, synchronous=FULL) before the response ends, so a server killed at any moment loses
no committed row; a request cut off by the kill simply has no row. What a chain cannot show on its own: rows cut
from the END of the file (keep `genlab audit verify`'s printed head hash somewhere else to detect that)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError
from . import open_db

GENESIS = "0" * 64
FIELDS = ("seq", "time", "key_id", "endpoint", "model", "params", "prompt_sha256", "output_sha256", "verdicts",
          "status")


def sha256(text: str | bytes | None) -> str | None:
    if text is None:
        return None
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def _row_hash(prev: str, row: dict) -> str:
    body = json.dumps([row[f] for f in FIELDS], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + body).encode()).hexdigest()


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(self.path, durable=True)
        self._db.execute("CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, time REAL NOT NULL, key_id TEXT, "
                         "endpoint TEXT NOT NULL, model TEXT, params TEXT NOT NULL, prompt_sha256 TEXT, "
                         "output_sha256 TEXT, verdicts TEXT NOT NULL, status INTEGER NOT NULL, prev_hash TEXT NOT NULL, "
                         "hash TEXT NOT NULL)")

    def append(self, *, endpoint: str, model: str | None, key_id: str | None, params: dict, prompt: str | None,
               output: str | bytes | None, status: int, verdicts: list | None = None) -> str:
        """Append one committed row -> its hash."""
        with self._lock:
            last = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            row = {"seq": seq, "time": round(time.time(), 6), "key_id": key_id, "endpoint": endpoint, "model": model,
                   "params": json.dumps(params, sort_keys=True, default=str), "prompt_sha256": sha256(prompt),
                   "output_sha256": sha256(output), "verdicts": json.dumps(verdicts or [], sort_keys=True,
                                                                           default=str), "status": int(status)}
            h = _row_hash(prev, row)
            self._db.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (*[row[f] for f in FIELDS], prev, h))
        return h

    def close(self) -> None:
        self._db.close()


@dataclass
class Verification:
    rows: int = 0
    head: str = GENESIS
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path) -> Verification:
    """Walk the chain: every row's hash must cover its fields and the previous row's hash, and the sequence numbers
    must have no gap (a deleted row breaks both)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no audit log here")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        cur = db.execute(f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM audit ORDER BY seq")
    except sqlite3.DatabaseError as e:
        raise DataError(f"{path}: not a readable audit log ({e})") from None
    out = Verification()
    prev, expected_seq = GENESIS, 1
    for rec in cur:
        row = dict(zip(FIELDS, rec[: len(FIELDS)], strict=True))
        stored_prev, stored = rec[-2], rec[-1]
        if row["seq"] != expected_seq:
            out.problems.append(f"rows {expected_seq}..{row['seq'] - 1} are missing (deleted)")
        if stored_prev != prev:
            out.problems.append(f"row {row['seq']}: its previous-hash does not match row {row['seq'] - 1} "
                                "(a row before it was deleted, inserted or edited)")
        if _row_hash(stored_prev, row) != stored:
            out.problems.append(f"row {row['seq']}: its contents do not match its hash (edited)")
        prev, expected_seq = stored, row["seq"] + 1
        out.rows += 1
    out.head = prev
    db.close()
    return out
