"""RAG on two real question sets: ingest, retrieval quality against peers, the "not found" threshold, cited
answers with and without retrieval, and query latency / store choice at 10k and 100k chunks.

Corpora and questions (genlab/rag/faq.py): the Perl FAQ (Debian perl-doc; every =head2 a question, its section
the gold passage) and the Python 3.11 documentation (Debian python3.11-doc; the questions are the FAQ headings
that are questions, every other page is indexed as distractors). Each set is split tune/report by a hash of
the question id; everything below is reported on the REPORT half unless it says TUNE.

1. Ingest: `api.rag_index` of the `perlfaq` and `pythondoc` corpora (all-MiniLM-L6-v2, 256/32 chunking).
2. Retrieval (`api.rag_eval(..., answers=0)`): dense, sparse (SQLite FTS5 BM25), hybrid (RRF) and hybrid+MMR;
   hit@1/5/10, MRR@10, nDCG@10, recall@10 (character coverage of the gold passage). Peers on the same chunks,
   scored by the same `genlab.rag.evaluate.retrieval_metrics`: bm25s (its default tokenizer, English stop
   words, no stemmer) and FAISS IndexFlatIP (exact; our dense top-10 must equal it) / IndexHNSWFlat (M=32).
3. "Not found": the threshold calibrated on the TUNE half (`rag_eval(..., calibrate=True)`), then the share of
   report questions refused (best cosine under it) in-domain, and off-topic (the other set's questions asked
   of this index).
4. Answers (SmolLM2-135M-Instruct, greedy, hybrid top 3): EM, token F1, faithfulness, citation precision with
   retrieval, and EM/F1/faithfulness of the same model without it, on the first N report questions.
5. Latency (ms per query, after a warm-up; the query's embedding is given, its cost is reported apart) of
   dense/sparse/hybrid on the embedded SQLite store and on PostgreSQL+pgvector (HNSW) at 10k and 100k chunks,
   and the store choice: build time, recall@10 vs exact search and p50 for SQLite+numpy (exact), FAISS flat,
   FAISS HNSW, pgvector HNSW, FTS5 and bm25s, with the install weight of each library.
   The big stores hold the real chunks of both corpora, filled up with copies of real chunks whose vectors
   get small Gaussian noise (re-normalised): embedding 100k real chunks would take hours on 2 cores.

    python benchmarks/rag.py                  # ~25 min on 2 cores: 14 of them embed pythondoc (15k chunks)
    python benchmarks/rag.py --answers 20     # 20 answers a set: ~+8 min
    python benchmarks/rag.py --skip-answers --sizes 10000 --skip-postgres   # ~17 min

Writes benchmarks/results/rag.json (atomically, after each stage).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "rag.json"
SETS = {"perlfaq": "perlfaq", "pythonfaq": "pythondoc"}  # question set -> the corpus it is asked of
MODES = ("dense", "sparse", "hybrid")
METRICS = ("hit@1", "hit@5", "hit@10", "mrr", "ndcg@10", "recall@10")
NOISE = 0.02  # per-component std of the noise on copied vectors (384-d: |noise| ~ 0.39, cosine to the original ~ 0.93)
HNSW_M, HNSW_EF_SEARCH = 32, 40  # FAISS HNSW; ef_search as genlab sets pgvector's (max(40, k))


def say(*a) -> None:
    print(*a, flush=True)


def rnd(x, n: int = 4):
    if isinstance(x, dict):
        return {k: rnd(v, n) for k, v in x.items()}
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, n)
    return x


def pcts(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def timed(fn, queries, warmup: int = 10) -> list[float]:
    """Milliseconds per call of fn(q) for each query, after `warmup` untimed calls."""
    for q in queries[:warmup]:
        fn(q)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def weight_mb(dist: str) -> float | None:
    """The installed size of a distribution: the files listed in its dist-info RECORD."""
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    total = 0
    for f in d.files or []:
        p = Path(d.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return round(total / 2**20, 1)


def pgvector_mb() -> float | None:
    """pgvector built from source (scripts/install-pgvector.sh): its library and extension files."""
    from glob import glob

    files = glob("/usr/lib/postgresql/*/lib/vector.so") + glob("/usr/share/postgresql/*/extension/vector*")
    return round(sum(Path(f).stat().st_size for f in files) / 2**20, 1) if files else None


def apt_mb(*packages: str) -> dict:
    out = {}
    for p in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Installed-Size}", p], capture_output=True, text=True,
                           check=False)
        out[p] = round(int(r.stdout) / 1024, 1) if r.returncode == 0 and r.stdout.strip().isdigit() else None
    return out


def tie_recall(returned: list[int], exact_scores: np.ndarray, k: int = 10) -> float:
    """recall@k vs exact search, ties allowed: a returned row counts if its exact score reaches the k-th best
    (duplicate chunks have equal vectors, so "the" exact top k is not unique)."""
    kth = np.partition(exact_scores, -k)[-k]
    return sum(exact_scores[i] >= kth - 1e-5 for i in returned[:k]) / k


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


# ------------------------------------------------------------------------------------------------ stages

def ingest(tmp: Path) -> dict:
    from genlab import api

    out = {}
    for corpus in SETS.values():
        t0 = time.perf_counter()
        report = api.rag_index([corpus], tmp / corpus)
        sec = time.perf_counter() - t0
        out[corpus] = {"chunks": report.chunks, "seconds": round(report.seconds, 1),
                       "chunks_per_s": round(report.chunks_per_s, 1), "seconds_with_model_load": round(sec, 1)}
        say(f"ingest {corpus}: {report.chunks} chunks in {report.seconds:.0f} s ({report.chunks_per_s:.1f} chunks/s)")
    return out


class Loaded:
    """One index's chunks, vectors and questions in memory, for the peers."""

    def __init__(self, folder: Path, qa: str, emb):
        from genlab.rag.faq import qa_set
        from genlab.rag.store import Index

        self.idx = Index.open(folder)
        self.store = self.idx.store
        self.ids, self.matrix = self.store._load_matrix()  # what dense search scores (exact)
        self.chunks = self.store.get([int(i) for i in self.ids])
        qs = qa_set(qa)[1]
        self.report = [q for q in qs if q["split"] == "report"]
        self.tune = [q for q in qs if q["split"] == "tune"]
        self.qvecs = emb([q["question"] for q in self.report])


def retrieval(data: dict[str, Loaded], tmp: Path, emb) -> dict:
    import bm25s
    import faiss

    from genlab import api
    from genlab.rag import evaluate as ev
    from genlab.rag.retrieve import Retriever

    out = {}
    for qa, corpus in SETS.items():
        L = data[qa]
        res = {"questions": len(L.report), "chunks": len(L.chunks)}
        t0 = time.perf_counter()
        ours = api.rag_eval(tmp / corpus, qa, split="report", modes=MODES, k=10, answers=0)
        res["seconds_rag_eval"] = round(time.perf_counter() - t0, 1)
        rows = {m: ours["retrieval"][m] for m in MODES}

        r = Retriever(L.store, emb, mode="hybrid", k=10, fetch_k=50, use_mmr=True)
        rows["hybrid+mmr"] = ev.aggregate(ev.retrieval_metrics([h.chunk for h in r.search(q["question"], 10, v)[0]],
                                                               q) for q, v in zip(L.report, L.qvecs))

        t0 = time.perf_counter()
        tok = bm25s.tokenize([c.text for c in L.chunks], stopwords="en", stemmer=None, show_progress=False)
        bm = bm25s.BM25()
        bm.index(tok, show_progress=False)
        res["bm25s_build_s"] = round(time.perf_counter() - t0, 2)
        per = []
        for q in L.report:
            qt = bm25s.tokenize([q["question"]], stopwords="en", stemmer=None, show_progress=False, return_ids=False)
            ranked = []
            if qt[0]:
                docs, scores = bm.retrieve(qt, k=10, show_progress=False, n_threads=1)
                ranked = [L.chunks[int(i)] for i, s in zip(docs[0], scores[0]) if s > 0]
            per.append(ev.retrieval_metrics(ranked, q))
        rows["bm25s"] = ev.aggregate(per)

        flat = faiss.IndexFlatIP(L.matrix.shape[1])
        flat.add(L.matrix)
        _, exact = flat.search(L.qvecs, 10)
        hnsw = faiss.IndexHNSWFlat(L.matrix.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        hnsw.add(L.matrix)
        res["faiss_hnsw_build_s"] = round(time.perf_counter() - t0, 2)
        hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        _, approx = hnsw.search(L.qvecs, 10)
        row_of = {int(i): n for n, i in enumerate(L.ids)}
        ours_rows = [[row_of[h.chunk_id] for h in L.store.dense(v, 10)] for v in L.qvecs]
        all_scores = L.qvecs @ L.matrix.T
        res["dense_vs_faiss_flat"] = {
            "recall@10": round(float(np.mean([tie_recall(o, s) for o, s in zip(ours_rows, all_scores)])), 4),
            "same_top10_ids": round(float(np.mean([o == list(e) for o, e in zip(ours_rows, exact)])), 4)}
        rows["faiss_flat"] = ev.aggregate(ev.retrieval_metrics([L.chunks[int(i)] for i in e], q)
                                          for e, q in zip(exact, L.report))
        rows["faiss_hnsw"] = ev.aggregate(ev.retrieval_metrics([L.chunks[int(i)] for i in e if i >= 0], q)
                                          for e, q in zip(approx, L.report))
        res["faiss_hnsw_recall@10_vs_exact"] = round(float(np.mean(
            [tie_recall([int(i) for i in a], s) for a, s in zip(approx, all_scores)])), 4)
        res["metrics"] = {m: rnd({k: v[k] for k in ("n", *METRICS)}) for m, v in rows.items()}
        out[qa] = res
        say(f"\nretrieval {qa} (report half, {len(L.report)} questions, {len(L.chunks)} chunks)")
        say(f"{'':12}" + "".join(f"{m:>10}" for m in METRICS))
        for m, v in rows.items():
            say(f"{m:12}" + "".join(f"{v[k]:10.3f}" for k in METRICS))
        say(f"dense vs FAISS flat recall@10 {res['dense_vs_faiss_flat']['recall@10']}, "
            f"FAISS HNSW recall@10 vs exact {res['faiss_hnsw_recall@10_vs_exact']}")
    return out


def refusal(data: dict[str, Loaded], tmp: Path, emb) -> dict:
    from genlab import api
    from genlab.rag import evaluate as ev
    from genlab.rag.retrieve import Retriever

    out = {}
    names = list(SETS)
    for qa, corpus in SETS.items():
        L, other = data[qa], data[names[1 - names.index(qa)]]
        cal = api.rag_eval(tmp / corpus, qa, calibrate=True, modes=("hybrid",), k=10)
        thr = cal["threshold"]
        rel_in = np.array([L.store.dense(v, 1)[0].score for v in L.qvecs])
        rel_off = np.array([L.store.dense(v, 1)[0].score for v in other.qvecs])
        r = Retriever(L.store, emb, mode="hybrid", k=10, fetch_k=50)
        found = np.array([ev.hit_at_k([h.chunk for h in r.search(q["question"], 10, v)[0]], q, 10)
                          for q, v in zip(L.report, L.qvecs)], bool)
        out[qa] = {"index": corpus, "threshold": thr, "tune_questions": cal["questions"],
                   "tune_hybrid_hit@10": rnd(cal["retrieval"]["hybrid"]["hit@10"]),
                   "in_domain_refused": round(float((rel_in < thr).mean()), 4),
                   "in_domain_found_refused": round(float((rel_in[found] < thr).mean()), 4) if found.any() else None,
                   "off_topic_refused": round(float((rel_off < thr).mean()), 4),
                   "off_topic_from": f"{other.idx.folder.name} questions (report half, {len(other.report)})",
                   "relevance_in_domain_p5_p50": [round(float(x), 4) for x in np.percentile(rel_in, [5, 50])],
                   "relevance_off_topic_p50_p95": [round(float(x), 4) for x in np.percentile(rel_off, [50, 95])]}
        o = out[qa]
        say(f"not found {qa}: threshold {thr}; refused in-domain {o['in_domain_refused']:.3f} "
            f"(answerable {o['in_domain_found_refused']}), off-topic {o['off_topic_refused']:.3f}")
    return out


def answers(data: dict[str, Loaded], tmp: Path, emb, n: int) -> dict:
    from genlab import api
    from genlab.adapt.gguf import import_gguf
    from genlab.rag.answer import source_label
    from genlab.rag.retrieve import Retriever

    run = api.load(import_gguf("smollm2", tmp / "smollm2"))
    out = {"model": "SmolLM2-135M-Instruct (fp32, greedy, max 256 new tokens)", "retrieval": "hybrid, top 3"}
    for qa, corpus in SETS.items():
        L = data[qa]
        t0 = time.perf_counter()
        res = api.rag_eval(tmp / corpus, qa, split="report", modes=(), answers=n, no_rag=True, run=run,
                           progress=lambda s, i, t, qa=qa: i % 5 == 0 and say(f"  {qa} {s} {i}/{t}"))
        sec = time.perf_counter() - t0
        rows = res["answer_rows"]
        agg = res["answers"]
        r = Retriever(L.store, emb, mode="hybrid", k=3, fetch_k=50)
        examples = []
        for row in rows[:2 if qa == "perlfaq" else 1]:
            hits, _ = r.search(row["question"], 3)
            label = [source_label(h) for h in hits]
            examples.append({"question": row["question"], "reference": row_reference(L, row)[:300],
                             "answer": row["answer"][:600], "retrieved_sources": label,
                             "cited_sources": [label[c - 1] for c in row["cited"] if 1 <= c <= len(hits)],
                             "attributed_sources (by word overlap)": [label[c - 1] for c in row.get("attributed", [])
                                                                       if 1 <= c <= len(hits)],
                             "no_rag_answer": row.get("no_rag_answer", "")[:400]})
        out[qa] = {**{k: rnd(v) for k, v in agg.items()}, "seconds": round(sec, 1),
                   "seconds_per_question_both_answers": round(sec / max(1, agg["n"]), 1), "examples": examples}
        o = {k: out[qa].get(k) for k in ("n", "exact_match", "f1", "faithfulness", "faithfulness_to_sources",
                                          "citation_precision", "cites_any", "no_rag_exact_match", "no_rag_f1",
                                          "no_rag_faithfulness")}
        say(f"answers {qa} ({sec:.0f} s): " + ", ".join(f"{k} {v}" for k, v in o.items()))
    return out


def row_reference(L: Loaded, row: dict) -> str:
    return next((q["answer"] for q in L.report if q["id"] == row["id"]), "")


def synthetic(data: dict[str, Loaded], size: int, rng: np.random.Generator):
    """`size` chunks: the real ones of both indexes first, then copies of them with noisy vectors."""
    chunks = [c for L in data.values() for c in L.chunks]
    vecs = np.concatenate([L.matrix for L in data.values()])
    pick = np.arange(size) % len(chunks)
    out = vecs[pick].copy()
    copies = np.arange(size) >= len(chunks)
    if copies.any():
        out[copies] += rng.normal(0, NOISE, (int(copies.sum()), out.shape[1])).astype(np.float32)
        out[copies] /= np.linalg.norm(out[copies], axis=1, keepdims=True)
    return [chunks[i] for i in pick], np.ascontiguousarray(out, dtype=np.float32)


def fill(store, chunks, vecs, batch: int = 2000) -> None:
    for b in range(0, len(chunks), batch):
        store.add(f"batch{b // batch:05d}", "synthetic", chunks[b:b + batch], vecs[b:b + batch])


def measure_store(store, emb, queries, qvecs, exact_scores) -> dict:
    """Latency of dense/sparse/hybrid and dense recall@10 vs exact (store ids are 1 + row, insertion order)."""
    from genlab.rag.retrieve import Retriever

    r = Retriever(store, emb, mode="hybrid", k=10, fetch_k=50)
    items = list(zip(queries, qvecs))
    out = {"dense": pcts(timed(lambda it: store.dense(it[1], 10), items)),
           "sparse": pcts(timed(lambda it: store.sparse(it[0], 10), items)),
           "hybrid": pcts(timed(lambda it: r.search(it[0], 10, it[1]), items))}
    out["recall@10_vs_exact"] = round(float(np.mean([tie_recall([h.chunk_id - 1 for h in store.dense(v, 10)], s)
                                                     for v, s in zip(qvecs, exact_scores)])), 4)
    return out



def peers(chunks, vecs, queries, qvecs, exact_scores) -> dict:
    """FAISS flat and HNSW (build, p50, recall@10 vs exact) and bm25s (build, p50) on one store's chunks."""
    import bm25s
    import faiss

    res = {}
    vlist = list(qvecs)
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(vecs.shape[1])
    flat.add(vecs)
    fb = time.perf_counter() - t0
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(vecs.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(vecs)
    hb = time.perf_counter() - t0
    hnsw.hnsw.efSearch = HNSW_EF_SEARCH
    for name, index, build in (("faiss_flat", flat, fb), ("faiss_hnsw", hnsw, hb)):
        ms = timed(lambda v, ix=index: ix.search(v[None], 10), vlist)
        rec = np.mean([tie_recall(list(index.search(v[None], 10)[1][0]), s) for v, s in zip(vlist, exact_scores)])
        res[name] = {"build_s": round(build, 2), **pcts(ms), "recall@10_vs_exact": round(float(rec), 4)}
    t0 = time.perf_counter()
    bm = bm25s.BM25()
    bm.index(bm25s.tokenize([c.text for c in chunks], stopwords="en", stemmer=None, show_progress=False),
             show_progress=False)
    bb = time.perf_counter() - t0

    def bm_query(q):
        qt = bm25s.tokenize([q], stopwords="en", stemmer=None, show_progress=False, return_ids=False)
        return bm.retrieve(qt, k=10, show_progress=False, n_threads=1) if qt[0] else None

    res["bm25s"] = {"build_s": round(bb, 1), **pcts(timed(bm_query, queries))}
    return res

def latency(data: dict[str, Loaded], tmp: Path, emb, sizes: list[int], skip_postgres: bool) -> dict:
    import faiss

    from genlab.rag.store import SQLiteStore

    rng = np.random.default_rng(0)
    pool = [q["question"] for L in data.values() for q in L.report + L.tune]
    queries = [pool[i] for i in rng.permutation(len(pool))[:200]]
    qvecs = emb(queries)
    embed = timed(lambda q: emb([q]), queries[:60])
    out = {"queries": len(queries), "embed_query": pcts(embed), "faiss_threads": faiss.omp_get_max_threads(),
           "sizes": {}}
    say(f"\nlatency: {len(queries)} queries; embedding one query p50 {out['embed_query']['p50_ms']} ms")
    cluster = None
    if not skip_postgres:
        from genlab.rag.postgres import TempCluster

        try:
            cluster = TempCluster().__enter__()
        except Exception as e:  # noqa: BLE001  (record why, go on without it)
            out["postgres_error"] = f"{type(e).__name__}: {e}"
            say(f"postgres: {out['postgres_error']}")
    try:
        for size in sizes:
            chunks, vecs = synthetic(data, size, rng)
            exact_scores = qvecs @ vecs.T
            res: dict = {"real_chunks": min(size, sum(len(L.chunks) for L in data.values()))}
            # SQLite + numpy (exact) + FTS5
            t0 = time.perf_counter()
            store = SQLiteStore(tmp / f"lat{size}.sqlite", vecs.shape[1])
            fill(store, chunks, vecs)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            store.dense(qvecs[0], 10)  # reads the vectors into memory
            load = time.perf_counter() - t0
            res["sqlite"] = {"build_s": round(build, 1), "first_query_load_s": round(load, 2),
                             **measure_store(store, emb, queries, qvecs, exact_scores)}
            store.close()
            res.update(peers(chunks, vecs, queries, qvecs, exact_scores))
            # PostgreSQL + pgvector
            if cluster is not None:
                from genlab.rag.postgres import PostgresStore

                try:
                    t0 = time.perf_counter()
                    pg = PostgresStore(cluster.dsn, name=f"lat{size}", dim=vecs.shape[1])
                    fill(pg, chunks, vecs)
                    pb = time.perf_counter() - t0
                    first = pg.get([1, size])
                    assert first[0].text == chunks[0].text and first[1].text == chunks[-1].text, "ids out of order"
                    res["postgres"] = {"build_s": round(pb, 1), **measure_store(pg, emb, queries, qvecs, exact_scores)}
                    pg.drop()
                    pg.close()
                except Exception as e:  # noqa: BLE001
                    res["postgres"] = {"error": f"{type(e).__name__}: {e}"}
            out["sizes"][str(size)] = res
            s, f, h, b = res["sqlite"], res["faiss_flat"], res["faiss_hnsw"], res["bm25s"]
            say(f"{size} chunks: sqlite build {s['build_s']} s, dense {s['dense']['p50_ms']}/{s['dense']['p95_ms']} ms, "
                f"sparse {s['sparse']['p50_ms']}/{s['sparse']['p95_ms']}, hybrid {s['hybrid']['p50_ms']}/"
                f"{s['hybrid']['p95_ms']} (p50/p95), recall {s['recall@10_vs_exact']}")
            say(f"  faiss flat {f['p50_ms']} ms (build {f['build_s']} s, recall {f['recall@10_vs_exact']}); "
                f"hnsw {h['p50_ms']} ms (build {h['build_s']} s, recall {h['recall@10_vs_exact']}); "
                f"bm25s {b['p50_ms']} ms (build {b['build_s']} s)")
            if "postgres" in res:
                p = res["postgres"]
                say("  postgres: " + (p["error"] if "error" in p else
                    f"build {p['build_s']} s, dense {p['dense']['p50_ms']}/{p['dense']['p95_ms']}, sparse "
                    f"{p['sparse']['p50_ms']}/{p['sparse']['p95_ms']}, hybrid {p['hybrid']['p50_ms']}/"
                    f"{p['hybrid']['p95_ms']} ms, recall {p['recall@10_vs_exact']}"))
    finally:
        if cluster is not None:
            cluster.__exit__()
    out["store_choice"] = store_choice(out["sizes"])
    return out


def store_choice(sizes: dict) -> dict:
    """The store comparison in one table per size: build seconds, recall@10 vs exact, p50 ms."""
    out = {}
    for size, res in sizes.items():
        rows = {"sqlite_numpy_exact (genlab default)": res["sqlite"] | {"p50_ms": res["sqlite"]["dense"]["p50_ms"]},
                "faiss_flat": res["faiss_flat"], "faiss_hnsw_m32": res["faiss_hnsw"]}
        if "postgres" in res and "error" not in res["postgres"]:
            rows["pgvector_hnsw"] = res["postgres"] | {"p50_ms": res["postgres"]["dense"]["p50_ms"]}
        rows["sqlite_fts5 (sparse)"] = {"build_s": None, "p50_ms": res["sqlite"]["sparse"]["p50_ms"]}
        rows["bm25s (sparse)"] = res["bm25s"]
        out[size] = {k: {m: v.get(m) for m in ("build_s", "recall@10_vs_exact", "p50_ms")} for k, v in rows.items()}
    return out


def install_weights() -> dict:
    return {"note": "MB of the files in each distribution's dist-info RECORD (apt: dpkg Installed-Size)",
            "sqlite_numpy": {"sqlite3": "stdlib", "numpy": weight_mb("numpy")},
            "faiss": {"faiss-cpu": weight_mb("faiss-cpu")},
            "bm25s": {"bm25s": weight_mb("bm25s"), "scipy (its dependency)": weight_mb("scipy")},
            "postgres": {"psycopg": weight_mb("psycopg"), "psycopg-binary": weight_mb("psycopg-binary"),
                         "pgvector": weight_mb("pgvector"),
                         **apt_mb("postgresql-15", "postgresql-client-15"),
                         "pgvector extension (built from source)": pgvector_mb()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=5,
                    help="answer the first N report questions of each set (~16 s a question for both answers)")
    ap.add_argument("--sizes", default="10000,100000", help="store sizes (chunks) for the latency stage")
    ap.add_argument("--skip-postgres", action="store_true")
    ap.add_argument("--skip-answers", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",") if s]

    from genlab.core.checkpoint import atomic_write_json
    from genlab.rag.retrieve import Embedder

    t_all = time.perf_counter()
    out: dict = {"embedding": "all-MiniLM-L6-v2 (fp32)", "chunking": {"max_tokens": 256, "overlap": 32},
                 "split": "report (tune for the threshold)", "stage_seconds": {},
                 "notes": [
                     "recall@k is the share of the gold passage's characters covered by the top k; hit@k any overlap.",
                     ("sparse = SQLite FTS5 bm25 (k1=1.2, b=0.75), all query words OR-ed; bm25s: k1=1.5, b=0.75, "
                      "lucene, its default tokenizer with English stop words, no stemmer, zero-score hits dropped."),
                     "hybrid = RRF (k=60) of dense and sparse top 50; hybrid+mmr: then MMR (lambda 0.7) to 10.",
                     (f"FAISS HNSW: M={HNSW_M}, efConstruction 40, efSearch {HNSW_EF_SEARCH}; pgvector HNSW: m=16, "
                      "ef_construction=64, ef_search=max(40, k) as genlab sets it, built while inserting."),
                     ("latency stores: the real perlfaq + pythondoc chunks, then copies of real chunk texts whose "
                      f"vectors get N(0, {NOISE}) noise per component and are re-normalised (not real embeddings)."),
                     ("latency is of the store call with the query vector given; embedding the query costs "
                      "'embed_query' on top for dense and hybrid."),
                     "recall@10 vs exact counts ties (equal vectors of duplicate chunks) as found.",
                     ("HNSW recall at 100k is pessimistic: each real chunk has ~6 noisy near-copies, a tight "
                      "cluster whose order approximate search gets partly wrong; on the real pythondoc index "
                      "(retrieval.*.faiss_hnsw_recall@10_vs_exact) it is higher."),
                     ("answers: 'faithfulness' is judged against the chunks the answer cites (0 when it cites "
                      "none), 'faithfulness_to_sources' and 'no_rag_faithfulness' against all retrieved chunks; "
                      "answers are not gated by the threshold.")]}

    def save(stage: str, t0: float) -> None:
        out["stage_seconds"][stage] = round(time.perf_counter() - t0, 1)
        out["total_seconds"] = round(time.perf_counter() - t_all, 1)
        atomic_write_json(Path(a.out), out)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        out["ingest"] = ingest(tmp)
        save("ingest", t0)
        t0 = time.perf_counter()
        emb = Embedder()
        data = {qa: Loaded(tmp / corpus, qa, emb) for qa, corpus in SETS.items()}
        out["retrieval"] = retrieval(data, tmp, emb)
        save("retrieval", t0)
        t0 = time.perf_counter()
        out["not_found"] = refusal(data, tmp, emb)
        save("not_found", t0)
        if not a.skip_answers and a.answers > 0:
            t0 = time.perf_counter()
            out["answers"] = answers(data, tmp, emb, a.answers)
            save("answers", t0)
        t0 = time.perf_counter()
        out["latency"] = latency(data, tmp, emb, sizes, a.skip_postgres)
        out["install_weight_mb"] = install_weights()
        save("latency", t0)
        for L in data.values():
            L.idx.close()
    say(f"\nwrote {a.out} ({out['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
