"""The one facade that cli.py (and later the server) call. It wires data -> model -> fit -> checkpoint ->
generate/eval, and holds no model logic of its own."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .core import checkpoint as ckpt
from .core.config import apply_overrides, from_dict, load_toml, to_dict
from .core.errors import CheckpointError, ConfigError
from .data.datasets import DataConfig, TextSplits, TokenData, load_text
from .data.tokenizers import Tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from .models import MODELS, build_config, build_model, config_dict, config_from_saved, replace
from .sampling.text import SamplingConfig, TextDelta, generate_text, stream_text
from .training.trainer import FitResult, TrainConfig, evaluate_loss, fit

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """A whole run as data: `configs/*.toml` hold one of these."""

    name: str = "run"
    seed: int = 1337
    out_dir: str = "runs"  # the run folder is out_dir/name
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: {"family": "gpt", "preset": "tiny"})
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self):
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name={self.name!r} must be a plain folder name")
        build_config({**self.model, "vocab_size": self.model.get("vocab_size", 1)})  # checks family/preset/keys

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def resolve_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """A RunConfig from a TOML file (or `base`) plus `--set key=value` overrides, checked strictly."""
    d = load_toml(path) if path is not None else dict(base or {})
    apply_overrides(d, list(overrides))
    return from_dict(RunConfig, d)


# ---------------------------------------------------------------- data


def load_dataset(source: str | DataConfig = "shakespeare", **kw) -> TextSplits:
    """The text of a source as train/held-out splits: `load_dataset("shakespeare").train[:100]`."""
    cfg = source if isinstance(source, DataConfig) else from_dict(DataConfig, {"source": source, **kw})
    return load_text(cfg)


def _encode(tok: Tokenizer, text: str):
    return tok.encode_array(text) if hasattr(tok, "encode_array") else tok.encode(text)


def prepare_text_data(cfg: DataConfig, block_size: int, tokenizer: Tokenizer | None = None):
    splits = load_text(cfg)
    if tokenizer is None:
        # characters: the vocabulary covers the whole corpus (a symbol set, not statistics); BPE merges
        # are learned from the training split only
        tokenizer = train_tokenizer(cfg.tokenizer, splits.train + splits.val if cfg.tokenizer == "char"
                                    else splits.train, vocab_size=cfg.vocab_size)
    data = TokenData(_encode(tokenizer, splits.train), _encode(tokenizer, splits.val), block_size)
    return data, tokenizer, splits


# ---------------------------------------------------------------- build / train


def build(model: dict[str, Any] | Any, vocab_size: int | None = None):
    """A fresh model from a model section (`{"family": "gpt", "preset": "baby"}`) or a config object."""
    cfg = model if not isinstance(model, dict) else build_config(
        {**model, **({"vocab_size": vocab_size} if vocab_size else {})}
    )
    return build_model(cfg)


def _block_size(model_cfg) -> int:
    return getattr(model_cfg, "block_size", None) or 64  # models without a context still read windows


def train(
    config: str | Path | RunConfig,
    overrides: list[str] = (),
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks=(),
) -> tuple[Path, FitResult]:
    """Train a run from a TOML config (or RunConfig); returns the run folder and the fit result."""
    rc = config if isinstance(config, RunConfig) else resolve_config(config, overrides)
    run_dir = rc.run_dir
    section = dict(rc.model)
    family = MODELS.get(section.get("family"))
    if family.modality != "text":
        raise ConfigError(f"family {family.name} trains on images, which this version does not provide yet")
    tokenizer = None
    if resume:
        saved = ckpt.read_json(run_dir / ckpt.TRAIN_CONFIG, "run's train config")
        _check_resume_compatible(saved, to_dict(rc))
        tokenizer = load_tokenizer(run_dir / ckpt.TOKENIZER)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite "
                              "to replace it, or --set name=<new name>")
        shutil.rmtree(run_dir)
    model_cfg0 = build_config({**section, "vocab_size": section.get("vocab_size", 1)})
    data, tokenizer, _ = prepare_text_data(rc.data, _block_size(model_cfg0), tokenizer)
    given = section.get("vocab_size")
    if given not in (None, 0, tokenizer.vocab_size):
        raise ConfigError(f"model.vocab_size={given} but the tokenizer has {tokenizer.vocab_size} tokens; "
                          "leave model.vocab_size unset")
    model_cfg = replace(model_cfg0, vocab_size=tokenizer.vocab_size)
    with torch.random.fork_rng(devices=[]):  # the seed fixes the initial weights too
        torch.manual_seed(rc.seed)
        model = build_model(model_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        ckpt.atomic_write_json(run_dir / ckpt.TRAIN_CONFIG, to_dict(rc))
        save_tokenizer(tokenizer, run_dir / ckpt.TOKENIZER)
        ckpt.write_model_config(run_dir, model_cfg.family, config_dict(model_cfg))
    log.info("training %s (%s) in %s", rc.name, model_cfg.family, run_dir)
    result = fit(model, data, rc.train, run_dir=run_dir, seed=rc.seed, resume=resume, callbacks=callbacks)
    if resume:  # the budget may have been extended
        ckpt.atomic_write_json(run_dir / ckpt.TRAIN_CONFIG, to_dict(rc))
    return run_dir, result


_RESUMABLE_CHANGES = {"name", "out_dir", "train.max_steps", "train.max_minutes", "train.progress", "train.log_every"}


def _check_resume_compatible(saved: dict, now: dict) -> None:
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(now)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"cannot resume: the config differs from the run's saved one at {', '.join(diff)} "
                          f"(only {', '.join(sorted(_RESUMABLE_CHANGES))} may change)")


# ---------------------------------------------------------------- load / generate / eval


@dataclass
class Run:
    """A trained run loaded from its folder."""

    path: Path
    model: torch.nn.Module
    tokenizer: Tokenizer | None
    train_config: RunConfig | None

    @property
    def family(self) -> str:
        return self.model.config.family

    def start_id(self) -> int:
        """The token a prompt-less generation starts from: end-of-text (BPE) or a newline (chars)."""
        tok = self.tokenizer
        if getattr(tok, "kind", "") == "bpe":
            return tok._tok.token_to_id(tok.EOS)
        if getattr(tok, "kind", "") == "char" and "\n" in tok.chars:
            return tok.chars.index("\n")
        return 0

    def eos_id(self) -> int | None:
        tok = self.tokenizer
        return tok._tok.token_to_id(tok.EOS) if getattr(tok, "kind", "") == "bpe" else None


def load(path: str | Path) -> Run:
    """Load a run folder (config.json + model.safetensors [+ tokenizer.json, train_config.json])."""
    path = Path(path)
    saved = ckpt.read_model_config(path)
    try:
        cfg = config_from_saved(saved["family"], saved["model"])
    except ConfigError as e:
        raise CheckpointError(f"{path / ckpt.CONFIG}: {e}") from None
    model = build_model(cfg)
    ckpt.load_weights(path / ckpt.WEIGHTS, model)
    model.eval()
    tok = load_tokenizer(path / ckpt.TOKENIZER) if (path / ckpt.TOKENIZER).exists() else None
    rc = None
    if (path / ckpt.TRAIN_CONFIG).exists():
        rc = from_dict(RunConfig, ckpt.read_json(path / ckpt.TRAIN_CONFIG, "train config"))
    return Run(path, model, tok, rc)


def num_params(model) -> int:
    """Trainable parameters, or the model's own count where it has one (the n-gram's stored statistics)."""
    if hasattr(model, "num_params"):
        return int(model.num_params())
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load(run)


def generate(
    run: Run | str | Path,
    prompt: str | list[str] = "",
    *,
    n: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stream: bool = False,
    **controls,
) -> list[str] | Iterator[TextDelta]:
    """Continue `prompt` (or each of a list) `n` times. Controls: max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, stop. With `stream=True`, an iterator of `TextDelta(index, text, done)`."""
    run = _as_run(run)
    if run.tokenizer is None:
        raise CheckpointError(f"{run.path} has no tokenizer.json: it is not a language-model run")
    if not isinstance(n, int) or n < 1 or n > 10_000:
        raise ConfigError(f"n={n!r} must be an integer in [1, 10000]")
    if "stop" in controls and controls["stop"] is not None:
        stop = controls["stop"]
        controls["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    cfg = SamplingConfig(**{k: v for k, v in controls.items() if v is not None})
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = [p for p in prompts for _ in range(n)]
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    kw = dict(generator=generator, start_id=run.start_id(), eos_id=run.eos_id())
    if stream:
        return stream_text(run.model, run.tokenizer, batch, cfg, **kw)
    return generate_text(run.model, run.tokenizer, batch, cfg, **kw)


def sample(run: Run | str | Path, n: int = 1, *, seed: int | None = None, **controls):
    """Unconditional samples: text for language models."""
    return generate(run, "", n=n, seed=seed, **controls)


def evaluate(run: Run | str | Path, *, max_tokens: int | None = None) -> dict[str, Any]:
    """Held-out loss (nats/token), perplexity and bits per token and per character, on the run's own split."""
    run = _as_run(run)
    if run.train_config is None or run.tokenizer is None:
        raise CheckpointError(f"{run.path} lacks train_config.json or tokenizer.json; cannot find its held-out data")
    rc = run.train_config
    t0 = time.perf_counter()
    data, _, splits = prepare_text_data(rc.data, _block_size(run.model.config), run.tokenizer)
    batches = data.eval_batches(64)
    n_tokens = sum(b[1].numel() for b in batches)
    if max_tokens is not None:
        batches = data.eval_batches(64, max(1, max_tokens // (64 * data.block_size)))
        n_tokens = sum(b[1].numel() for b in batches)
    loss = evaluate_loss(run.model, batches)
    covered = n_tokens / max(len(data.val_ids) - 1, 1)
    chars_per_token = len(splits.val) / max(len(data.val_ids), 1)
    return {
        "run": str(run.path),
        "family": run.family,
        "parameters": num_params(run.model),
        "heldout_tokens": n_tokens,
        "heldout_fraction_covered": round(covered, 4),
        "loss_nats_per_token": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bits_per_char": loss / math.log(2) / chars_per_token,
        "tokenizer": run.tokenizer.kind,
        "context": data.block_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }
