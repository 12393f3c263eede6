"""Image sources (DESIGN.md 5): built-ins, a user's folder or array, and every bad input named clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.core.errors import ConfigError, DataError
from genlab.data.datasets import FASHION_DIR, DataConfig, load_images
from genlab.sampling.image import make_grid, save_grid


def cfg(**kw):
    from genlab.core.config import from_dict

    return from_dict(DataConfig, kw)


def _folder(root, n=10, size=(8, 8), mode="L", classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / classes[i % len(classes)] if classes else root
        sub.mkdir(parents=True, exist_ok=True)
        shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(sub / f"im{i:03d}.png")
    return root


def test_builtin_digits_and_mnist_have_fixed_splits_and_labels():
    d = load_images(cfg(source="digits"))
    assert d.train.x.dtype == torch.uint8 and d.train.x.shape[1:] == (1, 8, 8)
    assert len(d.train) + len(d.val) == 1797 and d.num_classes == 10
    assert int(d.train.x.max()) == 255 and int(d.train.x.min()) == 0
    again = load_images(cfg(source="digits"))
    assert torch.equal(d.val.x, again.val.x)  # the split is fixed
    m = load_images(cfg(source="mnist"))
    assert m.train.x.shape[1:] == (1, 28, 28) and len(m.train) + len(m.val) == 5000
    assert set(m.train.y[:200].tolist()) == set(range(10))  # shuffled, so a prefix holds every class


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="Debian dataset-fashion-mnist is not installed")
def test_fashion_mnist_official_split():
    d = load_images(cfg(source="fashion-mnist"))
    assert (len(d.train), len(d.val)) == (60000, 10000) and d.num_classes == 10
    assert d.class_names[9] == "ankle boot"


def test_folder_with_class_subfolders(tmp_path):
    d = load_images(cfg(source="images", path=str(_folder(tmp_path / "pets", n=20))))
    assert d.class_names == ["cat", "dog"] and d.num_classes == 2
    assert len(d.train) + len(d.val) == 20 and d.train.x.shape[1:] == (1, 8, 8)
    assert sorted(torch.cat([d.train.y, d.val.y]).tolist()) == [0] * 10 + [1] * 10


def test_flat_folder_has_no_labels_and_rgb_is_kept(tmp_path):
    d = load_images(cfg(source="images", path=str(_folder(tmp_path / "f", mode="RGB", classes=()))))
    assert d.num_classes == 0 and d.channels == 3 and int(d.train.y.max()) == -1


def test_corrupt_files_are_all_named(tmp_path):
    root = _folder(tmp_path / "f", classes=())
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 of 12 files.*broken\.png.*zero\.jpg"):
        load_images(cfg(source="images", path=str(root)))


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_images(cfg(source="images", path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="does not exist"):
        load_images(cfg(source="images", path=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="needs data.path"):
        load_images(cfg(source="images"))


def test_grayscale_rgb_mix_is_an_error_unless_converted(tmp_path):
    root = _folder(tmp_path / "f", n=4, classes=())
    _folder(tmp_path / "f" / "more", n=3, mode="RGB", classes=())
    with pytest.raises(DataError, match="mixes grayscale"):
        load_images(cfg(source="images", path=str(root)))
    assert load_images(cfg(source="images", path=str(root), channels=3)).channels == 3
    assert load_images(cfg(source="images", path=str(root), channels=1)).channels == 1


def test_mixed_sizes_are_rejected_or_resized_as_configured(tmp_path):
    root = _folder(tmp_path / "f", n=6, classes=())
    _folder(tmp_path / "f" / "big", n=2, size=(12, 12), classes=())
    with pytest.raises(DataError, match="2 sizes"):
        load_images(cfg(source="images", path=str(root)))
    with pytest.raises(DataError, match="not 8x8.*resize=true"):
        load_images(cfg(source="images", path=str(root), image_size=8))
    d = load_images(cfg(source="images", path=str(root), image_size=8, resize=True))
    assert d.image_size == 8 and len(d.train) + len(d.val) == 8
    with pytest.raises(ConfigError, match="needs data.image_size"):
        cfg(source="images", path=str(root), resize=True)


def test_arrays_npz_and_npy(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(30) % 5)
    d = load_images(cfg(source="images", path=str(tmp_path / "a.npz")))
    assert d.channels == 3 and d.num_classes == 5
    assert torch.equal(torch.cat([d.train.x, d.val.x]).sum(0), torch.from_numpy(x.transpose(0, 3, 1, 2)).sum(0))
    np.save(tmp_path / "f.npy", x[..., 0].astype(np.float32) / 255)  # floats in [0, 1]
    assert load_images(cfg(source="images", path=str(tmp_path / "f.npy"))).channels == 1
    np.save(tmp_path / "bad.npy", np.full((4, 8, 8), 300.0))
    with pytest.raises(DataError, match="span"):
        load_images(cfg(source="images", path=str(tmp_path / "bad.npy")))
    np.save(tmp_path / "shape.npy", np.zeros((4, 8)))
    with pytest.raises(DataError, match="expected images shaped"):
        load_images(cfg(source="images", path=str(tmp_path / "shape.npy")))
    (tmp_path / "junk.npz").write_bytes(b"PK not a zip")
    with pytest.raises(DataError, match="not a readable NumPy"):
        load_images(cfg(source="images", path=str(tmp_path / "junk.npz")))
    obj = np.array([{"a": 1}], dtype=object)
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    with pytest.raises(DataError):  # never unpickled
        load_images(cfg(source="images", path=str(tmp_path / "obj.npy")))


def test_batches_and_held_out_are_fixed():
    d = load_images(cfg(source="digits"))
    g = torch.Generator().manual_seed(0)
    x, y = d.train_batch(16, g)
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (16,)
    b1, b2 = d.eval_batches(100, 2), d.eval_batches(100, 2)
    assert len(b1) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(b1, b2, strict=True))
    assert sum(len(b[0]) for b in d.eval_batches(64)) == len(d.val)


def test_grid_layout_and_png(tmp_path):
    imgs = torch.zeros(5, 1, 4, 4, dtype=torch.uint8)
    imgs[3] = 200
    g = make_grid(imgs, nrow=3, pad=1)
    assert g.shape == (1 + 2 * 5, 1 + 3 * 5)
    assert (g[6:10, 1:5] == 200).all() and (g[1:5, 1:5] == 0).all() and g[0, 0] == 255
    p = save_grid(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), tmp_path / "g.png")
    with Image.open(p) as im:
        assert im.mode == "RGB" and im.size[0] > 8
    with pytest.raises(ConfigError):
        make_grid(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
