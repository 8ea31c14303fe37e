"""The wall-time rule against honest runs and against a trainer that knows it.

Copies this working tree into a temporary git repository and, on the `tiny` protocol with the real
train_cuda.py, sandboxed as always:

1. runs the branch's baselines (`loop.py run --baseline-runs N --max-experiments 0`): the rule comes from
   their wall times (research/clock.py);
2. runs the unchanged trainer K more times through `loop.py try` (each with a comment appended: same model,
   new trainer hash) and counts how many were rejected (overtime) and how many the deadline shortened;
3. runs an honest change that adds SLOW seconds of set-up (a sleep before training), which the deadline
   should shorten rather than get rejected;
4. plays the attacks: `old` reads its own start from /proc/self/stat and trains until the limit of the
   rule this project had before (budget + 1.5 x the slowest baseline's seconds past the budget + 10 s,
   less 5 s), first under the current rule and then under that old rule (given as --startup-allowance);
   `deadline` reads the deadline the loop tells it and trains until that deadline less a guess of its
   own hand-over time, for each guess in --guesses.

Each attack's trainer reports its true training seconds and steps. Its extra training is the difference
to the median honest run, in counted seconds (training_seconds) and in steps, and as a share of the budget.

Run: .venv/bin/python bench/bench_clock.py [--budget 8] [--baselines 5] [--honest 8] [--slow 3]
                                           [--guesses 0.4,0.8,1.2] [--keep DIR]
The protocol must be prepared (`uv run prepare.py --protocol tiny`); AUTORESEARCH_CACHE is honoured. The
machine's load average is printed at the start and end: the rule's bound is for a quiet host. On a machine
shared with other jobs, OMP_NUM_THREADS=1 keeps the trainer's steps from slowing 20-fold whenever another
process takes a core (OpenMP's spinning threads), which a quiet host would not do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_experiment import copy_tree

from research.results import read_results

STEP_ANCHOR = "        budget = clock.budget(total_training_time, dt)\n"
MAIN_ANCHOR = "\n\ndef main():\n"
HOSTILE = r'''

def hostile_budget(trained, dt, protocol):
    """Train until the end this attack aims at, whatever the budget (the loop times the run from outside)."""
    import json
    now = time.time()
    if ATTACK == "old":  # the old rule's limit, from this process's own start time
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        end = start + protocol.time_budget + OLD_ALLOWANCE - 5.0
    else:  # the deadline the loop tells every run, less a guess of this run's own hand-over time
        spec = json.loads(os.environ.get("AUTORESEARCH_DEADLINE") or "null")
        if not spec:
            return protocol.time_budget
        end = spec["deadline"] - TAIL_GUESS
    return trained + (end - now - dt)
'''


def hostile(text: str, attack: str, old_allowance: float = 0.0, guess: float = 0.0) -> str:
    assert STEP_ANCHOR in text and MAIN_ANCHOR in text, "train_cuda.py changed: update the bench's anchors"
    text = text.replace(STEP_ANCHOR, "        budget = hostile_budget(total_training_time, dt, protocol)\n", 1)
    head = f"\nATTACK = {attack!r}\nOLD_ALLOWANCE = {old_allowance!r}\nTAIL_GUESS = {guess!r}\n"
    return text.replace(MAIN_ANCHOR, head + HOSTILE + MAIN_ANCHOR, 1)


def slow_start(text: str, seconds: float) -> str:
    anchor = "    clock = prepare.TrainingClock(protocol)"
    assert anchor in text
    return text.replace(anchor, f"    time.sleep({seconds!r})  # a slower set-up (a compile, a bigger model)\n"
                        + anchor, 1)


class Lab:
    def __init__(self, repo: Path, env: dict[str, str]) -> None:
        self.repo, self.env = repo, env

    def loop(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "loop.py", *args], cwd=self.repo, env=self.env, text=True,
                              capture_output=True, stdin=subprocess.DEVNULL)

    def rows(self):
        return read_results(self.repo / "results.tsv")

    def try_(self, text: str, description: str, *flags: str):
        (self.repo / "train_cuda.py").write_text(text)
        before = len(self.rows())
        proc = self.loop("try", description, "--no-confirm", "--no-early-abort", "--remeasure-every", "0", *flags)
        new = [r for r in self.rows()[before:] if r.status != "rerun"]
        subprocess.run(["git", "checkout", "-q", "--", "."], cwd=self.repo)
        if not new:
            raise SystemExit(f"try {description!r} recorded nothing: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return new[-1]

    def trainer(self) -> str:
        return subprocess.run(["git", "show", "HEAD:train_cuda.py"], cwd=self.repo, capture_output=True, text=True,
                              check=True).stdout


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = f", sd {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
    return f"median {statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}{sd})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=8.0)
    ap.add_argument("--baselines", type=int, default=5)
    ap.add_argument("--honest", type=int, default=8, help="runs of the unchanged trainer after the baselines")
    ap.add_argument("--slow", type=float, default=3.0, help="seconds of set-up the slow honest change adds (0: none)")
    ap.add_argument("--guesses", default="0.4,0.8,1.2", help="the deadline attack's guesses of its hand-over time")
    ap.add_argument("--keep", default=None, help="keep the repository in this directory")
    args = ap.parse_args()
    B = args.budget
    load0 = os.getloadavg()[0]
    print(f"host: {os.cpu_count()} CPUs, load average {load0:.1f} at start; tiny, budget {B:g} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-clock-"))
    repo = tmp / "repo"
    repo.mkdir()
    copy_tree(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "AUTORESEARCH_WALL"))}
    env.update(AUTORESEARCH_TIME_BUDGET=f"{B:g}", AUTORESEARCH_PROTOCOL="tiny", AUTORESEARCH_BACKEND="cpu",
               PYTHONDONTWRITEBYTECODE="1")
    if "AUTORESEARCH_CACHE" in os.environ:
        env["AUTORESEARCH_CACHE"] = os.environ["AUTORESEARCH_CACHE"]
    lab = Lab(repo, env)
    subprocess.run(["git", "checkout", "-q", "-b", "autoresearch/clock"], cwd=repo, check=True)
    (tmp / "none.json").write_text("[]")
    t0 = time.perf_counter()
    proc = lab.loop("run", "--agent", "scripted", "--script", str(tmp / "none.json"), "--baseline-runs",
                    str(args.baselines), "--max-experiments", "0", "--tag", "clock")
    base = [r for r in lab.rows() if r.status == "keep"]
    if proc.returncode != 0 or not base:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 1
    walls = [r.wall_seconds for r in base]
    print(f"\nbaselines ({len(base)}, {time.perf_counter() - t0:.0f} s): wall {fmt(walls)}; "
          f"first step {fmt([r.first_step_s for r in base if r.first_step_s])}; "
          f"last step to end {fmt([r.tail_s for r in base if r.tail_s])}; "
          f"steps {fmt([float(r.num_steps) for r in base])}", flush=True)
    rule_line = [ln for ln in proc.stdout.splitlines() if "wall-time rule:" in ln][-1:] or [""]
    rule_line = rule_line[0]
    print(f"  {rule_line.split('wall-time rule:', 1)[-1].strip()}", flush=True)

    text = lab.trainer()
    honest = []
    for k in range(args.honest):
        row = lab.try_(text + f"# unchanged, repeat {k + 1}\n", f"unchanged trainer, repeat {k + 1}")
        honest.append(row)
        cut = row.training_seconds is not None and row.training_seconds < B - 1e-6
        print(f"  honest {k + 1}: {row.status:8s} wall {row.wall_seconds:.2f} s (limit {row.wall_limit_s or 0:.2f}), "
              f"trained {row.training_seconds or 0:.2f} s{' (cut by the deadline)' if cut else ''}, "
              f"{row.num_steps} steps; load {os.getloadavg()[0]:.1f}", flush=True)
    ok = [r for r in honest if r.ok]
    rejected = [r for r in honest if r.status == "rejected"]
    cuts = [B - r.training_seconds for r in ok if r.training_seconds is not None and r.training_seconds < B - 1e-6]
    all_walls = walls + [r.wall_seconds for r in honest if r.wall_seconds]
    print(f"\nhonest runs of the unchanged trainer: {len(honest)}, rejected {len(rejected)}, shortened by the deadline "
          f"{len(cuts)}" + (f" (by {fmt(cuts)} s)" if cuts else "") +
          f"; wall of all {len(all_walls)} runs {fmt(all_walls)}", flush=True)
    med_train = statistics.median([r.training_seconds for r in ok + base if r.training_seconds])
    med_steps = statistics.median([r.num_steps for r in ok + base if r.num_steps])
    per_step = med_train / max(1, med_steps - 1)

    if args.slow > 0:
        row = lab.try_(slow_start(text, args.slow), f"{args.slow:g} s more set-up")
        print(f"honest change with {args.slow:g} s more set-up: {row.status}, wall {row.wall_seconds:.2f} s "
              f"(limit {row.wall_limit_s or 0:.2f}), trained {row.training_seconds or 0:.2f} s, {row.num_steps} steps",
              flush=True)

    old_allowance = 1.5 * max(0.0, max(walls) - B) + 10.0
    print(f"\nattacks (honest median: {med_train:.2f} s counted, {med_steps:g} steps, {per_step * 1000:.0f} ms/step):",
          flush=True)
    plays = [("old", f"old rule's limit ({B:g} + {old_allowance:.1f} - 5 s) from /proc/self/stat, new rule",
              hostile(text, "old", old_allowance), ())]
    plays.append(("old", "the same, under the old rule (--startup-allowance "
                  f"{old_allowance:.1f})", hostile(text, "old", old_allowance),
                  ("--startup-allowance", f"{old_allowance:.2f}")))
    for g in [float(x) for x in args.guesses.split(",") if x.strip()]:
        plays.append(("deadline", f"the told deadline less {g:g} s", hostile(text, "deadline", guess=g), ()))
    best = None
    for _, what, trainer, flags in plays:
        row = lab.try_(trainer, f"attack: {what}", *flags)
        extra = (row.training_seconds or 0) - med_train
        steps = (row.num_steps or 0) - med_steps
        print(f"  {what}: {row.status}, wall {row.wall_seconds or 0:.2f} s (limit {row.wall_limit_s or 0:.2f}); "
              f"trained {row.training_seconds or 0:.2f} s, {row.num_steps} steps: {extra:+.2f} s "
              f"({100 * extra / B:+.1f}% of the budget), {steps:+g} steps; val_bpb {row.val_bpb:.4f}"
              + (f" ({row.note[:90]})" if row.status == "rejected" else ""), flush=True)
        if row.ok and not flags and (best is None or extra > best):
            best = extra
    if best is not None:
        print(f"\nlargest extra training an accepted attack got under the current rule: {best:+.2f} s "
              f"({100 * best / B:+.1f}% of the {B:g} s budget)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.keep:
        shutil.copytree(repo, args.keep, dirs_exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
