"""Image watermark, PNG provenance and C2PA signing (genlab.safety.provenance): the watermark round trip at each
supported size, the exact null law of its detector against a reference, clean images and wrong keys not detected
at the stated false-positive rate, provenance surviving a reload, `genlab sample --watermark` end to end, and a
C2PA manifest that validates and then fails once the file is tampered with."""

from __future__ import annotations

import datetime
import hashlib
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genlab.core.errors import ConfigError, DataError
from genlab.safety import provenance as pv
from genlab.safety.provenance import (
    detect_image_watermark,
    embed_image_watermark,
    encode_png,
    read_c2pa,
    read_provenance,
    sign_c2pa,
)
from genlab.sampling.image import save_grid, save_png
from tests.conftest import run_cli, write_config

KEY = "test-key"


@pytest.fixture(scope="module")
def fashion():
    """200 real Fashion-MNIST test images (1, 28, 28)."""
    from genlab import api

    try:
        return api.load_dataset("fashion-mnist").val.x[:200].numpy()
    except DataError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def photos():
    """Real RGB photographs (scikit-learn's two sample images, 427x640) as uint8 (3, H, W)."""
    sk = pytest.importorskip("sklearn.datasets")
    return [np.ascontiguousarray(im.transpose(2, 0, 1)) for im in sk.load_sample_images().images]


def _patches(photos, size, n):
    rng = np.random.default_rng(size)
    out = []
    for i in range(n):
        im = photos[i % len(photos)]
        y, x = rng.integers(0, im.shape[1] - size), rng.integers(0, im.shape[2] - size)
        out.append(im[:, y : y + size, x : x + size].copy())
    return out


def _psnr(a, b):
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return 10 * np.log10(255**2 / max(mse, 1e-12))


def _jpeg(a, quality):
    buf = io.BytesIO()
    Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)).save(buf, "JPEG", quality=quality)
    b = np.asarray(Image.open(buf))
    return b[None] if b.ndim == 2 else b.transpose(2, 0, 1)


# ------------------------------------------------------------------ the detector's null law


def test_exact_null_matches_binomial_and_brute_force():
    from math import comb

    # pilot only: S = 2 Bin(n, 1/2) - n, so S >= s means Bin >= ceil((s + n) / 2)
    for n, s in [(50, 10), (97, 31), (193, 60)]:
        want = sum(comb(n, k) for k in range(-(-(s + n) // 2), n + 1)) / 2**n
        assert pv._exact_tail(n, [], s) == pytest.approx(want, rel=1e-9)
    # pilot + |group sums|: every sign pattern enumerated
    n_pilot, groups = 3, (2, 3)
    scores = []
    for signs in itertools.product((-1, 1), repeat=n_pilot + sum(groups)):
        g1, g2 = signs[n_pilot : n_pilot + 2], signs[n_pilot + 2 :]
        scores.append(sum(signs[:n_pilot]) + abs(sum(g1)) + abs(sum(g2)))
    scores = np.array(scores)
    for s in range(-3, 10):
        assert pv._exact_tail(n_pilot, groups, s) == pytest.approx(np.mean(scores >= s), abs=1e-12)


# ------------------------------------------------------------------ round trips at genlab's sizes


def test_round_trip_28px_gray(fashion):
    for a in fashion[:20]:
        payload = int(a.sum()) % 256
        w = embed_image_watermark(a, KEY, payload=payload)
        assert w.dtype == np.uint8 and w.shape == a.shape and _psnr(a, w) > 22
        r = detect_image_watermark(w, KEY, payload=payload)
        assert r.watermarked and r.method == "dct-ss" and r.z > 5 and r.p_value < 1e-6
        assert r.bit_accuracy >= 0.875 and r.bits is not None and len(r.bits) == pv.PAYLOAD_BITS
        assert detect_image_watermark(_jpeg(w, 75), KEY).watermarked  # survives JPEG 75
    assert json.loads(json.dumps(r.to_dict()))["method"] == "dct-ss"


@pytest.mark.parametrize("size", [32, 64])
def test_round_trip_rgb(photos, size):
    psnrs = []
    for a in _patches(photos, size, 10):
        w = embed_image_watermark(a, KEY, payload=0xA5)
        psnrs.append(_psnr(a, w))
        r = detect_image_watermark(w, KEY, payload=0xA5)
        assert r.watermarked and r.bit_accuracy >= 0.875, r
    assert np.median(psnrs) > 30


def test_types_come_back_and_tiles_and_resizes(fashion):
    t = torch.from_numpy(fashion[:4].copy())
    wt = embed_image_watermark(t, KEY)  # a batch (N, C, H, W) tensor
    assert isinstance(wt, torch.Tensor) and wt.dtype == torch.uint8 and wt.shape == t.shape
    pil = Image.fromarray(fashion[0][0])
    wp = embed_image_watermark(pil, KEY)
    assert isinstance(wp, Image.Image) and wp.mode == "L" and wp.size == (28, 28)
    assert detect_image_watermark(wp, KEY).watermarked
    # the frame, not the resolution, carries the mark: a nearest 2x copy (as in genlab's grids) is read as is
    big = wp.resize((56, 56), Image.NEAREST)
    assert detect_image_watermark(big, KEY).watermarked
    assert detect_image_watermark(np.asarray(wt[1]), KEY).watermarked


def test_library_at_256(photos):
    pytest.importorskip("imwatermark")
    a = photos[0]  # 427x640: the library's size range
    w = embed_image_watermark(a, KEY)
    r = detect_image_watermark(w, KEY)
    assert r.method == pv.LIBRARY_METHOD and r.watermarked and r.bit_accuracy > 0.9
    assert not detect_image_watermark(a, KEY).watermarked
    with pytest.raises(ConfigError, match="at least 256"):
        embed_image_watermark(_patches(photos, 64, 1)[0], KEY, method="invisible-watermark")


# ------------------------------------------------------------------ no false "watermarked"


def test_clean_images_and_wrong_keys_are_not_detected(fashion):
    zs = np.array([detect_image_watermark(a, key).z for key in ("k1", "k2") for a in fashion])
    # 400 tests at FPR 1e-3: P(3 or more false alarms) ~ 0.008, so more than 2 is evidence against the stated rate
    assert (zs > 3.09).sum() <= 2
    assert abs(zs.mean()) < 0.25 and 0.8 < zs.std() < 1.25  # the null is N(0, 1)-like
    marked = [embed_image_watermark(a, KEY) for a in fashion[:100]]
    wrong = [detect_image_watermark(w, "another key") for w in marked]
    assert sum(r.watermarked for r in wrong) <= 1
    assert all(r.reason.startswith("no watermark") for r in wrong if not r.watermarked)


def test_bad_inputs_give_clear_answers(tmp_path):
    flat = np.zeros((1, 28, 28), dtype=np.uint8)
    r = detect_image_watermark(flat, KEY)
    assert not r.watermarked and "flat" in r.reason
    tiny = np.full((1, 8, 8), 100, dtype=np.uint8)
    r = detect_image_watermark(tiny, KEY)
    assert not r.watermarked and r.z is None and "too small" in r.reason
    with pytest.raises(ConfigError, match="at least 16x16"):
        embed_image_watermark(tiny, KEY)
    with pytest.raises(ConfigError, match="non-empty"):
        detect_image_watermark(flat, "")
    with pytest.raises(ConfigError, match="payload"):
        embed_image_watermark(flat, KEY, payload=256)
    with pytest.raises(ConfigError, match="uint8"):
        embed_image_watermark(torch.zeros(1, 28, 28), KEY)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot be read"):
        detect_image_watermark(tmp_path / "broken.png", KEY)
    with pytest.raises(DataError, match="no such image"):
        read_provenance(tmp_path / "missing.png")


# ------------------------------------------------------------------ provenance in the files


def test_provenance_survives_a_reload(tmp_path, fashion):
    meta = {"model": "diffusion tiny", "run": "fm", "family": "diffusion", "seed": 3, "prompt": "un chat — 猫",
            "sampler": "dpmpp_2m", "steps": 20, "weights_sha256": "ab" * 32}
    data = encode_png(torch.from_numpy(fashion[0].copy()), meta, watermark_key=KEY)
    (tmp_path / "one.png").write_bytes(data)
    got = read_provenance(tmp_path / "one.png")
    assert {k: got[k] for k in meta} == meta and got["watermark"]["method"] == "dct-ss"
    assert detect_image_watermark(tmp_path / "one.png", KEY, payload=0xAB).bit_accuracy >= 0.875
    save_png(fashion[1][0], tmp_path / "two.jpg", metadata=meta)  # JPEG: a JSON comment
    assert read_provenance(tmp_path / "two.jpg")["prompt"] == meta["prompt"]
    save_png(fashion[1][0], tmp_path / "plain.png")
    assert read_provenance(tmp_path / "plain.png") == {}


def test_grid_is_watermarked_tile_by_tile(tmp_path, fashion):
    images = torch.from_numpy(fashion[:6].copy())
    path = save_grid(images, tmp_path / "grid.png", captions=[f"c{i}" for i in range(6)], metadata={"seed": 1},
                     watermark_key=KEY)
    meta = read_provenance(path)
    r = detect_image_watermark(path, KEY)
    assert r.watermarked and len(r.tiles) == 6 and all(t["watermarked"] for t in r.tiles)
    assert meta["grid"]["tile"] == [56, 56] and meta["watermark"]["method"] == "dct-ss"
    # one tile cut out of the grid, its metadata gone: still detected
    g = meta["grid"]
    with Image.open(path) as im:
        tile = im.crop((g["pad"], g["pad"], g["pad"] + 56, g["pad"] + 56))
    assert detect_image_watermark(tile, KEY).watermarked
    assert not detect_image_watermark(path, "wrong").watermarked


# ------------------------------------------------------------------ C2PA


def _test_pki(tmp_path: Path):
    """A test EC P-256 CA and a leaf it signed, made here (no network)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "genlab tests")])

    def usage(**kw):
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                               "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**{**flags, **kw})

    def cert(subject, key, issuer, issuer_key, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
             .add_extension(usage(digital_signature=True, key_cert_sign=ca, crl_sign=ca), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if not ca:
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                critical=False))
        return b.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("genlab test CA"), ca_key, name("genlab test CA"), ca_key, True)
    leaf = cert(name("genlab test signer"), key, ca.subject, ca_key, False)
    pem = serialization.Encoding.PEM
    (tmp_path / "key.pem").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    return tmp_path / "key.pem", tmp_path / "chain.pem", tmp_path / "ca.pem"


def test_c2pa_sign_validate_and_tamper(tmp_path, fashion):
    pytest.importorskip("c2pa")
    key, chain, ca = _test_pki(tmp_path)
    png = tmp_path / "signed.png"
    png.write_bytes(encode_png(fashion[0], {"seed": 5, "run": "fm"}))
    assert read_c2pa(png) is None  # no manifest yet
    sign_c2pa(png, key, chain, {"seed": 5, "run": "fm"})
    got = read_c2pa(png)
    assert got["validation_state"] == "Valid" and got["failures"] == ["signingCredential.untrusted"]
    labels = {a["label"]: a.get("data") for a in got["manifest"]["assertions"]}
    assert labels["org.genlab.provenance"] == {"seed": 5, "run": "fm"}
    assert read_c2pa(png, trust_anchors=ca)["validation_state"] == "Trusted"
    assert read_provenance(png)["seed"] == 5  # the text chunks survive signing
    data = bytearray(png.read_bytes())
    data[data.find(b"IDAT") + 20] ^= 0xFF  # one byte of the pixels changed
    (tmp_path / "tampered.png").write_bytes(bytes(data))
    bad = read_c2pa(tmp_path / "tampered.png", trust_anchors=ca)
    assert bad["validation_state"] == "Invalid" and "assertion.dataHash.mismatch" in bad["failures"]
    with pytest.raises(ConfigError, match="PEM"):
        sign_c2pa(png, chain, chain)


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def tiny_fashion_run(tmp_path_factory, fashion):
    from genlab import api

    d = tmp_path_factory.mktemp("prov")
    cfg = write_config(d / "v.toml", name="v", family="vae", data={"source": "fashion-mnist", "max_images": 64},
                       train={"max_steps": 2, "batch_size": 16, "eval_every": 2, "eval_batches": 1,
                              "checkpoint_every": 2})
    cfg.write_text(cfg.read_text().replace("seed = 7", "seed = 7\npreview = 4"))
    run_dir, _ = api.train(cfg)
    return run_dir


def _cli(capsys, *args) -> tuple[int, str, str]:
    """`genlab ARGS` in this process (a subprocess per call would cost seconds of imports each)."""
    from genlab.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_sample_watermark_provenance_and_c2pa(tiny_fashion_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("c2pa")
    key, chain, ca = _test_pki(tmp_path)
    out = tmp_path / "s.png"
    monkeypatch.setenv("GENLAB_WATERMARK_KEY", "cli-key")
    code, stdout, _ = _cli(capsys, "sample", tiny_fashion_run, "-n", 4, "--seed", 2, "--out", out, "--watermark",
                           "--c2pa-key", key, "--c2pa-cert", chain)
    assert code == 0 and "(watermarked)" in stdout
    code, stdout, _ = _cli(capsys, "provenance", out, "--trust", ca, "--json")
    got = json.loads(stdout)
    assert got["provenance"]["seed"] == 2 and got["provenance"]["family"] == "vae"
    weights = (tiny_fashion_run / "model.safetensors").read_bytes()
    assert got["provenance"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert got["c2pa"]["validation_state"] == "Trusted"
    assert got["watermark"]["watermarked"] and got["watermark"]["bit_accuracy"] == 1.0
    code, stdout, _ = _cli(capsys, "provenance", out, "--watermark-key", "not-it")
    assert code == 0 and "not watermarked" in stdout and "C2PA: Valid" in stdout
    monkeypatch.delenv("GENLAB_WATERMARK_KEY")
    code, _, err = _cli(capsys, "sample", tiny_fashion_run, "-n", 2, "--out", tmp_path / "x.png", "--watermark")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --watermark needs a key")
    code, _, err = _cli(capsys, "sample", tiny_fashion_run, "-n", 2, "--out", tmp_path / "y.png", "--c2pa-key", key)
    assert code == 2 and "go together" in err
    code, _, err = _cli(capsys, "provenance", tmp_path / "missing.png")
    assert code == 2 and "no such image file" in err


def test_cli_as_a_user_runs_it(tiny_fashion_run, tmp_path):
    """One real subprocess: the installed entry point writes provenance by default."""
    out = tmp_path / "plain.png"
    run_cli("sample", tiny_fashion_run, "-n", 2, "--out", out, check=True)
    meta = read_provenance(out)
    assert meta["run"] == "v" and isinstance(meta["seed"], int)  # a random seed is recorded, so it can be redone
    assert detect_image_watermark(out, "any key").watermarked is False  # no --watermark, no watermark
    preview = read_provenance(tiny_fashion_run / "samples" / "latest.png")  # training previews say what they are
    assert preview["content"] == "training preview" and preview["step"] == 2 and preview["run"] == "v"
