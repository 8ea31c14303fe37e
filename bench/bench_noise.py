"""How much of the run-to-run noise the keep rule's speed covariate takes out, on this machine, for real.

Run: .venv/bin/python bench/bench_noise.py [--runs 12] [--budget 20] [--load 50,70] [--results FILE]

Copies the project into a temporary git repository and runs `loop.py run --max-experiments 0
--baseline-runs N` on the `tiny` protocol with the real trainer, sandboxed as always: N runs of the
unchanged trainer. Meanwhile a synthetic load comes and goes (`--load ON,OFF`: one process busy on one
core for ON seconds, then idle for OFF seconds; `--load 0` for none), so some runs share the machine and
some do not, as on a machine shared with other jobs. `--results FILE` reads an existing results.tsv
instead of running anything.

Printed from the rows (research/noise.py's own fit, as the loop makes it):
  per run            val_bpb, steps (the trainer's claim), the gauge's seconds before/after, the cores
                     other programs kept busy while it trained (others_cpu)
  sigma              the pooled run-to-run sigma unadjusted, and after each covariate the rule may use
                     (research/ledger.py COVARIATES: "load", the cores others kept busy, then "gauge", the
                     log of the gauge's seconds), with the share of the variance it explains, and which
                     one the loop's ledger picks
  80%-power gain     the smallest gain a change's two runs (screen + confirm) must have to be kept 80% of
                     the time against the mean of the N baselines at alpha 0.05: (t_0.95 + t_0.80) * sigma *
                     sqrt(1/N + 1/2), unadjusted and adjusted
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from research.ledger import COVARIATES, replay
from research.noise import pooled_noise, t_ppf
from research.results import read_results

HOG = """
import sys, time
on, off = float(sys.argv[1]), float(sys.argv[2])
while True:
    t = time.time()
    while time.time() - t < on:
        pass
    time.sleep(off)
"""


def collect(runs: int, budget: float, load: tuple[float, float] | None, where: Path) -> Path:
    from tests.test_loop import make_repo

    repo = make_repo(where, trainer=None, name="repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "AUTORESEARCH_"))}
    env.update(AUTORESEARCH_PROTOCOL="tiny", AUTORESEARCH_BACKEND="cpu", AUTORESEARCH_TIME_BUDGET=str(budget),
               AUTORESEARCH_WALL_MARGIN=str(max(10.0, budget)))
    hog = subprocess.Popen([sys.executable, "-c", HOG, str(load[0]), str(load[1])]) if load else None
    try:
        subprocess.run([sys.executable, "loop.py", "run", "--agent", "optuna", "--max-experiments", "0",
                        "--baseline-runs", str(runs), "--tag", "noise"], cwd=repo, env=env, check=True)
    finally:
        if hog is not None:
            hog.kill()
    return repo / "results.tsv"


def power_gain(sigma: float, df: float, m: int, alpha: float = 0.05) -> float:
    return (t_ppf(1 - alpha, df) + t_ppf(0.8, df)) * sigma * math.sqrt(1 / m + 1 / 2)


def report(path: Path) -> None:
    rows = [r for r in read_results(path) if r.ok and r.val_bpb > 0]
    print(f"{len(rows)} measured runs of one trainer from {path}")
    print(" run  val_bpb  steps  gauge before/after s  others_cpu")
    for r in rows:
        others = "" if r.others_cpu is None else f"{r.others_cpu:.2f}"
        print(f"{r.run!s:>4}  {r.val_bpb:.4f}  {r.num_steps!s:>5}  {r.gauge_before_s!s:>8} / {r.gauge_after_s!s:<8}"
              f"  {others:>8}")
    m = len(rows)
    for name, cov in COVARIATES.items():
        groups = {"base": [(r.val_bpb, r.num_steps, cov(r)) for r in rows]}
        noise = pooled_noise(groups, 0.0005, name)
        raw = noise.unadjusted()
        line = f"{name}: σ {raw.sigma:.4f} unadjusted (df {raw.df}), 80%-power gain {power_gain(raw.sigma, raw.df, m):.4f}"
        if noise.speed is not None:
            line += (f"; adjusted σ {noise.sigma:.4f} (df {noise.df}, explains {100 * noise.speed.share:.0f}%), "
                     f"80%-power gain {power_gain(noise.sigma, noise.df, m):.4f}")
        else:
            line += "; no supported fit (the rule would not adjust)"
        print(line)
    st = replay(rows, 0.0005)
    print(f"the loop's ledger adjusts for: {st.covariate or 'nothing'}; {st.noise.describe()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--load", default="50,70", help="ON,OFF seconds of one busy process; 0 for none")
    ap.add_argument("--results", type=Path, default=None, help="read this results.tsv instead of running")
    args = ap.parse_args()
    if args.results:
        report(args.results)
        return 0
    load = None if args.load.strip() in ("0", "") else tuple(float(x) for x in args.load.split(","))
    with tempfile.TemporaryDirectory(prefix="bench_noise-") as tmp:
        report(collect(args.runs, args.budget, load, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
