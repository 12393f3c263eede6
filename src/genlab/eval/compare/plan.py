"""The request of a compare, checked before anything is trained: the data, the families and their run configs
(`<configs>/<family>/<data>.toml` with the shared budget), the evaluation settings, and the settings that make
a report folder one comparison (`Plan.settings`: a rerun with other settings is refused)."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import api
from ...core.config import apply_overrides, load_toml, to_dict
from ...core.errors import ConfigError
from ...data.datasets import SOURCES
from ...models import MODELS
from ..features import inception_weights

FORMAT_VERSION = 1
MAX_BUDGET_MINUTES = 24 * 60.0
SAMPLES_DEFAULT = {"image": 1000, "text": 20}
TEXT_TEMPERATURE, TEXT_NEW_TOKENS = 0.8, 300
CHUNK = 250  # images sampled / scored at a time
# the Inception settings of the compare: benchmarks/fid_inception.py measures them against fp32
INCEPTION_SETTINGS = {"precision": "fp32", "channels_last": True, "freeze": True, "batch_size": 16}
_DATA_FILES = {"shakespeare": "shakespeare_char"}  # --data name -> config file stem (default: '-' -> '_')

Progress = Callable[[str], None]

# the settings that make a report folder one comparison: results.json key -> (option, how a user sets it)
SETTINGS = {"data": "--data", "budget_minutes": "--budget-minutes", "max_steps": "--max-steps",
            "samples": "--samples", "mia_examples": "--mia-images", "overrides": "--set",
            "config_file": "--configs"}


@dataclass
class Plan:
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

    @property
    def settings(self) -> dict[str, Any]:
        """The values of SETTINGS, as results.json stores them."""
        return {"data": self.data, "budget_minutes": self.budget_minutes, "max_steps": self.max_steps,
                "samples": self.samples, "mia_examples": self.mia, "overrides": self.overrides,
                "config_file": self.config_file}


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def config_stem(data: str) -> str:
    """The file stem of a data source's configs: fashion-mnist -> fashion_mnist, shakespeare -> shakespeare_char."""
    return _DATA_FILES.get(data, data.replace("-", "_"))


def catalog(configs: str | Path = "configs") -> dict[str, list[str]]:
    """{data: [families]}: the data sources and families a compare can run with the configs in `configs`
    (a `<family>/<data>.toml` of a registered family that learns that kind of data)."""
    folder, out = Path(configs), {}
    for data, source in SOURCES.items():
        fams = [f for f in MODELS.names() if MODELS.get(f).modality == source.kind
                and (folder / f / f"{config_stem(data)}.toml").is_file()]
        if fams:
            out[data] = fams
    return out


def describe_catalog(cat: dict[str, list[str]]) -> str:
    """'digits (vae, gan, ...); shakespeare (ngram, gpt)'."""
    return "; ".join(f"{data} ({', '.join(fams)})" for data, fams in cat.items())


def make_plan(data: str, families: str | Sequence[str], budget_minutes: float, *, name: str | None,
              samples: int | None, mia_images: int, max_steps: int | None, overrides: Sequence[str],
              configs: str | Path, out: str | Path, inception: bool = False) -> Plan:
    """Check a compare request and resolve each family's run config; raises ConfigError with the fix."""
    configs = Path(configs)
    if not configs.is_dir():
        raise ConfigError(f"configs folder {str(configs)!r} not found; run from the repository root (it holds "
                          "configs/) or pass --configs DIR")
    works = catalog(configs)
    if data not in SOURCES:
        raise ConfigError(f"--data {data!r} is unknown; with the configs in {configs}, compare works on: "
                          f"{describe_catalog(works) or 'nothing (no <family>/<data>.toml files)'}")
    kind = SOURCES[data].kind
    fams = [f.strip() for f in (families.split(",") if isinstance(families, str) else families)]
    fams = [f for f in fams if f]
    same_kind = ", ".join(n for n in MODELS.names() if MODELS.get(n).modality == kind)
    if not fams:
        raise ConfigError(f"--families is empty; give a comma-separated list, e.g. "
                          f"{','.join(works.get(data, [])) or same_kind}")
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
    stem = config_stem(data)
    folder = Path(out) / name
    runs = []
    for f in fams:
        path = configs / f / f"{stem}.toml"
        if not path.is_file():
            have = works.get(data)
            raise ConfigError(f"no config for {f} on {data}: {path} does not exist ("
                              + (f"{configs} has {data} configs for {', '.join(have)}" if have else
                                 f"with {configs}, compare works on: {describe_catalog(works) or 'nothing'}")
                              + "; write one, or pass --configs DIR with <family>/<data>.toml files)")
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
    return Plan(kind, data, folder, float(budget_minutes), max_steps, samples, mia_images, bool(inception),
                list(overrides), str(configs / "<family>" / f"{stem}.toml"), runs)


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "unset"
    if key == "overrides":
        return " --set ".join(value) if value else "(none)"
    if key == "config_file":
        return str(Path(value).parent.parent)
    if key == "budget_minutes":
        return f"{value:g}"
    return str(value)


def check_rerun(plan: Plan, old: dict[str, Any]) -> None:
    """Refuse to mix settings in one report folder: a one-line ConfigError naming what differs."""
    differ = [k for k in SETTINGS if k in old and old[k] != plan.settings[k]]
    if old.get("kind") not in (None, plan.kind) and "data" not in differ:
        differ.insert(0, "data")
    if not differ:
        return
    now = plan.settings
    was = ", ".join(f"{SETTINGS[k]} {_shown(k, old.get(k))}" for k in differ)
    asked = ", ".join(f"{SETTINGS[k]} {_shown(k, now[k])}" for k in differ)
    raise ConfigError(f"{plan.folder} holds a compare made with {was}, not {asked}; pass --name NEW to keep both "
                      "reports, or --fresh to replace that one")
