"""Interop with Hugging Face `transformers`: export a genlab GPT run as a GPT-2 folder.

GPT-2 stores its linear layers as `Conv1D` with weights of shape (in, out), the transpose of
`nn.Linear`; everything else maps name for name (genlab's GPT uses GPT-2's names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.checkpoint import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..core.errors import ConfigError, GenlabError


def gpt2_config(cfg) -> dict:
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
        "bos_token_id": 0,
        "eos_token_id": 0,
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


def export_hf(run, out_dir: str | Path) -> Path:
    """Write `out_dir` with config.json, model.safetensors (GPT-2 layout) and the run's tokenizer."""
    from safetensors.torch import save

    cfg = run.model.config
    if cfg.family != "gpt":
        raise ConfigError(f"only 'gpt' runs export to Hugging Face GPT-2; this run is {cfg.family!r}")
    if not cfg.bias:
        raise GenlabError("GPT-2 has biases everywhere; a model trained with model.bias=false cannot export")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", gpt2_config(cfg))
    atomic_write_bytes(out / "model.safetensors", save(gpt2_state_dict(run.model), metadata={"format": "pt"}))
    atomic_write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0})
    if run.tokenizer is not None and run.tokenizer.kind == "char":
        # not a Hugging Face tokenizer format: kept under its own name so AutoTokenizer is not misled
        atomic_write_text(out / "genlab_tokenizer.json", run.tokenizer.to_json())
    elif run.tokenizer is not None:
        atomic_write_text(out / "tokenizer.json", run.tokenizer.to_json())
        if run.tokenizer.kind == "bpe":
            atomic_write_text(out / "tokenizer_config.json", json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                 "bos_token": "<|endoftext|>", "model_max_length": cfg.block_size}, indent=2))
    return out
