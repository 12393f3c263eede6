"""Two real question sets with gold passages, read from Debian's offline documentation.

- `perlfaq`: Debian `perl-doc`, `/usr/share/perl/5.*/pod/perlfaq[1-9].pod`. Every `=head2` is a question and
  the paragraphs under it (to the next `=head1`/`=head2`) its answer.
- `pythonfaq`: Debian `python3.11-doc`, `/usr/share/doc/python3.11/html/_sources/**/*.rst.txt`. Every heading
  of `faq/*.rst.txt` that is a question (ends in "?", a trailing "(...)" aside) with its section as the answer;
  all the other pages of the Python documentation are indexed too, as distractors.

A question is {"id", "question", "answer", "source", "start", "end", "split"} where
`Document.text[start:end] == answer` in the document named by `source`; the heading itself stays outside that
range (it is in the indexed text, as in real documentation). "split" is "tune" or "report", fixed by a hash
of the id.
"""

from __future__ import annotations

import hashlib
import html.entities
import json
import os
import re
from glob import glob
from pathlib import Path

from ..core.checkpoint import atomic_write_text
from ..core.errors import ConfigError, DataError
from .ingest import Document, Span

PERL_POD_GLOB = "/usr/share/perl/5.*/pod"
PYTHON_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
QA_SETS = ("perlfaq", "pythonfaq")


# ---------------------------------------------------------------------------------------------- POD -> text

_CODE_OPEN = re.compile(r"([BCEFILSXZ])(<+)(\s*)")
_SKIP_COMMANDS = {"=over", "=back", "=cut", "=pod", "=encoding", "=for"}


def _render_code(code: str, inner: str) -> str:
    if code == "E":
        if inner.isdigit() or inner.lower().startswith("0x"):
            return chr(int(inner, 0))
        return {"verbar": "|", "sol": "/"}.get(inner) or html.entities.html5.get(inner + ";", inner)
    if code in "XZ":
        return ""
    if code == "L":
        if "|" in inner:
            return inner.split("|", 1)[0]
        if "://" in inner:
            return inner
        name, _, section = inner.partition("/")
        section = section.strip('"')
        return f'"{section}" in {name}' if name and section else (section or name)
    return inner  # B, C, F, I, S: the text itself


def pod_inline(text: str) -> str:
    """Strip POD formatting codes (`C<x>`, `B<x>`, `L<text|target>`, `E<lt>`, nested, and `C<< x >>` forms)."""
    return _pod_codes(text, 0, None)[0]


def _pod_codes(s: str, i: int, close: re.Pattern | None) -> tuple[str, int]:
    out = []
    while i < len(s):
        if close is not None and (m := close.match(s, i)):
            return "".join(out), m.end()
        if m := _CODE_OPEN.match(s, i):
            code, n = m.group(1), len(m.group(2))
            if n > 1 and m.group(3):  # C<< ... >>: closed by whitespace and as many ">"
                inner, i = _pod_codes(s, m.end(), re.compile(r"\s+" + ">" * n))
            else:
                inner, i = _pod_codes(s, m.start(2) + 1, re.compile(">"))
            out.append(_render_code(code, inner))
        else:
            out.append(s[i])
            i += 1
    return "".join(out), i


def pod_to_document(pod: str, source: str) -> Document:
    """POD -> plain text: headings become a line of their own, directives go (=item text stays), verbatim
    paragraphs are kept as they are. Spans: the intro (up to the first =head2), one per =head2 (location = the
    question, meta {"question"}), one per later =head1 (meta {"heading"})."""
    parts: list[str] = []
    pos = 0
    spans: list[Span] = []
    in_begin = False
    for para in re.split(r"\n(?:[ \t]*\n)+", pod.replace("\r\n", "\n")):
        if not para.strip():
            continue
        command = para.split(None, 1)[0] if para.startswith("=") else ""
        if command == "=begin" or in_begin:
            in_begin = command != "=end"
            continue
        if command in _SKIP_COMMANDS or command == "=end":
            continue
        if para[0].isspace():  # verbatim (code): as it is
            text = para.rstrip()
        else:
            text = " ".join(pod_inline(para[len(command):]).split()) if command else pod_inline(para).strip()
            if command == "=item" and text in ("", "*"):
                continue
        if command in ("=head1", "=head2") and (command == "=head2" or spans):
            if not spans and pos:
                spans.append(Span(0, pos, "intro", {}))
            if spans:
                spans[-1].end = pos
            key = "question" if command == "=head2" else "heading"
            spans.append(Span(pos, pos, text, {key: text, "level": int(command[-1])}))
        parts.append(text)
        pos += len(text) + 2
    text = "\n\n".join(parts) + "\n"
    if spans:
        spans[-1].end = len(text)
    else:
        spans = [Span(0, len(text), "intro", {})]
    return Document(source, text, {"title": source.rsplit("/", 1)[-1].removesuffix(".pod")}, spans)


def _perl_pod_dir() -> Path:
    dirs = {os.path.realpath(d) for d in glob(PERL_POD_GLOB) if glob(os.path.join(d, "perlfaq[1-9].pod"))}
    if not dirs:
        raise DataError("the Perl FAQ needs Debian perl-doc: sudo apt-get install perl-doc")
    return Path(max(dirs, key=lambda d: [int(x) for x in re.findall(r"\d+", os.path.basename(d))]))


def _perlfaq_pages() -> list[Document]:
    files = sorted(_perl_pod_dir().glob("perlfaq[1-9].pod"))
    return [pod_to_document(f.read_text(encoding="utf-8", errors="replace"), f"perlfaq/{f.name}") for f in files]


def perlfaq_documents() -> list[Document]:
    """The nine perlfaq pages as Documents, source "perlfaq/perlfaq4.pod", with the questions' own heading
    lines left out of the text (each answer's span keeps its question as its location): see `qa_set`."""
    return [without_questions(d, "question", lambda h: True)[0] for d in _perlfaq_pages()]


# ---------------------------------------------------------------------------------------------- reST -> text

_ADORNMENT = re.compile(r"([=\-~^\"'`*+#])\1{2,}[ \t]*")
_ROLE = re.compile(r":[\w:.+-]+:`[~!.]*([^`]*?)(?:\s*<[^`>]*>)?`")  # :func:`open`, :mod:`text <target>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")  # `Python <https://...>`_
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_NOISE = re.compile(r"^(?:\.\. _[^\n]*:[ \t]*|\.\. index::.*(?:\n[ \t]+\S.*)*|:tocdepth:.*)\n?", re.MULTILINE)


def rst_inline(text: str) -> str:
    """Light reST clean-up: roles and links keep their text, ``literals`` their content, labels and index
    entries go. Everything else (directives, lists, code) stays as written."""
    text = _NOISE.sub("", text)
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    return _LITERAL.sub(r"\1", text)


def rst_to_document(rst: str, source: str) -> Document:
    """reST -> plain text with one span per section: a heading is a line underlined (optionally also overlined)
    by a run of one punctuation character; its level is the order its adornment style first appears. The
    heading becomes a line of its own (the adornment goes); location = the heading path "A > B > C"."""
    lines = rst.replace("\r\n", "\n").removesuffix("\n").split("\n")
    heads: dict[int, tuple[str, int]] = {}  # title line -> (title, level)
    drop: set[int] = set()
    styles: list[tuple[str, bool]] = []
    for i in range(1, len(lines)):
        title = lines[i - 1]
        if not (_ADORNMENT.fullmatch(lines[i]) and title.strip() and not title[0].isspace()):
            continue
        if _ADORNMENT.fullmatch(title) or i - 1 in drop:
            continue
        over = i >= 2 and lines[i - 2].strip() == lines[i].strip()
        style = (lines[i][0], over)
        if style not in styles:
            styles.append(style)
        heads[i - 1] = (" ".join(rst_inline(title).split()), styles.index(style) + 1)
        drop.update({i, i - 2} if over else {i})
    parts: list[str] = []
    spans: list[Span] = []
    path: list[tuple[int, str]] = []
    pos, body = 0, []

    def flush_body() -> None:
        nonlocal pos
        if body:
            text = rst_inline("\n".join(body) + "\n")
            parts.append(text)
            pos += len(text)
            body.clear()

    for i, line in enumerate(lines):
        if i in drop:
            continue
        if i not in heads:
            body.append(line)
            continue
        flush_body()
        title, level = heads[i]
        path = [(lv, t) for lv, t in path if lv < level] + [(level, title)]
        if spans:
            spans[-1].end = pos
        elif pos:
            spans.append(Span(0, pos, "intro", {}))
        spans.append(Span(pos, pos, " > ".join(t for _, t in path), {"heading": title, "level": level}))
        parts.append(title + "\n")
        pos += len(title) + 1
    flush_body()
    text = "".join(parts)
    if spans:
        spans[-1].end = len(text)
    else:
        spans = [Span(0, len(text), source, {})]
    title = heads[min(heads)][0] if heads else source
    return Document(source, text, {"title": title}, spans)


def pythondoc_documents() -> list[Document]:
    """Every page of the Python 3.11 documentation sources, source "python/faq/programming.rst" (deduplicated
    by real path: some installs hold a symlinked second copy); the FAQ pages without their question headings."""
    return [without_questions(d, "heading", _is_question)[0] if d.source.startswith("python/faq/") else d
            for d in _python_pages()]


def _python_pages() -> list[Document]:
    if not PYTHON_SOURCES.is_dir():
        raise DataError("the Python FAQ needs Debian python3.11-doc: sudo apt-get install python3.11-doc")
    seen: set[str] = set()
    docs = []
    for f in sorted(PYTHON_SOURCES.rglob("*.rst.txt")):
        real = os.path.realpath(f)
        if real in seen:
            continue
        seen.add(real)
        source = "python/" + f.relative_to(PYTHON_SOURCES).as_posix().removesuffix(".txt")
        docs.append(rst_to_document(f.read_text(encoding="utf-8", errors="replace"), source))
    return docs


# ---------------------------------------------------------------------------------------------- questions

def _split(qid: str) -> str:
    """"tune" or "report", half/half by a hash of the id (stable across runs and machines)."""
    return "tune" if hashlib.sha256(qid.encode()).digest()[0] % 2 == 0 else "report"


def _is_question(heading: str) -> bool:
    return re.sub(r"\s*\([^()]*\)$", "", heading).endswith("?")  # "How do I delete a file? (And other ...)"


def _questions(doc: Document, key: str, keep) -> list[dict]:
    """One question per span whose meta[key] passes `keep`; the answer is the span's section (up to the next
    heading of the same or a higher level), without its heading line, stripped."""
    out = []
    spans = doc.spans
    for n, span in enumerate(spans):
        heading = span.meta.get(key)
        if heading is None or not keep(heading):
            continue
        level = span.meta.get("level", 0)
        end = next((s.start for s in spans[n + 1:] if s.meta.get("level", 99) <= level), len(doc.text))
        start = span.start + len(heading)
        body = doc.text[start:end]
        start += len(body) - len(body.lstrip())
        end = start + len(body.strip())
        if end > start:
            qid = f"{doc.source}#{len(out) + 1}"
            out.append({"id": qid, "question": heading, "answer": doc.text[start:end], "source": doc.source,
                        "start": start, "end": end, "split": _split(qid)})
    return out


def without_questions(doc: Document, key: str, keep) -> tuple[Document, list[dict]]:
    """The document with the heading lines of its questions (spans whose meta[key] passes `keep`) cut out of
    its text, and its questions with their answers' offsets in that text. A question's words must not be in the
    indexed text, or retrieval is matching the question to itself: only the answer is indexed, and the span
    keeps the question as its location (what a citation shows)."""
    questions = _questions(doc, key, keep)
    cuts = []  # (start, end) of each question heading and the blank lines after it
    for span in doc.spans:
        heading = span.meta.get(key)
        if heading is not None and keep(heading):
            end = span.start + len(heading)
            end += len(doc.text[end:]) - len(doc.text[end:].lstrip())
            cuts.append((span.start, end))

    def moved(pos: int) -> int:  # an offset of the old text in the new one
        return pos - sum(min(e, pos) - a for a, e in cuts if a < pos)

    text = "".join(doc.text[b:a] for b, a in zip([0] + [e for _, e in cuts], [a for a, _ in cuts] + [len(doc.text)]))
    spans = [Span(moved(sp.start), moved(sp.end), sp.location, sp.meta) for sp in doc.spans]
    for q in questions:
        q["start"], q["end"] = moved(q["start"]), moved(q["end"])
        q["answer"] = text[q["start"] : q["end"]]
    return Document(doc.source, text, doc.meta, spans), questions


def qa_set(name: str) -> tuple[list[Document], list[dict]]:
    """(documents to index, questions) of a built-in question set: "perlfaq" (306 questions in 9 pages; index
    the perlfaq corpus) or "pythonfaq" (176 questions in the FAQ pages, indexed with every other page of the
    Python docs: the pythondoc corpus). The questions' headings are not in the documents (`without_questions`):
    each question is scored against its own answer passage, found by its words and not by the question's."""
    if name == "perlfaq":
        pairs = [without_questions(d, "question", lambda h: True) for d in _perlfaq_pages()]
        return [d for d, _ in pairs], [q for _, qs in pairs for q in qs]
    if name == "pythonfaq":
        docs, questions = [], []
        for d in _python_pages():
            if d.source.startswith("python/faq/"):
                d, qs = without_questions(d, "heading", _is_question)
                questions += qs
            docs.append(d)
        return docs, questions
    raise ConfigError(f"unknown question set {name!r}; known: {', '.join(QA_SETS)}")


# ---------------------------------------------------------------------------------------------- JSONL

def write_qa(path: str | Path, questions: list[dict]) -> None:
    """Questions as JSONL (one object a line), written atomically."""
    atomic_write_text(path, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))


def read_qa(path: str | Path) -> list[dict]:
    """Questions from JSONL. Each line needs "question" and a gold passage ("source", "start", "end") and/or a
    reference "answer"; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        gold = isinstance(q, dict) and all(k in q for k in ("source", "start", "end"))
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not (gold or "answer" in q):
            raise DataError(f'{path}:{n}: needs "question" and a gold passage ("source", "start", "end") '
                            'or an "answer"')
        if gold and not (isinstance(q["start"], int) and isinstance(q["end"], int) and 0 <= q["start"] <= q["end"]):
            raise DataError(f'{path}:{n}: "start" and "end" must be integers with 0 <= start <= end')
        out.append(q)
    return out
