"""Guardrails: an ordered list of checks, configured as data (TOML), applied by one pipeline to what goes into a
model (the user's input, retrieved RAG passages) and what comes out of it.

Each check has a kind, the stages it applies to ("input", "output", "passage"), an action ("allow" records a
finding, "redact" replaces it with a readable placeholder such as "[EMAIL]", "refuse" rejects the text) and a
reason. Kinds:

- `pii`: personal data (EMAIL, PHONE, CREDIT_CARD, IBAN, IP_ADDRESS, URL) found by presidio-analyzer's pattern
  recognizers, run offline on an NLP engine that loads no model (names need a statistical NER model, which no
  package offers offline: not detected), plus genlab's own validated card pattern (brand prefix and length, Luhn),
  and filters for what presidio gets wrong (bare "domains" such as "St.John", version numbers as IP addresses,
  order and reference numbers as phone numbers).
- `blocklist`: words and phrases, whole-word and case-insensitive.
- `injection`: regular expressions for prompt injection ("ignore previous instructions", role and template
  markers, system-prompt exfiltration, ...), for user input and retrieved passages.
- `limits`: output limits (characters, lines repeated more than N times).

`Guardrails.load(path | None)` reads a TOML file (None: the packaged default, guardrails.toml);
`guard.check(text, stage)` returns a `Verdict`; `guard.enforce` and `guard.stream` are what api.py uses.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import importlib.util
import logging
import re
import shutil
import tempfile
import threading
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..core.errors import ConfigError, GuardrailRefusal

log = logging.getLogger(__name__)

STAGES = ("input", "output", "passage")
ACTIONS = ("allow", "redact", "refuse")  # in order of severity
DEFAULT_CONFIG = Path(__file__).with_name("guardrails.toml")
PII_ENTITIES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "URL")


# ----------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Finding:
    """One thing a check found: which check, what kind (EMAIL, PROMPT_INJECTION, ...), where (character offsets
    in the checked text), the check's action and reason. The matched text itself is not kept (it may be the very
    personal data an audit trail must not store)."""

    check: str
    kind: str
    start: int
    end: int
    action: str
    reason: str
    replacement: str = field(default="", repr=False, compare=False)  # what redaction puts in its place

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "kind": self.kind, "start": self.start, "end": self.end,
                "action": self.action, "reason": self.reason}


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking one text: the most severe action of its findings ("allow" when none), the text
    with every "redact" finding replaced by its placeholder, and the findings in text order."""

    action: str
    text: str
    findings: list[Finding]
    stage: str = "input"
    original_length: int = 0

    @property
    def refused(self) -> bool:
        return self.action == "refuse"

    @property
    def changed(self) -> bool:
        return any(f.action == "redact" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what an audit trail records."""
        return {"stage": self.stage, "action": self.action, "refused": self.refused, "changed": self.changed,
                "text": self.text, "findings": [f.to_dict() for f in self.findings]}


# ----------------------------------------------------------------------------------------------- checks

@dataclass
class Check:
    """Common fields of every check; a kind adds its options and `scan`."""

    name: str
    kind: str
    stages: tuple[str, ...]
    action: str
    reason: str
    placeholder: str | None = None  # None: "[KIND]"

    OPTIONS: ClassVar[tuple[str, ...]] = ()  # the kind's own keys in the TOML

    def scan(self, text: str, before: str, cache: dict) -> list[Finding]:
        raise NotImplementedError

    def finding(self, kind: str, start: int, end: int, replacement: str | None = None) -> Finding:
        rep = replacement if replacement is not None else (self.placeholder or "[{kind}]").format(kind=kind)
        return Finding(self.name, kind, start, end, self.action, self.reason, rep)


def _string_list(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{what} must be a list of non-empty strings, not {value!r}")
    return tuple(value)


@dataclass
class BlockList(Check):
    """Words and phrases, whole-word and case-insensitive; spaces in a phrase match any run of whitespace."""

    terms: tuple[str, ...] = ()
    OPTIONS = ("terms",)

    def __post_init__(self):
        self.terms = _string_list(self.terms, f"check {self.name!r}: terms")
        alts = sorted((r"\s+".join(map(re.escape, t.split())) for t in self.terms), key=len, reverse=True)
        self._re = re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)

    def scan(self, text, before, cache):
        return [self.finding("BLOCKED_TERM", m.start(), m.end(), self.placeholder or "[BLOCKED]")
                for m in self._re.finditer(text)]


@dataclass
class Injection(Check):
    """Prompt-injection patterns: regular expressions (Python syntax), matched case-insensitively."""

    patterns: tuple[str, ...] = ()
    OPTIONS = ("patterns",)

    def __post_init__(self):
        self.patterns = _string_list(self.patterns, f"check {self.name!r}: patterns")
        try:
            self._re = [re.compile(p, re.IGNORECASE | re.MULTILINE) for p in self.patterns]
        except re.error as e:
            raise ConfigError(f"check {self.name!r}: a pattern is not a valid regular expression: {e}") from None

    def scan(self, text, before, cache):
        spans = sorted((m.start(), m.end()) for r in self._re for m in r.finditer(text) if m.end() > m.start())
        return [self.finding("PROMPT_INJECTION", s, e, self.placeholder or "[REMOVED INSTRUCTION]")
                for s, e in _merge(spans)]


@dataclass
class Limits(Check):
    """Output limits: at most `max_chars` characters (redact = cut there, "[TRUNCATED]"), and no line of at least
    `min_line_chars` characters more than `max_repeats` times (redact = drop the repeats). In a stream, `before`
    is the text already released, so the limits count the whole output."""

    max_chars: int | None = None
    max_repeats: int | None = None
    min_line_chars: int = 16
    OPTIONS = ("max_chars", "max_repeats", "min_line_chars")

    def __post_init__(self):
        for key in self.OPTIONS:
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ConfigError(f"check {self.name!r}: {key} = {v!r} must be a positive integer")
        if self.max_chars is None and self.max_repeats is None:
            raise ConfigError(f"check {self.name!r}: a limits check needs max_chars or max_repeats")

    def scan(self, text, before, cache):
        out, offset = [], len(before)
        if self.max_repeats is not None:
            full, seen, pos = before + text, {}, 0
            for line in full.splitlines(keepends=True):
                start, pos = pos, pos + len(line)
                key = " ".join(line.split())
                if len(key) < self.min_line_chars:
                    continue
                seen[key] = seen.get(key, 0) + 1
                if seen[key] > self.max_repeats and pos > offset:
                    out.append(self.finding("REPEATED_LINE", max(start, offset) - offset, pos - offset, ""))
        if self.max_chars is not None and offset + len(text) > self.max_chars:
            cut = max(self.max_chars - offset, 0)
            out = [f for f in out if f.start < cut]
            out.append(self.finding("TOO_LONG", cut, len(text), "" if offset >= self.max_chars else
                                    (self.placeholder or " [TRUNCATED]")))
        return out


@dataclass
class PersonalData(Check):
    """Personal data of the listed `entities`; `phone_regions`: the countries whose national phone formats are
    recognized (international "+CC ..." numbers are recognized for every country)."""

    entities: tuple[str, ...] = PII_ENTITIES
    phone_regions: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN", "CA", "AU", "IT", "ES", "NL", "BR")
    OPTIONS = ("entities", "phone_regions")

    def __post_init__(self):
        self.entities = _string_list(list(self.entities), f"check {self.name!r}: entities")
        bad = [e for e in self.entities if e not in PII_ENTITIES]
        if bad:
            raise ConfigError(f"check {self.name!r}: unknown entities {bad} (known: {', '.join(PII_ENTITIES)}; "
                              "names need a statistical NER model, which genlab cannot load offline)")
        self.phone_regions = tuple(r.upper() for r in _string_list(list(self.phone_regions),
                                                                   f"check {self.name!r}: phone_regions"))
        if importlib.util.find_spec("presidio_analyzer") is None:
            raise ConfigError(f"check {self.name!r} (personal data) needs presidio-analyzer: "
                              "pip install 'genlab[safety]'")

    def scan(self, text, before, cache):
        key = ("pii", self.phone_regions)
        if key not in cache:
            cache[key] = find_personal_data(text, self.phone_regions)
        return [self.finding(kind, s, e) for kind, s, e in cache[key] if kind in self.entities]


KINDS: dict[str, type[Check]] = {"pii": PersonalData, "blocklist": BlockList, "injection": Injection,
                                 "limits": Limits}
_COMMON = ("name", "kind", "stages", "action", "reason", "placeholder")


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


# ----------------------------------------------------------------------------------------------- the pipeline

class Guardrails:
    """An ordered list of checks. `check(text, stage)` runs every check that applies to the stage."""

    def __init__(self, checks: Iterable[Check], source: str = "<checks>"):
        self.checks = list(checks)
        self.source = source

    def __repr__(self) -> str:
        return f"Guardrails({self.source}: {', '.join(c.name for c in self.checks)})"

    # ---- configuration
    @classmethod
    def load(cls, path: str | Path | None = None) -> Guardrails:
        """Read checks from a TOML file: `[[check]]` tables with name, kind, stages, action, reason and the kind's
        options. None: the packaged default (safety/guardrails.toml)."""
        p = DEFAULT_CONFIG if path is None else Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"guardrails config {p} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"guardrails config {p} cannot be read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"guardrails config {p} is not valid TOML: {e}") from None
        try:
            return cls.from_dict(data, source=str(p))
        except ConfigError as e:
            raise ConfigError(f"guardrails config {p}: {e}") from None

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> Guardrails:
        extra = set(data) - {"check"}
        if extra:
            raise ConfigError(f"unknown top-level keys {sorted(extra)}: write each check as a [[check]] table")
        tables = data.get("check", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise ConfigError("'check' must be an array of tables ([[check]])")
        checks, names = [], set()
        for n, t in enumerate(tables, 1):
            checks.append(_make_check(t, n))
            if checks[-1].name in names:
                raise ConfigError(f"two checks are named {checks[-1].name!r}: names must be unique")
            names.add(checks[-1].name)
        return cls(checks, source)

    # ---- checking
    def check(self, text: str, stage: str = "input", *, before: str = "") -> Verdict:
        """Run the checks of `stage` on `text`. `before`: text of the same output already checked and released
        (a stream): output limits count it; the other checks do not scan it again."""
        if stage not in STAGES:
            raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
        if not isinstance(text, str):
            raise ConfigError(f"guardrails check a string, not {type(text).__name__}")
        cache: dict = {}
        found: list[Finding] = []
        for c in self.checks:
            if stage in c.stages:
                found += c.scan(text, before, cache)
        found = _resolve_overlaps(found)
        action = max((f.action for f in found), key=ACTIONS.index, default="allow")
        if found:
            log.info("guardrails (%s): %s", stage, ", ".join(f"{f.check}/{f.kind} -> {f.action}" for f in found))
        return Verdict(action, _redact(text, found), found, stage, len(text))

    def enforce(self, text: str, stage: str = "input") -> str:
        """The text as the pipeline lets it through (redacted), or `GuardrailRefusal` carrying the verdict."""
        v = self.check(text, stage)
        if v.refused:
            raise GuardrailRefusal(v, stage)
        return v.text

    def stream(self, deltas: Iterable, stage: str = "output", *, hold_max: int = 2000) -> Iterator:
        """Guard a stream of `TextDelta(index, text, done)`s. Text is held back until a line or sentence ends
        (a newline, or . ! ? followed by a space), then that piece is checked and released, redacted; a refusal
        raises `GuardrailRefusal` before the refused piece is shown. A piece without such an end is released
        at its last space once `hold_max` characters wait. A sample cut by an output limit ends there."""
        pending: dict[int, str] = {}
        released: dict[int, str] = {}
        ended: set[int] = set()
        for d in deltas:
            i = d.index
            if i in ended:
                continue
            buf = pending.get(i, "") + d.text
            cut = len(buf) if d.done else _release_point(buf, hold_max)
            out = ""
            if cut:
                piece, buf = buf[:cut], buf[cut:]
                v = self.check(piece, stage, before=released.get(i, ""))
                if v.refused:
                    raise GuardrailRefusal(v, stage)
                released[i] = released.get(i, "") + piece
                out = v.text
                if any(f.kind == "TOO_LONG" and f.action == "redact" for f in v.findings):
                    ended.add(i)
                    yield dataclasses.replace(d, text=out, done=True)
                    continue
            pending[i] = buf
            if out or d.done:
                yield dataclasses.replace(d, text=out)


_SENTENCE_END = re.compile(r"\n|[.!?][\"')\]\u2019\u201d]*\s")


def _release_point(buf: str, hold_max: int) -> int:
    ends = [m.end() for m in _SENTENCE_END.finditer(buf)]
    if ends:
        return ends[-1]
    if len(buf) >= hold_max:
        return buf.rfind(" ") + 1 or len(buf)
    return 0


def _make_check(t: dict, n: int) -> Check:
    name = t.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"check #{n} needs a name")
    kind = t.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"check {name!r}: unknown kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    cls = KINDS[kind]
    unknown = set(t) - set(_COMMON) - set(cls.OPTIONS)
    if unknown:
        raise ConfigError(f"check {name!r}: unknown keys {sorted(unknown)} (a {kind} check takes: "
                          f"{', '.join(_COMMON + cls.OPTIONS)})")
    stages = t.get("stages", list(STAGES))
    if isinstance(stages, str):
        stages = [stages]
    if not isinstance(stages, list) or not stages or any(s not in STAGES for s in stages):
        raise ConfigError(f"check {name!r}: stages = {stages!r} must be a list of {', '.join(STAGES)}")
    action = t.get("action")
    if action not in ACTIONS:
        raise ConfigError(f"check {name!r}: action = {action!r} must be one of {', '.join(ACTIONS)}")
    reason = t.get("reason", name)
    placeholder = t.get("placeholder")
    if not isinstance(reason, str) or (placeholder is not None and not isinstance(placeholder, str)):
        raise ConfigError(f"check {name!r}: reason and placeholder must be strings")
    opts = {k: (tuple(v) if isinstance(v, list) else v) for k, v in t.items() if k in cls.OPTIONS}
    return cls(name=name, kind=kind, stages=tuple(stages), action=action, reason=reason, placeholder=placeholder,
               **opts)


def _resolve_overlaps(found: list[Finding]) -> list[Finding]:
    """Findings in text order. Of overlapping personal-data findings the longest wins (the URL inside an e-mail
    address, the phone number inside a card number); redactions of other kinds that overlap are merged by
    `_redact`."""
    pii = sorted((f for f in found if f.kind in PII_ENTITIES), key=lambda f: (f.start - f.end, f.start))
    kept: list[Finding] = []
    for f in pii:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    rest = [f for f in found if f.kind not in PII_ENTITIES]
    return sorted(kept + rest, key=lambda f: (f.start, -f.end))


def _redact(text: str, found: list[Finding]) -> str:
    """Each "redact" finding replaced by its placeholder; overlapping ones replaced once, by the first."""
    out, pos = [], 0
    for f in sorted((f for f in found if f.action == "redact"), key=lambda f: (f.start, -f.end)):
        if f.start < pos:  # overlaps a span already replaced
            pos = max(pos, f.end)
            continue
        out += [text[pos:f.start], f.replacement]
        pos = f.end
    out.append(text[pos:])
    return "".join(out)


@functools.lru_cache(maxsize=1)
def default_guardrails() -> Guardrails:
    return Guardrails.load(None)


def as_guardrails(guard) -> Guardrails | None:
    """What api.py accepts as `guard=`: None/False (no guardrails), True (the default checks), a path to a TOML
    file, or a `Guardrails`."""
    if guard is None or guard is False:
        return None
    if guard is True:
        return default_guardrails()
    if isinstance(guard, Guardrails):
        return guard
    if isinstance(guard, str | Path):
        return Guardrails.load(guard)
    raise ConfigError(f"guard={guard!r}: give True (the default checks), a TOML path or a Guardrails")


# ----------------------------------------------------------------------------------------------- personal data

_PRESIDIO = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN",
             "IP_ADDRESS": "IP_ADDRESS", "URL": "URL"}
_engines: dict[tuple[str, ...], Any] = {}
_engines_lock = threading.Lock()


def _nlp_engine():
    """An NLP engine that loads no model: presidio's no-op engine where this presidio has it, else a blank spaCy
    pipeline saved to a temporary folder (presidio's default engine would try to download en_core_web_lg)."""
    try:
        from presidio_analyzer.nlp_engine import NoOpNlpEngine

        engine = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
    except ImportError:
        import spacy
        from presidio_analyzer.nlp_engine import NlpEngineProvider

        folder = tempfile.mkdtemp(prefix="genlab-spacy-blank-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        spacy.blank("en").to_disk(folder)
        engine = NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": folder}]}).create_engine()
    engine.load()
    return engine


def presidio_engine(phone_regions: tuple[str, ...]):
    """presidio's AnalyzerEngine with only the pattern recognizers genlab uses; built once per process (and set
    of phone regions) and shared: it is thread-safe for analysis."""
    with _engines_lock:
        if phone_regions not in _engines:
            import tldextract
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.predefined_recognizers import (
                CreditCardRecognizer,
                EmailRecognizer,
                IbanRecognizer,
                IpRecognizer,
                PhoneRecognizer,
                UrlRecognizer,
            )

            quiet = logging.getLogger("presidio-analyzer")
            if quiet.level == logging.NOTSET:  # it logs every recognizer it loads and every text it analyzes
                quiet.setLevel(logging.WARNING)
            offline = tldextract.TLDExtract(suffix_list_urls=())  # the bundled suffix list; never fetched

            class OfflineEmail(EmailRecognizer):
                """presidio's check wants a registrable domain, so it rejects name@verona.it (verona.it is itself a
                public suffix, as are many city and province domains); a known suffix is enough here."""

                def validate_result(self, pattern_text: str):
                    return offline(pattern_text.rpartition("@")[2]).suffix != ""

            recognizers = [OfflineEmail(), PhoneRecognizer(supported_regions=list(phone_regions)),
                           CreditCardRecognizer(), IbanRecognizer(), IpRecognizer(), UrlRecognizer()]
            registry = RecognizerRegistry(recognizers=recognizers, supported_languages=["en"])
            _engines[phone_regions] = AnalyzerEngine(registry=registry, nlp_engine=_nlp_engine(),
                                                     supported_languages=["en"])
        return _engines[phone_regions]


def find_personal_data(text: str, phone_regions: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(entity, start, end) of the personal data in `text`: presidio's findings that pass genlab's validators,
    plus the cards its pattern misses."""
    raw = [(_PRESIDIO[r.entity_type], r.start, r.end)
           for r in presidio_engine(phone_regions).analyze(text, language="en", entities=list(_PRESIDIO))]
    raw = [(k, s, e) for k, s, e in raw if k != "CREDIT_CARD"] + [("CREDIT_CARD", m.start(), m.end())
                                                                  for m in _CARD.finditer(text)]
    return [(k, s, e) for k, s, e in raw if _VALID.get(k, lambda t, s, e: True)(text, s, e)]


# Cards: 12-19 digits, unbroken or in the groupings printed on cards (4-4-4-4[-3], Amex 4-6-5, Diners 4-6-4).
_CARD = re.compile(r"(?<![\w.-])(?:\d{12,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{4}(?:\1\d{3})?|\d{4}([ -])\d{6}\2\d{4,5})"
                   r"(?![\w]|[.,-]\d)")
# (issuer prefixes, allowed lengths): Visa, Mastercard (51-55, 2221-2720), Amex, Discover, JCB, Diners, UnionPay,
# Maestro; ISO/IEC 7812 issuer identification numbers as the brands publish them.
_BRANDS = [
    (("4",), (13, 16, 19)),
    (tuple(str(p) for p in range(51, 56)) + tuple(str(p) for p in range(2221, 2721)), (16,)),
    (("34", "37"), (15,)),
    (("6011", "65") + tuple(str(p) for p in range(644, 650)), (16, 17, 18, 19)),
    (tuple(str(p) for p in range(3528, 3590)), (16, 17, 18, 19)),
    (("36", "38", "39") + tuple(str(p) for p in range(300, 306)), (14, 15, 16, 17, 18, 19)),
    (("62",), (16, 17, 18, 19)),
    (("5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763"), tuple(range(12, 20))),
]


def luhn_ok(digits: str) -> bool:
    """The Luhn mod-10 check (ISO/IEC 7812-1, annex B): double every second digit from the right."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def card_ok(number: str) -> bool:
    digits = re.sub(r"[ -]", "", number)
    if not digits.isdigit() or not luhn_ok(digits):
        return False
    return any(digits.startswith(prefixes) and len(digits) in lengths for prefixes, lengths in _BRANDS)


def iban_ok(iban: str) -> bool:
    """The IBAN check digits (ISO 13616 / ISO 7064 mod 97-10): country and check digits moved to the end,
    letters as 10..35, the number mod 97 must be 1."""
    s = re.sub(r"\s", "", iban).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", s):
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


_VERSION_BEFORE = re.compile(r"(?:\bversion|\bv|\brelease|\bbuild|\brev(?:ision)?)\.?\s*$", re.IGNORECASE)
_NUMBER_BEFORE = re.compile(r"(?:\border|\binvoice|\bisbn(?:-1[03])?|\bref(?:erence)?|\bticket|\btracking|\bserial|"
                            r"\bpart|\bmodel|\bcase|\baccount|\bcustomer|\bbooking|\bconfirmation|\bissn|\bdoi|"
                            r"\bpatent|\bsku|#)[\s:.#-]*(?:(?:number|no|id)\b[\s:.#-]*)?(?:[a-z]+[\s:#-]+)?$",
                            re.IGNORECASE)
_DATE = re.compile(r"\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{4}\s*[-\u2013]\s*\d{4}")
_SCHEME = re.compile(r"(?i)(?:https?|ftp)://|www\d{0,3}\.")


def _valid_card(text, s, e):
    return card_ok(text[s:e])


def _valid_iban(text, s, e):
    return iban_ok(text[s:e])


def _valid_ip(text, s, e):
    """Not a version number ("version 1.2.3.4") nor part of a longer dotted number."""
    if _VERSION_BEFORE.search(text[max(0, s - 20):s]):
        return False
    return not (text[s - 1:s] in (".",) and text[s - 2:s - 1].isdigit()) and not re.match(r"\.\d", text[e:e + 2])


def _valid_phone(text, s, e):
    """At least 7 digits, not a date or a year range, not an order/ISBN/reference number."""
    m = text[s:e]
    if sum(c.isdigit() for c in m) < 7 or _DATE.fullmatch(m.strip()):
        return False
    return not _NUMBER_BEFORE.search(text[max(0, s - 30):s])


def _valid_url(text, s, e):
    """A URL with a scheme or www., or a bare lower-case domain that ends a token: presidio also reports pieces
    of words such as "St.Jo" (from "St.John", .jo being Jordan's domain) or "Mr.Sm"."""
    if text[e:e + 1].isalnum() or text[s - 1:s].isalnum() or text[s - 1:s] == "@":
        return False
    m = text[s:e]
    if _SCHEME.match(m):
        return True
    host = m.split("/", 1)[0]
    labels = host.split(".")
    return host == host.lower() and len(labels[-1]) >= 2 and all(labels) and len(labels[-2]) >= 2


_VALID = {"CREDIT_CARD": _valid_card, "IBAN": _valid_iban, "IP_ADDRESS": _valid_ip, "PHONE": _valid_phone,
          "URL": _valid_url}
