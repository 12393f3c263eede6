"""Human evaluation: anonymous battles between two text models, votes in SQLite, and a Bradley-Terry leaderboard.

A battle is one prompt answered by two models; the person sees the answers without names and votes a, b or tie.
The leaderboard fits Bradley-Terry strengths by maximum likelihood (logistic regression on the pairwise outcomes,
a tie counted as half a win each way; a weak prior, see RIDGE) and puts them on the Elo scale with bootstrap
confidence intervals: the method of Chatbot Arena (Chiang et al. 2024, "Chatbot Arena: An Open Platform for
Evaluating LLMs by Human Preference"; Bradley & Terry 1952).
"""

import csv
import io
import math
import sqlite3
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

WINNERS = ("a", "b", "tie")
SCALE = 400.0 / math.log(10.0)  # natural-log odds -> Elo points: P(A beats B) = 1 / (1 + 10^((R_B - R_A) / 400))
OFFSET = 1000.0  # the mean model scores 1000
# A weak Gaussian prior on the strengths (an L2 term RIDGE * |b|^2 in natural-log units) keeps the fit finite when
# one model has won every vote (the plain MLE is then at infinity) and sane after a handful of votes: one decisive
# vote puts two models 284 points apart instead of infinitely far. It shrinks a gap measured on 40 votes by about
# 1%, on 400 votes by 0.1% (tests/unit/test_arena.py); otherwise this is the plain MLE.
RIDGE = 0.1
CSV_FIELDS = ("rank", "model", "score", "ci_low", "ci_high", "battles", "wins", "losses", "ties")


class UnknownBattle(KeyError):
    """No battle has this id (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown battle"


class AlreadyVoted(Exception):
    """The battle already has its vote (HTTP 409)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY, time REAL NOT NULL, prompt TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, output_a TEXT NOT NULL, output_b TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS votes (
    battle_id TEXT NOT NULL UNIQUE REFERENCES battles(id), winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
    time REAL NOT NULL);
"""


class ArenaStore:
    """Battles and votes in one SQLite file (WAL journal; one connection shared by the server's threads)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._cache: tuple[tuple, list[dict]] | None = None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create_battle(self, prompt: str, a: tuple[str, str], b: tuple[str, str]) -> str:
        """Record a battle: `a` and `b` are (model, output text). Returns its id."""
        (model_a, text_a), (model_b, text_b) = a, b
        if model_a == model_b:
            raise ValueError(f"a battle needs two different models, got {model_a!r} twice")
        bid = uuid.uuid4().hex
        with self._lock:
            self._db.execute("INSERT INTO battles VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (bid, time.time(), prompt, model_a, model_b, text_a, text_b))
        return bid

    def vote(self, battle_id: str, winner: str) -> dict[str, Any]:
        """Record the one vote of a battle and reveal its models: {"id", "models": [a, b], "winner"}."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of 'a', 'b', 'tie', got {winner!r}")
        with self._lock:
            row = self._db.execute("SELECT model_a, model_b FROM battles WHERE id = ?", (battle_id,)).fetchone()
            if row is None:
                raise UnknownBattle(f"no battle with id {battle_id!r}")
            try:
                self._db.execute("INSERT INTO votes VALUES (?, ?, ?)", (battle_id, winner, time.time()))
            except sqlite3.IntegrityError:
                raise AlreadyVoted(f"battle {battle_id!r} already has a vote") from None
        return {"id": battle_id, "models": [row[0], row[1]], "winner": winner}

    def votes(self) -> list[tuple[str, str, str]]:
        """Every vote as (model_a, model_b, winner), oldest first."""
        with self._lock:
            return self._db.execute(
                "SELECT b.model_a, b.model_b, v.winner FROM votes v JOIN battles b ON b.id = v.battle_id "
                "ORDER BY v.time, v.rowid").fetchall()

    def _models_and_counts(self) -> tuple[list[str], int, int]:
        with self._lock:
            models = [r[0] for r in self._db.execute(
                "SELECT model_a FROM battles UNION SELECT model_b FROM battles ORDER BY 1")]
            n_battles = self._db.execute("SELECT COUNT(*) FROM battles").fetchone()[0]
            n_votes = self._db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
        return models, n_battles, n_votes

    def leaderboard(self, n_boot: int = 200, seed: int = 0) -> list[dict[str, Any]]:
        """Every model that has been in a battle, best first: {"model", "score", "ci_low", "ci_high", "battles",
        "wins", "losses", "ties"}. Scores are Bradley-Terry strengths on the Elo scale (mean 1000) with 95%
        percentile-bootstrap intervals over the votes; a model without votes has score None and sorts last."""
        models, n_battles, n_votes = self._models_and_counts()
        key = (n_battles, n_votes, n_boot, seed)  # rows are only ever added, so the counts identify the data
        if self._cache is not None and self._cache[0] == key:
            return [dict(r) for r in self._cache[1]]
        votes = self.votes()
        rows = leaderboard_rows(votes, models, n_boot=n_boot, seed=seed)
        self._cache = (key, rows)
        return [dict(r) for r in rows]

    def csv(self, n_boot: int = 200, seed: int = 0) -> str:
        """The leaderboard as CSV text (a header, then one row per model, best first)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for rank, r in enumerate(self.leaderboard(n_boot=n_boot, seed=seed), 1):
            cells = ["" if r[k] is None else r[k] for k in CSV_FIELDS[1:]]
            w.writerow([rank if r["score"] is not None else "", *cells])
        return buf.getvalue()


def _fit(i: np.ndarray, j: np.ndarray, y: np.ndarray, k: int, ridge: float, x0: np.ndarray | None = None):
    """The maximum-likelihood strengths of k models from outcomes y (the score of model i against model j)."""
    # aggregate identical pairs: n outcomes per (i, j), w points won by i
    counts = np.bincount(i * k + j, minlength=k * k).astype(float)
    points = np.bincount(i * k + j, weights=y, minlength=k * k)
    pair = np.flatnonzero(counts)
    n, w, pi, pj = counts[pair], points[pair], pair // k, pair % k
    seen = np.zeros(k, bool)
    seen[pi] = seen[pj] = True

    def loss(b):  # -[w log sigmoid(d) + (n - w) log sigmoid(-d)] + ridge |b|^2, with logaddexp for large |d|
        d = b[pi] - b[pj]
        return np.sum(w * np.logaddexp(0.0, -d) + (n - w) * np.logaddexp(0.0, d)) + ridge * b @ b

    # Newton's method (IRLS, logistic regression's classic solver) with backtracking; the ridge makes it strictly convex
    b = np.zeros(k) if x0 is None else np.nan_to_num(x0)
    f = loss(b)
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(b[pi] - b[pj])))
        g_d, h_d = n * p - w, n * p * (1.0 - p)  # first and second derivatives in d = b_i - b_j
        grad = np.bincount(pi, g_d, k) - np.bincount(pj, g_d, k) + 2 * ridge * b
        hess = 2 * ridge * np.eye(k)
        np.add.at(hess, (pi, pi), h_d)
        np.add.at(hess, (pj, pj), h_d)
        np.add.at(hess, (pi, pj), -h_d)
        np.add.at(hess, (pj, pi), -h_d)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while (f_new := loss(b - t * step)) > f - 0.25 * t * grad @ step and t > 1e-10:
            t /= 2
        b, f = b - t * step, f_new
        if np.abs(grad).max() < 1e-9 * max(1.0, n.sum()):
            break
    out = np.full(k, np.nan)
    out[seen] = b[seen] - b[seen].mean()
    return out


def _encode(votes, models):
    idx = {m: k for k, m in enumerate(models)}
    i = np.array([idx[a] for a, _, _ in votes], dtype=np.int64)
    j = np.array([idx[b] for _, b, _ in votes], dtype=np.int64)
    y = np.array([{"a": 1.0, "b": 0.0, "tie": 0.5}[w] for _, _, w in votes])  # the score of model i
    return i, j, y


def fit_bradley_terry(votes: list[tuple[str, str, str]], models: list[str], *, ridge: float = RIDGE) -> np.ndarray:
    """Bradley-Terry strengths (natural-log odds, mean 0) by maximum likelihood: P(i beats j) = sigmoid(b_i - b_j),
    each vote a Bernoulli outcome, a tie half a win for each side. Models without votes get NaN."""
    if not votes:
        return np.full(len(models), np.nan)
    return _fit(*_encode(votes, models), len(models), ridge)


def leaderboard_rows(votes: list[tuple[str, str, str]], models: list[str] | None = None, *, n_boot: int = 200,
                     seed: int = 0) -> list[dict[str, Any]]:
    """The leaderboard of `votes` (model_a, model_b, winner): see ArenaStore.leaderboard."""
    models = sorted({m for a, b, _ in votes for m in (a, b)} | set(models or ()))
    idx = {m: k for k, m in enumerate(models)}
    stats = {m: {"battles": 0, "wins": 0, "losses": 0, "ties": 0} for m in models}
    for a, b, w in votes:
        for m in (a, b):
            stats[m]["battles"] += 1
        if w == "tie":
            stats[a]["ties"] += 1
            stats[b]["ties"] += 1
        else:
            win, lose = (a, b) if w == "a" else (b, a)
            stats[win]["wins"] += 1
            stats[lose]["losses"] += 1
    k = len(models)
    strength = fit_bradley_terry(votes, models)
    score = OFFSET + SCALE * strength
    lo = hi = np.full(k, np.nan)
    if votes and n_boot > 0:  # percentile bootstrap: refit on votes drawn with replacement
        i, j, y = _encode(votes, models)
        rng = np.random.default_rng(seed)
        boot = np.empty((n_boot, k))
        for r in range(n_boot):
            t = rng.integers(0, len(votes), len(votes))
            boot[r] = OFFSET + SCALE * _fit(i[t], j[t], y[t], k, RIDGE, x0=strength)
        with warnings.catch_warnings():  # a model without votes is NaN in every resample
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(boot, 2.5, axis=0), np.nanpercentile(boot, 97.5, axis=0)

    def num(x):
        return None if not np.isfinite(x) else round(float(x), 2)

    rows = [{"model": m, "score": num(score[idx[m]]), "ci_low": num(lo[idx[m]]), "ci_high": num(hi[idx[m]]),
             **stats[m]} for m in models]
    rows.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r["model"]))
    return rows


# ---------------------------------------------------------------------------------------------- HTTP routes

def _error(status: int, message: str, param: str | None = None):
    from fastapi import HTTPException

    return HTTPException(status, detail={"error": {"message": message, "type": "invalid_request_error",
                                                   "param": param, "code": None}})


async def _json_object(request) -> dict:
    try:
        body = await request.json()
    except ValueError:  # json.JSONDecodeError, UnicodeDecodeError
        raise _error(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _error(400, "the request body must be a JSON object")
    return body


def make_router(store: ArenaStore, battle: Callable[[str], Any], *, n_boot: int = 200):
    """The arena's four routes. `battle(prompt)` picks two distinct text models at random, runs both with the same
    settings and returns ((model_a, text_a), (model_b, text_b)); it may be a plain or an async function."""
    import inspect

    from fastapi import APIRouter, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    router = APIRouter()
    # (no `from __future__ import annotations` in this module: FastAPI reads the `Request` annotations at def time)

    @router.post("/v1/arena/battles")
    async def create(request: Request):
        body = await _json_object(request)
        prompt, kind = body.get("prompt"), body.get("kind", "chat")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _error(400, "'prompt' must be a non-empty string", "prompt")
        if kind != "chat":
            raise _error(400, f"'kind' must be 'chat' (text battles), got {kind!r}", "kind")
        try:
            result = await run_in_threadpool(battle, prompt)
            if inspect.isawaitable(result):
                result = await result
        except (ValueError, LookupError) as e:  # e.g. fewer than two text models are served
            raise _error(400, str(e)) from None
        (model_a, text_a), (model_b, text_b) = result
        bid = await run_in_threadpool(store.create_battle, prompt, (model_a, text_a), (model_b, text_b))
        return {"id": bid, "outputs": [{"text": text_a}, {"text": text_b}]}

    @router.post("/v1/arena/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        body = await _json_object(request)
        winner = body.get("winner")
        if winner not in WINNERS:
            raise _error(400, f"'winner' must be 'a', 'b' or 'tie', got {winner!r}", "winner")
        try:
            return await run_in_threadpool(store.vote, battle_id, winner)
        except UnknownBattle as e:
            raise _error(404, str(e)) from None
        except AlreadyVoted as e:
            raise _error(409, str(e)) from None

    @router.get("/v1/arena/leaderboard")
    async def leaderboard():
        rows = await run_in_threadpool(store.leaderboard, n_boot)
        return {"votes": sum(r["battles"] for r in rows) // 2, "models": rows}

    @router.get("/v1/arena/leaderboard.csv")
    async def leaderboard_csv():
        text = await run_in_threadpool(store.csv, n_boot)
        return Response(text, media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="arena_leaderboard.csv"'})

    return router
