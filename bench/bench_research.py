"""The keep/discard rule before and after: the same offline research session under the old rule (noise
floor = range of two baseline runs, best = the last kept run, every run to the end) and the new one
(pooled run-to-run noise and a one-sided t-test with a confirm run, best = mean of the best trainer's
runs, periodic re-runs, early abort), side by side.

Run: .venv/bin/python bench/bench_research.py [--budget 20] [--experiments 10] [--neutral-every 3]
                                               [--old-ref REF] [--seed 0] [--rules old,new]

For each rule it copies the project into a temporary git repository (the old rule from git `--old-ref`,
default: the commit before research/decisions.py was added; the new one from this working tree) and runs
`loop.py run --agent local --max-experiments N` in-process on the `tiny` protocol with the real trainer,
sandboxed as always, with the rule's default settings. Every `--neutral-every`-th proposal is replaced
by a deliberately neutral edit (a comment appended to the trainer: same model, new trainer hash), so
a keep among them is a false keep. The two sessions run at the same time (--sequential: one after
the other), so that both see the same load on a shared machine; the machine's load average is
sampled every 5 s during each and printed with it.

Printed per rule, from what the run recorded (results.tsv and the clock):
  experiments        proposals run (baseline runs, confirm runs and re-runs of the best are not counted)
  runs               trainer runs of any kind, and how many were stopped early (abort)
  wall               seconds from start to end, and of that the time after the baselines
  experiments/hour   over the whole session, and after the baselines
  best val_bpb       what the rule calls its best (old: the last kept run; new: the mean of the best
                     trainer's runs), with the number of runs behind it
  holdout of best    holdout_bpb of the same runs (never used for a decision)
  neutral kept       neutral edits kept / neutral edits decided
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from tests.test_loop import PROJECT_FILES, make_repo

NEUTRAL = "neutral: comment-only edit"

# Runs inside the copied repository, with its own research/ on sys.path (old or new code alike): the
# local agent, with every k-th proposal swapped for a comment-only edit, driven by loop.main().
DRIVER = r'''
import sys, time
sys.path.insert(0, ".")
import agents as A

every, seed = int(sys.argv[1]), int(sys.argv[2])

class NeutralEvery(A.Agent):
    name = "local+neutral"
    can_fix = False

    def __init__(self):
        self.inner, self.k = A.LocalAgent(seed=seed), 0

    def propose(self, ctx):
        self.k += 1
        if every and self.k % every == 0:
            path = ctx.repo / ctx.trainer
            path.write_text(path.read_text(encoding="utf-8") + f"\n# a note, {self.k}: nothing changes here\n",
                            encoding="utf-8")
            return A.Proposal(f"NEUTRAL {self.k}")
        return self.inner.propose(ctx)

A.make_agent = lambda kind, **kw: NeutralEvery()
import loop
t0 = time.time()
code = loop.main(["run", "--agent", "local", *sys.argv[3:]])
print(f"BENCH-WALL {time.time() - t0:.1f}", flush=True)
sys.exit(code)
'''.replace("NEUTRAL", NEUTRAL)


def old_ref() -> str:
    """The commit before research/decisions.py was added (HEAD while it is not committed yet)."""
    added = subprocess.run(["git", "-C", str(ROOT), "log", "--diff-filter=A", "--format=%H", "--",
                            "research/decisions.py"], capture_output=True, text=True).stdout.split()
    return f"{added[-1]}~1" if added else "HEAD"


def repo_at(ref: str, tmp: Path, name: str) -> Path:
    """A temporary git repository holding the project as it was at `ref` (the same files make_repo copies)."""
    src = tmp / f"{name}-src"
    src.mkdir()
    data = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "--",
                           *[f for f in PROJECT_FILES if subprocess.run(
                               ["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}:{f}"],
                               capture_output=True).returncode == 0]],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(src)
    repo = tmp / name
    repo.mkdir()
    subprocess.run(["cp", "-a", f"{src}/.", str(repo)], check=True)
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "project"],
                   check=True)
    return repo


class LoadSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(5.0):
            self.samples.append(os.getloadavg()[0])


def run_rule(rule: str, repo: Path, args) -> dict:
    # each rule prepares `tiny` with its own code into its own cache (the data layer may differ between them)
    env = {**os.environ, "AUTORESEARCH_PROTOCOL": "tiny", "AUTORESEARCH_TIME_BUDGET": str(args.budget),
           "AUTORESEARCH_BACKEND": args.backend, "PYTHONDONTWRITEBYTECODE": "1",
           "AUTORESEARCH_CACHE": str(repo.parent / f"{rule}-cache")}
    env.pop("ANTHROPIC_API_KEY", None)
    cmd = [sys.executable, "-c", DRIVER, str(args.neutral_every), str(args.seed), "--tag", "bench",
           "--max-experiments", str(args.experiments)]
    print(f"[{rule}] running {args.experiments} experiments in {repo} (budget {args.budget:g} s)...", flush=True)
    sampler = LoadSampler()
    sampler.start()
    prep = subprocess.run([sys.executable, "prepare.py", "--protocol", "tiny"], cwd=repo, env=env,
                          capture_output=True, text=True)
    if prep.returncode != 0:
        raise SystemExit(f"[{rule}] prepare.py failed: {prep.stdout[-2000:]}{prep.stderr[-2000:]}")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    t_end = time.time()
    wall = t_end - t0
    sampler.stop.set()
    if args.logs:  # the console output and the results file, to read or recompute later
        (Path(args.logs) / f"{rule}.log").write_text(proc.stdout + proc.stderr)
        if (repo / "results.tsv").exists():
            (Path(args.logs) / f"{rule}-results.tsv").write_bytes((repo / "results.tsv").read_bytes())
    if proc.returncode != 0:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"[{rule}] the loop failed (exit {proc.returncode})")
    sys.path.insert(0, str(ROOT))
    from research.results import read_results

    rows = read_results(repo / "results.tsv")
    base_end = max((_finished(repo, r.run) for r in rows if r.note.startswith("baseline")), default=t0)
    return {"rows": rows, "wall": wall, "after": t_end - base_end, "load": sampler.samples}


def _finished(repo: Path, run: int | None) -> float:
    import json

    try:
        return float(json.loads((repo / "runs" / str(run) / "meta.json").read_text())["finished_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def summarize(rule: str, res: dict) -> dict:
    rows = res["rows"]
    base = [r for r in rows if r.note.startswith("baseline")]
    reruns = [r for r in rows if r.status == "rerun"]
    exps = [r for r in rows if r not in base and r.status != "rerun"]
    neutral = [r for r in exps if r.description.startswith(NEUTRAL)]
    decided = [r for r in neutral if r.status in ("keep", "discard", "abort")]
    after = res["after"]  # from the end of the last baseline run to the end
    kept = [r for r in exps if r.status == "keep"]
    if rule == "old":  # the old loop's best: the last kept run, else the baselines' mean
        best_rows = [kept[-1]] if kept else [r for r in base if r.ok]
        best = statistics.fmean(r.val_bpb for r in best_rows)
    else:
        from research.ledger import replay

        st = replay(rows, 0.0005)
        best_rows, best = st.best_runs, st.best
    holdouts = [r.holdout_bpb for r in best_rows if r.holdout_bpb]
    return {
        "experiments": len(exps),
        "runs": sum(r.status != "rejected" for r in rows),  # one row per trainer run (the old rule: confirm off)
        "aborts": sum(r.status == "abort" for r in rows),
        "reruns": len(reruns),
        "keeps": len(kept),
        "wall": res["wall"],
        "after": after,
        "per_hour": 3600 * len(exps) / res["wall"],
        "per_hour_after": 3600 * len(exps) / after if after > 0 else float("nan"),
        "best": best,
        "best_n": len(best_rows),
        "holdout": statistics.fmean(holdouts) if holdouts else None,
        "neutral_kept": sum(r.status == "keep" for r in decided),
        "neutral": len(decided),
        "load": (statistics.fmean(res["load"]), min(res["load"]), max(res["load"])) if res["load"] else None,
        "baselines": len(base),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=20.0, help="training seconds per run (default 20)")
    ap.add_argument("--experiments", type=int, default=10, help="proposals per rule (default 10)")
    ap.add_argument("--neutral-every", type=int, default=3, help="every k-th proposal is a comment-only edit (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="the local agent's seed (default 0)")
    ap.add_argument("--old-ref", default=None, help="git ref of the old rule (default: before research/decisions.py)")
    ap.add_argument("--rules", default="old,new", help="which rules to run, in order (default old,new)")
    ap.add_argument("--backend", default=os.environ.get("AUTORESEARCH_BACKEND", "cpu"))
    ap.add_argument("--logs", default=None, help="a folder to write each rule's console output to")
    ap.add_argument("--sequential", action="store_true",
                    help="run the rules one after the other (default: at the same time, so that they share the "
                         "machine's load; on a shared machine the load changes more between two sessions than the "
                         "rules change anything)")
    args = ap.parse_args()
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)

    results = {}
    ref = args.old_ref or old_ref()
    rules = args.rules.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-research-") as tmp:
        repos = {rule: repo_at(ref, Path(tmp), rule) if rule == "old" else make_repo(Path(tmp), trainer=None, name=rule)
                 for rule in rules}
        if args.sequential:
            for rule in rules:
                results[rule] = summarize(rule, run_rule(rule, repos[rule], args))
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(rules)) as pool:
                futures = {rule: pool.submit(run_rule, rule, repos[rule], args) for rule in rules}
                for rule in rules:
                    results[rule] = summarize(rule, futures[rule].result())

    print(f"\ntiny protocol, budget {args.budget:g} s, {args.experiments} proposals per rule (every "
          f"{args.neutral_every}th a comment-only edit), local agent seed {args.seed}, {os.cpu_count()} CPUs, "
          f"rules run {'one after the other' if args.sequential else 'at the same time'}; old rule from {ref}")
    names = list(results)
    lines = [
        ("load average (mean, min-max)", lambda s: "n/a" if not s["load"] else
         f"{s['load'][0]:.1f} ({s['load'][1]:.1f}-{s['load'][2]:.1f})"),
        ("baseline runs", lambda s: f"{s['baselines']}"),
        ("trainer runs in all", lambda s: f"{s['runs']}"),
        ("experiments", lambda s: f"{s['experiments']}"),
        ("runs stopped early (abort)", lambda s: f"{s['aborts']}"),
        ("re-runs (confirm + best)", lambda s: f"{s['reruns']}"),
        ("kept changes", lambda s: f"{s['keeps']}"),
        ("wall, s (after baselines)", lambda s: f"{s['wall']:.0f} ({s['after']:.0f})"),
        ("experiments/hour (after baselines)", lambda s: f"{s['per_hour']:.1f} ({s['per_hour_after']:.1f})"),
        ("best val_bpb (runs behind it)", lambda s: f"{s['best']:.6f} ({s['best_n']})"),
        ("holdout_bpb of the best", lambda s: f"{s['holdout']:.6f}" if s["holdout"] else "n/a"),
        ("neutral edits kept", lambda s: f"{s['neutral_kept']} of {s['neutral']}"),
    ]
    print(f"{'':<38}" + "".join(f"{n:>22}" for n in names))
    for label, fmt in lines:
        print(f"{label:<38}" + "".join(f"{fmt(results[n]):>22}" for n in names))
    if "old" in results and "new" in results:
        o, n = results["old"], results["new"]
        print(f"\nexperiments/hour new/old: {n['per_hour'] / o['per_hour']:.2f}x overall, "
              f"{n['per_hour_after'] / o['per_hour_after']:.2f}x after the baselines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
