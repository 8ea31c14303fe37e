"""When the loop stops a run that cannot win (the keep rule itself is research/noise.py's).

**Early abort.** The loop reads the trainer's per-step `loss:` lines as they come (`LossCurve`),
bins them by the trainer's printed progress, and compares each finished bin with the best trainer's
stored curve (`runs/<n>/loss.json`, averaged over its runs). Past `min_progress`, a run whose loss
trails the reference by more than `abort_z` times the curve noise (the spread of identical trainers'
curves in that bin, from the groups of research/noise.py) in two bins in a row is stopped and recorded as
`abort` with the progress it reached. The stream is the trainer's word, not a measurement: printing
better numbers only keeps a run alive (it is still judged by the harness at the end), printing worse
ones only stops it. A reference curve that is too good to be true (a kept trainer that printed low
losses) would stop honest runs, so every `audit_every`-th run that would be stopped is let through
instead; if such an audited run then beats the best's mean, early abort is switched off for the
branch until the best changes.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

from data.steplog import STEP_LINE

__all__ = [
    "LossCurve",
    "Reference",
    "AbortMonitor",
    "NBINS",
    "LOAD_MARGIN",
    "curve_bins",
    "load_curve",
    "write_curve",
    "reference_from_curves",
]


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
    load: float | None = None  # cores other programs kept busy during those runs (median; None: not known)

    def usable(self) -> bool:
        return self.curves > 0 and self.df >= MIN_CURVE_DF and any(s for s in self.sigma)


# A run during which other programs kept more cores busy than this beyond the reference runs' median is never
# stopped early: it trails because the machine was busier, which would stop any change at that moment.
LOAD_MARGIN = 0.25

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
        self.load = None  # reads the cores other programs kept busy so far (research/gauge.py LoadMeter.stop)
        self.spared: str | None = None  # why a run that trailed was not stopped (the machine was busier)

    def _busier(self) -> str | None:
        """Why this run is not comparable with the reference now: other programs kept the machine busier
        than during the reference runs (by more than LOAD_MARGIN cores); None when not (or not known)."""
        ref = self.ref.load
        now = self.load() if self.load is not None and ref is not None else None
        if now is None or now - ref <= LOAD_MARGIN:
            return None
        return f"other programs kept {now:.2f} cores busy during it against {ref:.2f} during the best's runs"

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
                busier = self._busier()
                if busier:
                    self.spared = (f"not stopped early: at {100 * p:.0f}% of the budget its training loss trailed "
                                   f"the best's, but {busier}")
                    self.run = 0
                    continue
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
