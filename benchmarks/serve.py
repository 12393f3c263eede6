"""Load on `genlab serve` over loopback: N concurrent clients streaming chat from SmolLM2-135M-Instruct and
completions from the baby GPT (Shakespeare), and image requests to a Fashion-MNIST diffusion U-Net.

For each model and each number of clients (1, 4, 16, 50) every client sends requests back to back until the
case has sent `--requests` (at least one per client) or run `--seconds`; each request streams `--tokens` new
tokens (fixed: no stop string, end-of-turn ignored is NOT forced, so the count comes from the server's usage).
Reported per case: errors, requests, generated tokens per second over the case's wall time, p50/p95 request
latency and time to first token. The same cases run against a server with `--slots 1` (one sequence at a time,
what a server without continuous batching does) for the gain of continuous batching. Last, a kill -9 of the server
under 16 streaming clients: the audit chain must verify and hold a row for every request a client saw finish.

    python benchmarks/serve.py                 # ~10 minutes on 2 cores
    python benchmarks/serve.py --quick         # smoke run

Writes benchmarks/results/serve.json (atomically). Everything runs on 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me about the sea.", "What is a good breakfast?", "Explain what a cat is.", "Why is the sky blue?",
           "Write a line about winter.", "How do birds fly?", "What is bread made of?", "Name a famous river."]
GPT_PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "KING HENRY:\n", "First Citizen:\n", "HAMLET:\nTo be", "MERCUTIO:\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


THREADS: dict = {}  # the server's environment: GENLAB_THREADS when --threads is given


def start(models, state: Path, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "genlab", "-q", "serve", *map(str, models), "--no-auth",
                             "--port", str(port), "--state", str(state), "--slots", str(slots), "--max-queue", "256",
                             "--timeout", "600"], stdout=log.open("a"), stderr=subprocess.STDOUT,
                            env={**os.environ, **THREADS})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    raise RuntimeError("server did not start")


def stream_one(url: str, model: str, kind: str, prompt: str, tokens: int, seed: int) -> dict:
    """One streamed request -> its latency, time to first token, completion tokens and whether it finished."""
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update(model=model, stream=True, max_tokens=tokens, temperature=0.8, seed=seed,
                stream_options={"include_usage": True})
    t0 = time.perf_counter()
    ttft, usage, done = None, None, False
    with httpx.stream("POST", url + path, json=body, timeout=600) as r:
        if r.status_code != 200:
            r.read()
            return {"error": f"{r.status_code} {r.text[:200]}"}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            msg = json.loads(line[6:])
            if "error" in msg:
                return {"error": msg["error"]["message"]}
            if msg.get("usage"):
                usage = msg["usage"]
            ch = msg.get("choices") or []
            if ttft is None and ch and ((ch[0].get("delta") or {}).get("content") or ch[0].get("text")):
                ttft = time.perf_counter() - t0
    return {"latency": time.perf_counter() - t0, "ttft": ttft, "tokens": usage["completion_tokens"] if usage else 0,
            "done": done}


def image_one(url: str, model: str, n: int, steps: int, seed: int) -> dict:
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/images/generations", json={"model": model, "n": n, "steps": steps, "seed": seed},
                   timeout=600)
    if r.status_code != 200:
        return {"error": f"{r.status_code} {r.text[:200]}"}
    return {"latency": time.perf_counter() - t0, "images": len(r.json()["data"])}


def load_case(fn, clients: int, requests: int, seconds: float) -> dict:
    """`clients` threads calling fn(i) back to back until `requests` were sent in all (at least one per client)
    or `seconds` passed."""
    results: list[dict] = []
    lock = threading.Lock()
    sent = [0]
    deadline = time.perf_counter() + seconds
    total = max(requests, clients)

    def client(c):
        while True:
            with lock:
                if sent[0] >= total or (sent[0] >= clients and time.perf_counter() > deadline):
                    return
                i = sent[0]
                sent[0] += 1
            try:
                res = fn(i)
            except Exception as e:  # noqa: BLE001 - counted as an error
                res = {"error": repr(e)}
            with lock:
                results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    lat = sorted(r["latency"] for r in ok)
    out = {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "wall_s": round(wall, 2),
           "latency_p50_s": round(statistics.median(lat), 3) if lat else None,
           "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None}
    if ok and "tokens" in ok[0]:
        ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
        out.update(tokens=sum(r["tokens"] for r in ok), tokens_per_s=round(sum(r["tokens"] for r in ok) / wall, 1),
                   ttft_p50_s=round(statistics.median(ttft), 3) if ttft else None,
                   ttft_p95_s=round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 3) if ttft else None,
                   unfinished=sum(not r["done"] for r in ok))
    elif ok:
        out.update(images=sum(r["images"] for r in ok), images_per_s=round(sum(r["images"] for r in ok) / wall, 2))
    if len(ok) < len(results):
        out["first_error"] = next(r["error"] for r in results if "error" in r)
    return out


def prepare(work: Path, quick: bool) -> dict:
    """SmolLM2 imported from its PyPI package, a baby GPT and a diffusion U-Net trained briefly (their speed, not their
    quality, is measured here); reused from `work` when already there."""
    from genlab import api
    from genlab.adapt.gguf import import_gguf

    smol = work / "smollm2"
    if not (smol / "config.json").exists():
        import_gguf("smollm2", smol)
    gpt = work / "runs" / "baby-gpt"
    if not (gpt / "config.json").exists():
        api.train(ROOT / "configs/gpt/shakespeare_char.toml",
                  ["name=baby-gpt", f"out_dir={work / 'runs'}", "train.max_steps=200", "train.eval_every=200"])
    diff = work / "runs" / "fashion-diffusion"
    if not (diff / "config.json").exists():
        api.train(ROOT / "configs/diffusion/fashion_mnist.toml",
                  ["name=fashion-diffusion", f"out_dir={work / 'runs'}", "train.max_minutes=0", "train.max_steps=20",
                   "train.eval_every=20"])
    return {"smollm2": smol, "baby-gpt": gpt, "fashion-diffusion": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16,50")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    ap.add_argument("--requests", type=int, default=64, help="requests per case (at least one per client)")
    ap.add_argument("--seconds", type=float, default=60, help="time per case after every client sent one")
    ap.add_argument("--work", default=None, help="folder for the models (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: genlab's choice)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    if a.threads:
        THREADS["GENLAB_THREADS"] = str(a.threads)
    if a.quick:
        clients, a.tokens, a.requests, a.seconds = [1, 4], 8, 4, 10
    tmp = tempfile.TemporaryDirectory()
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_prep = time.perf_counter()
    models = prepare(work, a.quick)
    print(f"models ready in {time.perf_counter() - t_prep:.0f} s", flush=True)
    log = work / "server.log"
    res: dict = {"benchmark": "serve", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "python": platform.python_version()},
                 "settings": {"tokens_per_request": a.tokens, "requests_per_case": a.requests,
                              "seconds_per_case": a.seconds, "temperature": 0.8,
                              "server_threads": a.threads or "auto"}, "text": [], "images": []}
    text_models = [("smollm2", "chat", PROMPTS), ("baby-gpt", "completion", GPT_PROMPTS)]
    for slots, label in ((16, "continuous batching (16 slots)"), (1, "one at a time (1 slot)")):
        shutil.rmtree(work / f"state-{slots}", ignore_errors=True)
        proc, url = start(models.values(), work / f"state-{slots}", slots, log)
        try:
            for name, kind, prompts in text_models:
                stream_one(url, name, kind, prompts[0], 4, 0)  # warm up
                for c in clients if slots > 1 else [c for c in clients if c in (1, 16)]:
                    case = load_case(lambda i, n=name, k=kind, p=prompts, url=url: stream_one(url, n, k, p[i % len(p)],
                                                                                     a.tokens, i),
                                     c, a.requests if c > 1 else max(4, a.requests // 8), a.seconds)
                    case.update(model=name, server=label, slots=slots)
                    print(json.dumps(case), flush=True)
                    res["text"].append(case)
            if slots > 1:
                for c in [c for c in clients if c <= 4]:
                    case = load_case(lambda i, url=url: image_one(url, "fashion-diffusion", 4, 20, i), c, max(c, 4), a.seconds)
                    case.update(model="fashion-diffusion", server=label, n=4, steps=20, sampler="dpmpp_2m")
                    print(json.dumps(case), flush=True)
                    res["images"].append(case)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    gains = {}
    for name, _, _ in text_models:
        for c in (1, 16):
            cb = next((r for r in res["text"] if r["model"] == name and r["slots"] == 16 and r["clients"] == c), None)
            one = next((r for r in res["text"] if r["model"] == name and r["slots"] == 1 and r["clients"] == c), None)
            if cb and one and one.get("tokens_per_s"):
                gains[f"{name}@{c}"] = round(cb["tokens_per_s"] / one["tokens_per_s"], 2)
    res["continuous_batching_gain"] = gains
    res["kill_9"] = kill_9(models["smollm2"], work / "state-kill", log, a.tokens)
    print(json.dumps({"gain": gains, "kill_9": res["kill_9"]}), flush=True)
    from genlab.core.checkpoint import atomic_write_json

    atomic_write_json(Path(a.out), res)
    print(f"wrote {a.out}")


def kill_9(model: Path, state: Path, log: Path, tokens: int) -> dict:
    """16 clients stream chat; the server is killed with SIGKILL mid-stream; then `genlab audit verify`."""
    shutil.rmtree(state, ignore_errors=True)  # a fresh audit trail: its rows are this run's
    proc, url = start([model], state, 16, log)
    finished, lock = [0], threading.Lock()

    def client(i):
        for j in range(100):
            try:
                r = stream_one(url, model.name, "chat", PROMPTS[(i + j) % len(PROMPTS)], tokens, i * 100 + j)
            except Exception:  # noqa: BLE001 - the server dies under it
                return
            if r.get("done"):
                with lock:
                    finished[0] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    time.sleep(20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join(timeout=30)
    p = subprocess.run([sys.executable, "-m", "genlab", "audit", "verify", "--state", str(state)], capture_output=True,
                       text=True, check=False)
    rows = int(p.stdout.split(" rows")[0].splitlines()[-1])
    return {"clients": 16, "killed_after_s": 20, "requests_finished_before_kill": finished[0], "audit_rows": rows,
            "chain_intact": p.returncode == 0, "every_finished_request_has_a_row": rows >= finished[0]}


if __name__ == "__main__":
    main()
