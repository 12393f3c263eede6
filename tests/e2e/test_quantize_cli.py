"""`genlab quantize`: a quantized run is a run folder that generate, eval and chat load like any other, smaller on
disk and close in quality; training, resuming and exporting it are refused with one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_cli


@pytest.mark.parametrize(("method", "extra"), [("int8", []), ("int4", ["--group-size", "64"])])
def test_quantize_a_run_and_use_it(trained_gpt, tmp_path, method, extra):
    from genlab import api

    out = tmp_path / f"q_{method}"
    p = run_cli("quantize", trained_gpt, out, "--method", method, *extra, check=True)
    assert "smaller" in p.stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"method": method, "group_size": 64 if method == "int4" else None}
    assert (out / "model.safetensors").stat().st_size < (trained_gpt / "model.safetensors").stat().st_size / 2.5
    full, quant = api.load(trained_gpt), api.load(out)
    assert api.num_params(quant.model) == api.num_params(full.model)
    x = torch.randint(0, full.model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = full.model(x), quant.model(x)
    # relative error over all the logits: a stable measure (the largest single error over the largest logit of a
    # 30-step model varied 0.003-0.085 with the input draw); a wrong scale or layout gives ~1
    assert (a - b).norm() < (0.02 if method == "int8" else 0.05) * a.norm()
    p = run_cli("generate", out, "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1", check=True)
    assert p.stdout.startswith("ROMEO:") and len(p.stdout) > 20
    ev_full, ev_q = api.evaluate(trained_gpt, max_tokens=2000), api.evaluate(out, max_tokens=2000)
    assert abs(ev_q["perplexity"] / ev_full["perplexity"] - 1) < (0.02 if method == "int8" else 0.1)


def test_a_quantized_run_is_not_trained_resumed_or_exported(trained_gpt, tmp_path):
    from genlab import api
    from genlab.core.errors import ConfigError
    from genlab.training.trainer import TrainConfig, fit

    out = tmp_path / "q"
    run_cli("quantize", trained_gpt, out, check=True)
    with pytest.raises(ConfigError, match="quantized weights .* cannot be trained"):
        fit(api.load(out).model, None, TrainConfig(max_steps=1))
    p = run_cli("-q", "train", "--resume", out)
    assert p.returncode == 2 and "quantized run" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    for fmt in ("hf", "gguf"):
        p = run_cli("export", out, tmp_path / f"x.{fmt}", "--format", fmt)
        assert p.returncode == 2 and "quantized run" in p.stderr
    p = run_cli("quantize", out, tmp_path / "qq")
    assert p.returncode == 2 and "already quantized" in p.stderr
    p = run_cli("quantize", trained_gpt, out)
    assert p.returncode == 2 and "--overwrite" in p.stderr
    p = run_cli("quantize", trained_gpt, tmp_path / "q3", "--method", "int4", "--group-size", "48")
    assert p.returncode == 2 and "invalid choice" not in p.stderr and "groups of 32, 64" in p.stderr
    assert not (tmp_path / "q3").exists()
