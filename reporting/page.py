"""The live page's JSON, shaped from what reporting/live.py read: the summary cards, the results table,
the progress plot, the noise model and the host (all from files on disk; nothing here writes)."""

from __future__ import annotations

import os
from pathlib import Path

from reporting.summary import Source, measured
from research.results import Row


def best_runs(st) -> list[Row]:
    """The best trainer's measured rows in the decision state (none without one)."""
    return list(getattr(st, "best_runs", None) or [])


def loop_alive(root: Path) -> dict:
    """Whether a loop holds the repository's lock (its pid alive), read from .autoresearch.lock."""
    from research.guards import LOCK_FILE

    try:
        first = (root / LOCK_FILE).read_text(encoding="utf-8", errors="replace")[:200].split("\n")[0]
        pid = int(first)
    except (OSError, ValueError):
        return {"running": False, "pid": None}
    try:
        os.kill(pid, 0)
        alive = True
    except PermissionError:
        alive = True
    except OSError:
        alive = False
    return {"running": alive, "pid": pid}


def budget(rows: list[Row]) -> float | None:
    for r in reversed(rows):
        if r.budget_s:
            return r.budget_s
    return None


def host(source: Source | None) -> dict:
    if source is None:
        return {}
    branch = max({r.branch for r in source.rows if r.branch} or {""}, key=lambda b: sum(r.branch == b
                                                                                        for r in source.rows))
    return {"backend": source.backend, "device": source.device, "protocol": source.protocol,
            "evaluator": source.evaluator_hash, "branch": branch, "label": source.label,
            "left_out": len(source.left_out)}


def summary_json(source: Source, s, st) -> dict:
    best_n = s.number(s.best[0]) if s.best else None
    return {
        "experiments": len(source.rows), "tally": s.tally(), "counts": dict(s.counts),
        "baseline_bpb": s.baseline_bpb, "baseline_runs": len(s.baselines), "best_bpb": s.best_bpb,
        "best_basis": s.best_basis, "best_n": best_n, "improved": s.improved, "kept": len(s.kept),
        "gain_pct": 100 * (s.best_bpb - s.baseline_bpb) / s.baseline_bpb if s.best_bpb and s.baseline_bpb else None,
        "wall_seconds": s.wall_seconds, "cost_usd": s.cost_usd, "tokens_in": s.tokens_in, "tokens_out": s.tokens_out,
        "best_mean": getattr(st, "best", None),
        "best_mean_runs": len(best_runs(st)) or None,
    }


def rows_json(rows: list[Row], s, on_disk: list[int]) -> list[dict]:
    base = {i for i, _ in s.baselines}
    kept = {i for i, _ in s.kept}
    disk = set(on_disk)
    out = []
    for i, r in enumerate(rows, start=1):
        ok = measured(r)
        before = s.best_before(i)
        out.append({
            "n": s.number(i), "run": r.run, "has_run": r.run in disk,
            "status": r.status, "reason": r.reason,
            "kind": "baseline" if i in base else "keep" if i in kept else r.status,
            "description": r.description, "note": r.note, "commit": r.commit, "timestamp": r.timestamp,
            "val_bpb": r.val_bpb if ok else None, "holdout_bpb": r.holdout_bpb,
            "delta": r.val_bpb - before if ok and before else None,
            "memory_gb": r.memory_gb or None, "steps": r.num_steps, "cost_usd": r.agent_cost_usd,
            "tokens_in": r.agent_tokens_in, "tokens_out": r.agent_tokens_out,
            "training_seconds": r.training_seconds, "wall_seconds": r.wall_seconds, "mfu": r.mfu_percent,
            "progress": r.progress,
        })
    return out


def plot_json(source: Source, s) -> dict:
    from reporting.report import y_limits

    lo = hi = None
    if any(measured(r) for r in source.rows):
        lo, hi = y_limits(source, s)
    return {"running_best": s.running_best, "y_min": lo, "y_max": hi,
            "x_label": "experiment # (runs/<n>)" if any(r.run is not None for r in source.rows) else "experiment #"}


def noise_json(st, s, data) -> dict:
    """The noise model's numbers; `data` is the LiveData (its settings: the floor, alpha, confirm)."""
    out: dict = {"min_noise": data.min_noise, "baseline_spread": s.noise if s else None}
    nm = getattr(st, "noise", None) if st is not None else None
    try:
        out.update(sigma=nm.sigma, measured=nm.measured, df=nm.df, groups=nm.groups, runs=nm.runs,
                   step_share=getattr(nm, "step_share", None), describe=nm.describe())
    except AttributeError:  # no noise model yet (or an older one): the rest of the page stands
        pass
    if st is not None:
        from research.ledger import reach_sentence

        out["out_of_reach"] = reach_sentence(st, data.alpha, data.confirm)  # as the terminal says it
        out.update(best_mean=getattr(st, "best", None), best_runs=len(best_runs(st)),
                   abort_off=getattr(st, "abort_off", False),
                   would_abort=getattr(st, "would_abort", 0))
    return out
