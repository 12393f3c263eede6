"""`genlab compare`: families trained on the same data, split and wall-clock budget, measured by one evaluator,
and written up as `results.json`, `report.md` and `report.html` in `<out>/<name>/`.

Per family: `<configs>/<family>/<data>.toml` with the shared budget (train.max_minutes, optionally
train.max_steps) -> train, or reuse a finished run, or resume an interrupted one -> evaluate -> its record is
written into results.json at once, so an interrupted compare resumes where it stopped. A record is reused when
its resolved run config and evaluation settings are unchanged.

A report folder is one comparison: its settings (data, budget, max steps, samples, membership examples, --set
overrides, configs folder) are those of its results.json. A rerun with other settings is refused, naming what
differs (`--name NEW` keeps both reports, `fresh=True` replaces the report: only the named families, all
retrained). A rerun with the same settings extends the report: families not in it yet are trained and added,
those done are reused, and families of the report left out of `families` stay in it as they were (listed after
the named ones). Sample files of families no longer in the report are removed.

Images: N samples (seed 0; the family's default sampler; class-conditional runs cycle through the classes) against
the held-out split in the feature space of the dataset's domain classifier (`eval.features`): FID, KID (raw),
precision/recall, density/coverage, IS; bits/dim from `api.evaluate` where the family has a likelihood;
membership inference from per-image losses; pixel-space memorization. Text: bits/char and perplexity, samples,
distinct-n, self-BLEU, longest copy of the training text, membership inference from per-window losses.
A metric a family cannot give is None in results.json with its reason, and "n/a" with a footnote in the reports.

`inception=True` adds the standard Inception-v3 FID and KID (`eval.features.inception_v3`, the TF-FID weights) of
the same samples (kept as samples_<family>.npy) against the same held-out images, whose features are cached in the
user cache folder. It is a separate stage: turning it on later measures only it, without retraining or resampling.

The package sits above `api.py` and uses it; api.py never imports it. Layout: `plan` (the request, checked),
`image` and `text` (the two evaluators), `report` (the documents), and here the orchestration.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import __version__, api
from ...core import checkpoint as ckpt
from ...core.config import to_dict
from ...core.errors import CheckpointError, ConfigError, TrainingDiverged
from ...models import MODELS
from .image import ImageEvaluator, eval_image, inception_stage
from .plan import FORMAT_VERSION, Plan, Progress, catalog, check_rerun, describe_catalog, make_plan
from .report import cell, columns, write_reports
from .text import eval_text

__all__ = ["CompareResult", "catalog", "describe_catalog", "make_plan", "run_compare"]

log = logging.getLogger(__name__)

SPIKE_WINDOW, SPIKE_MIN_HISTORY, SPIKE_FACTOR = 20, 5, 3.0
SPIKE_RULE = (f"a logged train_loss more than {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW} logged "
              f"values (in general: above it by more than {SPIKE_FACTOR - 1:g} x max(|median|, 5 x their median "
              f"absolute deviation), so losses near or below 0 are judged by their spread); needs "
              f"{SPIKE_MIN_HISTORY} earlier values")
SAMPLE_SUFFIXES = (".png", ".npy", ".txt")  # samples_<family>.<suffix>: the report's files of one family


@dataclass
class CompareResult:
    folder: Path
    results: dict[str, Any]
    table: str  # the verdict and the table in plain text, with its footnotes

    @property
    def html(self) -> Path:
        return self.folder / "report.html"

    @property
    def markdown(self) -> Path:
        return self.folder / "report.md"

    @property
    def json(self) -> Path:
        return self.folder / "results.json"


# ---------------------------------------------------------------- the whole compare


def run_compare(data: str, families: str | Sequence[str], budget_minutes: float, *, name: str | None = None,
                samples: int | None = None, mia_images: int = 500, max_steps: int | None = None,
                overrides: Sequence[str] = (), configs: str | Path = "configs", out: str | Path = "compare",
                fresh: bool = False, inception: bool = False,
                progress: Progress | None = None) -> CompareResult:
    """Train (or reuse) and evaluate each family, writing results.json after every family, then the reports.
    `progress(line)` receives one line per step of each family (default: the log)."""
    p = make_plan(data, families, budget_minutes, name=name, samples=samples, mia_images=mia_images,
             max_steps=max_steps, overrides=overrides, configs=configs, out=out, inception=inception)

    def say(msg: str) -> None:
        if progress is None:
            log.info("%s", msg)
        else:
            progress(msg)

    results = p.folder / "results.json"
    old = {} if fresh else _read_results(results)
    check_rerun(p, old)  # before anything is trained
    evaluator = ImageEvaluator(p.runs[0][1].data) if p.kind == "image" else None
    named = dict(p.runs)
    kept = old.get("families") if isinstance(old.get("families"), dict) else {}
    kept = {f: r for f, r in kept.items() if isinstance(r, dict)}
    order = [*named, *(f for f in kept if f not in named)]  # --families, then the others of the earlier report
    records: dict[str, dict[str, Any]] = {f: kept[f] for f in order if f in kept}
    doc = _document(p, records, evaluator, old)
    for i, fam in enumerate(order, 1):
        tag = f"[{i}/{len(order)}] {fam}"
        rec = kept.get(fam)
        if fam not in named:
            say(f"{tag}: kept from {results} (not in --families; the report keeps it)")
            rec["reused"] = True
            run_dir = Path(rec.get("run", ""))
        else:
            rc = named[fam]
            run_dir = rc.run_dir
            key = {"config": _jsonable(to_dict(rc)), "eval": p.eval_key}
            if rec is not None and rec.get("key") == key:
                say(f"{tag}: reused from {results} (trained and evaluated before)")
                rec["reused"] = True
            else:
                say(f"{tag}: started")
                rec = _run_family(fam, rc, p, evaluator, tag, say, fresh)
                rec.update(key=key, reused=False)
        if p.inception:
            inception_stage(fam, run_dir, rec, p, evaluator, tag, say)
        records[fam] = rec
        doc = _document(p, {f: records[f] for f in order if f in records}, evaluator, old)
        ckpt.atomic_write_json(results, doc)
        _remove_stale(p.folder, doc)
    table = write_reports(p.folder, doc)
    return CompareResult(p.folder, doc, table)


def _read_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s); every family is trained or evaluated again", path, e)
        return {}
    if not isinstance(doc, dict):
        log.warning("%s holds no compare results; every family is trained or evaluated again", path)
        return {}
    if doc.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} was written by another version of genlab compare (format "
                          f"{doc.get('format_version')}, this one writes {FORMAT_VERSION}); pass --name NEW to keep "
                          "that report, or --fresh to replace it")
    return doc


def _remove_stale(folder: Path, doc: dict[str, Any]) -> None:
    """Remove the samples_<family>.* files that no family of the report owns (families of an earlier report,
    or a family whose training stopped before its first checkpoint this time)."""
    keep = set()
    for fam, rec in doc["families"].items():
        if rec.get("samples_file"):
            keep |= {rec["samples_file"], f"samples_{fam}.npy"}
    for path in folder.glob("samples_*"):
        if path.suffix in SAMPLE_SUFFIXES and path.name not in keep and path.is_file():
            path.unlink()
            log.info("removed %s: no family of the report owns it", path)


def _document(plan: Plan, records: dict[str, Any], evaluator: ImageEvaluator | None,
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


def _run_family(fam: str, rc: api.RunConfig, plan: Plan, evaluator: ImageEvaluator | None, tag: str,
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
        eval_image(run, rec, plan, evaluator)
    else:
        eval_text(run, rc, rec, plan)
    _fill_missing(rec, plan.kind, "not measured")
    rec["eval_s"] = round(time.perf_counter() - t0, 2)
    keys = ["fid", "bits_per_dim", "mia_auc"] if plan.kind == "image" else ["bits_per_char", "mia_auc"]
    by_key = {c.key: c for c in columns(plan.kind)}
    shown = ", ".join(f"{by_key[k].title} {cell(rec, k)}" for k in keys)
    say(f"{tag}: evaluated in {rec['eval_s']:.1f} s: {shown}")
    return rec


def _fill_missing(rec: dict[str, Any], kind: str, reason: str) -> None:
    for c in columns(kind):
        if rec["metrics"].get(c.key) is None:
            rec["metrics"][c.key] = None
            rec["reasons"].setdefault(c.key, reason)


# ---------------------------------------------------------------- training (or reusing a finished run)


def _finished(state: dict[str, Any], tc) -> bool:
    return bool(state.get("done") or (tc.max_steps and state.get("step", 0) >= tc.max_steps)
                or (tc.max_minutes and state.get("elapsed_s", 0) >= tc.max_minutes * 60))


def _train(rc: api.RunConfig, fresh: bool, tag: str, say: Progress, plan: Plan) -> dict[str, Any]:
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
