"""`genlab compare`: families trained on the same data, split and wall-clock budget, measured by one evaluator,
and written up as `results.json`, `report.md` and `report.html` in `<out>/<name>/`.

Per family: `<configs>/<family>/<data>.toml` with the shared budget (train.max_minutes, optionally
train.max_steps) -> train, or reuse a finished run, or resume an interrupted one -> evaluate -> its record is
written into results.json at once, so an interrupted compare resumes where it stopped. A record is reused when
its resolved run config and evaluation settings are unchanged; `fresh=True` retrains everything.

Images: N samples (seed 0; the family's default sampler; class-conditional runs cycle through the classes) against
the held-out split in the feature space of the dataset's domain classifier (`eval.features`): FID, KID,
precision/recall, density/coverage, IS; bits/dim from `api.evaluate` where the family has a likelihood;
membership inference from per-image losses; pixel-space memorization. Text: bits/char and perplexity, samples,
distinct-n, self-BLEU, longest copy of the training text, membership inference from per-window losses.
A metric a family cannot give is None in results.json with its reason, and "n/a" with a footnote in the reports.

`inception=True` adds the standard Inception-v3 FID and KID (`eval.features.inception_v3`, the TF-FID weights) of
the same samples (kept as samples_<family>.npy) against the same held-out images, whose features are cached in the
user cache folder. It is a separate stage: turning it on later measures only it, without retraining or resampling.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib.util
import io
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .. import __version__, api
from ..core import checkpoint as ckpt
from ..core.config import apply_overrides, load_toml, to_dict
from ..core.errors import CheckpointError, ConfigError, TrainingDiverged
from ..core.protocols import HasELBO, HasLogProb
from ..data.datasets import SOURCES, DataConfig
from ..models import MODELS
from ..sampling.image import save_grid
from . import privacy
from .features import (INCEPTION_DESCRIPTION, cache_folder, data_identity, domain_classifier, inception_v3,
                       inception_weights)
from .image import class_accuracy, fid_from_features, image_metrics, kid
from .text import distinct_n, longest_overlap, self_bleu

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_BUDGET_MINUTES = 24 * 60.0
SAMPLES_DEFAULT = {"image": 1000, "text": 20}
TEXT_TEMPERATURE, TEXT_NEW_TOKENS = 0.8, 300
SPIKE_WINDOW, SPIKE_MIN_HISTORY, SPIKE_FACTOR = 20, 5, 3.0
SPIKE_RULE = (f"a logged train_loss more than {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW} logged "
              f"values (in general: above it by more than {SPIKE_FACTOR - 1:g} x max(|median|, 5 x their median "
              f"absolute deviation), so losses near or below 0 are judged by their spread); needs "
              f"{SPIKE_MIN_HISTORY} earlier values")
CHUNK = 250  # images sampled / scored at a time
# the Inception settings of the compare: benchmarks/fid_inception.py measures them against fp32
INCEPTION_SETTINGS = {"precision": "fp32", "channels_last": True, "freeze": True, "batch_size": 16}
_DATA_FILES = {"shakespeare": "shakespeare_char"}  # --data name -> config file stem (default: '-' -> '_')

Progress = Callable[[str], None]

# (title, metrics key, format) of the table columns
INCEPTION_COLUMNS = [("Inception FID", "fid_inception", ".1f"), ("Inception KID", "kid_inception", ".4f")]
IMAGE_COLUMNS = [("FID", "fid", ".2f"), ("KID", "kid", ".4f"), ("precision", "precision", ".3f"),
                 ("recall", "recall", ".3f"), ("density", "density", ".3f"), ("coverage", "coverage", ".3f"),
                 ("bits/dim", "bits_per_dim", ".3f"), ("MIA AUC", "mia_auc", ".3f"),
                 ("closer to train", "closer_to_train", ".2f"), ("parameters", "parameters", ",d"),
                 ("train time", "train_s", "time"), ("s / 64 samples", "s_per_64", ".3g"),
                 ("loss spikes", "loss_spikes", "d"), ("status", "status", "s")]
TEXT_COLUMNS = [("bits/char", "bits_per_char", ".3f"), ("perplexity", "perplexity", ".2f"),
                *[(f"distinct-{n}", f"distinct_{n}", ".3f") for n in range(1, 5)],
                ("self-BLEU", "self_bleu", ".1f"), ("longest copy", "longest_copy", "d"),
                ("copies >= 50 chars", "copy_fraction", ".2f"), ("MIA AUC", "mia_auc", ".3f"),
                ("parameters", "parameters", ",d"), ("train time", "train_s", "time"),
                ("s / sample", "s_per_sample", ".3g"), ("loss spikes", "loss_spikes", "d"), ("status", "status", "s")]
PLOTS = {"image": ["fid", "kid", "precision", "recall", "density", "coverage", "bits_per_dim", "mia_auc"],
         "text": ["bits_per_char", "perplexity", "distinct_2", "distinct_4", "self_bleu", "mia_auc"]}


@dataclass
class CompareResult:
    folder: Path
    results: dict[str, Any]
    table: str  # the table in plain text, with its footnotes

    @property
    def html(self) -> Path:
        return self.folder / "report.html"

    @property
    def markdown(self) -> Path:
        return self.folder / "report.md"

    @property
    def json(self) -> Path:
        return self.folder / "results.json"


@dataclass
class _Plan:
    kind: str  # "image" or "text"
    data: str
    folder: Path
    budget_minutes: float
    max_steps: int | None
    samples: int
    mia: int
    inception: bool
    overrides: list[str]
    config_file: str  # e.g. "configs/<family>/fashion_mnist.toml"
    runs: list[tuple[str, api.RunConfig]]

    @property
    def eval_key(self) -> dict[str, Any]:
        key: dict[str, Any] = {"format_version": FORMAT_VERSION, "samples": self.samples, "mia": self.mia}
        if self.kind == "text":
            key.update(temperature=TEXT_TEMPERATURE, new_tokens=TEXT_NEW_TOKENS)
        return key


# ---------------------------------------------------------------- checking the request


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _plan(data: str, families: str | Sequence[str], budget_minutes: float, *, name: str | None,
          samples: int | None, mia_images: int, max_steps: int | None, overrides: Sequence[str],
          configs: str | Path, out: str | Path, inception: bool = False) -> _Plan:
    if data not in SOURCES:
        raise ConfigError(f"--data {data!r} is unknown; known: {', '.join(sorted(SOURCES))}")
    kind = SOURCES[data].kind
    fams = [f.strip() for f in (families.split(",") if isinstance(families, str) else families)]
    fams = [f for f in fams if f]
    same_kind = ", ".join(n for n in MODELS.names() if MODELS.get(n).modality == kind)
    if not fams:
        raise ConfigError(f"--families is empty; give a comma-separated list, e.g. {same_kind}")
    if len(set(fams)) != len(fams):
        raise ConfigError(f"--families {','.join(fams)} names a family twice")
    for f in fams:
        fam = MODELS.get(f)  # an unknown name lists the known families
        if fam.modality != kind:
            raise ConfigError(f"family {f!r} learns {fam.modality}, but --data {data} is {kind} data; "
                              f"{kind} families: {same_kind}")
    if isinstance(budget_minutes, bool) or not isinstance(budget_minutes, int | float) \
            or not math.isfinite(budget_minutes) or not 0 < budget_minutes <= MAX_BUDGET_MINUTES:
        raise ConfigError(f"--budget-minutes {budget_minutes} must be in (0, {MAX_BUDGET_MINUTES:g}] "
                          "(minutes of wall-clock training per family)")
    samples = SAMPLES_DEFAULT[kind] if samples is None else samples
    low = 2 if kind == "text" else 6  # self-BLEU needs 2 texts; precision/recall use 5 nearest neighbours
    if isinstance(samples, bool) or not isinstance(samples, int) or not low <= samples <= 50_000:
        raise ConfigError(f"--samples {samples} must be an integer in [{low}, 50000]"
                          + ("" if kind == "text" else " (the image metrics use 5 nearest neighbours)"))
    if not isinstance(mia_images, int) or not 2 <= mia_images <= 100_000:
        raise ConfigError(f"--mia-images {mia_images} must be an integer in [2, 100000]")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ConfigError(f"--max-steps {max_steps} must be an integer >= 1 (or unset: only the time budget)")
    name = name or data
    if "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"--name {name!r} must be a plain folder name")
    if inception and kind != "image":
        raise ConfigError(f"--inception measures images, but --data {data} is {kind} data")
    if inception:
        inception_weights()  # a missing package says how to install it before anything is trained
    needed = [("matplotlib", "matplotlib", "the plots")] + ([("sacrebleu", "sacrebleu", "self-BLEU")]
                                                            if kind == "text" else [])
    for module, package, what in needed:
        if not _has_module(module):
            raise ConfigError(f"genlab compare needs {package} for {what}: pip install {package} "
                              "(or pip install 'genlab[eval]')")
    configs = Path(configs)
    if not configs.is_dir():
        raise ConfigError(f"configs folder {str(configs)!r} not found; run from the repository root (it holds "
                          "configs/) or pass --configs DIR")
    stem = _DATA_FILES.get(data, data.replace("-", "_"))
    folder = Path(out) / name
    runs = []
    for f in fams:
        path = configs / f / f"{stem}.toml"
        if not path.is_file():
            raise ConfigError(f"no config for {f} on {data}: {path} does not exist (write one, or pass --configs "
                              "DIR with <family>/<data>.toml files)")
        d = load_toml(path)
        apply_overrides(d, list(overrides))
        d.update(name=f, out_dir=str(folder / "runs"))
        train = d.setdefault("train", {})
        if not isinstance(train, dict):
            raise ConfigError(f"{path}: [train] must be a table")
        train.update(max_minutes=float(budget_minutes), max_steps=max_steps or 0, progress=False)
        rc = api.resolve_config(base=d)
        if rc.data.source != data:
            raise ConfigError(f"{path} trains on data.source={rc.data.source!r}, not --data {data}")
        runs.append((f, rc))
    first, rc0 = runs[0]
    for f, rc in runs[1:]:
        a, b = to_dict(rc0.data), to_dict(rc.data)
        if a != b:
            diff = ", ".join(f"data.{k}" for k in a if a[k] != b[k])
            raise ConfigError(f"the families must share one data config, but {first} and {f} differ at {diff}")
    return _Plan(kind, data, folder, float(budget_minutes), max_steps, samples, mia_images, bool(inception),
                 list(overrides),
                 str(configs / "<family>" / f"{stem}.toml"), runs)


# ---------------------------------------------------------------- the whole compare


def run_compare(data: str, families: str | Sequence[str], budget_minutes: float, *, name: str | None = None,
                samples: int | None = None, mia_images: int = 500, max_steps: int | None = None,
                overrides: Sequence[str] = (), configs: str | Path = "configs", out: str | Path = "compare",
                fresh: bool = False, inception: bool = False,
                progress: Progress | None = None) -> CompareResult:
    """Train (or reuse) and evaluate each family, writing results.json after every family, then the reports."""
    plan = _plan(data, families, budget_minutes, name=name, samples=samples, mia_images=mia_images,
                 max_steps=max_steps, overrides=overrides, configs=configs, out=out, inception=inception)

    def say(msg: str) -> None:
        if progress is None:
            log.info("%s", msg)
        else:
            progress(msg)

    old = {} if fresh else _read_results(plan.folder / "results.json")
    evaluator = _ImageEvaluator(plan.runs[0][1].data) if plan.kind == "image" else None
    records: dict[str, dict[str, Any]] = {}
    for i, (fam, rc) in enumerate(plan.runs, 1):
        tag = f"[{i}/{len(plan.runs)}] {fam}"
        key = {"config": _jsonable(to_dict(rc)), "eval": plan.eval_key}
        rec = old["families"].get(fam) if isinstance(old.get("families"), dict) else None
        if isinstance(rec, dict) and rec.get("key") == key:
            say(f"{tag}: reused from {plan.folder / 'results.json'} (trained and evaluated before)")
            rec["reused"] = True
        else:
            say(f"{tag}: started")
            rec = _run_family(fam, rc, plan, evaluator, tag, say, fresh)
            rec.update(key=key, reused=False)
        if plan.inception:
            _inception_stage(fam, rc, rec, plan, evaluator, tag, say)
        records[fam] = rec
        doc = _document(plan, records, evaluator, old)
        ckpt.atomic_write_json(plan.folder / "results.json", doc)
    table = _write_reports(plan, doc)
    return CompareResult(plan.folder, doc, table)


def _read_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s); every family is trained or evaluated again", path, e)
        return {}
    return doc if isinstance(doc, dict) and doc.get("format_version") == FORMAT_VERSION else {}


def _document(plan: _Plan, records: dict[str, Any], evaluator: _ImageEvaluator | None,
              old: dict[str, Any]) -> dict[str, Any]:
    ev_info = evaluator.info() if evaluator is not None and evaluator.loaded else old.get("evaluator")
    inc_info = evaluator.inception_info if evaluator is not None and plan.inception else None
    return {"format_version": FORMAT_VERSION, "genlab_version": __version__, "kind": plan.kind, "data": plan.data,
            "budget_minutes": plan.budget_minutes, "max_steps": plan.max_steps, "samples": plan.samples,
            "inception": inc_info,
            "mia_examples": plan.mia, "overrides": plan.overrides, "config_file": plan.config_file,
            "spike_rule": SPIKE_RULE, "evaluator": ev_info, "families": records}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _run_family(fam: str, rc: api.RunConfig, plan: _Plan, evaluator: _ImageEvaluator | None, tag: str,
                say: Progress, fresh: bool) -> dict[str, Any]:
    train = _train(rc, fresh, tag, say, plan)
    rec: dict[str, Any] = {"family": fam, "run": str(rc.run_dir), "train": train, "metrics": {}, "reasons": {},
                           "tags": {}, "details": {}}
    m, reasons = rec["metrics"], rec["reasons"]
    m["status"] = train["diverged"] or "ok"
    m["train_s"] = train["train_s"]
    if hasattr(MODELS.get(fam).model_cls, "fit_data"):  # HasClosedFormFit: counted, not trained
        rec["tags"]["train_s"] = "closed form"
    if not (rc.run_dir / ckpt.WEIGHTS).is_file():
        why = f"training {train['diverged'] or 'stopped'} before its first checkpoint: nothing to evaluate"
        _fill_missing(rec, plan.kind, why)
        return rec
    say(f"{tag}: evaluating ({plan.samples} samples, {plan.mia} + {plan.mia} membership examples)")
    t0 = time.perf_counter()
    run = api.load(rc.run_dir)
    m["parameters"] = api.num_params(run.model)
    stability = _stability(rc.run_dir)
    rec["details"]["stability"] = stability
    if stability["loss_spikes"] is None:
        reasons["loss_spikes"] = ("fitted in closed form: there is no training-loss curve"
                                  if rec["tags"].get("train_s") else stability["reason"])
    m["loss_spikes"] = stability["loss_spikes"]
    if plan.kind == "image":
        _eval_image(run, rec, plan, evaluator)
    else:
        _eval_text(run, rc, rec, plan)
    _fill_missing(rec, plan.kind, "not measured")
    rec["eval_s"] = round(time.perf_counter() - t0, 2)
    cols = {key: (title, fmt) for title, key, fmt in IMAGE_COLUMNS + TEXT_COLUMNS}
    keys = ["fid", "bits_per_dim", "mia_auc"] if plan.kind == "image" else ["bits_per_char", "mia_auc"]
    shown = ", ".join(f"{cols[k][0]} {_cell(rec, k, cols[k][1])}" for k in keys)
    say(f"{tag}: evaluated in {rec['eval_s']:.1f} s: {shown}")
    return rec


def _fill_missing(rec: dict[str, Any], kind: str, reason: str) -> None:
    for _, key, _ in IMAGE_COLUMNS if kind == "image" else TEXT_COLUMNS:
        if rec["metrics"].get(key) is None:
            rec["metrics"][key] = None
            rec["reasons"].setdefault(key, reason)


# ---------------------------------------------------------------- training (or reusing a finished run)


def _finished(state: dict[str, Any], tc) -> bool:
    return bool(state.get("done") or (tc.max_steps and state.get("step", 0) >= tc.max_steps)
                or (tc.max_minutes and state.get("elapsed_s", 0) >= tc.max_minutes * 60))


def _train(rc: api.RunConfig, fresh: bool, tag: str, say: Progress, plan: _Plan) -> dict[str, Any]:
    """Train the family's run, resume an interrupted one, or reuse a finished one with the same config."""
    run_dir, state = rc.run_dir, None
    if not fresh and (run_dir / ckpt.TRAINER_STATE).is_file() and (run_dir / ckpt.TRAIN_CONFIG).is_file():
        try:
            if ckpt.read_json(run_dir / ckpt.TRAIN_CONFIG) == _jsonable(to_dict(rc)):
                state = ckpt.load_trainer_state(run_dir / ckpt.TRAINER_STATE)
        except CheckpointError as e:
            log.warning("%s: %s; training it again", run_dir, e)
    if state is not None and _finished(state, rc.train):
        say(f"{tag}: already trained in {run_dir} ({state['step']} step(s)); evaluating it without retraining")
        return {"steps": int(state["step"]), "train_s": round(float(state["elapsed_s"]), 2),
                "stopped_by": "trained earlier", "diverged": None}
    budget = f"{plan.budget_minutes:g} min" + (f" or {plan.max_steps} steps" if plan.max_steps else "")
    say(f"{tag}: {'resuming the interrupted training' if state else 'training'} ({budget})")
    t0 = time.perf_counter()
    try:
        _, res = api.train(rc, resume=state is not None, overwrite=True)
    except TrainingDiverged as e:
        found = re.search(r"at step (\d+)", str(e))
        what = f"diverged at step {found.group(1) if found else '?'}"
        say(f"{tag}: {what}; going on with the last good checkpoint, if any")
        return {"steps": int(found.group(1)) if found else None, "train_s": round(time.perf_counter() - t0, 2),
                "stopped_by": "diverged", "diverged": what, "message": str(e)}
    say(f"{tag}: trained in {res.elapsed_s:.1f} s ({res.step:,} step(s), stopped by {res.stopped_by})")
    return {"steps": res.step, "train_s": round(res.elapsed_s, 2), "stopped_by": res.stopped_by, "diverged": None}


def _stability(run_dir: Path) -> dict[str, Any]:
    """Loss spikes (SPIKE_RULE) and the training-loss curve (at most ~400 points) from metrics.jsonl."""
    path = run_dir / ckpt.METRICS
    steps, losses = [], []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            v = rec.get("train_loss") if isinstance(rec, dict) else None
            if isinstance(v, int | float) and math.isfinite(v):
                steps.append(rec.get("step"))
                losses.append(float(v))
    if not losses:
        why = ("no training loss was logged (a closed-form fit, or fewer steps than train.log_every)"
               if path.is_file() else f"{path} is missing")
        return {"loss_spikes": None, "reason": why, "logged": 0, "spike_steps": [], "curve": None}
    spikes = [steps[i] for i in range(len(losses)) if _is_spike(losses[max(0, i - SPIKE_WINDOW) : i], losses[i])]
    every = max(1, math.ceil(len(losses) / 400))
    return {"loss_spikes": len(spikes), "logged": len(losses), "spike_steps": spikes[:100],
            "curve": {"step": steps[::every], "train_loss": losses[::every]}}


def _is_spike(previous: list[float], value: float) -> bool:
    if len(previous) < SPIKE_MIN_HISTORY:
        return False
    med = statistics.median(previous)
    mad = statistics.median(abs(p - med) for p in previous)
    return value - med > (SPIKE_FACTOR - 1) * max(abs(med), 5 * mad)


# ---------------------------------------------------------------- image evaluation


class _ImageEvaluator:
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
        path = cache_folder() / f"inception-{self.data_cfg.source}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"\
                                ".safetensors"
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


@torch.no_grad()
def _sample_images(run: api.Run, n: int, seed: int) -> torch.Tensor:
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

    def batched(fn) -> torch.Tensor:
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


def _eval_image(run: api.Run, rec: dict[str, Any], plan: _Plan, ev: _ImageEvaluator) -> None:
    m, reasons, tags, details = rec["metrics"], rec["reasons"], rec["tags"], rec["details"]
    model, cfg, data = run.model, run.model.config, ev.data
    t0 = time.perf_counter()
    imgs = _sample_images(run, plan.samples, seed=0)
    details["sample_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    _sample_images(run, 64, seed=1)
    m["s_per_64"] = round(time.perf_counter() - t0, 4)
    save_grid(imgs[:64], plan.folder / f"samples_{rec['family']}.png", nrow=8)
    rec["samples_file"] = f"samples_{rec['family']}.png"
    _save_samples(plan.folder / f"samples_{rec['family']}.npy", imgs)

    feats, logits = ev.features(imgs)
    im = image_metrics(ev.real, feats, logits_fake=logits, generator=torch.Generator().manual_seed(0))
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


def _save_samples(path: Path, imgs: torch.Tensor) -> None:
    buf = io.BytesIO()
    np.save(buf, imgs.numpy(), allow_pickle=False)
    ckpt.atomic_write_bytes(path, buf.getvalue())


def _load_samples(path: Path, n: int) -> torch.Tensor | None:
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return torch.from_numpy(a) if a.dtype == np.uint8 and a.ndim == 4 and len(a) == n else None


def _inception_stage(fam: str, rc: api.RunConfig, rec: dict[str, Any], plan: _Plan, ev: _ImageEvaluator,
                     tag: str, say: Progress) -> None:
    """Inception FID / KID of the family's samples (those of the main evaluation, or the same seed again)."""
    m, reasons = rec["metrics"], rec["reasons"]
    key = {"samples": plan.samples, "settings": INCEPTION_SETTINGS}
    if rec.get("inception", {}).get("key") == key:
        return
    if not (rc.run_dir / ckpt.WEIGHTS).is_file():
        for _, k, _ in INCEPTION_COLUMNS:
            m[k], reasons[k] = None, reasons.get("fid", "nothing to evaluate")
        return
    say(f"{tag}: Inception-v3 FID of {plan.samples} samples vs {len(ev.data.val)} held-out images")
    t0 = time.perf_counter()
    path = plan.folder / f"samples_{fam}.npy"
    imgs = _load_samples(path, plan.samples)
    if imgs is None:  # an earlier compare without saved samples: the same seed gives the same samples
        imgs = _sample_images(api.load(rc.run_dir), plan.samples, seed=0)
        _save_samples(path, imgs)
    real, fake = ev.inception_real, ev.inception.features(imgs)
    m["fid_inception"] = fid_from_features(real, fake)
    k = kid(real, fake, generator=torch.Generator().manual_seed(0))
    m["kid_inception"] = k["mean"]
    rec["inception"] = {"key": key, "seconds": round(time.perf_counter() - t0, 1), "kid": k}
    say(f"{tag}: Inception FID {m['fid_inception']:.1f} ({rec['inception']['seconds']:.0f} s)")


# ---------------------------------------------------------------- text evaluation


@torch.no_grad()
def _window_losses(model, ids: torch.Tensor, T: int, n: int) -> torch.Tensor:
    """-log p per token of n windows of T + 1 tokens spread evenly over `ids`."""
    starts = torch.linspace(0, len(ids) - T - 1, n).long()
    w = ids[starts[:, None] + torch.arange(T + 1)]  # (n, T + 1)
    return torch.cat([-model.log_prob(w[i : i + 64]) for i in range(0, n, 64)]) / T


def _eval_text(run: api.Run, rc: api.RunConfig, rec: dict[str, Any], plan: _Plan) -> None:
    m, reasons, tags, details = rec["metrics"], rec["reasons"], rec["tags"], rec["details"]
    e = api.evaluate(run)
    m["bits_per_char"], m["perplexity"] = e["bits_per_char"], e["perplexity"]
    if e["tokenizer"] != "char":
        tags["perplexity"] = "per token"
    details["heldout"] = e
    t0 = time.perf_counter()
    texts = api.generate(run, "", n=plan.samples, generator=torch.Generator().manual_seed(0),
                         temperature=TEXT_TEMPERATURE, max_new_tokens=TEXT_NEW_TOKENS)
    m["s_per_sample"] = round((time.perf_counter() - t0) / plan.samples, 4)
    name = f"samples_{rec['family']}.txt"
    ckpt.atomic_write_text(plan.folder / name, "".join(f"--- sample {i + 1} ---\n{t}\n" for i, t in enumerate(texts)))
    rec["samples_file"], details["samples"] = name, texts[:3]

    def attempt(key: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ValueError as err:  # e.g. samples too short to hold an n-gram
            m[key], reasons[key] = None, f"not computable: {err}"
            return None

    for n in range(1, 5):
        m[f"distinct_{n}"] = attempt(f"distinct_{n}", lambda n=n: distinct_n(texts, n, unit="char"))
    m["self_bleu"] = attempt("self_bleu", lambda: self_bleu(texts))
    block = getattr(run.model.config, "block_size", None) or 64
    data, _, splits = api.prepare_text_data(rc.data, block, run.tokenizer)
    ov = attempt("longest_copy", lambda: longest_overlap(texts, splits.train))
    if ov is not None:
        m["longest_copy"], m["median_copy"], m["copy_fraction"] = ov["max"], ov["median"], ov["copy_fraction"]
        tags["longest_copy"] = "chars"
        details["longest_overlap"] = {k: v for k, v in ov.items() if k != "lengths"}
    else:
        reasons["copy_fraction"] = reasons["longest_copy"]
    n = min(plan.mia, len(data.train_ids) // (block + 1), len(data.val_ids) // (block + 1))
    if not isinstance(run.model, HasLogProb):
        m["mia_auc"], reasons["mia_auc"] = None, f"a {run.family} model has no per-window log-likelihood"
    elif n < 2:
        m["mia_auc"], reasons["mia_auc"] = None, f"fewer than 2 windows of {block + 1} tokens in a split"
    else:
        m["mia_auc"] = attempt("mia_auc", lambda: privacy.membership_inference_auc(
            _window_losses(run.model, data.train_ids, block, n), _window_losses(run.model, data.val_ids, block, n)
        )["auc"])
        details["membership"] = {"windows": n, "tokens": block + 1,
                                 "score": "negative log-likelihood per token of a window"}


# ---------------------------------------------------------------- reports


def _format(v: Any, fmt: str) -> str:
    if isinstance(v, str):
        return v
    if fmt == "time":
        return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"
    if fmt in (",d", "d"):
        return format(int(v), fmt)
    return format(v, fmt)


def _cell(rec: dict[str, Any], key: str, fmt: str) -> str:
    v = rec["metrics"].get(key)
    if v is None:
        return "n/a"
    tag = rec.get("tags", {}).get(key)
    return _format(v, fmt) + (f" ({tag})" if tag else "")


def _table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, rows and the numbered footnotes (the reasons behind every n/a)."""
    cols = IMAGE_COLUMNS if doc["kind"] == "image" else TEXT_COLUMNS
    if doc.get("inception"):
        cols = cols[:2] + INCEPTION_COLUMNS + cols[2:]
    notes: list[str] = []
    rows = []
    for fam, rec in doc["families"].items():
        row = [fam]
        for title, key, fmt in cols:
            cell = _cell(rec, key, fmt)
            if cell == "n/a":
                note = f"{fam}, {title}: {rec['reasons'].get(key, 'not measured')}"
                if note not in notes:
                    notes.append(note)
                cell = f"n/a [{notes.index(note) + 1}]"
            row.append(cell)
        rows.append(row)
    return ["family", *(c[0] for c in cols)], rows, [f"[{i}] {n}" for i, n in enumerate(notes, 1)]


def _interval_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = [("FID", "fid", ".2f"), ("KID", "kid", ".4f"), ("precision", "precision", ".3f"),
            ("recall", "recall", ".3f"), ("density", "density", ".3f"), ("coverage", "coverage", ".3f"),
            ("IS", "inception_score", ".2f")]
    rows = []
    for fam, rec in doc["families"].items():
        im = rec.get("details", {}).get("image_metrics")
        if not im:
            continue
        row = [fam]
        for _, k, fmt in keys:
            lo, hi = im.get(f"{k}_ci") or (None, None)
            row.append(f"{format(im[k], fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]" if lo is not None
                       else format(im[k], fmt))
        acc = rec["metrics"].get("class_accuracy")
        row += [f"{acc:.1%}" if acc is not None else "n/a (unconditional)", f"{im['n_fake']} / {im['n_real']}"]
        rows.append(row)
    return ["family", *(t for t, _, _ in keys), "class accuracy", "samples / real"], rows


def _plain_table(headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([""] + notes if notes else []))


def _intro(doc: dict[str, Any]) -> list[str]:
    fams = list(doc["families"])
    budget = f"{doc['budget_minutes']:g} minutes of wall clock" + (
        f" (and at most {doc['max_steps']} steps)" if doc["max_steps"] else "")
    paras = [f"Each family was trained from `{doc['config_file']}` on the same data and split "
             f"(`{doc['data']}`), under the same budget: {budget}"
             + (f", with the overrides {', '.join(f'`{o}`' for o in doc['overrides'])}" if doc["overrides"] else "")
             + ". All were then measured by the same evaluator."]
    if "ngram" in fams:
        paras.append("The n-gram is fitted in closed form (one counting pass over the training text): the budget "
                     "does not apply to it, and its train time is the counting time.")
    if doc["kind"] == "image":
        ev = doc.get("evaluator")
        space = (f"({ev['data']}) in the {ev['feature_dim']}-d feature space of the dataset's domain classifier "
                 f"(held-out accuracy {ev['classifier_heldout_accuracy']:.3f})" if ev
                 else "in the feature space of the dataset's domain classifier")
        paras.append(
            f"Evaluator: {doc['samples']} samples per family (seed 0; each family's default sampler and steps; "
            f"class-conditional runs cycle through the classes) against the held-out split {space}. FID, KID, "
            "precision, recall, density and coverage over these features compare the families of this report "
            "with each other; they are not Inception-FID numbers. Bits/dim: `genlab eval` on the held-out split "
            "(exact = an exact log-likelihood, bound = the IWAE / ELBO bound). MIA AUC: the loss-threshold "
            f"membership attack on {doc['mia_examples']} training vs {doc['mia_examples']} held-out images with "
            "the family's per-image score (in brackets); 0.5 = members cannot be told apart. Closer to train: "
            "the fraction of samples whose nearest training image (pixels) is nearer than the nearest held-out "
            "one (0.5 = generalizes, 1 = copies). s / 64 samples: the wall time of one batch of 64.")
        if doc.get("inception"):
            inc = doc["inception"]
            paras.append(
                f"Inception FID / KID: the same samples against the same held-out images in the "
                f"{inc['feature_dim']}-d pool3 features of the standard Inception-v3 FID network "
                f"({inc['feature_network']}; input {inc['input']}). The method of published FIDs, but the "
                f"numbers compare only at the same data and sample count: FID is biased upwards at small N "
                f"({doc['samples']} samples here vs the usual 50,000).")
    else:
        paras.append(
            f"Evaluator: bits/char and perplexity on the held-out text (`genlab eval`); {doc['samples']} samples "
            f"of {TEXT_NEW_TOKENS} tokens at temperature {TEXT_TEMPERATURE} (seed 0, no prompt) for distinct-n "
            "(characters), self-BLEU (0-100, lower = more diverse) and the longest stretch of each sample copied "
            "from the training text; MIA AUC: the loss-threshold membership attack on up to "
            f"{doc['mia_examples']} training vs held-out windows (negative log-likelihood per token); 0.5 = "
            "members cannot be told apart.")
    paras.append(f"Loss spikes: {doc['spike_rule']}.")
    return paras


def _notes(doc: dict[str, Any]) -> list[str]:
    out = []
    for fam, rec in doc["families"].items():
        t, d = rec["train"], rec["details"]
        parts = [f"run `{rec['run']}`", f"{t.get('steps') or 0:,} step(s) ({t.get('stopped_by')})"]
        if t.get("diverged"):
            parts.append(t.get("message", t["diverged"]))
        if d.get("likelihood"):
            parts.append(f"likelihood: {d['likelihood']}")
        if d.get("membership"):
            parts.append(f"membership score: {d['membership']['score']}")
        if d.get("stability", {}).get("spike_steps"):
            parts.append(f"loss spikes at steps {', '.join(map(str, d['stability']['spike_steps'][:20]))}")
        if rec.get("reused"):
            parts.append("reused from an earlier compare")
        out.append(f"{fam}: " + "; ".join(parts))
    return out


def _plots(folder: Path, doc: dict[str, Any]) -> list[tuple[str, str]]:
    """metrics.png (a bar chart per metric) and train_loss.png (the curves, spikes marked)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas renders the PNG

    fams = list(doc["families"])
    titles = {key: title for title, key, _ in (IMAGE_COLUMNS + TEXT_COLUMNS)}
    keys = PLOTS[doc["kind"]]
    cols = 4 if len(keys) > 6 else 3
    fig = Figure(figsize=(3.2 * cols, 2.9 * math.ceil(len(keys) / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(len(keys) / cols), cols, squeeze=False).flatten()
    colours = [f"C{i}" for i in range(len(fams))]
    for ax, key in zip(axes, keys, strict=False):
        vals = [doc["families"][f]["metrics"].get(key) for f in fams]
        ax.bar(range(len(fams)), [0 if v is None else v for v in vals], color=colours)
        for i, v in enumerate(vals):
            if v is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(fams)), fams, rotation=30, fontsize=8)
        ax.set_title(titles[key], fontsize=10)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    out = [("metrics per family", _save_figure(fig, folder / "metrics.png"))]
    curves = {f: r["details"].get("stability", {}) for f, r in doc["families"].items()}
    curves = {f: s for f, s in curves.items() if s.get("curve")}
    if curves:
        cols = min(3, len(curves))
        rows = math.ceil(len(curves) / cols)
        fig = Figure(figsize=(3.6 * cols, 2.8 * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False).flatten()
        for ax in axes[len(curves) :]:
            ax.set_visible(False)
        for ax, (fam, s) in zip(axes, curves.items(), strict=False):
            ax.plot(s["curve"]["step"], s["curve"]["train_loss"], color=colours[fams.index(fam)], lw=1)
            spikes = set(s["spike_steps"])
            pts = [(st, v) for st, v in zip(s["curve"]["step"], s["curve"]["train_loss"], strict=True) if st in spikes]
            if pts:
                ax.plot(*zip(*pts, strict=True), "rx")
            ax.set_title(f"{fam}: {s['loss_spikes']} spike(s)", fontsize=10)
            ax.set_xlabel("step", fontsize=8)
        out.append(("training loss (logged train_loss; red x: spikes)", _save_figure(fig, folder / "train_loss.png")))
    return out


def _save_figure(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    ckpt.atomic_write_bytes(path, buf.getvalue())
    return path.name


def _blocks(folder: Path, doc: dict[str, Any]) -> tuple[list[tuple], str]:
    """The report as neutral blocks (rendered to markdown and HTML) and the plain-text table."""
    headers, rows, notes = _table(doc)
    fams = list(doc["families"])
    b: list[tuple] = [("h1", f"genlab compare: {', '.join(fams)} on {doc['data']}")]
    b += [("p", p) for p in _intro(doc)]
    b += [("table", headers, rows)]
    if notes:
        b += [("p", "n/a: the metric does not exist for that family (or could not be measured):"), ("list", notes)]
    if doc["kind"] == "image":
        ci_headers, ci_rows = _interval_table(doc)
        if ci_rows:
            b += [("h2", "Intervals"),
                  ("p", ("95% bootstrap intervals (the samples and the real images resampled with replacement, "
                         "20 times), the Inception Score (over the domain classifier's logits, 10 splits) and "
                         "the class accuracy of class-conditional runs:")),
                  ("table", ci_headers, ci_rows)]
    b += [("h2", "Runs"), ("list", _notes(doc)), ("h2", "Samples")]
    for fam, rec in doc["families"].items():
        if not rec.get("samples_file"):
            b.append(("p", f"{fam}: no samples ({rec['reasons'].get('fid') or rec['reasons'].get('bits_per_char')})"))
        elif doc["kind"] == "image":
            b += [("h3", fam), ("img", f"{fam} samples", rec["samples_file"])]
        else:
            b += [("h3", f"{fam} (first 3; all in {rec['samples_file']})")]
            b += [("pre", t) for t in rec["details"].get("samples", [])]
    b.append(("h2", "Plots"))
    b += [("img", title, name) for title, name in _plots(folder, doc)]
    return b, _plain_table(headers, rows, notes)


def _markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *a in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"{'#' * int(kind[1])} {a[0]}")
        elif kind == "p":
            out.append(a[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in a[0]))
        elif kind == "table":
            headers, rows = a
            lines = [headers, ["---"] + ["---:"] * (len(headers) - 2) + ["---"], *rows]
            out.append("\n".join("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in lines))
        elif kind == "img":
            out.append(f"![{a[0]}]({a[1]})")
        elif kind == "pre":
            out.append("```\n" + a[0].replace("```", "` ` `") + "\n```")
    return "\n\n".join(out) + "\n"


def _html(blocks: list[tuple], folder: Path) -> str:
    esc = html.escape

    def inline(text: str) -> str:  # `code` spans of the markdown
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text, quote=False))

    body = []
    for kind, *a in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{inline(a[0])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{inline(a[0])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in a[0]) + "</ul>")
        elif kind == "table":
            headers, rows = a
            head = "".join(f"<th>{esc(h)}</th>" for h in headers)
            cells = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((folder / a[1]).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{esc(a[0])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{esc(a[0])}</figcaption></figure>")
        elif kind == "pre":
            body.append(f"<pre>{esc(a[0])}</pre>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}pre{background:#f4f4f4;padding:8px;"
             "white-space:pre-wrap}img{max-width:100%;image-rendering:pixelated}code{background:#f4f4f4}")
    title = esc(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_reports(plan: _Plan, doc: dict[str, Any]) -> str:
    blocks, table = _blocks(plan.folder, doc)
    ckpt.atomic_write_text(plan.folder / "report.md", _markdown(blocks))
    ckpt.atomic_write_text(plan.folder / "report.html", _html(blocks, plan.folder))
    return table
