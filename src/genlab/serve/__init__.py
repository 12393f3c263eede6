"""`genlab serve`: an OpenAI-compatible HTTP server over runs, a playground page, API keys, an audit trail and human
evaluation. It calls api.py and holds no model logic (DESIGN.md 1)."""

import sqlite3
from pathlib import Path


def open_db(path: str | Path, *, durable: bool = False) -> sqlite3.Connection:
    """A state file of the server (keys, audit trail, arena votes): SQLite in WAL mode, one connection shared by the
    server's threads behind the caller's lock, autocommit. `durable`: every commit reaches the disk (synchronous=FULL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, timeout=30, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    if durable:
        db.execute("PRAGMA synchronous=FULL")
    return db
