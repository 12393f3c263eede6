"""KID, precision/recall/density/coverage, Inception Score and bootstrap intervals (eval/image.py) against
closed forms, direct O(n^2) estimators, torchmetrics and the published PRDC example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genlab.eval import image
from genlab.eval.image import (
    bootstrap_ci,
    density_coverage,
    image_metrics,
    inception_score,
    kid,
    prdc,
    precision_recall,
)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimator written out pair by pair (Binkowski et al. 2018, eq. 4)."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_the_kid_kernel_matches_the_pairwise_estimator():
    x, y = _randn(30, 5, seed=1).numpy(), (_randn(40, 5, seed=2) * 1.5 + 0.3).numpy()
    assert image._poly_mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_mmd2_direct(x, y),
                                                                                      rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    f, g = _randn(400, 16, seed=0), _randn(400, 16, seed=1)
    gen = torch.Generator().manual_seed(0)
    same = kid(f, f, subsets=5, subset_size=200, generator=gen)
    indep = kid(f, g, subsets=20, subset_size=200, generator=gen)
    shifted = kid(f, g + 1.0, subsets=5, subset_size=200, generator=gen)
    assert shifted["mean"] > 0.3 and shifted["mean"] > 100 * abs(same["mean"])
    assert abs(indep["mean"]) < max(0.01, 3 * indep["std"]) and indep["std"] > 0
    assert set(indep) == {"mean", "std", "subsets", "subset_size"} and indep["subset_size"] == 200


def test_kid_shrinks_its_subsets_to_the_smaller_set():
    out = kid(_randn(50, 8, seed=0), _randn(80, 8, seed=1), generator=torch.Generator().manual_seed(0))
    assert out["subset_size"] == 50 and out["subsets"] == 100 and np.isfinite(out["mean"])
    both_whole = kid(_randn(50, 8, seed=0), _randn(50, 8, seed=1), subsets=7)
    assert both_whole["std"] == 0.0  # every subset is both whole sets
    with pytest.raises(ValueError, match="N >= 2"):
        kid(_randn(1, 8), _randn(50, 8))
    with pytest.raises(ValueError, match="subset_size=1"):
        kid(_randn(5, 8), _randn(5, 8), subset_size=1)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics():
    kid_mod = pytest.importorskip("torchmetrics.image.kid")

    class Identity(torch.nn.Module):  # the "images" fed to the metric are already features
        def forward(self, x):
            return x

    real, fake = _randn(120, 12, seed=0), _randn(120, 12, seed=1) * 0.8 + 0.2
    # subset_size = N: every subset is the whole set, so torchmetrics' global-RNG draws cannot matter
    metric = kid_mod.KernelInceptionDistance(feature=Identity(), subsets=3, subset_size=120)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    mean, std = metric.compute()
    ours = kid(real, fake, subsets=3, subset_size=120)
    assert ours["mean"] == pytest.approx(float(mean), rel=1e-6) and ours["std"] == pytest.approx(float(std))


def _prdc_direct(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The `prdc` package's formulas on full distance matrices."""

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_real = np.sort(dist(real, real), axis=1)[:, k]  # column 0 is the row itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)  # (N_real, N_fake)
    return {"precision": float((d < r_real[:, None]).any(0).mean()),
            "recall": float((d < r_fake[None, :]).any(1).mean()),
            "density": float((d < r_real[:, None]).sum(0).mean() / k),
            "coverage": float((d.min(1) < r_real).mean())}


@pytest.mark.parametrize("chunk_entries", [2**24, 37])  # one chunk; many ragged chunks
def test_prdc_matches_the_direct_formulas(monkeypatch, chunk_entries):
    monkeypatch.setattr(image, "CHUNK_ENTRIES", chunk_entries)
    real, fake = _randn(90, 6, seed=3).numpy(), (_randn(70, 6, seed=4) * 1.3 + 0.4).numpy()
    for k in (1, 3, 5):
        assert prdc(real, fake, k=k) == pytest.approx(_prdc_direct(real, fake, k), abs=1e-12)
    assert precision_recall(real, fake) == pytest.approx(
        {key: v for key, v in _prdc_direct(real, fake, 3).items() if key in ("precision", "recall")})
    assert density_coverage(real, fake) == pytest.approx(
        {key: v for key, v in _prdc_direct(real, fake, 5).items() if key in ("density", "coverage")})


def test_prdc_of_identical_sets_is_perfect_and_k_is_checked():
    f = _randn(200, 10, seed=0, dtype=torch.float32) * 100 + 1000  # far from the origin: the centring matters
    out = prdc(f, f.clone(), k=5)
    assert out["precision"] == out["recall"] == out["coverage"] == 1.0 and out["density"] >= 1.0
    far = prdc(f, f + 1e4, k=5)
    assert far == {"precision": 0.0, "density": 0.0, "coverage": 0.0, "recall": 0.0}
    with pytest.raises(ValueError, match=r"k=10 must be in \[1, 9\]"):
        prdc(f[:10], f, k=10)


@pytest.mark.slow
def test_prdc_reproduces_the_published_example():
    """The `prdc` README: two sets of 10k draws of a 1000-d standard normal, k = 5, give precision 0.4772,
    recall 0.4705, density 1.0555, coverage 0.9735 (one seed; ours is another)."""
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(10_000, 1000, generator=gen), torch.randn(10_000, 1000, generator=gen)
    expected = {"precision": 0.4772, "recall": 0.4705, "density": 1.0555, "coverage": 0.9735}
    assert prdc(real, fake, k=5) == pytest.approx(expected, abs=0.03)


def test_inception_score_of_uniform_and_confident_balanced_logits():
    assert inception_score(torch.zeros(100, 7)) == pytest.approx((1.0, 0.0))
    k = 6
    labels = torch.arange(10 * k * 3) % k  # each of the 10 consecutive splits holds every class 3 times
    mean, std = inception_score(50.0 * torch.nn.functional.one_hot(labels, k))
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0, abs=1e-9)
    one_class = inception_score(50.0 * torch.nn.functional.one_hot(torch.zeros(40, dtype=torch.long), k))
    assert one_class[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits=11"):
        inception_score(torch.zeros(10, 3), splits=11)


def test_bootstrap_ci_of_a_mean_is_reproducible_and_honest():
    x = _randn(2000, seed=5).numpy() + 3.0
    state = torch.random.get_rng_state()
    lo, hi = bootstrap_ci(np.mean, x, n_boot=200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.25)
    assert (lo, hi) == bootstrap_ci(np.mean, x, n_boot=200, generator=torch.Generator().manual_seed(0))
    # a fixed array stays put; `center` moves the spread onto the given estimate
    assert bootstrap_ci(lambda a, b: b.mean() - a.mean(), x, x, resample=[False, True], n_boot=50,
                        generator=torch.Generator().manual_seed(0)) == pytest.approx(
        np.array(bootstrap_ci(np.mean, x, n_boot=50, generator=torch.Generator().manual_seed(0))) - x.mean())
    lo_c, hi_c = bootstrap_ci(np.mean, x, n_boot=50, center=10.0, generator=torch.Generator().manual_seed(0))
    assert lo_c < 10.0 < hi_c and hi_c - lo_c < 0.2
    assert bootstrap_ci(len, ["a", "b", "c"], n_boot=3) == (3.0, 3.0)  # lists resample too
    with pytest.raises(ValueError, match="n_boot=0"):
        bootstrap_ci(np.mean, x, n_boot=0)
    with pytest.raises(ValueError, match="2 flags for 1 arrays"):
        bootstrap_ci(np.mean, x, resample=[True, False])


def test_image_metrics_reports_every_metric_with_counts_and_intervals():
    real, fake = _randn(300, 8, seed=0), _randn(250, 8, seed=1) + 0.3
    logits = _randn(250, 5, seed=2) * 3
    state = torch.random.get_rng_state()
    out = image_metrics(real, fake, logits_fake=logits, n_boot=10, kid_subsets=10,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert out["n_real"] == 300 and out["n_fake"] == 250 and out["kid_subset_size"] == 250 and out["k"] == 5
    assert out["fid"] == pytest.approx(image.fid_from_features(real, fake))
    assert {key: out[key] for key in ("precision", "recall", "density", "coverage")} == pytest.approx(
        prdc(real, fake, k=5))
    assert out["inception_score"] == pytest.approx(inception_score(logits)[0])
    for name in ("fid", "kid", "precision", "recall", "density", "coverage", "inception_score"):
        lo, hi = out[f"{name}_ci"]
        assert lo <= out[name] <= hi, name
    again = image_metrics(real, fake, logits_fake=logits, n_boot=10, kid_subsets=10,
                          generator=torch.Generator().manual_seed(0))
    assert again == out
    bare = image_metrics(real, fake, n_boot=0, kid_subsets=2)
    assert bare["fid_ci"] is None and bare["precision_ci"] is None and "inception_score" not in bare
