"""The keep rule's speed covariate (research/noise.py): the machine's slowness by the loop's gauge, taken out
of val_bpb by a within-group regression, with the slope's uncertainty carried into the test.

In-process, on simulated branches whose runs' val_bpb moves with the machine's load, read by a gauge that
itself has some measurement noise: the false-keep rate of identical trainers stays at alpha, a real gain is
kept far more often than without the adjustment, and the adjustment is made only when the data support it.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from research import results as R
from research.experiment import decide
from research.ledger import BASELINE, replay
from research.noise import pooled_noise, t_ppf
from research.session import Settings

ALPHA = Settings.alpha
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SLOPE = 0.2  # val_bpb per unit of log slowness: a machine 10% slower scores ~0.019 worse


def test_the_fit_takes_out_what_the_gauge_explains():
    rng = random.Random(1)
    groups = {}
    for g, base in (("a", 2.5), ("b", 2.4)):
        runs = []
        for _ in range(4):
            c = math.log(0.1) + rng.uniform(0.0, 0.5)
            runs.append((base + SLOPE * c + rng.gauss(0, 0.002), 300, c))
        groups[g] = runs
    n = pooled_noise(groups, min_noise=0.0005)
    raw = n.unadjusted()
    assert n.speed is not None and n.speed.slope == pytest.approx(SLOPE, rel=0.1)
    assert n.df == raw.df - 1 == 5 and n.sigma < raw.sigma / 5 and n.speed.share > 0.9
    assert "adjusted for the machine's speed" in n.describe() and f"σ {raw.sigma:.6f} unadjusted" in n.describe()


def test_no_adjustment_without_support():
    # the gauge explains nothing (the slope is not significant) ...
    flat = {"a": [(2.50, 300, 0.0), (2.52, 300, 0.1), (2.49, 300, 0.2), (2.51, 300, 0.3)]}
    assert pooled_noise(flat, 0.0005).speed is None
    # ... a faster machine scoring worse is not the load (a negative slope is never used) ...
    backwards = {"a": [(2.50, 300, 0.0), (2.52, 300, -0.1), (2.54, 300, -0.2), (2.56, 300, -0.3)]}
    assert pooled_noise(backwards, 0.0005).speed is None
    # ... a run without readings in the groups, or too few degrees of freedom left
    mixed = {"a": [(2.50, 300, 0.0), (2.52, 300, 0.1), (2.54, 300, None), (2.56, 300, 0.3)]}
    assert pooled_noise(mixed, 0.0005).speed is None
    three = {"a": [(2.50, 300, 0.0), (2.52, 300, 0.1), (2.54, 300, 0.2)]}
    assert pooled_noise(three, 0.0005).speed is None


def test_a_run_on_a_slower_machine_is_judged_at_its_speed():
    groups = {"base": [(2.50 + SLOPE * c, 300, c) for c in (0.0, 0.1, 0.2, 0.3, 0.05, 0.25)]}
    groups["base"] = [(v + e, s, c) for (v, s, c), e in zip(groups["base"], (0.001, -0.001, 0.0, 0.001, -0.001, 0.0))]
    noise = pooled_noise(groups, 0.0005)
    best = [v for v, _, _ in groups["base"]]
    speeds = [c for _, _, c in groups["base"]]
    # 0.5 slower (by the gauge's log) than the best's mean: raw, it looks 0.08 worse; at its speed it gains 0.02
    cand = 2.50 + SLOPE * 0.65 - 0.02
    v = decide([cand], best, noise, ALPHA, None, [0.65], speeds)
    assert v.status == "keep" and v.delta == pytest.approx(-0.02, abs=0.003)
    assert "adjusted for the machine's speed (raw +0.0" in v.note and "at this speed" in v.note
    # the same run without a gauge reading: compared raw, against the unadjusted noise
    raw = decide([cand], best, noise, ALPHA, None, [None], speeds)
    assert raw.status == "discard" and "adjusted" not in raw.note and raw.delta > 0
    # far from every speed the best ran at, the slope's uncertainty widens the test
    near = decide([2.50 + SLOPE * 0.15 - 0.004], best, noise, ALPHA, None, [0.15], speeds)
    far = decide([2.50 + SLOPE * 3.0 - 0.004], best, noise, ALPHA, None, [3.0], speeds)
    assert far.needed > 2 * near.needed


# ------------------------------------------------------------------------------------------------
# simulated branches: a machine whose load comes and goes, as the loop's replay and decide see it
# ------------------------------------------------------------------------------------------------


def _run(rng: random.Random, mean: float, eval_sigma: float = 0.003) -> tuple[float, float]:
    """One run: the machine is loaded a third of the time (a third slower, with spread), and val_bpb moves
    with the log of its slowness; the gauge reads that slowness with its own small error."""
    slow = rng.gauss(0.0, 0.03) + (math.log(1.35) if rng.random() < 1 / 3 else 0.0)
    val = mean + SLOPE * slow + rng.gauss(0.0, eval_sigma)
    return val, slow + rng.gauss(0.0, 0.01)


def _row(val: float, c: float, status: str, trainer: str, note: str = "") -> R.Row:
    gauge = math.exp(c)  # seconds of the gauge: its slowness (the log) is c
    return R.Row(commit=trainer[:7], val_bpb=val, memory_gb=0.1, status=status, description=note or trainer,
                 trainer_hash=trainer, num_steps=300, training_seconds=60.0, note=note, branch="b", run=0,
                 budget_s=60.0, gauge_before_s=gauge, gauge_after_s=gauge)


def _decide(rng, mean: float, adjust: bool, baselines: int = 5) -> str:
    """A branch's baselines, then one change through the screen and its confirm run (the best run between
    its two runs), decided as research/experiment.py decides it; `adjust`: with the runs' gauge readings."""
    rows = [_row(*_run(rng, 2.5), "keep", "base", f"{BASELINE} {k}/{baselines}") for k in range(1, baselines + 1)]
    st = replay(rows, Settings.min_noise)
    v1, c1 = _run(rng, mean)
    speeds = (lambda cs: cs) if adjust else (lambda cs: [None] * len(cs))
    verdict = decide([v1], st.best_values, st.noise, ALPHA, Settings.confirm_alpha, speeds([c1]),
                     speeds(st.best_speeds))
    if verdict.status == "keep" or verdict.promising:
        beside = _row(*_run(rng, 2.5), "rerun", "base", "the best, run next to run")
        v2, c2 = _run(rng, mean)
        st = replay(rows + [beside], Settings.min_noise)
        verdict = decide([v1, v2], st.best_values, st.noise, ALPHA, None, speeds([c1, c2]), speeds(st.best_speeds))
    return verdict.status


def test_identical_trainers_are_still_kept_at_most_alpha_of_the_time():
    rng, n = random.Random(7), 1500
    keeps = sum(_decide(rng, 2.5, adjust=True) == "keep" for _ in range(n))
    assert keeps / n <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / n)


def test_a_real_gain_is_kept_far_more_often_with_the_adjustment():
    gain, n = 0.012, 400  # about a fifth of the load's effect, four times the evaluation noise
    with_it = sum(_decide(random.Random(k), 2.5 - gain, adjust=True) == "keep" for k in range(n)) / n
    without = sum(_decide(random.Random(k), 2.5 - gain, adjust=False) == "keep" for k in range(n)) / n
    assert with_it >= 0.6 and with_it >= 2 * without, (with_it, without)


def test_the_smallest_gain_kept_shrinks_with_the_noise_it_takes_out():
    rng = random.Random(3)
    rows = [_row(*_run(rng, 2.5), "keep", "base", f"{BASELINE} {k}/8") for k in range(1, 9)]
    st = replay(rows, Settings.min_noise)
    raw = st.noise.unadjusted()
    assert st.noise.speed is not None  # eight runs, some of them on the loaded machine
    need = t_ppf(1 - ALPHA, st.noise.rule_df) * st.noise.sigma * math.sqrt(1 / 8 + 1 / 2)
    need_raw = t_ppf(1 - ALPHA, raw.rule_df) * raw.sigma * math.sqrt(1 / 8 + 1 / 2)
    assert need < need_raw / 2 and statistics.fmean(st.best_values) > 0


# ------------------------------------------------------------------------------------------------
# what other programs took from the machine while a trainer ran (research/gauge.py LoadMeter)
# ------------------------------------------------------------------------------------------------


def test_the_kernels_counts_are_read_right(tmp_path):
    from research.gauge import _TICK, busy_seconds, tree_seconds

    (tmp_path / "stat").write_text("cpu  100 20 30 5000 7 1 2 3 0 0\ncpu0 50 10 15 2500 3 0 1 1 0 0\n")
    assert busy_seconds(tmp_path) == pytest.approx((100 + 20 + 30 + 1 + 2 + 3) / _TICK)  # idle, iowait left out
    assert busy_seconds(tmp_path / "missing") is None

    def proc(pid: int, name: str, times: tuple[int, int, int, int], children: list[int]) -> None:
        d = tmp_path / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True)
        rest = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0", *map(str, times), "20", "0"]
        (d / "stat").write_text(f"{pid} ({name}) " + " ".join(rest) + "\n")
        (d / "task" / str(pid) / "children").write_text(" ".join(map(str, children)))

    proc(10, "bwrap", (1, 1, 50, 50), [11])  # the leader, with 100 ticks of children it waited for
    proc(11, "py thon) (x", (200, 100, 0, 0), [12])  # a name with spaces and parentheses
    proc(12, "worker", (30, 0, 0, 0), [])
    assert tree_seconds(10, tmp_path) == pytest.approx((2 + 100 + 300 + 30) / _TICK)
    assert tree_seconds(99, tmp_path) == 0.0


@pytest.mark.skipif(not __import__("os").path.exists("/proc/stat"), reason="the kernel's counts are Linux's")
def test_the_load_meter_counts_others_and_not_the_runs_own_tree(monkeypatch, tmp_path):
    """A meter in a process of its own (the loop's place): the same 1.5 s of one busy core counts as the
    run's own when a process it started burns it (an orphan of that child included), and as another
    program's when this test process, which is not its descendant, burns it."""
    import subprocess
    import sys
    import time

    from research.gauge import LOAD_ENV, LoadMeter

    burn = tmp_path / "burn.py"
    burn.write_text("import time\nt = time.time()\nwhile time.time() - t < 1.5:\n    pass\n")
    meter = tmp_path / "meter.py"
    meter.write_text("import subprocess, sys, time\nfrom research.gauge import LoadMeter\n"
                     "from sandbox.confine import become_subreaper\nbecome_subreaper()  # as the loop is\nm = LoadMeter()\n"
                     "if sys.argv[1] == 'own':  # an orphan: its parent shell does not wait for it\n"
                     f"    subprocess.run(['sh', '-c', '({sys.executable} {burn} &) ; true'])\n"
                     "time.sleep(1.6)\nprint(m.stop())\n")

    def reading(mode: str) -> float:
        child = subprocess.Popen([sys.executable, str(meter), mode], stdout=subprocess.PIPE, text=True,
                                 cwd=str(ROOT), env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
        if mode == "other":
            t = time.time()
            while time.time() - t < 1.5:  # this process is not the meter's: another program's load
                pass
        out, _ = child.communicate(timeout=30)
        return float(out.strip())

    own, other = reading("own"), reading("other")
    assert own < 0.4 and other - own > 0.5, (own, other)
    monkeypatch.setenv(LOAD_ENV, "0")
    assert LoadMeter().stop() is None  # turned off


def test_the_ledger_adjusts_for_the_load_others_put_on_the_machine_first():
    """With the cores other programs kept busy recorded for every run, the ledger adjusts for them (what the
    trainer's speed follows) rather than for the gauge, and says so; rows without it fall back to the gauge."""
    rng = random.Random(5)
    rows = []
    for k in range(1, 9):
        others = 1.0 if k % 3 == 0 else 0.0  # a busy process beside every third run
        r = _row(2.3 + 0.8 * others + rng.gauss(0, 0.01), rng.gauss(0, 0.05), "keep", "base", f"{BASELINE} {k}/8")
        r.others_cpu = others + abs(rng.gauss(0, 0.02))
        rows.append(r)
    st = replay(rows, Settings.min_noise)
    assert st.covariate == "load" and st.noise.sigma < 0.03 < st.noise.unadjusted().sigma
    assert "adjusted for the cores other programs kept busy" in st.noise.describe()
    loaded = decide([3.1 - 0.1], st.best_values, st.noise, ALPHA, None, [1.0], st.best_speeds)
    assert loaded.status == "keep" and "cores busy beside it" in loaded.note and "at this load" in loaded.note
    for r in rows[:1]:
        r.others_cpu = None  # a run from before the column: the load cannot be used for this group
    assert replay(rows, Settings.min_noise).covariate in ("gauge", None)


BURNER = '''
import os as _os, time as _time
if _os.fork() == 0:  # a process of its own that outlives the trainer's wait: the machine looks loaded
    if _os.fork() == 0:
        _t = _time.time()
        while _time.time() - _t < 3.0:
            pass
        _os._exit(0)
    _os._exit(0)
_os.wait()
'''


@pytest.mark.slow
def test_a_trainer_cannot_pass_its_own_cpu_off_as_other_programs_load(tiny_cache, tmp_path):
    """The load covariate credits a run for what other programs took; a trainer that burns a core in an
    orphaned process of its own (so that its parent never waits for it) must not have that counted as
    another program's: the sandbox's tree and the loop (a subreaper) reap everything it started, so its
    CPU time comes back to the loop as the run's own."""
    from tests.test_loop import FAKE_TRAINER, loop_env, make_repo, read_rows, run_loop

    trainer = FAKE_TRAINER.replace("import json\n", BURNER + "import json\n", 1).replace("SLEEP = 0.0", "SLEEP = 3.0")
    repo = make_repo(tmp_path, trainer)
    out = run_loop(repo, "run", "--agent", "optuna", "--max-experiments", "0", "--baseline-runs", "2",
                   env=loop_env(tiny_cache, AUTORESEARCH_LOAD_METER="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = read_rows(repo)
    assert len(rows) == 2 and all(r.others_cpu is not None for r in rows)
    assert max(r.others_cpu for r in rows) < 0.3, [r.others_cpu for r in rows]  # the burner alone would be ~0.6


def test_cpu_runs_beside_other_programs_get_one_sentence_on_what_to_do():
    from research.ledger import busy_sentence

    rows = [_row(2.3, 0.0, "keep", "base", f"{BASELINE} {k}/3") for k in range(1, 4)]
    for r, others in zip(rows, (0.01, 0.93, 0.02)):
        r.others_cpu = others
    text = busy_sentence(rows, "cpu", {})
    assert text.startswith("1 of 3 runs shared the machine with other programs (up to 0.9 cores")
    assert "export OMP_WAIT_POLICY=PASSIVE and start a new branch (--tag)" in text
    assert busy_sentence(rows, "cpu", {"OMP_WAIT_POLICY": "PASSIVE"}) is None  # already chosen
    assert busy_sentence(rows, "cuda", {}) is None  # the GPU trains; the CPU threads barely wait
    rows[1].others_cpu = 0.3
    assert busy_sentence(rows, "cpu", {}) is None  # a quiet machine
