"""The ledger: one branch's rows read back into what the loop decides with, and what every screen shows.

`replay(rows)` gives the best (the mean of the best trainer's runs at the machine's current speed), the
noise model, the re-measurement state and the early-abort bookkeeping; `running_best` the best as the
loop saw it after each row; `abort_reference` the curves early abort compares a run with. The loop
(research/session.py), the live page, the report and `compare` (reporting/) all read these, so each
shows the number the loop decides with.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from research.decisions import MIN_CURVE_DF, Reference, load_curve, reference_from_curves
from research.noise import NoiseModel, pooled_noise
from research.gauge import slowness, speed_of
from research.results import BASELINE, BEST_NEXT, RERUN, Kind, Row

__all__ = ["BASELINE", "RERUN", "BEST_NEXT", "ABORT_OFF", "ABORT_AUDIT", "Replay", "measurement", "speed",
           "COVARIATES", "covariate", "speed_stretches", "replay", "running_best", "curves_of", "abort_reference",
           "needed_gain", "reach_sentence", "OUT_OF_REACH", "BUSY_CORES", "busy_sentence"]



@dataclass
class Replay:
    best: float | None  # mean of the best trainer's runs
    noise_floor: float | None  # the sigma the rule uses (noise.sigma)
    baselines: list[Row] = field(default_factory=list)
    kept_commit: str | None = None  # short hash of the last kept non-baseline row
    noise: NoiseModel | None = None
    best_hash: str = ""  # trainer_hash of the best trainer ("" when its rows have none)
    best_runs: list[Row] = field(default_factory=list)  # its runs at the machine's current speed, oldest first
    since_best_run: int = 0  # experiments (rows other than reruns) since the best trainer last ran
    drift: float | None = None  # speed change (the gauge) where the best's current stretch began (None: one stretch)
    drift_reason: str | None = None  # why the machine's speed calls for re-running the best soon
    all_best_runs: list[Row] = field(default_factory=list)  # every measured run of the best trainer
    abort_off: bool = False  # an abort audit failed since the best last changed: early abort is off
    would_abort: int = 0  # runs stopped early or audited since the best last changed
    speed_adjusted: bool = False  # the best is its runs' mean adjusted to the machine's speed during the last one
    covariate: str | None = None  # what the rule adjusts for (COVARIATES), None when it does not
    current_runs: list[Row] = field(default_factory=list)  # the best's runs since the machine's speed last moved

    @property
    def best_values(self) -> list[float]:
        return [r.val_bpb for r in self.best_runs]

    @property
    def best_speeds(self) -> list[float | None]:
        """The keep rule's covariate for each of the best's runs (None each when the rule does not adjust)."""
        return [covariate(r, self.covariate) for r in self.best_runs]

    def basis(self) -> str:
        """Which runs the best is the mean of, and why the best trainer's other runs do not count."""
        if self.best is None:
            return "no best yet"
        n = len(self.best_runs)
        runs = [str(r.run) for r in self.best_runs if r.run is not None]
        text = f"mean of {n} run{'s' if n != 1 else ''}" + (f" (runs {', '.join(runs)})" if runs else "")
        if self.speed_adjusted and n > 1:
            what = ("the machine's load", "the cores other programs kept busy") if self.covariate == "load" \
                else ("the machine's speed", "by the loop's gauge")
            text += f", adjusted to {what[0]} during {'run ' + runs[-1] if runs else 'the last'} ({what[1]})"
        left = len(self.all_best_runs) - n
        if left > 0:
            text += (f"; {left} earlier run{'s' if left != 1 else ''} of the same trainer ran while the machine "
                     f"was more than the drift threshold faster or slower (the loop's gauge) and no longer "
                     f"count{'s' if left == 1 else ''}")
        return text


ABORT_OFF = "early abort is off until the best changes"  # in the note of a failed abort audit
ABORT_AUDIT = "abort audit:"  # in the note of a run that would have been stopped and was let through


def measurement(r: Row) -> bool:
    """A row whose val_bpb is a real measurement (keep, discard, transfer, rerun)."""
    return r.ok and r.val_bpb > 0


def speed(r: Row) -> float | None:
    """The machine's speed during a run by the loop's own gauge (research/gauge.py: its fixed workload per
    second, read just before and just after the run), or None for a row without readings (one written
    before the gauge). It notices the machine's speed changing, which schedules re-runs and picks which
    of the best's runs are current. Never the trainer's own steps or seconds: those are its claim."""
    return speed_of(r.gauge_before_s, r.gauge_after_s)


# The keep rule's covariates, in the order the ledger tries them (research/noise.py): the cores other programs
# kept busy while the trainer trained (the kernel's count, Linux), then the machine's slowness by the loop's
# gauge (the log of its seconds around the run). Each reads a Row, a research.run TrainerRun or a RunResult.
COVARIATES = {
    "load": lambda x: getattr(x, "others_cpu", None),
    "gauge": lambda x: slowness(getattr(x, "gauge_before_s", None), getattr(x, "gauge_after_s", None)),
}


def covariate(x, kind: str | None) -> float | None:
    """A run's value of covariate `kind` (None: no such reading, or no covariate)."""
    return COVARIATES[kind](x) if kind in COVARIATES else None


def speed_stretches(runs: list[Row], drift: float) -> list[list[Row]]:
    """Split one trainer's runs (oldest first) where the machine's speed moved: a run whose speed (the loop's
    gauge) is off the median of the current stretch by more than `drift` (relative) starts a new stretch.
    Runs without a speed stay in the current one."""
    out: list[list[Row]] = [[]]
    seen: list[float] = []
    for r in runs:
        v = speed(r)
        if v is not None and seen and abs(v / statistics.median(seen) - 1.0) > drift:
            out.append([])
            seen = []
        out[-1].append(r)
        if v is not None:
            seen.append(v)
    return [g for g in out if g]


def replay(rows: list[Row], min_noise: float, drift: float = 0.15) -> Replay:
    """Best, noise model and re-measurement state from one branch's rows (oldest first, one budget).

    The best trainer is the one of the last kept non-baseline row, else the baseline; the best is the
    mean of its measured runs (baseline runs, the keep, its confirm and periodic reruns) made at the
    machine's current speed: when the loop's gauge says the machine was more than `drift` faster or
    slower during a run of it than during its runs before, the earlier ones stop counting for the mean
    (the load changed; they measured another machine) — unless the noise model adjusts for the machine's
    load (research/noise.py, with the first of COVARIATES the data support), which puts runs made under
    any load on one footing: then all of them count, their mean taken at the load of the last. The noise
    model pools the spread of every trainer that ran twice or more, all its runs included.
    """
    baselines = [r for r in rows if r.kind == Kind.BASELINE]
    kept_row, kept = None, None
    for r in rows:
        if r.status == "keep" and r.kind != Kind.BASELINE:
            kept_row, kept = r, r.commit
    for kind in COVARIATES:  # the first covariate the data support
        groups: dict[str, list[tuple]] = {}
        for r in rows:
            if measurement(r) and r.trainer_hash:
                groups.setdefault(r.trainer_hash, []).append((r.val_bpb, r.num_steps, covariate(r, kind)))
        noise = pooled_noise(groups, min_noise, kind)
        if noise.speed is not None:
            break
    kind = noise.speed.kind if noise.speed is not None else None
    if kept_row is not None:
        best_hash = kept_row.trainer_hash
        all_best = [r for r in rows if measurement(r) and best_hash and r.trainer_hash == best_hash] or [kept_row]
    else:
        ok = [r for r in baselines if measurement(r)]
        best_hash = ok[0].trainer_hash if ok else ""
        all_best = [r for r in rows if measurement(r) and best_hash and r.trainer_hash == best_hash] or ok
    adjusted = bool(all_best) and kind is not None and all(covariate(r, kind) is not None for r in all_best)
    stretches = speed_stretches(all_best, drift) if all_best else []  # the runs at one speed: when to re-run
    current = stretches[-1] if stretches else []
    best_runs = all_best if adjusted else current  # adjusted for the machine's speed, every run of the best counts
    best = statistics.fmean(r.val_bpb for r in best_runs) if best_runs else None
    if adjusted:  # their mean at the machine's speed of the last of them
        cs = [covariate(r, kind) for r in best_runs]
        best -= noise.speed.slope * (statistics.fmean(cs) - cs[-1])
    mine = [i for i, r in enumerate(rows) if any(r is b for b in all_best)]
    tried = [i for i, r in enumerate(rows) if r.kind in (Kind.RERUN, Kind.BEST_NEXT)]  # a crashed rerun counts too
    last = max(mine[-1:] + tried[-1:], default=None)
    since = sum(1 for r in rows[last + 1:] if r.status != "rerun") if last is not None else 0
    moved, reason = None, None
    now = [v for v in map(speed, current) if v is not None]
    if len(stretches) > 1:
        before = [v for v in map(speed, stretches[-2]) if v is not None]
        moved = now[0] / statistics.median(before) - 1.0 if now and before else None
        if len(current) < 2 and moved is not None:
            reason = f"the machine's speed moved ({100 * moved:+.0f}% by the loop's gauge on the best's last run)"
    recent = [v for v in (speed(r) for r in rows[last + 1:] if measurement(r)) if v is not None][-3:] \
        if last is not None else []
    if reason is None and now and len(recent) >= 3:
        off = statistics.median(recent) / statistics.median(now) - 1.0
        if abs(off) > drift:
            reason = (f"the machine's speed moved ({100 * off:+.0f}% by the loop's gauge for the last runs "
                      "against the best's)")
    after = rows[mine[0]:] if mine else []
    abort_off = any(ABORT_OFF in r.note for r in after)
    would = sum(1 for r in after if r.status == "abort" or ABORT_AUDIT in r.note)
    return Replay(best=best, noise_floor=noise.sigma if best is not None else None, baselines=baselines,
                  kept_commit=kept, noise=noise, best_hash=best_hash, best_runs=best_runs, since_best_run=since,
                  drift=moved, drift_reason=reason, all_best_runs=all_best, abort_off=abort_off,
                  would_abort=would, speed_adjusted=adjusted, current_runs=current, covariate=kind)


def running_best(rows: list[Row], min_noise: float, drift: float = 0.15) -> list[float | None]:
    """The loop's best after each row (replay of the rows up to it): what each experiment was compared with
    when it was decided is the value before it."""
    return [replay(rows[: i + 1], min_noise, drift).best for i in range(len(rows))]


def curve_file(r: Row) -> str:
    """The name of a row's stored loss curve in its runs/<n>/ folder: confirm_loss.json for a confirm run,
    best_loss.json for the best's run next to a promising change, loss.json otherwise."""
    return {Kind.CONFIRM: "confirm_loss.json", Kind.BEST_NEXT: "best_loss.json"}.get(r.kind, "loss.json")


def curves_of(rows: list[Row], runs_dir: Path) -> list[list]:
    """The stored loss curves of these rows' runs (aborted runs and rows without a run folder have none)."""
    out = []
    for r in rows:
        if r.run is None:
            continue
        c = load_curve(Path(runs_dir) / str(r.run) / curve_file(r))
        if c:
            out.append(c)
    return out


def abort_reference(st: Replay, rows: list[Row], runs_dir: Path, enabled: bool = True
                    ) -> tuple[Reference | None, str | None]:
    """(Reference, None) for early abort against the best trainer's curves, or (None, why not): the best's
    curves at the machine's current speed (else all of them), and the curve noise from every trainer with
    two or more stored curves on the branch (`rows`)."""
    if not enabled:
        return None, "early abort is off (--no-early-abort)"
    if st.abort_off:
        return None, "early abort is off: an audited run beat the best it would have been stopped against"
    if not st.best_runs:
        return None, "no best yet"
    used = st.current_runs or st.best_runs
    best = curves_of(used, runs_dir)
    if not best:
        used = st.all_best_runs
        best = curves_of(used, runs_dir)
    if not best:
        return None, "no stored loss curve of the best yet"
    by_hash: dict[str, list[Row]] = {}
    for r in rows:
        if measurement(r) and r.trainer_hash:
            by_hash.setdefault(r.trainer_hash, []).append(r)
    groups = [c for c in (curves_of(rs, runs_dir) for rs in by_hash.values() if len(rs) >= 2) if len(c) >= 2]
    ref = reference_from_curves(best, groups)
    loads = [r.others_cpu for r in used if r.run is not None]
    if loads and all(x is not None for x in loads):
        ref.load = statistics.median(loads)  # a run under more load than this is not stopped for trailing
    if not ref.usable():
        return None, (f"the curve noise has {ref.df} degree{'s' if ref.df != 1 else ''} of freedom and early abort "
                      f"needs {MIN_CURVE_DF} (three stored loss curves of one trainer, or two each of two)")
    return ref, None


OUT_OF_REACH = 0.02  # a gain the rule needs above this fraction of val_bpb is one few real changes reach


def needed_gain(st: Replay, alpha: float, confirm: bool) -> float | None:
    """The smallest gain below the best's mean that the keep rule keeps now: the one-sided t-test's critical
    value times the noise of the difference between the mean of the change's runs (two with a confirm run)
    and the mean of the best's runs. None without a best."""
    if st.noise is None or not st.best_runs:
        return None
    from research.noise import t_ppf

    n, m = (2 if confirm else 1), len(st.best_runs)
    return t_ppf(1 - alpha, st.noise.rule_df) * st.noise.sigma * (1 / m + 1 / n) ** 0.5


def reach_sentence(st: Replay, alpha: float, confirm: bool, workers: int = 1) -> str | None:
    """One sentence when the noise puts keeps out of reach (the needed gain over OUT_OF_REACH of val_bpb),
    with the numbers and what would help; None otherwise. Shown on the terminal and the live page."""
    need = needed_gain(st, alpha, confirm)
    if need is None or st.best is None or need <= OUT_OF_REACH * st.best:
        return None
    fewer = f", fewer workers than {workers} (runs beside each other slow each other unevenly)" if workers > 1 else ""
    return (f"keeps are out of reach: with run-to-run noise σ {st.noise.sigma:.4f} a change must beat the best "
            f"({st.best:.4f}) by {need:.4f} ({100 * need / st.best:.1f}% of val_bpb), more than most real changes "
            f"gain; a quieter machine, a longer time budget{fewer} or more baseline runs would lower it")


BUSY_CORES = 0.5  # other programs keeping this many cores busy beside a CPU run cost spinning threads most steps


def busy_sentence(runs: list[Row], backend: str, environ) -> str | None:
    """One sentence when CPU runs shared the machine with other programs while OpenMP's threads spin (no
    OMP_WAIT_POLICY set): what it cost and what to do (README, "A busy CPU machine"); None otherwise."""
    if backend != "cpu" or environ.get("OMP_WAIT_POLICY"):
        return None
    busy = [r.others_cpu for r in runs if r.others_cpu is not None and r.others_cpu >= BUSY_CORES]
    if not busy:
        return None
    return (f"{len(busy)} of {len(runs)} runs shared the machine with other programs (up to {max(busy):.1f} cores "
            "busy beside them), and PyTorch's CPU threads spin while they wait, so such a run loses most of its "
            "steps and the run-to-run noise grows with it; on a machine shared with other jobs, export "
            "OMP_WAIT_POLICY=PASSIVE and start a new branch (--tag) so that its baselines run that way too")
