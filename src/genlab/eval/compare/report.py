"""The compare report: from results.json to `report.md`, a self-contained `report.html` (plots and sample grids
embedded) and the plain-text table the CLI prints. Top-down: a one-line verdict, the main table (each column
marked with its better direction), how it was measured, intervals, runs, samples, plots."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core import checkpoint as ckpt
from .plan import TEXT_NEW_TOKENS, TEXT_TEMPERATURE

MARKS = {"lower": "↓", "higher": "↑", "half": "≈0.5"}
LEGEND = ("↓ lower is better, ↑ higher is better, ≈0.5 best near 0.5 (membership cannot be told / samples are "
          "no nearer to the training images than to held-out ones); unmarked columns describe the run.")


@dataclass(frozen=True)
class Column:
    title: str  # names the unit or scale where the number alone would not
    key: str  # the key in a record's metrics
    fmt: str  # a format spec, or "time"
    better: str | None = None  # "lower", "higher", "half" (best at 0.5) or None
    axis: str = ""  # the y-axis label of its bar chart (units)

    @property
    def header(self) -> str:
        return f"{self.title} {MARKS[self.better]}" if self.better else self.title


INCEPTION_COLUMNS = [Column("Inception FID", "fid_inception", ".1f", "lower", "Frechet distance (Inception)"),
                     Column("Inception KID (raw)", "kid_inception", ".4f", "lower", "raw KID (MMD²)")]
IMAGE_COLUMNS = [
    Column("FID (domain)", "fid", ".2f", "lower", "Frechet distance (domain features)"),
    Column("KID (domain, raw)", "kid", ".4f", "lower", "raw KID (MMD², domain features)"),
    Column("precision", "precision", ".3f", "higher", "fraction of samples"),
    Column("recall", "recall", ".3f", "higher", "fraction of real images"),
    Column("density", "density", ".3f", "higher", "density (1 = as dense as real)"),
    Column("coverage", "coverage", ".3f", "higher", "fraction of real images"),
    Column("bits/dim", "bits_per_dim", ".3f", "lower", "bits per dimension"),
    Column("MIA AUC", "mia_auc", ".3f", "half", "AUC (0.5 = private)"),
    Column("closer to train", "closer_to_train", ".2f", "half", "fraction of samples"),
    Column("parameters", "parameters", ",d"),
    Column("train time", "train_s", "time"),
    Column("s / 64 samples", "s_per_64", ".3g", "lower", "seconds"),
    Column("loss spikes", "loss_spikes", "d", "lower", "count"),
    Column("status", "status", "s"),
]
TEXT_COLUMNS = [
    Column("bits/char", "bits_per_char", ".3f", "lower", "bits per character"),
    Column("perplexity", "perplexity", ".2f", "lower", "perplexity"),
    *[Column(f"distinct-{n}", f"distinct_{n}", ".3f", "higher", f"distinct {n}-grams / all") for n in range(1, 5)],
    Column("self-BLEU", "self_bleu", ".1f", "lower", "BLEU (0-100)"),
    Column("longest copy", "longest_copy", "d", "lower", "characters"),
    Column("copies >= 50 chars", "copy_fraction", ".2f", "lower", "fraction of samples"),
    Column("MIA AUC", "mia_auc", ".3f", "half", "AUC (0.5 = private)"),
    Column("parameters", "parameters", ",d"),
    Column("train time", "train_s", "time"),
    Column("s / sample", "s_per_sample", ".3g", "lower", "seconds"),
    Column("loss spikes", "loss_spikes", "d", "lower", "count"),
    Column("status", "status", "s"),
]
COLUMNS = {c.key: c for c in IMAGE_COLUMNS + TEXT_COLUMNS + INCEPTION_COLUMNS}
PLOTS = {"image": ["fid", "kid", "precision", "recall", "density", "coverage", "bits_per_dim", "mia_auc"],
         "text": ["bits_per_char", "perplexity", "distinct_2", "distinct_4", "self_bleu", "mia_auc"]}
KID_NOTE = ("KID is the raw unbiased MMD² of the cubic polynomial kernel (Binkowski et al. 2018), the scale "
            "torchmetrics and the README use (not multiplied by 1000). Its size depends on the feature space: "
            "KID (domain) and Inception KID are not on one scale, so read each within its own column.")


def columns(kind: str) -> list[Column]:
    return IMAGE_COLUMNS if kind == "image" else TEXT_COLUMNS


# ---------------------------------------------------------------- cells and tables


def _format(v: Any, fmt: str) -> str:
    if isinstance(v, str):
        return v
    if fmt == "time":
        return f"{v:.0f} s" if v >= 10 else f"{v:.1f} s"
    if fmt in (",d", "d"):
        return format(int(v), fmt)
    return format(v, fmt)


def cell(rec: dict[str, Any], key: str) -> str:
    """A record's metric as the table shows it: formatted, its tag in brackets, or "n/a"."""
    v = rec["metrics"].get(key)
    if v is None:
        return "n/a"
    tag = rec.get("tags", {}).get(key)
    return _format(v, COLUMNS[key].fmt) + (f" ({tag})" if tag else "")


def _table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers, rows and the numbered footnotes (the reasons behind every n/a)."""
    cols = columns(doc["kind"])
    if doc.get("inception"):
        cols = cols[:2] + INCEPTION_COLUMNS + cols[2:]
    notes: list[str] = []
    rows = []
    for fam, rec in doc["families"].items():
        row = [fam]
        for c in cols:
            text = cell(rec, c.key)
            if text == "n/a":
                note = f"{fam}, {c.title}: {rec['reasons'].get(c.key, 'not measured')}"
                if note not in notes:
                    notes.append(note)
                text = f"n/a [{notes.index(note) + 1}]"
            row.append(text)
        rows.append(row)
    return ["family", *(c.header for c in cols)], rows, [f"[{i}] {n}" for i, n in enumerate(notes, 1)]


def _interval_table(doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cols = [*(COLUMNS[k] for k in ("fid", "kid", "precision", "recall", "density", "coverage")),
            Column("IS", "inception_score", ".2f", "higher")]
    rows = []
    for fam, rec in doc["families"].items():
        im = rec.get("details", {}).get("image_metrics")
        if not im:
            continue
        row = [fam]
        for c in cols:
            lo, hi = im.get(f"{c.key}_ci") or (None, None)
            row.append(f"{format(im[c.key], c.fmt)} [{format(lo, c.fmt)}, {format(hi, c.fmt)}]" if lo is not None
                       else format(im[c.key], c.fmt))
        acc = rec["metrics"].get("class_accuracy")
        row += [f"{acc:.1%}" if acc is not None else "n/a (unconditional)", f"{im['n_fake']} / {im['n_real']}"]
        rows.append(row)
    return ["family", *(c.header for c in cols), "class accuracy ↑", "samples / real"], rows


def _plain_table(headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + ([""] + notes if notes else []))


# ---------------------------------------------------------------- the verdict


def _and(names: list[str]) -> str:
    return " and ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " and " + names[-1]


def verdict(doc: dict[str, Any]) -> str:
    """One line: which family is best on the headline metrics, all lower-is-better (markdown bold on the names)."""
    fams = list(doc["families"])
    keys = (["fid"] + (["fid_inception"] if doc.get("inception") else []) + ["bits_per_dim"]
            if doc["kind"] == "image" else ["bits_per_char"])
    wins: dict[str, list[str]] = {}  # family -> the metrics it is best on, in the order of `keys`
    missing = []
    for key in keys:
        c = COLUMNS[key]
        vals = {f: r["metrics"].get(key) for f, r in doc["families"].items()}
        have = {f: v for f, v in vals.items() if isinstance(v, int | float) and math.isfinite(v)}
        if not have:
            missing.append(c.title)
            continue
        fam = min(have, key=have.__getitem__)
        extras = [doc["families"][fam].get("tags", {}).get(key)]
        without = [f for f in vals if f not in have]
        extras.append(f"{_and(without)} give{'s' if len(without) == 1 else ''} none" if without else None)
        extras = [e for e in extras if e]
        wins.setdefault(fam, []).append(f"{c.title} {_format(have[fam], c.fmt)}"
                                        + (f" ({'; '.join(extras)})" if extras else ""))
    if not wins:
        return f"Verdict: no family gave a {' or '.join(missing)} (see the status column)."
    if len(fams) == 1:
        gone = f"; no {' or '.join(missing)}" if missing else ""
        return f"Verdict: only **{fams[0]}** was measured: {', '.join(wins[fams[0]])}{gone}."
    gone = f"; no family gave a {' or '.join(missing)}" if missing else ""
    parts = [f"**{fam}** {'is best ' if i == 0 else ''}on {_and(won)}" for i, (fam, won) in enumerate(wins.items())]
    each = " for each" if len(keys) - len(missing) > 1 else ""
    return f"Verdict: {'; '.join(parts)}{gone} (lower is better{each})."


# ---------------------------------------------------------------- prose


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
            f"class-conditional runs cycle through the classes) against the held-out split {space}. FID (domain), "
            "KID (domain), precision, recall, density and coverage over these features compare the families of "
            "this report with each other; they are not Inception-FID numbers. Bits/dim: `genlab eval` on the "
            "held-out split (exact = an exact log-likelihood, bound = the IWAE / ELBO bound). MIA AUC: the "
            f"loss-threshold membership attack on {doc['mia_examples']} training vs {doc['mia_examples']} held-out "
            "images with the family's per-image score (in brackets); 0.5 = members cannot be told apart. Closer to "
            "train: the fraction of samples whose nearest training image (pixels) is nearer than the nearest "
            "held-out one (0.5 = generalizes, 1 = copies). s / 64 samples: the wall time of one batch of 64.")
        paras.append(KID_NOTE)
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
        for note in (d.get("fid_note"), rec.get("inception", {}).get("fid_note")):
            if note:
                parts.append(note.removeprefix(f"{fam}: "))
        if rec.get("reused"):
            parts.append("reused from an earlier compare")
        out.append(f"{fam}: " + "; ".join(parts))
    return out


# ---------------------------------------------------------------- plots


def _plots(folder: Path, doc: dict[str, Any]) -> list[tuple[str, str]]:
    """metrics.png (a bar chart per metric, its better direction in the title, its unit on the y axis) and
    train_loss.png (the curves, spikes marked); a train_loss.png of an earlier report without curves is removed."""
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas renders the PNG

    fams = list(doc["families"])
    keys = PLOTS[doc["kind"]]
    colours = {f: f"C{i % 10}" for i, f in enumerate(fams)}
    long_names = len(fams) > 4 or max(map(len, fams)) > 8
    cols = 4 if len(keys) > 6 else 3
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, key in zip(axes, keys, strict=False):
        c = COLUMNS[key]
        vals = [doc["families"][f]["metrics"].get(key) for f in fams]
        ax.bar(range(len(fams)), [0 if v is None else v for v in vals], color=[colours[f] for f in fams])
        top = max([v for v in vals if v is not None] + [0])
        for i, v in enumerate(vals):
            label = "n/a" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
            ax.text(i, 0 if v is None else v, label, ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        if c.better == "half":
            ax.axhline(0.5, color="grey", lw=1, ls="--")
        ax.set_xticks(range(len(fams)), fams, fontsize=10, rotation=30 if long_names else 0,
                      ha="right" if long_names else "center", rotation_mode="anchor")
        ax.tick_params(axis="y", labelsize=9)
        ax.set_title(f"{c.title}\n({c.better} is better)" if c.better in ("lower", "higher")
                     else f"{c.title}\n(best near 0.5)", fontsize=11)
        ax.set_ylabel(c.axis, fontsize=10)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    out = [("metrics per family (bar labels: the values; n/a: not measured)",
            _save_figure(fig, folder / "metrics.png"))]
    curves = {f: r["details"].get("stability", {}) for f, r in doc["families"].items()}
    curves = {f: s for f, s in curves.items() if s.get("curve")}
    if not curves:
        (folder / "train_loss.png").unlink(missing_ok=True)
        return out
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(4.4 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax in axes[len(curves) :]:
        ax.set_visible(False)
    for ax, (fam, s) in zip(axes, curves.items(), strict=False):
        ax.plot(s["curve"]["step"], s["curve"]["train_loss"], color=colours[fam], lw=1.2)
        spikes = set(s["spike_steps"])
        pts = [(st, v) for st, v in zip(s["curve"]["step"], s["curve"]["train_loss"], strict=True) if st in spikes]
        if pts:
            ax.plot(*zip(*pts, strict=True), "rx", markersize=8)
        ax.set_title(f"{fam}: {s['loss_spikes']} spike(s)", fontsize=11)
        ax.set_xlabel("training step", fontsize=10)
        ax.set_ylabel("train_loss (the family's units)", fontsize=10)
        ax.tick_params(labelsize=9)
    out.append(("training loss (logged train_loss, each family in its own units; red x: spikes)",
                _save_figure(fig, folder / "train_loss.png")))
    return out


def _save_figure(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    ckpt.atomic_write_bytes(path, buf.getvalue())
    return path.name


# ---------------------------------------------------------------- the documents


def _blocks(folder: Path, doc: dict[str, Any]) -> tuple[list[tuple], str]:
    """The report as neutral blocks (rendered to markdown and HTML) and the plain-text verdict and table."""
    headers, rows, notes = _table(doc)
    fams = list(doc["families"])
    line = verdict(doc)
    b: list[tuple] = [("h1", f"genlab compare: {', '.join(fams)} on {doc['data']}"), ("p", line),
                      ("table", headers, rows), ("p", LEGEND)]
    if notes:
        b += [("p", "n/a: the metric does not exist for that family (or could not be measured):"), ("list", notes)]
    b.append(("h2", "How this was measured"))
    b += [("p", p) for p in _intro(doc)]
    if doc["kind"] == "image":
        ci_headers, ci_rows = _interval_table(doc)
        if ci_rows:
            b += [("h2", "Intervals"),
                  ("p", ("95% bootstrap intervals (the samples and the real images resampled with replacement, "
                         "20 times), the Inception Score (over the domain classifier's logits, 10 splits, or one "
                         "per sample with fewer samples) and the class accuracy of class-conditional runs:")),
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
    plain = line.replace("**", "") + "\n\n" + _plain_table(headers, rows, notes) + "\n" + LEGEND
    return b, plain


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

    def inline(text: str) -> str:  # `code` and **bold** spans of the markdown
        text = re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(text, quote=False))
        return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)

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


def write_reports(folder: Path, doc: dict[str, Any]) -> str:
    """report.md, report.html and the plots in `folder`; returns the verdict and table as plain text."""
    blocks, table = _blocks(folder, doc)
    ckpt.atomic_write_text(folder / "report.md", _markdown(blocks))
    ckpt.atomic_write_text(folder / "report.html", _html(blocks, folder))
    return table
