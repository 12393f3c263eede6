"""The native Llama family: the same logits as transformers' LlamaForCausalLM on the same weights, a KV-cache decode
that equals the full forward, grouped-query attention, and training through the shared trainer."""

from __future__ import annotations

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.models import MODELS, build_config, build_model
from genlab.models.llama import Llama, LlamaConfig, apply_rope, rope_tables
from genlab.nn.kernels import kernels

transformers = pytest.importorskip("transformers")


def pair(tie: bool, n_kv_head: int = 2, theta: float = 500.0):
    """A random transformers Llama and a genlab Llama holding its weights."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=40, rope_theta=theta, rms_norm_eps=1e-5,
        tie_word_embeddings=tie)).eval()
    ours = Llama(LlamaConfig(vocab_size=50, block_size=40, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                             intermediate_size=96, rope_theta=theta, tie_embeddings=tie)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize(("tie", "n_kv_head"), [(True, 2), (False, 1), (False, 4)])
def test_logits_equal_transformers(tie, n_kv_head):
    hf, ours = pair(tie, n_kv_head)
    x = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("path", ["compiled", "python", "modules"])
def test_cached_decode_equals_the_full_forward(n_kv_head, path):
    """The three ways a decode step runs: the compiled layer kernel (nn/kernels.cpp), the Python fast path, and
    the modules (when a hook, as an adapter or a probe adds, is on a layer)."""
    _, m = pair(tie=True, n_kv_head=n_kv_head)
    if path == "modules":
        m.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    if path == "compiled" and kernels() is None:
        pytest.skip("the CPU kernels cannot be built here")
    x = torch.randint(0, 50, (3, 40))  # an odd batch: the kernels' one-row tiles after the two-row ones
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(3, 40)
        assert (cache.plan is not None) == (path != "modules")
        if path == "python":
            cache.plan = (*cache.plan[:-1], None)
        elif path == "compiled":
            assert cache.plan[-1] is not None
        steps = [m.decode(x[:, :25], cache)] + [m.decode(x[:, t : t + 1], cache) for t in range(25, 40)]
    assert cache.k.shape[2] == n_kv_head  # the cache holds the key/value heads, not the 4 query heads
    for i, logits in zip(range(24, 40), steps, strict=True):
        assert torch.allclose(logits, full[:, i], atol=1e-5)


def test_rope_is_a_rotation_with_relative_angles():
    cos, sin = rope_tables(8, 16, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    rq = apply_rope(q.expand(1, 1, 16, 8), cos, sin)
    rk = apply_rope(k.expand(1, 1, 16, 8), cos, sin)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 16), atol=1e-5)  # norms kept
    dots = (rq[0, 0, :, None] * rk[0, 0, None]).sum(-1)  # (16, 16): q at i, k at j
    assert torch.allclose(dots[3, 1], dots[9, 7], atol=1e-5)  # depends on i - j only


def test_baby_has_the_size_of_the_gpt_baby():
    sizes = {}
    for fam in ("gpt", "llama"):
        sizes[fam] = build_model(build_config({"family": fam, "preset": "baby", "vocab_size": 65})).num_params()
    assert abs(sizes["llama"] - sizes["gpt"]) / sizes["gpt"] < 0.05, sizes


@pytest.mark.parametrize(("field", "value", "says"), [
    ("n_kv_head", 3, "multiple of model.n_kv_head"),
    ("n_embd", 33, "divisible"),
    ("rope_theta", 0.0, "rope_theta"),
    ("n_head", 0, "n_head=0"),
])
def test_bad_configs_say_what_is_wrong(field, value, says):
    with pytest.raises(ConfigError, match=says):
        build_config({"family": "llama", "preset": "tiny", "vocab_size": 10, field: value})


def test_trains_through_fit(tmp_path):
    from genlab import api
    from tests.conftest import write_config

    cfg = write_config(tmp_path / "l.toml", name="llama", family="llama", train={"max_steps": 40})
    run_dir, res = api.train(cfg)
    run = api.load(run_dir)
    assert run.family == "llama" and MODELS.get("llama").modality == "text"
    losses = [r["train_loss"] for r in res.history if "train_loss" in r]
    assert losses[0] > losses[-1] + 0.3, losses
    text = api.generate(run, "ROMEO:", max_new_tokens=10, seed=1)
    assert text == api.generate(run, "ROMEO:", max_new_tokens=10, seed=1)


def test_a_bf16_model_decodes_as_it_forwards():
    _, m = pair(tie=True)
    m.to(torch.bfloat16)
    x = torch.randint(0, 50, (2, 30))
    with torch.no_grad():
        full = m(x).float()
        cache = m.new_cache(2, 30)
        assert cache.plan is not None and cache.kv.dtype == torch.bfloat16
        steps = [m.decode(x[:, :20], cache)] + [m.decode(x[:, t : t + 1], cache) for t in range(20, 30)]
    for i, logits in zip(range(19, 30), steps, strict=True):
        assert torch.allclose(logits.float(), full[:, i], atol=0.05)
