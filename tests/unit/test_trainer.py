import math

import pytest
import torch
from torch import nn

from genlab.core import checkpoint as ckpt
from genlab.core.config import from_dict
from genlab.core.errors import TrainingDiverged
from genlab.core.outputs import StepOutput
from genlab.training.optim import adamw, lr_at
from genlab.training.trainer import TrainConfig, fit


class Regression(nn.Module):
    """y = w x: a model whose loss we can poison at a chosen step."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.config = None
        self.w = nn.Parameter(torch.zeros(4, 1))
        self.b = nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.nan_at = nan_at

    def loss(self, batch):
        x, y = batch
        self.calls += self.training
        loss = ((x @ self.w + self.b - y) ** 2).mean()
        if self.training and self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return StepOutput(loss, {}, n_items=len(x))

    def sample(self, n, *, generator=None):
        return torch.zeros(n)


class Data:
    true_w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def train_batch(self, batch_size, generator):
        x = torch.randn(batch_size, 4, generator=generator)
        return x, x @ self.true_w

    def eval_batches(self, batch_size, max_batches=None):
        g = torch.Generator().manual_seed(123)
        x = torch.randn(64, 4, generator=g)
        return [(x, x @ self.true_w)]


def cfg(**kw):
    base = {"max_steps": 200, "batch_size": 16, "lr": 0.05, "warmup_steps": 5, "eval_every": 50, "checkpoint_every": 50,
                "log_every": 10, "progress": False, "weight_decay": 0.0}
    return from_dict(TrainConfig, {**base, **kw})


def test_fit_learns_and_writes_the_run(tmp_path):
    m = Regression()
    res = fit(m, Data(), cfg(), run_dir=tmp_path, seed=0)
    assert res.step == 200 and res.stopped_by == "max_steps"
    assert res.val_loss < 1e-3
    assert torch.allclose(m.w, Data.true_w, atol=0.05)
    assert (tmp_path / ckpt.WEIGHTS).is_file() and (tmp_path / ckpt.TRAINER_STATE).is_file()
    assert len((tmp_path / ckpt.METRICS).read_text().splitlines()) == 20 + 4


def test_nan_guard_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    m = Regression(nan_at=75)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 75.*last good checkpoint \(step 50\)"):
        fit(m, Data(), cfg(), run_dir=tmp_path, seed=0)
    state = ckpt.load_trainer_state(tmp_path / ckpt.TRAINER_STATE)
    assert state["step"] == 50 and torch.isfinite(state["model"]["w"]).all()
    w = Regression()
    ckpt.load_weights(tmp_path / ckpt.WEIGHTS, w)
    assert torch.isfinite(w.w).all()


def test_ema_weights_are_saved_and_lag_the_raw_weights(tmp_path):
    m = Regression()
    fit(m, Data(), cfg(max_steps=30, ema=0.9), run_dir=tmp_path, seed=0)
    saved = Regression()
    ckpt.load_weights(tmp_path / ckpt.WEIGHTS, saved)
    raw = ckpt.load_trainer_state(tmp_path / ckpt.TRAINER_STATE)["model"]["w"]
    assert torch.equal(raw, m.w.detach())
    assert not torch.allclose(saved.w, m.w) and (saved.w - Data.true_w).abs().sum() > (m.w - Data.true_w).abs().sum()


def test_ema_decay_warms_up_and_averages_float_buffers():
    from genlab.training.trainer import _ema_update, ema_decay

    assert ema_decay(0.999, 0) == pytest.approx(0.1) and ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.5, 3) == pytest.approx(4 / 13) and ema_decay(0.5, 100) == 0.5
    live, avg = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    live.running_mean.fill_(4.0)
    live.num_batches_tracked.fill_(7)
    with torch.no_grad():
        live.weight.fill_(2.0)
    _ema_update(avg, live, 0.75)
    assert torch.allclose(avg.running_mean, torch.full((2,), 1.0))  # 0.75 * 0 + 0.25 * 4
    assert torch.allclose(avg.weight, torch.full((2,), 1.25))  # 0.75 * 1 + 0.25 * 2
    assert int(avg.num_batches_tracked) == 7  # integer buffers are copied


def test_grad_accumulation_equals_a_bigger_batch():
    """Same examples, same order: 2 micro-batches of 8 give the gradient of one batch of 16."""

    class Fixed(Data):
        def train_batch(self, batch_size, generator):
            x = torch.randn(batch_size, 4, generator=generator)
            return x, x @ self.true_w

    a, b = Regression(), Regression()
    fit(a, Fixed(), cfg(max_steps=1, batch_size=16, grad_clip=0.0, warmup_steps=0), seed=3)
    fit(b, Fixed(), cfg(max_steps=1, batch_size=8, grad_accum=2, grad_clip=0.0, warmup_steps=0), seed=3)
    assert torch.allclose(a.w, b.w, atol=1e-6)


def test_time_budget_and_caller_rng_untouched():
    torch.manual_seed(42)
    expect = torch.rand(3)
    torch.manual_seed(42)
    res = fit(Regression(), Data(), cfg(max_steps=0, max_minutes=0.01), seed=0)
    assert res.stopped_by == "max_minutes" and 0.5 <= res.elapsed_s < 3
    assert torch.equal(torch.rand(3), expect)


def test_lr_schedule_warmup_then_cosine():
    f = lambda s, p: lr_at(p, s, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0, 0) == pytest.approx(0.1) and f(9, 0.09) == pytest.approx(1.0)
    assert f(10, 0.0) == pytest.approx(1.0)
    assert f(50, 0.5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100, 1.0) == pytest.approx(0.1) and f(200, 2.0) == pytest.approx(0.1)
    assert all(f(s, s / 100) >= f(s + 1, (s + 1) / 100) for s in range(10, 99))


def test_weight_decay_only_on_matrices():
    m = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    opt = adamw(m, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.99))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.dim() for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert not math.isnan(sum(p.sum().item() for p in m.parameters()))


class TwoPlayers(Regression):
    """A HasCustomStep toy: two parameter groups with their own optimizers and a manual update."""

    def make_optimizers(self, train_cfg):
        return {"w": torch.optim.Adam([{"params": [self.w], "lr_scale": 1.0}], lr=train_cfg.lr),
                "b": torch.optim.Adam([{"params": [self.b], "lr_scale": 0.5}], lr=train_cfg.lr)}

    def train_step(self, batch, optimizers, step):
        self.seen_lrs = {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}
        loss = self.loss(batch).loss
        for o in optimizers.values():
            o.zero_grad()
        loss.backward()
        for o in optimizers.values():
            o.step()
        return {"loss": loss.item(), "loss_w": loss.item() * 2, "step_seen": float(step)}


class Scheduled(Regression):
    def __init__(self):
        super().__init__()
        self.steps = []

    def set_train_step(self, step):
        self.steps.append(step)


def test_custom_step_gets_its_optimizers_lr_scales_and_logs(tmp_path):
    cfg = TrainConfig(max_steps=12, lr=0.05, warmup_steps=0, min_lr_ratio=1.0, log_every=3, eval_every=0,
                      checkpoint_every=6, progress=False)
    torch.manual_seed(0)
    m = TwoPlayers()
    res = fit(m, Data(), cfg, run_dir=tmp_path / "a", seed=1)
    assert m.seen_lrs == {"w": 0.05, "b": 0.025}
    assert res.train_loss is not None and math.isfinite(res.val_loss)
    rec = [r for r in res.history if "loss_w" in r]
    assert len(rec) == 4 and rec[-1]["step_seen"] == 11.0
    state = ckpt.load_trainer_state(tmp_path / "a" / ckpt.TRAINER_STATE)
    assert set(state["optimizers"]) == {"w", "b"}
    # resume from the step-6 checkpoint reaches the same weights as the uninterrupted run
    torch.manual_seed(0)
    m2 = TwoPlayers()
    fit(m2, Data(), from_dict(TrainConfig, {**cfg.__dict__, "max_steps": 6}), run_dir=tmp_path / "b", seed=1)
    torch.manual_seed(0)
    m3 = TwoPlayers()
    fit(m3, Data(), cfg, run_dir=tmp_path / "b", seed=1, resume=True)
    assert torch.equal(m3.w, m.w) and torch.equal(m3.b, m.b)
    with pytest.raises(Exception, match="grad_accum"):
        fit(TwoPlayers(), Data(), from_dict(TrainConfig, {**cfg.__dict__, "grad_accum": 2}))


def test_step_schedule_is_told_every_step_and_after_resume(tmp_path):
    cfg = TrainConfig(max_steps=4, warmup_steps=0, eval_every=0, checkpoint_every=2, progress=False)
    m = Scheduled()
    fit(m, Data(), cfg, run_dir=tmp_path, seed=0)
    assert m.steps == [0, 1, 2, 3]
    m2 = Scheduled()
    fit(m2, Data(), from_dict(TrainConfig, {**cfg.__dict__, "max_steps": 6}), run_dir=tmp_path, seed=0, resume=True)
    assert m2.steps == [4, 5]
