"""Model families. Each file registers one family with its config class and presets (DESIGN.md 2)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.config import from_dict, to_dict
from ..core.errors import ConfigError
from ..core.outputs import StepOutput
from ..core.registry import Registry


@dataclass(frozen=True)
class Family:
    name: str
    config_cls: type
    model_cls: type
    presets: dict[str, dict[str, Any]]
    modality: str  # "text" or "image"


MODELS: Registry[Family] = Registry("model family")


def register_family(name: str, config_cls: type, presets: dict[str, dict[str, Any]], modality: str):
    if "tiny" not in presets:
        raise ValueError(f"family {name} must define a 'tiny' preset")

    def deco(model_cls):
        MODELS.register(name)(Family(name, config_cls, model_cls, presets, modality))
        return model_cls

    return deco


def check_image_fields(cfg) -> None:
    """The checks every image family's config shares: channels, classes and the conditional switch."""
    if cfg.channels not in (1, 3):
        raise ConfigError(f"model.channels={cfg.channels} must be 1 or 3")
    if cfg.num_classes < 0:
        raise ConfigError(f"model.num_classes={cfg.num_classes} must be >= 0 (0 = no labels)")
    if cfg.conditional and cfg.num_classes < 1:
        raise ConfigError("model.conditional=true needs model.num_classes >= 1 (a labelled data source)")


def class_labels(cfg, y, n: int, what: str):
    """The class ids (n,) a conditional image model sees, range-checked; None for an unconditional model."""
    if not cfg.conditional:
        return None
    y = None if y is None else torch.as_tensor(y).long()
    if y is None or len(y) != n or int(y.min()) < 0 or int(y.max()) >= cfg.num_classes:
        got = None if y is None else y.tolist()[:12]
        raise ConfigError(f"a class-conditional {what} needs {n} labels in [0, {cfg.num_classes - 1}]; got {got}")
    return y


class NextTokenLM:
    """What every token language model (gpt, llama) shares on top of its `forward(idx) -> logits`: the
    cross-entropy loss, the exact log-likelihood and unconditional sampling through sampling/text.py."""

    loss_unit = "nats/token"  # what loss() returns, named wherever it is printed

    def loss(self, batch) -> StepOutput:
        x, y = batch
        logits = self(x)  # targets of -100 (a chat fine-tune's prompt tokens) are not scored
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-100)
        return StepOutput(loss, {}, n_items=int((y != -100).sum()))

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_1..x_{T-1} | x_0) in nats, (B,). Needs T <= block_size + 1."""
        logits = self(x[:, :-1]).float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)
        return lp.sum(dim=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def sample(self, n: int, *, generator: torch.Generator | None = None, **controls) -> torch.Tensor:
        """n unconditional sequences of token ids (B, max_new_tokens), starting from token 0."""
        from ..sampling.text import generate_ids

        out = generate_ids(self, [[0]] * n, generator=generator, **controls)
        return torch.tensor([row for row in out])


def build_config(section: dict[str, Any]):
    """`{"family": "gpt", "preset": "baby", "n_layer": 2, ...}` -> the family's frozen config."""
    section = dict(section)
    name = section.pop("family", None)
    if not name:
        raise ConfigError(f"model.family is required; known: {', '.join(MODELS.names())}")
    fam = MODELS.get(name)
    preset = section.pop("preset", None)
    fields: dict[str, Any] = {}
    if preset is not None:
        if preset not in fam.presets:
            raise ConfigError(f"unknown preset {preset!r} for {name}; known: {', '.join(sorted(fam.presets))}")
        fields.update(fam.presets[preset])
    fields.update(section)
    return from_dict(fam.config_cls, fields, prefix="model.")


def build_model(cfg):
    return MODELS.get(cfg.family).model_cls(cfg)


def config_dict(cfg) -> dict[str, Any]:
    d = to_dict(cfg)
    d.pop("family", None)
    return d


def config_from_saved(family: str, d: dict[str, Any]):
    return from_dict(MODELS.get(family).config_cls, d, prefix="model.")


def replace(cfg, **changes):
    return dataclasses.replace(cfg, **changes)


def decode_linear(m: torch.nn.Module):
    """A Linear layer as a callable for a decode fast path (F.linear on its weights, or a quantized layer's own
    forward), or None when the layer carries hooks or is of a type the fast path does not know (an adapter)."""
    if m._forward_hooks or m._forward_pre_hooks:
        return None
    if type(m) is torch.nn.Linear:
        return functools.partial(F.linear, weight=m.weight, bias=m.bias)
    return m.forward if getattr(m, "decode_ready", False) else None  # e.g. adapt/quantize.py's layers


def decode_embedding(e: torch.nn.Module):
    """A token embedding as a callable (or None, as for `decode_linear`); a quantized one reads the int8 rows of
    the output layer it is tied to."""
    if e._forward_hooks or e._forward_pre_hooks:
        return None
    if type(e) is torch.nn.Embedding:
        return functools.partial(F.embedding, weight=e.weight)
    return e.forward if getattr(e, "quantized", False) else None


from . import diffusion, flow, gan, gpt, llama, ngram, pixelcnn, vae  # noqa: F401  (registration)
