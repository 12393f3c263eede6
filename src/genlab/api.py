"""The one facade that cli.py (and later the server) call. It wires data -> model -> fit -> checkpoint ->
generate/eval, and holds no model logic of its own."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .core import checkpoint as ckpt
from .core import runtime
from .core.config import apply_overrides, from_dict, load_toml, to_dict
from .core.errors import CheckpointError, ConfigError, DataError
from .core.protocols import HasClosedFormFit, HasELBO, HasLogProb
from .data.datasets import DataConfig, ImageData, TextSplits, TokenData, load_images, load_text
from .data.tokenizers import Tokenizer, load_tokenizer, save_tokenizer, train_tokenizer
from .models import MODELS, build_config, build_model, config_dict, config_from_saved, replace
from .sampling.image import read_image, save_grid
from .sampling.text import SamplingConfig, TextDelta, generate_text, stream_text
from .training import distributed
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
    preview: int = 36  # image families: a grid of this many samples is written to samples/ at every evaluation

    def validate(self):
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name={self.name!r} must be a plain folder name")
        if not 0 <= self.preview <= 256:
            raise ConfigError(f"preview={self.preview} must be in [0, 256] (0 = no sample grids while training)")
        fam = MODELS.get(self.model.get("family") or "")
        build_config({**_PLACEHOLDERS[fam.modality], **self.model})  # checks family, preset, keys and values
        if self.data.kind != fam.modality:
            raise ConfigError(f"model.family={fam.name!r} learns {fam.modality} but data.source={self.data.source!r} "
                              f"is {self.data.kind}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# values the data fills in, used only to check a model section before the data is read
_PLACEHOLDERS = {"text": {"vocab_size": 1}, "image": {"num_classes": 10}}


def resolve_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """A RunConfig from a TOML file (or `base`) plus `--set key=value` overrides, checked strictly."""
    d = load_toml(path) if path is not None else dict(base or {})
    apply_overrides(d, list(overrides))
    return from_dict(RunConfig, d)


# ---------------------------------------------------------------- data


def load_dataset(source: str | DataConfig = "shakespeare", **kw) -> TextSplits | ImageData:
    """A source as train/held-out splits: text (`load_dataset("shakespeare").train[:100]`) or images
    (`load_dataset("fashion-mnist").train.x`, uint8 (N, C, H, W))."""
    cfg = source if isinstance(source, DataConfig) else from_dict(DataConfig, {"source": source, **kw})
    return load_images(cfg) if cfg.kind == "image" else load_text(cfg)


def _image_model_config(section: dict, data: ImageData):
    """The model config with channels, image size and classes taken from the data (a clash is an error)."""
    found = {"channels": data.channels, "image_size": data.image_size, "num_classes": data.num_classes}
    for key, value in found.items():
        given = section.get(key)
        if key != "num_classes" and given not in (None, 0, value):
            fix = ("set data.channels to convert the images" if key == "channels"
                   else "set data.image_size and data.resize=true to resize them")
            raise ConfigError(f"model.{key}={given} but the {data.source} images have {key} {value}; {fix}, "
                              f"or leave model.{key} unset")
    if section.get("conditional") and not data.num_classes:
        raise ConfigError(f"model.conditional=true needs class labels, and {data.source} has none (put the images "
                          "in one sub-folder per class, or give labels 'y' in the .npz)")
    return build_config({**section, **found})


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


def _resume_config(config: str | Path | RunConfig | None, overrides: list[str], resume: bool | str | Path):
    """The config a resumed run continues with: the run's own saved train_config.json, plus `overrides` (which
    may change only the budget, logging and threads). The run is `resume` when that is a folder, else the one
    `config` (+ overrides such as name=...) names."""
    if isinstance(config, RunConfig):
        return config  # a whole config in Python: it must match the saved one (checked by the caller)
    if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
        if config is not None:
            raise ConfigError("give either a config or the run folder to resume, not both")
        run_dir = Path(resume)
    elif config is None:
        raise ConfigError("resume needs the run folder (genlab train --resume runs/NAME) or its config")
    else:
        run_dir = from_dict(RunConfig, _located(config, overrides)).run_dir
    saved = ckpt.read_json(run_dir / ckpt.TRAIN_CONFIG, "run's train config (is it a run folder?)")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{run_dir / ckpt.TRAIN_CONFIG} is not a genlab run config")
    d = {**saved, "name": run_dir.name, "out_dir": str(run_dir.parent)}  # the folder may have been moved
    apply_overrides(d, [o for o in overrides if o.split("=", 1)[0].strip() not in ("name", "out_dir")])
    return from_dict(RunConfig, d)


def _located(config: str | Path, overrides: list[str]) -> dict:
    """The config file with only the overrides that say where the run is (name, out_dir)."""
    d = load_toml(config)
    apply_overrides(d, [o for o in overrides if o.split("=", 1)[0].strip() in ("name", "out_dir")])
    return d


def train(
    config: str | Path | RunConfig | None = None,
    overrides: list[str] = (),
    *,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    callbacks=(),
) -> tuple[Path, FitResult]:
    """Train a run from a TOML config (or RunConfig); returns the run folder and the fit result.

    `resume=True` continues the run the config names (its `name`, or `overrides` such as `name=austen`);
    `resume="runs/NAME"` continues that run folder without a config. A resumed run keeps its own saved config:
    `overrides` may extend the budget (train.max_steps, train.max_minutes) or change logging and threads.
    `overwrite=True` replaces an existing run folder (give each run its own `name=` to keep it)."""
    if resume:
        rc = _resume_config(config, list(overrides), resume)
    elif config is None:
        raise ConfigError("train needs a config (a TOML file or a RunConfig)")
    else:
        rc = config if isinstance(config, RunConfig) else resolve_config(config, overrides)
    run_dir = rc.run_dir
    section = dict(rc.model)
    family = MODELS.get(section.get("family"))
    tokenizer = None
    distributed.setup()  # under torchrun: join the other processes (training/distributed.py)
    with distributed.main_first():  # rank 0 checks and prepares the run folder; the others then read it
        model, data, callbacks = _prepare_training(rc, run_dir, section, family, tokenizer, resume, overwrite,
                                                   list(callbacks))
    result = fit(model, data, rc.train, run_dir=run_dir, seed=rc.seed, resume=resume, callbacks=callbacks)
    if resume and distributed.is_main():  # the budget may have been extended
        ckpt.atomic_write_json(run_dir / ckpt.TRAIN_CONFIG, to_dict(rc))
    return run_dir, result


def _prepare_training(rc, run_dir, section, family, tokenizer, resume, overwrite, callbacks):
    main = distributed.is_main()
    if resume:
        saved = ckpt.read_json(run_dir / ckpt.TRAIN_CONFIG, "run's train config")
        if (run_dir / ckpt.CONFIG).is_file() and "quantization" in ckpt.read_model_config(run_dir):
            raise ConfigError(f"{run_dir} is a quantized run (inference only): it cannot be trained; resume the "
                              "full-precision run it was made from")
        _check_resume_compatible(saved, to_dict(rc))
        if family.modality == "text":
            tokenizer = load_tokenizer(run_dir / ckpt.TOKENIZER)
    elif not main:  # rank 0 has made the folder: read its tokenizer rather than train another
        if family.modality == "text":
            tokenizer = load_tokenizer(run_dir / ckpt.TOKENIZER)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite "
                              "to replace it, or --set name=<new name>")
        log.info("replacing the existing run folder %s (overwrite)", run_dir)
        shutil.rmtree(run_dir)
    if rc.train.threads and runtime.threads_from_env() is None:
        torch.set_num_threads(rc.train.threads)
    runtime.warn_if_loaded()
    class_names = None
    if family.modality == "text":
        model_cfg0 = build_config({**section, "vocab_size": section.get("vocab_size", 1)})
        data, tokenizer, _ = prepare_text_data(rc.data, _block_size(model_cfg0), tokenizer)
        given = section.get("vocab_size")
        if given not in (None, 0, tokenizer.vocab_size):
            raise ConfigError(f"model.vocab_size={given} but the tokenizer has {tokenizer.vocab_size} tokens; "
                              "leave model.vocab_size unset")
        model_cfg = replace(model_cfg0, vocab_size=tokenizer.vocab_size)
    else:
        data = load_images(rc.data)
        log.info("data: %s", data.describe())
        model_cfg = _image_model_config(section, data)
        class_names = data.class_names if data.num_classes else None
        if rc.preview:
            callbacks.append(_Preview(run_dir / "samples", rc.preview, class_names))
    with torch.random.fork_rng(devices=[]):  # the seed fixes the initial weights too
        torch.manual_seed(rc.seed)
        model = build_model(model_cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and main:
        ckpt.atomic_write_json(run_dir / ckpt.TRAIN_CONFIG, to_dict(rc))
        if tokenizer is not None:
            save_tokenizer(tokenizer, run_dir / ckpt.TOKENIZER)
        ckpt.write_model_config(run_dir, model_cfg.family, config_dict(model_cfg),
                                class_names=class_names)
    if isinstance(model, HasClosedFormFit):
        log.info("fitting %s (%s, counted in closed form) in %s", rc.name, model_cfg.family, run_dir)
    else:
        log.info("training %s (%s, %s parameters) in %s", rc.name, model_cfg.family, f"{num_params(model):,}",
                 run_dir)
    return model, data, callbacks


class _Preview:
    """Writes a grid of samples (the same latents each time, seed 0) after every evaluation while training; a
    class-conditional model gets one column per class, named under the grid."""

    def __init__(self, folder: Path, n: int, class_names: list[str] | None = None):
        self.folder, self.n, self.class_names = folder, n, class_names

    def on_eval(self, step: int, model, val_loss: float) -> None:
        names = self.class_names if getattr(model.config, "conditional", False) else None
        images = model.sample(self.n, generator=torch.Generator().manual_seed(0))  # labels cycle the classes
        nrow = min(len(names), self.n) if names else None
        captions = [names[i % len(names)] for i in range(self.n)] if names else None
        from . import __version__

        meta = {"generator": "genlab", "genlab_version": __version__, "run": self.folder.parent.name,
                "family": model.config.family, "content": "training preview", "step": step, "seed": 0}
        save_grid(images, self.folder / f"step_{step:07d}.png", nrow=nrow, captions=captions, metadata=meta)
        save_grid(images, self.folder / "latest.png", nrow=nrow, captions=captions, metadata=meta)


_RESUMABLE_CHANGES = {"name", "out_dir", "train.max_steps", "train.max_minutes", "train.progress", "train.log_every",
                      "train.threads", "preview"}


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
    class_names: list[str] | None = None  # an image run's classes, in label order (where its data named them)
    adapter: Path | None = None  # the LoRA adapter on the model, where one was loaded

    @property
    def family(self) -> str:
        return self.model.config.family

    @property
    def modality(self) -> str:
        return MODELS.get(self.family).modality

    def start_id(self) -> int:
        """The token a prompt-less generation starts from: end-of-text (BPE) or a newline (chars)."""
        tok = self.tokenizer
        if getattr(tok, "kind", "") == "bpe":
            return tok._tok.token_to_id(tok.EOS)
        if getattr(tok, "kind", "") == "char" and "\n" in tok.chars:
            return tok.chars.index("\n")
        return 0

    def eos_id(self) -> int | None:
        """The end-of-text token: an imported model's own eos_token, else <|endoftext|> (BPE); None for chars."""
        ids = self.eos_ids()
        return ids[0] if ids else None

    def eos_ids(self) -> list[int]:
        """Every token that ends a sample: an imported model's eos_token and its generation config's
        eos_token_id(s); <|endoftext|> for genlab's own BPE runs; none for a character vocabulary."""
        from .data.chat import GENERATION_CONFIG, TOKENIZER_CONFIG, _token_text

        tok = self.tokenizer
        if getattr(tok, "kind", "") != "bpe":
            return []
        ids: list[int] = []
        tcfg = ckpt.read_json(self.path / TOKENIZER_CONFIG, "tokenizer config") \
            if (self.path / TOKENIZER_CONFIG).is_file() else {}
        gcfg = ckpt.read_json(self.path / GENERATION_CONFIG, "generation config") \
            if (self.path / GENERATION_CONFIG).is_file() else {}
        name = _token_text(tcfg.get("eos_token"))
        if name is not None and tok._tok.token_to_id(name) is not None:
            ids.append(tok._tok.token_to_id(name))
        extra = gcfg.get("eos_token_id")
        for i in extra if isinstance(extra, list) else [extra]:
            if isinstance(i, int) and 0 <= i < tok.vocab_size and i not in ids:
                ids.append(i)
        if not tcfg and not gcfg and tok._tok.token_to_id(tok.EOS) is not None:
            ids.append(tok._tok.token_to_id(tok.EOS))
        return ids

    def turn_end_ids(self, template) -> list[int]:
        """eos_ids plus the token that ends an assistant turn in `template` (a chat template, or None)."""
        ids = self.eos_ids()
        for t in template.stop_tokens() if template is not None else []:
            i = self.tokenizer._tok.token_to_id(t)
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    def chat_template(self):
        """The run's chat template (`genlab.data.chat.ChatTemplate`), or None: a model trained on raw text."""
        from .data.chat import ChatTemplate

        return ChatTemplate.from_run(self.path) if self.tokenizer is not None else None


def load(path: str | Path, adapter: str | Path | None = None) -> Run:
    """Load a run folder (config.json + model.safetensors [+ tokenizer.json, train_config.json]); `adapter` puts
    one of its LoRA adapters (a name under adapters/, or an adapter folder) on the model."""
    path = Path(path)
    if adapter is not None:
        return load_adapter(load(path), adapter)
    saved = ckpt.read_model_config(path)
    try:
        cfg = config_from_saved(saved["family"], saved["model"])
    except ConfigError as e:
        raise CheckpointError(f"{path / ckpt.CONFIG}: {e}") from None
    quant = saved.get("quantization")
    if quant is None:
        model = build_model(cfg)
    else:  # the structure without initialising full-precision weights, then the quantized layers in place
        from .adapt.quantize import quantize_model

        if not isinstance(quant, dict) or "method" not in quant:
            raise CheckpointError(f"{path / ckpt.CONFIG}: 'quantization' must be {{'method': ..., 'group_size': ...}}")
        with torch.device("meta"):
            model = build_model(cfg)
        try:
            quantize_model(model, quant["method"], quant.get("group_size"), empty=True)
        except ConfigError as e:
            raise CheckpointError(f"{path / ckpt.CONFIG}: {e}") from None
        model.to_empty(device="cpu")
    ckpt.load_weights(path / ckpt.WEIGHTS, model)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise CheckpointError(f"{path / ckpt.WEIGHTS} holds NaN or infinite weights ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): the run diverged; retrain it or use an earlier copy")
    model.eval()
    tok = load_tokenizer(path / ckpt.TOKENIZER) if (path / ckpt.TOKENIZER).exists() else None
    rc = None
    if (path / ckpt.TRAIN_CONFIG).exists():
        rc = from_dict(RunConfig, ckpt.read_json(path / ckpt.TRAIN_CONFIG, "train config"))
    names = saved.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != getattr(cfg, "num_classes", -1)):
        raise CheckpointError(f"{path / ckpt.CONFIG}: class_names must list the model's {cfg.num_classes} classes")
    return Run(path, model, tok, rc, names)


def num_params(model) -> int:
    """Trainable parameters, or the model's own count where it has one (the n-gram's stored statistics); a
    quantized layer counts the weights it stands for."""
    quantized = sum(m.in_features * m.out_features + (0 if m.bias is None else m.out_features)
                    for m in model.modules() if getattr(m, "quantized", False) and hasattr(m, "in_features"))
    if hasattr(model, "num_params"):
        return int(model.num_params()) + quantized
    return sum(p.numel() for p in model.parameters() if p.requires_grad) + quantized


def quantize(run: Run | str | Path, out: str | Path, *, method: str = "int8", group_size: int | None = None,
             overwrite: bool = False) -> Path:
    """Write a quantized copy of a gpt or llama run to `out` (adapt/quantize.py: weight-only int8 per row, or
    int4 in groups of `group_size` inputs, default 32): config.json records the method; the tokenizer, chat
    template and train config come along. Loaded by `load` like any run; training refuses it."""
    from .adapt.hf import check_run_target
    from .adapt.quantize import check, is_quantized, quantize_model

    group_size = check(method, group_size)
    run = _as_run(run)
    if run.family not in ("gpt", "llama"):
        raise ConfigError(f"quantization is for gpt and llama runs; {run.path} is {run.family!r}")
    if is_quantized(run.model):
        raise ConfigError(f"{run.path} is already quantized; quantize the full-precision run")
    out = check_run_target(out, overwrite)
    if out == run.path.resolve():
        raise ConfigError("the quantized run must go to another folder than the run it is made from")
    model = quantize_model(run.model, method, group_size)
    with ckpt.replacing_folder(out) as tmp:
        ckpt.write_model_config(tmp, run.family, config_dict(model.config),
                                quantization={"method": method, "group_size": group_size})
        ckpt.save_weights(tmp / ckpt.WEIGHTS, model, metadata={"quantized_from": str(run.path), "method": method})
        for f in sorted(run.path.iterdir()):
            if f.name in (ckpt.TOKENIZER, ckpt.TRAIN_CONFIG) or (f.name.startswith("hf_") and f.suffix == ".json"):
                shutil.copyfile(f, tmp / f.name)
    return out


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else load(run)


def _text_controls(run: Run, n, controls: dict) -> dict:
    """generate's and chat's controls checked for the run, None values dropped, `stop` as a tuple."""
    _check_options(run, controls)
    if not isinstance(n, int) or n < 1 or n > 10_000:
        raise ConfigError(f"n={n!r} must be an integer in [1, 10000]")
    controls = {k: v for k, v in controls.items() if v is not None}
    if "stop" in controls:
        controls["stop"] = (controls["stop"],) if isinstance(controls["stop"], str) else tuple(controls["stop"])
    return controls


def generate(
    run: Run | str | Path,
    prompt: str | list[str] = "",
    *,
    n: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stream: bool = False,
    guard=None,
    **controls,
) -> list[str] | Iterator[TextDelta]:
    """Continue `prompt` (or each of a list) `n` times. Controls: max_new_tokens, temperature, top_k, top_p,
    repetition_penalty, stop. Returns the continuations only, without the prompt (`genlab generate` on the command
    line prints prompt + continuation). With `stream=True`, an iterator of `TextDelta(index, text, done)`.
    `guard`: guardrails (True for the default checks, a TOML path, or a `safety.guardrails.Guardrails`): the
    prompt is checked (refused: `GuardrailRefusal`; redacted: the model sees the redacted prompt) and so is the
    output (a stream is released a line or sentence at a time, see `Guardrails.stream`)."""
    run = _as_run(run)
    if run.tokenizer is None:
        raise CheckpointError(f"{run.path} has no tokenizer.json: it is not a language-model run")
    controls = _text_controls(run, n, controls)
    cfg = SamplingConfig(**controls)
    guard = _guardrails(guard)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if guard is not None:
        prompts = [guard.enforce(p, "input") for p in prompts]
    batch = [p for p in prompts for _ in range(n)]
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    kw = {"generator": generator, "start_id": run.start_id(), "eos_id": run.eos_id()}
    if stream:
        it = stream_text(run.model, run.tokenizer, batch, cfg, **kw)
        return it if guard is None else guard.stream(it, "output")
    out = generate_text(run.model, run.tokenizer, batch, cfg, **kw)
    return out if guard is None else [guard.enforce(t, "output") for t in out]


def _guardrails(guard):
    """`guard=` of generate, chat and rag_ask as a `Guardrails` (or None); safety/ is imported only when used."""
    if guard is None or guard is False:
        return None
    from .safety.guardrails import as_guardrails

    return as_guardrails(guard)


def chat(
    run: Run | str | Path,
    messages: list[dict[str, str]],
    *,
    n: int = 1,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stream: bool = False,
    guard=None,
    **controls,
) -> str | list[str] | Iterator[TextDelta]:
    """The assistant's reply to an OpenAI-style conversation `messages` ([{"role": "system"|"user"|"assistant",
    "content": ...}, ...]), rendered with the run's own chat template. Same controls as `generate`
    (max_new_tokens defaults to 512 here, or what a short context leaves); the reply ends at the model's end-of-turn token. Returns the reply
    text (a list of `n` replies when n > 1), or with `stream=True` an iterator of `TextDelta`s. When the
    conversation is longer than the context, the oldest turns after the system prompt are left out (logged).
    `guard`: as `generate`; every user message is checked as input, the reply as output."""
    run = _as_run(run)
    if run.tokenizer is None or run.modality != "text":
        raise ConfigError(f"{run.path} is not a language-model run: there is nothing to chat with")
    template = run.chat_template()
    if template is None:
        raise ConfigError(f"{run.path} has no chat template: it is a plain language model that continues text "
                          f"({run.family}, trained on raw text), not an assistant. Use `genlab generate` with a "
                          "prompt, or chat with an instruct model: genlab import smollm2 runs/smollm2")
    controls = _text_controls(run, n, controls)
    cfg = SamplingConfig(**controls)  # checks the controls before any work
    guard = _guardrails(guard)
    if guard is not None:
        messages = [{**m, "content": guard.enforce(m["content"], "input")}
                    if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str) else m
                    for m in messages]
    ctx = run.model.context_size or 10**9
    if "max_new_tokens" in controls:
        ids = _chat_prompt(run, template, messages, cfg.max_new_tokens)
    else:  # up to 512 new tokens, fewer where the context is short: what the prompt leaves of it
        ids = _chat_prompt(run, template, messages, min(512, ctx // 2))
        cfg = replace(cfg, max_new_tokens=min(512, ctx - len(ids)))
    eos = run.turn_end_ids(template)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    it = stream_text(run.model, run.tokenizer, [ids] * n, cfg, generator=generator, eos_id=eos)
    if guard is not None:
        it = guard.stream(it, "output")
    if stream:
        return it
    out = [""] * n
    for d in it:
        out[d.index] += d.text
    return out[0] if n == 1 else out


def detect_watermark(text: str, run_or_tokenizer: Run | str | Path, key: str | int, **settings):
    """Test `text` for the green-list watermark of `key` (Kirchenbauer et al. 2023) -> `WatermarkResult` (z-score,
    one-sided p-value, tokens scored, verdict). `run_or_tokenizer`: a loaded run, a run folder (only its
    tokenizer.json and config.json are read) or a tokenizer.json file. Settings: gamma, context_width, hashing
    (the scheme's, as at generation; delta is not needed), fpr (default 1e-3), min_tokens, ignore_repeated,
    vocab_size (the model's logits width; read from the run, else the tokenizer's)."""
    from .sampling.watermark import WatermarkConfig, detect_text

    scheme = {k: settings.pop(k) for k in ("gamma", "delta", "context_width", "hashing") if k in settings}
    cfg = WatermarkConfig(key=key, **scheme)
    vocab = settings.pop("vocab_size", None)
    if isinstance(run_or_tokenizer, Run):
        tok, vocab = run_or_tokenizer.tokenizer, vocab or getattr(run_or_tokenizer.model.config, "vocab_size", None)
        where = run_or_tokenizer.path
    else:
        where = Path(run_or_tokenizer)
        if where.is_dir():
            if not (where / ckpt.TOKENIZER).is_file():
                raise CheckpointError(f"{where} has no tokenizer.json: it is not a language-model run")
            saved = ckpt.read_model_config(where)
            vocab = vocab or (saved.get("model") or {}).get("vocab_size") or None
            tok = load_tokenizer(where / ckpt.TOKENIZER)
        elif where.is_file():
            tok = load_tokenizer(where)
        else:
            raise CheckpointError(f"{where}: no such run folder or tokenizer.json (the run whose tokenizer made the "
                                  "text; SmolLM2 is imported with: genlab import smollm2 runs/smollm2)")
    if tok is None:
        raise CheckpointError(f"{where} has no tokenizer: it is not a language-model run")
    if unknown := sorted(set(settings) - {"fpr", "min_tokens", "ignore_repeated"}):
        raise ConfigError(f"unknown watermark detection setting(s) {unknown}; known: context_width, fpr, gamma, "
                          "hashing, ignore_repeated, min_tokens, vocab_size")
    return detect_text(text, tok, cfg, vocab_size=vocab, **settings)


def _chat_prompt(run: Run, template, messages, max_new_tokens: int) -> list[int]:
    """The rendered conversation as token ids; the oldest turns after a system prompt are dropped until the prompt
    and the reply fit the context."""
    from .data.chat import check_messages

    messages = check_messages(messages)
    ctx = run.model.context_size or 10**9
    keep_first = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = run.tokenizer.encode(template.render(messages), add_special_tokens=False)
        if len(ids) + max_new_tokens <= ctx or len(messages) - keep_first <= 1:
            break
        messages = messages[:keep_first] + messages[keep_first + 1:]
        dropped += 1
    if len(ids) + max_new_tokens > ctx:
        raise ConfigError(f"the last message and the reply ({len(ids)} + max_new_tokens {max_new_tokens} tokens) do "
                          f"not fit the model's context of {ctx} tokens: shorten the message or max_new_tokens")
    if dropped:
        log.info("the conversation is longer than the context (%d tokens): left out its %d oldest turns", ctx, dropped)
    return ids


def sample(
    run: Run | str | Path,
    n: int = 1,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    labels: list[int] | torch.Tensor | None = None,
    **controls,
):
    """`n` samples: a list of texts for language models, uint8 images (n, C, H, W) for image families.
    Image controls: `temperature` (latent / pixel temperature; 0 = the mode), `labels` (class ids, for
    class-conditional runs; default cycles through the classes), and the family's own (see its docstring):
    diffusion takes `sampler`, `steps`, `schedule`, `guidance`, `eta`, `precision` and `callback`."""
    run = _as_run(run)
    controls = {k: v for k, v in controls.items() if v is not None}
    if run.modality == "text":
        if labels is not None:
            raise ConfigError("labels apply to class-conditional image runs, not to language models")
        return generate(run, "", n=n, seed=seed, generator=generator, **controls)
    _check_options(run, controls)
    if not isinstance(n, int) or not 1 <= n <= 10_000:
        raise ConfigError(f"n={n!r} must be an integer in [1, 10000]")
    cfg = run.model.config
    t = controls.get("temperature")
    if t is not None and not 0 <= t <= 10:
        raise ConfigError(f"temperature={t} must be in [0, 10]")
    if labels is not None:
        labels = label_ids(run, labels)
        if len(labels) == 1:
            labels = labels.expand(n).clone()
        _check_labels(labels, n, cfg, run)
        controls["labels"] = labels
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    try:
        return run.model.sample(n, generator=generator, **controls)
    except TypeError as e:  # an option this family does not have
        raise ConfigError(f"{run.family} sampling: {e}") from None


def inpaint(
    run: Run | str | Path,
    image: str | Path | torch.Tensor,
    mask: str | Path | torch.Tensor,
    n: int = 1,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    labels: list[int] | torch.Tensor | None = None,
    **controls,
) -> torch.Tensor:
    """`n` completions of `image` (a PNG/JPEG path or uint8 (C, H, W)) by a diffusion run. `mask` (a path or a
    (H, W) tensor): white (> 127, or true) marks the pixels to generate, black the pixels to keep exactly, as in
    common inpainting tools. Controls: sampler (default ddpm), steps (default every training step), schedule,
    guidance, resample (RePaint resampling, 1 = off). Returns uint8 (n, C, H, W)."""
    run = _as_run(run)
    if not hasattr(run.model, "inpaint"):
        raise ConfigError(f"{run.path} is a {run.family} run; inpainting needs a diffusion run")
    cfg = run.model.config
    if not isinstance(n, int) or not 1 <= n <= 1000:
        raise ConfigError(f"n={n!r} must be an integer in [1, 1000]")
    img = read_image(image, cfg.channels) if not isinstance(image, torch.Tensor) else image
    m = read_image(mask, 1)[0] > 127 if not isinstance(mask, torch.Tensor) else mask.bool()
    want = (cfg.image_size, cfg.image_size)
    if tuple(img.shape[-2:]) != want:
        raise ConfigError(f"the image is {img.shape[-1]}x{img.shape[-2]} but the model makes {want[0]}x{want[1]} "
                          "images")
    if tuple(m.shape) != tuple(img.shape[-2:]):
        raise ConfigError(f"the mask is {m.shape[-1]}x{m.shape[-2]} but the image is {img.shape[-1]}x{img.shape[-2]}")
    if not bool(m.any()):
        raise ConfigError("the mask is all black: there is nothing to generate (white marks the pixels to fill in)")
    if labels is not None:
        labels = label_ids(run, labels)
        labels = labels.expand(n).clone() if len(labels) == 1 else labels
        _check_labels(labels, n, cfg, run)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    controls = {k: v for k, v in controls.items() if v is not None}
    try:
        return run.model.inpaint(img, ~m, n, generator=generator, labels=labels, **controls)
    except TypeError as e:
        raise ConfigError(f"inpainting: {e}") from None


def _sample_options(fam) -> set[str]:
    """The sampling options a family takes (its `sample()` keywords; for language models the decoding controls)."""
    if fam.modality == "text":
        return {f.name for f in dataclasses.fields(SamplingConfig)}
    params = inspect.signature(fam.model_cls.sample).parameters
    return {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"generator", "labels"}


def _check_options(run: Run, controls: dict[str, Any]) -> None:
    """An option the run's family does not take is an error that says which families take it."""
    own = _sample_options(MODELS.get(run.family))
    for key in sorted(k for k in controls if k not in own):
        takers = [f for f in MODELS.names() if key in _sample_options(MODELS.get(f))]
        where = f"applies to {', '.join(takers)} runs only" if takers else "is not an option of any family"
        raise ConfigError(f"{key} (--{key.replace('_', '-')}) {where}; {run.path} is a {run.family} run, which "
                          f"takes {', '.join(sorted(own))}")


def label_ids(run: Run, labels) -> torch.Tensor:
    """Class labels as ids (k,): ids, or class names of the run (`["faces", "cats"]`, case-insensitive)."""
    if isinstance(labels, torch.Tensor):
        return labels.long().flatten()
    items = [labels] if isinstance(labels, (str, int)) else list(labels)
    names = [n.lower() for n in (run.class_names or [])]
    out = []
    for v in items:
        if isinstance(v, str) and not v.strip().lstrip("-").isdigit():
            if v.strip().lower() not in names:
                known = (f"its classes are {', '.join(run.class_names)}" if run.class_names
                         else "it has no class names, give class ids")
                raise ConfigError(f"unknown class {v!r} for {run.path}; {known}")
            out.append(names.index(v.strip().lower()))
        else:
            out.append(int(v))
    return torch.tensor(out, dtype=torch.long)


def _check_labels(labels: torch.Tensor, n: int, cfg, run: Run) -> None:
    if not getattr(cfg, "conditional", False):
        raise ConfigError(f"{run.path} is not class-conditional: it takes no labels")
    if len(labels) != n or int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
        names = f" or names ({', '.join(run.class_names)})" if run.class_names else ""
        raise ConfigError(f"labels must be {n} (or 1) class ids in [0, {cfg.num_classes - 1}]{names} (the classes "
                          f"this model was trained on); got {labels.tolist()[:12]}")


def evaluate(
    run: Run | str | Path,
    *,
    max_tokens: int | None = None,
    max_images: int | None = None,
    iwae_k: int = 16,
    batch_size: int = 250,
    pictures: bool = True,
) -> dict[str, Any]:
    """The run measured on its own held-out split. Text: loss (nats/token), perplexity, bits per token and per
    character. Images: bits per dimension, exact for flows and PixelCNN, the ELBO and the IWAE bound (k =
    `iwae_k`) for the VAE, none for a GAN (it has no likelihood); with `pictures`, families with an encoder
    also write eval_reconstructions.png (originals, reconstructions, an interpolation) into the run folder.
    `max_tokens` / `max_images` limit the held-out data (None or 0 = all of it). The result is written to
    eval.json in the run folder when it covers the whole held-out split, else to eval_partial.json (a partial
    evaluation never replaces a full one); `res["file"]` names it."""
    run = _as_run(run)
    if run.train_config is None:
        raise CheckpointError(f"{run.path} lacks train_config.json, so it has no held-out split of its own (an "
                              "imported model?); measure it on a text instead: genlab eval RUN --text FILE")
    for key, v in (("max_tokens", max_tokens), ("max_images", max_images)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"{key}={v!r} must be an integer >= 1, or 0 / None for the whole held-out split")
    res = (_evaluate_images(run, max_images or None, iwae_k, batch_size, pictures) if run.modality == "image"
           else _evaluate_text(run, max_tokens or None))
    path = run.path / ("eval.json" if res["heldout_fraction_covered"] >= 1 else "eval_partial.json")
    res["file"] = str(path)
    ckpt.atomic_write_json(path, res)
    return res


@torch.no_grad()
def perplexity(run: Run | str | Path, text: str, *, window: int | None = None, stride: int | None = None,
               max_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity of a language model on any `text`, e.g. text it was not trained on. Windows of `window` tokens
    (default: the context, at most 1024) move by `stride` (default: half a window); each token is scored once,
    with at least window - stride tokens before it once the first window is past: the sliding-window method of
    transformers' perplexity guide, so the two agree on the same model. The text's first token is not scored."""
    run = _as_run(run)
    if run.tokenizer is None or run.modality != "text":
        raise ConfigError(f"{run.path} is not a language-model run")
    ctx = run.model.context_size or 1024
    window = min(ctx, 1024) if window is None else window
    stride = max(window // 2, 1) if stride is None else stride
    if not 2 <= window <= ctx:
        raise ConfigError(f"window={window} must be in [2, {ctx}] (the model's context)")
    if not 1 <= stride <= window - 1:
        raise ConfigError(f"stride={stride} must be in [1, window - 1 = {window - 1}]")
    ids = run.tokenizer.encode(text, add_special_tokens=False) if run.tokenizer.kind == "bpe" \
        else run.tokenizer.encode(text)
    if max_tokens:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise ConfigError("the text is too short: it needs at least 2 tokens")
    x = torch.tensor(ids)
    nll, n, start = 0.0, 0, 0
    while True:
        end = min(start + window, len(ids))
        logits = run.model(x[start:end][None])[0, :-1].float()
        targets = x[start + 1 : end]
        first = 0 if start == 0 else window - stride - 1  # tokens already scored by the window before
        losses = F.cross_entropy(logits[first:], targets[first:], reduction="none")
        nll += float(losses.double().sum())
        n += losses.numel()
        if end == len(ids):
            break
        start += stride
    loss = nll / n
    return {"run": str(run.path), "tokens": n, "window": window, "stride": stride, "loss_nats_per_token": loss,
            "perplexity": math.exp(loss), "bits_per_token": loss / math.log(2),
            "bits_per_char": nll / math.log(2) / max(len(text), 1)}


def _evaluate_text(run: Run, max_tokens: int | None) -> dict[str, Any]:
    if run.tokenizer is None:
        raise CheckpointError(f"{run.path} lacks tokenizer.json: it cannot encode its held-out text")
    rc = run.train_config
    t0 = time.perf_counter()
    data, _, splits = prepare_text_data(rc.data, _block_size(run.model.config), run.tokenizer)
    full = sum(b[1].numel() for b in data.eval_batches(64))  # every whole window of the held-out split
    batches = data.eval_batches(64, max_tokens=max_tokens)
    n_tokens = sum(b[1].numel() for b in batches)
    loss = evaluate_loss(run.model, batches)
    covered = n_tokens / max(full, 1)
    chars_per_token = len(splits.val) / max(len(data.val_ids), 1)
    return {
        "run": str(run.path),
        "family": run.family,
        "parameters": num_params(run.model),
        "heldout_tokens": n_tokens,
        "heldout_tokens_total": full,
        "heldout_fraction_covered": round(covered, 6),
        "loss_nats_per_token": loss,
        "perplexity": math.exp(loss),
        "bits_per_token": loss / math.log(2),
        "bits_per_char": loss / math.log(2) / chars_per_token,
        "tokenizer": run.tokenizer.kind,
        "context": data.block_size,
        "seconds": round(time.perf_counter() - t0, 2),
    }


@torch.no_grad()
def _evaluate_images(run: Run, max_images: int | None, iwae_k: int, batch_size: int, pictures: bool):
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images={max_images} must be >= 1")
    if not 1 <= iwae_k <= 10_000:
        raise ConfigError(f"iwae_k={iwae_k} must be in [1, 10000]")
    t0 = time.perf_counter()
    model, cfg = run.model, run.model.config
    data = load_images(run.train_config.data)
    x_all, y_all = data.val.x[:max_images], data.val.y[:max_images]
    if tuple(x_all.shape[1:]) != (cfg.channels, cfg.image_size, cfg.image_size):
        raise CheckpointError(f"{run.path}: the model takes {cfg.channels}x{cfg.image_size}x{cfg.image_size} "
                              f"images but its data now gives {tuple(x_all.shape[1:])}")
    dims = x_all[0].numel()
    g = torch.Generator().manual_seed(0)  # fixed dequantization / posterior noise: the same number every time
    res: dict[str, Any] = {"run": str(run.path), "family": run.family, "parameters": num_params(model),
                           "data": data.describe(), "heldout_images": len(x_all), "heldout_images_total": len(data.val),
                           "heldout_fraction_covered": round(len(x_all) / len(data.val), 6), "dims": dims}
    bounds: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(x_all), batch_size):
        x = x_all[i : i + batch_size]
        y = y_all[i : i + batch_size] if getattr(cfg, "conditional", False) else None
        if isinstance(model, HasLogProb):
            bounds.setdefault("exact", []).append(model.log_prob(x, y=y, generator=g))
        elif isinstance(model, HasELBO):
            bounds.setdefault("elbo", []).append(model.elbo(x, k=1, y=y, generator=g))
            if iwae_k > 1:
                bounds.setdefault(f"iwae_{iwae_k}", []).append(model.elbo(x, k=iwae_k, y=y, generator=g))
    ln2 = math.log(2)
    for name, parts in bounds.items():
        lp = torch.cat(parts).double()
        res[f"bits_per_dim_{name}"] = float(-lp.mean() / (dims * ln2))
        res[f"nats_per_image_{name}"] = float(-lp.mean())
    if "exact" in bounds:
        res["bits_per_dim"] = res["bits_per_dim_exact"]
        res["likelihood"] = "exact log-likelihood" + (" of the uniformly dequantized data (a bound for the "
                                                      "8-bit images)" if run.family == "flow" else "")
    elif bounds:
        best = f"iwae_{iwae_k}" if iwae_k > 1 else "elbo"
        res["bits_per_dim"] = res[f"bits_per_dim_{best}"]
        res["likelihood"] = (f"upper bound on bits/dim: IWAE with k={iwae_k}" if iwae_k > 1 else "upper bound: ELBO")
    else:
        res["bits_per_dim"] = None
        res["likelihood"] = f"none: a {run.family} run gives no likelihood, so no bits/dim is reported"
    note = getattr(model, "likelihood_note", None)
    if note:
        res["likelihood"] += f" ({note})"
    if pictures and hasattr(model, "reconstruct") and len(x_all) >= 2:
        k = min(8, len(x_all))
        yk = y_all[:k] if getattr(cfg, "conditional", False) else None
        rec = model.reconstruct(x_all[:k], y=yk)
        interp = model.interpolate(x_all[0], x_all[1], steps=k, y=None if yk is None else yk[:1])
        res["pictures"] = str(save_grid(torch.cat([x_all[:k], rec, interp]), run.path / "eval_reconstructions.png",
                                        nrow=k))
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


# ---------------------------------------------------------------- adapting: fine-tuning, LoRA, merging


FULL_LR = 5e-5  # full fine-tuning's default learning rate (LoRA's is train.lr's default, 1e-3)
IMAGE_BATCH = 32  # an image run's default batch (a language model's is train.batch_size's default, 4 windows)


@dataclass
class FinetuneConfig:
    """A fine-tune as data: `--set` overrides any field (`r=16`, `train.lr=1e-4`, `block_size=512`)."""

    method: str = "lora"  # "lora" (a frozen base plus an adapter) or "full" (every weight trains)
    r: int = 8  # LoRA rank
    alpha: float = 16.0  # LoRA scale alpha / r
    dropout: float = 0.05  # on the adapter's input
    rslora: bool = False  # scale alpha / sqrt(r) (Kalajdzievski 2023)
    targets: list = field(default_factory=list)  # layer names/suffixes/wildcards; [] = the family's default
    block_size: int = 128  # tokens per training window (at most the base's context)
    val_fraction: float = 0.1
    seed: int = 1337
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size=4, lr=1e-3, warmup_steps=10, weight_decay=0.0, eval_every=50, eval_batches=10,
        checkpoint_every=100, min_lr_ratio=0.1))

    def validate(self):
        if self.method not in ("lora", "full"):
            raise ConfigError(f"method={self.method!r} unknown; known: lora, full")
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r={self.r!r}: the LoRA rank must be an integer >= 1")
        if self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.block_size < 2:
            raise ConfigError(f"block_size={self.block_size} must be >= 2")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 0.5)")


def _finetune_config(run: Run, config: FinetuneConfig | None, overrides: list[str]) -> FinetuneConfig:
    """`config` (or the defaults) with `overrides`; without a config, the defaults that depend on the run and the
    method: full fine-tuning at FULL_LR, image runs in batches of IMAGE_BATCH, unless the overrides set them."""
    d = to_dict(config or FinetuneConfig())
    apply_overrides(d, list(overrides))
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if config is None and d["method"] == "full" and "train.lr" not in given:
        d["train"]["lr"] = FULL_LR  # every weight moves: a LoRA learning rate would wreck the base
    if config is None and run.modality == "image" and "train.batch_size" not in given:
        d["train"]["batch_size"] = IMAGE_BATCH  # images are small: the text default (4 windows) is too few
    return from_dict(FinetuneConfig, d)


def _resumed_finetune_config(run: Run, name: str | None, out: str | Path | None, overrides: list[str]):
    """The settings an interrupted fine-tune was started with, plus `overrides` of its budget only."""
    from .adapt import lora as lora_io

    folder = Path(out) if out is not None else lora_io.adapter_dir(run.path, name or "adapter")
    saved = folder / "finetune_config.json"
    if not (folder / ckpt.TRAINER_STATE).is_file() or not saved.is_file():
        raise CheckpointError(f"cannot resume: {folder} holds no interrupted fine-tune (no {ckpt.TRAINER_STATE} "
                              "and finetune_config.json); start it without --resume")
    d = ckpt.read_json(saved, "fine-tune config")
    d.pop("base", None)
    d.pop("data", None)
    allowed = ("train.max_steps", "train.max_minutes", "train.progress", "train.log_every", "train.threads",
               "train.eval_every", "train.checkpoint_every")
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key not in allowed and key != "method":
            raise ConfigError(f"--resume keeps the fine-tune's settings; {key} cannot change (only "
                              f"{', '.join(allowed)})")
    apply_overrides(d, [o for o in overrides if not o.startswith("method=")])
    fc = from_dict(FinetuneConfig, d)
    given = [o.split("=", 1)[1].strip() for o in overrides if o.startswith("method=")]
    if given and given[-1] != fc.method:
        raise ConfigError(f"--resume: this fine-tune is {fc.method}, not {given[-1]}")
    return fc


def _finetune_data(run: Run, data: str | Path, block_size: int, val_fraction: float):
    """Chat/instruction JSONL -> ChatData (loss on assistant tokens); a text file, a folder of them or a built-in
    text corpus -> TokenData (continued pre-training, style)."""
    from .data.chat import ChatData, encode_conversation, read_chat_jsonl

    p = Path(str(data))
    if run.modality == "image":
        return _finetune_images(run, data, val_fraction)
    if p.suffix == ".jsonl":
        template = run.chat_template()
        if template is None:
            raise ConfigError(f"{run.path} has no chat template, so chat data cannot be laid out for it; fine-tune "
                              "an instruct model (genlab import smollm2) or give plain text")
        encode = (lambda t: run.tokenizer.encode(t, add_special_tokens=False)) \
            if getattr(run.tokenizer, "kind", "") == "bpe" else run.tokenizer.encode
        convs = [encode_conversation(template, encode, m) for m in read_chat_jsonl(p)]
        return ChatData(convs, block_size, val_fraction)
    cfg = DataConfig(source="text", path=str(p), val_fraction=val_fraction) if p.exists() else \
        DataConfig(source=str(data), val_fraction=val_fraction)
    cfg.validate()
    if cfg.kind != "text":
        raise ConfigError(f"{data}: fine-tuning a language model needs text (a .txt/.md file, a folder of them, a "
                          "chat .jsonl, or a built-in text corpus)")
    data_, _, _ = prepare_text_data(cfg, block_size, run.tokenizer)
    return data_


def _finetune_images(run: Run, data: str | Path, val_fraction: float) -> ImageData:
    """An image source for an image run: converted to the run's channels and resized to its size; a
    class-conditional run needs labels, as many classes as it has (class i of the new data takes label i)."""
    c = run.model.config
    p = Path(str(data))
    fields = {"source": "images", "path": str(p)} if p.exists() else {"source": str(data)}
    cfg = DataConfig(**fields, val_fraction=val_fraction, channels=c.channels, image_size=c.image_size, resize=True)
    cfg.validate()
    if cfg.kind != "image":
        raise ConfigError(f"{run.path} is an image model ({run.family}); {data} is text: give an image folder, an "
                          ".npz/.npy array or a built-in image source")
    images = load_images(cfg)
    want = getattr(c, "num_classes", 0)
    if want and images.num_classes != want:
        raise ConfigError(f"{run.path} is conditioned on {want} classes but {data} has "
                          f"{images.num_classes or 'no'} classes: fine-tune it on data with {want} labelled classes")
    return images


def finetune(base: Run | str | Path, data: str | Path, *, name: str | None = None, out: str | Path | None = None,
             config: FinetuneConfig | None = None, overrides: list[str] = (), overwrite: bool = False,
             resume: bool = False, callbacks=()) -> tuple[Path, FitResult]:
    """Adapt a run to `data` through the one `fit` loop (a language model to text or chat data, an image model to
    images of the same kind). LoRA (the default) freezes the base and
    writes only the adapter, to `base/adapters/<name>/` in peft's format; `method="full"` trains every weight
    and writes a new run to `out`. Returns the folder written and the fit result. A Run given as `base` is
    changed in place (its model carries the adapter, or the new weights, afterwards). `resume=True` continues an
    interrupted fine-tune (the adapter `name`, or the run in `out`) with its saved settings; `overrides` may extend
    its budget (train.max_steps, train.max_minutes)."""
    from .adapt import lora as lora_io
    from .adapt.quantize import is_quantized
    from .nn.lora import add_lora

    run = _as_run(base)
    if resume:
        fc = _resumed_finetune_config(run, name, out, overrides)
    else:
        fc = _finetune_config(run, config, overrides)
    distributed.setup()  # under torchrun: join the other processes; rank 0 writes the files
    main = distributed.is_main()
    if isinstance(run.model, HasClosedFormFit):
        raise ConfigError(f"{run.path} is a {run.family} model, counted in closed form: there are no weights to "
                          "fine-tune; train it again on the new data")
    block = min(fc.block_size, getattr(run.model, "context_size", fc.block_size))
    if fc.method == "full":
        if is_quantized(run.model):
            raise ConfigError(f"{run.path} is quantized: full fine-tuning needs the full-precision run (LoRA can "
                              "train over a quantized base)")
        if out is None:
            raise ConfigError("a full fine-tune writes a new run: give its folder (--out runs/NAME)")
        from .adapt.hf import check_run_target

        target = check_run_target(out, overwrite) if main and not resume else Path(out).resolve()
        if target == run.path.resolve():
            raise ConfigError("the fine-tuned run must go to another folder than its base")
    else:
        target = lora_io.adapter_dir(run.path, name or "adapter")
        if main and not resume and target.exists() and any(target.iterdir()) and not overwrite:
            raise ConfigError(f"adapter {target} exists; pass --overwrite to replace it or give another --name")
    data_ = _finetune_data(run, data, block, fc.val_fraction)
    model = run.model
    targets = list(fc.targets) or lora_io.default_targets(run.family, model)
    if fc.method == "lora":
        with torch.random.fork_rng(devices=[]):  # the seed fixes the adapter's initial A matrices
            torch.manual_seed(fc.seed)
            names = add_lora(model, targets, r=fc.r, alpha=fc.alpha, dropout=fc.dropout, rslora=fc.rslora)
        shown = ", ".join(targets) if len(targets) <= 8 else f"{len(targets)} named layers"
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA r=%d on %d layers (%s): %s trainable parameters, %.2f%% of the model", fc.r, len(names), shown,
                 f"{trainable:,}", 100 * trainable / sum(p.numel() for p in model.parameters()))

        def write(folder, m):
            lora_io.save_adapter(m, folder, r=fc.r, alpha=fc.alpha, dropout=fc.dropout, targets=targets,
                                 rslora=fc.rslora, family=run.family, base=str(run.path))
    else:
        model.requires_grad_(True)
        write = None
    if main and not resume:
        if overwrite and target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        if fc.method == "full":
            ckpt.write_model_config(target, run.family, config_dict(model.config), class_names=run.class_names)
            for f in sorted(run.path.iterdir()):
                if f.name == ckpt.TOKENIZER or (f.name.startswith("hf_") and f.suffix == ".json"):
                    shutil.copyfile(f, target / f.name)
        ckpt.atomic_write_json(target / "finetune_config.json",
                               {**to_dict(fc), "base": str(run.path), "data": str(data)})
    distributed.barrier()
    result = fit(model, data_, fc.train, run_dir=target, seed=fc.seed, resume=resume, callbacks=callbacks,
                 write_weights=write)
    if resume and main:  # the budget may have been extended
        ckpt.atomic_write_json(target / "finetune_config.json",
                               {**to_dict(fc), "base": str(run.path), "data": str(data)})
    model.eval()
    return target, result


def evaluate_loss_on(run: Run | str | Path, data: str | Path, overrides: list[str] = ()) -> float:
    """The run's held-out loss on the split `finetune` holds out of `data` (same windows, same batches): the
    "before" of a fine-tune."""
    run = _as_run(run)
    fc = _finetune_config(run, None, overrides)
    data_ = _finetune_data(run, data, min(fc.block_size, getattr(run.model, "context_size", fc.block_size)),
                           fc.val_fraction)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(fc.seed)  # the noise of a diffusion loss, drawn as the trainer's closing evaluation draws it
        return evaluate_loss(run.model, data_.eval_batches(fc.train.batch_size, fc.train.eval_batches))


def load_adapter(run: Run, adapter: str | Path) -> Run:
    """Put a LoRA adapter on a loaded run (in place): a name under the run's adapters/ or an adapter folder
    (genlab's or peft's)."""
    from .adapt import lora as lora_io

    folder = Path(adapter)
    if not (folder / lora_io.CONFIG).is_file():
        folder = lora_io.adapter_dir(run.path, str(adapter))
        if not folder.is_dir():
            known = lora_io.list_adapters(run.path)
            raise ConfigError(f"adapter {adapter!r} not found in {run.path / lora_io.ADAPTERS}; "
                              f"{'known: ' + ', '.join(known) if known else 'this run has none'}")
    lora_io.load_adapter(run.model, folder)
    run.model.eval()
    run.adapter = folder
    return run


def merge(run: Run | str | Path, adapter: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Fold a LoRA adapter into its base's weights and write the result as a new run (same tokenizer, template)."""
    from .adapt.hf import check_run_target
    from .adapt.quantize import is_quantized
    from .nn.lora import merge_lora

    run = _as_run(run)
    if is_quantized(run.model):
        raise ConfigError(f"{run.path} is quantized: merge the adapter into the full-precision run, then quantize")
    out = check_run_target(out, overwrite)
    if out == run.path.resolve():
        raise ConfigError("the merged run must go to another folder than its base")
    load_adapter(run, adapter)
    model = merge_lora(run.model)
    with ckpt.replacing_folder(out) as tmp:
        ckpt.write_model_config(tmp, run.family, config_dict(model.config), class_names=run.class_names)
        ckpt.save_weights(tmp / ckpt.WEIGHTS, model, metadata={"merged_from": str(run.path), "adapter": str(adapter)})
        for f in sorted(run.path.iterdir()):
            if f.name in (ckpt.TOKENIZER, ckpt.TRAIN_CONFIG) or (f.name.startswith("hf_") and f.suffix == ".json"):
                shutil.copyfile(f, tmp / f.name)
    return out


DEFAULT_TEMPLATES = ("zero_shot", "few_shot", "few_shot_similar", "chain_of_thought")


def prompt_eval(run: Run | str | Path, task: str | Path, templates=DEFAULT_TEMPLATES, *, limit: int | None = None,
                seed: int = 0, adapter: str | Path | None = None, scorings: tuple[str, ...] | None = None,
                embedder=None) -> list:
    """Score prompting templates on a task (`genlab.eval.prompting`): each template's share of the task's test
    items answered right, greedy, under each scoring (exact and contains; numeric too for a numeric task). `task` is
    a built-in task (capitals, antonyms) or a JSONL of {"input", "target"}; `templates` built-in names or TOML
    files. With `adapter`, the LoRA adapter is folded into the weights in memory first (the files are untouched).
    Returns a list of `TemplateResult`s."""
    from .adapt.quantize import is_quantized
    from .data.tasks import load_task
    from .eval import prompting
    from .nn.lora import merge_lora

    run = _as_run(run)
    if run.tokenizer is None or run.modality != "text":
        raise ConfigError(f"{run.path} is not a language-model run: prompting needs one")
    tpls = [prompting.load_template(t) for t in ([templates] if isinstance(templates, (str, Path)) else templates)]
    t = load_task(task)
    if adapter is not None:
        load_adapter(run, adapter)
        if not is_quantized(run.model):  # a merged layer decodes on the fast path
            merge_lora(run.model)
    scorings = tuple(scorings) if scorings else ("exact", "contains") + (("numeric",) if t.scoring == "numeric" else ())
    for s in scorings:
        if s not in prompting.SCORINGS:
            raise ConfigError(f"scoring {s!r} must be one of {', '.join(prompting.SCORINGS)}")
    template = run.chat_template()
    eos = run.turn_end_ids(template)
    if embedder is None and any(p.select == "similar" and p.k for p in tpls):
        embedder = prompting.Embedder()
    run.model.eval()
    out = []
    for p in tpls:
        res = prompting.evaluate_template(run.model, run.tokenizer, template, eos, t, p, limit=limit, seed=seed,
                                          embedder=embedder, scorings=scorings)
        log.info("%s / %s: %s (%d items, %.0f s)", t.name, p.name,
                 ", ".join(f"{k} {v:.2f}" for k, v in res.scores.items()), res.n, res.seconds)
        out.append(res)
    return out


# ------------------------------------------------------------------ retrieval-augmented generation (rag/)

INDEXES = Path("indexes")
DEFAULT_GENERATOR = Path("runs") / "smollm2"


def index_folder(index: str | Path) -> Path:
    """An index name (`kjv`) lives in indexes/<name>; a path (`some/dir`, `./x`) is used as given."""
    p = Path(index)
    return p if (p.is_absolute() or len(p.parts) > 1 or p.exists()) else INDEXES / p


def rag_index(paths: list[str], index: str | Path, *, embedding: str | None = None, max_tokens: int | None = None,
              overlap: int | None = None, backend: str = "sqlite", progress=None):
    """Index files, folders and built-in corpora into `index` (created on first use), embedding only new and
    changed files; returns the `IngestReport`. Chunking settings are fixed when the index is made."""
    from .rag.ingest import update_index
    from .rag.retrieve import Embedder
    from .rag.store import MANIFEST, Chunking, Index

    if not paths:
        raise ConfigError("give files, folders or built-in corpora to index")
    folder = index_folder(index)
    if (folder / MANIFEST).exists():
        idx = Index.open(folder)
        emb = Embedder(embedding or idx.embedding)
        if emb.name != idx.embedding:
            idx.close()
            raise ConfigError(f"index {folder} was built with {idx.embedding!r}, not {emb.name!r}; "
                              "use another --index name for another embedding model")
        ch = idx.chunking
        for key, given in (("max_tokens", max_tokens), ("overlap", overlap)):
            if given is not None and given != getattr(ch, key):
                idx.close()
                raise ConfigError(f"index {folder} chunks with {key}={getattr(ch, key)}, not {given}: keep its "
                                  "settings or index into a new --index")
    else:
        emb = Embedder(embedding)
        ch = Chunking(max_tokens if max_tokens is not None else 256, overlap if overlap is not None else 32)
        if not 8 <= ch.max_tokens <= emb.max_tokens:
            raise ConfigError(f"max_tokens={ch.max_tokens}: the embedding model reads at most {emb.max_tokens} "
                              "tokens per chunk; use 8..that")
        if not 0 <= ch.overlap < ch.max_tokens // 2:
            raise ConfigError(f"overlap={ch.overlap} must be in [0, max_tokens/2)")
        idx = Index.create(folder, emb.name, emb.dim, ch, backend)
    try:
        return update_index(idx, [str(p) for p in paths], emb, progress=progress)
    finally:
        idx.close()


def _rag_generator(run: Run | str | Path | None) -> Run:
    if run is not None:
        return _as_run(run)
    if not (DEFAULT_GENERATOR / "config.json").exists():  # SmolLM2-135M-Instruct from its PyPI package
        from .adapt.gguf import import_gguf

        import_gguf("smollm2", DEFAULT_GENERATOR)
    return load(DEFAULT_GENERATOR)


def _rag_pieces(gen: Run, question: str, hits, guard=None, **controls) -> Iterator[str]:
    """The generator's answer as text pieces: the question with its numbered sources, in the run's chat template
    (or as plain text for a model without one). No hits: the bare question (the no-retrieval baseline)."""
    from .rag.answer import build_completion, build_messages

    if gen.chat_template() is not None:
        messages = build_messages(question, hits) if hits else [{"role": "user", "content": question}]
        it = chat(gen, messages, stream=True, **controls)
    else:
        prompt = build_completion(question, hits) if hits else f"Question: {question}\nAnswer:"
        it = generate(gen, prompt, stream=True, **{"stop": ["\n\n"], **controls})
    if guard is not None:  # the output only: the question and passages were checked before the prompt was built
        it = guard.stream(it, "output")
    return (d.text for d in it)


def rag_ask(index: str | Path, question: str, *, run: Run | str | Path | None = None, mode: str = "dense",
            k: int = 3, where: dict | None = None, mmr: bool = False, threshold: float | None = None,
            stream: bool = False, retriever=None, guard=None, **controls):
    """Answer `question` from the index's chunks with a language model (SmolLM2-135M-Instruct by default),
    citing the numbered sources. Retrieval is dense by default (it beat BM25 and hybrid on the tuning halves of
    both FAQ sets). When the best chunk's cosine with the question is under `threshold` (the index's calibrated
    value, else the embedding model's default), it answers NOT_FOUND instead. Returns an `Answer`, or with
    `stream=True` an `AnswerStream` (iterate it for the text; `.answer` afterwards). Controls as `chat`;
    greedy (temperature 0) and 256 new tokens unless given. `guard`: guardrails as `generate`: the question is
    checked as input, each retrieved passage before it enters the prompt (a refused one is left out, a redacted
    one goes in redacted; none left: "not found"), the answer as output."""
    from .rag.answer import AnswerStream, finish, not_found
    from .rag.retrieve import DEFAULT_THRESHOLDS, Embedder, Retriever
    from .rag.store import Index

    if retriever is None:
        idx = Index.open(index_folder(index))
        retriever = Retriever(idx.store, None if mode == "sparse" else Embedder(idx.embedding), mode=mode, k=k,
                              fetch_k=max(50, k), use_mmr=mmr, where=where)
        if threshold is None:
            threshold = idx.manifest.get("threshold", DEFAULT_THRESHOLDS.get(idx.embedding))
    guard = _guardrails(guard)
    if guard is not None:
        question = guard.enforce(question, "input")
    hits, relevance = retriever.search(question, k)
    if guard is not None:
        hits = _guard_passages(guard, hits)
    if not hits or (threshold is not None and not math.isnan(relevance) and relevance < threshold):  # nan: sparse
        ans = not_found(question, hits, relevance)
        return AnswerStream(question, iter([ans.text]), hits, relevance, done=ans) if stream else ans
    controls = {"temperature": 0.0, "max_new_tokens": 256, **controls}
    pieces = _rag_pieces(_rag_generator(run), question, hits, guard, **controls)
    if stream:
        return AnswerStream(question, pieces, hits, relevance)
    return finish(question, "".join(pieces), hits, relevance)


def _guard_passages(guard, hits) -> list:
    """The retrieved passages the guardrails let into the prompt: refused ones left out, redacted ones replaced."""
    kept = []
    for h in hits:
        v = guard.check(h.chunk.text, "passage")
        if v.refused:
            log.warning("guardrails: left out a retrieved passage of %s (%s)", h.chunk.source,
                        "; ".join(sorted({f"{f.check}: {f.reason}" for f in v.findings if f.action == "refuse"})))
        else:
            kept.append(dataclasses.replace(h, chunk=dataclasses.replace(h.chunk, text=v.text)) if v.changed else h)
    return kept



def rag_eval(index: str | Path, qa: str | Path, *, split: str | None = "report", modes=("dense", "sparse", "hybrid"),
             k: int = 10, answers: int = 0, answer_k: int = 3, run: Run | str | Path | None = None,
             no_rag: bool = False, calibrate: bool = False, limit: int | None = None, progress=None) -> dict:
    """Score retrieval (hit@1/5/10, recall@k, MRR, nDCG@10 against each question's gold passage) for each mode on
    a question set (`perlfaq`, `pythonfaq`, or a JSONL of {"question", "answer"?, "source"?, "start"?, "end"?}),
    and with `answers=N` the first N answers (exact match, token F1, faithfulness, citation precision; with
    `no_rag` also the model's answers without sources). `calibrate` sets the index's "not found" threshold from
    the tuning half (split "tune"): the 5th percentile of the best chunk's cosine over the questions whose gold
    passage is retrieved in the top k, so about 1 in 20 answerable questions is refused and an off-topic one
    rarely answered. Returns a dict of metrics (and per-question rows)."""
    import numpy as np

    from .rag import evaluate as ev
    from .rag.answer import finish
    from .rag.faq import QA_SETS, qa_set, read_qa
    from .rag.retrieve import Embedder, Retriever
    from .rag.store import Index

    questions = qa_set(str(qa))[1] if str(qa) in QA_SETS else read_qa(qa)
    if calibrate:
        split = "tune"
    if split is not None and any("split" in q for q in questions):
        questions = [q for q in questions if q.get("split") == split]
    questions = questions[:limit] if limit else questions
    if not questions:
        raise DataError(f"{qa}: no questions" + (f" in the {split!r} half" if split else ""))
    idx = Index.open(index_folder(index))
    try:
        emb = Embedder(idx.embedding)
        vecs = emb([q["question"] for q in questions])
        out: dict[str, Any] = {"index": str(index_folder(index)), "qa": str(qa), "split": split,
                               "questions": len(questions), "k": k, "retrieval": {}}
        gold = [q for q in questions if "source" in q]
        relevance = np.array([idx.store.dense(v, 1)[0].score if idx.store.count() else np.nan for v in vecs])
        for mode in modes:
            r = Retriever(idx.store, emb, mode=mode, k=k, fetch_k=max(50, k))
            rows = []
            for n, (q, v) in enumerate(zip(questions, vecs)):
                if "source" in q:
                    hits, _ = r.search(q["question"], k, query_vec=v)
                    rows.append(ev.retrieval_metrics([h.chunk for h in hits], q, ks=(1, 5, 10)))
                if progress is not None:
                    progress(f"retrieve/{mode}", n + 1, len(questions))
            out["retrieval"][mode] = ev.aggregate(rows) if rows else {}
        if calibrate:
            if not gold:
                raise DataError(f"{qa}: calibration needs questions with gold passages (source, start, end)")
            r = Retriever(idx.store, emb, mode="hybrid", k=k, fetch_k=max(50, k))
            found = [rel for q, v, rel in zip(questions, vecs, relevance) if "source" in q and
                     ev.hit_at_k([h.chunk for h in r.search(q["question"], k, query_vec=v)[0]], q, k)]
            if len(found) < 5:
                raise DataError(f"only {len(found)} tuning questions find their passage: too few to calibrate")
            out["threshold"] = round(float(np.percentile(found, 5)), 4)
            idx.save_manifest(threshold=out["threshold"], threshold_from=f"{qa} (tune half, {len(found)} questions)")
        if answers:
            gen = _rag_generator(run)
            r = Retriever(idx.store, emb, mode="hybrid", k=answer_k, fetch_k=50)
            rows = []
            for n, (q, v) in enumerate(zip(questions[:answers], vecs)):
                hits, _ = r.search(q["question"], answer_k, query_vec=v)
                text = "".join(_rag_pieces(gen, q["question"], hits, temperature=0.0, max_new_tokens=256)).strip()
                chunks, ans = [h.chunk for h in hits], finish(q["question"], text, hits, float("nan"))
                row = {"id": q.get("id", n), "question": q["question"], "answer": text, "cited": ans.cited,
                       "attributed": ans.attributed, "cites_any": bool(ans.cited),
                       "faithfulness": ev.faithfulness(text, ev.cited(text, chunks)),
                       "faithfulness_to_sources": ev.faithfulness(text, chunks),
                       "citation_precision": ev.citation_precision(text, chunks, q) if "source" in q else None,
                       "attribution_precision": (sum(ev.is_relevant(chunks[i - 1], q) for i in ans.attributed)
                                                 / len(ans.attributed)) if ans.attributed and "source" in q
                       else None}
                if "answer" in q:
                    row.update(exact_match=ev.exact_match(text, q["answer"]), f1=ev.token_f1(text, q["answer"]))
                if no_rag:
                    bare = "".join(_rag_pieces(gen, q["question"], [], temperature=0.0, max_new_tokens=256)).strip()
                    row.update(no_rag_answer=bare, no_rag_faithfulness=ev.faithfulness(bare, chunks))
                    if "answer" in q:
                        row.update(no_rag_exact_match=ev.exact_match(bare, q["answer"]),
                                   no_rag_f1=ev.token_f1(bare, q["answer"]))
                rows.append(row)
                if progress is not None:
                    progress("answer", n + 1, min(answers, len(questions)))
            out["answers"] = ev.aggregate(rows)
            out["answer_rows"] = rows
        return out
    finally:
        idx.close()


# ---- what the server needs from a run (serve/ calls these; it holds no model logic) ----

def text_request(run: Run, *, prompt: str | None = None, messages: list[dict] | None = None,
                 max_new_tokens: int | None = None) -> tuple[list[int], set[int], int]:
    """A completion (`prompt`) or chat (`messages`) request as token ids -> (prompt ids, the ids that end a sample,
    max_new_tokens: as given, else 16 for a completion (OpenAI's default) and for a chat what `chat` uses).
    A prompt longer than the context leaves is a ConfigError (the server answers 400)."""
    if run.tokenizer is None or run.modality != "text":
        raise ConfigError(f"{run.path.name} is not a language model")
    ctx = run.model.context_size or 10**9
    if messages is not None:
        template = run.chat_template()
        if template is None:
            raise ConfigError(f"{run.path.name} has no chat template: it continues text; use /v1/completions")
        ids = _chat_prompt(run, template, messages, max_new_tokens or min(512, ctx // 2))
        eos = set(run.turn_end_ids(template))
        default = min(512, ctx - len(ids))
    else:
        ids = run.tokenizer.encode(prompt) if prompt else [run.start_id()]
        eos = {run.eos_id()} if run.eos_id() is not None else set()
        default = 16
    if len(ids) >= ctx:
        raise ConfigError(f"the prompt is {len(ids)} tokens; {run.path.name} has a context of {ctx} tokens")
    return ids, eos, max_new_tokens if max_new_tokens is not None else max(1, min(default, ctx - len(ids)))


def embedder(model: str | Path | None = None):
    """A sentence-embedding model (all-MiniLM-L6-v2 by default): call it on a list of texts -> unit vectors."""
    from .rag.retrieve import Embedder

    return Embedder(model)


def image_options(run: Run) -> dict[str, Any]:
    """What an image run offers a client: its size, classes, samplers and whether it inpaints."""
    cfg = run.model.config
    own = _sample_options(MODELS.get(run.family))
    samplers = None
    if "sampler" in own:
        from .sampling.diffusion import SAMPLERS

        samplers = list(SAMPLERS.names())
    return {"family": run.family, "image_size": [cfg.channels, cfg.image_size, cfg.image_size],
            "classes": list(run.class_names) if run.class_names and getattr(cfg, "conditional", False) else None,
            "samplers": samplers, "default_sampler": getattr(cfg, "sampler", None) if samplers else None,
            "default_steps": getattr(cfg, "steps", None) if samplers else None,
            "guidance": "guidance" in own, "inpaint": hasattr(run.model, "inpaint"), "options": sorted(own)}
