"""Tests of the keep/discard rule, the noise model, one budget per comparison and early abort
(research/noise.py, research/decisions.py, research/ledger.py's replay, research/experiment.py).

Most tests are in-process on simulated rows and loss streams: the rule's false-keep rate for identical
trainers and its power for a real gain are measured over many simulated branches, through the same
`replay` and `decide` the loop uses. Three end-to-end tests run `loop.py` on a temporary repository with
a stand-in trainer (tests/test_loop.py's FAKE_TRAINER, made to print a per-step loss stream): a trainer
made worse on purpose is stopped early, a loss stream faked either way cannot make a change kept, and
a `try` under another time budget than the branch's is refused.

Run: `uv run pytest tests/test_decisions.py` (about a minute on a 2-core CPU).
"""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from research import results as R
from research.decisions import AbortMonitor, LossCurve, curve_bins, load_curve, reference_from_curves, write_curve
from research.noise import pooled_noise, t_ppf, t_sf
from research.experiment import decide
from research.ledger import ABORT_AUDIT, ABORT_OFF, BASELINE, replay
from research.session import Session, Settings

ALPHA = Settings.alpha


# ------------------------------------------------------------------------------------------------
# Student's t and the noise model
# ------------------------------------------------------------------------------------------------


def test_t_distribution_matches_published_tables():
    assert t_ppf(0.95, 4) == pytest.approx(2.131847, abs=1e-5)
    assert t_ppf(0.975, 10) == pytest.approx(2.228139, abs=1e-5)
    assert t_ppf(0.95, 1) == pytest.approx(6.313752, abs=1e-5)
    assert t_ppf(0.95, math.inf) == pytest.approx(1.644854, abs=1e-5)
    for df in (1, 3, 30, math.inf):
        for t in (-2.0, 0.0, 0.7, 3.0):
            assert t_sf(t, df) + t_sf(-t, df) == pytest.approx(1.0, abs=1e-12)
            assert t_sf(t_ppf(0.9, df), df) == pytest.approx(0.1, abs=1e-9)


def test_pooled_noise_uses_every_repeated_trainer_and_reports_the_step_share():
    groups = {"base": [(2.0, 100), (2.2, 80), (2.1, 90)], "kept": [(1.9, 95), (1.8, 105)], "once": [(1.7, 99)]}
    n = pooled_noise(groups, min_noise=0.0005)
    ss = (0.01 + 0.01 + 0.0) + (0.0025 + 0.0025)
    assert n.df == 3 and n.groups == 2 and n.runs == 5  # the trainer that ran once tells nothing about spread
    assert n.measured == pytest.approx(math.sqrt(ss / 3)) and n.sigma == n.measured
    assert n.step_slope == pytest.approx(-0.01) and n.step_share == pytest.approx(1.0)  # val falls 0.01 a step
    assert "step count explains 100%" in n.describe()
    # the floor: identical results do not make every difference significant
    flat = pooled_noise({"a": [(2.0, 10), (2.0, 10)]}, min_noise=0.0005)
    assert flat.sigma == 0.0005 and math.isinf(flat.rule_df)
    none = pooled_noise({"a": [(2.0, 10)]}, min_noise=0.001)
    assert none.measured is None and none.sigma == 0.001 and "--min-noise floor" in none.describe()


def test_decide_states_the_rule_and_its_numbers():
    noise = pooled_noise({"b": [(2.00, None), (2.02, None), (1.98, None), (2.01, None), (1.99, None)]}, 0.0005)
    best = [2.00, 2.02, 1.98, 2.01, 1.99]
    win = decide([1.95], best, noise, 0.05, 0.3)
    assert win.status == "keep" and win.note.startswith("win: -0.050000 vs best 2.000000 (mean of 5 runs)")
    assert "p < 0.05" in win.note and "df 4" in win.note and f"σ {noise.sigma:.6f}" in win.note
    close = decide([1.985], best, noise, 0.05, 0.3)
    assert close.status == "discard" and close.note.startswith("within noise:") and close.promising
    worse = decide([2.03], best, noise, 0.05, 0.3)
    assert worse.status == "discard" and worse.note.startswith("no gain:") and not worse.promising
    both = decide([1.98, 1.975], best, noise, 0.05)
    assert "(mean of 2 runs)" in both.note
    assert decide([1.0], [], None, 0.05).note == "first measurement on this branch"


# ------------------------------------------------------------------------------------------------
# the rule on simulated branches (the loop's replay + decide, many trials)
# ------------------------------------------------------------------------------------------------


def _run(rng: random.Random, mean: float, sigma: float) -> tuple[float, int]:
    """One simulated run: the step count moves with the machine's load and val_bpb moves with it, plus a
    little evaluation noise; the total run-to-run sigma is `sigma` (SPEC §10: steps dominate)."""
    steps = rng.gauss(380, 15)
    val = mean - (steps - 380) * (0.9 * sigma / 15) + rng.gauss(0, math.sqrt(1 - 0.81) * sigma)
    return val, int(round(steps))


def _row(val: float, steps: int, status: str, trainer: str, note: str = "", run: int = 0) -> R.Row:
    """A row whose run made `steps` steps; the loop's gauge read the machine as fast as that (a reading of
    38/steps seconds: the speed the drift rule reads is proportional to the steps)."""
    gauge = 38.0 / steps if steps else None
    return R.Row(commit=trainer[:7], val_bpb=val, memory_gb=0.1, status=status, description=note or trainer,
                 trainer_hash=trainer, num_steps=steps, training_seconds=60.0, note=note, branch="b", run=run,
                 budget_s=60.0, gauge_before_s=gauge, gauge_after_s=gauge)


def _experiment(rng, rows: list[R.Row], name: str, mean: float, sigma: float, settings: Settings,
                best_mean: float = 2.5) -> str:
    """One experiment as run_experiment decides it: a run, the screen, then the best once more and the
    change a second time, the final test on the change's two runs against the best's runs."""
    st = replay(rows, settings.min_noise)
    v1, s1 = _run(rng, mean, sigma)
    verdict = decide([v1], st.best_values, st.noise, settings.alpha, settings.confirm_alpha)
    extra = []
    if verdict.status == "keep" or verdict.promising:
        beside = _row(*_run(rng, best_mean, sigma), "rerun", st.best_hash, "the best, run next to run")
        v2, s2 = _run(rng, mean, sigma)
        st = replay(rows + [beside], settings.min_noise)
        verdict = decide([v1, v2], st.best_values, st.noise, settings.alpha)
        extra = [_row(v2, s2, "rerun", name, "confirm run of run"), beside]
    rows.append(_row(v1, s1, verdict.status, name, verdict.note))
    rows.extend(extra)
    return verdict.status


def _branch(rng, sigma: float, settings: Settings) -> list[R.Row]:
    return [_row(*_run(rng, 2.5, sigma), "keep", "base", f"{BASELINE} {k}/{settings.baseline_runs}")
            for k in range(1, settings.baseline_runs + 1)]


def test_identical_trainers_are_kept_at_most_alpha_of_the_time():
    """Neutral edits (the same trainer with a new hash), ten per simulated branch, 300 branches: the share
    kept stays at or below alpha (plus three binomial standard errors)."""
    rng, settings, sigma = random.Random(12), Settings(), 0.01
    keeps = decisions = 0
    for trial in range(300):
        rows = _branch(rng, sigma, settings)
        for k in range(10):
            keeps += _experiment(rng, rows, f"neutral-{trial}-{k}", 2.5, sigma, settings) == "keep"
            decisions += 1
    rate = keeps / decisions
    assert rate <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / decisions), rate


def test_the_old_range_of_two_floor_keeps_identical_trainers_far_more_often():
    """What the issue measured: a floor from the range of two baseline runs, against the best as its
    luckiest run, keeps a neutral edit roughly one time in five."""
    rng, sigma, keeps, n = random.Random(3), 0.01, 0, 3000
    for _ in range(n):
        a, b = _run(rng, 2.5, sigma)[0], _run(rng, 2.5, sigma)[0]
        keeps += _run(rng, 2.5, sigma)[0] < (a + b) / 2 - abs(a - b)
    assert keeps / n > 3 * ALPHA


def test_a_three_sigma_gain_is_kept_in_most_trials():
    rng, settings, sigma = random.Random(7), Settings(), 0.01
    kept = sum(_experiment(rng, _branch(rng, sigma, settings), "better", 2.5 - 3 * sigma, sigma, settings) == "keep"
               for _ in range(500))
    assert kept / 500 >= 0.75, kept / 500


def test_without_confirm_a_single_run_is_tested_at_alpha():
    rng, sigma = random.Random(5), 0.01
    settings = Settings(confirm=False)
    keeps = 0
    for _ in range(1500):
        rows = _branch(rng, sigma, settings)
        st = replay(rows, settings.min_noise)
        keeps += decide([_run(rng, 2.5, sigma)[0]], st.best_values, st.noise, ALPHA).status == "keep"
    assert keeps / 1500 <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / 1500)


def test_replay_best_is_the_mean_of_the_best_trainers_runs():
    rows = [_row(2.50, 380, "keep", "base", f"{BASELINE} 1/3"), _row(2.52, 370, "keep", "base", f"{BASELINE} 2/3"),
            _row(2.48, 390, "keep", "base", f"{BASELINE} 3/3"),
            _row(2.60, 380, "discard", "worse", "no gain"),
            _row(2.40, 382, "keep", "good", "confirmed by a rerun"), _row(2.44, 384, "rerun", "good", "confirm run"),
            _row(2.55, 380, "discard", "meh", "no gain"), _row(0.0, None, "abort", "bad", "abort: ..."),
            _row(0.0, None, "crash", "broken", "crash: ...")]
    rows[0].gauge_before_s = rows[0].gauge_after_s = None  # a run without readings: no speed adjustment (below)
    st = replay(rows, 0.0005)
    assert st.best_hash == "good" and st.best == pytest.approx(2.42) and len(st.best_runs) == 2
    assert st.noise.df == 3 and st.noise.groups == 2  # baselines (2 df) + the keep and its confirm run (1 df)
    assert st.noise_floor == st.noise.sigma
    assert st.since_best_run == 3 and st.would_abort == 1 and not st.abort_off
    # a periodic rerun of the best joins its mean
    rows.append(_row(2.43, 380, "rerun", "good", "rerun of the best: 10 experiments"))
    rows[-1].description = "rerun of the best (good)"
    st = replay(rows, 0.0005)
    assert st.best == pytest.approx((2.40 + 2.44 + 2.43) / 3) and st.since_best_run == 0 and st.drift is None
    # the machine got 20% slower: the earlier runs measured another machine, the best is the new run alone
    # (the noise model still pools all of them) until it is measured again at this speed
    rows.append(_row(2.47, 305, "rerun", "good", "rerun of the best: 10 experiments"))
    rows[-1].description = "rerun of the best (good)"
    st = replay(rows, 0.0005)
    assert st.best == pytest.approx(2.47) and len(st.best_runs) == 1 and len(st.all_best_runs) == 4
    assert st.drift == pytest.approx(305 / statistics.median([382, 384, 380]) - 1)
    assert st.drift_reason == "the machine's speed moved (-20% by the loop's gauge on the best's last run)"
    assert st.noise.df == 5 and st.noise.speed is None
    # with a reading for every run the rule adjusts for the machine's speed: every run of the best counts
    rows[0].gauge_before_s = rows[0].gauge_after_s = 38.0 / 380
    adjusted = replay(rows, 0.0005)
    assert adjusted.noise.speed is not None and adjusted.noise.unadjusted().df == 5 and adjusted.noise.df == 4
    assert len(adjusted.best_runs) == 4 and "earlier run" not in adjusted.basis()
    # an audited abort that beat the best turns early abort off until the best changes
    rows.append(_row(2.30, 380, "discard", "late", f"within noise: ...; {ABORT_AUDIT} ...: {ABORT_OFF}"))
    assert replay(rows, 0.0005).abort_off
    rows += [_row(2.2, 380, "keep", "newbest", "win"), _row(2.21, 381, "rerun", "newbest", "confirm run")]
    st = replay(rows, 0.0005)
    assert not st.abort_off and st.would_abort == 0
    assert st.best == pytest.approx(2.205, abs=1e-3)  # their mean at the speed of the last (381 steps, not 380)


def test_rerun_is_due_every_n_experiments_and_sooner_while_the_speed_drifts():
    s = Session.__new__(Session)
    s.settings = Settings(remeasure_every=6, drift=0.15)
    rows = [_row(2.5, 380, "keep", "base", f"{BASELINE} {k}/2") for k in (1, 2)]
    rows[0].gauge_before_s = None  # one run without readings: no speed adjustment, so the best's runs at
    rows[0].gauge_after_s = None  # another speed stop counting (test_replay_best... has the adjusted case)
    rows += [_row(2.6, 380, "discard", f"x{k}", "no gain") for k in range(5)]
    s.state = replay(rows, 0.0005)
    assert s.rerun_due() is None
    rows.append(_row(2.6, 380, "discard", "x5", "no gain"))
    s.state = replay(rows, 0.0005)
    assert "6 experiments since the best last ran" in s.rerun_due()
    rows.append(_row(2.55, 300, "rerun", "base", "rerun of the best: ..."))
    rows[-1].description = "rerun of the best (base)"
    rows.append(_row(2.6, 300, "discard", "y0", "no gain"))
    s.state = replay(rows, 0.0005)
    assert s.rerun_due() is None  # a third of the interval first
    rows.append(_row(2.6, 300, "discard", "y1", "no gain"))
    s.state = replay(rows, 0.0005)
    assert s.rerun_due() == "the machine's speed moved (-21% by the loop's gauge on the best's last run)"
    # the best at one speed, the last three runs at another: the machine's speed moved without the best
    rows.append(_row(2.56, 300, "rerun", "base", "rerun of the best: ..."))
    rows[-1].description = "rerun of the best (base)"
    s.state = replay(rows, 0.0005)
    assert s.rerun_due() is None and s.state.best == pytest.approx(2.555)
    rows += [_row(2.5, 390, "discard", f"z{k}", "no gain") for k in range(3)]
    s.state = replay(rows, 0.0005)
    assert s.rerun_due() == "the machine's speed moved (+30% by the loop's gauge for the last runs against the best's)"
    s.settings = Settings(remeasure_every=0)
    assert s.rerun_due() is None


# ------------------------------------------------------------------------------------------------
# the live loss stream and early abort
# ------------------------------------------------------------------------------------------------


def _lines(loss0: float, n: int = 40, shift: float = 0.0) -> bytes:
    return b"".join(f"step {i:05d} ({100 * i / n:.1f}%) | loss: {loss0 * (1.5 - 0.5 * i / n) + shift:.6f} | lrm: 1.00 | "
                    f"dt: 50ms\n".encode() for i in range(n))


def test_loss_stream_is_parsed_from_any_chunking_and_ignores_the_rest():
    c = LossCurve()
    data = b"starting\n" + _lines(4.0, 10) + b"---\nval_bpb: 0.1\n"
    for i in range(0, len(data), 7):  # split mid-line
        c.feed(data[i:i + 7])
    assert [p[0] for p in c.points] == list(range(10)) and c.points[0] == (0, 0.0, 6.0)
    c = LossCurve()
    c.feed(b"\rstep 00001 (10.0%) | loss: 5.000000\rstep 00002 (20.0%) | loss: 4.900000\r")  # a terminal's live line
    c.feed(b"step 00003 (5.0%) | loss: 1.0\n")  # progress going back: ignored
    c.feed(b"step 00004 (30.0%) | loss: nan\nstep 00005 (250.0%) | loss: 1.0\n")  # not finite / out of range
    c.feed(b"x" * 5000 + b"step 00006 (40.0%) | loss: 0.5\n")  # inside an over-long line: skipped
    c.feed(b"step 00007 (50.0%) | loss: 4.5\n")
    assert [(s, loss) for s, _, loss in c.points] == [(1, 5.0), (2, 4.9), (7, 4.5)]
    assert c.progress == 0.5


def _reference(loss0: float = 4.0, jitter: float = 0.01) -> object:
    rng = random.Random(0)
    best = [[(i, i / 40, loss0 * (1.5 - 0.5 * i / 40) + rng.gauss(0, jitter)) for i in range(40)] for _ in range(2)]
    base = [[(i, i / 40, loss0 * (1.5 - 0.5 * i / 40) + rng.gauss(0, jitter)) for i in range(40)] for _ in range(3)]
    return reference_from_curves(best, [best, base])


def _watch(data: bytes, **kw) -> AbortMonitor:
    mon = AbortMonitor(LossCurve(), _reference(), z=kw.pop("z", 4.0), min_progress=kw.pop("min_progress", 0.3), **kw)
    for line in data.splitlines(keepends=True):
        mon.curve.feed(line)
        if mon.check():
            break
    return mon


def test_a_run_far_behind_the_best_is_stopped_after_the_minimum_progress():
    mon = _watch(_lines(6.0))
    assert mon.fired and 0.3 <= mon.fired_at <= 0.4
    assert mon.fired.startswith(f"at {100 * mon.fired_at:.0f}% of the budget its training loss")
    assert mon.check() is True  # stays stopped


def test_a_run_the_machine_slowed_more_than_the_best_is_never_stopped():
    """Early abort compares curves made under like load: a run during which other programs kept the machine
    busier than during the best's runs (the kernel's count, research/gauge.py) trails for that reason, as
    any change would at that moment, and is not stopped; at the best's load it is."""
    ref = _reference()
    ref.load = 0.05
    spared = []
    for now, stopped in ((1.0, False), (0.2, True)):
        mon = AbortMonitor(LossCurve(), ref, z=4.0, min_progress=0.3)
        mon.load = lambda now=now: now
        for line in _lines(6.0).splitlines(keepends=True):
            mon.curve.feed(line)
            if mon.check():
                break
        assert bool(mon.fired) is stopped and bool(mon.spared) is not stopped
        spared.append(mon.spared)
    assert spared[0].startswith("not stopped early: at ") and spared[0].endswith(
        "other programs kept 1.00 cores busy during it against 0.05 during the best's runs")
    unknown = AbortMonitor(LossCurve(), _reference(), z=4.0, min_progress=0.3)  # no load known: judged as before
    unknown.load = lambda: 1.0
    for line in _lines(6.0).splitlines(keepends=True):
        unknown.curve.feed(line)
        unknown.check()
    assert unknown.fired and unknown.spared is None


def test_noise_level_differences_and_better_curves_are_never_stopped():
    assert _watch(_lines(4.0, shift=0.02)).fired is None  # 2 sigma behind: inside the noise
    assert _watch(_lines(3.0)).fired is None  # better (or faked better): runs on, judged by the harness


def test_the_curve_noise_needs_two_degrees_of_freedom():
    """Two curves of one trainer (1 degree of freedom) are not enough for early abort; three are, and so are
    two each of two trainers."""
    from research.decisions import MIN_CURVE_DF

    rng = random.Random(1)

    def curves(n: int) -> list:
        return [[(i, i / 40, 4.0 * (1.5 - 0.5 * i / 40) + rng.gauss(0, 0.01)) for i in range(40)] for _ in range(n)]

    two, three, other = curves(2), curves(3), curves(2)
    assert MIN_CURVE_DF == 2
    assert not reference_from_curves(two, [two]).usable() and reference_from_curves(two, [two]).df == 1
    assert reference_from_curves(three, [three]).usable()
    assert reference_from_curves(two, [two, other]).usable()


def test_an_audit_only_records_what_it_would_have_done():
    mon = _watch(_lines(6.0), audit=True)
    assert mon.fired and mon.check() is False


def test_stored_curves_round_trip_and_aborted_ones_are_not_references(tmp_path):
    c = LossCurve()
    c.feed(_lines(4.0))
    write_curve(tmp_path / "loss.json", c.snapshot(), wall_seconds=3.0)
    assert load_curve(tmp_path / "loss.json") == [(s, round(p, 5), round(v, 6)) for s, p, v in c.points]
    write_curve(tmp_path / "stopped.json", c.snapshot(), stopped_at=0.35)
    assert load_curve(tmp_path / "stopped.json") is None
    (tmp_path / "junk.json").write_text("{not json")
    assert load_curve(tmp_path / "junk.json") is None
    assert curve_bins(c.points)[0] == pytest.approx(6.0)


def test_the_abort_reference_carries_the_load_of_the_runs_it_comes_from(tmp_path):
    from research.ledger import abort_reference

    rng = random.Random(2)
    rows = []
    for k in range(1, 4):
        c = LossCurve()
        c.feed(_lines(4.0 + rng.gauss(0, 0.01)))
        (tmp_path / str(k)).mkdir()
        write_curve(tmp_path / str(k) / "loss.json", c.snapshot())
        r = _row(2.5 + rng.gauss(0, 0.01), 380, "keep", "base", f"{BASELINE} {k}/3", run=k)
        r.others_cpu = [0.02, 0.04, 0.9][k - 1]
        rows.append(r)
    st = replay(rows, 0.0005)
    ref, why = abort_reference(st, rows, tmp_path)
    assert why is None and ref.load == pytest.approx(0.04)  # the median: one busy run does not move it
    rows[0].others_cpu = None  # a run without the kernel's count: the load is not known, nothing is spared
    ref, _ = abort_reference(replay(rows, 0.0005), rows, tmp_path)
    assert ref.load is None


# ------------------------------------------------------------------------------------------------
# results file and reports
# ------------------------------------------------------------------------------------------------


def test_new_columns_round_trip_and_older_files_still_read(tmp_path):
    path = tmp_path / "results.tsv"
    old = "\t".join(R.COLUMNS[: R.COLUMNS.index("note") + 1])
    path.write_text(old + "\n" + "\t".join(["abc1234", "2.000000", "0.1", "keep", "baseline"] + [""] * 19) + "\n")
    assert R.read_results(path)[0].budget_s is None
    R.ensure_results_file(path)  # the header widens, the old row stays
    R.append_row(path, R.Row(commit="def5678", val_bpb=0.0, memory_gb=0.0, status="abort", description="worse",
                             budget_s=20.0, progress=0.35, note="abort: at 35% ..."))
    R.append_row(path, R.Row(commit="def5678", val_bpb=1.9, memory_gb=0.1, status="rerun", description="again",
                             budget_s=20.0))
    rows = R.read_results(path)
    assert [(r.status, r.budget_s, r.progress) for r in rows] == [("keep", None, None), ("abort", 20.0, 0.35),
                                                                  ("rerun", 20.0, None)]
    assert path.read_text().split("\n")[0].split("\t")[:5] == R.UPSTREAM_COLUMNS


def test_report_shows_the_budget_override_aborts_reruns_and_the_noise(tmp_path):
    from reporting import report

    path = tmp_path / "results.tsv"
    R.ensure_results_file(path)
    common = dict(memory_gb=0.1, protocol="tiny", evaluator_hash="e", branch="autoresearch/x", budget_s=20.0,
                  backend="cpu", device="cpu")
    rows = [R.Row(commit="d", val_bpb=2.45, status="discard", description="other budget", run=0,
                  **{**common, "budget_s": 60.0}),
            R.Row(commit="a", val_bpb=2.50, status="keep", description="baseline", note="baseline 1/2", run=1,
                  trainer_hash="base", **common),
            R.Row(commit="a", val_bpb=2.52, status="keep", description="baseline (repeat 2/2)",
                  note="baseline 2/2", run=2, trainer_hash="base", **common),
            R.Row(commit="b", val_bpb=0.0, status="abort", description="worse", note="abort: at 35% ...", run=3,
                  progress=0.35, **common),
            R.Row(commit="c", val_bpb=2.40, status="keep", description="better", note="confirmed", run=4,
                  trainer_hash="c", **common),
            R.Row(commit="c", val_bpb=2.41, status="rerun", description="better", note="confirm run of run 4", run=4,
                  trainer_hash="c", **common),
            R.Row(commit="e", val_bpb=2.42, status="discard", description="audited", run=5, trainer_hash="e",
                  note="no gain; abort audit: it would have been stopped at 40%", **common),
            R.Row(commit="f", val_bpb=2.30, status="discard", description="audited, better", run=6, trainer_hash="f",
                  note="not confirmed; abort audit: it would have been stopped at 50%, yet it measured below the "
                       "best's mean 2.400000: early abort is off until the best changes", **common)]
    for r in rows:
        R.append_row(path, r)
    md_path, png = report.write_report(path, tmp_path / "out")
    md = md_path.read_text()
    assert "budget 20 s (override; tiny: 60 s)" in md
    assert "| stopped early | 1 run (status abort" in md and "at 35% of the budget" in md
    assert "2 audits (runs it would have stopped, let through to the end): 1 measured below the best" in md
    assert "| run-to-run noise | σ" in md and "pooled from 4 runs of 2 trainers, 2 df" in md
    assert "1 row of other branches or protocols" in md  # the 60 s row is another comparison
    assert png.stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# end to end: loop.py with a stand-in trainer that prints a loss stream
# ------------------------------------------------------------------------------------------------


def standin() -> str:
    """FAKE_TRAINER printing one `step N (P%) | loss: L` line per 'step' over STREAM_S seconds, its loss
    curve scaled by LOSS (the stream is its own word: it says nothing about VAL_BPB)."""
    from test_loop import FAKE_TRAINER

    anchors = ('SLEEP = 0.0\n', '    time.sleep(SLEEP)\n')
    assert all(a in FAKE_TRAINER for a in anchors), "tests/test_loop.py's FAKE_TRAINER changed its layout"
    text = FAKE_TRAINER.replace(anchors[0], 'SLEEP = 0.0\nLOSS = 4.0\nSTREAM_S = 2.0\n', 1)
    return text.replace(anchors[1], '''    time.sleep(SLEEP)
    for i in range(40):
        f = i / 40
        print(f"step {i:05d} ({100 * f:.1f}%) | loss: {LOSS * (1.5 - 0.5 * f):.6f} | dt: 50ms", flush=True)
        time.sleep(STREAM_S / 40)
''', 1)


@pytest.fixture
def loop_tools():
    import test_loop

    return test_loop


from test_loop import in_process  # noqa: E402,F401  (a fixture: loop.main() in this process)


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_early_abort_stops_a_trainer_made_worse_and_a_faked_stream_wins_nothing(tiny_cache, tmp_path, loop_tools):
    t = loop_tools
    repo = t.make_repo(tmp_path, trainer=standin())
    script = t.write_script(tmp_path, [
        t.edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "a real gain"),
        t.edit("LOSS = 4.0", "LOSS = 6.0", "worse on purpose"),
        {"description": "a worse model printing a better loss", "edits": [
            {"old": "VAL_BPB = 1.5", "new": "VAL_BPB = 1.8"}, {"old": "LOSS = 4.0", "new": "LOSS = 2.0"}]},
        {"description": "a better model printing a worse loss", "edits": [
            {"old": "VAL_BPB = 1.5", "new": "VAL_BPB = 1.2"}, {"old": "LOSS = 4.0", "new": "LOSS = 6.0"}]},
        {"description": "a deeper model, slower to start", "edits": [
            {"old": "DEPTH = 2", "new": "DEPTH = 3"}, {"old": "LOSS = 4.0", "new": "LOSS = 6.0"}]},
    ])
    proc = t.run_loop(repo, "run", "--agent", "scripted", "--script", script, "--tag", "ab", "--baseline-runs", "2",
                      "--max-experiments", "5", env=t.loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = t.read_rows(repo)
    assert [r.status for r in rows] == ["keep", "keep", "keep", "rerun", "rerun", "abort", "discard", "abort",
                                        "discard"], [(r.status, r.note) for r in rows]
    base, kept, confirm, beside, worse, faked_good, faked_bad, deeper = rows[0], *rows[2:]
    # a change to the model's size trails the best's curve by design: never stopped for it, run to the end
    assert deeper.val_bpb > 0 and "not watched for early abort: it changes DEPTH" in proc.stdout
    assert "running 2 baseline runs" in proc.stdout and "degrees of freedom" in proc.stdout
    assert kept.note.startswith("confirmed by a rerun") and confirm.note == f"confirm run of run {kept.run}"
    assert confirm.trainer_hash == kept.trainer_hash and confirm.run == kept.run
    # the best (the baseline trainer) ran between the change's two runs
    assert beside.note == f"the best, run next to run {kept.run}" and beside.trainer_hash == base.trainer_hash
    assert beside.commit == base.commit and load_curve(repo / "runs" / str(kept.run) / "best_loss.json")
    # stopped early, with the progress it reached; the tree went back to the kept commit
    assert worse.val_bpb == 0.0 and 0.3 <= worse.progress < 0.9 and worse.note.startswith("abort: at ")
    assert "trailed the best's" in worse.note and "ABORT" in proc.stdout
    assert faked_good.note.startswith("no gain:")  # printing a better loss only ran it to the end
    assert faked_bad.status == "abort"  # printing a worse one only stopped it
    assert t.git(repo, "rev-parse", "--short=7", "HEAD") == kept.commit
    t.assert_clean(repo)
    # curves: stored for every run that finished (the reference), marked for the ones stopped
    assert load_curve(repo / "runs" / str(base.run) / "loss.json")
    assert load_curve(repo / "runs" / str(kept.run) / "confirm_loss.json")
    stopped = json.loads((repo / "runs" / str(worse.run) / "loss.json").read_text())
    assert stopped["stopped_at_progress"] == pytest.approx(worse.progress, abs=1e-3)
    assert "[loop] stopped early (abort)" in (repo / "runs" / str(worse.run) / "log.txt").read_text()
    assert all(r.budget_s == 2.0 for r in rows)


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_try_under_another_budget_is_refused_and_the_edit_stays(tiny_cache, tmp_path, loop_tools):
    t = loop_tools
    repo = t.make_repo(tmp_path, trainer=standin())
    t.git(repo, "checkout", "-q", "-b", "autoresearch/budget")
    trainer = repo / "train_cuda.py"
    trainer.write_text(standin().replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    proc = t.run_loop(repo, "try", "lower it", "--baseline-runs", "2", "--no-early-abort",
                      env=t.loop_env(tiny_cache, budget=2))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before = (repo / "results.tsv").read_bytes()
    assert [r.budget_s for r in t.read_rows(repo)] == [2.0] * 5  # 2 baselines, the keep, its confirm run, the best beside it

    edited = trainer.read_text().replace("VAL_BPB = 1.5", "VAL_BPB = 1.0")
    trainer.write_text(edited)
    proc = t.run_loop(repo, "try", "the same idea, shorter", env=t.loop_env(tiny_cache, budget=1))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: Branch autoresearch/budget compares runs of a 2 s budget and this one would "
                          "train for 1 s (AUTORESEARCH_TIME_BUDGET)"), err
    assert "unset AUTORESEARCH_TIME_BUDGET" in err and err.count(". ") == 0  # one sentence
    assert (repo / "results.tsv").read_bytes() == before and trainer.read_text() == edited
    # `run` on that branch is refused the same way; under its own budget it goes on
    t.git(repo, "checkout", "-q", "--", "train_cuda.py")
    proc = t.run_loop(repo, "run", "--agent", "scripted", "--script", t.write_script(tmp_path, []), "--tag", "budget",
                      env=t.loop_env(tiny_cache, budget=3))
    assert proc.returncode == 1 and "compares runs of a 2 s budget" in proc.stderr
    assert (repo / "results.tsv").read_bytes() == before


def test_the_loop_confirms_promising_runs_and_reruns_the_best(tmp_path, monkeypatch, in_process, loop_tools):
    """In-process, with scripted measurements (no trainer runs): a clear win is kept only after the best ran
    once more and the change a second time (both recorded as rerun rows), and the best is run again after
    --remeasure-every experiments; the best is then the mean of its runs."""
    import research.experiment as E
    from sandbox.runner import TrainerRun

    t = loop_tools
    plan = {"a clear win": [2.90, 2.91], "nothing": [3.05], "still nothing": [3.04], "nothing again": [3.06]}
    calls = []

    def run_once(s, run_dir, label, description, prefix="", monitor=None, **_):
        val = 2.92 if description.startswith("rerun of the best") else 3.0 if prefix == "best_" else \
            plan[description].pop(0)
        calls.append((description, prefix, monitor is not None))
        run = TrainerRun(returncode=0, wall_seconds=1.5, timed_out=False, started=0.0)
        return run, "ok", E.Measurement(val_bpb=val, training_seconds=1.0, num_steps=10, holdout_bpb=val + 0.1), ""

    monkeypatch.setattr(E, "run_once", run_once)
    repo = t.make_repo(tmp_path)
    prior = t.seed(repo, "rr", 3.0)
    script = t.write_script(tmp_path, [t.edit("VAL_BPB = 2.0", "VAL_BPB = 1.9", "a clear win"),
                                       t.edit("VAL_BPB = 1.9", "VAL_BPB = 1.8", "nothing"),
                                       t.edit("VAL_BPB = 1.9", "VAL_BPB = 1.7", "still nothing"),
                                       t.edit("VAL_BPB = 1.9", "VAL_BPB = 1.6", "nothing again")])
    code, out, err = in_process(repo, ["run", "--agent", "scripted", "--script", script, "--tag", "rr",
                                       "--baseline-runs", "1", "--max-experiments", "4", "--remeasure-every", "2",
                                       "--min-noise", "0.01"])
    assert code == 0, out + err
    rows = t.read_rows(repo)[prior.rows:]
    assert [r.status for r in rows] == ["keep", "rerun", "rerun", "discard", "discard", "rerun", "discard"]
    win, confirm, beside, rerun = rows[0], rows[1], rows[2], rows[5]
    assert win.note.startswith("confirmed by a rerun, mean of 2.900000 and 2.910000: win:")
    assert confirm.note == f"confirm run of run {win.run}" and confirm.trainer_hash == win.trainer_hash
    assert rerun.note == "rerun of the best: 2 experiments since the best last ran"
    assert rerun.trainer_hash == win.trainer_hash and rerun.description.startswith("rerun of the best (")
    assert beside.note == f"the best, run next to run {win.run}" and beside.val_bpb == 3.0
    assert "mean of 2 runs) vs best 3.000000 (mean of 2 runs)" in win.note  # the seeded baseline and the fresh run
    assert rows[6].note.startswith("no gain: +0.150000 vs best 2.910000 (mean of 3 runs)")
    assert [(d, p) for d, p, _ in calls][:3] == [("a clear win", ""), (f"the best next to run {win.run}", "best_"),
                                                 ("a clear win", "confirm_")]
    assert not any(m for d, p, m in calls if p or d.startswith("rerun"))  # confirm runs and reruns: never stopped
    t.assert_clean(repo)
