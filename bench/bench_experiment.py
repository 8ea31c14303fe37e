"""Where one experiment's wall time goes, per trainer: start-up, warm-up, counted training, hand-over,
scoring, and the loop's own bookkeeping; and the tokens/s each trainer trained at.

Copies this working tree's tracked files into a temporary git repository and runs the real loop there
(`loop.py run --baseline-runs N --max-experiments 0`: N unchanged-trainer runs, sandboxed and scored by
the harness exactly as in a night of research) once per trainer, then splits each run's wall time with
the figures the run left behind (runs/<n>/meta.json, result.json):

  start-up + exit    trainer process wall, less what the trainer timed itself (interpreter, imports,
                     the process ending; the sandbox's own start is in here too)
  set-up             the trainer's main() until its first step (model, optimizer, dataloader)
  warm-up            the uncounted first steps (compilation) and per-step time outside the counted steps
  training           the counted training seconds (the budget)
  export             torch.export / mx.export_function of the trained model (hand-over)
  harness start      the harness after the loop's go-ahead: graph load and checks, process exit (its
                     interpreter, imports and data hash checks ran beside the trainer, at low priority)
  val eval           scoring the validation tokens (with the causality probe)
  holdout eval       scoring the holdout tokens
  loop               everything else the loop does per run (workspace, records, git)

The trainer's own figures (set-up, warm-up, training, export) are its word, fine for a benchmark; the
loop never trusts them. Each figure is the median over the runs, with the range. `--set NAME=VALUE`
edits a hyperparameter in the copied trainer (e.g. the comparison config of depth 2, width 128, 4,096
tokens per step: `--set DEVICE_BATCH_SIZE=16 --set TOTAL_BATCH_SIZE=4096`).

Run: .venv/bin/python bench/bench_experiment.py [--trainers torch,mlx] [--runs 3] [--budget 60]
                                                [--protocol tiny] [--set NAME=VALUE ...]
                                                [--omp-wait ACTIVE|PASSIVE|both]
The protocol must be prepared (`uv run prepare.py --protocol tiny`); AUTORESEARCH_CACHE is honoured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAINERS = {"torch": ("cpu", "train_cuda.py"), "mlx": ("mlx", "train_mlx.py")}
PHASES = ["start-up + exit", "set-up", "warm-up", "training", "export", "harness start", "val eval",
          "holdout eval", "loop"]


def copy_tree(dst: Path) -> None:
    """This working tree's files (tracked and untracked, not ignored; as they are now) into a fresh git
    repository at dst."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dst, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "bench"], cwd=dst, check=True)


def set_hyperparameters(path: Path, settings: list[str]) -> None:
    """NAME=VALUE edits of the trainer's hyperparameter block (every assignment of NAME in it)."""
    text = path.read_text()
    for item in settings:
        name, _, value = item.partition("=")
        text, n = re.subn(rf"^(\s*){re.escape(name)} = [^#\n]*", rf"\g<1>{name} = {value} ", text, flags=re.M)
        if not n:
            sys.exit(f"--set {item}: {path.name} has no hyperparameter {name}")
    path.write_text(text)


def phases(run_dir: Path) -> dict[str, float] | None:
    """One run's wall time split into PHASES (seconds), plus its counted tokens/s; None if it did not score."""
    try:
        meta = json.loads((run_dir / "meta.json").read_text())
        rec = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return None
    ev, trainer_wall = rec.get("eval") or {}, rec["trainer"]["wall_seconds"]
    facts = rec.get("claims") or rec.get("summary") or {}  # the trainer's own account (older records: "summary")
    if not ev.get("valid"):
        return None
    harness_wall = meta["timings"]["trainer"] - trainer_wall  # run_once: the trainer, then the harness
    own = facts["total_seconds"] + facts.get("export_seconds", 0.0)
    warmup = facts.get("warmup_steps")  # the trainer's own count of uncounted steps (nan tokens/s without it)
    counted = max(facts["num_steps"] - warmup, 0) if warmup is not None else float("nan")
    per_step = facts["total_tokens"] / facts["num_steps"] if facts.get("num_steps") else 0
    out = {
        "start-up + exit": trainer_wall - own,
        "set-up": facts["startup_seconds"],
        "warm-up": facts["total_seconds"] - facts["startup_seconds"] - facts["training_seconds"],
        "training": facts["training_seconds"],
        "export": facts.get("export_seconds", float("nan")),
        "harness start": harness_wall - ev["eval_seconds"] - ev["holdout_seconds"],
        "val eval": ev["eval_seconds"],
        "holdout eval": ev["holdout_seconds"],
        "loop": meta["timings"]["total"] - meta["timings"]["trainer"],
        "wall": meta["timings"]["total"],
        "tok_s": counted * per_step / facts["training_seconds"] if facts["training_seconds"] else 0.0,
        "val_bpb": ev["val_bpb"],
    }
    return out


def bench(trainer: str, args, cache_env: dict) -> list[dict[str, float]]:
    backend, filename = TRAINERS[trainer]
    with tempfile.TemporaryDirectory(prefix="bench-experiment-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        copy_tree(repo)
        if args.set:
            set_hyperparameters(repo / filename, args.set)
            subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "-c",
                            "commit.gpgsign=false", "commit", "-q", "-am", "settings"], cwd=repo, check=True)
        env = dict(cache_env, AUTORESEARCH_BACKEND=backend, PYTHONDONTWRITEBYTECODE="1")
        env.pop("ANTHROPIC_API_KEY", None)
        if args.budget:
            env["AUTORESEARCH_TIME_BUDGET"] = str(args.budget)
        cmd = [sys.executable, "loop.py", "run", "--agent", "scripted", "--script", str(Path(tmp) / "none.json"),
               "--baseline-runs", str(args.runs), "--max-experiments", "0", "--tag", "bench", "--backend", backend]
        (Path(tmp) / "none.json").write_text("[]")
        if args.protocol:
            cmd += ["--protocol", args.protocol]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        total = time.perf_counter() - t0
        runs = sorted((d for d in (repo / "runs").iterdir() if d.name.isdigit()), key=lambda d: int(d.name)) \
            if (repo / "runs").is_dir() else []
        got = [p for p in (phases(d) for d in runs) if p]
        if not got:
            print(f"{trainer}: no scored run (loop exit {proc.returncode}): "
                  f"{proc.stdout[-1500:]}{proc.stderr[-1000:]}")
        else:
            print(f"{trainer}: {len(got)} scored runs of {filename} in {total:.0f} s of loop wall")
        return got


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:8.2f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{med:8.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", default="torch,mlx", help="comma-separated: torch (train_cuda.py on CPU), "
                        "mlx (train_mlx.py)")
    parser.add_argument("--runs", type=int, default=3, help="runs per trainer (medians are printed)")
    parser.add_argument("--budget", type=float, default=None, help="training seconds (default: the protocol's)")
    parser.add_argument("--protocol", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="edit a hyperparameter of the copied trainer (repeatable)")
    parser.add_argument("--omp-wait", default=None, choices=("PASSIVE", "ACTIVE", "both"),
                        help="OMP_WAIT_POLICY for the trainer and the harness (default: as the loop runs them, "
                             "the trainer with OpenMP's default, the harness PASSIVE; both: a set of runs with "
                             "each policy, ACTIVE first)")
    args = parser.parse_args()
    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    if bad := [t for t in trainers if t not in TRAINERS]:
        parser.error(f"unknown trainer {bad[0]!r}; choose from {', '.join(TRAINERS)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"host: {os.cpu_count()} CPUs, load average {load:.1f} at start; settings: {args.set or 'baseline'}")
    policies = ["ACTIVE", "PASSIVE"] if args.omp_wait == "both" else [args.omp_wait]
    results = {}
    for policy in policies:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        for t in trainers:
            name = f"{t} {policy.lower()}" if len(policies) > 1 else t
            results[name] = bench(t, args, env)
    cols = list(results)
    said = " / ".join(p or "as the loop sets it" for p in policies)
    print(f"\nseconds per experiment, median (min-max) of each trainer's runs (OMP_WAIT_POLICY {said}); "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<16}" + "".join(f"{c:>22}" for c in cols))
    for ph in PHASES + ["wall"]:
        print(f"{ph:<16}" + "".join(f"{fmt([r[ph] for r in results[c]]):>22}" for c in cols))
    print(f"{'outside training':<16}" + "".join(
        (f"{100 * statistics.median(1 - r['training'] / r['wall'] for r in results[c]):20.1f} %" if results[c]
         else f"{'-':>22}") for c in cols))
    print(f"{'tokens/s':<16}" + "".join(f"{fmt([r['tok_s'] for r in results[c]]):>22}" for c in cols))
    print(f"{'val_bpb':<16}" + "".join(f"{fmt([r['val_bpb'] for r in results[c]]):>22}" for c in cols))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
