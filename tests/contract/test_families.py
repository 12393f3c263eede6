"""Every registered text family, with its `tiny` preset, honours the shared contracts (DESIGN.md 6)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from genlab.core import checkpoint as ckpt
from genlab.core.config import from_dict, to_dict
from genlab.core.protocols import GenerativeModel, HasClosedFormFit, HasIncrementalDecode, HasLogProb
from genlab.data.datasets import TokenData
from genlab.data.tokenizers import CharTokenizer
from genlab.models import MODELS, build_config, build_model, config_dict, config_from_saved

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40)
FAMILIES = [n for n in MODELS.names() if MODELS.get(n).modality == "text"]


def _model_and_data(name):
    tok = CharTokenizer.train(TEXT)
    cfg = build_config({"family": name, "preset": "tiny", "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = tok.encode_array(TEXT)
    data = TokenData(ids[: len(ids) * 9 // 10], ids[len(ids) * 9 // 10 :], getattr(cfg, "block_size", 16))
    if isinstance(model, HasClosedFormFit):
        model.fit_data(data)
    return model, data


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def test_protocols(family):
    model, _ = _model_and_data(family)
    assert isinstance(model, GenerativeModel)
    assert isinstance(model, HasIncrementalDecode)
    assert model.config.family == family


def test_loss_is_finite_and_reaches_every_parameter(family):
    model, data = _model_and_data(family)
    out = model.loss(data.train_batch(4, torch.Generator().manual_seed(0)))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.n_items > 0
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        out.loss.backward()
        for n, p in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_sample_shape_dtype_and_seed(family):
    model, _ = _model_and_data(family)
    a = model.sample(3, generator=torch.Generator().manual_seed(1), max_new_tokens=12)
    b = model.sample(3, generator=torch.Generator().manual_seed(1), max_new_tokens=12)
    c = model.sample(3, generator=torch.Generator().manual_seed(2), max_new_tokens=12)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < model.config.vocab_size
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_load_gives_identical_outputs(family, tmp_path):
    model, data = _model_and_data(family)
    ckpt.save_weights(tmp_path / "model.safetensors", model)
    ckpt.write_model_config(tmp_path, family, config_dict(model.config))
    saved = ckpt.read_model_config(tmp_path)
    again = build_model(config_from_saved(saved["family"], saved["model"]))
    ckpt.load_weights(tmp_path / "model.safetensors", again)
    x, y = data.eval_batches(4, 1)[0]
    model.eval(), again.eval()
    assert torch.equal(model.loss((x, y)).loss, again.loss((x, y)).loss)
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(model.sample(2, generator=g(), max_new_tokens=8), again.sample(2, generator=g(),
                                                                                      max_new_tokens=8))


def test_config_round_trips(family):
    model, _ = _model_and_data(family)
    cfg = model.config
    again = from_dict(type(cfg), to_dict(cfg))
    assert again == cfg and dataclasses.is_dataclass(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.vocab_size = 3


def test_log_prob_is_exact_and_matches_the_loss(family):
    model, data = _model_and_data(family)
    assert isinstance(model, HasLogProb)
    x, y = data.eval_batches(4, 1)[0]
    seq = torch.cat([x, y[:, -1:]], dim=1)
    lp = model.log_prob(seq)
    assert lp.shape == (x.size(0),) and torch.isfinite(lp).all() and (lp <= 0).all()
    model.eval()
    with torch.no_grad():
        mean_nll = model.loss((x, y)).loss
    assert torch.allclose(-lp.sum() / y.numel(), mean_nll, rtol=1e-4)


def test_incremental_decode_matches_a_full_pass(family):
    """Feeding tokens one by one through the cache gives the same next-token scores as one full pass."""
    model, data = _model_and_data(family)
    model.eval()
    x, _ = data.eval_batches(2, 1)[0]
    x = x[:, :10]
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        full = model.decode(x, cache)
        cache = model.new_cache(2, 16)
        for t in range(x.size(1)):
            step = model.decode(x[:, t : t + 1], cache)
    assert torch.allclose(full, step, atol=1e-5)
