"""Image metrics (DESIGN.md 6): the Frechet distance against closed forms and torchmetrics, and the cached
domain classifier (trains, caches, survives a corrupt cache, is deterministic)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.data.datasets import DataConfig
from genlab.eval.features import DomainClassifier, domain_classifier
from genlab.eval.image import (
    _trace_sqrt_product_eig,
    class_accuracy,
    extract_features,
    feature_stats,
    fid_from_features,
    frechet_distance,
)


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(s1)), mu1, np.diag(s1)) == pytest.approx(
        0, abs=1e-10)
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1)  # 1-D: (2 - 1)^2


def test_frechet_distance_of_full_covariances_matches_independent_routes():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    s1, s2 = _random_cov(rng, 8), _random_cov(rng, 8)
    r1 = linalg.sqrtm(s1)  # Tr((S1 S2)^1/2) = Tr((R1 S2 R1)^1/2), R1 = S1^1/2: symmetric, so sqrtm is safe
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(r1 @ s2 @ r1)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert _trace_sqrt_product_eig(s1, s2) == pytest.approx(np.trace(linalg.sqrtm(s1 @ s2)).real, rel=1e-8)


def test_fid_is_zero_on_identical_sets_and_grows_with_a_shift():
    f = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert fid_from_features(f, f) == pytest.approx(0, abs=1e-6)
    mu, sigma = feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
    fids = [fid_from_features(f, f + s) for s in (0.5, 1.0, 2.0)]
    assert fids == pytest.approx([16 * 0.25, 16 * 1.0, 16 * 4.0], rel=1e-6)  # a shift moves only the mean


def test_singular_covariances_fall_back_gracefully():
    f = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))  # N < D: rank-4 covariances
    g = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    assert np.isfinite(fid_from_features(f, g)) and fid_from_features(f, f) == pytest.approx(0, abs=1e-4)


def test_fid_matches_torchmetrics():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):  # the "images" fed to the metric are already features
        num_features = 12

        def forward(self, x):
            return x

    gen = torch.Generator().manual_seed(0)
    real = torch.randn(300, 12, generator=gen, dtype=torch.float64)
    fake = torch.randn(200, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, 12, generator=gen,
                                                                                   dtype=torch.float64) * 0.3 + 0.2
    metric = fid_mod.FrechetInceptionDistance(feature=Identity())
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(10, 4\).*\(10, 5\)"):
        fid_from_features(torch.zeros(10, 4), torch.zeros(10, 5))
    with pytest.raises(ValueError, match=r"N >= 2.*\(1, 4\)"):
        fid_from_features(torch.zeros(1, 4), torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"sigma2 \(2, 2\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(torch.full((3, 2), float("nan")))
    net = DomainClassifier(channels=1, num_classes=3)
    with pytest.raises(ValueError, match=r"uint8 images \(N, 1, H, W\).*float32 \(2, 1, 8, 8\)"):
        net(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"H, W >= 8.*\(2, 1, 4, 4\)"):
        net(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"labels must be shaped \(2,\)"):
        class_accuracy(net, torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.zeros(3))


def _easy_images(path, n=150, classes=3):
    """8x8 images: class k lights one of three bands (top, bottom, left), over noise."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = rng.integers(0, 60, (n, 8, 8))
    for i, k in enumerate(y):
        band = [np.s_[:3, :], np.s_[5:, :], np.s_[:, :3]][k]
        x[i][band] += 190
    np.savez(path, x=x.astype(np.uint8), y=y)
    return DataConfig(source="images", path=str(path))


FAST = {"epochs": 4, "batch_size": 16}


def _weights(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_domain_classifier_trains_caches_and_is_deterministic(tmp_path, caplog):
    cfg = _easy_images(tmp_path / "easy.npz")
    rng_state = torch.random.get_rng_state()
    with caplog.at_level(logging.INFO, logger="genlab.eval.features"):
        net = domain_classifier(cfg, cache_dir=tmp_path / "a", **FAST)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the caller's global RNG is untouched
    assert net.heldout_accuracy >= 0.9 and not net.training
    assert any("held-out accuracy" in r.getMessage() for r in caplog.records)
    files = sorted((tmp_path / "a").iterdir())
    assert [f.suffix for f in files] == [".json", ".safetensors"] and files[0].stem.startswith("images-1x8x8-3c-")
    mtime = files[1].stat().st_mtime_ns

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="genlab.eval.features"):
        again = domain_classifier(cfg, cache_dir=tmp_path / "a", **FAST)
    assert not any("training" in r.getMessage() for r in caplog.records)  # loaded, not retrained
    assert files[1].stat().st_mtime_ns == mtime and again.heldout_accuracy == net.heldout_accuracy
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(extract_features(net, x), extract_features(again, x))
    assert extract_features(net, x, batch_size=2).shape == (5, 128)

    other = domain_classifier(cfg, cache_dir=tmp_path / "b", **FAST)  # a fresh run, same seed
    assert all(torch.equal(a, b) for a, b in zip(_weights(net).values(), _weights(other).values()))
    domain_classifier(cfg, cache_dir=tmp_path / "a", epochs=1, batch_size=16)  # another recipe: a new entry
    assert len(list((tmp_path / "a").glob("*.safetensors"))) == 2


@pytest.mark.parametrize("damaged", [".safetensors", ".json"])
def test_a_corrupt_cache_file_is_retrained(tmp_path, caplog, damaged):
    cfg = _easy_images(tmp_path / "easy.npz")
    net = domain_classifier(cfg, cache_dir=tmp_path / "c", **FAST)
    (f,) = (tmp_path / "c").glob(f"*{damaged}")
    f.write_bytes(b"\x80\x04 not a cache file")
    with caplog.at_level(logging.INFO, logger="genlab.eval.features"):
        again = domain_classifier(cfg, cache_dir=tmp_path / "c", **FAST)
    assert any("unusable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert all(torch.equal(a, b) for a, b in zip(_weights(net).values(), _weights(again).values()))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="genlab.eval.features"):
        domain_classifier(cfg, cache_dir=tmp_path / "c", **FAST)  # the rewritten cache loads
    assert any("loaded from" in r.getMessage() for r in caplog.records)


def test_unlabelled_images_and_bad_recipes_are_config_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((20, 8, 8), dtype=np.uint8))
    with pytest.raises(ConfigError, match="no class labels"):
        domain_classifier(DataConfig(source="images", path=str(tmp_path / "x.npy")), cache_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"epochs=0 must be in \[1, 1000\]"):
        domain_classifier("digits", cache_dir=tmp_path, epochs=0)


def test_class_accuracy_counts_argmax_hits():
    class Fixed(torch.nn.Module):  # predicts class = the first pixel's value
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 2, 2], dtype=torch.uint8)
    assert class_accuracy(Fixed(), x, torch.tensor([0, 1, 2, 0])) == 0.75
