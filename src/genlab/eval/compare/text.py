"""The text half of a compare: bits/char and perplexity on the held-out text, samples, distinct-n, self-BLEU,
the longest copy of the training text, and membership inference from per-window losses."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from ... import api
from ...core import checkpoint as ckpt
from ...core.protocols import HasLogProb
from .. import privacy
from ..text import distinct_n, longest_overlap, self_bleu
from .plan import TEXT_NEW_TOKENS, TEXT_TEMPERATURE, Plan


@torch.no_grad()
def _window_losses(model, ids: torch.Tensor, T: int, n: int) -> torch.Tensor:
    """-log p per token of n windows of T + 1 tokens spread evenly over `ids`."""
    starts = torch.linspace(0, len(ids) - T - 1, n).long()
    w = ids[starts[:, None] + torch.arange(T + 1)]  # (n, T + 1)
    return torch.cat([-model.log_prob(w[i : i + 64]) for i in range(0, n, 64)]) / T


def eval_text(run: api.Run, rc: api.RunConfig, rec: dict[str, Any], plan: Plan) -> None:
    """Fill the record of one language-model family."""
    m, reasons, tags, details = rec["metrics"], rec["reasons"], rec["tags"], rec["details"]
    e = api.evaluate(run)
    m["bits_per_char"], m["perplexity"] = e["bits_per_char"], e["perplexity"]
    if e["tokenizer"] != "char":
        tags["perplexity"] = "per token"
    details["heldout"] = e
    t0 = time.perf_counter()
    texts = api.generate(run, "", n=plan.samples, generator=torch.Generator().manual_seed(0),
                         temperature=TEXT_TEMPERATURE, max_new_tokens=TEXT_NEW_TOKENS)
    m["s_per_sample"] = round((time.perf_counter() - t0) / plan.samples, 4)
    name = f"samples_{rec['family']}.txt"
    ckpt.atomic_write_text(plan.folder / name, "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts)))
    rec["samples_file"], details["samples"] = name, texts[:3]

    def attempt(key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ValueError as err:  # e.g. samples too short to hold an n-gram
            m[key], reasons[key] = None, f"not computable: {err}"
            return None

    for n in range(1, 5):
        m[f"distinct_{n}"] = attempt(f"distinct_{n}", lambda n=n: distinct_n(texts, n, unit="char"))
    m["self_bleu"] = attempt("self_bleu", lambda: self_bleu(texts))
    block = getattr(run.model.config, "block_size", None) or 64
    data, _, splits = api.prepare_text_data(rc.data, block, run.tokenizer)
    ov = attempt("longest_copy", lambda: longest_overlap(texts, splits.train))
    if ov is not None:
        m["longest_copy"], m["median_copy"], m["copy_fraction"] = ov["max"], ov["median"], ov["copy_fraction"]
        tags["longest_copy"] = "chars"
        details["longest_overlap"] = {k: v for k, v in ov.items() if k != "lengths"}
    else:
        reasons["copy_fraction"] = reasons["longest_copy"]
    n = min(plan.mia, len(data.train_ids) // (block + 1), len(data.val_ids) // (block + 1))
    if not isinstance(run.model, HasLogProb):
        m["mia_auc"], reasons["mia_auc"] = None, f"a {run.family} model has no per-window log-likelihood"
    elif n < 2:
        m["mia_auc"], reasons["mia_auc"] = None, f"fewer than 2 windows of {block + 1} tokens in a split"
    else:
        m["mia_auc"] = attempt("mia_auc", lambda: privacy.membership_inference_auc(
            _window_losses(run.model, data.train_ids, block, n), _window_losses(run.model, data.val_ids, block, n)
        )["auc"])
        details["membership"] = {"windows": n, "tokens": block + 1,
                                 "score": "negative log-likelihood per token of a window"}
