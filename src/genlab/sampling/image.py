"""Image outputs: sample grids as PNG files (what `genlab sample` and the training previews write)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from ..core.checkpoint import atomic_write_bytes
from ..core.errors import ConfigError


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 picture (H', W') or (H', W', 3), `nrow` images per row (default ~sqrt N)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"make_grid needs uint8 images shaped (N, 1 or 3, H, W); got {images.dtype} "
                          f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((c, pad + rows * (h + pad), pad + nrow * (w + pad)), pad_value, dtype=np.uint8)
    a = images.cpu().numpy()
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = a[i]
    return grid[0] if c == 1 else grid.transpose(1, 2, 0)


def save_png(picture: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Write a uint8 picture (H, W) or (H, W, 3) as a PNG, atomically; `scale` enlarges it (nearest)."""
    from PIL import Image

    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """A PNG grid of uint8 images; small images (<= 16 px) are enlarged so they can be seen."""
    scale = 4 if images.shape[-1] <= 16 else (2 if images.shape[-1] <= 32 else 1)
    return save_png(make_grid(images, nrow), path, scale=scale)


def read_image(path: str | Path, channels: int) -> torch.Tensor:
    """One PNG/JPEG file as uint8 (channels, H, W), converted to grayscale (1) or RGB (3)."""
    from PIL import Image, UnidentifiedImageError

    from ..core.errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} cannot be read as an image ({type(e).__name__}: {e})") from None
    return torch.from_numpy((a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy())
