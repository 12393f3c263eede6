"""Evaluation tasks for prompting: JSONL files of `{"input", "target"}` items, and two built-in tasks made from data
that installs offline (DESIGN.md 5), each item saying where it comes from.

- `capitals`: "What is the capital of Chad?" -> "N'Djamena", for every country and territory of PyPI `countryinfo`
  (MIT) that names a capital (read from its data/*.json files; its code is not imported).
- `antonyms`: "What is the opposite of 'shallow'?" -> "deep", the direct antonyms of WordNet 3.0 adjectives
  (Debian `wordnet-base`, the WordNet 3.0 licence), the 400 pairs whose rarer word is most frequent in the
  SemCor sense counts (cntlist.rev); every direct antonym of the word counts as right.

Each built-in task has a fixed split (by a hash of the item, so it never moves): 100 `test` items that are scored and
the rest `train`, the pool few-shot examples are drawn from and what a fine-tune may learn from. A user's JSONL may
mark its own split; without one, the examples for an item are drawn from the other items.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import DataError

WORDNET = Path("/usr/share/wordnet")
TEST_ITEMS = 100


@dataclass
class Item:
    input: str
    target: str
    answers: list[str] = field(default_factory=list)  # every answer that counts as right (the target first)
    source: str = ""
    split: str = "test"

    def as_dict(self) -> dict:
        return {"input": self.input, "target": self.target, "answers": self.answers, "source": self.source,
                "split": self.split}


@dataclass
class Task:
    name: str
    items: list[Item]  # all of them, in a fixed order
    scoring: str = "exact"  # the default scoring: exact, contains or numeric
    about: str = ""

    @property
    def test(self) -> list[Item]:
        return [i for i in self.items if i.split == "test"]

    @property
    def train(self) -> list[Item]:
        return [i for i in self.items if i.split == "train"]


def _split(items: list[Item], n_test: int = TEST_ITEMS) -> list[Item]:
    """A fixed split: the n_test items with the smallest hash of their input are `test`."""
    order = sorted(items, key=lambda i: hashlib.sha256(i.input.encode()).hexdigest())
    test = {id(i) for i in order[:n_test]}
    for i in items:
        i.split = "test" if id(i) in test else "train"
    return items


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the task needs the {module!r} package; run: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def capitals() -> Task:
    folder = _package_dir("countryinfo", "pip install countryinfo") / "data"
    items = []
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        name, capital = (d.get("name") or "").strip(), d.get("capital")
        if isinstance(capital, list):
            capital = capital[0] if capital else None
        if not name or not isinstance(capital, str) or not capital.strip():
            continue
        items.append(Item(f"What is the capital of {name}?", capital.strip(), [capital.strip()],
                          f"countryinfo data/{f.name}"))
    if len(items) < 150:
        raise DataError(f"{folder} holds only {len(items)} countries with a capital; reinstall: pip install countryinfo")
    return Task("capitals", _split(items), "exact",
                f"{len(items)} countries and territories and their capitals (PyPI countryinfo, MIT)")


def _sense_counts() -> dict[str, int]:
    """How often each adjective lemma was tagged in SemCor, summed over its senses (cntlist.rev)."""
    counts: dict[str, int] = defaultdict(int)
    for line in (WORDNET / "cntlist.rev").read_text(encoding="utf-8", errors="replace").splitlines():
        key, _, count = line.split()
        lemma, _, rest = key.partition("%")
        if rest[:1] in ("3", "5"):  # adjective, adjective satellite
            counts[lemma] += int(count)
    return counts


def antonyms(n_pairs: int = 400) -> Task:
    data = WORDNET / "data.adj"
    if not data.is_file():
        raise DataError("the antonyms task needs WordNet 3.0; run: sudo apt-get install wordnet-base")
    words: dict[str, list[str]] = {}  # synset offset -> its words
    pointers = []  # (offset, source word number, target offset, target word number)
    for line in data.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  "):  # the licence header
            continue
        f = line.split(" | ")[0].split()
        offset, n = f[0], int(f[3], 16)
        words[offset] = [re.sub(r"\(.*\)$", "", f[4 + 2 * i]).lower() for i in range(n)]
        k = 4 + 2 * n
        for j in range(int(f[k])):
            sym, tgt, _pos, st = f[k + 1 + 4 * j: k + 5 + 4 * j]
            if sym == "!":
                pointers.append((offset, int(st[:2], 16), tgt, int(st[2:4], 16)))
    opposite: dict[str, set[str]] = defaultdict(set)
    for off, s, tgt, t in pointers:
        a, b = words[off][s - 1], words[tgt][t - 1]
        if a.isalpha() and b.isalpha():
            opposite[a].add(b)
            opposite[b].add(a)
    counts = _sense_counts()
    pairs = sorted({tuple(sorted((a, b))) for a, bs in opposite.items() for b in bs},
                   key=lambda p: (-min(counts.get(p[0], 0), counts.get(p[1], 0)), p))
    items, asked = [], set()
    for a, b in pairs:
        # ask about the more frequent word of the pair, once per word
        word = a if counts.get(a, 0) >= counts.get(b, 0) else b
        if word in asked:
            continue
        asked.add(word)
        answers = [b if word == a else a] + sorted(opposite[word] - {b if word == a else a})
        items.append(Item(f"What is the opposite of '{word}'?", answers[0], answers,
                          f"WordNet 3.0 data.adj, antonym of '{word}'"))
        if len(items) == n_pairs:
            break
    return Task("antonyms", _split(items), "exact",
                f"{len(items)} adjectives and their direct antonyms (WordNet 3.0, Debian wordnet-base)")


BUILTIN = {"capitals": capitals, "antonyms": antonyms}


def read_task(path: str | Path) -> Task:
    """A JSONL file of {"input", "target"} items (optional: "answers", a list that also counts as right;
    "split": "test" or "train"; "source")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} not found (a JSONL of {{\"input\", \"target\"}} lines, or a built-in task: "
                        f"{', '.join(BUILTIN)})")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("input"), str) or \
                not isinstance(d.get("target"), (str, int, float)):
            raise DataError(f'{path}:{n}: each line needs "input" (a string) and "target" (a string or a number)')
        target = str(d["target"])
        answers = [str(a) for a in d.get("answers") or []]
        split = d.get("split", "test")
        if split not in ("test", "train"):
            raise DataError(f'{path}:{n}: "split" must be "test" or "train", not {split!r}')
        items.append(Item(d["input"], target, [target] + [a for a in answers if a != target], d.get("source", ""),
                          split))
    if not any(i.split == "test" for i in items):
        raise DataError(f"{path} has no item to score (no line, or every line is split \"train\")")
    return Task(path.stem, items, "exact", f"{len(items)} items from {path}")


def load_task(name: str | Path) -> Task:
    if str(name) in BUILTIN:
        return BUILTIN[str(name)]()
    return read_task(name)


def write_task(task: Task, folder: str | Path) -> tuple[Path, Path]:
    """`NAME.jsonl` (every item with its split) and `NAME_train_chat.jsonl` (the train items as
    {"prompt", "response"} lines, for `genlab finetune`)."""
    from ..core.checkpoint import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    a, b = folder / f"{task.name}.jsonl", folder / f"{task.name}_train_chat.jsonl"
    atomic_write_text(a, "".join(json.dumps(i.as_dict(), ensure_ascii=False) + "\n" for i in task.items))
    atomic_write_text(b, "".join(json.dumps({"prompt": i.input, "response": i.target}, ensure_ascii=False) + "\n"
                                 for i in task.train))
    return a, b
