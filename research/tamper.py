"""A model the harness finds non-causal is tampering, and it stops the branch.

The harness refuses to score a graph whose logits before a cut move when only tokens after it change
(kind "causality": it sees the future, or other rows) or whose logits for the same batch differ on a
second call (kind "state"). The second counts as well: a graph that answers the same batch twice
differently can tell the probe's calls from the scoring calls and look causal only when probed, and no
honest graph gets there (the graph checks refuse state writes and randomness, and the tolerance is far
above rounding noise). Neither is an idea that failed: the trainer built a model that cheats the metric.

So such a run is recorded (status `invalid`, its note starting with TAMPERING and the harness's reason),
and the branch stops: `loop.py run` ends and `loop.py try` reports it, each in one sentence, and both
refuse the branch from then on. The record is the row in results.tsv, which the trainer cannot write (the
sandbox hides it, and the loop puts it back after every run); `loop.py clear-tampering` lifts the stop by
listing the run as cleared in runs/cleared-tampering.json, so losing that file stops the branch again
rather than the other way round.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from research.errors import SessionError

__all__ = ["TAMPERING", "KINDS", "CLEARED_FILE", "BranchStopped", "note", "is_tampering", "stopped_by",
           "check_not_stopped", "stop_if_tampered", "clear"]

TAMPERING = "invalid (tampering)"  # how a tampering row's note starts (after a baseline's prefix)
KINDS = ("causality", "state")  # the harness's verdicts that are tampering
CLEARED_FILE = "cleared-tampering.json"  # under runs/: the tampering runs the user cleared, per branch


class BranchStopped(SessionError):
    """A run of this branch handed over a non-causal model: the loop stops and refuses the branch."""


def note(reason: str) -> str:
    """The note of a tampering row."""
    return f"{TAMPERING}: {reason}"


def is_tampering(row) -> bool:
    return row.status == "invalid" and f"{TAMPERING}:" in row.note


def _cleared(runs_dir: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((runs_dir / CLEARED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {b: [e["run"] for e in v if isinstance(e, dict) and isinstance(e.get("run"), int)]
            for b, v in data.items() if isinstance(v, list)}


def stopped_by(rows, branch: str, runs_dir: Path):
    """The tampering row that stops `branch` (its latest one not cleared), or None."""
    done = set(_cleared(runs_dir).get(branch, []))
    hits = [r for r in rows if r.branch == branch and is_tampering(r) and r.run not in done]
    return hits[-1] if hits else None


def _what(row) -> str:
    return "a model that keeps state between calls" if "keeps state" in row.note else "a non-causal model"


def check_not_stopped(rows, branch: str, runs_dir: Path) -> None:
    """Raise BranchStopped (one sentence) when a tampering run stopped `branch` and nobody cleared it."""
    row = stopped_by(rows, branch, runs_dir)
    if row is not None:
        raise BranchStopped(
            f"Branch {branch} is stopped for tampering: run {row.run} handed over {_what(row)} ({_reason(row)}); "
            f"look at runs/{row.run}/ (diff.patch, log.txt), then lift the stop with 'loop.py clear-tampering' "
            f"or start another branch.")


def _reason(row) -> str:
    text = row.note.split(f"{TAMPERING}:", 1)[-1].strip()
    return text if len(text) <= 160 else text[:159].rstrip() + "…"


def stop_if_tampered(s, rows) -> None:
    """After recording `rows` (one experiment's): raise BranchStopped when one of them is tampering, saying
    what happened and what to do, in one sentence."""
    row = next((r for r in rows if is_tampering(r)), None)
    if row is None:
        return
    s.console.event(f"[run {row.run}] tampering: branch {s.branch} is stopped")
    raise BranchStopped(
        f"Run {row.run} handed over {_what(row)} ({_reason(row)}): that is tampering, so branch {s.branch} is "
        f"stopped and every 'loop.py run' or 'loop.py try' on it is refused until you look at runs/{row.run}/ "
        f"and lift the stop with 'loop.py clear-tampering'.")


def clear(rows, branch: str, runs_dir: Path) -> list:
    """Lift the stop of `branch`: list each of its tampering runs not cleared yet in runs/CLEARED_FILE
    (written atomically). Returns the rows cleared ([] when the branch was not stopped)."""
    data = {}
    try:
        data = json.loads((runs_dir / CLEARED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    if not isinstance(data, dict):
        data = {}
    done = set(_cleared(runs_dir).get(branch, []))
    new = [r for r in rows if r.branch == branch and is_tampering(r) and r.run not in done]
    if not new:
        return []
    at = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    entries = [e for e in data.get(branch, []) if isinstance(e, dict)] if isinstance(data.get(branch), list) else []
    data[branch] = entries + [{"run": r.run, "cleared_at": at} for r in new]
    runs_dir.mkdir(exist_ok=True)
    tmp = runs_dir / (CLEARED_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, runs_dir / CLEARED_FILE)
    return new
