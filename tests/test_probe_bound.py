"""The causality probe's stated bound (judge/evaluate.py): a look-ahead at 0.1% of the scored positions
escapes one evaluation with probability <= 1e-3, the holdout is probed too, and honest models pass.

The graphs are small torch modules of pure tensor operations, scored through the real torch adapter on
synthetic splits (no prepared data): the look-ahead graphs choose where to cheat by content, as a
graph built to slip past a sampled probe would.

Run: .venv/bin/python -m pytest -q tests/test_probe_bound.py      (CPU, a few seconds)
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from judge import evaluate as E

torch = pytest.importorskip("torch", reason="PyTorch not installed")

V, T, N, B = 256, 64, 256, 16  # 16,384 positions per evaluation: the probe draws 6,905 of them


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of small forwards: one thread each (two threads on a busy 2-core machine are 20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adapter():
    import backends
    from judge import torch_adapter

    return torch_adapter.eval_adapter(backends.detect("cpu"))


def rows(seed=0, n=N, low=0, high=V):
    x = np.random.default_rng(seed).integers(low, high, size=(n, T + 1), dtype=np.int32)
    return E.EvalRows(x[:, :-1], x[:, 1:])


def score(model, split, seed=None, **kw):
    rng = None if seed is None else np.random.default_rng(seed)
    with torch.no_grad():
        return E.score_split(model, adapter(), B, split, np.ones(V, dtype=np.int64), V, rng, **kw)


class Causal(torch.nn.Module):
    """An honest model: token embedding, the running mean of the embeddings so far (causal mixing), a
    nonlinearity, unembedding."""

    def __init__(self, seed=0, d=32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, d, generator=g) * 0.5)
        self.mix = torch.nn.Parameter(torch.randn(d, d, generator=g) / math.sqrt(d))
        self.out = torch.nn.Parameter(torch.randn(d, V, generator=g) / math.sqrt(d))

    def forward(self, idx):
        h = self.emb[idx.long()]
        mean = h.cumsum(dim=1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return torch.tanh(h + mean @ self.mix) @ self.out


def gate(idx, modulus):
    """Where a look-ahead graph cheats: a hash of the current and the previous token, 0 mod `modulus`
    (about 1/modulus of the positions, chosen by content)."""
    x = idx.long()
    prev = torch.roll(x, 1, dims=1)
    return ((x * 40503 + prev * 9973 + 12345) % 65536) % modulus == 0


class LookAhead(Causal):
    """The honest model plus +25 on the logit of the next input token where `gate` says so."""

    def __init__(self, modulus, low=0):
        super().__init__()
        self.modulus, self.low = modulus, low

    def where(self, idx):
        g = gate(idx, self.modulus) & (idx >= self.low)  # low: cheat only on tokens from `low` on
        g[:, -1] = False  # the last position has no next input token in its row
        return g

    def forward(self, idx):
        logits = super().forward(idx)
        nxt = torch.roll(idx, -1, dims=1).long()
        bonus = torch.nn.functional.one_hot(nxt, V).float() * 25.0
        return logits + self.where(idx).float()[..., None] * bonus


class SiblingLookAhead(LookAhead):
    """A look-ahead that survives a probe putting several copies of one row in a forward, each altered
    after a different cut: where another row of the batch shares this row's first p + 1 tokens (p >= 3),
    it takes the next token from that row (a copy whose cut is later, so whose token is the original)
    instead of its own (altered) one. Scored alone, with no such sibling, it reads its own next token."""

    def forward(self, idx):
        logits = Causal.forward(self, idx)
        x = idx.long()
        nxt = torch.roll(x, -1, dims=1)
        same = (x[:, None, :] == x[None, :, :]).long().cumprod(dim=2).bool()  # (i, j, p): rows agree up to p
        same &= ~torch.eye(x.shape[0], dtype=torch.bool)[:, :, None]
        same[:, :, :3] = False
        has = same.any(dim=1)  # (i, p)
        first = same.float().argmax(dim=1)  # (i, p): the first such sibling
        sib_next = torch.gather(nxt, 0, first)  # nxt[first[i, p], p]
        token = torch.where(has, sib_next, nxt)
        bonus = torch.nn.functional.one_hot(token, V).float() * 25.0
        return logits + self.where(idx).float()[..., None] * bonus


def cheating_share(model, split):
    with torch.no_grad():
        return float(model.where(torch.from_numpy(split.x)).float().mean())


def test_the_probe_count_follows_from_the_stated_bound():
    assert E.probe_count(1e-3, 1e-3) == 6905  # (1 - 1e-3)**6905 <= 1e-3 < (1 - 1e-3)**6904
    assert (1 - 1e-3) ** 6905 <= 1e-3 < (1 - 1e-3) ** 6904
    assert E.probe_count(E.PROBE_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE) == 6905
    assert E.probe_count(E.HOLDOUT_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE) == 688
    assert E.escape_bound(1e-3, 6905, 10**6) <= 1e-3 and E.escape_bound(1e-3, 100, 100) == 0.0


@pytest.mark.parametrize("shape", [(256, 64, 16, 256), (256, 256, 8, 2048), (10240, 2048, 32, 8192), (3, 16, 8, 64)])
def test_the_plan_draws_enough_distinct_positions_and_never_two_cuts_of_a_row_in_one_forward(shape):
    n_rows, seq, batch, vocab = shape
    windows = E._plan_probes(np.random.default_rng(0), n_rows, seq, batch, vocab, 6905)
    want = min(6905, n_rows * seq)
    drawn = [(int(r), int(c)) for w in windows for r, c in zip(w.src, w.cut)]
    assert len(drawn) >= want and len(set(drawn)) == len(drawn)  # without replacement
    assert windows[0].start == 0 and windows[-1].stop == n_rows
    for w, nxt in zip(windows, windows[1:] + [None]):
        assert w.start % batch == 0 and (nxt is None or nxt.start == w.stop)
        m = (w.stop - w.start) * seq
        assert len(w.src) >= min(m, want * m / (n_rows * seq))  # every window gets its share (rounded up)
        assert len(w.need) * vocab * 4 <= max(E.PROBE_STORE_BYTES, batch * seq * vocab * 4)  # memory bounded
        assert sorted(np.concatenate(w.batches).tolist()) == list(range(len(w.src)))  # each probe runs once
        for b in w.batches:
            assert len(b) <= batch and len(set(w.src[b].tolist())) == len(b)  # distinct rows per forward
        assert (w.pos[:, 0] == w.cut).all() and ((w.pos[:, 1:] < w.cut[:, None]) | (w.pos[:, 1:] == -1)).all()


def test_an_honest_model_is_never_flagged():
    split = rows(1)
    model = Causal(1)
    unprobed = score(model, split)
    for seed in range(3):
        got = score(model, split, seed)
        assert got["bpb"] == unprobed["bpb"]
        assert got["probed_rows"] >= 6905 and got["escape_bound"] <= E.PROBE_ESCAPE
        assert got["probe_forwards"] >= math.ceil(6905 / B)


def test_a_lookahead_on_0_4_percent_of_positions_chosen_by_content_is_caught_in_every_evaluation():
    split = rows(2)
    model = LookAhead(256)
    assert 0.003 < cheating_share(model, split) < 0.006
    assert score(model, split)["bpb"] < score(Causal(), split)["bpb"]  # unprobed, it would win
    for seed in range(5):
        with pytest.raises(E.NonCausalModelError, match="sees the future"):
            score(model, split, seed)


def test_a_lookahead_on_0_1_percent_of_positions_is_caught():
    split = rows(3)
    model = LookAhead(1024)
    share = cheating_share(model, split)
    assert 0.0005 < share < 0.002
    # this split and seed: the plan's cuts hit a cheating position (about 1 - (1 - 6905/16384)**16 of seeds do)
    with pytest.raises(E.NonCausalModelError, match="sees the future"):
        score(model, split, 7)


def test_a_lookahead_that_reads_a_sibling_copy_of_its_row_is_caught():
    split = rows(4)
    model = SiblingLookAhead(256)
    assert 0.003 < cheating_share(model, split) < 0.006
    # The attack is real: with copies of one row in a forward, each altered after its own cut, the
    # logits at every cut are those of the row scored alone, cheating included.
    r = int(np.argmax(model.where(torch.from_numpy(split.x)).any(dim=1).numpy()))
    cheat = int(np.nonzero(model.where(torch.from_numpy(split.x[r:r + 1]))[0].numpy())[0][0])
    cuts = [cheat] + [c for c in range(cheat + 1, T) if c != cheat][:B - 1]
    copies = np.repeat(split.x[r:r + 1], B, axis=0)
    rng = np.random.default_rng(0)
    for i, c in enumerate(cuts):
        copies[i, c + 1:] = (copies[i, c + 1:] + rng.integers(1, V, size=T - c - 1)) % V
    with torch.no_grad():
        alone = model(torch.from_numpy(np.repeat(split.x[r:r + 1], B, axis=0)))[0]
        together = model(torch.from_numpy(copies))
    assert torch.allclose(together[0, cheat], alone[cheat])  # the look-ahead at the cut went unseen
    # ... but the probe never puts two cuts of one row in one forward, so it reads its own altered token
    for seed in range(3):
        with pytest.raises(E.NonCausalModelError, match="sees the future"):
            score(model, split, seed)


def test_a_model_that_reads_other_rows_is_caught():
    class Neighbour(Causal):  # row b adds the next row's current token: no future of its own row
        def forward(self, idx):
            logits = super().forward(idx)
            return logits + torch.nn.functional.one_hot(torch.roll(idx, -1, dims=0).long(), V).float()

    with pytest.raises(E.NonCausalModelError, match="mixes rows|reads other rows"):
        score(Neighbour(), rows(5), 0)


def test_the_holdout_is_probed_and_a_model_cheating_only_there_is_invalid(monkeypatch):
    """Validation rows use tokens below 128, holdout rows 128 and above; the graph looks ahead only on
    tokens from 128 on (3% of the holdout's positions, none of validation's): the harness reports it
    like a non-causal validation score (exit 4, kind causality)."""
    from judge import graphs, harness

    model = LookAhead(32, low=128)
    val, hold = rows(6, low=0, high=128), rows(7, n=64, low=128, high=V)
    assert cheating_share(model, val) == 0 and 0.02 < cheating_share(model, hold) < 0.05

    def fake_graph(handover, seq_len, vocab_size):
        def forward(x):
            with torch.no_grad():
                return model(x)
        return SimpleNamespace(forward=forward, adapter=adapter(), batch_size=B, seq_len=T, framework="torch",
                               nbytes=1)

    monkeypatch.setattr(graphs, "load_graph", fake_graph)
    protocol = SimpleNamespace(vocab_size=V, max_seq_len=T, probe_lookahead=E.PROBE_LOOKAHEAD_FRACTION,
                               holdout_probe_lookahead=E.HOLDOUT_LOOKAHEAD_FRACTION)
    ready = harness.Ready({"protocol": "synthetic", "split": "val"}, None, protocol, np.ones(V, dtype=np.int64),
                          val, hold)
    code, result = harness.evaluate(None, "synthetic", ready)
    assert code == harness.EXIT_NONCAUSAL and result["kind"] == "causality", result
    assert result["probe_split"] == "holdout" and "holdout" in result["reason"]

    honest = LookAhead(32, low=V)  # never cheats
    model.load_state_dict(honest.state_dict())
    model.low = V
    code, result = harness.evaluate(None, "synthetic", ready)
    assert code == 0 and result["valid"], result
    assert result["holdout_probed_rows"] >= E.probe_count(E.HOLDOUT_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE)
    assert result["probed_rows"] >= 6905 and result["escape_bound"] <= E.PROBE_ESCAPE
