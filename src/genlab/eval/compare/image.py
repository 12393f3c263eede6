"""The image half of a compare: one shared evaluator (the data, the dataset's domain classifier, the real
features), the samples of each family, and its metrics: FID and KID in the domain classifier's features,
precision/recall, density/coverage, IS, class accuracy, bits/dim, membership inference and pixel-space
memorization; `inception_stage` adds the standard Inception-v3 FID and KID of the same samples."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ... import api
from ...core import checkpoint as ckpt
from ...core.protocols import HasELBO, HasLogProb
from ...data.datasets import DataConfig
from ...sampling.image import save_grid
from .. import privacy
from ..features import INCEPTION_DESCRIPTION, cache_folder, data_identity, domain_classifier, inception_v3
from ..image import class_accuracy, fid_from_features, image_metrics, kid
from .plan import CHUNK, INCEPTION_SETTINGS, Plan, Progress

log = logging.getLogger(__name__)

KID_SUBSET_SIZE = 1000  # rows per KID subset (fewer when a set is smaller)
IS_SPLITS = 10  # splits of the Inception Score (fewer with fewer samples: --samples may be as low as 6)
INCEPTION_KEYS = ("fid_inception", "kid_inception")


class ImageEvaluator:
    """The shared evaluator of an image compare: the data, the domain classifier and the real features,
    each loaded (or trained, the classifier, once and cached) on first use."""

    def __init__(self, data_cfg: DataConfig):
        self.data_cfg = data_cfg
        self.loaded = False

    @cached_property
    def data(self):
        return api.load_dataset(self.data_cfg)

    @cached_property
    def net(self):
        log.info("domain classifier of %s: loading it from the cache, or training it once", self.data_cfg.source)
        self.loaded = True
        return domain_classifier(self.data_cfg)

    @cached_property
    def real(self) -> torch.Tensor:
        return self.features(self.data.val.x)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.net  # trained (with gradients) on first use
        with torch.no_grad():
            f = torch.cat([net.features(x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)])  # (N, 128)
            return f, net.head(f)

    @cached_property
    def inception(self):
        return inception_v3(**INCEPTION_SETTINGS)

    @cached_property
    def inception_real(self) -> torch.Tensor:
        """Inception features of the held-out images, computed once and cached beside the domain classifiers."""
        ident = json.dumps({"data": data_identity(self.data_cfg), "settings": INCEPTION_SETTINGS,
                            "images": len(self.data.val)}, sort_keys=True)
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        path = cache_folder() / f"inception-{self.data_cfg.source}-{digest}.safetensors"
        if path.is_file():
            try:
                f = safetensors.torch.load_file(str(path))["features"]
                if f.shape == (len(self.data.val), self.inception.num_features):
                    return f
            except (OSError, KeyError, RuntimeError, safetensors.SafetensorError) as e:
                log.warning("cached Inception features %s are unusable (%s); computing them again", path, e)
        log.info("Inception features of the %d held-out images (once; cached in %s)", len(self.data.val), path)
        f = self.inception.features(self.data.val.x)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_bytes(path, safetensors.torch.save({"features": f.contiguous()}))
        except OSError as e:
            log.warning("could not cache the Inception features in %s (%s)", path, e)
        return f

    @property
    def inception_info(self) -> dict[str, Any]:
        return {**INCEPTION_DESCRIPTION, "settings": INCEPTION_SETTINGS}

    def info(self) -> dict[str, Any]:
        return {"feature_network": "domain classifier (genlab.eval.features), penultimate layer",
                "feature_dim": self.net.num_features, "classifier_heldout_accuracy": self.net.heldout_accuracy,
                "real_images": len(self.data.val), "data": self.data.describe()}


@contextmanager
def ill_conditioned(what: str, n_fake: int, dim: int, notes: list[str]) -> Iterator[None]:
    """scipy's LinAlgWarnings of the FID's matrix square root, turned into one short log line (and a note for
    the report); every other warning goes on as it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    linalg = [w for w in caught if w.category.__name__ == "LinAlgWarning"]
    for w in caught:
        if w not in linalg:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if linalg:
        why = f" ({n_fake} samples for {dim} features)" if n_fake <= dim else ""
        note = f"{what}: covariance square root ill-conditioned{why}; the value may be imprecise"
        log.warning("%s", note)
        notes.append(note)


@torch.no_grad()
def sample_images(run: api.Run, n: int, seed: int) -> torch.Tensor:
    cfg, g = run.model.config, torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % cfg.num_classes if getattr(cfg, "conditional", False) else None
    return torch.cat([api.sample(run, min(CHUNK, n - i), generator=g,
                                 labels=None if labels is None else labels[i : i + CHUNK])
                      for i in range(0, n, CHUNK)])


@torch.no_grad()
def _image_losses(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, str, str]:
    """Per-image losses (nats per dimension where a likelihood exists), a short and a long label of the score."""
    dims, g = x[0].numel(), torch.Generator().manual_seed(0)
    yy = y if getattr(model.config, "conditional", False) else None

    def batched(fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        return torch.cat([fn(x[i : i + CHUNK], None if yy is None else yy[i : i + CHUNK])
                          for i in range(0, len(x), CHUNK)])

    if isinstance(model, HasLogProb):
        lp = batched(lambda xb, yb: model.log_prob(xb, y=yb, generator=g))
        return -lp / dims, "NLL", "exact negative log-likelihood per dimension"
    if isinstance(model, HasELBO):
        lb = batched(lambda xb, yb: model.elbo(xb, k=1, y=yb, generator=g))
        return -lb / dims, "-ELBO", "negative ELBO per dimension (a bound)"
    out = []
    for i in range(len(x)):  # one image per call: a batch loss is a mean
        with torch.random.fork_rng(devices=[]):  # the same noise / fake batch for every image
            torch.manual_seed(0)
            out.append(float(model.loss((x[i : i + 1], y[i : i + 1])).loss))
    if model.config.family == "gan":
        return torch.tensor(out), "D loss", ("the GAN's monitoring loss (discriminator + generator terms, the "
                                             "fakes fixed): not a likelihood; the attack reads the discriminator")
    return torch.tensor(out), "denoising loss", "the training loss, one fixed noise draw and time step per image"


def eval_image(run: api.Run, rec: dict[str, Any], plan: Plan, ev: ImageEvaluator) -> None:
    """Fill the record of one family: samples (grid and .npy), the feature metrics, bits/dim, privacy."""
    m, reasons, tags, details = rec["metrics"], rec["reasons"], rec["tags"], rec["details"]
    model, cfg, data = run.model, run.model.config, ev.data
    t0 = time.perf_counter()
    imgs = sample_images(run, plan.samples, seed=0)
    details["sample_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    sample_images(run, 64, seed=1)
    m["s_per_64"] = round(time.perf_counter() - t0, 4)
    save_grid(imgs[:64], plan.folder / f"samples_{rec['family']}.png", nrow=8)
    rec["samples_file"] = f"samples_{rec['family']}.png"
    save_samples(plan.folder / f"samples_{rec['family']}.npy", imgs)

    feats, logits = ev.features(imgs)
    notes: list[str] = []
    with ill_conditioned(f"{rec['family']}: FID (domain)", len(feats), feats.shape[1], notes):
        im = image_metrics(ev.real, feats, logits_fake=logits, generator=torch.Generator().manual_seed(0),
                           kid_subset_size=min(KID_SUBSET_SIZE, len(ev.real), len(feats)),
                           is_splits=min(IS_SPLITS, len(feats)))
    if notes:
        details["fid_note"] = notes[0]
    for k in ("fid", "kid", "precision", "recall", "density", "coverage", "inception_score"):
        m[k] = im[k]
    details["image_metrics"] = im
    if getattr(cfg, "conditional", False):
        m["class_accuracy"] = class_accuracy(ev.net, imgs, torch.arange(len(imgs)) % cfg.num_classes)
    else:
        m["class_accuracy"], reasons["class_accuracy"] = None, "an unconditional run: no requested classes"

    e = api.evaluate(run, pictures=False)
    m["bits_per_dim"] = e["bits_per_dim"]
    details["likelihood"] = e["likelihood"]
    details["bits_per_dim_all"] = {k: v for k, v in e.items() if k.startswith("bits_per_dim_")}
    if e["bits_per_dim"] is None:
        reasons["bits_per_dim"] = e["likelihood"]
    else:
        tags["bits_per_dim"] = "exact" if "bits_per_dim_exact" in e else "bound"

    k = min(plan.mia, len(data.train), len(data.val))
    try:
        tr, short, long = _image_losses(model, data.train.x[:k], data.train.y[:k])
        ho, _, _ = _image_losses(model, data.val.x[:k], data.val.y[:k])
        auc = privacy.membership_inference_auc(tr, ho)
        m["mia_auc"], tags["mia_auc"] = auc["auc"], short
        details["membership"] = {**auc, "score": long}
    except ValueError as err:  # non-finite losses of a broken model
        m["mia_auc"], reasons["mia_auc"] = None, f"not computable: {err}"

    mem = privacy.memorization_report(imgs, data.train.x, data.val.x)
    m["closer_to_train"], m["near_copy_fraction"] = mem["closer_to_train"], mem["near_copy_fraction"]
    details["memorization"] = {**{k: v for k, v in mem.items() if k != "near_copies"},
                               "near_copies": len(mem["near_copies"]), "space": "pixels"}


def save_samples(path: Path, imgs: torch.Tensor) -> None:
    buf = io.BytesIO()
    np.save(buf, imgs.numpy(), allow_pickle=False)
    ckpt.atomic_write_bytes(path, buf.getvalue())


def _load_samples(path: Path, n: int) -> torch.Tensor | None:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return torch.from_numpy(a) if a.dtype == np.uint8 and a.ndim == 4 and len(a) == n else None


def inception_stage(fam: str, run_dir: Path, rec: dict[str, Any], plan: Plan, ev: ImageEvaluator, tag: str,
                    say: Progress) -> None:
    """Inception FID / KID of the family's samples (those of the main evaluation, or the same seed again)."""
    m, reasons = rec["metrics"], rec["reasons"]
    key = {"samples": plan.samples, "settings": INCEPTION_SETTINGS}
    if rec.get("inception", {}).get("key") == key:
        return
    if not (run_dir / ckpt.WEIGHTS).is_file():
        for k in INCEPTION_KEYS:
            m[k], reasons[k] = None, reasons.get("fid", "nothing to evaluate")
        return
    say(f"{tag}: Inception-v3 FID of {plan.samples} samples vs {len(ev.data.val)} held-out images")
    t0 = time.perf_counter()
    path = plan.folder / f"samples_{fam}.npy"
    imgs = _load_samples(path, plan.samples)
    if imgs is None:  # an earlier compare without saved samples: the same seed gives the same samples
        imgs = sample_images(api.load(run_dir), plan.samples, seed=0)
        save_samples(path, imgs)
    real, fake = ev.inception_real, ev.inception.features(imgs)
    notes: list[str] = []
    with ill_conditioned(f"{fam}: Inception FID", len(fake), fake.shape[1], notes):
        m["fid_inception"] = fid_from_features(real, fake)
    k = kid(real, fake, subset_size=min(KID_SUBSET_SIZE, len(real), len(fake)),
            generator=torch.Generator().manual_seed(0))
    m["kid_inception"] = k["mean"]
    rec["inception"] = {"key": key, "seconds": round(time.perf_counter() - t0, 1), "kid": k,
                        **({"fid_note": notes[0]} if notes else {})}
    say(f"{tag}: Inception FID {m['fid_inception']:.1f} ({rec['inception']['seconds']:.0f} s)")
