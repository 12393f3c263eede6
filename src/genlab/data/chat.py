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

from ..core.errors import CheckpointError, ConfigError

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
