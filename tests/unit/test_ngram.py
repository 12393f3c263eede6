"""The tensorised Kneser-Ney n-gram against a plain-Python reference of the same equations."""

from collections import Counter, defaultdict

import pytest
import torch

from genlab.core.errors import ConfigError
from genlab.data.datasets import TokenData
from genlab.models import build_config, build_model

TEXT = "the cat sat on the mat. the dog sat on the log. a cat and a dog met on a mat.\n" * 3


def reference_kn(ids, V, N):
    """Interpolated Kneser-Ney, Chen & Goodman (1998) eq. 26, with continuation counts below the top order."""
    top = Counter(tuple(ids[i : i + N]) for i in range(len(ids) - N + 1))
    counts = {N: top}
    for k in range(N - 1, 0, -1):
        counts[k] = Counter(g[1:] for g in counts[k + 1])  # distinct left extensions
    disc = {}
    for k, c in counts.items():
        n1 = sum(1 for v in c.values() if v == 1)
        n2 = sum(1 for v in c.values() if v == 2)
        disc[k] = min(max(n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5, 0.05), 0.95)
    ctx_total = {k: defaultdict(float) for k in counts}
    ctx_types = {k: defaultdict(int) for k in counts}
    for k, c in counts.items():
        for g, v in c.items():
            ctx_total[k][g[:-1]] += v
            ctx_types[k][g[:-1]] += 1

    def prob(context, w):
        c1, tot1 = counts[1], sum(counts[1].values())
        p = max(c1.get((w,), 0) - disc[1], 0) / tot1 + disc[1] * len(c1) / tot1 / V
        for k in range(2, N + 1):
            h = tuple(context[len(context) - (k - 1):]) if k - 1 <= len(context) else None
            if h is None or ctx_total[k].get(h, 0) == 0:
                continue
            t = ctx_total[k][h]
            p = max(counts[k].get(h + (w,), 0) - disc[k], 0) / t + disc[k] * ctx_types[k][h] / t * p
        return p

    return prob


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_the_reference_and_sums_to_one(order):
    chars = sorted(set(TEXT)) + ["#"]  # '#' never occurs: it must still get probability mass
    ids = [chars.index(c) for c in TEXT]
    V = len(chars)
    model = build_model(build_config({"family": "ngram", "order": order, "vocab_size": V}))
    t = torch.tensor(ids)
    model.fit_data(TokenData(t.numpy(), t.numpy(), 8))
    ref = reference_kn(ids, V, order)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ctx = torch.randint(0, V, (order - 1,), generator=g).tolist()
        if torch.rand((), generator=g) < 0.5:  # a context that occurs in the text
            i = int(torch.randint(0, len(ids) - order, (), generator=g))
            ctx = ids[i : i + order - 1]
        cache = model.new_cache(1, 100)
        logp = model.decode(torch.tensor([ctx]), cache)[0] if ctx else model.decode(
            torch.tensor([[0]]), model.new_cache(1, 100))[0]
        if not ctx:  # order 1 ignores the context entirely
            ctx = []
        probs = logp.double().exp()
        assert abs(probs.sum().item() - 1) < 1e-5
        for w in range(V):
            assert probs[w].item() == pytest.approx(ref(ctx, w), rel=1e-5), (ctx, w)
        assert probs[V - 1] > 0


def test_key_overflow_is_refused():
    with pytest.raises(ConfigError, match="overflows"):
        build_config({"family": "ngram", "order": 8, "vocab_size": 50000})


def test_round_trip_of_sizes_through_state_dict():
    V = 5
    model = build_model(build_config({"family": "ngram", "order": 3, "vocab_size": V}))
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 2, 1] * 3)
    model.fit_data(TokenData(ids.numpy(), ids.numpy(), 4))
    again = build_model(build_config({"family": "ngram", "order": 3, "vocab_size": V}))
    again.load_state_dict(model.state_dict())
    x = ids[None, :9]
    assert torch.equal(model.log_prob(x), again.log_prob(x))
    assert model.num_params() > 0
