"""Provenance for the images genlab writes: an invisible keyed watermark with a detector that states its error
rate, PNG text chunks that say which model, run, seed and settings made an image, and a signed C2PA manifest.

The watermark (method "dct-ss") is spread spectrum in the DCT domain (Cox et al. 1997, "Secure spread spectrum
watermarking for multimedia"), made for small images (16 px and up; genlab's 28-64 px):
- The carrier is the band of 2-D DCT-II coefficients (u, v) with u, v < BAND (the lowest, (u + v < LOW_CUT),
  left alone). Index u is u/2 cycles across the picture whatever its size, so the pattern lives at the same place
  relative to the frame at every resolution: a resized copy (nearest upscaling keeps every coefficient's sign
  exactly) is read by the same detector with no search.
- A key (any string) gives each coefficient a sign k_i (SHA-256, so the pattern is the same on every machine) and
  assigns it to the pilot or to one of PAYLOAD_BITS groups; a group's target signs are k_i times +-1 by its bit.
- Embedding is informed: the TARGET fraction of coefficients that are cheapest to fix (those that already agree
  cost nothing) is pushed, by the least change, to agree with its target sign with a margin (`strength`, in grey
  levels: the orthonormal DCT keeps pixel units). Clipping to [0, 255] is undone by a few projections onto both
  constraints.
  Colour images carry it in the luminance (the same change added to R, G and B).
- Detection counts sign agreements, the locally optimal detector for Laplacian-distributed DCT coefficients
  (Hernandez, Amado and Perez-Gonzalez 2000, IEEE TIP 9(1), eq. 17, with a +-1 pattern). The score is the pilot's
  agreement count plus |agreement| of each payload group (the bits are unknown to the detector). For an image
  made without this key every sign agreement is a fair coin flip, so the score's null distribution is known
  exactly (a convolution of binomials); the p-value is exact and `z` is its normal equivalent. Decoded bits are
  the signs of the group sums.

Images of 256 px and more can also carry the `invisible-watermark` library's dwtDct mark (what diffusers uses),
with a key-derived 48-bit message of complementary pairs, so a decoder's constant output (a flat image) matches
exactly half the bits: under the null the matches are Binomial(48, 1/2).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from ..core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ the DCT spread-spectrum watermark

METHOD = "dct-ss"
VERSION = 1
BAND = 14  # coefficients u, v < BAND carry the mark: below half of 28 px, so 0.5x resizing keeps them
LOW_CUT = 3  # u + v < LOW_CUT (the mean and the coarsest shape) is left alone
PAYLOAD_BITS = 8
GROUP = 12  # coefficients per payload bit
TARGET = 0.8  # the fraction of carrier coefficients made to agree with the key (the cheapest ones)
ITERATIONS = 12  # projections between the sign constraints and the [0, 255] box
DEFAULT_STRENGTH = 6.0  # the margin, in grey levels
MIN_SIZE = 16
FPR = 1e-3
LIBRARY_MIN_SIZE = 256
LIBRARY_METHOD = "invisible-watermark/dwtDct"
LIBRARY_BITS = 48
_LUMA = np.array([0.299, 0.587, 0.114])


@functools.lru_cache(maxsize=32)
def _dct_rows(n: int) -> np.ndarray:
    """The first min(n, BAND) rows of the orthonormal DCT-II matrix of size n: (K, n)."""
    k = np.arange(min(n, BAND))[:, None]
    x = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * k * (2 * x + 1) / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


@dataclass(frozen=True)
class _Pattern:
    u: np.ndarray  # (K,) row index of each carrier coefficient
    v: np.ndarray
    sign: np.ndarray  # (K,) +-1, the key's sign
    group: np.ndarray  # (K,) -1 = pilot, else the payload bit it carries


@functools.lru_cache(maxsize=64)
def _pattern(key: str) -> _Pattern:
    coords = [(u, v) for u in range(BAND) for v in range(BAND) if u + v >= LOW_CUT]
    digests = [hashlib.sha256(f"genlab-image-watermark-v{VERSION}|{key}|{u}|{v}".encode()).digest()
               for u, v in coords]
    sign = np.array([1.0 if d[0] & 1 else -1.0 for d in digests])
    order = np.argsort([int.from_bytes(d[1:9], "big") for d in digests], kind="stable")
    group = np.full(len(coords), -1)
    group[order[: PAYLOAD_BITS * GROUP]] = np.arange(PAYLOAD_BITS * GROUP) % PAYLOAD_BITS
    uv = np.array(coords)
    return _Pattern(uv[:, 0], uv[:, 1], sign, group)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise ConfigError("the watermark key must be a non-empty string (--watermark-key K or GENLAB_WATERMARK_KEY)")
    return key


def _payload_bits(payload: int | None) -> np.ndarray:
    if payload is None:
        return np.zeros(PAYLOAD_BITS, dtype=int)
    if not isinstance(payload, int | np.integer) or not 0 <= payload < 2**PAYLOAD_BITS:
        raise ConfigError(f"payload={payload!r} must be an integer in [0, {2**PAYLOAD_BITS - 1}] "
                          f"({PAYLOAD_BITS} bits)")
    return np.array([(int(payload) >> (PAYLOAD_BITS - 1 - j)) & 1 for j in range(PAYLOAD_BITS)])


def _band(y: np.ndarray, pat: _Pattern) -> np.ndarray:
    """The carrier coefficients of luminance planes y (..., H, W) -> (..., K)."""
    c = _dct_rows(y.shape[-2]) @ y @ _dct_rows(y.shape[-1]).T
    return c[..., pat.u, pat.v]


def _luma(a: np.ndarray) -> np.ndarray:
    """(C, H, W) or (N, C, H, W) float -> (H, W) / (N, H, W) luminance (grey images: the plane itself)."""
    return a[..., 0, :, :] if a.shape[-3] == 1 else np.tensordot(_LUMA, a[..., :3, :, :], axes=([0], [-3]))


def _embed_array(a: np.ndarray, key: str, strength: float, payload: int | None) -> np.ndarray:
    """uint8 (C, H, W) -> watermarked uint8 (C, H, W)."""
    pat = _pattern(key)
    h, w = a.shape[-2:]
    target = pat.sign * np.where(pat.group >= 0, 1 - 2 * _payload_bits(payload)[np.maximum(pat.group, 0)], 1)
    x = a.astype(np.float64)
    colour = x[: min(3, x.shape[0])]
    agree0 = target * _band(_luma(colour), pat)
    # informed embedding: fix the cheapest coefficients (those already agreeing cost nothing) up to TARGET of them
    cost = np.clip(strength - agree0, 0, None)
    active = np.zeros(len(cost), dtype=bool)
    active[np.argsort(cost, kind="stable")[: math.ceil(TARGET * len(cost))]] = True
    ru, rv = _dct_rows(h), _dct_rows(w)
    for _ in range(ITERATIONS):
        need = np.clip(strength - target * _band(_luma(colour), pat), 0, None) * active
        if not need.any():
            break
        delta = np.zeros((ru.shape[0], rv.shape[0]))
        delta[pat.u, pat.v] = target * need
        colour = np.clip(colour + (ru.T @ delta @ rv)[None], 0, 255)
    x[: colour.shape[0]] = colour
    return np.rint(x).astype(np.uint8)


@functools.lru_cache(maxsize=4096)
def _null_tail(n_pilot: int, groups: tuple[int, ...]) -> tuple[int, np.ndarray]:
    """The exact null law of the score S = (sum of n_pilot fair +-1) + sum over groups of |sum of m fair +-1|:
    (lowest value, P(S >= lowest + i) for each i)."""
    def signed(m):  # the law of a sum of m fair +-1 over -m..m (every other entry is 0)
        p = np.zeros(2 * m + 1)
        p[::2] = [math.comb(m, k) / 2.0**m for k in range(m + 1)]
        return p

    pmf = signed(n_pilot)
    for m in groups:
        p = signed(m)
        folded = p[m:].copy()  # |T| over 0..m
        folded[1:] += p[:m][::-1]
        pmf = np.convolve(pmf, folded)
    return -n_pilot, np.cumsum(pmf[::-1])[::-1]


def _exact_tail(n_pilot: int, groups: Sequence[int], score: int) -> float:
    lo, tail = _null_tail(n_pilot, tuple(groups))
    i = score - lo
    return 1.0 if i <= 0 else (float(min(1.0, tail[i])) if i < len(tail) else 0.0)


def _z_of(p: float) -> float:
    return -NormalDist().inv_cdf(min(max(p, 1e-300), 1 - 1e-16))


@dataclass
class ImageWatermarkResult:
    """What a detector found. `watermarked` is true only when p_value < fpr (1e-3 by default): an image made
    without this key is called watermarked with probability at most fpr."""

    watermarked: bool
    z: float | None  # the normal equivalent of p_value (exact for "dct-ss")
    p_value: float | None
    method: str  # "dct-ss", "invisible-watermark/dwtDct", or "none" where nothing could be tested
    bits: str | None = None  # the decoded payload, most significant bit first
    payload: int | None = None
    bit_accuracy: float | None = None  # against the expected payload, where one was given
    reason: str = ""
    size: tuple[int, int] | None = None  # (width, height) of what was tested
    fpr: float = FPR
    tiles: list[dict] | None = None  # a grid: each tile's own result

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_chw(image) -> tuple[np.ndarray, Any]:
    """A uint8 (C, H, W) array from a torch tensor, a numpy array (C, H, W) or a PIL image, and a function that
    turns such an array back into the caller's type."""
    from PIL import Image

    if isinstance(image, Image.Image):
        mode = image.mode
        if mode not in ("L", "RGB", "RGBA"):
            image, mode = image.convert("RGB"), "RGB"
        a = np.asarray(image)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

        def back(x):
            return Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0), mode=mode)

        return np.ascontiguousarray(a), back
    if hasattr(image, "detach"):  # a torch tensor
        import torch

        if image.dtype != torch.uint8:
            raise ConfigError(f"the watermark needs uint8 images; got {image.dtype}")
        arr, dev = image.detach().cpu().numpy(), image.device
        return arr, lambda x: torch.from_numpy(x).to(dev)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ConfigError(f"the watermark needs uint8 images; got {image.dtype}")
        return image, lambda x: x
    raise ConfigError(f"cannot watermark a {type(image).__name__}: give a uint8 tensor (C, H, W) or a PIL image")


def embed_image_watermark(image, key: str, strength: float = DEFAULT_STRENGTH, *, payload: int | None = None,
                          method: str = "auto"):
    """The image with an invisible watermark for `key`; the same type back (a uint8 tensor (C, H, W) or
    (N, C, H, W), a uint8 numpy array of those shapes, or a PIL image). `strength` is the margin in grey levels
    (higher: more robust, more visible; PSNR ~38-45 dB at the default). `payload`: an integer of PAYLOAD_BITS
    bits carried along (default 0). method: "dct-ss" (any size from 16 px), "invisible-watermark" (256 px and
    more; needs the library) or "auto" (the library from 256 px when it is installed, else dct-ss)."""
    _check_key(key)
    if not 0 < strength <= 64:
        raise ConfigError(f"strength={strength} must be in (0, 64] (grey levels)")
    _payload_bits(payload)
    a, back = _as_chw(image)
    if a.ndim == 4:
        return back(np.stack([_embed_one(x, key, strength, payload, method) for x in a]))
    if a.ndim != 3 or a.shape[0] not in (1, 3, 4):
        raise ConfigError(f"the watermark needs images shaped (C, H, W) with 1, 3 or 4 channels; got {a.shape}")
    return back(_embed_one(a, key, strength, payload, method))


def _embed_one(a: np.ndarray, key: str, strength: float, payload: int | None, method: str) -> np.ndarray:
    h, w = a.shape[-2:]
    if method not in ("auto", METHOD, "invisible-watermark"):
        raise ConfigError(f"method={method!r} unknown; known: auto, {METHOD}, invisible-watermark")
    big = min(h, w) >= LIBRARY_MIN_SIZE
    if method == "invisible-watermark" or (method == "auto" and big and _library() is not None):
        if not big:
            raise ConfigError(f"invisible-watermark needs images of at least {LIBRARY_MIN_SIZE}x{LIBRARY_MIN_SIZE}; "
                              f"this one is {w}x{h} (use method='{METHOD}')")
        return _library_embed(a, key)
    if min(h, w) < MIN_SIZE:
        raise ConfigError(f"the image watermark needs images of at least {MIN_SIZE}x{MIN_SIZE}; this one is {w}x{h}")
    return _embed_array(a, key, strength, payload)


def _detect_array(a: np.ndarray, key: str, payload: int | None = None) -> ImageWatermarkResult:
    """uint8 (C, H, W) -> the dct-ss test."""
    pat = _pattern(key)
    h, w = a.shape[-2:]
    if min(h, w) < MIN_SIZE:
        return ImageWatermarkResult(False, None, None, "none", reason=f"too small to test ({w}x{h}; the watermark "
                                    f"needs {MIN_SIZE} px or more)", size=(w, h))
    s = np.sign(_band(_luma(a.astype(np.float64)[: min(3, a.shape[0])]), pat)) * pat.sign  # +1 agree, -1, 0
    pilot = pat.group < 0
    n_pilot = int(np.count_nonzero(s[pilot]))
    sums = [s[pat.group == j].sum() for j in range(PAYLOAD_BITS)]
    sizes = [int(np.count_nonzero(s[pat.group == j])) for j in range(PAYLOAD_BITS)]
    score = round(float(s[pilot].sum() + sum(abs(t) for t in sums)))
    p = _exact_tail(n_pilot, sizes, score)
    bits = "".join("1" if t < 0 else "0" for t in sums)
    res = ImageWatermarkResult(p < FPR, _z_of(p), p, METHOD, bits=bits, payload=int(bits, 2), size=(w, h))
    if payload is not None:
        want = _payload_bits(payload)
        res.bit_accuracy = float(np.mean([int(b) == t for b, t in zip(bits, want, strict=True)]))
    if not res.watermarked:
        res.reason = "no watermark for this key" + (" (all carrier coefficients are zero: a flat image)"
                                                    if n_pilot + sum(sizes) == 0 else "")
    return res


def detect_image_watermark(image_or_path, key: str, *, payload: int | None = None,
                           tiles: bool = True) -> ImageWatermarkResult:
    """Test an image (a path, a PIL image, a uint8 tensor/array (C, H, W)) for the watermark of `key`.
    `payload`: the expected payload, to report bit accuracy. A grid written by genlab (its PNG says the layout)
    is tested tile by tile; the grid's verdict combines the tiles (Stouffer's z, exact for independent tiles
    only approximately) and each tile's result is in `tiles`. An unreadable file is a DataError."""
    _check_key(key)
    grid, marked = None, None
    if isinstance(image_or_path, str | os.PathLike):
        im = _open_image(Path(image_or_path))
        chunks = _read_text_chunks(im) if tiles else {}
        grid, marked = chunks.get("grid"), (chunks.get("watermark") or {}).get("tiles")
        a, _ = _as_chw(im)
        im.close()
    else:
        a, _ = _as_chw(image_or_path)
    if a.ndim != 3:
        raise ConfigError(f"detect one image (C, H, W) at a time; got shape {a.shape}")
    if grid:
        return _detect_grid(a, key, grid, payload, marked)
    return _detect_one(a, key, payload)


def _detect_one(a: np.ndarray, key: str, payload: int | None) -> ImageWatermarkResult:
    own = _detect_array(a, key, payload)
    h, w = a.shape[-2:]
    if min(h, w) < LIBRARY_MIN_SIZE or _library() is None:
        return own
    lib = _library_detect(a, key)
    # two tests of one image: Bonferroni, so the stated false-positive rate still holds
    best = own if (own.p_value if own.p_value is not None else 1.0) <= lib.p_value else lib
    best.p_value = min(1.0, 2 * best.p_value)
    best.z = _z_of(best.p_value)
    best.watermarked = best.p_value < FPR
    best.reason = "" if best.watermarked else "no watermark for this key (dct-ss and invisible-watermark tested)"
    return best


def _detect_grid(a: np.ndarray, key: str, grid: dict, payload: int | None,
                 marked: list[int] | None = None) -> ImageWatermarkResult:
    try:
        n, nrow, pad, band = int(grid["n"]), int(grid["nrow"]), int(grid["pad"]), int(grid.get("band", 0))
        th, tw = (int(v) for v in grid["tile"])
    except (KeyError, TypeError, ValueError):
        return _detect_one(a, key, payload)
    results = []
    for i in range(n):
        if isinstance(marked, list) and i not in marked:  # e.g. the source image of an inpainting grid
            continue
        r, q = divmod(i, nrow)
        top, left = pad + r * (th + pad + band), pad + q * (tw + pad)
        tile = a[:, top : top + th, left : left + tw]
        if tile.shape[-2:] != (th, tw):
            break
        results.append(_detect_array(tile, key, payload))
    if not results:
        return _detect_one(a, key, payload)
    zs = [r.z for r in results if r.z is not None]
    z = sum(zs) / math.sqrt(len(zs)) if zs else 0.0
    p = 0.5 * math.erfc(z / math.sqrt(2))  # the upper tail without cancellation
    acc = [r.bit_accuracy for r in results if r.bit_accuracy is not None]
    out = ImageWatermarkResult(p < FPR, z, p, METHOD, size=(a.shape[-1], a.shape[-2]),
                               bit_accuracy=float(np.mean(acc)) if acc else None,
                               tiles=[{"watermarked": r.watermarked, "z": r.z, "p_value": r.p_value,
                                       "bits": r.bits} for r in results])
    votes = [[int(b) for b in r.bits] for r in results if r.watermarked and r.bits]
    if votes:  # the payload by a majority of the watermarked tiles, bit by bit
        out.bits = "".join("1" if 2 * sum(col) > len(col) else "0" for col in zip(*votes, strict=True))
        out.payload = int(out.bits, 2)
        if payload is not None:
            out.bit_accuracy = float(np.mean([int(b) == t for b, t in zip(out.bits, _payload_bits(payload),
                                                                             strict=True)]))
    out.reason = (f"{sum(r.watermarked for r in results)} of {len(results)} tiles watermarked" if out.watermarked
                  else f"no watermark for this key in the grid's {len(results)} tiles")
    return out


# ------------------------------------------------------------------ the invisible-watermark library (>= 256 px)


@functools.lru_cache(maxsize=1)
def _library():
    try:
        from imwatermark import WatermarkDecoder, WatermarkEncoder
    except ImportError:
        return None
    return WatermarkEncoder, WatermarkDecoder


def _library_bits(key: str) -> list[int]:
    """48 key-derived bits as 24 complementary pairs (b, 1 - b): any constant decoding matches exactly half."""
    d = hashlib.sha256(f"genlab-image-watermark-lib-v{VERSION}|{key}".encode()).digest()
    out = []
    for j in range(LIBRARY_BITS // 2):
        b = (d[j // 8] >> (j % 8)) & 1
        out += [b, 1 - b]
    return out


def _to_bgr(a: np.ndarray) -> np.ndarray:
    rgb = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    return np.ascontiguousarray(rgb.transpose(1, 2, 0)[:, :, ::-1])


def _library_embed(a: np.ndarray, key: str) -> np.ndarray:
    lib = _library()
    if lib is None:
        raise ConfigError("method='invisible-watermark' needs the library: pip install --no-deps "
                          "invisible-watermark opencv-python-headless PyWavelets")
    enc = lib[0]()
    enc.set_watermark("bits", _library_bits(key))
    bgr = enc.encode(_to_bgr(a), "dwtDct")
    rgb = np.clip(bgr[:, :, ::-1], 0, 255).astype(np.uint8).transpose(2, 0, 1)
    if a.shape[0] == 1:
        return np.rint(_luma(rgb.astype(np.float64)))[None].clip(0, 255).astype(np.uint8)
    out = a.copy()
    out[:3] = rgb
    return out


def _library_detect(a: np.ndarray, key: str, payload: int | None = None) -> ImageWatermarkResult:
    from math import comb

    lib = _library()
    dec = lib[1]("bits", LIBRARY_BITS)
    got = [int(b) for b in dec.decode(_to_bgr(a), "dwtDct")]
    want = _library_bits(key)
    k = sum(g == t for g, t in zip(got, want, strict=True))
    p = sum(comb(LIBRARY_BITS, i) for i in range(k, LIBRARY_BITS + 1)) / 2.0**LIBRARY_BITS
    return ImageWatermarkResult(p < FPR, _z_of(p), p, LIBRARY_METHOD, bits="".join(map(str, got)),
                                bit_accuracy=k / LIBRARY_BITS, size=(a.shape[-1], a.shape[-2]),
                                reason="" if p < FPR else "no watermark for this key")


# ------------------------------------------------------------------ provenance in PNG text chunks

PREFIX = "genlab:"  # every genlab field is one iTXt chunk "genlab:<field>" holding JSON


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path} cannot be read as an image ({type(e).__name__}: {e})") from None
    return im


def _read_text_chunks(im) -> dict[str, Any]:
    """genlab's fields from an opened image: PNG text chunks, or the JSON of a JPEG comment."""
    out: dict[str, Any] = {}
    text = dict(getattr(im, "text", None) or {}) if im.format == "PNG" else {}
    if not text and im.info.get("comment"):
        try:
            d = json.loads(im.info["comment"])
            text = {PREFIX + k: json.dumps(v) for k, v in d.items()} if isinstance(d, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            text = {}
    for k, v in text.items():
        if k.startswith(PREFIX):
            try:
                out[k[len(PREFIX):]] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                out[k[len(PREFIX):]] = v
    return out


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return v.tolist()
    return v if isinstance(v, str | int | float | bool | type(None)) else str(v)


def encode_picture(picture: np.ndarray, fmt: str = "PNG", metadata: dict | None = None) -> bytes:
    """A uint8 picture (H, W) or (H, W, 3) as the bytes of a PNG (metadata as iTXt chunks "genlab:<field>", JSON
    values), a JPEG (quality 95; metadata as a JSON comment) or another Pillow format (no metadata)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    kw: dict[str, Any] = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    if metadata:
        meta = _jsonable(metadata)
        if fmt == "PNG":
            info = PngInfo()
            info.add_text("Software", f"genlab {meta.get('genlab_version', '')}".strip())
            for k, v in meta.items():
                info.add_itxt(PREFIX + k, json.dumps(v, ensure_ascii=False))
            kw["pnginfo"] = info
        elif fmt == "JPEG":
            kw["comment"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format=fmt, **kw)
    return buf.getvalue()


def encode_png(image, metadata: dict | None = None, watermark_key: str | None = None) -> bytes:
    """One uint8 image (C, H, W) (tensor or array) as PNG bytes, with `metadata` in its text chunks and, where a
    key is given, the invisible watermark (what the server sends for an image)."""
    a, _ = _as_chw(image)
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ConfigError(f"encode_png needs one uint8 image (C, H, W) with 1 or 3 channels; got {a.shape}")
    meta = dict(metadata or {})
    if watermark_key is not None:
        payload = payload_for(meta)
        a = _embed_one(a, _check_key(watermark_key), DEFAULT_STRENGTH, payload, "auto")
        meta["watermark"] = watermark_info(a.shape[-2:], payload)
    return encode_picture(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0), "PNG", meta or None)


def watermark_info(size: Sequence[int], payload: int | None = None) -> dict[str, Any]:
    """What the metadata says about a watermark (never the key): its method, version and strength."""
    big = min(size) >= LIBRARY_MIN_SIZE and _library() is not None
    d: dict[str, Any] = ({"method": LIBRARY_METHOD, "bits": LIBRARY_BITS} if big else
                         {"method": METHOD, "version": VERSION, "strength": DEFAULT_STRENGTH,
                          "payload_bits": PAYLOAD_BITS})
    if payload is not None and not big:
        d["payload"] = payload
    return d


def read_provenance(path: str | Path) -> dict[str, Any]:
    """genlab's provenance fields of an image file written by genlab ({} when it has none, e.g. stripped);
    an unreadable file is a DataError."""
    path = Path(path)
    im = _open_image(path)
    try:
        return _read_text_chunks(im)
    finally:
        im.close()


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached per (path, size, modification time): a server hashes its weights once."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def provenance_for(run, **settings) -> dict[str, Any]:
    """The provenance of an output of `run` (a genlab.api.Run): generator, genlab version, model, run (the folder's
    name only: no local paths leave the machine), family, the sha256 of its weights (and adapter), a UTC time, and
    `settings` (seed, sampler, steps, guidance, labels, prompt ...; None values are left out)."""
    from datetime import UTC, datetime

    from .. import __version__

    path = Path(run.path)
    cfg = run.model.config
    d: dict[str, Any] = {"generator": "genlab", "genlab_version": __version__,
                         "model": getattr(cfg, "preset", None) and f"{run.family} {cfg.preset}" or run.family,
                         "run": path.name, "family": run.family}
    weights = path / "model.safetensors"
    if weights.is_file():
        d["weights_sha256"] = file_sha256(weights)
    if getattr(run, "adapter", None):
        ad = Path(run.adapter)
        d["adapter"] = ad.name
        files = sorted(ad.glob("*.safetensors")) if ad.is_dir() else []
        if files:
            d["adapter_sha256"] = file_sha256(files[0])
    d["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    d.update({k: _jsonable(v) for k, v in settings.items() if v is not None})
    return d


def payload_for(metadata: dict | None) -> int | None:
    """The watermark payload genlab carries: the first byte of the weights' sha256 (links an image to its model
    after its metadata is gone); None without a weights hash."""
    h = (metadata or {}).get("weights_sha256")
    return int(h[: PAYLOAD_BITS // 4], 16) if isinstance(h, str) and len(h) >= PAYLOAD_BITS // 4 else None


# ------------------------------------------------------------------ C2PA


def _pem(value: str | bytes | os.PathLike, what: str) -> bytes:
    if isinstance(value, bytes):
        data = value
    elif isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        data = value.encode()
    else:
        p = Path(value)
        if not p.is_file():
            raise ConfigError(f"{what} {p}: no such file")
        data = p.read_bytes()
    if b"-----BEGIN" not in data:
        raise ConfigError(f"{what} is not PEM (no -----BEGIN line)")
    return data


def _c2pa():
    try:
        import c2pa
    except ImportError:
        raise ConfigError("C2PA needs c2pa-python: pip install 'genlab[safety]'") from None
    return c2pa


def _signing_alg(key_pem: bytes):
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the C2PA key cannot be read ({e}); give an unencrypted PEM private key") from None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if key.curve.name not in algs:
            raise ConfigError(f"C2PA signs with P-256, P-384 or P-521 EC keys; this key is on {key.curve.name}")
        return algs[key.curve.name]
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, rsa.RSAPrivateKey):
        return "ps256"
    raise ConfigError(f"C2PA cannot sign with a {type(key).__name__}; use an EC P-256 key")


def sign_c2pa(png_path: str | Path, key_pem, cert_pem, manifest_fields: dict | None = None) -> Path:
    """Sign a PNG in place with a C2PA manifest: a c2pa.actions assertion (created, by a trained algorithm) and
    `manifest_fields` (e.g. the provenance) as an "org.genlab.provenance" assertion. `key_pem`: the private key
    (a path, or PEM text/bytes); `cert_pem`: its certificate chain, leaf first. No timestamp server is used, so
    the signature holds while the certificate is valid. The file is replaced atomically."""
    from ..core.checkpoint import atomic_write_bytes

    c2pa = _c2pa()
    png_path = Path(png_path)
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(png_path.suffix.lower())
    if mime is None:
        raise ConfigError(f"C2PA signing writes PNG or JPEG files; {png_path} is neither")
    key, chain = _pem(key_pem, "--c2pa-key"), _pem(cert_pem, "--c2pa-cert")
    alg = _signing_alg(key)
    if not png_path.is_file():
        raise DataError(f"{png_path}: no such file to sign")
    from .. import __version__

    manifest = {
        "claim_generator_info": [{"name": "genlab", "version": __version__}],
        "title": png_path.name,
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created",
                "digitalSourceType": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"}]}},
            *([{"label": "org.genlab.provenance", "data": _jsonable(manifest_fields)}] if manifest_fields else []),
        ],
    }
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(alg, chain, key, None))
        ctx = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}}})
        with c2pa.Builder(manifest, context=ctx) as builder:
            dst = io.BytesIO()
            builder.sign(signer, mime, io.BytesIO(png_path.read_bytes()), dst)
    except c2pa.C2paError as e:
        raise ConfigError(f"C2PA signing failed: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                          "(is --c2pa-cert the key's certificate chain, leaf first?)") from None
    atomic_write_bytes(png_path, dst.getvalue())
    return png_path


def read_c2pa(path: str | Path, trust_anchors=None) -> dict[str, Any] | None:
    """The C2PA manifest of a file: {"validation_state": "Valid"|"Trusted"|"Invalid", "failures": [codes],
    "manifest": the active manifest}; None when the file has no manifest (or c2pa-python is not installed).
    `trust_anchors` (a PEM path or text): CA certificates to trust, which turns a good chain's "Valid" into
    "Trusted"."""
    try:
        import c2pa
    except ImportError:
        return None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    settings: dict[str, Any] = {}
    if trust_anchors is not None:
        settings = {"trust": {"trust_anchors": _pem(trust_anchors, "trust anchors").decode()},
                    "verify": {"verify_trust": True}}
    fmt = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    try:
        ctx = c2pa.Context.from_dict(settings) if settings else None
        with open(path, "rb") as f:
            reader = c2pa.Reader.try_create(fmt, f, context=ctx) if ctx else c2pa.Reader.try_create(fmt, f)
            if reader is None:
                return None
            with reader:
                results = reader.get_validation_results() or {}
                active = results.get("activeManifest", {}) if isinstance(results, dict) else {}
                return {"validation_state": reader.get_validation_state(),
                        "failures": [f.get("code") for f in active.get("failure", [])],
                        "manifest": reader.get_active_manifest()}
    except c2pa.C2paError as e:
        return {"validation_state": "Invalid", "failures": [str(e).splitlines()[0] if str(e) else type(e).__name__],
                "manifest": None}
