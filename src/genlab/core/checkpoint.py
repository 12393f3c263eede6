"""Run folders on disk (DESIGN.md 4): safetensors weights + JSON config, written atomically.

Every file is written to a temporary name in the same folder, flushed to disk and renamed over the
old one, so a crash at any moment leaves either the old file or the new one, never half of one.
Nothing here unpickles user data: trainer state is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from .errors import CheckpointError

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_CONFIG = "train_config.json"
TRAINER_STATE = "trainer_state.pt"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"


def file_mode() -> int:
    """The mode a new file gets under the process umask (0644 under the usual 022). mkstemp makes 0600 files,
    so every atomic write sets this mode before its rename: run files stay readable as the user's umask says."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # reading the umask without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a run folder is ordinary data, shared as the umask says
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not valid JSON: {e}); re-create it or retrain") from None


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, str] | None = None) -> None:
    """A module's weights as safetensors (tied tensors stored once), written atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_model(model, tmp, metadata=metadata)  # safetensors re-creates the file: set its mode afterwards
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Load safetensors weights into `model`; a missing, truncated or mismatched file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path} (did training reach its first checkpoint?)")
    try:
        load_model(model, str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).splitlines()[0][:300]
        raise CheckpointError(f"{path} is truncated, corrupt or from another model ({msg})") from None
    return model


def save_trainer_state(path: str | Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (the run has no checkpoint yet)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch raises many types for damaged zip/pickle data
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}); cannot resume") from None


def write_model_config(run_dir: str | Path, family: str, model_cfg: dict[str, Any],
                       class_names: list[str] | None = None, quantization: dict[str, Any] | None = None) -> None:
    """config.json; `class_names` (an image run's class names, in label order) where the data has them;
    `quantization` (method, group size) for a quantized run."""
    from .. import __version__

    d = {"family": family, "format_version": FORMAT_VERSION, "genlab_version": __version__, "model": model_cfg}
    if class_names:
        d["class_names"] = list(class_names)
    if quantization:
        d["quantization"] = quantization
    atomic_write_json(Path(run_dir) / CONFIG, d)


def read_model_config(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder not found: {run_dir}")
    cfg = read_json(run_dir / CONFIG, "run config")
    if not isinstance(cfg, dict) or "family" not in cfg or "model" not in cfg:
        raise CheckpointError(f"{run_dir / CONFIG} is not a genlab run config (needs 'family' and 'model')")
    if cfg.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{run_dir} was written by a newer genlab (format {cfg['format_version']}); upgrade genlab"
        )
    return cfg


@contextmanager
def replacing_folder(out: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside `out`; when the block ends without error it takes `out`'s place whole
    (an existing `out` is swapped out first, then removed), so a crash never leaves half a folder or none."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = tmp.with_suffix(".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
