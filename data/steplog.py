"""The lines a trainer prints that the loop reads (locked): one step line per training step, and one
`FAIL:` line when a run cannot go on. Trainers print them through `prepare.log_step` and `prepare.fail`;
the loop's loss curve and early abort (research/decisions.py), its clock (research/clock.py) and the live
page (reporting/live.py) read them with the patterns below, so the format lives in one place and an edit
to a trainer's own prints cannot turn early abort off or blank the page.

A step line: `step 00042 (13.5%) | loss: 4.123456 | lrm: 1.00 | dt: 118ms | tok/sec: 17,453 | mfu: n/a |
epoch: 1 | remaining: 52s`. In a terminal the line redraws itself (a carriage return before it, no
newline); in a log every step has its own line.
"""

from __future__ import annotations

import re
import sys

__all__ = ["STEP_LINE", "STEP_PREFIX", "TOK_S", "REMAINING", "FAIL_PREFIX", "format_step", "log_step", "fail"]

# step number, percent of the budget, loss (the smoothed training loss)
STEP_LINE = re.compile(rb"step\s+(\d{1,9})\s+\(\s*(\d{1,3}(?:\.\d+)?)%\)\s*\|\s*loss:\s*([0-9]+(?:\.[0-9]+)?(?:[eE][-+]?\d+)?)")
STEP_PREFIX = re.compile(rb"step\s+\d{1,9}\s+\(\s*\d{1,3}(?:\.\d+)?%\)\s*\|\s*loss:")  # any step line, whatever follows
TOK_S = re.compile(rb"tok/sec:\s*([0-9][0-9,]{0,15})")
REMAINING = re.compile(rb"remaining:\s*([0-9]{1,9}(?:\.[0-9]+)?)\s*s")
FAIL_PREFIX = "FAIL: "


def format_step(step: int, progress: float, loss: float, *, lrm: float | None = None, dt: float | None = None,
                tok_per_sec: float | None = None, mfu: float | None = None, epoch: int | None = None,
                remaining: float | None = None) -> str:
    """One step line (no carriage return, no newline): `progress` is the fraction of the time budget used,
    `loss` the training loss to show (the trainers show an exponential moving average), `dt` seconds."""
    parts = [f"step {step:05d} ({100 * progress:.1f}%)", f"loss: {loss:.6f}"]
    if lrm is not None:
        parts.append(f"lrm: {lrm:.2f}")
    if dt is not None:
        parts.append(f"dt: {dt * 1000:.0f}ms")
    if tok_per_sec is not None:
        parts.append(f"tok/sec: {int(tok_per_sec):,}")
    parts.append(f"mfu: {mfu:.1f}%" if mfu is not None else "mfu: n/a")
    if epoch is not None:
        parts.append(f"epoch: {epoch}")
    if remaining is not None:
        parts.append(f"remaining: {remaining:.0f}s")
    return " | ".join(parts)


def log_step(step: int, progress: float, loss: float, **more) -> None:
    """Print one step line (see `format_step` for the fields): redrawn in place in a terminal, one line
    per step in a log."""
    line = format_step(step, progress, loss, **more)
    if sys.stdout.isatty():
        print(f"\r{line}    ", end="", flush=True)
    else:
        print(line, flush=True)


def fail(message: str) -> None:
    """End the run now with one `FAIL:` line (the loop records it as the crash's reason)."""
    print(f"\n{FAIL_PREFIX}{message}", flush=True)
    sys.exit(1)
