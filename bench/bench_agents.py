"""optuna vs local: the same number of experiments from the same baseline, best val_bpb and holdout.

    uv run bench/bench_agents.py                       # tiny protocol, CPU, 12 experiments, seed 0
    uv run bench/bench_agents.py --experiments 20 --seeds 0 1 2 --budget 15

The project is copied into a scratch git repository (the real train_cuda.py / train_mlx.py), the
branch's baseline runs are made once (`--baseline-runs`, default 2), and that repository is then
copied once per agent and seed, so every agent starts from the very same baseline rows and
resumes the same branch with `loop.py run --agent A --seed S --max-experiments N`. The table gives,
per run, the best val_bpb the loop ended with (the mean of the best trainer's runs), the best
single measured val_bpb with its holdout_bpb, keeps, crashes, and the time taken; and the run-to-run
noise of the baseline, to compare the difference against. Results also go to
reports/bench_agents.md (the scratch repositories are removed unless --keep).
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

from research.results import MEASURED, read_results

PROJECT_FILES = ("loop.py", "prepare.py", "data", "model", "backends", "judge", "sandbox", "research", "agents",
                 "reporting", "program.md", "train_cuda.py", "train_mlx.py", ".gitignore", "pyproject.toml")


def scratch_repo(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for f in PROJECT_FILES:
        src = ROOT / f
        if src.is_dir():
            shutil.copytree(src, dest / f, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / f)
    git = ["git", "-C", str(dest), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "project"], check=True)
    return dest


def loop(repo: Path, env: dict, *args: str, log: Path) -> float:
    t0 = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ loop.py {' '.join(args)}\n")
        f.flush()
        proc = subprocess.run([sys.executable, "loop.py", *args], cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"loop.py {' '.join(args)} failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - t0


def summarize(repo: Path, branch: str, log: Path) -> dict:
    rows = [r for r in read_results(repo / "results.tsv") if r.branch == branch]
    exp = [r for r in rows if not r.note.startswith("baseline")]
    measured = [r for r in rows if r.status in MEASURED and r.val_bpb > 0]
    best_row = min(measured, key=lambda r: r.val_bpb)
    done = [line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if "done:" in line]
    final = float(done[-1].rsplit("best val_bpb", 1)[1].split()[0]) if done and "best val_bpb" in done[-1] else None
    return {"final_best": final, "best_val": best_row.val_bpb, "best_holdout": best_row.holdout_bpb,
            "best_desc": best_row.description, "experiments": sum(r.status != "rerun" for r in exp),
            "keeps": sum(r.status == "keep" for r in exp), "crashes": sum(r.status in ("crash", "invalid", "rejected")
                                                                             for r in exp),
            "aborts": sum(r.status == "abort" for r in exp)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", nargs="+", default=["optuna", "local"])
    ap.add_argument("--experiments", type=int, default=12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budget", type=float, default=10.0, help="training seconds per run (default 10)")
    ap.add_argument("--protocol", default="tiny")
    ap.add_argument("--backend", default=None, help="default: detected")
    ap.add_argument("--baseline-runs", type=int, default=2)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further loop.py run options")
    ap.add_argument("--keep", action="store_true", help="keep the scratch repositories")
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}
    import prepare

    env.update(AUTORESEARCH_PROTOCOL=args.protocol, AUTORESEARCH_TIME_BUDGET=str(args.budget),
               AUTORESEARCH_CACHE=str(prepare.cache_root()), PYTHONDONTWRITEBYTECODE="1")
    if args.backend:
        env["AUTORESEARCH_BACKEND"] = args.backend
    work = Path(tempfile.mkdtemp(prefix="bench-agents-"))
    logs = ROOT / "reports"
    logs.mkdir(exist_ok=True)
    log = logs / "bench_agents.log"
    log.write_text("", encoding="utf-8")
    tag, branch = "bench", "autoresearch/bench"
    try:
        base = scratch_repo(work / "base")
        subprocess.run([sys.executable, "prepare.py", "--protocol", args.protocol], cwd=base, env=env, check=True,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        t = loop(base, env, "run", "--agent", "local", "--max-experiments", "0", "--tag", tag, "--baseline-runs",
                 str(args.baseline_runs), *args.extra, log=log)
        rows = [r for r in read_results(base / "results.tsv") if r.branch == branch and r.status in MEASURED]
        vals = [r.val_bpb for r in rows]
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        print(f"baseline: {len(vals)} runs {', '.join(f'{v:.6f}' for v in vals)} (sd {sd:.6f}), {t:.0f} s", flush=True)
        results = []
        for seed in args.seeds:
            for agent in args.agents:
                repo = work / f"{agent}-{seed}"
                shutil.copytree(base, repo, symlinks=True)
                run_log = logs / f"bench_agents-{agent}-{seed}.log"
                run_log.write_text("", encoding="utf-8")
                t = loop(repo, env, "run", "--agent", agent, "--seed", str(seed), "--max-experiments",
                         str(args.experiments), "--tag", tag, "--baseline-runs", str(args.baseline_runs), *args.extra,
                         log=run_log)
                s = summarize(repo, branch, run_log)
                s.update(agent=agent, seed=seed, seconds=t)
                results.append(s)
                print(f"{agent} seed {seed}: final best {s['final_best']}, best run {s['best_val']:.6f} (holdout "
                      f"{s['best_holdout']}), {s['keeps']} keeps, {s['crashes']} failed, {s['aborts']} aborted, "
                      f"{t:.0f} s; best: {s['best_desc']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"scratch repositories kept in {work}")
    lines = [f"# optuna vs local on {args.protocol} ({args.experiments} experiments, budget {args.budget:g} s, "
             f"seeds {' '.join(map(str, args.seeds))})", "",
             f"Baseline: {', '.join(f'{v:.6f}' for v in vals)} (run-to-run sd {sd:.6f})", "",
             "| agent | seed | final best (mean of best's runs) | best run val_bpb | its holdout_bpb | keeps | failed | "
             "aborted | minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for s in results:
        hold = f"{s['best_holdout']:.6f}" if s["best_holdout"] is not None else "—"
        final = f"{s['final_best']:.6f}" if s["final_best"] is not None else "—"
        lines.append(f"| {s['agent']} | {s['seed']} | {final} | {s['best_val']:.6f} | {hold} | {s['keeps']} | "
                     f"{s['crashes']} | {s['aborts']} | {s['seconds'] / 60:.1f} |")
    for agent in args.agents:
        finals = [s["final_best"] for s in results if s["agent"] == agent and s["final_best"] is not None]
        if finals:
            lines.append(f"\n{agent}: mean final best {statistics.mean(finals):.6f} over {len(finals)} seed(s)")
    (logs / "bench_agents.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
