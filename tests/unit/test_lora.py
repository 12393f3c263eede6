"""LoRA: a fresh adapter equals the base, merging equals the unmerged adapter (Linear and Conv2d), the adapter
round-trips through peft both ways, the chat loss mask covers the assistant's tokens only, and bad inputs are
refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from genlab.adapt.lora import load_adapter, save_adapter
from genlab.core.errors import ConfigError, DataError
from genlab.data.chat import ChatData, ChatTemplate, encode_conversation, read_chat_jsonl
from genlab.models import build_config, build_model
from genlab.nn.lora import LoRAConv2d, add_lora, lora_state_dict, merge_lora


def tiny(family: str, **kw):
    torch.manual_seed(0)
    return build_model(build_config({"family": family, "preset": "tiny", "vocab_size": 40, **kw})).eval()


def randomize(model):  # a trained adapter: B is no longer zero
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_fresh_adapter_leaves_the_model_unchanged_and_only_it_trains(family):
    m = tiny(family)
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        before = m(x)
    names = add_lora(m, ["c_attn", "c_proj", "c_fc"] if family == "gpt" else ["q_proj", "v_proj", "down_proj"], r=4)
    assert len(names) == (8 if family == "gpt" else 6)  # 2 layers x 3 targets, and gpt has two c_proj per layer
    with torch.no_grad():
        assert torch.equal(m(x), before)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    if family == "llama":  # the base's names are kept: its checkpoint still loads into the wrapped model
        assert "model.layers.0.self_attn.q_proj.weight" in m.state_dict()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_merging_equals_the_unmerged_adapter(family):
    m = tiny(family)
    add_lora(m, ".*(attn|mlp).*" if family == "gpt" else ["q_proj", "k_proj", "gate_proj"], r=4, alpha=8)
    randomize(m)
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        unmerged = m(x)
        merge_lora(m)
        assert not lora_state_dict(m)
        assert torch.allclose(m(x), unmerged, atol=1e-5)


def test_conv_lora_merges_and_starts_at_the_base():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        base = net(x)
        add_lora(net, ["0", "2"], r=2, alpha=4)
        assert isinstance(net[0], LoRAConv2d) and torch.equal(net(x), base)
        randomize(net)
        unmerged = net(x)
        merge_lora(net)
        assert type(net[2]) is nn.Conv2d and torch.allclose(net(x), unmerged, atol=1e-5)
        assert "0.weight" in net.state_dict()  # the base names are kept throughout
        assert not torch.allclose(unmerged, base)


def test_lora_over_an_int8_base_trains_the_adapter_only():
    from genlab.adapt.quantize import quantize_model

    m = quantize_model(tiny("llama"), "int8")
    add_lora(m, ["q_proj", "v_proj"], r=2)
    randomize(m)
    m.train()
    loss = m.loss((torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8)))).loss
    loss.backward()
    grads = [n for n, p in m.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def test_adapters_save_and_load_in_peft_layout(tmp_path):
    m = tiny("llama")
    add_lora(m, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize(m)
    save_adapter(m, tmp_path / "a", r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], family="llama")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8
    other = tiny("llama")
    load_adapter(other, tmp_path / "a")
    x = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        assert torch.equal(other(x), m(x))
    with pytest.raises(ConfigError, match="for another base model"):  # same names, other widths
        load_adapter(tiny("llama", n_embd=64, n_head=2, n_kv_head=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="does not fit this model"):  # no layer of that name at all
        load_adapter(tiny("gpt"), tmp_path / "a")


def test_bad_lora_settings_are_refused():
    with pytest.raises(ConfigError, match="rank r=0 must be an integer >= 1"):
        add_lora(tiny("llama"), ["q_proj"], r=0)
    with pytest.raises(ConfigError, match="match no Linear or Conv2d layer.*q_proj"):
        add_lora(tiny("llama"), ["qkv"], r=4)
    with pytest.raises(ConfigError, match="not a regular expression"):
        add_lora(tiny("llama"), "(", r=4)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_loss_mask_covers_the_assistants_tokens_only():
    tpl = ChatTemplate(CHATML)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    ids, mask = encode_conversation(tpl, lambda t: list(t.encode()), msgs)  # bytes as tokens: easy to read
    text = bytes(ids).decode()
    assert text == tpl.render(msgs, add_generation_prompt=False)
    trained = "".join(chr(i) if m else "|" for i, m in zip(ids, mask, strict=True))
    pieces = [p for p in trained.split("|") if p]
    assert pieces == ["Hello!<", "im_end", ">\n", "Goodbye.<", "im_end", ">\n"]  # replies + end of turn only


def test_chat_data_packs_windows_and_ignores_prompts(tmp_path):
    tpl = ChatTemplate(CHATML)
    f = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(20)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs = [encode_conversation(tpl, lambda t: list(t.encode()), m) for m in read_chat_jsonl(f)]
    data = ChatData(convs, block_size=32)
    x, y = data.train_batch(4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:][y[:, :-1] != -100], y[:, :-1][y[:, :-1] != -100])  # y is x shifted by one
    scored = bytes(int(t) for t in y[y != -100]).decode(errors="replace")
    assert "answer" in scored and "question" not in scored
    assert data.eval_batches(8)


def test_bad_chat_data_is_refused(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="c.jsonl:1: the conversation has no assistant turn"):
        read_chat_jsonl(f)
    f.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match="needs"):
        read_chat_jsonl(f)
    f.write_text("not json\n")
    with pytest.raises(DataError, match="not JSON"):
        read_chat_jsonl(f)


# ---------------------------------------------------------------- interop with peft on the HF export

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def hf_pair(tmp_path):
    """A tiny genlab llama run exported to a transformers folder, and the transformers model read back."""
    from genlab import api
    from genlab.adapt.hf import export_hf

    m = tiny("llama", vocab_size=300)
    run = api.Run(tmp_path / "run", m, _bpe(), None)
    export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    return m, hf


def _bpe():
    from genlab.data.tokenizers import train_tokenizer

    return train_tokenizer("bpe", "the quick brown fox jumps over the lazy dog " * 50, vocab_size=300)


def test_a_genlab_adapter_loads_in_peft_with_the_same_logits(tmp_path):
    m, hf = hf_pair(tmp_path)
    targets = ["q_proj", "v_proj", "gate_proj"]
    add_lora(m, targets, r=4, alpha=8)
    randomize(m)
    save_adapter(m, tmp_path / "adapter", r=4, alpha=8, dropout=0.0, targets=targets, family="llama")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(m(x), pm(x).logits, atol=1e-4)


def test_a_peft_adapter_loads_into_genlab_with_the_same_logits(tmp_path):
    m, hf = hf_pair(tmp_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(hf, cfg)
    randomize(pm)
    pm.save_pretrained(tmp_path / "peft_adapter")
    load_adapter(m, tmp_path / "peft_adapter")
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.allclose(m(x), pm.eval()(x).logits, atol=1e-4)


@pytest.mark.parametrize("compiled", [False, True], ids=["torch-ops", "compiled"])
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.0, False), (0.3, True)])
def test_the_fused_lora_layer_matches_the_composed_layers_in_value_and_gradient(p, bias, compiled, monkeypatch):
    """LoRALinear's own autograd function (used to train over a frozen base) against the same maths written with
    plain torch ops and the same dropout mask: outputs and gradients of x, A and B; with the mask drawn by torch
    ops and by the compiled kernels (a hash of a key from torch's generator)."""
    from genlab.nn import lora
    from genlab.nn.kernels import kernels
    from genlab.nn.lora import LoRALinear, dropout_mask

    if compiled and kernels() is None:
        pytest.skip("the compiled kernels are not built on this machine")
    if not compiled:
        monkeypatch.setattr(lora, "_dropout_kernels", lambda x: None)
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 20, bias=bias).requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=p).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 12, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    y.backward(torch.ones_like(y) * torch.arange(20.0))
    got = (y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())

    x.grad = layer.lora_A.weight.grad = layer.lora_B.weight.grad = None
    torch.manual_seed(1)
    if not p:
        keep = torch.ones_like(x, dtype=torch.bool)
    elif compiled:
        keep = kernels().lora_dropout(torch.ones(15, 12), lora.dropout_key(), p).view(3, 5, 12) != 0
    else:
        keep = dropout_mask(x, p)
    xd = x * keep / (1 - p)
    ref = base(x) + xd @ layer.lora_A.weight.t() @ layer.lora_B.weight.t() * layer.scaling
    ref.backward(torch.ones_like(ref) * torch.arange(20.0))
    want = (ref.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    if p:
        assert 0.2 < 1 - keep.float().mean() < 0.4  # the mask drops about p of the inputs


def test_the_compiled_dropout_keeps_one_minus_p_with_independent_keys():
    """The hash mask: the kept fraction is 1 - p, two keys give independent masks, the same key the same mask,
    and the backward's masked low-rank term equals torch's gx + keep * (gh @ a) at shapes past one 4096 block."""
    from genlab.nn.kernels import kernels

    k = kernels()
    if k is None:
        pytest.skip("the compiled kernels are not built on this machine")
    ones = torch.ones(1000, 1000)
    for p in (0.05, 0.1, 0.5):
        a, b = k.lora_dropout(ones, 11, p) != 0, k.lora_dropout(ones, 12, p) != 0
        assert abs(a.float().mean().item() - (1 - p)) < 2e-3
        assert abs((~a & ~b).float().mean().item() - p * p) < 2e-3  # independent drops
        assert torch.equal(a, k.lora_dropout(ones, 11, p) != 0)
    assert bool((k.lora_dropout(ones, 5, 0.0) == 1).all())
    torch.manual_seed(0)
    x, gx, gh, a = torch.randn(37, 300), torch.randn(37, 300), torch.randn(37, 8), torch.randn(8, 300)
    keep = k.lora_dropout(torch.ones_like(x), -7, 0.2) != 0
    torch.testing.assert_close(k.lora_dropout(x, -7, 0.2), torch.where(keep, x, 0.0))
    want = gx + torch.where(keep, gh @ a, 0.0)
    k.lora_dropout_backward(gx, gh, a, -7, 0.2)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"must be in \[0, 1\)"):
        k.lora_dropout(x, 1, 1.0)


def test_the_dropout_mask_keeps_one_minus_p():
    from genlab.nn.lora import dropout_mask

    torch.manual_seed(0)
    for p in (0.05, 0.1, 0.5):
        kept = dropout_mask(torch.empty(1000, 1000), p).float().mean().item()
        assert abs(kept - (1 - p)) < 2e-3
