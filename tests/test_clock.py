"""The wall-time rule (research/clock.py) and the training contract that keeps honest runs inside it
(prepare.TrainingClock).

The rule: every run but a baseline may take, from its start to its hand-over, the median of the branch's
baselines plus a small margin; the loop tells it that deadline, and the trainers' training loop ends early
enough for its hand-over to make it. The unit tests check the rule's numbers and the contract's; the slow
ones run the real train_cuda.py through `loop.py` on the tiny protocol (a 3 s budget, two baselines, then
the unchanged trainer three times, a change that adds seconds of set-up, and a trainer that trains until the
limit of the rule this project had before, reading its start time from /proc/self/stat), with the margin
the loop measures (about 3 min on a quiet 2-core machine; bench/bench_clock.py plays the same at length).

Run: uv run pytest tests/test_clock.py   (add `-m slow` for the end-to-end runs)
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import assert_clean, git, loop_env, make_repo, read_rows, run_loop, write_script

import prepare
from research import clock
from research.results import Row

BUDGET = 3.0


def _baseline(wall: float, tail: float | None = 1.0, first: float | None = 4.0, status: str = "keep") -> Row:
    return Row("abc1234", 2.5 if status == "keep" else 0.0, 0.0, status, "baseline", wall_seconds=wall, tail_s=tail,
               first_step_s=first, note="baseline 1/1")


def test_the_limit_is_the_baselines_median_plus_a_margin_from_their_spread():
    walls = [14.0, 14.07, 13.93, 14.2, 14.0]
    rule = clock.rule_from_baselines([_baseline(w) for w in walls], 8.0)
    sd = 1.4826 * 0.07  # the median absolute deviation from the median (14.0), as a normal sigma
    assert rule.spread == pytest.approx(sd) and rule.margin == pytest.approx(3 * sd)
    assert rule.limit == pytest.approx(14.0 + 3 * sd) and rule.baselines == 5
    # the rule this project had before allowed 1.5 x 6.2 s + 10 s past the budget: 19.3 s of room
    old_limit = 8.0 + 1.5 * (14.2 - 8.0) + 10.0
    assert old_limit - rule.limit > 10 and rule.limit - 14.0 <= 0.05 * 8.0
    cold = clock.rule_from_baselines([_baseline(w) for w in [19.0, *walls[1:]]], 8.0)  # a cold first start
    assert cold.limit < 14.5  # far from the cold 19 s: the slowest baseline does not set the limit
    one = clock.rule_from_baselines([_baseline(14.0)], 8.0)
    assert one.margin == clock.MIN_MARGIN_S and one.limit == pytest.approx(14.25) and one.spread is None
    noisy = clock.rule_from_baselines([_baseline(w) for w in (10.0, 20.0)], 8.0)
    assert noisy.margin == pytest.approx(clock.MAX_MARGIN_FRACTION * 8.0) == 0.4  # capped at 5% of the budget
    assert clock.rule_from_baselines([_baseline(w) for w in (10.0, 20.0)], 2.0).margin == clock.MIN_MARGIN_S
    assert "more than the margin allows" in noisy.describe()  # the loop says that honest runs may be rejected
    assert "more than the margin allows" not in rule.describe()
    assert clock.rule_from_baselines([_baseline(30.0, status="crash")], 8.0) is None  # nothing measured yet
    assert clock.rule_from_baselines([_baseline(14.0)], 8.0, margin=2.0).limit == 16.0  # --wall-margin
    tails = clock.rule_from_baselines([_baseline(14.0, tail=t) for t in (1.0, 1.2, 5.0)], 8.0)
    assert tails.reserve == pytest.approx(clock.RESERVE_FACTOR * 1.2 + clock.RESERVE_EXTRA_S)  # the median tail
    timed = [_baseline(14.0, tail=1.0, first=4.0) for _ in range(2)]
    for r, n in zip(timed, (91, 46), strict=True):
        r.num_steps = n  # 9 s from the first step line to the last: 0.1 s and 0.2 s per step
    assert clock.rule_from_baselines(timed, 8.0).step == pytest.approx(0.15)
    assert tails.step is None  # no step count: nothing to compare a run's steps with
    fixed = clock.fixed_rule(8.0, 5.0, [_baseline(14.0)])
    assert fixed.limit == 13.0 and fixed.reserve == rule.reserve and "--startup-allowance" in fixed.describe()


def test_the_training_clock_ends_training_before_the_deadline(monkeypatch):
    p = SimpleNamespace(time_budget=8.0)
    monkeypatch.delenv(prepare.DEADLINE_ENV, raising=False)
    assert prepare.TrainingClock(p).budget(3.0, 0.1) == 8.0  # run by hand: the protocol's budget
    now = time.time()

    def told(deadline_in: float, started_ago: float = 5.0, **extra) -> prepare.TrainingClock:
        rule = clock.WallRule(budget=8.0, limit=started_ago + deadline_in, margin=0.3, **extra)
        monkeypatch.setenv(prepare.DEADLINE_ENV, clock.deadline_env(rule, now - started_ago)[prepare.DEADLINE_ENV])
        return prepare.TrainingClock(p)

    assert told(60.0, reserve=1.0).budget(0.0) == 8.0  # far off: the budget
    c = told(6.0, reserve=1.0)
    assert c.budget(0.0) == pytest.approx(5.0, abs=0.05)  # 6 s left, 1 s kept for the hand-over
    assert c.budget(2.0, 0.5) == pytest.approx(2.0 + 6.0 - 1.0 - 0.5, abs=0.05)  # and one more step
    assert told(0.5, reserve=1.0).budget(2.0, 0.1) < 2.0  # no room for another step: stop now
    assert told(-5.0, reserve=1.0).budget(0.0) == 1e-3  # never zero (the schedule divides by it)
    slow = told(6.0, started_ago=8.0, reserve=1.0, first_step=4.0)  # its first step came twice as late
    assert slow.budget(0.5, 0.2) == pytest.approx(0.5 + 6.0 - 2.0 - 0.2, abs=0.05)
    assert slow.scale == pytest.approx(2.0, abs=0.01)  # twice as late: twice the reserve
    assert told(6.0, started_ago=3.6, reserve=1.0, first_step=4.0).budget(0.5, 0.2) == \
        pytest.approx(0.5 + 6.0 - 1.0 - 0.2, abs=0.05)  # earlier than the baselines: the reserve as measured
    steps = told(6.0, started_ago=4.0, reserve=1.0, first_step=4.0, step=0.1)  # on time, then slower steps
    assert steps.budget(0.0, 0.3) == pytest.approx(6.0 - 1.0 - 0.3, abs=0.05)  # the first step (compile) is not read
    for _ in range(3):
        steps.budget(0.5, 0.15)
    assert steps.budget(0.5, 0.15) == pytest.approx(0.5 + 6.0 - 1.5 - 0.15, abs=0.05)  # 1.5 x slower: 1.5 x reserve
    fast = told(6.0, started_ago=4.0, reserve=1.0, first_step=4.0, step=0.1)
    fast.budget(0.0, 0.3)
    assert fast.budget(0.5, 0.05) == pytest.approx(0.5 + 6.0 - 1.0 - 0.05, abs=0.05)  # faster steps: never less
    unmeasured = told(20.0)  # no baseline printed a step line: a quarter of the room past the budget
    assert unmeasured.reserve == pytest.approx(0.25 * (25.0 - 8.0), abs=0.01)
    monkeypatch.setenv(prepare.DEADLINE_ENV, "not json")
    assert prepare.TrainingClock(p).budget(1.0, 0.1) == 8.0


def test_the_step_watch_times_the_first_and_last_step_lines():
    seen = []
    w = clock.StepWatch(seen.append)
    t0 = time.time()
    w.feed(b"Time budget: 3s\nstep 00000 (0.0%) | loss: 7.1 | dt: 5ms\n")
    first = w.first
    time.sleep(0.05)
    w.feed(b"step 00001 (3.1%) | lo")
    w.feed(b"ss: 7.0 | dt: 5ms\nstep 00002 (6.0%) | loss: 6.9\nhanded over to the harness: model.pt2\n")
    assert len(seen) == 3 and first is not None and w.last > first
    start, tail = w.times(t0 - 1.0, w.last + 0.5)
    assert start == pytest.approx(first - t0 + 1.0) and tail == pytest.approx(0.5)
    assert clock.StepWatch().times(0.0, 1.0) == (None, None)


# ------------------------------------------------------------------------------------------------
# end to end: the real trainer under loop.py, with the margin the loop measures (slow)
# ------------------------------------------------------------------------------------------------

OLD_RULE_ATTACK = r'''

def hostile_budget(trained, dt, protocol):
    """Train until the limit of the loop's old rule, reading this process's own start from /proc."""
    import os

    fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
    start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return trained + (start + protocol.time_budget + OLD_ALLOWANCE - 5.0 - time.time() - dt)
'''
STEP = "        budget = clock.budget(total_training_time, dt)\n"
MAIN = "\n\ndef main():\n"
SETUP = "    clock = prepare.TrainingClock(protocol)"


@pytest.fixture(scope="module")
def lab(tiny_cache_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A repository with the real trainer on branch autoresearch/clock and two baselines at a 3 s budget;
    `try_(text, description)` runs one experiment on that trainer text and returns its row."""
    root = tmp_path_factory.mktemp("clock")
    repo = make_repo(root, trainer=None)
    git(repo, "checkout", "-q", "-b", "autoresearch/clock")
    env = loop_env(tiny_cache_root, budget=BUDGET, AUTORESEARCH_WALL_MARGIN="")  # the measured margin
    proc = run_loop(repo, "run", "--agent", "scripted", "--script", write_script(root, []), "--tag", "clock",
                    "--baseline-runs", "2", "--max-experiments", "0", env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "wall-time rule: a hand-over later than" in proc.stdout
    text = (repo / "train_cuda.py").read_text()

    def try_(trainer: str, description: str) -> Row:
        (repo / "train_cuda.py").write_text(trainer)
        before = len(read_rows(repo))
        proc = run_loop(repo, "try", description, "--no-confirm", "--no-early-abort", "--remeasure-every", "0",
                        env=env, timeout=600)
        rows = [r for r in read_rows(repo)[before:] if r.status != "rerun"]
        git(repo, "checkout", "-q", "--", ".")
        assert rows, proc.stdout[-3000:] + proc.stderr[-3000:]
        return rows[-1]

    return SimpleNamespace(repo=repo, text=text, try_=try_, baselines=[r for r in read_rows(repo) if r.ok])


def _described(row: Row) -> str:
    return (f"{row.status}: wall {row.wall_seconds} limit {row.wall_limit_s} trained {row.training_seconds} "
            f"steps {row.num_steps}; {row.note}")


def _step_times(repo: Path, run: int) -> list[float]:
    """The seconds of each training step an honest run printed (its `dt:` field), in order."""
    log = (repo / "runs" / str(run) / "log.txt").read_text(errors="replace")
    return [float(m) / 1000 for m in re.findall(r"^step \d+ .*?\| dt: (\d+)ms", log, re.MULTILINE)]


def _host_made_it_late(lab, row: Row, rule: clock.WallRule, first_step_s: float | None = None) -> str | None:
    """Why an honest run that handed over late was late through no fault of its own, or None: its first step
    came over half a second later than `first_step_s` (when given: what its set-up should take here now), so
    set-up alone ate the room; a step of it stalled (over 4x the baselines' median step: another program had
    the cores); or its hand-over took longer than the reserve its deadline kept for it (grown by its late
    start, as prepare.TrainingClock grows it). Its training loop obeyed the deadline in each case; a trainer
    that ignored it has none of them."""
    if first_step_s is not None and row.first_step_s and row.first_step_s > first_step_s + 0.5:
        return f"its first step came at {row.first_step_s:.2f} s, not at about {first_step_s:.2f} s"
    base = statistics.median(t for r in lab.baselines for t in _step_times(lab.repo, r.run)[1:])
    stalled = [t for t in _step_times(lab.repo, row.run)[1:] if t > 4 * base]
    if stalled:
        return f"a step stalled for {max(stalled):.2f} s (the baselines' median step: {base:.2f} s)"
    scale = max(1.0, row.first_step_s / rule.first_step)
    if row.tail_s > rule.reserve * scale:
        return f"its hand-over took {row.tail_s:.2f} s, past the {rule.reserve * scale:.2f} s kept for it"
    return None


@pytest.mark.slow
def test_honest_runs_of_the_unchanged_trainer_are_never_rejected(lab):
    """Never rejected, unless the host (not the trainer) made it late: a set-up slower than the baselines', a
    stalled step or a slow hand-over, which no deadline foresees (on a 2-core machine a second busy program is
    enough at this 3 s budget)."""
    walls = [r.wall_seconds for r in lab.baselines]
    rule = clock.rule_from_baselines(lab.baselines, BUDGET)
    assert len(walls) == 2 and all(r.first_step_s and r.tail_s for r in lab.baselines)  # timed from outside
    for k in range(3):
        row = lab.try_(lab.text + f"# unchanged, repeat {k + 1}\n", f"unchanged trainer, repeat {k + 1}")
        assert row.wall_ratio == pytest.approx(row.wall_seconds / BUDGET, abs=0.01)
        _honest(lab, row, rule, f"repeat {k + 1}", rule.first_step)  # set up as the baselines were


def _honest(lab, row: Row, rule: clock.WallRule, what: str, first_step_s: float | None = None) -> bool:
    """An honest run's row: kept or discarded within its limit (True), or rejected as overtime when the host
    made it late (False, said why); anything else fails the test."""
    assert row.wall_limit_s == pytest.approx(rule.limit, abs=0.01)
    if row.status == "rejected":
        excuse = _host_made_it_late(lab, row, rule, first_step_s)
        assert "overtime" in row.note and excuse, _described(row)
        print(f"{what} rejected on a busy host: {excuse}")
        return False
    assert row.status in ("keep", "discard") and row.wall_seconds <= row.wall_limit_s, _described(row)
    return True


@pytest.mark.slow
def test_a_change_that_adds_set_up_trains_less_instead_of_being_rejected(lab):
    """A set-up longer by the room the limit leaves past the unchanged trainer's wall time now, plus half the
    budget: its deadline lets it train about half the budget, and it hands over in time."""
    rule = clock.rule_from_baselines(lab.baselines, BUDGET)
    now = lab.try_(lab.text + "# unchanged, to time it\n", "unchanged trainer, timed")
    _honest(lab, now, rule, "the unchanged trainer", rule.first_step)
    extra = max(0.0, now.wall_limit_s - min(now.wall_seconds, now.wall_limit_s)) + BUDGET / 2
    slow = lab.text.replace(SETUP, f"    time.sleep({extra:.2f})  # a slower set-up\n" + SETUP, 1)
    row = lab.try_(slow, f"{extra:.1f} s more set-up")
    if _honest(lab, row, rule, "the slower set-up", now.first_step_s + extra if now.first_step_s else None):
        assert row.training_seconds < BUDGET - 0.5, _described(row)


@pytest.mark.slow
def test_training_until_the_old_rule_s_limit_is_rejected(lab):
    """The attack that got 14-15 s of training on an 8 s budget: it reads its own start from /proc/self/stat
    and trains until 5 s before budget + the old allowance (1.5 x the slowest baseline's seconds past the
    budget + 10 s). It is rejected, or it gained at most 5% of the budget."""
    old_allowance = 1.5 * max(0.0, max(r.wall_seconds for r in lab.baselines) - BUDGET) + 10.0
    assert STEP in lab.text and MAIN in lab.text
    text = lab.text.replace(STEP, "        budget = hostile_budget(total_training_time, dt, protocol)\n", 1)
    text = text.replace(MAIN, f"\nOLD_ALLOWANCE = {old_allowance!r}\n" + OLD_RULE_ATTACK + MAIN, 1)
    row = lab.try_(text, "train until the old limit")
    honest = max(r.training_seconds for r in lab.baselines)
    if row.status == "rejected":
        assert "overtime" in row.note and row.val_bpb == 0.0, _described(row)
    else:
        assert row.training_seconds - honest <= 0.05 * BUDGET, _described(row)
    record = json.loads((lab.repo / "runs" / str(row.run) / "result.json").read_text()) \
        if (lab.repo / "runs" / str(row.run) / "result.json").exists() else None
    assert record is None or record["trainer"]["wall_limit_s"] == row.wall_limit_s
    assert_clean(lab.repo)
