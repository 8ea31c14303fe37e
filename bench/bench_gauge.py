"""How well the loop's gauge (research/gauge.py) repeats, and whether it follows a training workload's speed.

For each load level (0 to `--max-load` extra busy processes, one per core by default), it reads the gauge
before and after a fixed stand-in for a training run (a small PyTorch MLP trained on the CPU for
`--seconds`, all cores, in a subprocess as the loop runs trainers) `--rounds` times, then prints per level
the gauge's mean reading, its spread (coefficient of variation), how far a run's two readings lie apart
(median and 90th percentile of |after/before - 1|), and the stand-in's steps per second; and over all runs,
the correlation of the gauge's speed (1 / mean reading) with the stand-in's speed, and how often two
consecutive readings at one level differ by more than the drift rule's 15%.

Run: `uv run bench/bench_gauge.py` (about 3 minutes with the defaults on 2 cores).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research.gauge import gauge, gauge_threads, speed_of

STAND_IN = r"""
import sys, time, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
opt = torch.optim.SGD(m.parameters(), lr=1e-3)
x = torch.randn(64, 256)
for _ in range(3):
    m(x).sum().backward()
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < float(sys.argv[1]):
    opt.zero_grad(); m(x).square().mean().backward(); opt.step(); n += 1
print(n / (time.perf_counter() - t0))
"""


def stand_in(seconds: float) -> float:
    out = subprocess.run([sys.executable, "-c", STAND_IN, str(seconds)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def _burn() -> None:
    while True:
        pass


def main() -> None:
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="runs per load level")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of one stand-in run")
    ap.add_argument("--max-load", type=int, default=cores, help="most extra busy processes")
    args = ap.parse_args()
    print(f"gauge: {gauge_threads()} threads; {cores} cores; load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'load':>4} {'gauge s':>8} {'cv':>6} {'|a/b-1| med':>11} {'p90':>6} {'stand-in steps/s':>17}")
    runs = []
    for load in range(args.max_load + 1):
        burners = [mp.Process(target=_burn, daemon=True) for _ in range(load)]
        for b in burners:
            b.start()
        time.sleep(0.5)
        level = []
        for _ in range(args.rounds):
            before = gauge()
            steps = stand_in(args.seconds)
            after = gauge()
            level.append((before, after, steps))
        for b in burners:
            b.terminate()
        runs += [(load, *r) for r in level]
        readings = [x for b, a, _ in level for x in (b, a)]
        apart = sorted(abs(a / b - 1) for b, a, _ in level)
        mean = statistics.fmean(readings)
        print(f"{load:>4} {mean:>8.3f} {100 * statistics.stdev(readings) / mean:>5.1f}% "
              f"{100 * statistics.median(apart):>10.1f}% {100 * apart[int(0.9 * (len(apart) - 1))]:>5.1f}% "
              f"{statistics.fmean(s for _, _, s in level):>17.1f}")
    speeds = [speed_of(b, a) for _, b, a, _ in runs]
    corr = statistics.correlation(speeds, [s for *_, s in runs])
    jumps = [abs(s2 / s1 - 1) > 0.15 for (l1, *_), s1, (l2, *_), s2 in zip(runs, speeds, runs[1:], speeds[1:])
             if l1 == l2]
    print(f"correlation of the gauge's speed with the stand-in's steps/s over {len(runs)} runs: {corr:.2f}")
    print(f"consecutive runs at one load whose gauge speed differs by more than 15%: {sum(jumps)} of {len(jumps)}")


if __name__ == "__main__":
    main()
