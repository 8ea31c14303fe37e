"""Bits per byte of a handed-over model, with a causality probe the model cannot predict (locked).

Framework-neutral: `forward(inputs)` returns logits (B, T, V) for one fixed-shape batch, and an
adapter (judge/torch_adapter.py or judge/mlx_adapter.py) moves tokens in, turns logits into per-token
nats and copies logits out, so the loss is never computed by model code. Sums are float64 on the host:

    val_bpb = sum of nats over targets with a byte length > 0 / (ln 2 * sum of their bytes)

The rows scored are fixed by the protocol alone: the first eval_tokens // T rows of the split's
packed stream, whatever batch size the model was exported for (a short last batch is padded with
rows of zeros whose logits are ignored; not with copies of real rows, from which a row could read its
own future while the probe alters only the real one).

Causality probe, with a stated bound: a graph that looks ahead at a fraction f of the scored positions
(its logits at position p read an input token after p) escapes one evaluation with probability at most
(1 - f)**n, where n = probe_count(f, escape) probes are drawn per evaluation: for validation
PROBE_LOOKAHEAD_FRACTION = 0.1% of positions escapes with probability <= PROBE_ESCAPE = 1e-3 (n = 6905);
for the holdout HOLDOUT_LOOKAHEAD_FRACTION = 1% with the same 1e-3 (n = 688). A look-ahead at p is seen
only by a probe whose cut is p (tokens up to p kept, every token after p altered), compared with the
logits at p from the first, unsuspecting scoring forward; so each probe is one (row, cut) drawn without
replacement, uniformly over the split's positions, from a seed the harness draws itself (the set of
positions a graph cheats on is fixed before the seed exists). The split is cut into windows of whole
batches, probed in proportion to their positions (rounded up), which keeps the bound (stratified
sampling does no worse than uniform) and bounds the memory held for comparison (PROBE_STORE_BYTES).

During scoring, the logits at every planned position (each probe's cut and PROBE_EARLIER random positions
before it) are copied to the host; then each probe batch runs: up to batch_size probes of distinct source
rows (never two cuts of one row in one forward, or a row could read its original future from a sibling
whose cut is later), in random order, each row its source's tokens with those after the cut replaced by
random other tokens, padding rows all zeros. Every compared position must give the logits of the scoring
forward: a row that reads another row moves too, since its neighbours in a probe batch are not those it
was scored with. A cut at the row's last position alters nothing in that row and checks exactly that.

Logits are compared as float64 log-probabilities with a fixed tolerance (PROBE_TOL nats), never one
scaled by the logits themselves: a graph could otherwise widen it at will (one token at -1e30, or a
constant added to every logit) and look ahead underneath. A lookahead smaller than PROBE_TOL gains at
most that much per token. At the probed positions the adapter's float32 loss must also match what
float64 makes of the same logits (LOSS_TOL), so logits placed where float32 arithmetic loses the
partition function (a constant of 2**27 on every logit) are refused rather than scored near zero.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["PROBE_LOOKAHEAD_FRACTION", "HOLDOUT_LOOKAHEAD_FRACTION", "PROBE_ESCAPE", "PROBE_TOL",
           "NonCausalModelError", "UnfaithfulLossError", "EvalRows", "load_rows", "score_split", "batch_sums",
           "compare_logits", "log_probs", "probe_count", "escape_bound"]

PROBE_LOOKAHEAD_FRACTION = 1e-3  # validation: a look-ahead at this share of positions ...
PROBE_ESCAPE = 1e-3  # ... escapes one evaluation with at most this probability
HOLDOUT_LOOKAHEAD_FRACTION = 1e-2  # the holdout (reported, never decides): this share, the same escape
PROBE_EARLIER = 3  # positions before the cut compared per probe, besides the cut itself
PROBE_STORE_BYTES = 64 * 2**20  # host memory for the scoring forward's logits at planned positions (per window)
PROBE_TOL = 2e-4  # nats: how far a log-probability may move on unchanged input (same graph, same shapes)
NEGLIGIBLE = -30.0  # log-probabilities below this on both sides (probability < 1e-13) are not compared
LOSS_TOL = 1e-3  # relative (plus as much absolute, in nats): the adapter's loss against float64 at probed positions
ROW_PULL = 16  # rows fetched from the packed stream at a time (the stream does not depend on it)
_CHUNK = 1024  # positions turned into float64 log-probabilities at a time


class NonCausalModelError(Exception):
    """The model's logits at some position depend on later tokens (or on other rows)."""


class UnfaithfulLossError(NonCausalModelError):
    """The evaluator's float32 loss does not match float64 on the model's own logits (reported, like a
    non-causal model, as an invalid model)."""


@dataclass
class EvalRows:
    """The rows one split is scored on: inputs and targets, int32 (N, T)."""

    x: np.ndarray
    y: np.ndarray


def load_rows(p: Any, split: str, tokens: int) -> EvalRows:
    """The first `tokens // T` rows of the split's packed stream (at least one)."""
    from data.loader import make_dataloader

    T = p.max_seq_len
    n = max(1, tokens // T)
    loader = make_dataloader(p, ROW_PULL, T, split)
    xs, ys, have = [], [], 0
    while have < n:
        x, y, _ = next(loader)
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
    return EvalRows(np.concatenate(xs)[:n], np.concatenate(ys)[:n])


def batch_sums(nats: np.ndarray, y: np.ndarray, token_bytes: np.ndarray) -> tuple[float, int]:
    """Sum of nats over targets with a byte length > 0 and the sum of their bytes (float64 / int)."""
    nbytes = token_bytes[y]
    return float(np.asarray(nats, dtype=np.float64)[nbytes > 0].sum()), int(nbytes.sum())


def probe_count(fraction: float, escape: float) -> int:
    """Probes per evaluation so that a look-ahead at `fraction` of the positions escapes all of them with
    probability <= `escape`: the smallest n with (1 - fraction)**n <= escape (6905 for 1e-3 and 1e-3)."""
    return math.ceil(math.log(escape) / math.log1p(-fraction))


def escape_bound(fraction: float, probes: int, positions: int) -> float:
    """The probability that a look-ahead at `fraction` of `positions` escapes `probes` probes (0 when every
    position is probed)."""
    return 0.0 if probes >= positions else (1.0 - fraction) ** probes


@dataclass
class _Window:
    """The probes of one window of whole batches (rows start..stop), planned before anything runs."""

    start: int
    stop: int
    src: np.ndarray  # (n,) source row of each probe (index into the split)
    cut: np.ndarray  # (n,) tokens after this position are altered
    pos: np.ndarray  # (n, 1 + PROBE_EARLIER) compared positions, the cut first; -1: none (the cut is 0)
    batches: list[np.ndarray]  # probe indices per probe forward, at most batch_size, all of distinct rows
    need: np.ndarray  # sorted distinct flat positions (row * T + position) whose scoring logits are kept
    slot: np.ndarray  # (n, 1 + PROBE_EARLIER) index into `need` for each compared position (-1: none)


def _plan_probes(rng: np.random.Generator, N: int, T: int, B: int, V: int, probes: int) -> list[_Window]:
    """The secret plan: `probes` (row, cut) draws, without replacement, spread over windows of whole batches
    in proportion to their positions (rounded up), each window small enough that the scoring logits kept for
    its probes fit in PROBE_STORE_BYTES."""
    M = N * T
    probes = min(probes, M)
    compared = 1 + PROBE_EARLIER
    per_row = max(1, math.ceil(probes / N) * compared * V * 4)  # float32 bytes kept per row of a window
    rows = max(B, PROBE_STORE_BYTES // per_row // B * B)
    windows = []
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        m = (stop - start) * T
        n = min(m, math.ceil(probes * m / M))
        flat = np.sort(rng.choice(m, size=n, replace=False))
        src, cut = start + flat // T, flat % T
        earlier = np.floor(rng.random((n, PROBE_EARLIER)) * cut[:, None]).astype(np.int64)
        earlier[cut == 0] = -1
        pos = np.concatenate([cut[:, None], earlier], axis=1)
        # Probe forwards: each row's probes form a run in a random order of the rows; dealing the runs out
        # round-robin over `nb` >= the longest run puts no two probes of one row in the same forward.
        rank = rng.permutation(stop - start)[src - start]
        order = np.lexsort((rng.random(n), rank))
        longest = int(np.bincount(src - start).max()) if n else 0
        nb = max(math.ceil(n / B), longest)
        batches = [rng.permutation(order[k::nb]) for k in range(nb)]
        valid = pos >= 0
        need, inverse = np.unique((src[:, None] * T + pos)[valid], return_inverse=True)
        slot = np.full(pos.shape, -1, dtype=np.int64)
        slot[valid] = inverse
        windows.append(_Window(start, stop, src, cut, pos, batches, need, slot))
    return windows


def log_probs(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis (-inf logits stay -inf)."""
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        top = np.max(z, axis=-1, keepdims=True)
        z = z - np.where(np.isfinite(top), top, 0.0)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _differences(la: np.ndarray, lb: np.ndarray) -> np.ndarray:
    """Per position (last axis reduced): the largest difference of two log-probability arrays over the
    entries that are not negligible on both sides."""
    with np.errstate(invalid="ignore"):
        compared = ~((la < NEGLIGIBLE) & (lb < NEGLIGIBLE))
        diff = np.where(la == lb, 0.0, np.abs(la - lb))  # equal infinities differ by nothing
        diff = np.where(np.isnan(la) & np.isnan(lb), 0.0, np.where(np.isnan(diff), np.inf, diff))
    return np.max(np.where(compared, diff, 0.0), axis=-1, initial=0.0)


def compare_logits(a: np.ndarray, b: np.ndarray) -> tuple[bool, float, float]:
    """(moved, largest difference, tolerance) for two logits slices of the same positions, compared as
    log-probabilities within PROBE_TOL nats (entries negligible on both sides are skipped)."""
    largest = float(np.max(_differences(log_probs(a), log_probs(b)), initial=0.0))
    return largest > PROBE_TOL, largest, PROBE_TOL


def _gather(adapter: Any, logits: Any, flat: np.ndarray) -> np.ndarray:
    """float32 (len(flat), V) on the host: the logits at flat positions (row * T + position) of one batch,
    selected on the device so that only they are copied."""
    B, T, V = logits.shape
    index = adapter.to_input(np.ascontiguousarray(flat, dtype=np.int32))
    return adapter.to_numpy(logits.reshape(B * T, V)[index])


def _check_loss(per_token: np.ndarray, y: np.ndarray, flat: np.ndarray, kept: np.ndarray) -> None:
    """Raise UnfaithfulLossError unless the adapter's per-token loss at the kept positions (flat, in one
    batch) is what float64 makes of the same logits."""
    per_token = np.asarray(per_token, dtype=np.float64).reshape(-1)
    y = np.asarray(y).reshape(-1)
    for i in range(0, len(flat), _CHUNK):
        f = flat[i:i + _CHUNK]
        z = np.asarray(kept[i:i + _CHUNK], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # -log_probs(z) at the targets, not the whole array
            top = np.max(z, axis=-1, keepdims=True)
            z -= np.where(np.isfinite(top), top, 0.0)
            picked = np.take_along_axis(z, y[f].astype(np.int64)[:, None], axis=-1)[:, 0]
            want = np.log(np.exp(z).sum(axis=-1)) - picked
        got = per_token[f]
        with np.errstate(invalid="ignore"):
            ok = (np.abs(got - want) <= LOSS_TOL * (1.0 + np.abs(want))) | (got == want)
        if not ok.all():
            j = int(np.argmin(ok))
            raise UnfaithfulLossError(
                f"the evaluator's float32 loss at a position is {got[j]:.6g} nats where float64 gives {want[j]:.6g} "
                "from the same logits, so the logits are out of the range float32 scoring handles (keep them near "
                "zero, e.g. with a softcap)")


def _probe_batch(forward: Callable, adapter: Any, x: np.ndarray, w: _Window, batch: np.ndarray, kept: np.ndarray,
                 batch_size: int, vocab_size: int, rng: np.random.Generator) -> str | None:
    """Run one probe forward (rows `batch` of the window's probes), say what moved (None: nothing)."""
    T = x.shape[1]
    xb = np.zeros((batch_size, T), dtype=x.dtype)  # padding rows: zeros, never copies of real rows
    for i, k in enumerate(batch):
        t = int(w.cut[k])
        xb[i] = x[w.src[k]]
        if t + 1 < T:
            xb[i, t + 1:] = (xb[i, t + 1:] + rng.integers(1, vocab_size, size=T - t - 1)) % vocab_size
    pos, slot = w.pos[batch], w.slot[batch]
    valid = pos >= 0
    which = np.nonzero(valid)  # (probe in batch, compared position), row-major
    logits = forward(adapter.to_input(xb))
    after = _gather(adapter, logits, which[0] * T + pos[valid])
    logits = None  # at most one logits array alive at a time
    before = kept[slot[valid]]
    differ = np.nonzero(~(before == after).all(axis=-1))[0]  # bit-identical logits: equal log-probabilities
    for i in range(0, len(differ), _CHUNK):
        d = differ[i:i + _CHUNK]
        diff = _differences(log_probs(before[d]), log_probs(after[d]))
        moved = np.nonzero(diff > PROBE_TOL)[0]
        if len(moved) == 0:
            continue
        j = int(d[moved[0]])
        k = batch[which[0][j]]
        t, q, largest = int(w.cut[k]), int(pos[which[0][j], which[1][j]]), float(diff[moved[0]])
        moved_by = f"logits at position {q + 1} of a row changed by up to {largest:.3g} (tolerance {PROBE_TOL:.3g})"
        if t + 1 >= T:
            return f"{moved_by} when only the other rows of the batch changed, so the model mixes rows"
        return (f"{moved_by} when only the tokens after position {t + 1} (and the other rows of the batch) changed, "
                "so the model sees the future (or reads other rows)")
    return None


def score_split(forward: Callable, adapter: Any, batch_size: int, rows: EvalRows, token_bytes: np.ndarray,
                vocab_size: int, rng: np.random.Generator | None = None, *,
                lookahead_fraction: float = PROBE_LOOKAHEAD_FRACTION, escape: float = PROBE_ESCAPE) -> dict:
    """Score every row once, in batches of `batch_size`; with `rng`, run the causality probe on the way:
    probe_count(lookahead_fraction, escape) probes (every position, if the split has fewer).

    Raises NonCausalModelError when the probe sees the future (or other rows) leak into logits.
    """
    t0 = time.perf_counter()
    N, T = rows.x.shape
    wanted = min(N * T, probe_count(lookahead_fraction, escape)) if rng is not None else 0
    if rng is not None:
        windows = _plan_probes(rng, N, T, batch_size, vocab_size, wanted)
    else:
        none = np.empty(0, np.int64)
        windows = [_Window(0, N, none, none, none.reshape(0, 1), [], none, none.reshape(0, 1))]
    total_nats, total_bytes, tokens, probed, probe_forwards, probe_seconds = 0.0, 0, 0, 0, 0, 0.0
    for w in windows:
        kept = None
        for s in range(w.start, w.stop, batch_size):
            k = min(batch_size, N - s)
            xb, yb = rows.x[s:s + k], rows.y[s:s + k]
            if k < batch_size:  # fixed-shape graph: pad with rows of zeros, score only the real ones (never
                # with copies of real rows: the probe alters only real rows, so a copy would keep their future)
                pad = np.zeros((batch_size - k, T), dtype=xb.dtype)
                xb, yb = np.concatenate([xb, pad]), np.concatenate([yb, pad])
            logits = forward(adapter.to_input(xb))
            per_token = adapter.nats(logits, yb)
            lo, hi = np.searchsorted(w.need, [s * T, (s + k) * T])
            if hi > lo:  # the unsuspecting logits at the planned positions of this batch's rows
                flat = w.need[lo:hi] - s * T
                got = _gather(adapter, logits, flat)
                logits = None
                if kept is None:
                    kept = np.empty((len(w.need), got.shape[-1]), dtype=got.dtype)
                kept[lo:hi] = got
                _check_loss(per_token, yb, flat, got)
            logits = None  # at most one logits array alive at a time
            nats, nbytes = batch_sums(np.asarray(per_token)[:k], yb[:k], token_bytes)
            total_nats += nats
            total_bytes += nbytes
            tokens += yb[:k].size
        p0 = time.perf_counter()
        for batch in w.batches:
            reason = _probe_batch(forward, adapter, rows.x, w, batch, kept, batch_size, vocab_size, rng)
            if reason is not None:
                raise NonCausalModelError(reason)
            probed += len(batch)
            probe_forwards += 1
        probe_seconds += time.perf_counter() - p0
        kept = None
    return {"bpb": total_nats / (math.log(2) * total_bytes), "nats": total_nats, "bytes": total_bytes,
            "tokens": tokens, "rows": N, "probed_rows": probed, "probe_forwards": probe_forwards,
            "probe_seconds": probe_seconds, "lookahead_fraction": lookahead_fraction if rng is not None else None,
            "escape_bound": escape_bound(lookahead_fraction, wanted, N * T) if rng is not None else None,
            "seconds": time.perf_counter() - t0}
