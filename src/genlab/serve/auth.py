"""API keys: stored hashed in SQLite (`genlab keys create/list/revoke`), checked on every request, with a per-key
rate limit (a token bucket: `rate` requests per minute, bursts up to the same number)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ConfigError
from . import open_db

PREFIX = "gl-"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    created: float
    rate: int | None  # requests per minute; None = unlimited
    revoked: bool

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "created": time.strftime("%Y-%m-%d %H:%M:%S",
                time.gmtime(self.created)), "rate_per_minute": self.rate, "revoked": self.revoked}


class KeyStore:
    """keys.sqlite in the server's state folder. Only a SHA-256 of each key is kept: a key is shown once, when made."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_db(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT UNIQUE "
                         "NOT NULL, created REAL NOT NULL, rate INTEGER, revoked INTEGER NOT NULL DEFAULT 0)")
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last time)

    def create(self, name: str, rate: int | None = None) -> tuple[Key, str]:
        """A new key named `name` -> (its record, the secret key: shown once, never stored)."""
        if not name or len(name) > 100:
            raise ConfigError("a key needs a name of 1 to 100 characters")
        if rate is not None and not 1 <= rate <= 1_000_000:
            raise ConfigError(f"rate={rate} must be 1 to 1000000 requests per minute")
        secret = PREFIX + secrets.token_urlsafe(24)
        key = Key(secrets.token_hex(4), name, time.time(), rate, False)
        with self._lock:
            self._db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, 0)",
                             (key.id, key.name, _hash(secret), key.created, key.rate))
        return key, secret

    def list(self) -> list[Key]:
        with self._lock:
            rows = self._db.execute("SELECT id, name, created, rate, revoked FROM keys ORDER BY created").fetchall()
        return [Key(i, n, c, r, bool(v)) for i, n, c, r, v in rows]

    def revoke(self, id_or_name: str) -> list[Key]:
        """Revoke the key with this id, or every key with this name -> the keys revoked (none: ConfigError)."""
        with self._lock:
            found = self._db.execute("SELECT id FROM keys WHERE (id = ? OR name = ?) AND revoked = 0",
                                     (id_or_name, id_or_name)).fetchall()
            if not found:
                raise ConfigError(f"no active key has the id or name {id_or_name!r}")
            self._db.executemany("UPDATE keys SET revoked = 1 WHERE id = ?", found)
        return [k for k in self.list() if (k.id,) in found]

    def check(self, secret: str | None) -> Key | None:
        """The active key that `secret` is, or None (missing, unknown or revoked)."""
        if not secret:
            return None
        with self._lock:
            row = self._db.execute("SELECT id, name, created, rate, revoked FROM keys WHERE hash = ?",
                                   (_hash(secret),)).fetchone()
        if row is None or row[4]:
            return None
        return Key(row[0], row[1], row[2], row[3], False)

    def allow(self, key: Key, now: float | None = None) -> float:
        """Take one request from the key's bucket -> 0 if allowed, else the seconds until one is available."""
        if key.rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        per_s = key.rate / 60.0
        with self._lock:
            tokens, last = self._buckets.get(key.id, (float(key.rate), now))
            tokens = min(float(key.rate), tokens + (now - last) * per_s)
            if tokens >= 1:
                self._buckets[key.id] = (tokens - 1, now)
                return 0.0
            self._buckets[key.id] = (tokens, now)
            return (1 - tokens) / per_s

    def close(self) -> None:
        self._db.close()
