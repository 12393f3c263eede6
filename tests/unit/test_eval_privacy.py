"""Memorization (nearest-neighbour distances, near-copies) and the loss-threshold membership attack
(eval/privacy.py): copies are caught, fresh samples are not, the AUC is exact (sklearn as reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genlab.eval import privacy
from genlab.eval.privacy import membership_inference_auc, memorization_report, nearest_neighbour_distances


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [None, 7])
def test_nearest_neighbour_distances_match_brute_force(batch, monkeypatch):
    monkeypatch.setattr(privacy, "CHUNK_ENTRIES", 500)  # several chunks even without `batch`
    samples, reference = _randn(30, 2, 4, 4, seed=0) * 50 + 100, _randn(60, 2, 4, 4, seed=1) * 50 + 100
    d = ((samples.flatten(1)[:, None].double() - reference.flatten(1)[None].double()) ** 2).sum(-1).sqrt()
    got = nearest_neighbour_distances(samples, reference, batch=batch)
    assert got.shape == (30,) and torch.allclose(got, d.min(1).values, rtol=1e-12)
    assert nearest_neighbour_distances(reference[:5].numpy(), reference).max() == 0  # numpy in; copies: 0
    with pytest.raises(ValueError, match="32 values per row, the reference 16"):
        nearest_neighbour_distances(samples, reference[:, 0])
    with pytest.raises(ValueError, match="batch=0"):
        nearest_neighbour_distances(samples, reference, batch=0)


def test_copies_of_training_points_are_flagged_and_fresh_samples_are_not():
    train, heldout = _randn(400, 20, seed=0), _randn(400, 20, seed=1)
    copies = train[:50] + 1e-3 * _randn(50, 20, seed=2)
    rep = memorization_report(copies, train, heldout)
    assert rep["near_copy_fraction"] == 1.0 and rep["near_copies"] == list(range(50))
    assert rep["closer_to_train"] == 1.0 and rep["d_train_median"] < 0.01 * rep["d_heldout_median"]
    fresh = memorization_report(_randn(200, 20, seed=3), train, heldout)
    assert fresh["near_copy_fraction"] == 0.0 and 0.35 < fresh["closer_to_train"] < 0.65
    assert fresh["d_train_median"] == pytest.approx(fresh["d_heldout_median"], rel=0.1)
    assert {k: fresh[k] for k in ("n_samples", "n_train", "n_heldout", "n_compared")} == {
        "n_samples": 200, "n_train": 400, "n_heldout": 400, "n_compared": 400}


def test_a_larger_training_set_is_subsampled_reproducibly_but_copies_are_still_found():
    train, heldout = _randn(900, 20, seed=0), _randn(300, 20, seed=1)
    copies = train[-40:] + 1e-3 * _randn(40, 20, seed=2)  # most of them outside the equal-sized subsample
    state = torch.random.get_rng_state()
    rep = memorization_report(copies, train, heldout)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rep["n_compared"] == 300 and rep["near_copy_fraction"] == 1.0  # near-copies use the whole set
    assert rep == memorization_report(copies, train, heldout)
    other = memorization_report(copies, train, heldout, generator=torch.Generator().manual_seed(5))
    assert other["near_copy_fraction"] == 1.0
    with pytest.raises(ValueError, match=r"near_copy_ratio=1\.5"):
        memorization_report(copies, train, heldout, near_copy_ratio=1.5)
    with pytest.raises(ValueError, match="NaN"):
        memorization_report(torch.full((2, 20), float("nan")), train, heldout)


def test_membership_auc_is_one_when_separable_and_half_when_not():
    assert membership_inference_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == {"auc": 1.0, "n_train": 3, "n_heldout": 2}
    assert membership_inference_auc(torch.tensor([5.0, 6.0]), np.array([1.0, 2.0]))["auc"] == 0.0
    assert membership_inference_auc([1.0, 1.0], [1.0])["auc"] == 0.5  # all tied
    same = membership_inference_auc(_randn(3000, seed=0), _randn(2000, seed=1))
    assert same["auc"] == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="train_scores"):
        membership_inference_auc([], [1.0])


def test_membership_auc_equals_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    tr, ho = rng.integers(0, 6, 300).astype(float), rng.integers(1, 7, 250).astype(float)  # many ties
    expected = metrics.roc_auc_score(np.r_[np.ones(300), np.zeros(250)], -np.r_[tr, ho])  # lower loss: member
    assert membership_inference_auc(tr, ho)["auc"] == pytest.approx(expected, abs=1e-12)
