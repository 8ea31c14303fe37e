"""How the loop tells a real gain from noise, and when it stops a run that cannot win.

**Noise model.** The spread that matters is run-to-run: the same trainer, run twice under the same
budget, lands on different val_bpb, mostly because it completes a different number of steps in
the budget (on a shared machine the step count moves with the load; SPEC §10). Every trainer
version that ran more than once on a branch (its baseline runs, confirm reruns, periodic re-runs
of the best) is one group; `pooled_noise` pools the within-group variance of all groups:

    s^2 = sum_g sum_i (x_gi - mean_g)^2 / sum_g (n_g - 1),   df = sum_g (n_g - 1)

and the rule uses sigma = max(s, min_noise). It also fits val_bpb on the step count within the
groups and reports which share of the spread the step count explains (shown, not subtracted: a
candidate's own step count moves with its change as well as with the load, so it cannot be used
to correct a single run).

**Decision rule.** The best is the mean of every run of the best trainer (the last kept one, or the
baseline). A candidate with runs x_1..x_n is kept when it is lower by a significant margin, one-sided:

    t = (mean(best) - mean(x)) / (sigma * sqrt(1/m + 1/n))   >   t_{1-alpha, df}

with m the best's runs and df the pooled degrees of freedom (no repeated runs yet: sigma is
min_noise, taken as known, and the normal quantile is used). With confirmation on (the default) a
single run is first screened at the looser `confirm_alpha`; one that passes is run again and only
the mean of both runs is tested at `alpha`. The final test is the only way to a keep, so identical
trainers are kept at most `alpha` of the time, whatever the screen lets through.

**Early abort.** The loop reads the trainer's per-step `loss:` lines as they come (`LossCurve`),
bins them by the trainer's printed progress, and compares each finished bin with the best trainer's
stored curve (`runs/<n>/loss.json`, averaged over its runs). Past `min_progress`, a run whose loss
trails the reference by more than `abort_z` times the curve noise (the spread of identical trainers'
curves in that bin, from the same groups as above) in two bins in a row is stopped and recorded as
`abort` with the progress it reached. The stream is the trainer's word, not a measurement: printing
better numbers only keeps a run alive (it is still judged by the harness at the end), printing worse
ones only stops it. A reference curve that is too good to be true (a kept trainer that printed low
losses) would stop honest runs, so every `audit_every`-th run that would be stopped is let through
instead; if such an audited run then beats the best's mean, early abort is switched off for the
branch until the best changes.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

from data.steplog import STEP_LINE

__all__ = [
    "NoiseModel",
    "Verdict",
    "pooled_noise",
    "test_gain",
    "decide_runs",
    "t_sf",
    "t_ppf",
    "LossCurve",
    "Reference",
    "AbortMonitor",
    "NBINS",
    "curve_bins",
    "load_curve",
    "write_curve",
    "reference_from_curves",
]


# ---------------------------------------------------------------------------
# Student's t (no SciPy dependency: the regularized incomplete beta function)
# ---------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(lbeta)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df = inf: the normal distribution)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


@functools.lru_cache(maxsize=512)
def t_ppf(q: float, df: float) -> float:
    """The t value with P(T <= t) = q (bisection on t_sf; |t| < 1e4 covers every q used here)."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - t_sf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------
# The noise model
# ---------------------------------------------------------------------------


@dataclass
class NoiseModel:
    """Run-to-run spread of val_bpb for identical trainers on one branch, under one budget."""

    sigma: float  # what the rule uses: max(measured, min_noise), or min_noise while nothing is measured
    measured: float | None  # pooled standard deviation of repeated runs (None: no trainer ran twice)
    df: int  # its degrees of freedom, sum over groups of (runs - 1)
    groups: int  # trainer versions with two or more runs
    runs: int  # runs in those groups
    min_noise: float = 0.0
    step_slope: float | None = None  # val_bpb per step, within groups (None: too few runs or no step spread)
    step_share: float | None = None  # share of the within-group variance the step count explains

    @property
    def rule_df(self) -> float:
        """Degrees of freedom for the t quantile: inf while sigma is the floor taken as known."""
        return float(self.df) if self.df > 0 and self.measured is not None and self.measured >= self.min_noise \
            else math.inf

    def describe(self) -> str:
        """One line: sigma, where it comes from, and the step count's share of it."""
        if self.measured is None:
            return f"σ {self.sigma:.6f} (the --min-noise floor: no trainer has run twice yet)"
        src = f"{self.runs} runs of {self.groups} trainer{'s' if self.groups != 1 else ''}, {self.df} df"
        floor = f"; floor {self.min_noise:g} applies" if self.measured < self.min_noise else ""
        steps = ""
        if self.step_share is not None and self.step_slope is not None:
            steps = f"; step count explains {100 * self.step_share:.0f}% ({self.step_slope * 100:+.4f} per 100 steps)"
        return f"σ {self.sigma:.6f} pooled from {src}{floor}{steps}"


def pooled_noise(groups: dict[str, list[tuple[float, int | None]]], min_noise: float) -> NoiseModel:
    """The noise model from repeated runs: `groups` maps a trainer hash to its runs (val_bpb, steps).

    Groups with one run carry no information about the spread and are left out.
    """
    ss, df, n_groups, runs = 0.0, 0, 0, 0
    sxy, sxx = 0.0, 0.0  # within-group regression of val_bpb on steps
    for vals in groups.values():
        xs = [v for v, _ in vals if v and v > 0 and math.isfinite(v)]
        if len(xs) < 2:
            continue
        mean = statistics.fmean(xs)
        ss += sum((x - mean) ** 2 for x in xs)
        df += len(xs) - 1
        n_groups += 1
        runs += len(xs)
        stepped = [(v, s) for v, s in vals if v and v > 0 and s]
        if len(stepped) >= 2:
            mv = statistics.fmean(v for v, _ in stepped)
            ms = statistics.fmean(s for _, s in stepped)
            sxy += sum((v - mv) * (s - ms) for v, s in stepped)
            sxx += sum((s - ms) ** 2 for _, s in stepped)
    if df == 0:
        return NoiseModel(sigma=min_noise, measured=None, df=0, groups=0, runs=0, min_noise=min_noise)
    measured = math.sqrt(ss / df)
    slope = share = None
    if sxx > 0 and df >= 2 and ss > 0:
        slope = sxy / sxx
        share = min(1.0, (sxy * sxy / sxx) / ss)
    return NoiseModel(sigma=max(measured, min_noise), measured=measured, df=df, groups=n_groups, runs=runs,
                      min_noise=min_noise, step_slope=slope, step_share=share)


@dataclass
class Verdict:
    """A candidate's runs against the best's runs under the noise model."""

    status: str  # keep | discard
    note: str  # the rule and its numbers, for the row and the console
    promising: bool  # passed the screen at confirm_alpha (worth a confirming rerun)
    delta: float  # mean(candidate) - mean(best); negative is better
    t: float
    p: float  # one-sided p-value of "no gain"
    needed: float  # the smallest gain that would have been kept with these run counts


def test_gain(cand: list[float], best: list[float], noise: NoiseModel) -> tuple[float, float, float, float]:
    """(delta, standard error, t, one-sided p) of mean(cand) < mean(best)."""
    delta = statistics.fmean(cand) - statistics.fmean(best)
    se = noise.sigma * math.sqrt(1.0 / len(best) + 1.0 / len(cand))
    t = -delta / se if se > 0 else (math.inf if delta < 0 else 0.0)
    return delta, se, t, t_sf(t, noise.rule_df) if math.isfinite(t) else 0.0


def decide_runs(cand: list[float], best: list[float], noise: NoiseModel, alpha: float,
                confirm_alpha: float | None = None) -> Verdict:
    """Keep or discard `cand` (one or more runs of one trainer) against `best` (the best trainer's runs).

    keep: p < alpha. `promising` (with `confirm_alpha` given): p < confirm_alpha and the mean is lower;
    the caller then reruns and decides again on both runs.
    """
    delta, se, t, p = test_gain(cand, best, noise)
    crit = t_ppf(1.0 - alpha, noise.rule_df)
    needed = crit * se
    m, n = len(best), len(cand)
    what = f"{delta:+.6f}" + (f" (mean of {n} runs)" if n > 1 else "")
    base = f"vs best {statistics.fmean(best):.6f} (mean of {m} run{'s' if m != 1 else ''})"
    df = "∞" if math.isinf(noise.rule_df) else f"{noise.rule_df:.0f}"
    stats = f"t {t:.2f}, p {p:.3f}, keep if p < {alpha:g} (gain > {needed:.6f}; σ {noise.sigma:.6f}, df {df})"
    if p < alpha:
        return Verdict("keep", f"win: {what} {base}; {stats}", True, delta, t, p, needed)
    promising = confirm_alpha is not None and delta < 0 and p < confirm_alpha
    if delta < 0:
        return Verdict("discard", f"within noise: {what} {base}; {stats}", promising, delta, t, p, needed)
    return Verdict("discard", f"no gain: {what} {base}; {stats}", False, delta, t, p, needed)


# ---------------------------------------------------------------------------
# Loss curves: parsed live from the trainer's output, stored per run
# ---------------------------------------------------------------------------

NBINS = 40  # progress bins of 2.5%
MAX_LINE = 1024  # longer "lines" are not step lines; they are skipped, never buffered whole
MAX_POINTS = 4000  # a curve keeps at most this many points (every other one dropped when full)


class LossCurve:
    """The per-step `step N (P%) | loss: L` lines of a trainer's output, fed in chunks as they arrive.

    Points are (step, progress in [0, 1], loss). Anything else is ignored; progress that goes back is
    ignored too. Thread-safe: the pipe reader feeds, the loop's main thread reads.
    """

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []
        self._buf = b""
        self._skip = False  # inside an over-long line
        self._lock = threading.Lock()

    def feed(self, chunk: bytes) -> None:
        parts = re.split(rb"[\r\n]", chunk)
        with self._lock:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if self._skip:
                    if not last:
                        self._skip = False  # the long line ended here
                    continue
                line = self._buf + part
                if last:
                    if len(line) > MAX_LINE:
                        self._buf, self._skip = b"", True
                    else:
                        self._buf = line
                    break
                self._buf = b""
                if len(line) <= MAX_LINE:
                    self._parse(line)

    def _parse(self, line: bytes) -> None:
        m = STEP_LINE.search(line)  # the format prepare.log_step prints (data/steplog.py)
        if not m:
            return
        step, progress, loss = int(m[1]), float(m[2]) / 100.0, float(m[3])
        if not (0.0 <= progress <= 1.0 and math.isfinite(loss) and 0.0 < loss < 1e4):
            return
        if self.points and progress < self.points[-1][1]:
            return
        self.points.append((step, progress, loss))
        if len(self.points) > MAX_POINTS:
            self.points = self.points[::2]

    def snapshot(self) -> list[tuple[int, float, float]]:
        with self._lock:
            return list(self.points)

    @property
    def progress(self) -> float:
        with self._lock:
            return self.points[-1][1] if self.points else 0.0


def curve_bins(points, nbins: int = NBINS) -> list[float | None]:
    """Mean loss per progress bin (None where the curve has no point)."""
    sums, counts = [0.0] * nbins, [0] * nbins
    for _, p, loss in points:
        b = min(nbins - 1, int(p * nbins))
        sums[b] += loss
        counts[b] += 1
    return [s / c if c else None for s, c in zip(sums, counts)]


def write_curve(path: Path, points, *, wall_seconds: float | None = None, stopped_at: float | None = None) -> None:
    """Store a run's parsed curve (runs/<n>/loss.json); a failed write only loses the curve."""
    data = {"source": "the trainer's printed step lines (its own account: used only to stop runs early)",
            "points": [[s, round(p, 5), round(v, 6)] for s, p, v in points]}
    if wall_seconds is not None:
        data["wall_seconds"] = round(wall_seconds, 2)
    if stopped_at is not None:
        data["stopped_at_progress"] = round(stopped_at, 4)
    try:
        path.write_text(json.dumps(data), encoding="utf-8")
    except OSError:
        pass


def load_curve(path: Path) -> list[tuple[int, float, float]] | None:
    """A curve written by `write_curve`, or None (missing, unreadable, malformed, or cut short by an abort)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("stopped_at_progress") is not None:
            return None
        pts = [(int(s), float(p), float(v)) for s, p, v in data["points"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pts or None


# ---------------------------------------------------------------------------
# Early abort
# ---------------------------------------------------------------------------


@dataclass
class Reference:
    """What a run is compared with while it trains: the best trainer's mean curve per bin, and the
    spread of identical trainers' curves per bin (the curve noise)."""

    mean: list[float | None]
    sigma: list[float | None]
    curves: int  # how many of the best's runs the mean is over
    df: int  # degrees of freedom of the curve noise

    def usable(self) -> bool:
        return self.curves > 0 and self.df >= MIN_CURVE_DF and any(s for s in self.sigma)


# Early abort needs the curve noise from at least this many degrees of freedom (three stored curves of one
# trainer, or two each of two): from two curves alone one unlucky pair sets the limit for every run after it.
MIN_CURVE_DF = 2


def reference_from_curves(best: list[list], groups: list[list[list]], nbins: int = NBINS,
                          rel_floor: float = 0.002) -> Reference:
    """`best`: the best trainer's curves; `groups`: curves of each trainer version that has two or more
    (the best's included). The noise per bin is pooled like `pooled_noise`, floored at `rel_floor`
    of the reference loss (two identical curves can agree to the last digit)."""
    binned = [curve_bins(c, nbins) for c in best]
    mean: list[float | None] = []
    for b in range(nbins):
        vals = [c[b] for c in binned if c[b] is not None]
        mean.append(statistics.fmean(vals) if vals else None)
    ss, df = [0.0] * nbins, [0] * nbins
    for group in groups:
        gb = [curve_bins(c, nbins) for c in group]
        for b in range(nbins):
            vals = [c[b] for c in gb if c[b] is not None]
            if len(vals) >= 2:
                m = statistics.fmean(vals)
                ss[b] += sum((v - m) ** 2 for v in vals)
                df[b] += len(vals) - 1
    sigma: list[float | None] = []
    for b in range(nbins):
        if df[b] == 0 or mean[b] is None:
            sigma.append(None)
        else:
            sigma.append(max(math.sqrt(ss[b] / df[b]), rel_floor * mean[b]))
    return Reference(mean=mean, sigma=sigma, curves=len(best), df=min((d for d in df if d), default=0))


# Hyperparameters that change the shape of the training curve itself (the schedule, the model's size, the
# batch): a run changing one is not behind the best mid-run in any sense its end would confirm (a later
# warmdown trails until it pays off, a bigger model learns slower per step), so early abort leaves it alone.
CURVE_SHAPING = ("WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC", "DEPTH", "ASPECT_RATIO", "HEAD_DIM", "N_KV_HEAD",
                 "WINDOW_PATTERN", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE")


def curve_shaping_changes(best: dict, candidate: dict) -> list[str]:
    """The CURVE_SHAPING hyperparameters whose values differ between the best's and a candidate's source."""
    return [n for n in CURVE_SHAPING if n in best and n in candidate and best[n] != candidate[n]]


class AbortMonitor:
    """Watches a live `LossCurve` against a `Reference`; `check()` says whether to stop the run now.

    A bin is judged once the curve has moved past it. The run is stopped when, at progress of at least
    `min_progress`, `consecutive` judged bins in a row trail the reference by more than
    `z * sigma_bin * sqrt(1 + 1/curves)`. `audit`: the monitor only records what it would have done.
    """

    def __init__(self, curve: LossCurve, ref: Reference, *, z: float, min_progress: float,
                 consecutive: int = 2, audit: bool = False, nbins: int = NBINS) -> None:
        self.curve, self.ref, self.z, self.min_progress = curve, ref, z, min_progress
        self.consecutive, self.audit, self.nbins = consecutive, audit, nbins
        self.judged = 0  # bins judged so far
        self.run = 0  # bins in a row over the limit
        self.fired: str | None = None  # why it stopped (or, auditing, would have stopped) the run
        self.fired_at: float | None = None

    def check(self) -> bool:
        """True when the run should be stopped now (never while auditing)."""
        if self.fired is not None:
            return not self.audit
        points = self.curve.snapshot()
        if not points:
            return False
        done = min(self.nbins, int(points[-1][1] * self.nbins))  # bins before the current one are complete
        if done <= self.judged:
            return False
        bins = curve_bins(points, self.nbins)
        scale = math.sqrt(1.0 + 1.0 / max(1, self.ref.curves))
        for b in range(self.judged, done):
            self.judged = b + 1
            mine, ref, sig = bins[b], self.ref.mean[b], self.ref.sigma[b]
            if (b + 1) / self.nbins < self.min_progress or mine is None or ref is None or not sig:
                continue
            limit = self.z * sig * scale
            gap = mine - ref
            self.run = self.run + 1 if gap > limit else 0
            if self.run >= self.consecutive:
                p = (b + 1) / self.nbins
                self.fired_at = p
                self.fired = (f"at {100 * p:.0f}% of the budget its training loss {mine:.4f} trailed the best's "
                              f"{ref:.4f} by {gap:.4f} (limit {limit:.4f} = {self.z:g} x curve noise "
                              f"{sig * scale:.4f}) for {self.consecutive} bins in a row")
                return not self.audit
        return False


@dataclass
class AbortPlan:
    """How one run is watched: the monitor (None: not watched) and why not, for the console."""

    monitor: AbortMonitor | None
    reason: str = ""
    curve: LossCurve = field(default_factory=LossCurve)
