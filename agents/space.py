"""Search ranges for the trainer's hyperparameter block, defined once for every backend.

Each range is a rule applied to the value the host's baseline has (its `center`), so one table
serves an H100 (DEPTH 8, 2**19 tokens per step) and a CPU (DEPTH 2, 2**11) alike:

  *_LR                 log-scaled, center / 4 .. center x 4, written with 3 significant digits
  WEIGHT_DECAY         0 .. max(2 x center, 0.1), steps of 0.01
  WARMUP_RATIO         0 .. 0.3, steps of 0.05
  WARMDOWN_RATIO       0 .. 1, steps of 0.05
  FINAL_LR_FRAC        0 .. 0.2, steps of 0.01
  DEPTH                integers, center // 2 .. 2 x center
  ASPECT_RATIO         center / 2 .. 2 x center, multiples of 8 (or of 1 when the center is not one)
  HEAD_DIM             center x 2**k, k in -1..1
  TOTAL_BATCH_SIZE     center x 2**k, k in -2..2
  DEVICE_BATCH_SIZE    center x 2**k, k in -2..1
  WINDOW_PATTERN       one of WINDOW_PATTERNS (and the center)

Batch sizes are searched as powers of two times the baseline's, and `repair` then lowers
DEVICE_BATCH_SIZE until DEVICE_BATCH_SIZE x sequence length divides TOTAL_BATCH_SIZE, so every
point of the space is a trainer that runs. Names the table does not know (and values of other
types, such as ADAM_BETAS's tuple or N_KV_HEAD = None) are left as they are.

`Space.distributions()` gives Optuna distributions; `encode` turns block values into a trial's
parameters (names whose value lies outside the range are left out) and `decode` goes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["WINDOW_PATTERNS", "Dim", "Space", "build_space", "repair", "round_sig", "same_value"]

WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL", "SSSSL", "SLL")


def round_sig(v: float, digits: int = 3) -> float:
    return float(f"{v:.{digits}g}")


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def same_value(a: object, b: object) -> bool:
    """Equal as hyperparameter values: numbers within 1e-9 relative, tuples and lists alike."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if _num(a) and _num(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


@dataclass(frozen=True)
class Dim:
    """One searched hyperparameter.

    kind: "log" (float, log scale), "float" (float grid of `step`), "int" (integer grid of `step`),
    "pow2" (the parameter is an integer k, the value center x 2**k) or "choice" (categorical).
    """

    name: str
    kind: str
    center: object
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    choices: tuple = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "log":
            return FloatDistribution(self.low, self.high, log=True)
        if self.kind == "float":
            return FloatDistribution(self.low, self.high, step=self.step)
        if self.kind in ("int", "pow2"):
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1))
        return CategoricalDistribution(list(self.choices))

    def encode(self, value: object) -> object | None:
        """The trial parameter for a block value, or None when the value is not a point of this range."""
        if self.kind == "choice":
            return value if value in self.choices else None
        if not _num(value):
            return None
        v = float(value)
        if self.kind == "pow2":
            if v <= 0 or not _num(self.center) or float(self.center) <= 0:
                return None
            k = math.log2(v / float(self.center))
            if abs(k - round(k)) > 1e-9 or not self.low <= round(k) <= self.high:
                return None
            return int(round(k))
        if not self.low - 1e-12 <= v <= self.high + 1e-12:
            return None
        if self.kind == "int":
            if abs(v - round(v)) > 1e-9 or (round(v) - self.low) % int(self.step or 1):
                return None
            return int(round(v))
        if self.kind == "float" and self.step:
            k = (v - self.low) / self.step
            if abs(k - round(k)) > 1e-6:
                return None
            return round(self.low + round(k) * self.step, 10)
        return v

    def decode(self, param: object) -> object:
        """The block value for a trial parameter (floats rounded the way they are written)."""
        if self.kind == "choice":
            return param
        if self.kind == "pow2":
            return int(round(float(self.center) * 2 ** int(param)))
        if self.kind == "int":
            return int(param)
        if self.kind == "float":
            return round(float(param), 10) if self.step else round_sig(float(param))
        return round_sig(float(param))


@dataclass
class Space:
    dims: dict[str, Dim] = field(default_factory=dict)
    seq_len: int = 1

    def distributions(self) -> dict:
        return {n: d.distribution() for n, d in self.dims.items()}

    def encode(self, values: dict) -> dict:
        out = {}
        for name, dim in self.dims.items():
            if name in values:
                p = dim.encode(values[name])
                if p is not None:
                    out[name] = p
        return out

    def decode(self, params: dict) -> dict:
        return {n: self.dims[n].decode(p) for n, p in params.items() if n in self.dims}

    def center(self) -> dict:
        return {n: d.center for n, d in self.dims.items()}

    def describe(self) -> str:
        parts = []
        for d in self.dims.values():
            if d.kind == "choice":
                parts.append(f"{d.name} in {'/'.join(d.choices)}")
            elif d.kind == "pow2":
                lo, hi = d.decode(int(d.low)), d.decode(int(d.high))
                parts.append(f"{d.name} {lo}..{hi} (x2 steps)")
            elif d.kind == "log":
                parts.append(f"{d.name} {d.low:.3g}..{d.high:.3g} (log)")
            else:
                parts.append(f"{d.name} {d.low:g}..{d.high:g}")
        return ", ".join(parts)


def _grid(lo: float, hi: float, step: float) -> tuple[float, float]:
    """(low, high) snapped outward to multiples of step."""
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step


def _float_dim(name: str, v: float, lo: float, hi: float, step: float) -> Dim:
    lo, hi = _grid(min(lo, v), max(hi, v), step)
    if abs((v - lo) / step - round((v - lo) / step)) > 1e-6:
        step = None  # a baseline off the grid: search continuously (3 significant digits) so it stays a point
    return Dim(name, "float", v, round(lo, 10), round(hi, 10), step)


def _dim_for(name: str, v: object) -> Dim | None:
    """The range rule for NAME around its baseline value `v`, or None when it is not searched."""
    if name == "WINDOW_PATTERN":
        if not isinstance(v, str) or not v or set(v) - {"S", "L"}:
            return None
        return Dim(name, "choice", v, choices=tuple(dict.fromkeys((*WINDOW_PATTERNS, v))))
    if not _num(v):
        return None
    if name.endswith("_LR"):
        return Dim(name, "log", v, float(v) / 4, float(v) * 4) if v > 0 else None
    if name == "WEIGHT_DECAY":
        return _float_dim(name, v, 0.0, max(2 * float(v), 0.1), 0.01) if v >= 0 else None
    if name == "WARMUP_RATIO":
        return _float_dim(name, v, 0.0, 0.3, 0.05) if 0 <= v <= 1 else None
    if name == "WARMDOWN_RATIO":
        return _float_dim(name, v, 0.0, 1.0, 0.05) if 0 <= v <= 1 else None
    if name == "FINAL_LR_FRAC":
        return _float_dim(name, v, 0.0, 0.2, 0.01) if 0 <= v <= 1 else None
    if not isinstance(v, int) or v < 1:
        return None
    if name == "DEPTH":
        return Dim(name, "int", v, max(1, v // 2), max(2 * v, v + 1), 1)
    if name == "ASPECT_RATIO":
        step = 8 if v % 8 == 0 else 1
        lo = max(step, (v // 2) // step * step)
        return Dim(name, "int", v, lo, 2 * v, step)
    if name == "HEAD_DIM":
        return Dim(name, "pow2", v, -1 if v >= 2 else 0, 1, 1)
    if name == "TOTAL_BATCH_SIZE":
        return Dim(name, "pow2", v, -2, 2, 1)
    if name == "DEVICE_BATCH_SIZE":
        return Dim(name, "pow2", v, -min(2, int(math.log2(v))), 1, 1)
    return None


def build_space(center: dict, seq_len: int) -> Space:
    """The search space around the host's baseline values `center` (NAME -> value in effect)."""
    dims = {}
    for name, v in sorted(center.items()):
        d = _dim_for(name, v)
        if d is not None:
            dims[name] = d
    return Space(dims, max(1, int(seq_len)))


def repair(values: dict, seq_len: int) -> dict | None:
    """`values` with DEVICE_BATCH_SIZE lowered (halved) until DEVICE_BATCH_SIZE x seq_len divides
    TOTAL_BATCH_SIZE; None when no micro-batch fits (TOTAL_BATCH_SIZE below one sequence)."""
    total, dev = values.get("TOTAL_BATCH_SIZE"), values.get("DEVICE_BATCH_SIZE")
    if not isinstance(total, int) or not isinstance(dev, int):
        return values
    if total < seq_len or total % seq_len:
        return None
    while dev > 1 and total % (dev * seq_len):
        dev //= 2
    if total % (dev * seq_len):
        return None
    return {**values, "DEVICE_BATCH_SIZE": dev}
