"""Memorization and membership inference, for every family with samples or a per-example loss.

- `memorization_report`: does a model hand back its training data? Each sample's nearest-neighbour distance to
  the training set against the same to held-out data (equal-sized sets, so neither is closer by being bigger),
  and the fraction of near-copies of training points.
- `membership_inference_auc`: the loss-threshold attack (Yeom et al. 2018, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting"): a lower loss says "member"; its ROC-AUC over training vs held-out
  examples is 0.5 for a model that does not tell them apart and 1 for one that always does.

Distances are L2 over flattened rows (pixels or features): neighbours found with float32 torch.cdist in row
chunks (after centring on the reference mean), their distances then recomputed in float64. For text,
`eval.text.longest_overlap` is the memorization check.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .image import CHUNK_ENTRIES

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray


def _rows(x: ArrayLike, name: str, *, min_rows: int = 1) -> Tensor:
    t = torch.as_tensor(x).detach().cpu()
    if t.ndim < 2 or len(t) < min_rows:
        raise ValueError(f"{name} must be shaped (N, ...) with N >= {min_rows} rows; got {tuple(t.shape)}")
    t = t.flatten(1).double()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} of shape {tuple(t.shape)} holds NaN or infinite values")
    return t


def _knn(samples: Tensor, reference: Tensor, k: int, batch: int | None) -> tuple[Tensor, Tensor]:
    """The k smallest L2 distances (N, k), ascending, from each sample row to the reference rows, and their
    reference indices (N, k). The neighbours are found in float32; their distances are recomputed exactly in
    float64 (the matmul route of cdist leaves ~sqrt(eps) * norm of rounding: a copy would not read 0)."""
    if samples.shape[1] != reference.shape[1]:
        raise ValueError(f"samples have {samples.shape[1]} values per row, the reference "
                         f"{reference.shape[1]}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    step = batch or max(1, CHUNK_ENTRIES // len(reference))
    centre = reference.mean(0)
    ref, s = (reference - centre).float(), (samples - centre).float()
    idx = torch.cat([torch.cdist(s[i : i + step], ref).topk(k, dim=1, largest=False).indices
                     for i in range(0, len(s), step)])  # (N, k)
    step = max(1, CHUNK_ENTRIES // (8 * k * s.shape[1]))  # (step, k, D) float64 differences at a time
    exact = torch.cat([(samples[i : i + step, None] - reference[idx[i : i + step]]).norm(dim=-1)
                       for i in range(0, len(s), step)])  # (N, k)
    exact, order = exact.sort(dim=1)
    return exact, idx.gather(1, order)


def nearest_neighbour_distances(samples: ArrayLike, reference: ArrayLike, *,
                                batch: int | None = None) -> Tensor:
    """(N,) float64 L2 distance of each sample row (N, ...) to its nearest reference row (M, ...), both
    flattened; `batch` sample rows at a time (default: about 2^24 distances per chunk)."""
    return _knn(_rows(samples, "samples"), _rows(reference, "reference"), 1, batch)[0][:, 0]


def memorization_report(samples: ArrayLike, train: ArrayLike, heldout: ArrayLike, *,
                        near_copy_ratio: float = 1 / 3,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
    """Nearest-neighbour memorization statistics of generated samples.

    d_train and d_heldout are each sample's distance to the nearest training and held-out row. The larger of
    the two sets is first subsampled without replacement to the size of the smaller (with `generator`, by
    default a fixed seed 0, so the report is reproducible), since a bigger set is closer by size alone. A
    model that generalizes gives `closer_to_train` ~ 0.5; one that copies, ~ 1.

    A sample is a near-copy when its nearest training row is much nearer than the second nearest:
    d1 / d2 < `near_copy_ratio` over the whole training set (the 1/3 rule of Yoon et al. 2023, "Diffusion
    Probabilistic Models Generalize when They Fail to Memorize", used by Gu et al. 2023, "On Memorization in
    Diffusion Models"; like Carlini et al. 2023, a distance relative to the sample's own neighbourhood).
    `near_copies` lists the flagged sample indices."""
    s, tr, ho = _rows(samples, "samples"), _rows(train, "train", min_rows=2), _rows(heldout, "heldout")
    if not 0 < near_copy_ratio < 1:
        raise ValueError(f"near_copy_ratio={near_copy_ratio} must be in (0, 1)")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n = min(len(tr), len(ho))
    tr_eq = tr[torch.randperm(len(tr), generator=gen)[:n]] if len(tr) > n else tr
    ho_eq = ho[torch.randperm(len(ho), generator=gen)[:n]] if len(ho) > n else ho
    if len(tr) != len(ho):
        log.info("memorization: comparing with %d of %d training and %d of %d held-out rows", n, len(tr), n,
                 len(ho))
    d_train = _knn(s, tr_eq, 1, None)[0][:, 0]
    d_heldout = _knn(s, ho_eq, 1, None)[0][:, 0]
    two = _knn(s, tr, 2, None)[0]  # (N, 2): nearest and second-nearest training rows
    near = two[:, 0] < near_copy_ratio * two[:, 1]
    return {"n_samples": len(s), "n_train": len(tr), "n_heldout": len(ho), "n_compared": n,
            "d_train_median": float(d_train.median()), "d_heldout_median": float(d_heldout.median()),
            "closer_to_train": float((d_train < d_heldout).double().mean()),
            "near_copy_ratio": near_copy_ratio, "near_copy_fraction": float(near.double().mean()),
            "near_copies": near.nonzero().flatten().tolist()}


def _scores(x: ArrayLike | Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0 or not np.isfinite(a).all():
        raise ValueError(f"{name} must be a non-empty 1-D array of finite losses; got shape {a.shape}")
    return a


def membership_inference_auc(train_scores: ArrayLike | Sequence[float],
                             heldout_scores: ArrayLike | Sequence[float]) -> dict[str, float | int]:
    """ROC-AUC of the loss-threshold attack (Yeom et al. 2018) from per-example losses (nats, e.g. -log p(x),
    the negative ELBO, a denoising loss): the probability that a training example has a lower loss than a
    held-out one, ties counting half. Exact, from average ranks (the Mann-Whitney U statistic)."""
    tr, ho = _scores(train_scores, "train_scores"), _scores(heldout_scores, "heldout_scores")
    _, inverse, counts = np.unique(np.concatenate([tr, ho]), return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based average ranks, ascending loss
    u_heldout = rank[len(tr):].sum() - len(ho) * (len(ho) + 1) / 2  # pairs where the held-out loss is higher
    return {"auc": float(u_heldout / (len(tr) * len(ho))), "n_train": len(tr), "n_heldout": len(ho)}
