"""Image outputs: sample grids as image files (what `genlab sample` and the training previews write)."""

from __future__ import annotations

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


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def image_format(path: str | Path) -> str:
    """The Pillow format a file name asks for (.png, .jpg, ...); an unknown suffix is a ConfigError."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ConfigError(f"{path}: cannot tell the image format from {suffix or 'a name without a suffix'}; "
                          f"use one of {', '.join(IMAGE_FORMATS)}")
    return IMAGE_FORMATS[suffix]


def save_png(picture: np.ndarray, path: str | Path, scale: int = 1, metadata: dict | None = None) -> Path:
    """Write a uint8 picture (H, W) or (H, W, 3) atomically in the format its name asks for (PNG, JPEG at quality
    95, ...; see `image_format`); `scale` enlarges it (nearest). `metadata` (provenance: model, seed, settings)
    goes into PNG text chunks (a JPEG comment for .jpg; other formats carry none); see genlab.safety.provenance."""
    from ..safety.provenance import encode_picture

    fmt = image_format(path)
    if scale > 1:
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
    atomic_write_bytes(path, encode_picture(picture, fmt, metadata))
    return Path(path)


def _captioned(picture: np.ndarray, n: int, nrow: int, cell: tuple[int, int], pad: int, captions: list[str]):
    """The grid with a strip under each row of images holding each image's caption (cut to the cell's width)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=10)
    h, w = cell
    band = 12
    rows = math.ceil(n / nrow)
    src = Image.fromarray(picture)
    out = Image.new(src.mode, (src.width, src.height + rows * band), 255 if src.mode == "L" else (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for r in range(rows):
        top = pad + r * (h + pad)
        out.paste(src.crop((0, top - pad, src.width, top + h)), (0, top - pad + r * band))
        for q in range(min(nrow, n - r * nrow)):
            text = captions[r * nrow + q]
            while text and draw.textlength(text, font=font) > w + pad:
                text = text[:-1]
            x = pad + q * (w + pad) + (w - draw.textlength(text, font=font)) / 2
            draw.text((x, top + h + r * band), text, fill=0 if src.mode == "L" else (0, 0, 0), font=font)
    return np.asarray(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              captions: list[str] | None = None, metadata: dict | None = None,
              watermark_key: str | None = None) -> Path:
    """A grid of uint8 images written as the file's suffix says (PNG by default); small images (<= 16 px) are
    enlarged so they can be seen. `captions` (one per image, e.g. class names) are written under the images.
    `metadata` (provenance) is written into the file together with the grid's layout, so a detector can find the
    tiles. `watermark_key`: each image is watermarked on its own BEFORE gridding, so every tile (also one cropped
    out of the grid) carries the whole watermark."""
    scale = 4 if images.shape[-1] <= 16 else (2 if images.shape[-1] <= 32 else 1)
    if watermark_key is not None:
        from ..safety.provenance import embed_image_watermark, payload_for, watermark_info

        payload = payload_for(metadata)
        images = embed_image_watermark(images, watermark_key, payload=payload)
        metadata = {**(metadata or {}), "watermark": watermark_info(images.shape[-2:], payload)}
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    if metadata is not None:
        h, w = images.shape[-2:]
        metadata = {**metadata, "grid": {"n": len(images), "nrow": nrow, "tile": [h * scale, w * scale],
                                         "pad": 2 * scale, "band": 12 if captions else 0}}
    if not captions:
        return save_png(make_grid(images, nrow), path, scale=scale, metadata=metadata)
    if len(captions) != len(images):
        raise ConfigError(f"{len(captions)} captions for {len(images)} images")
    big = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3) if scale > 1 else images
    pad = 2 * scale
    picture = make_grid(big, nrow, pad=pad)
    return save_png(_captioned(picture, len(images), nrow, tuple(big.shape[-2:]), pad, captions), path,
                    metadata=metadata)


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
