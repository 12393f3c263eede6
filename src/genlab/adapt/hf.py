"""Interop with Hugging Face `transformers`: export a genlab GPT or Llama run as a transformers folder, and import
a local GPT-2 or Llama folder as a genlab run.

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

from ..core.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_json,
    replacing_folder,
    save_weights,
    write_model_config,
)
from ..core.errors import CheckpointError, ConfigError, GenlabError
from ..data.tokenizers import tokenizer_from_json

# every file an export writes (or an earlier genlab version wrote): only these are ever removed on --overwrite
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "genlab_tokenizer.json"})


def gpt2_config(cfg, *, eos_id: int | None = None, bos_id: int | None = None) -> dict:
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
        "activation_function": {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation],
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id if bos_id is None else bos_id,  # None without an end-of-text token: no ordinary
        "eos_token_id": eos_id,  # character stands in for one
        "torch_dtype": "float32",
    }


def llama_config(cfg, *, eos_id: int | None = None, bos_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.block_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id if bos_id is None else bos_id,
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


def _tokenizer_files(run) -> tuple[dict, dict, int | None, int | None]:
    """(tokenizer_config.json, generation_config.json, eos id, bos id) for an export. An imported run gives back
    what its source had (special tokens, chat template, generation settings); genlab's own BPE uses <|endoftext|>
    as begin, end and pad; a character vocabulary has no special token."""
    from ..data.chat import GENERATION_CONFIG, TOKENIZER_CONFIG, _token_text

    cfg, tok = run.model.config, run.tokenizer
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
               "clean_up_tokenization_spaces": False}
    gen = {"max_length": cfg.block_size}  # stop at the context unless a call asks for more (see the docstring)
    src = run.path / TOKENIZER_CONFIG
    if src.is_file():
        kept = read_json(src, "tokenizer config")
        for k, v in kept.items():
            if k.endswith("_token") and _token_text(v) is not None:
                tok_cfg[k] = _token_text(v)
            elif k in ("chat_template", "add_bos_token", "add_eos_token"):
                tok_cfg[k] = v
        if (run.path / GENERATION_CONFIG).is_file():
            gen = {**read_json(run.path / GENERATION_CONFIG, "generation config"), **gen}
        ids = {k: tok._tok.token_to_id(tok_cfg[k + "_token"]) if k + "_token" in tok_cfg else None
               for k in ("bos", "eos", "pad")}
        eos_ids = run.eos_ids()
        gen.setdefault("eos_token_id", eos_ids[0] if len(eos_ids) == 1 else eos_ids or None)
        for k in ("bos", "pad"):
            if ids[k] is not None:
                gen.setdefault(f"{k}_token_id", ids[k])
        gen = {k: v for k, v in gen.items() if v is not None}
        return tok_cfg, gen, ids["eos"], ids["bos"]
    eos = run.eos_id()  # <|endoftext|> for BPE; a character vocabulary has none
    if eos is not None:
        tok_cfg |= dict.fromkeys(("bos_token", "eos_token", "pad_token"), tok.EOS)
        gen |= {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    return tok_cfg, gen, eos, None


def export_hf(run, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write `out_dir` as a transformers GPT-2 folder: config.json, generation_config.json, model.safetensors
    (GPT-2 layout), tokenizer.json + tokenizer_config.json. The folder is built beside the target and moved into
    place whole; a non-empty target is refused unless it holds an earlier export and `overwrite` is set."""
    from safetensors.torch import save

    cfg = run.model.config
    if cfg.family not in ("gpt", "llama"):
        raise ConfigError(f"only 'gpt' and 'llama' runs export to Hugging Face; this run is {cfg.family!r}")
    if any(getattr(m, "quantized", False) for m in run.model.modules()):
        raise ConfigError(f"{run.path} is a quantized run (genlab's int8/int4 layout): export the full-precision run "
                          "it was made from")
    if cfg.family == "gpt" and not cfg.bias:
        raise GenlabError("GPT-2 has biases everywhere; a model trained with model.bias=false cannot export")
    if run.tokenizer is None:
        raise GenlabError(f"{run.path} has no tokenizer.json: transformers could not encode a prompt")
    out = Path(out_dir).resolve()  # a symlinked target: replace the folder it names, not the link
    _check_target(out, overwrite)
    tok_cfg, gen, eos, bos = _tokenizer_files(run)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        if cfg.family == "gpt":
            hf_cfg, weights = gpt2_config(cfg, eos_id=eos, bos_id=bos), gpt2_state_dict(run.model)
        else:  # Llama's names are transformers' own; a tied head is stored once (as embed_tokens)
            hf_cfg = llama_config(cfg, eos_id=eos, bos_id=bos)
            weights = {k: t.detach().contiguous().clone() for k, t in run.model.state_dict().items()
                       if not (cfg.tie_embeddings and k == "lm_head.weight")}
        atomic_write_json(tmp / "config.json", hf_cfg)
        atomic_write_json(tmp / "generation_config.json", gen)
        atomic_write_bytes(tmp / "model.safetensors", save(weights, metadata={"format": "pt"}))
        atomic_write_text(tmp / "tokenizer.json", run.tokenizer.to_hf().to_str())
        atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
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


# ---------------------------------------------------------------- import

SUPPORTED = "gpt2 (GPT2LMHeadModel) and llama (LlamaForCausalLM, e.g. SmolLM2, TinyLlama)"


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder: model.safetensors, its shards (model.safetensors.index.json) or
    pytorch_model.bin (read with weights_only, so no code in it runs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if (src / "model.safetensors").is_file():
            return load_file(src / "model.safetensors")
        if (src / "model.safetensors.index.json").is_file():
            index = read_json(src / "model.safetensors.index.json", "safetensors index")
            out = {}
            for shard in sorted(set(index.get("weight_map", {}).values())):
                out |= load_file(src / shard)
            return out
        if (src / "pytorch_model.bin").is_file():
            return torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"the weights in {src} cannot be read ({e}); the file is damaged or incomplete") from None
    raise CheckpointError(f"{src} has no weights (model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin)")


def _from_gpt2(hc: dict, weights: dict) -> tuple[dict, dict]:
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(hc.get("activation_function"))
    n_embd = hc["n_embd"]
    if act is None or hc.get("n_inner") not in (None, 4 * n_embd):
        raise ConfigError(f"this GPT-2 variant (activation {hc.get('activation_function')!r}, n_inner "
                          f"{hc.get('n_inner')}) is not supported: genlab's gpt has GELU and a 4x MLP")
    cfg = {"vocab_size": hc["vocab_size"], "block_size": hc["n_positions"], "n_layer": hc["n_layer"],
           "n_head": hc["n_head"], "n_embd": n_embd, "bias": True, "activation": act}
    sd = {}
    for k, t in weights.items():
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k  # GPT2Model files lack it
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the old causal-mask buffers
        if k.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        sd[k] = t
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # GPT-2 ties its head
    return cfg, sd


def _from_llama(hc: dict, weights: dict) -> tuple[dict, dict]:
    n_embd, n_head = hc["hidden_size"], hc["num_attention_heads"]
    unsupported = []
    if hc.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hc['hidden_act']!r}")
    if hc.get("rope_scaling") not in (None, {}) and (hc["rope_scaling"] or {}).get("rope_type", "default") != "default":
        unsupported.append(f"rope_scaling={hc['rope_scaling']}")
    if hc.get("attention_bias") or hc.get("mlp_bias"):
        unsupported.append("biases in attention or MLP")
    if hc.get("head_dim") not in (None, n_embd // n_head):
        unsupported.append(f"head_dim={hc['head_dim']} (genlab uses hidden_size / heads)")
    if unsupported:
        raise ConfigError(f"this Llama variant is not supported: {', '.join(unsupported)}")
    tie = bool(hc.get("tie_word_embeddings", False))
    theta = hc.get("rope_theta") or (hc.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    cfg = {"vocab_size": hc["vocab_size"], "block_size": hc["max_position_embeddings"],
           "n_layer": hc["num_hidden_layers"], "n_head": n_head,
           "n_kv_head": hc.get("num_key_value_heads") or n_head, "n_embd": n_embd,
           "intermediate_size": hc["intermediate_size"], "rope_theta": float(theta),
           "rms_norm_eps": float(hc.get("rms_norm_eps", 1e-6)), "tie_embeddings": tie}
    sd = {k: t for k, t in weights.items() if not k.endswith("rotary_emb.inv_freq")}
    if tie or "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        cfg["tie_embeddings"] = True
    return cfg, sd


def read_hf(src: str | Path):
    """A transformers causal-LM folder -> (family, model config dict, state dict, tokenizer JSON text, extras).
    extras: what a chat needs later (tokenizer_config.json's chat template and special tokens, the generation
    config), kept as the folder had them."""
    src = Path(src)
    if not src.is_dir():
        raise ConfigError(f"{src} is not a folder; genlab imports a local transformers folder ({SUPPORTED})")
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json: not a transformers model folder")
    hc = read_json(src / "config.json", "transformers config")
    kind = hc.get("model_type")
    if kind not in ("gpt2", "llama"):
        arch = ", ".join(hc.get("architectures") or []) or "none given"
        raise ConfigError(f"{src}: model_type {kind!r} ({arch}) is not supported; genlab imports {SUPPORTED}")
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"{src} has no tokenizer.json (the fast tokenizer file): genlab could not encode a "
                              "prompt; save the tokenizer with tokenizer.save_pretrained(folder) first")
    weights = {k: t.float() for k, t in _hf_weights(src).items()}
    try:
        family, (cfg, sd) = (("gpt",) + (_from_gpt2(hc, weights),) if kind == "gpt2"
                             else ("llama",) + (_from_llama(hc, weights),))
    except KeyError as e:
        raise CheckpointError(f"{src}: config.json or the weights lack {e} for a {kind} model") from None
    extras = {}
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            extras[name] = read_json(src / name, name)
    # recent transformers keep the chat template beside tokenizer_config.json rather than in it
    if (src / "chat_template.jinja").is_file():
        extras.setdefault("tokenizer_config.json", {})["chat_template"] = \
            (src / "chat_template.jinja").read_text(encoding="utf-8")
    elif (src / "chat_template.json").is_file():
        t = read_json(src / "chat_template.json", "chat_template.json").get("chat_template")
        if isinstance(t, str):
            extras.setdefault("tokenizer_config.json", {})["chat_template"] = t
    return family, cfg, sd, (src / "tokenizer.json").read_text(encoding="utf-8"), extras


def import_hf(src: str | Path, run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Import a transformers GPT-2 or Llama folder as a genlab run folder (config.json, model.safetensors,
    tokenizer.json, and the folder's tokenizer/generation configs as hf_*.json)."""
    check_run_target(run_dir, overwrite)
    family, cfg_d, sd, tok_json, extras = read_hf(src)
    return write_run(family, cfg_d, sd, tok_json, extras, run_dir, source=Path(src).name, overwrite=overwrite)


def check_run_target(run_dir: str | Path, overwrite: bool) -> Path:
    """Refuse a target that holds anything but a run (or a run without `overwrite`), before any slow reading."""
    out = Path(run_dir).resolve()
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not (overwrite and (out / "config.json").is_file()):
        raise ConfigError(f"{out} exists and is not empty; pass --overwrite to replace a run there (a folder "
                          "that is not a run is never replaced)")
    return out


def write_run(family: str, cfg_d: dict, sd: dict, tok_json: str, extras: dict, run_dir: str | Path, *,
              source: str, overwrite: bool = False) -> Path:
    """A run folder from imported parts, checked first (the weights fit the config, the tokenizer reads), built
    beside the target and moved into place whole; an existing run is replaced only with `overwrite`."""
    from ..models import build_model, config_dict, config_from_saved

    cfg = config_from_saved(family, cfg_d)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: the weights do not fit a {family} model of its config (missing: "
                              f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})")
    tok = tokenizer_from_json(tok_json, f"{source} tokenizer")  # refuse an unreadable tokenizer before writing
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {tok.vocab_size} tokens but the model only "
                              f"{cfg.vocab_size}")
    out = check_run_target(run_dir, overwrite)
    with replacing_folder(out) as tmp:  # an earlier run (checked above) is swapped out whole
        write_model_config(tmp, family, config_dict(cfg))
        save_weights(tmp / "model.safetensors", model, metadata={"imported_from": source})
        atomic_write_text(tmp / "tokenizer.json", tok_json)
        for name, obj in extras.items():
            atomic_write_json(tmp / f"hf_{name}", obj)
    return out
