"""The GAN family (models/gan.py): losses, the n_critic schedule, penalties, spectral-norm checkpoints, sampling
controls, config checks, and a short run that pulls samples toward a constant image."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_model, save_model

import genlab.models.gan  # noqa: F401  (registration)
from genlab.core.errors import ConfigError
from genlab.models import build_config, build_model
from genlab.training.trainer import TrainConfig

torch.set_num_threads(1)


def _model(**kw):
    cfg = build_config({"family": "gan", "preset": "tiny", "image_size": 8, "num_classes": 3, **kw})
    torch.manual_seed(0)
    return build_model(cfg)


def _batch(n=8, c=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 3


def _flat(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.parametrize("loss", ["ns", "hinge", "wgan-gp"])
@pytest.mark.parametrize("conditional", [False, True])
def test_each_loss_is_finite_and_a_step_moves_both_players(loss, conditional):
    model = _model(loss=loss, conditional=conditional)
    opts = model.make_optimizers(TrainConfig(lr=1e-3))
    g0, d0 = _flat(model.generator), _flat(model.discriminator)
    out = model.train_step(_batch(), opts, 0)
    for k in ("loss_d", "loss_g", "d_real", "d_fake", "loss"):
        assert isinstance(out[k], float) and torch.isfinite(torch.tensor(out[k])), k
    assert ("gp" in out) == (loss == "wgan-gp") and "r1" not in out
    assert not torch.equal(g0, _flat(model.generator)) and not torch.equal(d0, _flat(model.discriminator))
    assert all(p.grad is None for p in model.parameters())  # train_step leaves no gradients behind
    mon = model.loss(_batch())
    assert torch.isfinite(mon.loss) and {"loss_d", "loss_g", "d_real", "d_fake"} <= set(mon.metrics)


def test_n_critic_updates_g_every_nth_call():
    model = _model(n_critic=3)
    opts = model.make_optimizers(TrainConfig(lr=1e-3))
    for step in range(7):
        g0, d0 = _flat(model.generator), _flat(model.discriminator)
        out = model.train_step(_batch(seed=step), opts, step)
        g_moved = not torch.equal(g0, _flat(model.generator))
        assert not torch.equal(d0, _flat(model.discriminator))  # D: every call
        assert g_moved == ((step + 1) % 3 == 0) == (out["g_step"] == 1.0), step


def test_penalties_are_positive_and_reported():
    model = _model(loss="wgan-gp", r1_gamma=1.0)
    out = model.train_step(_batch(), model.make_optimizers(TrainConfig(lr=1e-3)), 0)
    assert out["gp"] > 0 and out["r1"] > 0
    out = _model(loss="hinge", r1_gamma=10.0).train_step(_batch(), _model().make_optimizers(TrainConfig()), 0)
    assert out["r1"] > 0 and "gp" not in out


def test_optimizers_carry_lr_scale_and_the_family_betas():
    model = _model(lr_scale_d=4.0, lr_scale_g=0.5, adam_betas=[0.0, 0.9])
    opts = model.make_optimizers(TrainConfig(lr=1e-4, beta1=0.9, beta2=0.99))
    assert opts["d"].param_groups[0]["lr_scale"] == 4.0 and opts["d"].param_groups[0]["lr"] == pytest.approx(4e-4)
    assert opts["g"].param_groups[0]["lr_scale"] == 0.5 and opts["g"].param_groups[0]["betas"] == (0.0, 0.9)
    n_g = sum(len(g["params"]) for g in opts["g"].param_groups)
    assert n_g == len(list(model.generator.parameters()))


@pytest.mark.parametrize("conditional", [False, True])
def test_spectral_norm_survives_safetensors_round_trip(conditional, tmp_path):
    model = _model(spectral_norm=True, conditional=conditional)
    assert any("parametrizations" in k for k in model.state_dict())
    opts = model.make_optimizers(TrainConfig(lr=1e-3))
    for s in range(3):  # move the weights, the power-iteration vectors and the batch-norm statistics
        model.train_step(_batch(seed=s), opts, s)
    save_model(model, str(tmp_path / "m.safetensors"))
    torch.manual_seed(123)
    again = build_model(model.config)  # freshly built, differently initialised
    model.eval(), again.eval()
    x, y = _batch(seed=9)
    xs = x.float() / 127.5 - 1
    yy = y if conditional else None
    with torch.no_grad():
        assert not torch.equal(model.discriminator(xs, yy), again.discriminator(xs, yy))
    load_model(again, str(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert torch.equal(model.discriminator(xs, yy), again.discriminator(xs, yy))
    g = lambda: torch.Generator().manual_seed(5)
    assert torch.equal(model.sample(4, generator=g()), again.sample(4, generator=g()))
    # the first training-mode forward (one power iteration from the saved vectors) agrees too
    model.train(), again.train()
    with torch.no_grad():
        assert torch.equal(model.discriminator(xs, yy), again.discriminator(xs, yy))


def test_conditional_samples_depend_on_labels_and_unconditional_rejects_them():
    model = _model(conditional=True)
    g = lambda: torch.Generator().manual_seed(3)
    a = model.sample(4, generator=g(), labels=torch.tensor([0, 0, 0, 0]))
    b = model.sample(4, generator=g(), labels=torch.tensor([2, 2, 2, 2]))
    assert not torch.equal(a, b)
    assert model.sample(5, generator=g()).shape == (5, 1, 8, 8)  # default labels arange(n) % num_classes
    with pytest.raises(ValueError):
        model.sample(2, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        model.loss((_batch()[0], torch.full((8,), -1)))  # a conditional model needs labelled batches
    with pytest.raises((ConfigError, ValueError)):
        _model().sample(2, labels=torch.tensor([0, 1]))


def test_temperature_zero_gives_one_image_and_sampling_restores_the_mode():
    model = _model()
    model.train_step(_batch(), model.make_optimizers(TrainConfig()), 0)  # non-trivial batch-norm statistics
    model.train()
    s = model.sample(5, generator=torch.Generator().manual_seed(0), temperature=0.0)
    assert s.dtype == torch.uint8 and s.shape == (5, 1, 8, 8)
    assert all(torch.equal(s[0], s[i]) for i in range(1, 5))
    assert model.training
    t = model.sample(5, generator=torch.Generator().manual_seed(0), temperature=1.0)
    assert not all(torch.equal(t[0], t[i]) for i in range(1, 5))
    with pytest.raises(ValueError):
        model.sample(2, temperature=-1.0)
    with pytest.raises(ConfigError):
        model.sample(2, steps=10)


def test_rgb_and_28px():
    model = _model(channels=3, image_size=28)
    x = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    out = model.train_step((x, torch.zeros(4, dtype=torch.long)), model.make_optimizers(TrainConfig()), 0)
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert model.sample(2).shape == (2, 3, 28, 28)


@pytest.mark.parametrize(
    "bad",
    [{"loss": "lsgan"}, {"image_size": 10}, {"image_size": 0}, {"channels": 2}, {"z_dim": 0}, {"g_width": -1},
     {"n_critic": 0}, {"gp_weight": -1.0}, {"r1_gamma": -0.1}, {"lr_scale_d": 0.0}, {"adam_betas": [0.5, 1.0]},
     {"adam_betas": [0.5]}, {"conditional": True, "num_classes": 0}, {"num_classes": -1}],
)
def test_bad_config_values_raise(bad):
    with pytest.raises(ConfigError):
        build_config({"family": "gan", "preset": "tiny", **bad})
    cfg = build_config({"family": "gan", "preset": "tiny"})
    with pytest.raises(ConfigError):  # also when the dataclass is built directly
        build_model(dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in bad.items()}))


def test_training_on_a_constant_image_pulls_samples_toward_it():
    torch.manual_seed(0)
    model = build_model(build_config({"family": "gan", "preset": "tiny", "image_size": 8}))
    opts = model.make_optimizers(TrainConfig(lr=2e-3))
    x = torch.full((32, 1, 8, 8), 200, dtype=torch.uint8)
    y = torch.full((32,), -1)
    before = model.sample(32, generator=torch.Generator().manual_seed(0)).float()
    for step in range(300):
        model.train_step((x, y), opts, step)
    after = model.sample(32, generator=torch.Generator().manual_seed(0)).float()
    err_before, err_after = (before - 200).abs().mean(), (after - 200).abs().mean()
    assert err_after < 20 and err_after < err_before / 3, (err_before, err_after)
