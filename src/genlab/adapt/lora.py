"""LoRA adapters on disk in peft's format, so they move between genlab and `peft` unchanged.

A folder holds `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors` with the keys
`base_model.model.<layer>.lora_A.weight` / `.lora_B.weight`. genlab's module names are transformers' (llama:
`model.layers.0.self_attn.q_proj`, gpt: `transformer.h.0.attn.c_attn`), so an adapter genlab saves loads with
`peft.PeftModel.from_pretrained` on the base's `--format hf` export, and a peft adapter for a supported
architecture loads into genlab. Adapters live beside their base: `runs/<name>/adapters/<adapter>/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..core import checkpoint as ckpt
from ..core.errors import CheckpointError, ConfigError
from ..nn.lora import add_lora, lora_layers, lora_state_dict

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
ADAPTERS = "adapters"  # runs/<name>/adapters/<adapter>/

# which layers a LoRA fine-tune adapts when none are named: every projection of the Transformer blocks (as the
# QLoRA paper does), never the embedding or the output layer; image families: every Linear and Conv2d layer
DEFAULT_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt": ["c_attn", "c_proj", "c_fc"],
}


def default_targets(family: str, model: nn.Module) -> list[str]:
    if family in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[family]
    return sorted({n for n, m in model.named_modules() if n and type(m) in (nn.Linear, nn.Conv2d)})


def adapter_dir(run_dir: str | Path, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"adapter name {name!r}: use a plain folder name such as 'shakespeare'")
    return Path(run_dir) / ADAPTERS / name


def list_adapters(run_dir: str | Path) -> list[str]:
    root = Path(run_dir) / ADAPTERS
    return sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file()) if root.is_dir() else []


def save_adapter(model: nn.Module, folder: str | Path, *, r: int, alpha: float, dropout: float, targets,
                 rslora: bool = False, family: str = "", base: str = "") -> Path:
    """Write the model's adapter (its lora_A/lora_B tensors only) as a peft adapter folder, atomically."""
    folder = Path(folder)
    state = {PREFIX + k: v.detach().float().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    if not state:
        raise ConfigError("this model has no LoRA layers to save")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if family in DEFAULT_TARGETS else None,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": rslora,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "bias": "none", "fan_in_fan_out": family == "gpt",  # transformers' GPT-2 stores Conv1D (in, out) weights
        "base_model_name_or_path": base, "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": True, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "genlab_family": family, "genlab_base": base}
    ckpt.atomic_write_bytes(folder / WEIGHTS, save(state, metadata=meta))  # the weights first: a config never
    ckpt.atomic_write_json(folder / CONFIG, config)  # stands without its tensors
    return folder


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder} is not an adapter folder (no {CONFIG})")
    cfg = ckpt.read_json(folder / CONFIG, "adapter config")
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise ConfigError(f"{folder / CONFIG}: only LoRA adapters are supported (peft_type "
                          f"{cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")
    unsupported = [k for k, bad in (("use_dora", cfg.get("use_dora")), ("modules_to_save", cfg.get("modules_to_save")),
                                    ("rank_pattern", cfg.get("rank_pattern")), ("alpha_pattern", cfg.get("alpha_pattern")),
                                    ("layers_to_transform", cfg.get("layers_to_transform")))
                   if bad]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']}")
    if unsupported:
        raise ConfigError(f"{folder}: LoRA with {', '.join(unsupported)} is not supported (plain LoRA only)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not cfg.get("target_modules"):
        raise ConfigError(f"{folder / CONFIG}: needs r >= 1 and target_modules")
    return cfg


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap `model`'s target layers and load the adapter's tensors; an adapter made for another base (other
    layer names or shapes) is refused with the first mismatch."""
    folder = Path(folder)
    cfg = read_config(folder)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS} is missing, truncated or corrupt ({str(e)[:200]})") from None
    state = {k.removeprefix(PREFIX).replace(".default.", "."): v for k, v in state.items()}
    targets = cfg["target_modules"]
    try:
        names = add_lora(model, targets, r=cfg["r"], alpha=cfg.get("lora_alpha", 8), dropout=0.0,
                         rslora=bool(cfg.get("use_rslora")))
    except ConfigError as e:
        raise ConfigError(f"adapter {folder} does not fit this model: {e}") from None
    own = lora_state_dict(model)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"it has no tensors for {missing[0]}" if missing else f"its tensor {extra[0]} has no layer here"
        raise ConfigError(f"adapter {folder} is for another base model: {what}")
    layers = lora_layers(model)
    with torch.no_grad():
        for k, v in state.items():
            layer, _, rest = k.rpartition(".lora_")
            p = getattr(layers[layer], "lora_" + rest.split(".")[0]).weight
            if p.shape != v.shape:
                raise ConfigError(f"adapter {folder} is for another base model: {k} is {tuple(v.shape)}, this "
                                  f"model's is {tuple(p.shape)}")
            p.copy_(v)
    return names
