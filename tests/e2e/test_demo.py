import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_trains_both_models_and_writes_a_report(tmp_path):
    p = run_cli("demo", "--out", tmp_path / "demo", "--minutes", "0.15", cwd=tmp_path, check=True, timeout=600)
    out = p.stdout
    assert "| ngram (char7) |" in out and "| gpt (baby) |" in out
    assert "stored n-grams" in out and "held-out bits/char" in out and "temperature 0.7" in out and "temperature 1.0" in out
    report = tmp_path / "demo" / "report.md"
    assert report.is_file() and str(report) in out
    text = report.read_text()
    assert "| gpt (baby) |" in text and "## ngram, temperature 0.7" in text
    for line in out.splitlines():
        if line.startswith(("| ngram", "| gpt")):
            bits = float(line.split("|")[4])
            assert 0.5 < bits < 6, line
