"""Chat templates: an OpenAI-style message list -> the prompt text a chat model was trained on.

An instruct model (SmolLM2-Instruct, any imported Llama chat model) was fine-tuned on conversations laid out by
its own Jinja template, kept in the run folder as `hf_tokenizer_config.json` ("chat_template") as transformers
keeps it. The template is rendered the way transformers' `apply_chat_template` renders it (a sandboxed Jinja
environment with trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now` and a non-escaping `tojson`), so
the same messages give the same text. A run trained by genlab on raw text has no template: it continues text.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..core.errors import CheckpointError, ConfigError, DataError

ROLES = ("system", "user", "assistant", "tool")
TOKENIZER_CONFIG = "hf_tokenizer_config.json"  # an imported run's tokenizer_config.json, as its source had it
GENERATION_CONFIG = "hf_generation_config.json"


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Validate an OpenAI-style message list: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"messages[{i}] must be a dict with 'role' and 'content' (got {m!r:.80})")
        if m["role"] not in ROLES:
            raise ConfigError(f"messages[{i}]: role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"messages[{i}]: content must be a string (got {type(m['content']).__name__})")
        out.append(dict(m))
    return out


@lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    """A model's chat template with its special tokens (bos_token, eos_token, ... as the template names them)."""

    def __init__(self, source: str, specials: dict[str, str] | None = None, where: str = "chat template"):
        import jinja2

        self.source, self.specials, self.where = source, dict(specials or {}), where
        try:
            _compile(source)
        except jinja2.exceptions.TemplateError as e:
            raise CheckpointError(f"{where} is not a valid Jinja template ({e})") from None

    @classmethod
    def from_run(cls, path: str | Path) -> ChatTemplate | None:
        """The template of a run folder, or None when the run has none (a model trained on raw text)."""
        f = Path(path) / TOKENIZER_CONFIG
        if not f.is_file():
            return None
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{f} is corrupt ({e})") from None
        source = cfg.get("chat_template")
        if isinstance(source, list):  # several named templates, as some tokenizer configs hold: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return None
        specials = {k: _token_text(v) for k, v in cfg.items() if k.endswith("_token") and _token_text(v)}
        return cls(source, specials, str(f))

    def render(self, messages, *, add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text for `messages`; with `add_generation_prompt`, it ends where the assistant's reply begins."""
        import jinja2

        messages = check_messages(messages)
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **self.specials, **extra)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the chat template refused these messages: {e}") from None

    def stop_tokens(self) -> list[str]:
        """The token that ends an assistant turn (the template's eos_token)."""
        return [self.specials["eos_token"]] if "eos_token" in self.specials else []


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


# ---------------------------------------------------------------- instruction / chat data for fine-tuning

def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file: each line {"messages": [...]} or {"prompt": ..., "response": ...}
    (-> a user and an assistant turn). Every conversation needs an assistant turn: that is what trains."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"chat data not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            msgs = row["messages"]
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
        else:
            raise DataError(f"{path}:{n}: each line needs {{\"messages\": [...]}} or {{\"prompt\", \"response\"}}")
        try:
            msgs = check_messages(msgs)
        except ConfigError as e:
            raise DataError(f"{path}:{n}: {e}") from None
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{path}:{n}: the conversation has no assistant turn (nothing to learn from)")
        out.append(msgs)
    if not out:
        raise DataError(f"{path} holds no conversation")
    return out


def encode_conversation(template: ChatTemplate, encode, messages) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation as its template lays it out, and which of them are trained: the assistant's
    replies with their end-of-turn token, not the system/user turns nor the assistant header (the prompt)."""
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True) if i else ""
        full = template.render(messages[: i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("this chat template does not render a conversation turn by turn (a prefix of the "
                            "conversation is not a prefix of its text): it cannot mark the assistant's tokens")
        for text, trained in ((prompt[len(done):], False), (full[len(prompt):], True)):
            t = encode(text) if text else []
            ids += t
            mask += [trained] * len(t)
        done = full
    return ids, mask


class ChatData:
    """Conversations packed into windows of `block_size` tokens, the loss on assistant tokens only (the other
    targets are -100, which cross-entropy ignores); a `BatchSource` for `fit`.

    Packing: the conversations are laid end to end and cut into windows, so no compute goes to padding; a
    window may hold the end of one conversation and the start of the next (attention then sees both, as in
    packed fine-tuning generally). The last `val_fraction` of conversations is held out."""

    def __init__(self, conversations: list[tuple[list[int], list[bool]]], block_size: int,
                 val_fraction: float = 0.1):
        n_val = max(1, int(len(conversations) * val_fraction)) if len(conversations) > 1 else 0
        if n_val == 0:
            raise DataError("chat fine-tuning needs at least 2 conversations (one is held out)")
        self.block_size = block_size
        self.train = self._pack(conversations[:-n_val], block_size, "train")
        self.val = self._pack(conversations[-n_val:], block_size, "held-out", pad=True)

    @staticmethod
    def _pack(convs, T: int, split: str, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [i for c, _ in convs for i in c]
        mask = [b for _, m in convs for b in m]
        if pad and len(ids) < T + 1:
            ids, mask = ids + [0] * (T + 1 - len(ids)), mask + [False] * (T + 1 - len(mask))
        n = (len(ids) - 1) // T
        if n < 1:
            raise DataError(f"the {split} conversations hold {len(ids)} tokens, fewer than one window of {T + 1}; "
                            "add conversations or lower data.block_size")
        x = torch.tensor(ids[: n * T + 1])
        y = torch.where(torch.tensor(mask[: n * T + 1]), x, torch.full_like(x, -100))
        rows = torch.arange(n)[:, None] * T + torch.arange(T + 1)  # (n, T + 1) windows, one token overlapping
        xs, ys = x[rows][:, :-1], y[rows][:, 1:]
        keep = (ys != -100).any(dim=1)  # a window without an assistant token teaches nothing
        if not keep.any():
            raise DataError(f"no {split} window holds an assistant token")
        return xs[keep], ys[keep]

    def train_batch(self, batch_size: int, generator: torch.Generator):
        ix = torch.randint(len(self.train[0]), (batch_size,), generator=generator)
        return self.train[0][ix], self.train[1][ix]

    def eval_batches(self, batch_size: int, max_batches: int | None = None, **_) -> list:
        xs, ys = self.val
        out = [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, len(xs), batch_size)]
        return out[:max_batches] if max_batches else out
