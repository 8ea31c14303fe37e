"""The clock a run is held to: how long a trainer may take from its start to its hand-over, timed by the
loop from outside, and the deadline an honest trainer is told so that it never runs past it.

The branch's baseline runs of the unchanged trainer set the rule (`rule_from_baselines`): every later
run may take the baselines' median wall time plus a margin of SPREAD_FACTOR times their spread (a robust
standard deviation: 1.4826 x the median absolute deviation, so one cold start among them moves nothing),
at least MIN_MARGIN_S and at most MAX_MARGIN_FRACTION of the budget (or MIN_MARGIN_S, if more). A
hand-over later than that is rejected (overtime); on a noisy machine the cap means that honest runs
slower than that are shortened by their deadline (below), not rejected. Baselines are never held to it:
they are what it is measured on. Before the first baseline nothing is measured, so a run is only killed
at the kill limit (the session's `timeout_s`: 2 x budget + --timeout-margin).

A trainer that trains longer than the budget can therefore gain at most the margin, plus however much
faster than the baselines' median its own start and hand-over are, plus whatever honest overhead
(start-up, warm-up, export) it manages to skip. An honest change that adds set-up time (a bigger model,
a compile) is not rejected: the loop tells every run its deadline (DEADLINE_ENV: the absolute time of
the limit, when the run started, how long the baselines took, in the median, from their last training
step to their end and from their start to their first step, and their seconds per step), and the training
contract the trainers use (`prepare.TrainingClock`, data/clock.py) ends training early enough for the
hand-over to make it, with the reserve grown when this run reached its first step later than the
baselines did or its steps take longer than theirs (a busier machine, a bigger model: both
make the hand-over slower too).

The limit does not move with the loop's gauge of the machine's speed (research/gauge.py): on a shared
machine the gauge read the machine 2x faster than for the baselines while the trainer ran 15% faster
(a limit shrunk by it cut 8 of 10 honest runs and rejected one), and 1.6x slower while the trainer ran
as fast as ever (a limit grown by it gave a trainer 29% of the budget more). So the bound below holds on
a host that is as quiet for the later runs as for the baselines: baselines measured under more load
leave that much room to a trainer running without it, and a machine that got busier shortens honest
runs (through their deadline) rather than rejecting them.

`StepWatch` is how the loop times the baselines' first and last training steps from outside: it sees the
trainer's `step N (P%) | loss: L` lines as they arrive on the output pipe.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass

from data.clock import DEADLINE_ENV  # prepare.TrainingClock reads it
from data.steplog import STEP_PREFIX

__all__ = ["DEADLINE_ENV", "MIN_MARGIN_S", "MAX_MARGIN_FRACTION", "SPREAD_FACTOR", "RESERVE_FACTOR",
           "RESERVE_EXTRA_S", "WallRule", "StepWatch", "spread_of", "margin_for", "rule_from_baselines", "fixed_rule",
           "deadline_env"]

MIN_MARGIN_S = 0.25  # the margin past the baselines' median wall time, at least (timer and process-exit jitter)
SPREAD_FACTOR = 3.0  # ... else this many (robust) standard deviations of their wall times
MAX_MARGIN_FRACTION = 0.05  # ... and at most this fraction of the budget (or MIN_MARGIN_S), however noisy
RESERVE_FACTOR = 1.2  # the reserve an honest trainer keeps for its hand-over: 1.2 x the baselines' median
RESERVE_EXTRA_S = 0.1  # ... time from their last step to their end, plus 0.1 s


@dataclass(frozen=True)
class WallRule:
    """The wall-time rule of one branch: a run handing over later than `limit` seconds after its start
    is rejected (overtime)."""

    budget: float
    limit: float  # seconds from the trainer's start to its hand-over (its process ending)
    margin: float  # limit - the baselines' median wall time (fixed rule: limit - budget)
    reserve: float | None = None  # seconds an honest trainer keeps for its hand-over; None: none measured
    first_step: float | None = None  # the baselines' median seconds from their start to their first step line
    step: float | None = None  # the baselines' median seconds per step, from their first to their last step line
    baselines: int = 0  # how many baselines it is measured on (0: fixed by --startup-allowance)
    spread: float | None = None  # the baselines' robust standard deviation of wall time (two or more)

    @property
    def allowance(self) -> float:
        """Seconds past the budget a hand-over may take."""
        return self.limit - self.budget

    def describe(self) -> str:
        if not self.baselines:
            return f"a hand-over later than {self.limit:.1f} s after start (budget + {self.allowance:.1f} s, set " \
                   f"by --startup-allowance) is rejected (overtime)"
        spread = f", spread {self.spread:.2f} s" if self.spread is not None else ""
        text = (f"a hand-over later than {self.limit:.1f} s after start (the median of {self.baselines} baseline"
                f"{'s' if self.baselines != 1 else ''} + {self.margin:.2f} s margin{spread}) is rejected "
                f"(overtime); each run is told its deadline and trains less rather than run past it")
        if self.spread is not None and SPREAD_FACTOR * self.spread > self.margin + 1e-9:
            text += (f". The baselines' wall times spread more than the margin allows (it is capped at "
                     f"{100 * MAX_MARGIN_FRACTION:.0f}% of the budget): on a machine this noisy an honest run can "
                     "be rejected as overtime; a quieter machine, a longer budget or --wall-margin S avoids it")
        return text


def spread_of(walls: list[float]) -> float | None:
    """A standard deviation that one outlier does not move: 1.4826 x the median absolute deviation from
    the median (the normal distribution's sigma); None for fewer than two walls."""
    if len(walls) < 2:
        return None
    mid = statistics.median(walls)
    return 1.4826 * statistics.median(abs(w - mid) for w in walls)


def margin_for(walls: list[float], budget: float) -> float:
    """Seconds past the baselines' median a run may take: SPREAD_FACTOR x their spread (one baseline: none),
    at least MIN_MARGIN_S, at most MAX_MARGIN_FRACTION x budget (when that is more than MIN_MARGIN_S)."""
    spread = spread_of(walls) or 0.0
    return min(max(MIN_MARGIN_S, SPREAD_FACTOR * spread), max(MIN_MARGIN_S, MAX_MARGIN_FRACTION * budget))


def _step_seconds(row) -> float | None:
    """Seconds per step of a baseline, timed from outside: from its first step line to its last, over its
    steps less one (the step count is the trainer's word; a wrong one only misleads the honest reserve)."""
    first, tail, wall = (getattr(row, n, None) for n in ("first_step_s", "tail_s", "wall_seconds"))
    steps = getattr(row, "num_steps", None)
    if None in (first, tail, wall) or not steps or steps < 2:
        return None
    span = wall - first - tail
    return span / (steps - 1) if span > 0 else None


def _reserve(rows) -> tuple[float | None, float | None, float | None]:
    tails = [r.tail_s for r in rows if getattr(r, "tail_s", None) is not None]
    firsts = [r.first_step_s for r in rows if getattr(r, "first_step_s", None) is not None]
    steps = [t for t in map(_step_seconds, rows) if t is not None]
    reserve = RESERVE_FACTOR * statistics.median(tails) + RESERVE_EXTRA_S if tails else None
    return reserve, (statistics.median(firsts) if firsts else None), (statistics.median(steps) if steps else None)


def rule_from_baselines(baselines, budget: float, margin: float | None = None) -> WallRule | None:
    """The rule measured on a branch's baseline rows (those that measured; None when none has): their median
    wall time plus `margin` (default `margin_for` their walls)."""
    good = [r for r in baselines if r.ok and r.wall_seconds is not None]
    if not good:
        return None
    walls = [r.wall_seconds for r in good]
    m = margin_for(walls, budget) if margin is None else margin
    reserve, first, step = _reserve(good)
    return WallRule(budget=budget, limit=statistics.median(walls) + m, margin=m, reserve=reserve, first_step=first,
                    step=step, baselines=len(good), spread=spread_of(walls))


def fixed_rule(budget: float, allowance: float, baselines=()) -> WallRule:
    """--startup-allowance S: the limit is budget + S whatever the baselines took (their hand-over time
    still gives the reserve)."""
    reserve, first, step = _reserve([r for r in baselines if r.ok])
    return WallRule(budget=budget, limit=budget + allowance, margin=allowance, reserve=reserve, first_step=first,
                    step=step)


def deadline_env(rule: WallRule | None, started: float) -> dict[str, str]:
    """The trainer's environment entry telling it its deadline (prepare.TrainingClock reads it); `started`
    is time.time() taken before the trainer is spawned, so the deadline is never later than the limit."""
    if rule is None:
        return {}
    clock = {"deadline": round(started + rule.limit, 3), "started": round(started, 3), "budget": rule.budget}
    if rule.reserve is not None:
        clock["reserve_s"] = round(rule.reserve, 3)
    if rule.first_step is not None:
        clock["first_step_s"] = round(rule.first_step, 3)
    if rule.step is not None:
        clock["step_s"] = round(rule.step, 4)
    return {DEADLINE_ENV: json.dumps(clock, separators=(",", ":"))}


class StepWatch:
    """When the trainer's first and last `step N (P%) | loss:` lines arrived (time.time()), from its
    output as it comes (`feed`, on the pipe reader's thread). A line cut between two chunks is seen in
    the next one, or not at all: the times are for the honest trainer's reserve, never a decision."""

    def __init__(self, inner=None) -> None:
        self.inner = inner
        self.first: float | None = None
        self.last: float | None = None
        self._tail = b""
        self._lock = threading.Lock()

    def feed(self, chunk: bytes) -> None:
        if self.inner is not None:
            self.inner(chunk)
        now = time.time()
        with self._lock:
            if STEP_PREFIX.search(self._tail + chunk):  # any step line prepare.log_step prints
                if self.first is None:
                    self.first = now
                self.last = now
            self._tail = chunk[-64:]

    def times(self, started: float, ended: float) -> tuple[float | None, float | None]:
        """(seconds from `started` to the first step line, seconds from the last step line to `ended`)."""
        with self._lock:
            first, last = self.first, self.last
        return (None if first is None else max(0.0, first - started),
                None if last is None else max(0.0, ended - last))
