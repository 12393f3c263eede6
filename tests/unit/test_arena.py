"""The arena: Bradley-Terry scores against closed forms and scikit-learn's logistic regression, bootstrap intervals,
the SQLite store's rules (one vote per battle) and its HTTP routes with OpenAI-shaped errors."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from genlab.serve.arena import (
    RIDGE,
    SCALE,
    AlreadyVoted,
    ArenaStore,
    UnknownBattle,
    fit_bradley_terry,
    leaderboard_rows,
)


def _votes(a, b, wins_a, wins_b, ties=0):
    return [(a, b, "a")] * wins_a + [(a, b, "b")] * wins_b + [(a, b, "tie")] * ties


def _scores(rows):
    return {r["model"]: r["score"] for r in rows}


def test_three_to_one_is_400_log10_3_apart_around_1000():
    s = _scores(leaderboard_rows(_votes("x", "y", 300, 100), n_boot=0))
    assert s["x"] - s["y"] == pytest.approx(400 * math.log10(3), abs=0.5)  # 190.85; the prior moves it ~0.2
    assert (s["x"] + s["y"]) / 2 == pytest.approx(1000, abs=0.01)


def test_ties_are_half_a_win_each_way():
    # 200 wins, 100 losses, 200 ties: 300 points to 200, a 3:2 ratio
    s = _scores(leaderboard_rows(_votes("x", "y", 200, 100, ties=200), n_boot=0))
    assert s["x"] - s["y"] == pytest.approx(400 * math.log10(1.5), abs=0.5)
    s = _scores(leaderboard_rows(_votes("x", "y", 0, 0, ties=7), n_boot=0))
    assert s["x"] == pytest.approx(1000, abs=0.01) and s["y"] == pytest.approx(1000, abs=0.01)


def test_the_prior_is_weak():
    gap = {}
    for n in (10, 100):
        s = _scores(leaderboard_rows(_votes("x", "y", 3 * n, n), n_boot=0))
        gap[n] = s["x"] - s["y"]
    assert 0.98 < gap[10] / (400 * math.log10(3)) < 1 and 0.998 < gap[100] / (400 * math.log10(3)) < 1
    one = _scores(leaderboard_rows(_votes("x", "y", 1, 0), n_boot=0))
    assert 250 < one["x"] - one["y"] < 320  # one vote: a clear but finite gap


def test_a_chain_adds_up_and_order_of_sides_does_not_matter():
    # x beats y 3:1 and y beats z 3:1, x and z never meet: x - z = 2 * 400 log10 3
    votes = _votes("x", "y", 600, 200) + _votes("z", "y", 200, 600)
    s = _scores(leaderboard_rows(votes, n_boot=0))
    assert s["x"] - s["y"] == pytest.approx(400 * math.log10(3), abs=0.5)
    assert s["x"] - s["z"] == pytest.approx(800 * math.log10(3), abs=1.0)


def test_matches_scikit_learn_logistic_regression():
    """Chatbot Arena's fit: logistic regression without intercept on +1/-1 design rows (here with sample weights
    for the half-wins of ties, and the same small L2 term: sklearn's 1/(2C) ||w||^2 with C = 1 / (2 * RIDGE))."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    models = ["m0", "m1", "m2", "m3"]
    true = np.array([1.0, 0.3, -0.2, -1.1])
    votes = []
    for _ in range(400):
        a, b = rng.choice(4, 2, replace=False)
        p = 1 / (1 + math.exp(-(true[a] - true[b])))
        u = rng.random()
        votes.append((models[a], models[b], "tie" if abs(u - p) < 0.08 else ("a" if u < p else "b")))
    ours = fit_bradley_terry(votes, models)
    x, y, w = [], [], []
    for a, b, win in votes:
        row = np.zeros(4)
        row[models.index(a)], row[models.index(b)] = 1, -1
        for label, weight in ((1, {"a": 1, "b": 0, "tie": 0.5}[win]), (0, {"a": 0, "b": 1, "tie": 0.5}[win])):
            if weight:
                x.append(row), y.append(label), w.append(weight)
    lr = LogisticRegression(fit_intercept=False, C=1 / (2 * RIDGE), solver="newton-cholesky", tol=1e-10)
    lr.fit(np.array(x), np.array(y), sample_weight=np.array(w))
    ref = lr.coef_[0] - lr.coef_[0].mean()
    assert np.allclose(ours, ref, atol=1e-4), (ours, ref)
    assert np.argsort(-ours).tolist() == [0, 1, 2, 3]  # the true order is recovered from 400 votes


def test_one_sided_votes_stay_finite_and_a_model_without_votes_is_listed_last(tmp_path):
    store = ArenaStore(tmp_path / "arena.sqlite")
    for _ in range(3):
        store.vote(store.create_battle("p", ("x", "good"), ("y", "bad")), "a")
    store.create_battle("p", ("z", "..."), ("x", "..."))  # never voted on
    rows = store.leaderboard(n_boot=50)
    assert [r["model"] for r in rows] == ["x", "y", "z"]
    x, y, z = rows
    assert math.isfinite(x["score"]) and x["score"] > 1000 > y["score"]
    assert (x["wins"], x["losses"], x["battles"], y["losses"]) == (3, 0, 3, 3)
    assert z["score"] is None and z["ci_low"] is None and z["battles"] == 0
    lines = store.csv(n_boot=50).splitlines()
    assert lines[0] == "rank,model,score,ci_low,ci_high,battles,wins,losses,ties"
    assert lines[1].startswith("1,x,") and lines[3] == ",z,,,,0,0,0,0"


def test_bootstrap_interval_covers_the_score_narrows_with_votes_and_is_seeded():
    few = leaderboard_rows(_votes("x", "y", 6, 2, ties=2), n_boot=200, seed=0)
    many = leaderboard_rows(_votes("x", "y", 150, 50, ties=50), n_boot=200, seed=0)
    for rows in (few, many):
        for r in rows:
            assert r["ci_low"] <= r["score"] <= r["ci_high"]
    width = {id(rows): rows[0]["ci_high"] - rows[0]["ci_low"] for rows in (few, many)}
    assert width[id(many)] < width[id(few)] / 3
    # with 250 votes the interval is close to the normal approximation: +-1.96 * SCALE * se(d) / 2 per model
    n, p = 250, 0.7  # 175 points of 250
    se = math.sqrt(1 / (n * p * (1 - p))) / 2 * SCALE
    assert width[id(many)] == pytest.approx(2 * 1.96 * se, rel=0.3)
    assert leaderboard_rows(_votes("x", "y", 6, 2, ties=2), n_boot=200, seed=0) == few


def test_store_rules_persistence_and_threads(tmp_path):
    path = tmp_path / "state" / "arena.sqlite"
    store = ArenaStore(path)
    bid = store.create_battle("hello", ("x", "hi"), ("y", "yo"))
    with pytest.raises(ValueError, match="winner must be one of"):
        store.vote(bid, "c")
    with pytest.raises(UnknownBattle, match="no battle with id 'nope'"):
        store.vote("nope", "a")
    assert isinstance(UnknownBattle("x"), KeyError)
    assert store.vote(bid, "b") == {"id": bid, "models": ["x", "y"], "winner": "b"}
    with pytest.raises(AlreadyVoted):
        store.vote(bid, "a")
    with pytest.raises(ValueError, match="two different models"):
        store.create_battle("p", ("x", "1"), ("x", "2"))

    ids = [store.create_battle(f"p{i}", ("x", "1"), ("y", "2")) for i in range(8)]
    errors = []

    def voter(i):
        try:
            store.vote(ids[i // 2], "a")  # two threads per battle: exactly one wins the race
        except AlreadyVoted:
            errors.append(i)

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(errors) == 8
    store.close()

    again = ArenaStore(path)  # reopened: everything is still there
    assert len(again.votes()) == 9 and again.votes()[0] == ("x", "y", "b")
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture
def client(tmp_path):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from genlab.serve.arena import make_router

    app = FastAPI()

    @app.exception_handler(HTTPException)
    async def passthrough(request, exc):  # as the server does: an OpenAI-shaped detail is the body
        return JSONResponse(exc.detail, status_code=exc.status_code)

    turn = iter(range(1_000_000))

    def battle(prompt):
        if prompt == "boom":
            raise ValueError("the arena needs two text models; this server has 1")
        k = next(turn)
        pair = [("small", f"small says {prompt}"), ("big", f"big says {prompt}")]
        return tuple(pair if k % 2 else pair[::-1])

    app.include_router(make_router(ArenaStore(tmp_path / "arena.sqlite"), battle, n_boot=20))
    return TestClient(app)


def test_routes(client):
    r = client.post("/v1/arena/battles", json={"prompt": "hi", "kind": "chat"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert set(b) == {"id", "outputs"} and sorted(o["text"] for o in b["outputs"]) == ["big says hi", "small says hi"]
    assert "model" not in str(b["outputs"])  # names hidden until the vote
    winner = "a" if b["outputs"][0]["text"].startswith("big") else "b"
    r = client.post(f"/v1/arena/battles/{b['id']}/vote", json={"winner": winner})
    assert r.status_code == 200 and r.json()["winner"] == winner and sorted(r.json()["models"]) == ["big", "small"]
    lb = client.get("/v1/arena/leaderboard").json()
    assert lb["votes"] == 1 and [m["model"] for m in lb["models"]] == ["big", "small"]
    assert set(lb["models"][0]) == {"model", "score", "ci_low", "ci_high", "battles", "wins", "losses", "ties"}
    r = client.get("/v1/arena/leaderboard.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.text.splitlines()[1].startswith("1,big,")

    def error(r, status, *needles):
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
        for n in needles:
            assert n in err["message"]

    error(client.post(f"/v1/arena/battles/{b['id']}/vote", json={"winner": "a"}), 409, "already has a vote")
    error(client.post("/v1/arena/battles/zzz/vote", json={"winner": "a"}), 404, "no battle with id 'zzz'")
    error(client.post(f"/v1/arena/battles/{b['id']}/vote", json={"winner": "c"}), 400, "'winner'")
    error(client.post("/v1/arena/battles", json={"prompt": "  "}), 400, "'prompt'")
    error(client.post("/v1/arena/battles", json={"prompt": "x", "kind": "image"}), 400, "'kind'")
    error(client.post("/v1/arena/battles", content=b"{not json", headers={"content-type": "application/json"}),
          400, "not valid JSON")
    error(client.post("/v1/arena/battles", json=["x"]), 400, "JSON object")
    error(client.post("/v1/arena/battles", json={"prompt": "boom"}), 400, "two text models")
