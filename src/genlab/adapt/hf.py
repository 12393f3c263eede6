"""Interop with Hugging Face `transformers`: export a genlab GPT run as a GPT-2 folder.

GPT-2 stores its linear layers as `Conv1D` with weights of shape (in, out), the transpose of
`nn.Linear`; everything else maps name for name (genlab's GPT uses GPT-2's names).

The folder is one that transformers' own tools use as they are: `AutoTokenizer` reads `tokenizer.json` (genlab's
ids, exact round trip) and `pipeline("text-generation", model=folder)` generates. A character-level run has no
end-of-text token, so none is declared: generation runs to the requested length. GPT-2 cannot go past its
`n_positions` (the run's block_size), so generation_config.json sets `max_length` to it: a call that does not
say how long stops at the context; one that asks for more raises in transformers (the pipeline's
`handle_long_generation="hole"` keeps the end of the prompt instead, or refuses when the new tokens alone
exceed the context)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch

from ..core.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..core.errors import ConfigError, GenlabError

# every file an export writes (or an earlier genlab version wrote): only these are ever removed on --overwrite
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "genlab_tokenizer.json"})


def gpt2_config(cfg, *, eos_id: int | None = None) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": 4 * cfg.n_embd,
        "activation_function": "gelu",  # exact (erf) GELU, as genlab's MLP
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,  # None without an end-of-text token: no ordinary character stands in for one
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def gpt2_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        if name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t()
        out[name] = t.detach().contiguous().clone()
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse a target that is not empty unless it holds only an earlier export's files and `overwrite`."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"export target {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    foreign = [e for e in entries if e not in EXPORT_FILES or not (out / e).is_file()]
    if foreign or not {"config.json", "model.safetensors"} <= set(entries):
        shown = ", ".join((foreign or entries)[:5]) + (" ..." if len(foreign or entries) > 5 else "")
        raise ConfigError(f"export target {out} is not empty and does not look like an earlier export (it holds "
                          f"{shown}); nothing was deleted: choose an empty or new folder")
    if not overwrite:
        raise ConfigError(f"export target {out} holds an earlier export; pass --overwrite to replace it")


def export_hf(run, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `out_dir` as a transformers GPT-2 folder: config.json, generation_config.json, model.safetensors
    (GPT-2 layout), tokenizer.json + tokenizer_config.json. The folder is built beside the target and moved into
    place whole; a non-empty target is refused unless it holds an earlier export and `overwrite` is set."""
    from safetensors.torch import save

    cfg = run.model.config
    if cfg.family != "gpt":
        raise ConfigError(f"only 'gpt' runs export to Hugging Face GPT-2; this run is {cfg.family!r}")
    if not cfg.bias:
        raise GenlabError("GPT-2 has biases everywhere; a model trained with model.bias=false cannot export")
    if run.tokenizer is None:
        raise GenlabError(f"{run.path} has no tokenizer.json: transformers could not encode a prompt")
    out = Path(out_dir).resolve()  # a symlinked target: replace the folder it names, not the link
    _check_target(out, overwrite)
    eos = run.eos_id()  # <|endoftext|> for BPE; a character vocabulary has none
    specials = {} if eos is None else dict.fromkeys(("bos_token", "eos_token", "pad_token"), run.tokenizer.EOS)
    gen = {"max_length": cfg.block_size}  # stop at the context unless a call asks for more (see the docstring)
    if eos is not None:
        gen |= {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        atomic_write_json(tmp / "config.json", gpt2_config(cfg, eos_id=eos))
        atomic_write_json(tmp / "generation_config.json", gen)
        atomic_write_bytes(tmp / "model.safetensors", save(gpt2_state_dict(run.model), metadata={"format": "pt"}))
        atomic_write_text(tmp / "tokenizer.json", run.tokenizer.to_hf().to_str())
        atomic_write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
            "clean_up_tokenization_spaces": False, **specials})
        if out.is_dir():  # empty, or an earlier export (checked above): swap it out, then remove its files
            old = tmp.with_suffix(".old")
            out.rename(old)
            tmp.rename(out)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
