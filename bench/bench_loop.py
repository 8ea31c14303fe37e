"""Loop overhead: how much wall time an experiment costs beyond its training budget, and where it goes.

Run: .venv/bin/python bench/bench_loop.py [--budget 10] [--experiments 3] [--backend cpu]

Copies the project into a temporary git repository, runs `loop.py run --agent local` on the tiny
protocol (prepared on the fly if needed, in the usual cache or AUTORESEARCH_CACHE) with the real
trainer for this host, sandboxed as always, then reads runs/<n>/meta.json and result.json of every
experiment after the baseline. Per experiment:

  overhead = (wall seconds per experiment - budget) / budget

with the wall seconds split into phases:
  agent        the agent's proposal (gap between one experiment's end and the next one's start;
               the local agent's first proposal imports the trainer once to see which lines apply)
  commit       scope check, diff, git commit
  spawn/export the sandbox's and the trainer's start and imports, and its hand-over (the torch.export
               of the model): trainer wall (timed by the loop) - the trainer's own total_seconds
  train        the trainer's counted training time (training_seconds)
  setup        the rest of the trainer's own time: model build, uncounted warm-up steps
  harness      the harness process scoring the hand-over (start, load, causality probe, val and holdout):
               the experiment's run time after the trainer's wall time
  bookkeeping  result parsing, guards, git reset, the results row
The loop's own share (agent + commit + bookkeeping) is printed separately from what the trainer
spends around its budget (spawn/export, setup, harness), which shrinks relative to the budget as the
budget grows (5 minutes under the standard protocol).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.test_loop import make_repo

PHASES = ("agent", "commit", "spawn/export", "setup", "train", "harness", "bookkeeping")


def phases(run_dir: Path, previous_end: float | None) -> dict[str, float]:
    meta = json.loads((run_dir / "meta.json").read_text())
    result = json.loads((run_dir / "result.json").read_text())
    t, summary = meta["timings"], result.get("claims", result.get("summary", {}))
    wall = result.get("trainer", {}).get("wall_seconds") or meta["row"]["wall_seconds"]
    total = summary.get("total_seconds") or wall
    train = summary.get("training_seconds") or 0.0
    return {
        "agent": meta["started_at"] - previous_end if previous_end else 0.0,
        "commit": t.get("commit", 0.0),
        "spawn/export": max(0.0, wall - total),
        "setup": max(0.0, total - train),
        "train": train,
        "harness": max(0.0, t["trainer"] - wall),
        "bookkeeping": t["total"] - t.get("commit", 0.0) - t["trainer"],
        "wall": meta["finished_at"] - (previous_end or meta["started_at"]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=10.0, help="training seconds per experiment (default 10)")
    ap.add_argument("--experiments", type=int, default=3, help="experiments after the baseline (default 3)")
    ap.add_argument("--backend", default=os.environ.get("AUTORESEARCH_BACKEND", "cpu"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        repo = make_repo(Path(tmp), trainer=None)  # the real trainer
        env = {**os.environ, "AUTORESEARCH_PROTOCOL": "tiny", "AUTORESEARCH_TIME_BUDGET": str(args.budget),
               "AUTORESEARCH_BACKEND": args.backend}
        env.pop("ANTHROPIC_API_KEY", None)
        cmd = [sys.executable, "loop.py", "run", "--agent", "local", "--tag", "bench", "--baseline-runs", "1",
               "--max-experiments", str(args.experiments)]
        print(f"running: {' '.join(cmd[1:])} (budget {args.budget:g} s, backend {args.backend})", flush=True)
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
        runs = sorted((p for p in (repo / "runs").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        rows = []
        for prev, run in zip(runs, runs[1:]):  # every experiment after the baseline
            if not (run / "result.json").exists():
                print(f"run {run.name} has no result (crashed?): skipped")
                continue
            prev_end = json.loads((prev / "meta.json").read_text())["finished_at"]
            rows.append(phases(run, prev_end))

    if not rows:
        print("no experiment finished; nothing to report", file=sys.stderr)
        return 1
    b = args.budget
    print(f"\n{'experiment':<12}" + "".join(f"{k:>14}" for k in (*PHASES, "wall")))
    for i, r in enumerate(rows, start=1):
        print(f"{i:<12}" + "".join(f"{r[k]:>14.3f}" for k in (*PHASES, "wall")))
    mean = {k: statistics.fmean(r[k] for r in rows) for k in (*PHASES, "wall")}
    print(f"\n{len(rows)} experiments, budget {b:g} s, mean wall {mean['wall']:.2f} s per experiment")
    print(f"{'phase':<14}{'seconds':>9}{'% of budget':>13}")
    for k in PHASES:
        print(f"{k:<14}{mean[k]:>9.3f}{100 * mean[k] / b:>12.2f}%")
    loop_own = mean["agent"] + mean["commit"] + mean["bookkeeping"]
    around = mean["spawn/export"] + mean["setup"] + mean["harness"]
    overrun = mean["train"] - b
    print(f"\noverhead (wall - budget) / budget: {100 * (mean['wall'] - b) / b:.1f}%")
    print(f"  loop's own (agent + commit + bookkeeping): {loop_own:.3f} s = {100 * loop_own / b:.2f}% of the budget")
    print(f"  trainer and harness around the budget (spawn/export + setup + harness): {around:.2f} s = "
          f"{100 * around / b:.1f}%")
    print(f"  training past the budget (last step): {overrun:.2f} s = {100 * overrun / b:.1f}%")
    print(f"  extrapolated, not measured: these {mean['wall'] - b:.2f} extra seconds (tiny protocol, this host) "
          f"against the standard protocol's 300 s budget would be {100 * (mean['wall'] - b) / 300:.1f}% (its "
          "trainer, data and harness differ: run it there to know)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
