"""Prompting harness pieces: answer extraction, scoring, templates as data, example choice, the built-in tasks."""

from __future__ import annotations

import json

import pytest

from genlab.core.errors import ConfigError, DataError
from genlab.data.tasks import Item, Task, load_task, read_task, write_task
from genlab.eval.prompting import (
    choose_examples,
    extract_answer,
    list_templates,
    load_template,
    normalize,
    score,
)


def test_normalize_is_squads_plus_accents():
    assert normalize("The  Paris.") == "paris"
    assert normalize("Bogotá") == normalize("bogota") == "bogota"
    assert normalize("N'Djamena") == "n djamena"
    assert normalize("“Cold”!") == "cold"


@pytest.mark.parametrize("answer,gold,how,ok", [
    ("Paris", ["Paris"], "exact", True),
    ("paris.", ["Paris"], "exact", True),
    ("The capital of France is Paris.", ["Paris"], "exact", False),
    ("The capital of France is Paris.", ["Paris"], "contains", True),
    ("Parisian", ["Paris"], "contains", False),  # whole words only
    ("new york city", ["New York"], "contains", True),
    ("it is 1,024 bytes", ["1024"], "numeric", True),
    ("about 3.5", ["3.50"], "numeric", True),
    ("no idea", ["7"], "numeric", False),
    ("second", ["last", "second"], "exact", True),  # any listed answer counts
])
def test_scoring(answer, gold, how, ok):
    assert score(answer, gold, how) is ok


def test_unknown_scoring_is_refused():
    with pytest.raises(ConfigError, match="must be one of"):
        score("a", ["a"], "fuzzy")


def test_extract_answer():
    assert extract_answer("Paris\nIt is a big city.") == "Paris"
    cot = "France is in Europe.\nIts capital is well known.\nAnswer: Paris"
    assert extract_answer(cot, "Answer:") == "Paris"
    assert extract_answer("answer: Rome\nso the ANSWER: Paris.", "Answer:") == "Paris."
    assert extract_answer("I think it is\nLyon", "Answer:") == "Lyon"  # no final line: its last line
    assert extract_answer("   ") == ""


def test_builtin_templates_load_and_render():
    names = list_templates()
    assert {"zero_shot", "few_shot", "few_shot_similar", "few_shot_turns", "chain_of_thought", "completion"} <= set(names)
    for n in names:
        t = load_template(n)
        ex = [Item("Q1?", "A1"), Item("Q2?", "A2")][: t.k]
        msgs = t.messages(Item("What is the capital of Chad?", "N'Djamena"), ex)
        text = "\n".join(m["content"] for m in msgs)
        assert "What is the capital of Chad?" in msgs[-1]["content"] and "N'Djamena" not in text  # never the gold
        for e in ex:
            assert e.input in text and e.target in text


def test_examples_as_chat_turns():
    t = load_template("few_shot_turns")
    msgs = t.messages(Item("What is the capital of Chad?", "N'Djamena"), [Item("Q1?", "A1"), Item("Q2?", "A2")])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[0]["content"].startswith("Q1?") and msgs[1]["content"] == "A1" and "Chad" in msgs[-1]["content"]
    plain = load_template("few_shot").messages(Item("Q?", "A"), [Item("Q1?", "A1")])
    assert len(plain) == 1 and "Q1?" in plain[0]["content"] and "A1" in plain[0]["content"]


def test_bad_templates_are_one_line_errors(tmp_path):
    cases = [("prompt = '{{ input '", "not valid Jinja"), ("prompt = 'x'\nshots = 3", "unknown key"),
             ("k = 2", "needs a `prompt`"), ("prompt = 'x'\nselect = 'best'", "'random' or 'similar'"),
             ("prompt = [", "not valid TOML")]
    for i, (text, says) in enumerate(cases):
        f = tmp_path / f"t{i}.toml"
        f.write_text(text)
        with pytest.raises(ConfigError, match=says) as e:
            load_template(f)
        assert "\n" not in str(e.value).strip()
    with pytest.raises(ConfigError, match="not found"):
        load_template("no_such_template")


def test_random_examples_are_fixed_per_seed_and_never_the_item():
    pool = [Item(f"q{i}", f"a{i}") for i in range(12)]
    items = pool[:4]
    a, b = choose_examples(items, pool, 3, "random", seed=1), choose_examples(items, pool, 3, "random", seed=1)
    assert [[e.input for e in row] for row in a] == [[e.input for e in row] for row in b]
    assert a != choose_examples(items, pool, 3, "random", seed=2)
    for item, row in zip(items, a, strict=True):
        assert item.input not in {e.input for e in row} and len(row) == 3
    with pytest.raises(DataError, match="need more than"):
        choose_examples(items, pool[:3], 3, "random")


def test_similar_examples_are_the_nearest_by_embedding():
    import torch

    class Letters:  # a stand-in embedder: the first letter's one-hot, a fixed geometry to check the choice against
        def __call__(self, texts):
            v = torch.zeros(len(texts), 26)
            for i, t in enumerate(texts):
                v[i, ord(t[0]) - 97] = 1.0
                v[i, (ord(t[0]) - 96) % 26] = 0.5  # the next letter is near
            return torch.nn.functional.normalize(v, dim=1)

    pool = [Item(w, w) for w in ["apple", "avocado", "banana", "cherry", "apricot", "blueberry"]]
    got = choose_examples([Item("almond", "x")], pool, 3, "similar", embedder=Letters())[0]
    assert {e.input for e in got} == {"apple", "avocado", "apricot"}
    got = choose_examples([pool[0]], pool, 2, "similar", embedder=Letters())[0]
    assert "apple" not in {e.input for e in got}  # never the item itself


@pytest.mark.slow
def test_minilm_finds_the_related_questions():
    from genlab.eval.prompting import Embedder

    pool = [Item("What is the capital of Germany?", "Berlin"), Item("What is the opposite of 'hot'?", "cold"),
            Item("What is the capital of Spain?", "Madrid"), Item("What is the opposite of 'up'?", "down")]
    got = choose_examples([Item("What is the capital of France?", "Paris")], pool, 2, "similar", embedder=Embedder())[0]
    assert {e.target for e in got} == {"Berlin", "Madrid"}


def test_builtin_tasks_have_real_items_and_a_fixed_split():
    caps = load_task("capitals")
    assert len(caps.items) >= 200 and len(caps.test) == 100
    by_q = {i.input: i.target for i in caps.items}
    assert by_q["What is the capital of France?"] == "Paris" and by_q["What is the capital of Japan?"] == "Tokyo"
    assert [i.input for i in load_task("capitals").test] == [i.input for i in caps.test]  # the split never moves
    ants = load_task("antonyms")
    assert len(ants.items) == 400 and len(ants.test) == 100
    by_q = {i.input: i.answers for i in ants.items}
    assert "cold" in by_q["What is the opposite of 'hot'?"] and "bad" in by_q["What is the opposite of 'good'?"]
    assert all(i.source for i in caps.items + ants.items)  # every item says where it comes from


def test_task_files_round_trip_and_bad_files_are_refused(tmp_path):
    t = Task("mini", [Item("1+1?", "2", ["2"], "me", "test"), Item("2+2?", "4", ["4", "four"], "me", "train")])
    full, chat = write_task(t, tmp_path)
    back = read_task(full)
    assert [(i.input, i.answers, i.split) for i in back.items] == [(i.input, i.answers, i.split) for i in t.items]
    assert [json.loads(line) for line in chat.read_text().splitlines()] == [{"prompt": "2+2?", "response": "4"}]
    for text, says in [("{not json", "not JSON"), ('{"input": "x"}', '"target"'),
                       ('{"input": "x", "target": "y", "split": "dev"}', '"split"'),
                       ('{"input": "x", "target": "y", "split": "train"}', "no item to score"), ("", "no item")]:
        f = tmp_path / "bad.jsonl"
        f.write_text(text)
        with pytest.raises(DataError, match=says):
            read_task(f)
    with pytest.raises(DataError, match="not found"):
        load_task(tmp_path / "missing.jsonl")
