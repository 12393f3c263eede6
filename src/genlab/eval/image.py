"""Image metrics over feature vectors: the Frechet distance (FID when the features are Inception's), KID,
precision/recall, density/coverage, the Inception Score, bootstrap intervals (`image_metrics` gives them all)
and the class accuracy of samples under a classifier. Any feature network works: Inception-v3 for the standard
FID, `eval.features.domain_classifier` for fast routine checks on one dataset."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray


def _f64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"array of shape {a.shape} holds NaN or infinite values")
    return a


def _check_features(f: np.ndarray, name: str) -> None:
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be shaped (N, D) with N >= 2 samples; got {f.shape}")


def feature_stats(feats: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = _f64(feats)
    _check_features(f, "features")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def _trace_sqrt_product_eig(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A S2 A)) with A = S1^(1/2): a symmetric PSD eigenproblem,
    always real (negative rounding noise clipped to 0)."""
    return _trace_sqrt_given_root(_psd_sqrt(s1), s2)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


def _trace_sqrt_given_root(a: np.ndarray, s2: np.ndarray) -> float:
    m = a @ s2 @ a
    return float(np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum())


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """Tr((S1 S2)^(1/2)) as pytorch-fid computes it: scipy's sqrtm; a singular product (non-finite root) is
    retried with eps*I added to both covariances; a negligible imaginary part is dropped. Without scipy, or
    when the imaginary part is not negligible, the eigen route above."""
    try:
        from scipy import linalg
    except ImportError:
        return _trace_sqrt_product_eig(s1, s2)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        log.warning("the product of the covariances is singular; adding %g to their diagonals", eps)
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("sqrtm left an imaginary part of %.3g; using the eigen route",
                        float(np.abs(covmean.imag).max()))
            return _trace_sqrt_product_eig(s1, s2)
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, *,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the squared Frechet distance of two Gaussians
    (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium").
    Computed in float64."""
    mu1, mu2 = np.atleast_1d(_f64(mu1)), np.atleast_1d(_f64(mu2))
    sigma1, sigma2 = np.atleast_2d(_f64(sigma1)), np.atleast_2d(_f64(sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"expected mu (D,) and sigma (D, D) with one D; got mu1 {mu1.shape}, sigma1 "
                         f"{sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2, eps))


def fid_from_features(f_real: ArrayLike, f_fake: ArrayLike) -> float:
    """The Frechet distance between Gaussians fitted to two feature sets (N1, D) and (N2, D)
    (Heusel et al. 2017); FID proper when the features are Inception-v3 pool3."""
    a, b = _f64(f_real), _f64(f_fake)
    _check_features(a, "f_real")
    _check_features(b, "f_fake")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: f_real {a.shape}, f_fake {b.shape}")
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty tensor (N, C, H, W); got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")


def _device(net: nn.Module) -> torch.device:
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _batched(net: nn.Module, fn, images: Tensor, batch_size: int) -> Tensor:
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    was_training, device = net.training, _device(net)
    net.eval()
    try:
        return torch.cat([fn(images[i : i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])
    finally:
        net.train(was_training)


@torch.no_grad()
def extract_features(net: nn.Module, images_uint8: Tensor, batch_size: int = 500) -> Tensor:
    """Features (N, D) of images through `net.features` if the module has it, else its forward output,
    in eval mode and batches, on the module's device; returned float32 on the CPU."""
    fn = getattr(net, "features", None)
    fn = fn if callable(fn) else net
    return _batched(net, lambda x: fn(x).flatten(1), images_uint8, batch_size)


@torch.no_grad()
def class_accuracy(classifier: nn.Module, images_uint8: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """The fraction of images whose argmax logit is their label: do class-conditional samples show the
    requested class?"""
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images_uint8),):
        raise ValueError(f"labels must be shaped ({len(images_uint8)},) for images "
                         f"{tuple(images_uint8.shape)}; got {tuple(labels.shape)}")
    pred = _batched(classifier, classifier, images_uint8, batch_size).argmax(1)
    return float((pred == labels.cpu().long()).double().mean())


# ---- KID, precision/recall, density/coverage, Inception Score and bootstrap intervals over features ----

CHUNK_ENTRIES = 2**24  # distance-matrix entries computed at once (64 MB in float32): bounded memory


def _feature_pair(f_real: ArrayLike, f_fake: ArrayLike) -> tuple[Tensor, Tensor]:
    a, b = _f64(f_real), _f64(f_fake)
    _check_features(a, "f_real")
    _check_features(b, "f_fake")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: f_real {a.shape}, f_fake {b.shape}")
    return torch.from_numpy(a), torch.from_numpy(b)


def _poly_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018, "Demystifying MMD
    GANs"): the within-set sums leave out the diagonal. Dot products in float32 (2.5x faster; their rounding
    is ~1e-7 relative and averages out), powers and sums in float64."""
    d, m, n = x.shape[1], len(x), len(y)

    def kernel_sum(u: Tensor, v: Tensor) -> Tensor:
        return (u.float() @ v.float().T).double().div_(d).add_(1).pow_(3).sum()

    def diagonal_sum(u: Tensor) -> Tensor:
        return ((u * u).sum(1) / d + 1).pow(3).sum()

    return float((kernel_sum(x, x) - diagonal_sum(x)) / (m * (m - 1))
                 + (kernel_sum(y, y) - diagonal_sum(y)) / (n * (n - 1)) - 2 * kernel_sum(x, y) / (m * n))


def kid(f_real: ArrayLike, f_fake: ArrayLike, *, subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> dict[str, float | int]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 of a cubic polynomial kernel,
    averaged over `subsets` random subsets of `subset_size` rows of each set (drawn without replacement).
    With fewer rows than `subset_size` the subsets shrink to min(N_real, N_fake). Returns the mean,
    the std over subsets, and the counts used."""
    a, b = _feature_pair(f_real, f_fake)
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid needs subsets >= 1 and subset_size >= 2; got subsets={subsets}, "
                         f"subset_size={subset_size}")
    m = min(subset_size, len(a), len(b))
    if m < subset_size:
        log.info("KID: %d real and %d fake rows, fewer than subset_size=%d; using subsets of %d",
                 len(a), len(b), subset_size, m)
    if m == len(a) == len(b):  # every subset is the whole of both sets: one value
        vals = np.full(subsets, _poly_mmd2(a, b))
    else:
        vals = np.array([_poly_mmd2(a[torch.randperm(len(a), generator=generator)[:m]],
                                    b[torch.randperm(len(b), generator=generator)[:m]])
                         for _ in range(subsets)])
    return {"mean": float(vals.mean()), "std": float(vals.std()), "subsets": subsets, "subset_size": m}


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, CHUNK_ENTRIES // n_cols)


def _kth_neighbour_radius(x: Tensor, k: int) -> Tensor:
    """(N,) distance of each row of x (N, D) to its k-th nearest other row."""
    out, step = torch.empty(len(x), dtype=x.dtype), _rows_per_chunk(len(x))
    for s in range(0, len(x), step):
        d = torch.cdist(x[s : s + step], x)  # (c, N)
        rows = torch.arange(len(d))
        d[rows, s + rows] = float("inf")  # a row is not its own neighbour
        out[s : s + step] = d.topk(k, dim=1, largest=False).values[:, -1]
    return out


def _prdc_per_sample(f_real: ArrayLike, f_fake: ArrayLike, k: int, *,
                     recall: bool = True) -> dict[str, Tensor]:
    """Per-sample indicators whose means are the k-NN manifold metrics: precision and density over the fake
    rows, recall and coverage over the real rows (float64 vectors; recall omitted when not asked for).
    Distances are float32 torch.cdist in row chunks, after centring both sets on the real mean (which leaves
    distances unchanged and keeps the matmul route's rounding small)."""
    a, b = _feature_pair(f_real, f_fake)
    if not 1 <= k < min(len(a), len(b)):
        raise ValueError(f"k={k} must be in [1, {min(len(a), len(b)) - 1}] (fewer than the rows of each set: "
                         f"{len(a)} real, {len(b)} fake)")
    centre = a.mean(0)
    real, fake = (a - centre).float(), (b - centre).float()
    r_real = _kth_neighbour_radius(real, k)
    r_fake = _kth_neighbour_radius(fake, k) if recall else None
    balls = torch.empty(len(fake))  # how many real k-NN balls hold each fake row
    recalled = torch.zeros(len(real), dtype=torch.bool)  # real rows inside some fake k-NN ball
    nearest = torch.full((len(real),), float("inf"))  # distance of each real row to its nearest fake row
    step = _rows_per_chunk(len(real))
    for s in range(0, len(fake), step):
        d = torch.cdist(fake[s : s + step], real)  # (c, N_real)
        balls[s : s + step] = (d < r_real).sum(1)
        if r_fake is not None:
            recalled |= (d < r_fake[s : s + step, None]).any(0)
        nearest = torch.minimum(nearest, d.min(0).values)
    out = {"precision": (balls > 0).double(), "density": balls.double() / k,
           "coverage": (nearest < r_real).double()}
    if recall:
        out["recall"] = recalled.double()
    return out


def prdc(f_real: ArrayLike, f_fake: ArrayLike, *, k: int = 5) -> dict[str, float]:
    """Precision and recall of k-NN manifolds (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric
    for Assessing Generative Models") and density and coverage (Naeem et al. 2020, "Reliable Fidelity and
    Diversity Metrics for Generative Models"), all with one k, in one pass over the distances:
    precision = share of fake rows inside some real k-NN ball, recall = share of real rows inside some fake
    k-NN ball, density = mean number of real balls holding a fake row / k, coverage = share of real balls
    holding a fake row. A ball's radius is the distance to the k-th nearest other row of its own set."""
    return {name: float(v.mean()) for name, v in _prdc_per_sample(f_real, f_fake, k).items()}


def precision_recall(f_real: ArrayLike, f_fake: ArrayLike, *, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), k = 3 as in the paper; see `prdc`."""
    per = _prdc_per_sample(f_real, f_fake, k)
    return {"precision": float(per["precision"].mean()), "recall": float(per["recall"].mean())}


def density_coverage(f_real: ArrayLike, f_fake: ArrayLike, *, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020), k = 5 as in the paper; see `prdc`."""
    per = _prdc_per_sample(f_real, f_fake, k, recall=False)
    return {"density": float(per["density"].mean()), "coverage": float(per["coverage"].mean())}


def inception_score(logits: ArrayLike, *, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from classifier logits (N, K) (Salimans et al. 2016, "Improved Techniques
    for Training GANs"), computed on `splits` consecutive parts; returns the mean and std over parts."""
    lg = _f64(logits)
    if lg.ndim != 2 or lg.shape[1] < 2 or not 1 <= splits <= len(lg):
        raise ValueError(f"inception_score needs logits (N, K) with K >= 2 and splits in [1, N]; got "
                         f"{lg.shape}, splits={splits}")
    scores = []
    for logp in torch.from_numpy(lg).log_softmax(1).tensor_split(splits):
        log_py = logp.logsumexp(0) - math.log(len(logp))  # log of the marginal p(y) over the part
        scores.append(math.exp(float((logp.exp() * (logp - log_py)).sum(1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


Rows = Tensor | np.ndarray | Sequence[Any]


def _take(rows: Rows, idx: Tensor) -> Rows:
    if isinstance(rows, Tensor):
        return rows[idx]
    if isinstance(rows, np.ndarray):
        return rows[idx.numpy()]
    return [rows[i] for i in idx.tolist()]


def bootstrap_ci(fn: Callable[..., float], *arrays: Rows, n_boot: int = 20, level: float = 0.95,
                 resample: Sequence[bool] | None = None, center: float | None = None,
                 generator: torch.Generator | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron 1979, "Bootstrap Methods: Another Look at the Jackknife"): the
    rows of each array marked in `resample` (default: all) are drawn with replacement, independently per
    array, and `fn(*arrays)` is recomputed `n_boot` times; returns the (1 - level)/2 and (1 + level)/2
    quantiles. With few repeats the interval is rough (20 repeats at 95% is close to their min and max).

    With `center` (the estimate on the original rows) the quantiles of the repeats' deviations from their own
    mean are placed around `center` instead. Use it where rows drawn twice shift the statistic itself: a
    duplicate is a perfect kernel match for KID and shrinks the covariance's effective sample for FID, so
    their plain percentile intervals sit above the estimate and may not hold it."""
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array to resample")
    resample = [True] * len(arrays) if resample is None else list(resample)
    if len(resample) != len(arrays):
        raise ValueError(f"resample has {len(resample)} flags for {len(arrays)} arrays")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci needs n_boot >= 1 and level in (0, 1); got n_boot={n_boot}, "
                         f"level={level}")
    vals = []
    for _ in range(n_boot):
        drawn = [_take(a, torch.randint(len(a), (len(a),), generator=generator)) if r else a
                 for a, r in zip(arrays, resample, strict=True)]
        vals.append(float(fn(*drawn)))
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    shift = 0.0 if center is None else center - float(np.mean(vals))
    return float(lo + shift), float(hi + shift)


def image_metrics(f_real: ArrayLike, f_fake: ArrayLike, *, logits_fake: ArrayLike | None = None, k: int = 5,
                  n_boot: int = 20, n_boot_fid: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
                  is_splits: int = 10, level: float = 0.95,
                  generator: torch.Generator | None = None) -> dict[str, Any]:
    """FID, KID, precision/recall/density/coverage (one k) and, with classifier logits of the fake images, the
    Inception Score; each with a `level` bootstrap interval under `<name>_ci` (None when n_boot = 0).

    The intervals hold the real set fixed as the reference. FID, KID and IS resample the fake rows and
    recompute (FID `n_boot_fid` times, by the eigen route with the real covariance's root computed once; KID
    with a tenth of the subsets), their spread centred on the estimate (`bootstrap_ci(center=...)`). The k-NN
    metrics are means of per-sample indicators, so those are resampled (precision and density over fake rows,
    recall and coverage over real rows) with the k-NN balls held fixed: exact and cheap, and free of the bias
    that duplicated rows would put into the balls' radii."""
    a, b = _feature_pair(f_real, f_fake)
    out: dict[str, Any] = {"n_real": len(a), "n_fake": len(b), "k": k, "n_boot": n_boot, "level": level}

    def ci(fn: Callable[..., float], *arrays: Rows, repeats: int = n_boot,
           center: float | None = None) -> tuple[float, float] | None:
        if not repeats:
            return None
        return bootstrap_ci(fn, *arrays, n_boot=repeats, level=level, center=center, generator=generator)

    mu, sigma = feature_stats(a)
    out["fid"] = frechet_distance(mu, sigma, *feature_stats(b))
    root = _psd_sqrt(sigma) if min(n_boot, n_boot_fid) else None

    def fid_to_real(f: Tensor) -> float:
        mu2, sigma2 = feature_stats(f)
        return float((mu - mu2) @ (mu - mu2) + np.trace(sigma) + np.trace(sigma2)
                     - 2 * _trace_sqrt_given_root(root, sigma2))

    out["fid_ci"] = ci(fid_to_real, b, repeats=min(n_boot, n_boot_fid), center=out["fid"])
    k_out = kid(a, b, subsets=kid_subsets, subset_size=kid_subset_size, generator=generator)
    out.update(kid=k_out["mean"], kid_std=k_out["std"], kid_subset_size=k_out["subset_size"])
    boot_subsets = max(1, kid_subsets // 10)
    out["kid_ci"] = ci(lambda f: kid(a, f, subsets=boot_subsets, subset_size=kid_subset_size,
                                     generator=generator)["mean"], b, center=out["kid"])
    for name, per_sample in _prdc_per_sample(a, b, k).items():
        out[name] = float(per_sample.mean())
        out[f"{name}_ci"] = ci(lambda v: float(v.mean()), per_sample)
    if logits_fake is not None:
        lg = torch.from_numpy(_f64(logits_fake))
        if len(lg) != len(b):
            log.warning("logits_fake has %d rows for %d fake feature rows", len(lg), len(b))
        out["inception_score"], out["inception_score_std"] = inception_score(lg, splits=is_splits)
        out["inception_score_ci"] = ci(lambda x: inception_score(x, splits=is_splits)[0], lg,
                                       center=out["inception_score"])
    return out
