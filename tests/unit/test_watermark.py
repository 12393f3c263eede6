"""The green-list text watermark (Kirchenbauer et al. 2023): processor, detector, API, CLI, and transformers parity."""

import math
import random

import pytest
import torch

from genlab import api
from genlab.cli import main as cli_main
from genlab.core.errors import ConfigError, DataError
from genlab.models import build_config, build_model
from genlab.sampling.text import SamplingConfig, generate_ids
from genlab.sampling.watermark import (
    WatermarkConfig,
    apply_watermark,
    binomial_sf,
    detect,
    score_ids,
    z_score,
)

KEY = "15485863"  # transformers' default hashing_key


def green_list(seed: int, vocab: int, gamma: float) -> set[int]:
    """The green list written out from its definition: randperm(V) of a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed % (2**64 - 1))
    return set(torch.randperm(vocab, generator=g)[: int(vocab * gamma)].tolist())


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return build_model(build_config({"family": "gpt", "preset": "tiny", "vocab_size": 200, "block_size": 64})).eval()


def _generate(model, cfg: WatermarkConfig | None, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [[random.Random(seed + i).randrange(200)] for i in range(n)]
    return generate_ids(model, prompts, generator=g, max_new_tokens=length, watermark=cfg)


# ---- the statistic ----

def test_z_score_and_p_value_on_a_hand_computed_example():
    # 30 scored tokens, 15 green, gamma 1/4: z = (15 - 7.5) / sqrt(30 * 0.25 * 0.75) = 7.5 / 2.3717 = 3.1623
    assert z_score(15, 30, 0.25) == pytest.approx(3.16228, abs=1e-5)
    # P(X >= 2 | n=3, p=1/4) = 3 * (1/4)^2 * (3/4) + (1/4)^3 = 10/64
    assert binomial_sf(2, 3, 0.25) == pytest.approx(10 / 64, rel=1e-12)
    assert binomial_sf(0, 3, 0.25) == 1.0 and binomial_sf(4, 3, 0.25) == 0.0


def test_binomial_tail_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, p in [(15, 30, 0.25), (80, 200, 0.25), (7, 200, 0.1), (190, 200, 0.5)]:
        assert binomial_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9)


def test_detector_counts_green_tokens_built_by_hand():
    """A sequence built token by token from the written-out green lists (left hash: seed = key * previous token),
    15 green and 15 red, no repeated bigram: the detector must find exactly that count and z = 3.1623."""
    V, key = 64, int(KEY)
    cfg = WatermarkConfig(key=KEY, gamma=0.25)
    rng = random.Random(1)
    ids, seen = [5], set()
    for i in range(30):
        greens = green_list(key * ids[-1], V, 0.25)
        pool = sorted(greens) if i % 2 == 0 else sorted(set(range(V)) - greens)
        t = rng.choice([t for t in pool if (ids[-1], t) not in seen])
        seen.add((ids[-1], t))
        ids.append(t)
    res = detect(ids, cfg, V)
    assert (res.num_scored, res.num_green, res.num_tokens) == (30, 15, 31)
    assert res.z_score == pytest.approx(3.16228, abs=1e-5)
    assert res.p_value == pytest.approx(binomial_sf(15, 30, 16 / 64))
    assert res.verdict == ("watermarked" if res.p_value <= 1e-3 else "not watermarked")


def test_repeated_ngrams_are_scored_once():
    cfg = WatermarkConfig(key="k")
    ids = [3, 9] * 50  # two distinct bigrams, each repeated ~50 times
    assert score_ids(ids, cfg, 100)[0] == 2
    assert score_ids(ids, cfg, 100, ignore_repeated=False)[0] == 99
    res = detect(ids, cfg, 100)
    assert res.verdict == "too short to judge" and not res.watermarked


# ---- the processor ----

def test_processor_adds_delta_to_exactly_the_green_list():
    cfg = WatermarkConfig(key=KEY, gamma=0.25, delta=3.0)
    V = 100
    logits = torch.randn(2, V)
    history = torch.tensor([[1, 7], [4, 42]])
    out = apply_watermark(logits, history, cfg)
    for b, prev in enumerate((7, 42)):
        green = green_list(int(KEY) * prev, V, 0.25)
        diff = (out[b] - logits[b]).tolist()
        assert {i for i, d in enumerate(diff) if d != 0} == green
        assert all(d == pytest.approx(3.0) for d in diff if d != 0)
    assert torch.equal(apply_watermark(logits, history[:, :0], cfg), logits)  # no context yet: unchanged


def test_sampling_config_takes_a_dict_and_refuses_unknown_keys():
    assert SamplingConfig(watermark={"key": "abc", "delta": 4}).watermark == WatermarkConfig("abc", delta=4)
    with pytest.raises(ConfigError, match="unknown watermark"):
        SamplingConfig(watermark={"key": "abc", "strength": 4})


# ---- detection on generated text ----

def test_watermarked_text_is_detected_and_unwatermarked_is_not(tiny_gpt):
    cfg = WatermarkConfig(key="secret", delta=2.0)
    marked = _generate(tiny_gpt, cfg, 4, 200, seed=0)
    plain = _generate(tiny_gpt, None, 4, 200, seed=0)
    for ids in marked:
        res = detect(ids, cfg, 200)
        assert res.watermarked and res.z_score > 4, res
        wrong = detect(ids, WatermarkConfig(key="another key"), 200)
        assert not wrong.watermarked and wrong.verdict == "not watermarked"
        assert detect(ids[:10], cfg, 200).verdict == "too short to judge"
    for ids in plain:
        assert not detect(ids, cfg, 200).watermarked


def test_detection_survives_ten_percent_substitution(tiny_gpt):
    cfg = WatermarkConfig(key="secret", delta=2.0)
    rng = random.Random(0)
    for ids in _generate(tiny_gpt, cfg, 3, 200, seed=1):
        edited = list(ids)
        for i in rng.sample(range(len(ids)), len(ids) // 10):
            edited[i] = rng.randrange(200)
        assert detect(edited, cfg, 200).watermarked


def test_null_z_scores_are_standard_normal_and_rarely_flagged():
    """Texts of 100 random tokens (no watermark): z ~ N(0, 1), flagged at FPR 1e-2 about 1% of the time."""
    cfg = WatermarkConfig(key="null", gamma=0.25)
    rng = random.Random(0)
    res = [detect([rng.randrange(1000) for _ in range(100)], cfg, 1000, fpr=1e-2) for _ in range(300)]
    zs = [r.z_score for r in res]
    mean = sum(zs) / len(zs)
    sd = math.sqrt(sum((z - mean) ** 2 for z in zs) / (len(zs) - 1))
    assert abs(mean) < 0.25 and 0.8 < sd < 1.2, (mean, sd)
    assert sum(r.watermarked for r in res) <= 9  # expected 3; P(>= 10 | Bin(300, 0.01)) < 1e-3


# ---- bad inputs ----

@pytest.mark.parametrize("kw, field", [({"gamma": 0.0}, "gamma"), ({"gamma": 1.0}, "gamma"), ({"delta": 0}, "delta"),
                                       ({"delta": float("nan")}, "delta"), ({"context_width": 0}, "context_width"),
                                       ({"hashing": "middle"}, "hashing"), ({"key": ""}, "key"),
                                       ({"key": "0"}, "key")])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        WatermarkConfig(**{"key": "k", **kw})


def test_bad_detector_inputs():
    cfg = WatermarkConfig(key="k")
    with pytest.raises(DataError, match="outside the vocabulary"):
        detect([1, 2, 500], cfg, 100)
    with pytest.raises(ConfigError, match="green tokens"):
        detect([1, 2, 3], WatermarkConfig(key="k", gamma=0.1), 5)
    empty = detect([], cfg, 100)
    assert empty.verdict == "too short to judge" and empty.z_score is None and not empty.watermarked


# ---- API and CLI ----

def test_api_and_cli_round_trip(trained_gpt, tmp_path, capsys):
    text = api.generate(trained_gpt, "ROMEO:", max_new_tokens=300, seed=0, watermark={"key": "my key"})[0]
    res = api.detect_watermark(text, trained_gpt, "my key")
    assert res.watermarked, res
    assert not api.detect_watermark(text, trained_gpt, "not my key").watermarked
    f = tmp_path / "text.txt"
    f.write_text(text)
    assert cli_main(["watermark", "detect", "--key", "my key", "--run", str(trained_gpt), str(f)]) == 0
    out = capsys.readouterr().out
    assert "verdict: watermarked" in out and "z-score" in out
    assert cli_main(["watermark", "detect", "--key", "other", "--run", str(trained_gpt), str(f)]) == 0
    assert "verdict: not watermarked" in capsys.readouterr().out
    assert cli_main(["generate", str(trained_gpt), "--prompt", "A", "--max-new-tokens", "250", "--seed", "1",
                     "--watermark-key", "cli", "--watermark-delta", "3"]) == 0
    f.write_text(capsys.readouterr().out[1:])  # the prompt "A" is printed first
    assert cli_main(["watermark", "detect", "--key", "cli", "--run", str(trained_gpt), "--json", str(f)]) == 0
    assert '"watermarked": true' in capsys.readouterr().out
    assert cli_main(["watermark", "detect", "--key", "k", "--run", str(trained_gpt), str(tmp_path / "none.txt")]) == 2
    assert cli_main(["generate", str(trained_gpt), "--watermark-delta", "3"]) == 2
    assert "need --watermark-key" in capsys.readouterr().err


# ---- transformers: the same green lists, the same z-scores ----

@pytest.mark.parametrize("hashing, width", [("left", 1), ("left", 3), ("self", 1), ("self", 3)])
def test_processor_is_identical_to_transformers(hashing, width):
    lp = pytest.importorskip("transformers.generation.logits_process")
    V = 500
    proc = lp.WatermarkLogitsProcessor(V, "cpu", greenlist_ratio=0.25, bias=2.0, hashing_key=int(KEY),
                                       seeding_scheme=f"{hashing}hash", context_width=width)
    cfg = WatermarkConfig(key=KEY, gamma=0.25, delta=2.0, context_width=width, hashing=hashing)
    g = torch.Generator().manual_seed(0)
    history, logits = torch.randint(0, V, (3, 6), generator=g), torch.randn(3, V, generator=g)
    assert torch.equal(apply_watermark(logits, history, cfg), proc(history, logits.clone()))


def _hf_detector(V: int, cfg: WatermarkConfig, ignore_repeated: bool):
    tf = pytest.importorskip("transformers")
    wcfg = tf.WatermarkingConfig(greenlist_ratio=cfg.gamma, bias=cfg.delta, hashing_key=cfg.hash_key,
                                 seeding_scheme=cfg.seeding_scheme, context_width=cfg.context_width)
    return tf.WatermarkDetector(tf.PretrainedConfig(vocab_size=V, bos_token_id=-1), "cpu", wcfg,
                                ignore_repeated_ngrams=ignore_repeated)


@pytest.mark.parametrize("hashing, width", [("left", 1), ("self", 2)])
def test_genlab_watermark_gets_the_same_z_from_transformers_detector(tiny_gpt, hashing, width):
    cfg = WatermarkConfig(key="a string key", hashing=hashing, context_width=width)
    texts = _generate(tiny_gpt, cfg, 2, 120, seed=3) + _generate(tiny_gpt, None, 1, 120, seed=4)
    for ignore in (True, False):
        hf = _hf_detector(200, cfg, ignore)
        for ids in texts:
            ours = detect(ids, cfg, 200, ignore_repeated=ignore)
            theirs = hf(torch.tensor([ids]), return_dict=True)
            assert ours.num_scored == theirs.num_tokens_scored[0]
            assert ours.num_green == theirs.num_green_tokens[0]
            assert ours.z_score == pytest.approx(float(theirs.z_score[0]), abs=1e-9)


def test_transformers_watermark_is_detected_by_genlab():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V = 256
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                               bos_token_id=0, eos_token_id=None, pad_token_id=0)).eval()
    cfg = WatermarkConfig(key=KEY, gamma=0.25, delta=2.0)
    wcfg = tf.WatermarkingConfig(greenlist_ratio=0.25, bias=2.0, hashing_key=int(KEY), seeding_scheme="lefthash")
    prompt = torch.tensor([[5, 17, 99]])
    out = model.generate(prompt, watermarking_config=wcfg, do_sample=True, max_new_tokens=120, min_new_tokens=120,
                         top_k=0)
    new = out[0, prompt.size(1) - 1:].tolist()  # the last prompt token is the first token's context
    ours = detect(new, cfg, V, ignore_repeated=False)
    theirs = _hf_detector(V, cfg, False)(torch.tensor([new]), return_dict=True)
    assert ours.z_score == pytest.approx(float(theirs.z_score[0]), abs=1e-9)
    assert ours.watermarked, ours


def test_cli_sends_images_to_the_image_watermark_detector(tmp_path, capsys):
    pytest.importorskip("genlab.safety.provenance")
    from PIL import Image

    f = tmp_path / "plain.png"
    Image.frombytes("RGB", (32, 32), bytes(random.Random(0).randrange(256) for _ in range(32 * 32 * 3))).save(f)
    assert cli_main(["watermark", "detect", "--key", "k", str(f)]) == 0
    assert '"watermarked": false' in capsys.readouterr().out
    assert cli_main(["watermark", "detect", "--key", "k", str(tmp_path / "missing.png")]) == 2
