"""The diffusion family: training losses, its sampling controls and their bad values, bf16 sampling."""

from __future__ import annotations

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.models import build_config, build_model
from genlab.models.unet import FusedUNet, UpsampleConv
from genlab.sampling.denoisers import Denoiser


def _model(**kw):
    torch.manual_seed(0)
    return build_model(build_config({"family": "diffusion", "preset": "tiny", "channels": 1, "image_size": 8,
                                     "num_classes": 3, **kw}))


def _trained(**kw):
    """A tiny model fitted for a few steps to a fixed batch (enough for its output to depend on its input)."""
    m = _model(**kw)
    x = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = torch.arange(16) % 3
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    torch.manual_seed(1)
    for _ in range(15):
        m.loss((x, y)).loss.backward()
        opt.step()
        opt.zero_grad()
    return m.eval()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_every_parameterization_and_min_snr_train(prediction):
    for gamma in (0.0, 5.0):
        m = _trained(prediction=prediction, min_snr_gamma=gamma)
        out = m.sample(2, generator=torch.Generator().manual_seed(0), steps=4)
        assert out.shape == (2, 1, 8, 8) and out.dtype == torch.uint8


def test_eval_loss_is_reproducible_and_train_loss_is_random():
    m = _model()
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    m.eval()
    assert torch.equal(m.loss((x, None)).loss, m.loss((x, None)).loss)
    m.train()
    assert not torch.equal(m.loss((x, None)).loss, m.loss((x, None)).loss)


def test_label_dropout_uses_the_null_class():
    m = _model(conditional=True, p_uncond=0.5)
    seen = []
    net = m.denoiser.net
    net.register_forward_hook(lambda mod, args, out: seen.append(args[2].clone()))
    m.train()
    torch.manual_seed(0)
    m.loss((torch.zeros(64, 1, 8, 8, dtype=torch.uint8), torch.zeros(64, dtype=torch.long)))
    assert set(seen[0].tolist()) == {0, 3} and 15 < int((seen[0] == 3).sum()) < 50  # 3 = "no class"


def test_bf16_sampling_is_close_to_fp32():
    m = _trained()
    g = lambda: torch.Generator().manual_seed(4)
    a = m.sample(8, generator=g(), sampler="ddim", steps=10).float()
    b = m.sample(8, generator=g(), sampler="ddim", steps=10, precision="bf16").float()
    assert (a - b).abs().mean() < 6  # pixel values 0..255
    with pytest.raises(ConfigError, match="precision"):
        m.sample(1, precision="fp16")


def test_sampling_controls_reject_bad_values():
    m, c = _model(), _model(conditional=True)
    bad = [({"sampler": "plms"}, "known: ddim, ddpm, dpmpp_2m, euler, heun"), ({"steps": 0}, "steps=0"),
           ({"steps": 2.5}, "steps=2.5"), ({"schedule": "x"}, "known: karras, model"),
           ({"sampler": "ddim", "steps": 101}, "must be <= 100"), ({"eta": 0.5}, "eta applies to the ddim"),
           ({"sampler": "ddim", "eta": 3.0}, "eta=3.0"), ({"guidance": 2.0}, "class-conditional"),
           ({"temperature": 0.5}, "unknown sampling control")]
    for kw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            m.sample(1, **kw)
    with pytest.raises(ConfigError, match="guidance=100"):
        c.sample(1, guidance=100.0)
    with pytest.raises(ConfigError, match=r"labels in \[0, 2\]"):
        c.sample(2, labels=torch.tensor([0, 5]))
    with pytest.raises(ConfigError, match="not class-conditional"):
        m.sample(1, labels=torch.tensor([0]))


def test_inpaint_checks_shapes_and_keeps_pixels():
    m = _trained()
    img = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[:, :4] = True
    out = m.inpaint(img, keep, 2, generator=torch.Generator().manual_seed(0), steps=10)
    assert torch.equal(out[:, :, :, :4], img[None, :, :, :4].expand(2, -1, -1, -1))
    with pytest.raises(ConfigError, match="the mask is"):
        m.inpaint(img, keep[:4], 1)
    with pytest.raises(ConfigError, match="the image is"):
        m.inpaint(img[:, :4], keep, 1)
    with pytest.raises(ConfigError, match="resample"):
        m.inpaint(img, keep, 1, resample=0)


def test_inpaint_without_a_class_completes_unconditionally(monkeypatch):
    from genlab.models import diffusion as diffusion_mod

    m, seen = _trained(conditional=True), []
    real = diffusion_mod.samplers.inpaint
    monkeypatch.setattr(diffusion_mod.samplers, "inpaint", lambda *a, cond=None, **kw: seen.append(cond)
                        or real(*a, cond=cond, **kw))
    img, keep = torch.zeros(1, 8, 8, dtype=torch.uint8), torch.ones(8, 8, dtype=torch.bool)
    keep[4:] = False
    m.inpaint(img, keep, 3, steps=4)
    m.inpaint(img, keep, 3, steps=4, labels=torch.tensor([2, 0, 1]))
    assert seen[0].tolist() == [3, 3, 3]  # the "no class" label (= num_classes) of the label dropout
    assert seen[1].tolist() == [2, 0, 1]
    with pytest.raises(ConfigError, match="guidance needs a class"):
        m.inpaint(img, keep, 1, steps=4, guidance=2.0)
    with pytest.raises(ConfigError, match="without label dropout"):
        _model(conditional=True, p_uncond=0.0).inpaint(img, keep, 1, steps=4)


def test_config_checks():
    for bad, msg in [({"image_size": 6, "channel_mults": (1, 2, 2)}, "multiple of 4"),
                     ({"attn_levels": (3,)}, "attn_levels"), ({"noise_schedule": "sqrt"}, "known: cosine, linear"),
                     ({"prediction": "score"}, "known: eps, v, x0"), ({"p_uncond": 1.0}, "p_uncond"),
                     ({"timesteps": 1}, "timesteps"), ({"base_channels": 9}, "base_channels")]:
        with pytest.raises(ConfigError, match=msg):
            build_config({"family": "diffusion", "preset": "tiny", "image_size": 8, **bad})


def test_denoiser_is_the_only_parameter_owner():
    m = _model()
    assert isinstance(m.denoiser, Denoiser) and m.unet is m.denoiser.net
    assert all(k.startswith("denoiser.net.") for k in m.state_dict())


def test_the_bf16_copy_is_kept_between_calls_and_rebuilt_when_the_weights_change():
    m = _trained()
    net = m._sampling_unet("bf16", False)
    assert m._sampling_unet("bf16", False) is net and next(net.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        next(m.unet.parameters()).add_(1.0)  # as an optimizer step or a load does: in place
    fresh = m._sampling_unet("bf16", False)
    assert fresh is not net
    torch.testing.assert_close(next(fresh.parameters()).float(), next(m.unet.parameters()).bfloat16().float())


def test_the_upsampler_is_nearest_upsampling_then_its_3x3_convolution():
    """UpsampleConv runs DDPM's upsampler (2x nearest, conv 3x3) as the one stride-2 transposed convolution it
    equals: the same outputs and gradients as the two steps, to float64 rounding, on non-square inputs too."""
    torch.manual_seed(0)
    up = UpsampleConv(5).double()
    assert list(up.state_dict()) == ["1.weight", "1.bias"]  # the two-step form's parameters: checkpoints load
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    ref = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"),
                                     up[1].weight, up[1].bias, padding=1)
    out = up(x)
    assert out.shape == (2, 5, 14, 12)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad((out * ref.detach()).sum(), [x, up[1].weight, up[1].bias]),
                    torch.autograd.grad((ref * ref.detach()).sum(), [x, up[1].weight, up[1].bias])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_the_fused_unet_matches_its_eager_forward_for_any_batch_with_and_without_labels():
    """The bf16 sampling net on a CPU is the bf16 copy traced, frozen and fused by oneDNN Graph (unet.FusedUNet):
    it computes the eager bf16 forward, for new batch sizes (the profiling runs re-specialise it) and for both
    input forms a class-conditional U-Net takes (with y; the guided batch concatenates both branches)."""
    m = _trained(conditional=True)
    fused = m._sampling_unet("bf16", False)
    assert isinstance(fused, FusedUNet)
    eager = fused.net
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for b in (4, 4, 4, 7, 7, 7, 1):  # the first calls of each shape profile, the later ones run fused
            x, t = torch.randn(b, 1, 8, 8, generator=g), torch.rand(b, generator=g) * 999
            y = torch.randint(0, 4, (b,), generator=g)  # 3 = the "no class" label
            out, ref = fused(x, t, y), eager(x, t, y)
            assert out.shape == (b, 1, 8, 8) and out.dtype == torch.bfloat16
            torch.testing.assert_close(out.float(), ref.float(), atol=0.05, rtol=0.05)
            torch.testing.assert_close(out.float(), m.unet(x, t, y), atol=0.1, rtol=0.1)  # near the fp32 net
        with pytest.raises(ValueError, match="pass y"):  # the conditional net still refuses a missing label
            fused(x, t)
    with pytest.raises(RuntimeError, match="inference"):
        fused(x, t, y)  # gradients on: not this net's job


def test_the_fused_unet_falls_back_to_the_eager_net_when_tracing_fails(monkeypatch):
    m = _trained(conditional=True)
    fused = m._sampling_unet("bf16", False)

    def broken(*a, **k):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "trace", broken)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 500.0])
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no TorchScript here"):
        out = fused(x, t, torch.tensor([0, 3]))
    with torch.no_grad():
        torch.testing.assert_close(out, fused.net(x, t, torch.tensor([0, 3])))


@pytest.mark.slow
def test_compiled_sampling_gives_the_samples_of_the_plain_network():
    m = _trained(conditional=True)
    kw = {"steps": 3, "labels": torch.tensor([0, 1, 2])}
    plain = m.sample(3, generator=torch.Generator().manual_seed(0), **kw)
    fast = m.sample(3, generator=torch.Generator().manual_seed(0), compile=True, **kw)
    assert (plain.int() - fast.int()).abs().max() <= 2  # the same samples, up to float reassociation
    assert m._sampling_unet("fp32", True) is m._sampling_unet("fp32", True)  # compiled once, kept
