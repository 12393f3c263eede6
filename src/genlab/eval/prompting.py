"""Prompting patterns, measured: templates as data, an evaluation harness over `{input, target}` tasks.

A template is a TOML file (built-ins in eval/templates/: zero_shot, few_shot, few_shot_similar, chain_of_thought,
completion) whose `prompt` is Jinja over `input` and `examples` (k solved items, each with `input` and
`target`), chosen at random or by embedding similarity (all-MiniLM-L6-v2) from the task's train items, never the
item itself. With `chat = true` the prompt is a user message in the model's own chat template. Generation is
greedy. The answer is the first line of the reply, or with `answer_prefix` (chain of thought) what follows its last
occurrence. Scoring, after SQuAD's normalisation (lower case, no accents, punctuation or articles): `exact` (the
answer equals one of the item's answers), `contains` (one of them appears in the answer as whole words) and
`numeric` (the first number in the answer equals the target's).
"""

from __future__ import annotations

import logging
import random
import re
import string
import time
import tomllib
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from ..core.errors import ConfigError, DataError
from ..data.tasks import Item, Task
from ..sampling.text import SamplingConfig, stream_text

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")
SCORINGS = ("exact", "contains", "numeric")


@dataclass
class PromptTemplate:
    name: str
    prompt: str  # Jinja over `input`, `examples`, `k`
    description: str = ""
    chat: bool = True  # a user message in the model's chat template (where it has one)
    system: str = ""  # a system message, with chat
    k: int = 0  # solved examples shown
    select: str = "random"  # how they are chosen: random or similar
    turns: bool = False  # with chat: each example is an earlier user turn (the prompt rendered for it, without
    # examples) and the assistant's answer (its target), the way chat models are shown examples
    answer_prefix: str = ""  # the answer follows the last occurrence of this (chain of thought)
    max_new_tokens: int = 24
    stop: list[str] = field(default_factory=list)

    def validate(self) -> PromptTemplate:
        if self.select not in ("random", "similar"):
            raise ConfigError(f"template {self.name}: select={self.select!r} must be 'random' or 'similar'")
        if not 0 <= self.k <= 64:
            raise ConfigError(f"template {self.name}: k={self.k} must be in [0, 64]")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"template {self.name}: max_new_tokens={self.max_new_tokens} must be in [1, 4096]")
        import jinja2

        try:
            _env().from_string(self.prompt)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"template {self.name}: its prompt is not valid Jinja (line {e.lineno}: {e.message})") \
                from None
        return self

    def render(self, item: Item, examples: list[Item]) -> str:
        ex = [{"input": e.input, "target": e.target} for e in examples]
        return _env().from_string(self.prompt).render(input=item.input, examples=ex, k=len(ex)).strip()

    def messages(self, item: Item, examples: list[Item]) -> list[dict[str, str]]:
        """The chat messages: a system message if any, then the examples as turns (with `turns`), then the item."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        if self.turns:
            for e in examples:
                out += [{"role": "user", "content": self.render(e, [])}, {"role": "assistant", "content": e.target}]
            return out + [{"role": "user", "content": self.render(item, [])}]
        return out + [{"role": "user", "content": self.render(item, examples)}]


def _env():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)


def list_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES.glob("*.toml"))


def load_template(name: str | Path) -> PromptTemplate:
    """A built-in template by name, or a TOML file."""
    path = Path(name)
    if not path.suffix and (TEMPLATES / f"{name}.toml").is_file():
        path = TEMPLATES / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"template {name!r} not found: give a .toml file or one of {', '.join(list_templates())}")
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    known = {f.name for f in fields(PromptTemplate)} - {"name"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not isinstance(d.get("prompt"), str) or not d["prompt"].strip():
        raise ConfigError(f"{path}: needs a `prompt` (Jinja over input and examples)")
    return PromptTemplate(name=d.pop("name", path.stem), **d).validate()


# ------------------------------------------------------------------ answers and scores

def normalize(text: str) -> str:
    """SQuAD's answer normalisation (lower case; no punctuation, articles or extra spaces), plus accents removed."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = "".join(" " if c in string.punctuation or c in "‘’“”" else c for c in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_answer(reply: str, answer_prefix: str = "") -> str:
    """The scored part of a reply: after the last `answer_prefix` (case-insensitive) when there is one, then the
    first non-empty line."""
    text = reply
    if answer_prefix:
        at = text.lower().rfind(answer_prefix.lower())
        if at >= 0:
            text = text[at + len(answer_prefix):]
        else:  # no final-answer line: the last line is its best guess
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            text = lines[-1] if lines else ""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0].strip(" *_`\"'") if lines else ""


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group().replace(",", ""))
    except ValueError:
        return None


def score(answer: str, answers: list[str], how: str) -> bool:
    if how == "exact":
        a = normalize(answer)
        return any(a == normalize(t) for t in answers)
    if how == "contains":
        a = f" {normalize(answer)} "
        return any(normalize(t) and f" {normalize(t)} " in a for t in answers)
    if how == "numeric":
        got = _number(answer)
        return got is not None and any((t := _number(x)) is not None and abs(got - t) <= 1e-6 * max(1, abs(t))
                                       for x in answers)
    raise ConfigError(f"scoring {how!r} must be one of {', '.join(SCORINGS)}")


# ------------------------------------------------------------------ examples

class Embedder:
    """Sentence embeddings (all-MiniLM-L6-v2, the retrieval embedder of rag/retrieve.py) as a torch tensor."""

    def __init__(self):
        from ..rag.retrieve import Embedder as SentenceEmbedder

        self.model = SentenceEmbedder()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(self.model(texts))


def choose_examples(items: list[Item], pool: list[Item], k: int, select: str, seed: int = 0,
                    embedder: Embedder | None = None) -> list[list[Item]]:
    """k examples for each item from `pool`, never the item itself: at random (a fixed draw per item and seed)
    or the k nearest by embedding (the nearest last)."""
    if k == 0:
        return [[] for _ in items]
    if len(pool) <= k:
        raise DataError(f"{k} examples per question need more than {k} items to choose from; the task has "
                        f"{len(pool)} (mark more of its lines \"split\": \"train\", or lower k)")
    if select == "random":
        out = []
        for n, item in enumerate(items):
            rng = random.Random(f"{seed}:{n}:{item.input}")
            out.append(rng.sample([p for p in pool if p.input != item.input], k))
        return out
    embedder = embedder or Embedder()
    q, e = embedder([i.input for i in items]), embedder([p.input for p in pool])
    sim = q @ e.T  # (items, pool) cosine similarity
    for n, item in enumerate(items):
        for j, p in enumerate(pool):
            if p.input == item.input:
                sim[n, j] = -2.0
    top = sim.topk(k, dim=1).indices.flip(1)  # the most similar last, next to the question
    return [[pool[j] for j in row.tolist()] for row in top]


# ------------------------------------------------------------------ the harness

@dataclass
class TemplateResult:
    template: str
    task: str
    n: int
    scores: dict[str, float]  # scoring -> share of items right
    seconds: float
    prompt_tokens: float  # mean prompt length
    chat: bool
    items: list[dict]

    def as_dict(self) -> dict:
        return {"template": self.template, "task": self.task, "n": self.n, "scores": self.scores,
                "seconds": round(self.seconds, 1), "prompt_tokens": round(self.prompt_tokens, 1), "chat": self.chat,
                "items": self.items}


def evaluate_template(model, tokenizer, chat_template, eos_ids: list[int], task: Task, tpl: PromptTemplate, *,
                      limit: int | None = None, seed: int = 0, embedder: Embedder | None = None,
                      scorings: tuple[str, ...] = ("exact", "contains")) -> TemplateResult:
    """Score `tpl` on the task's test items (the first `limit`), greedy, one prompt per item."""
    items = task.test[:limit] if limit else task.test
    pool = task.train or task.items  # without a train split, the other items (choose_examples skips the item)
    examples = choose_examples(items, pool, tpl.k, tpl.select, seed, embedder)
    chat = tpl.chat and chat_template is not None
    prompts = []
    for item, ex in zip(items, examples, strict=True):
        if chat:
            prompts.append(tokenizer.encode(chat_template.render(tpl.messages(item, ex)), add_special_tokens=False))
        else:  # a plain model: the examples in the text (turns need a chat template)
            prompts.append(tokenizer.encode(tpl.render(item, ex)))
    cfg = SamplingConfig(max_new_tokens=tpl.max_new_tokens, temperature=0.0, stop=tuple(tpl.stop))
    replies = [""] * len(items)
    t0 = time.perf_counter()
    for d in stream_text(model, tokenizer, prompts, cfg, eos_id=eos_ids):
        replies[d.index] += d.text
    seconds = time.perf_counter() - t0
    rows, right = [], {s: 0 for s in scorings}
    for item, reply in zip(items, replies, strict=True):
        answer = extract_answer(reply, tpl.answer_prefix)
        ok = {s: score(answer, item.answers, s) for s in scorings}
        for s, v in ok.items():
            right[s] += v
        rows.append({"input": item.input, "answers": item.answers, "reply": reply, "answer": answer, **ok})
    n = len(items)
    return TemplateResult(tpl.name, task.name, n, {s: right[s] / n for s in scorings}, seconds,
                          sum(map(len, prompts)) / n, chat, rows)


def table(results: list[TemplateResult], model_name: str = "") -> str:
    """A markdown table: one row per task and template."""
    scorings = list(results[0].scores) if results else []
    head = "| " + " | ".join((["model"] if model_name else []) + ["task", "template", "n", *scorings,
                                                                  "prompt tokens", "s"]) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        cells = ([model_name] if model_name else []) + [r.task, r.template + ("" if r.chat else " (plain)"), str(r.n),
                                                        *(f"{r.scores[s]:.2f}" for s in scorings),
                                                        f"{r.prompt_tokens:.0f}", f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
