"""Bits per byte of a handed-over model, with a causality probe the model cannot predict (locked).

Framework-neutral: `forward(inputs)` returns logits (B, T, V) for one fixed-shape batch, and an
adapter (backends/torch_rt.py or backends/mlx_rt.py) moves tokens in, turns logits into per-token
nats and copies logits out, so the loss is never computed by model code. Sums are float64 on the host:

    val_bpb = sum of nats over targets with a byte length > 0 / (ln 2 * sum of their bytes)

The rows scored are fixed by the protocol alone: the first eval_tokens // T rows of the split's
packed stream, whatever batch size the model was exported for (a short last batch is padded with
repeated rows whose logits are ignored).

Causality probe: the harness draws a secret seed per evaluation and, with it, picks whole batches
to probe and, in each, rows and cut points. A probed row's tokens after its cut are replaced by
random tokens and the batch is run again; the logits at the cut and at sampled positions before it
must not move. Rows left unaltered in a probed batch must not move at sampled positions either
(that catches a row reading its neighbours). At least PROBE_ROWS rows are altered per evaluation,
so a model that looks ahead on a fraction f of rows escapes with probability about (1 - f)^64:
0.1% for f = 10%, 3.7% for f = 5%.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = ["PROBE_ROWS", "NonCausalModelError", "EvalRows", "load_rows", "score_split", "batch_sums"]

PROBE_ROWS = 64  # rows altered by the causality probe per evaluation (at least; fewer only if the split is smaller)
PROBE_KEEP_FRACTION = 0.25  # in a probed batch, about this share of rows stays unaltered (checked whole-row)
PROBE_POSITIONS = 16  # logits compared per probed row: the cut itself plus random positions before it
ROW_PULL = 16  # rows fetched from the packed stream at a time (the stream does not depend on it)


class NonCausalModelError(Exception):
    """The model's logits at some position depend on later tokens (or on other rows)."""


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


def compare_logits(a: np.ndarray, b: np.ndarray) -> tuple[bool, float, float]:
    """(moved, largest difference, tolerance) for two logits slices of the same positions."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.nanmax(np.abs(np.concatenate([a.ravel(), b.ravel()])), initial=0.0))
    tol = 1e-3 + 1e-3 * scale  # fp32 and bf16 batched kernels agree far inside this on unchanged inputs
    same = np.isclose(a, b, rtol=0.0, atol=tol) | (np.isnan(a) & np.isnan(b))
    return (not bool(same.all())), float(np.nanmax(np.abs(a - b), initial=0.0)), tol


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
        if k < batch_size:  # fixed-shape graph: pad with repeated rows, score only the real ones
            pad = np.resize(np.arange(k), batch_size - k)
            xb, yb = np.concatenate([xb, xb[pad]]), np.concatenate([yb, yb[pad]])
        logits = forward(adapter.to_input(xb))
        nats, nbytes = batch_sums(adapter.nats(logits, yb)[:k], yb[:k], token_bytes)
        plan = plans.get(b)
        if plan is not None:
            before = _take(adapter, logits, plan)
            logits = None  # at most one logits array alive at a time
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
