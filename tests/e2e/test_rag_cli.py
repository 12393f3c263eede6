"""`genlab rag` as a user runs it: index a folder, re-index only what changed, ask (cited sources with exact
offsets, streaming, "not found"), and bad inputs that leave the index intact."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

GUIDE = """# Account help

## Resetting a password

To reset a forgotten password, open the Settings page and choose "Send reset link". The link expires after
42 minutes.

## Deleting an account

Accounts are deleted thirty days after the request, and the data cannot be recovered.
"""
NOTES = "The office coffee machine is descaled every Friday by the facilities team.\n"
PAGE = """<html><head><style>p {color: red}</style></head><body><h1>Shipping</h1>
<p>Parcels to Norway take five working days.</p><script>var x = 1;</script></body></html>"""


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "guide.md").write_text(GUIDE)
    (d / "notes.txt").write_text(NOTES)
    (d / "page.html").write_text(PAGE)
    return d


def index(docs, ix, *extra):
    return run_cli("-q", "rag", "index", docs, "--index", ix, *extra)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "smollm2"
    run_cli("import", "smollm2", out, check=True, timeout=600)
    return out


@pytest.mark.slow
def test_index_reindex_and_ask_with_cited_offsets(docs, tmp_path, smollm2):
    ix = tmp_path / "ix"
    p = index(docs, ix)
    assert p.returncode == 0, p.stderr
    assert "3 files embedded" in p.stdout and "0 unchanged" in p.stdout
    manifest = json.loads((ix / "manifest.json").read_text())
    assert manifest["embedding"]["name"] == "all-MiniLM-L6-v2" and manifest["chunking"] == {"max_tokens": 256,
                                                                                          "overlap": 32}
    assert len(manifest["files"]) == 3

    p = index(docs, ix)  # nothing changed: nothing embedded
    assert "0 files embedded" in p.stdout and "3 unchanged" in p.stdout, p.stdout
    (docs / "notes.txt").write_text(NOTES + "It is cleaned on Mondays too.\n")
    (docs / "page.html").unlink()
    p = index(docs, ix)
    assert "1 files embedded" in p.stdout and "1 unchanged" in p.stdout and "1 removed" in p.stdout, p.stdout
    assert len(json.loads((ix / "manifest.json").read_text())["files"]) == 2

    # SmolLM2 answers from the sources; the listed source points at its exact place in the file
    p = run_cli("rag", "ask", ix, "How long does a password reset link last?", "--run", smollm2, "--json")
    assert p.returncode == 0, p.stderr
    ans = json.loads(p.stdout)
    assert ans["found"] and "42" in ans["answer"] and ans["sources"], ans
    src = ans["sources"][0]
    assert src["source"] == "guide.md" and src["location"] == "Account help > Resetting a password"
    assert "42 minutes" in GUIDE[src["start"] : src["end"]]
    p = run_cli("rag", "ask", ix, "How long does a password reset link last?", "--run", smollm2, "--mode", "sparse",
                "--max-new-tokens", "24")  # streamed to stdout, then the sources
    assert p.returncode == 0, p.stderr
    assert "42" in p.stdout.split("sources")[0] and "  [1] guide.md, Account help > Resetting a password" in p.stdout


def test_a_far_question_is_not_answered_and_bad_inputs_leave_the_index_intact(docs, tmp_path):
    ix = tmp_path / "ix"
    assert index(docs, ix).returncode == 0
    before = (ix / "manifest.json").read_text()
    p = run_cli("rag", "ask", ix, "What is the boiling point of tungsten?")  # the default threshold
    assert p.returncode == 0 and "could not find this" in p.stdout, p.stdout

    (tmp_path / "empty").mkdir()
    p = index(tmp_path / "empty", ix)
    assert p.returncode == 2 and "no " in p.stderr and "files" in p.stderr, p.stderr
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    p = index(docs, ix)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "broken.pdf: not a readable PDF" in errors[0], p.stderr
    assert json.loads((ix / "manifest.json").read_text())["files"] == json.loads(before)["files"]
    p = index(docs, ix, "--max-tokens", "128")
    assert p.returncode == 2 and "max_tokens=256, not 128" in p.stderr
    p = run_cli("rag", "ask", tmp_path / "nowhere", "anything?")
    assert p.returncode == 2 and "no RAG index at" in p.stderr
    p = index(docs, tmp_path / "other", "--embedding", tmp_path / "empty")
    assert p.returncode == 2 and "not a sentence-transformers model folder" in p.stderr
    p = run_cli("rag", "ask", ix, "anything?", "--where", "nonsense")
    assert p.returncode == 2 and "FIELD=VALUE" in p.stderr
