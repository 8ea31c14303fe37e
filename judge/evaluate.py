"""Bits per byte of a handed-over model, with a causality probe the model cannot predict (locked).

Framework-neutral: `forward(inputs)` returns logits (B, T, V) for one fixed-shape batch, and an
adapter (backends/torch_rt.py or backends/mlx_rt.py) moves tokens in, turns logits into per-token
nats and copies logits out, so the loss is never computed by model code. Sums are float64 on the host:

    val_bpb = sum of nats over targets with a byte length > 0 / (ln 2 * sum of their bytes)

The rows scored are fixed by the protocol alone: the first eval_tokens // T rows of the split's
packed stream, whatever batch size the model was exported for (a short last batch is padded with
rows of zeros whose logits are ignored; not with copies of real rows, from which a row could read its
own future while the probe alters only the real one).

Causality probe: the harness draws a secret seed per evaluation and, with it, picks whole batches
to probe and, in each, rows and cut points. A probed row's tokens after its cut are replaced by
random tokens and the batch is run again; the logits at the cut and at sampled positions before it
must not move. Rows left unaltered in a probed batch must not move at sampled positions either
(that catches a row reading its neighbours). At least PROBE_ROWS rows are altered per evaluation,
so a model that looks ahead on a fraction f of rows escapes with probability about (1 - f)^64:
0.1% for f = 10%, 3.7% for f = 5%.

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

__all__ = ["PROBE_ROWS", "PROBE_TOL", "NonCausalModelError", "UnfaithfulLossError", "EvalRows", "load_rows",
           "score_split", "batch_sums", "compare_logits", "log_probs"]

PROBE_ROWS = 64  # rows altered by the causality probe per evaluation (at least; fewer only if the split is smaller)
PROBE_KEEP_FRACTION = 0.25  # in a probed batch, about this share of rows stays unaltered (checked whole-row)
PROBE_POSITIONS = 16  # logits compared per probed row: the cut itself plus random positions before it
PROBE_TOL = 2e-4  # nats: how far a log-probability may move on unchanged input (same graph, same shapes)
NEGLIGIBLE = -30.0  # log-probabilities below this on both sides (probability < 1e-13) are not compared
LOSS_TOL = 1e-3  # relative (plus as much absolute, in nats): the adapter's loss against float64 at probed positions
ROW_PULL = 16  # rows fetched from the packed stream at a time (the stream does not depend on it)


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
    import prepare

    T = p.max_seq_len
    n = max(1, tokens // T)
    loader = prepare.make_dataloader(p, ROW_PULL, T, split)
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


@dataclass
class _Probe:
    """One probed batch: which rows are altered (with their cut) and which positions get compared."""

    altered: dict[int, int]  # row in batch -> cut t (tokens after t are replaced)
    positions: dict[int, np.ndarray]  # row in batch -> positions whose logits must not move


def _plan_probes(rng: np.random.Generator, n_batches: int, real_rows: list[int], T: int) -> dict[int, _Probe]:
    """Secret plan: enough whole batches that at least PROBE_ROWS rows get altered."""
    plans: dict[int, _Probe] = {}
    altered_total = 0
    for b in rng.permutation(n_batches):
        if altered_total >= PROBE_ROWS:
            break
        rows = real_rows[b]
        keep = rng.random(rows) < PROBE_KEEP_FRACTION
        if rows >= 2 and keep.all():
            keep[rng.integers(rows)] = False
        if rows >= 2 and not keep.any():
            keep[rng.integers(rows)] = True
        if rows == 1:
            keep[0] = False
        altered, positions = {}, {}
        for r in range(rows):
            if keep[r]:
                positions[r] = np.sort(rng.choice(T, size=min(PROBE_POSITIONS, T), replace=False))
                continue
            t = int(rng.integers(0, T - 1)) if T > 1 else 0
            altered[r] = t
            before = rng.choice(t, size=min(PROBE_POSITIONS - 1, t), replace=False) if t > 0 else np.empty(0, int)
            positions[r] = np.sort(np.append(before, t)).astype(np.int64)
        plans[int(b)] = _Probe(altered, positions)
        altered_total += len(altered)
    return plans


def log_probs(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis (-inf logits stay -inf)."""
    z = np.asarray(logits, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        top = np.max(z, axis=-1, keepdims=True)
        z = z - np.where(np.isfinite(top), top, 0.0)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(a: np.ndarray, b: np.ndarray) -> tuple[bool, float, float]:
    """(moved, largest difference, tolerance) for two logits slices of the same positions, compared as
    log-probabilities within PROBE_TOL nats (entries negligible on both sides are skipped)."""
    la, lb = log_probs(a), log_probs(b)
    with np.errstate(invalid="ignore"):
        compared = ~((la < NEGLIGIBLE) & (lb < NEGLIGIBLE))
        diff = np.where(la == lb, 0.0, np.abs(la - lb))  # equal infinities differ by nothing
        diff = np.where(np.isnan(la) & np.isnan(lb), 0.0, np.where(np.isnan(diff), np.inf, diff))
    moved = bool((compared & (diff > PROBE_TOL)).any())
    return moved, float(np.max(np.where(compared, diff, 0.0), initial=0.0)), PROBE_TOL


def _check_loss(per_token: np.ndarray, y: np.ndarray, sampled: dict[int, np.ndarray], plan: _Probe) -> None:
    """Raise UnfaithfulLossError unless the adapter's per-token loss at the sampled positions is what float64
    makes of the same logits."""
    per_token = np.asarray(per_token, dtype=np.float64)
    for r, pos in plan.positions.items():
        targets = y[r, pos].astype(np.int64)[:, None]
        want = -np.take_along_axis(log_probs(sampled[r]), targets, axis=-1)[:, 0]
        got = per_token[r, pos]
        with np.errstate(invalid="ignore"):
            ok = (np.abs(got - want) <= LOSS_TOL * (1.0 + np.abs(want))) | (got == want)
        if not ok.all():
            i = int(np.argmin(ok))
            raise UnfaithfulLossError(
                f"the evaluator's float32 loss at a position is {got[i]:.6g} nats where float64 gives {want[i]:.6g} "
                "from the same logits, so the logits are out of the range float32 scoring handles (keep them near "
                "zero, e.g. with a softcap)")


def _take(adapter: Any, logits: Any, plan: _Probe) -> dict[int, np.ndarray]:
    return {r: adapter.to_numpy(logits[r])[pos] for r, pos in plan.positions.items()}


def _run_probe(forward: Callable, adapter: Any, xb: np.ndarray, plan: _Probe, before: dict[int, np.ndarray],
               vocab_size: int, rng: np.random.Generator) -> str | None:
    """Alter the planned rows after their cut, run the batch again, say what moved (None: nothing)."""
    altered = xb.copy()
    T = xb.shape[1]
    for r, t in plan.altered.items():
        n = T - t - 1
        if n > 0:
            altered[r, t + 1:] = (xb[r, t + 1:] + rng.integers(1, vocab_size, size=n)) % vocab_size
    after = _take(adapter, forward(adapter.to_input(altered)), plan)
    for r, pos in plan.positions.items():
        moved, diff, tol = compare_logits(before[r], after[r])
        if not moved:
            continue
        if r in plan.altered:
            return (f"logits before position {plan.altered[r] + 1} of a row changed by up to {diff:.3g} (tolerance "
                    f"{tol:.3g}) when only later tokens changed, so the model sees the future")
        return (f"logits of a row changed by up to {diff:.3g} (tolerance {tol:.3g}) when only other rows of the "
                "batch changed, so the model mixes rows")
    return None


def score_split(forward: Callable, adapter: Any, batch_size: int, rows: EvalRows, token_bytes: np.ndarray,
                vocab_size: int, rng: np.random.Generator | None = None) -> dict:
    """Score every row once, in batches of `batch_size`; with `rng`, run the causality probe on the way.

    Raises NonCausalModelError when the probe sees the future (or other rows) leak into logits.
    """
    t0 = time.perf_counter()
    N, T = rows.x.shape
    starts = list(range(0, N, batch_size))
    real = [min(batch_size, N - s) for s in starts]
    plans = _plan_probes(rng, len(starts), real, T) if rng is not None else {}
    total_nats, total_bytes, tokens, probed = 0.0, 0, 0, 0
    for b, s in enumerate(starts):
        k = real[b]
        xb, yb = rows.x[s:s + k], rows.y[s:s + k]
        if k < batch_size:  # fixed-shape graph: pad with rows of zeros, score only the real ones (never
            # with copies of real rows: the probe alters only real rows, so a copy would keep their future)
            pad = np.zeros((batch_size - k, T), dtype=xb.dtype)
            xb, yb = np.concatenate([xb, pad]), np.concatenate([yb, pad])
        logits = forward(adapter.to_input(xb))
        per_token = adapter.nats(logits, yb)
        nats, nbytes = batch_sums(per_token[:k], yb[:k], token_bytes)
        plan = plans.get(b)
        if plan is not None:
            before = _take(adapter, logits, plan)
            logits = None  # at most one logits array alive at a time
            _check_loss(per_token, yb, before, plan)
            reason = _run_probe(forward, adapter, xb, plan, before, vocab_size, rng)
            if reason is not None:
                raise NonCausalModelError(reason)
            probed += len(plan.altered)
        logits = None
        total_nats += nats
        total_bytes += nbytes
        tokens += yb[:k].size
    return {"bpb": total_nats / (math.log(2) * total_bytes), "nats": total_nats, "bytes": total_bytes,
            "tokens": tokens, "rows": N, "probed_rows": probed, "seconds": time.perf_counter() - t0}
