"""The training clock a trainer uses (locked; re-exported by prepare.py).

The protocol's time budget counts training seconds; under the loop a run also has a wall-clock
deadline (from its start to its hand-over, timed by the loop from outside: a later hand-over is
rejected), given in AUTORESEARCH_DEADLINE (written by research/clock.py). TrainingClock ends
training early enough to make it.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["DEADLINE_ENV", "TrainingClock"]

DEADLINE_ENV = "AUTORESEARCH_DEADLINE"  # set by the loop (research/clock.py): JSON with the deadline and reserve
_MAX_RESERVE_SCALE = 3.0  # a slow start or slow steps grow the hand-over reserve by at most this factor: by how
_RECENT_STEPS = 8  # many times later than the baselines' its first step came, or longer its recent steps take


class TrainingClock:
    """How many counted training seconds this run may reach: the protocol's time budget, or less when the
    loop's deadline comes first. Made right before the first step; asked again after every step:

        clock = prepare.TrainingClock(protocol)
        budget = clock.budget()
        ... each step: total_training_time += dt (counted steps); budget = clock.budget(total_training_time, dt)
        ... stop once a counted step brings total_training_time to budget

    Run by hand (no deadline) the budget is the protocol's. Under the loop it is at most the training so far
    plus the wall time left before the deadline, less one more step (as long as the longest of the last
    few: on a busy machine steps vary) and less the reserve the hand-over needs (what the branch's baselines
    took from their last step to their end, grown when this run reached its first step later than they did
    or its recent steps take longer than theirs: a busier machine or a bigger model hands over more slowly
    too), and never below a millisecond (the schedule divides by it). A run whose set-up took longer than
    the baselines' therefore trains less instead of handing over past its deadline."""

    def __init__(self, protocol) -> None:
        self.time_budget = float(protocol.time_budget)
        self.deadline = self.started = self.reserve = self.first_step = self.step = None
        self.scale = 1.0  # the reserve's growth for a first step later than the baselines' (at least 1)
        self._first = True
        self._recent: list[float] = []  # the last few steps' seconds (the first, with its compile, left out)
        try:
            spec = json.loads(os.environ.get(DEADLINE_ENV) or "null")
            if isinstance(spec, dict):
                self.deadline = float(spec["deadline"])
                self.started = float(spec.get("started", time.time()))
                self.reserve = float(spec["reserve_s"]) if spec.get("reserve_s") is not None else None
                self.first_step = float(spec["first_step_s"]) if spec.get("first_step_s") else None
                self.step = float(spec["step_s"]) if spec.get("step_s") else None
        except (ValueError, TypeError, KeyError):
            self.deadline = None  # unreadable: run to the protocol's budget (the loop still times the run)
        if self.deadline is not None and self.reserve is None:  # nothing measured yet: a quarter of the slack
            self.reserve = max(0.5, 0.25 * (self.deadline - self.started - self.time_budget))

    def budget(self, trained: float = 0.0, step_seconds: float = 0.0) -> float:
        """Counted training seconds this run may reach, given `trained` so far and the last step's wall time."""
        if self.deadline is None:
            return self.time_budget
        now = time.time()
        if step_seconds > 0 and self._first:  # the first step is done: compare with the baselines' first step
            self._first = False
            if self.first_step:  # how many times later
                self.scale = min(_MAX_RESERVE_SCALE, max(1.0, (now - self.started) / self.first_step))
        elif step_seconds > 0:
            self._recent = [*self._recent[1 - _RECENT_STEPS:], step_seconds]
        scale = self.scale
        if self.step and self._recent:  # how many times slower than the baselines' steps
            scale = min(_MAX_RESERVE_SCALE, max(scale, sorted(self._recent)[len(self._recent) // 2] / self.step))
        next_step = max([step_seconds, *self._recent])  # the longest recent step: on a busy machine steps vary
        left = self.deadline - now - self.reserve * scale - next_step
        return max(1e-3, min(self.time_budget, trained + left))
