"""Weight-only quantization: the int8/int4 maths against closed forms and PyTorch's own quantizer, the kernels
against the dequantized weights, whole gpt/llama models close to full precision, and the decode fast path."""

from __future__ import annotations

import pytest
import torch

from genlab.adapt.quantize import (
    QuantLinear,
    int4_dequantize,
    int4_quantize,
    int8_quantize,
    kernels,
    pack_nibbles,
    quantize_model,
    unpack_nibbles,
)
from genlab.core.errors import ConfigError
from genlab.models import build_config, build_model


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_int8_equals_pytorchs_per_channel_quantizer():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    q, s = int8_quantize(w)
    ref = torch.quantize_per_channel(w, s.double(), torch.zeros(48, dtype=torch.long), 0, torch.qint8)
    assert torch.equal(q, ref.int_repr())
    assert (q.float() * s[:, None] - w).abs().le(s[:, None] / 2 + 1e-6).all()  # half a step at most


def test_int4_groups_round_to_the_nearest_of_16_levels():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    q, s, z = int4_quantize(w, 32)
    assert q.min() >= 0 and q.max() <= 15 and s.shape == (8, 2)
    err = (int4_dequantize(q, s, z) - w).abs().reshape(8, 2, 32)
    assert (err <= s[..., None] / 2 + 1e-6).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


@pytest.mark.parametrize(("method", "group"), [("int8", None), ("int4", 32), ("int4", 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_equals_the_dequantized_weights(method, group, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=bias)
    q = QuantLinear.from_linear(lin, method, group)
    for x in (torch.randn(1, 128), torch.randn(5, 128), torch.randn(2, 3, 128)):
        want = torch.nn.functional.linear(x, q.dequantize(), lin.bias)
        assert torch.allclose(q(x), want, atol=1e-4, rtol=1e-4)
    rel = (q(x) - lin(x)).abs().max() / lin(x).abs().max()
    assert rel < (0.02 if method == "int8" else 0.2)


def tiny(family: str, **kw):
    torch.manual_seed(0)
    return build_model(build_config({"family": family, "preset": "tiny", "vocab_size": 40, **kw})).eval()


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize(("method", "group"), [("int8", None), ("int4", 32)])
def test_a_quantized_model_stays_close_and_decodes_as_it_forwards(family, method, group):
    m = tiny(family)
    x = torch.randint(0, 40, (2, 20))
    with torch.no_grad():
        full = m(x)
        quantize_model(m, method, group)
        assert not any(type(mod) is torch.nn.Linear for mod in m.modules())
        got = m(x)
        assert (got - full).abs().max() < (0.05 if method == "int8" else 0.5) * full.abs().max()
        cache = m.new_cache(2, 20)
        steps = [m.decode(x[:, :10], cache)] + [m.decode(x[:, t:t + 1], cache) for t in range(10, 20)]
    assert cache.plan is not None  # the quantized layers take the fast path
    for i, logits in zip(range(9, 20), steps, strict=True):
        assert torch.allclose(logits, got[:, i], atol=1e-4)


def test_bad_requests_are_refused():
    with pytest.raises(ConfigError, match="unknown; known: int8, int4"):
        quantize_model(tiny("llama"), "int3")
    with pytest.raises(ConfigError, match="groups of 32, 64, 128, 256"):
        quantize_model(tiny("llama"), "int4", 48)
    with pytest.raises(ConfigError, match="goes with int4"):
        quantize_model(tiny("llama"), "int8", 32)


@pytest.mark.parametrize("M", [1, 2, 7, 8, 16])
def test_genlabs_kernels_give_pytorchs_numbers(M):
    """The AVX2 kernels against PyTorch's own int8 and int4 CPU kernels on the same quantized weights."""
    k = kernels()
    if k is None:
        pytest.skip("the kernels cannot be built here (no AVX2 or no C++ compiler): layers use dequantized weights")
    torch.manual_seed(M)
    w, x = torch.randn(203, 256), torch.randn(M, 256)  # 203 rows: a tail of 3 after the blocks of 4
    none = torch.empty(0)
    assert torch.allclose(k.linear(x, 0, w, none, none, 0), x @ w.T, atol=1e-4, rtol=1e-5)  # fp32 weights
    q, s = int8_quantize(w)
    assert torch.allclose(k.int8_mm(x, q, s), torch._weight_int8pack_mm(x, q, s), atol=1e-4, rtol=1e-5)
    w = w[:192]  # PyTorch's int4 packing wants rows in multiples of 16
    for group in (32, 128):
        q4, s4, z4 = int4_quantize(w, group)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 2)
        sz = torch.stack((s4, z4), dim=-1).transpose(0, 1).contiguous()
        want = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        got = k.int4_mm(x, pack_nibbles(q4), s4, z4, group)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)
