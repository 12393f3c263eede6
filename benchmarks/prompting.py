"""Prompting patterns on SmolLM2-135M-Instruct, before and after a LoRA fine-tune, on two real tasks.

Tasks (genlab/data/tasks.py, 100 scored test items each): `capitals` (countryinfo) and `antonyms` (WordNet 3.0).
Templates (genlab/eval/templates/): zero_shot, few_shot (5 random train items), few_shot_similar (the 5 nearest by
all-MiniLM-L6-v2), chain_of_thought (zero-shot "think step by step", the final "Answer:" line scored) and
completion (plain Q/A text, 3 random examples, no chat template). Greedy decoding; scored by exact match and by
contains (the gold answer as whole words in the answer), after SQuAD normalisation.

The fine-tune: LoRA r=8 on every projection, on the train items of both tasks as chat data ({"prompt": question,
"response": answer}, the loss on the answers only), `--steps` steps of 4 packed 128-token blocks. The test
countries and words are not in it: what it can teach is the format of the answer, and whatever transfers.

    python benchmarks/prompting.py                  # ~45 min on 2 cores
    python benchmarks/prompting.py --limit 10       # smoke run

Writes benchmarks/results/prompting.json (atomically).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "prompting.json"
TEMPLATES = ["zero_shot", "few_shot", "few_shot_turns", "few_shot_similar", "chain_of_thought", "completion"]
TASKS = ["capitals", "antonyms"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an imported SmolLM2 run (default: import it into a temporary folder)")
    ap.add_argument("--limit", type=int, help="score only the first N test items of each task")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--templates", default=",".join(TEMPLATES))
    ap.add_argument("--adapter", help="score this existing adapter of --run as 'after' instead of fine-tuning one")
    ap.add_argument("--append", action="store_true", help="add these templates' rows to the existing --out file")
    a = ap.parse_args()
    templates = a.templates.split(",")

    from genlab import api
    from genlab.adapt.gguf import import_gguf
    from genlab.core.checkpoint import atomic_write_json
    from genlab.data.tasks import load_task, write_task
    from genlab.eval.prompting import Embedder, table

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_dir = Path(a.run) if a.run else import_gguf("smollm2", tmp / "smollm2")
        embedder = Embedder()
        chat_lines = []
        for name in TASKS:
            _, chat = write_task(load_task(name), tmp)
            chat_lines += chat.read_text().splitlines()
        data = tmp / "tasks_train_chat.jsonl"
        data.write_text("\n".join(chat_lines) + "\n")

        rows = {}
        for phase in ("before", "after"):
            run = api.load(run_dir)
            adapter = None
            if phase == "after" and a.adapter:
                adapter = a.adapter
                ft = None
            elif phase == "after":
                t0 = time.perf_counter()
                folder, fit = api.finetune(run, data, name="tasks", overwrite=True,
                                           overrides=[f"train.max_steps={a.steps}", "train.progress=false"])
                ft = {"steps": fit.step, "seconds": round(time.perf_counter() - t0, 1),
                      "val_loss": round(fit.val_loss, 4), "train_items": len(chat_lines)}
                run, adapter = api.load(run_dir), folder
            results = []
            for task in TASKS:
                results += api.prompt_eval(run, task, templates, limit=a.limit, adapter=adapter, embedder=embedder)
                adapter = None
            rows[phase] = results
            print(table(results, f"SmolLM2 {phase}"), flush=True)

    def brief(r):
        return {"task": r.task, "template": r.template, "n": r.n, **{k: round(v, 3) for k, v in r.scores.items()},
                "prompt_tokens": round(r.prompt_tokens, 1), "seconds": round(r.seconds, 1),
                "examples": [{k: it[k] for k in ("input", "reply", "answer", "exact", "contains")}
                             for it in r.items[:3]]}

    out = {"model": "SmolLM2-135M-Instruct (fp32)", "decoding": "greedy", "finetune": {"method": "lora", "r": 8, **(ft or {})},
           "before": [brief(r) for r in rows["before"]], "after": [brief(r) for r in rows["after"]]}
    if a.append and Path(a.out).exists():  # new templates' rows join the earlier run's (same adapter)
        old = json.loads(Path(a.out).read_text())
        for phase in ("before", "after"):
            keys = {(r["task"], r["template"]) for r in out[phase]}
            out[phase] = [r for r in old[phase] if (r["task"], r["template"]) not in keys] + out[phase]
        out["finetune"] = old["finetune"]
    atomic_write_json(Path(a.out), out)
    print(json.dumps({k: v for k, v in out.items() if k == "finetune"}))


if __name__ == "__main__":
    main()
