"""The keep rule: how the loop tells a real gain from noise.

**Noise model.** The spread that matters is run-to-run: the same trainer, run twice under the same
budget, lands on different val_bpb, mostly because it completes a different number of steps in
the budget (on a shared machine the step count moves with the load; SPEC §10). Every trainer
version that ran more than once on a branch (its baseline runs, confirm reruns, periodic re-runs
of the best) is one group; `pooled_noise` pools the within-group variance of all groups:

    s^2 = sum_g sum_i (x_gi - mean_g)^2 / sum_g (n_g - 1),   df = sum_g (n_g - 1)

and the rule uses sigma = max(s, min_noise). It also fits val_bpb on the step count within the
groups and reports which share of the spread the step count explains (shown, not subtracted: a
candidate's own step count moves with its change as well as with the load, and it is the trainer's
own account, so it cannot be used to correct a run).

**The machine's load as a covariate.** What the loop measures itself about the machine during each run
(research/gauge.py; the trainer cannot move either): c = the cores other programs kept busy while the
trainer trained, by the kernel's count (Linux), or else the machine's slowness, the log of the seconds
the loop's fixed gauge workload took just before and just after the run; the ledger uses the first of
the two that every grouped run has and the data support (research/ledger.py COVARIATES). Within the
same groups, val_bpb is regressed on c (one slope b for all groups, an analysis of covariance):

    b = S_xc / S_cc,   s_c^2 = (S_xx - S_xc^2 / S_cc) / (df - 1)

When the fit is supported (df - 1 >= 2, b > 0: a busier or slower machine scores worse, and b significant
at one-sided SPEED_ALPHA), the rule compares adjusted values: a candidate's runs x with mean c_x against
the best's runs y with mean c_y give

    delta = (mean(x) - mean(y)) - b (c_x - c_y),   se = sigma_c sqrt(1/m + 1/n + (c_x - c_y)^2 / S_cc)

with sigma_c = max(s_c, min_noise) and df - 1 degrees of freedom: the part of the gap the machine's
speed explains is taken out, and the slope's own uncertainty is carried in the standard error. A
candidate or best run without gauge readings (the gauge off, rows from before it) is compared without
the adjustment, against the unadjusted noise.

**Decision rule.** The best is the mean of every run of the best trainer (the last kept one, or the
baseline). A candidate with runs x_1..x_n is kept when it is lower by a significant margin, one-sided:

    t = -delta / se   >   t_{1-alpha, df},   se = sigma sqrt(1/m + 1/n) without the covariate

with m the best's runs and df the pooled degrees of freedom (no repeated runs yet: sigma is
min_noise, taken as known, and the normal quantile is used). With confirmation on (the default) a
single run is first screened at the looser `confirm_alpha`; one that passes is run again and only
the mean of both runs is tested at `alpha`. The final test is the only way to a keep, so identical
trainers are kept at most `alpha` of the time, whatever the screen lets through.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

__all__ = ["SPEED_ALPHA", "NoiseModel", "SpeedFit", "Gain", "Verdict", "pooled_noise", "test_gain", "decide_runs",
           "t_sf", "t_ppf"]

SPEED_ALPHA = 0.1  # the speed slope must be positive at this one-sided level before the rule adjusts for it


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
class SpeedFit:
    """The within-group fit of val_bpb on a covariate of the machine's load (research/ledger.py COVARIATES)."""

    slope: float  # val_bpb per unit of the covariate (positive: a slower or busier machine scores worse)
    scc: float  # within-group sum of squares of the covariate: the slope's precision
    share: float  # share of the within-group variance of those runs it explains
    runs: int  # runs with readings in groups of two or more
    kind: str = "gauge"  # which covariate (research/ledger.py COVARIATES): "load" or "gauge"

    def words(self) -> str:
        return "the cores other programs kept busy" if self.kind == "load" else "the machine's speed by the loop's gauge"

    def difference(self, dc: float) -> str:
        """How the candidate's runs' conditions differed from the best's, in words."""
        if self.kind == "load":
            return f"other programs kept {dc:+.2f} cores busy beside it against the best's runs"
        return f"the gauge read the machine {100 * (math.exp(dc) - 1):+.0f}% slower than for the best"


@dataclass
class NoiseModel:
    """Run-to-run spread of val_bpb for identical trainers on one branch, under one budget. With `speed` set
    the numbers are those left after the machine's speed is taken out, and `raw` is the unadjusted model."""

    sigma: float  # what the rule uses: max(measured, min_noise), or min_noise while nothing is measured
    measured: float | None  # pooled standard deviation of repeated runs (None: no trainer ran twice)
    df: int  # its degrees of freedom, sum over groups of (runs - 1) (one fewer with the speed fit)
    groups: int  # trainer versions with two or more runs
    runs: int  # runs in those groups
    min_noise: float = 0.0
    step_slope: float | None = None  # val_bpb per step, within groups (None: too few runs or no step spread)
    step_share: float | None = None  # share of the within-group variance the step count explains
    speed: SpeedFit | None = None  # the load adjustment the rule makes (None: none)
    raw: NoiseModel | None = None  # without the speed adjustment (set with `speed`)

    @property
    def rule_df(self) -> float:
        """Degrees of freedom for the t quantile: inf while sigma is the floor taken as known."""
        return float(self.df) if self.df > 0 and self.measured is not None and self.measured >= self.min_noise \
            else math.inf

    def unadjusted(self) -> NoiseModel:
        return self.raw if self.raw is not None else self

    def describe(self) -> str:
        """One line: sigma, where it comes from, the machine's speed's and the step count's share of it."""
        if self.measured is None:
            return f"σ {self.sigma:.6f} (the --min-noise floor: no trainer has run twice yet)"
        src = f"{self.runs} runs of {self.groups} trainer{'s' if self.groups != 1 else ''}, {self.df} df"
        floor = f"; floor {self.min_noise:g} applies" if self.measured < self.min_noise else ""
        speed = ""
        if self.speed is not None and self.raw is not None:
            speed = (f"; adjusted for {self.speed.words()}, which explain{'s' if self.speed.kind != 'load' else ''} "
                     f"{100 * self.speed.share:.0f}% (σ {self.raw.sigma:.6f} unadjusted)")
        steps = ""
        if self.step_share is not None and self.step_slope is not None:
            steps = f"; step count explains {100 * self.step_share:.0f}% ({self.step_slope * 100:+.4f} per 100 steps)"
        return f"σ {self.sigma:.6f} pooled from {src}{floor}{speed}{steps}"


def _within(pairs: list[list[tuple[float, float]]]) -> tuple[float, float, float, int, int]:
    """(S_xx, S_xz, S_zz, df, runs) of (x, z) pairs pooled within groups (groups of one left out)."""
    sxx = sxz = szz = 0.0
    df = runs = 0
    for g in pairs:
        if len(g) < 2:
            continue
        mx = statistics.fmean(x for x, _ in g)
        mz = statistics.fmean(z for _, z in g)
        sxx += sum((x - mx) ** 2 for x, _ in g)
        sxz += sum((x - mx) * (z - mz) for x, z in g)
        szz += sum((z - mz) ** 2 for _, z in g)
        df += len(g) - 1
        runs += len(g)
    return sxx, sxz, szz, df, runs


def _valid(v) -> bool:
    return bool(v) and v > 0 and math.isfinite(v)


def pooled_noise(groups: dict[str, list[tuple]], min_noise: float, kind: str = "gauge") -> NoiseModel:
    """The noise model from repeated runs: `groups` maps a trainer hash to its runs, each (val_bpb, steps)
    or (val_bpb, steps, covariate) with the covariate `kind` (research/ledger.py COVARIATES; None: no reading).

    Groups with one run carry no information about the spread and are left out.
    """
    runs_of = [[r for r in vals if _valid(r[0])] for vals in groups.values()]
    ss, _, _, df, runs = _within([[(r[0], 0.0) for r in g] for g in runs_of])
    n_groups = sum(1 for g in runs_of if len(g) >= 2)
    if df == 0:
        return NoiseModel(sigma=min_noise, measured=None, df=0, groups=0, runs=0, min_noise=min_noise)
    measured = math.sqrt(ss / df)
    slope = share = None
    _, sxy, sxx, sdf, _ = _within([[(r[0], float(r[1])) for r in g if r[1]] for g in runs_of])
    if sxx > 0 and df >= 2 and ss > 0 and sdf >= 1:
        slope = sxy / sxx
        share = min(1.0, (sxy * sxy / sxx) / ss)
    raw = NoiseModel(sigma=max(measured, min_noise), measured=measured, df=df, groups=n_groups, runs=runs,
                     min_noise=min_noise, step_slope=slope, step_share=share)
    return _speed_adjusted(raw, runs_of, kind) or raw


def _speed_adjusted(raw: NoiseModel, runs_of: list[list[tuple]], kind: str) -> NoiseModel | None:
    """The noise model after the machine's speed is taken out (module docstring), or None when the fit is
    not supported: fewer than 2 degrees of freedom left, a slope that is not positive, or one not
    significant at SPEED_ALPHA. Every run of the groups must have a reading (a mix would fit one part)."""
    if any(len(r) < 3 or r[2] is None or not math.isfinite(r[2]) for g in runs_of if len(g) >= 2 for r in g):
        return None
    sxx, sxc, scc, df, runs = _within([[(r[0], r[2]) for r in g] for g in runs_of])
    rdf = df - 1
    if rdf < 2 or scc <= 0 or sxx <= 0 or sxc <= 0:
        return None
    slope = sxc / scc
    resid = max(0.0, sxx - sxc * sxc / scc)
    s_c = math.sqrt(resid / rdf)
    t = slope / (s_c / math.sqrt(scc)) if s_c > 0 else math.inf
    if t <= t_ppf(1.0 - SPEED_ALPHA, rdf):
        return None
    fit = SpeedFit(slope=slope, scc=scc, share=min(1.0, (sxc * sxc / scc) / sxx), runs=runs, kind=kind)
    return NoiseModel(sigma=max(s_c, raw.min_noise), measured=s_c, df=rdf, groups=raw.groups, runs=raw.runs,
                      min_noise=raw.min_noise, step_slope=raw.step_slope, step_share=raw.step_share, speed=fit,
                      raw=raw)


@dataclass
class Gain:
    """A candidate's runs against the best's: the difference of the means (speed-adjusted when the noise model
    adjusts and every run has a reading), its standard error, t, the one-sided p of "no gain"."""

    delta: float  # negative is better
    se: float
    t: float
    p: float
    df: float  # the t distribution's degrees of freedom used
    sigma: float
    raw_delta: float  # the plain difference of the means
    slower: float | None = None  # how much slower the machine was for the candidate's runs (c_x - c_y); None: unadjusted


def test_gain(cand: list[float], best: list[float], noise: NoiseModel, cand_speed: list | None = None,
              best_speed: list | None = None) -> Gain:
    """mean(cand) < mean(best)? `cand_speed`/`best_speed`: the runs' covariate values (None: no reading)."""
    raw_delta = statistics.fmean(cand) - statistics.fmean(best)
    m, n = len(best), len(cand)
    readings = [*(cand_speed or []), *(best_speed or [])]
    adjust = (noise.speed is not None and len(cand_speed or []) == n and len(best_speed or []) == m
              and all(c is not None and math.isfinite(c) for c in readings))
    if adjust:
        dc = statistics.fmean(cand_speed) - statistics.fmean(best_speed)
        delta = raw_delta - noise.speed.slope * dc
        se = noise.sigma * math.sqrt(1.0 / m + 1.0 / n + dc * dc / noise.speed.scc)
    else:
        noise, dc, delta = noise.unadjusted(), None, raw_delta
        se = noise.sigma * math.sqrt(1.0 / m + 1.0 / n)
    t = -delta / se if se > 0 else (math.inf if delta < 0 else 0.0)
    p = t_sf(t, noise.rule_df) if math.isfinite(t) else 0.0
    return Gain(delta, se, t, p, noise.rule_df, noise.sigma, raw_delta, dc)


@dataclass
class Verdict:
    """A candidate's runs against the best's runs under the noise model."""

    status: str  # keep | discard
    note: str  # the rule and its numbers, for the row and the console
    promising: bool  # passed the screen at confirm_alpha (worth a confirming rerun)
    delta: float  # mean(candidate) - mean(best), speed-adjusted when the rule adjusts; negative is better
    t: float
    p: float  # one-sided p-value of "no gain"
    needed: float  # the smallest gain that would have been kept with these run counts


def decide_runs(cand: list[float], best: list[float], noise: NoiseModel, alpha: float,
                confirm_alpha: float | None = None, cand_speed: list | None = None,
                best_speed: list | None = None) -> Verdict:
    """Keep or discard `cand` (one or more runs of one trainer) against `best` (the best trainer's runs).

    keep: p < alpha. `promising` (with `confirm_alpha` given): p < confirm_alpha and the mean is lower;
    the caller then reruns and decides again on both runs. `cand_speed`/`best_speed`: each run's covariate
    value (the noise model's `speed.kind`) for the adjustment.
    """
    g = test_gain(cand, best, noise, cand_speed, best_speed)
    crit = t_ppf(1.0 - alpha, g.df)
    needed = crit * g.se
    m, n = len(best), len(cand)
    what = f"{g.delta:+.6f}" + (f" (mean of {n} runs)" if n > 1 else "")
    if g.slower is not None:
        kind = "load" if noise.speed.kind == "load" else "speed"
        what += f" adjusted for the machine's {kind} (raw {g.raw_delta:+.6f}; {noise.speed.difference(g.slower)})"
    at = "" if g.slower is None else " at this load" if noise.speed.kind == "load" else " at this speed"
    base = f"vs best {statistics.fmean(best) + g.raw_delta - g.delta:.6f}{at} (mean of {m} run{'s' if m != 1 else ''})"
    df = "∞" if math.isinf(g.df) else f"{g.df:.0f}"
    stats = f"t {g.t:.2f}, p {g.p:.3f}, keep if p < {alpha:g} (gain > {needed:.6f}; σ {g.sigma:.6f}, df {df})"
    if g.p < alpha:
        return Verdict("keep", f"win: {what} {base}; {stats}", True, g.delta, g.t, g.p, needed)
    promising = confirm_alpha is not None and g.delta < 0 and g.p < confirm_alpha
    if g.delta < 0:
        return Verdict("discard", f"within noise: {what} {base}; {stats}", promising, g.delta, g.t, g.p, needed)
    return Verdict("discard", f"no gain: {what} {base}; {stats}", False, g.delta, g.t, g.p, needed)
