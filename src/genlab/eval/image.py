"""Image metrics over feature vectors: the Frechet distance (FID when the features are Inception's) and the
class accuracy of samples under a classifier. Any feature network works: Inception-v3 for the standard FID,
`eval.features.domain_classifier` for fast routine checks on one dataset."""

from __future__ import annotations

import logging

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
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    a = (v * np.sqrt(w.clip(min=0))) @ v.T
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
