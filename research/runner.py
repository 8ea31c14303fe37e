"""Run the trainer as a child process: own process group, captured output, hard timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["TrainerRun", "run_trainer", "kill_group"]

TERM_GRACE_S = 5.0  # after SIGTERM, how long the group gets before SIGKILL


@dataclass
class TrainerRun:
    returncode: int | None  # None when killed by the loop
    wall_seconds: float
    timed_out: bool
    started: float  # time.time() at spawn


def kill_group(proc: subprocess.Popen, grace: float = TERM_GRACE_S) -> None:
    """End the child's whole process group: SIGTERM, a grace period, then SIGKILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also reaps grandchildren that outlived the leader
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_trainer(
    repo: Path,
    trainer: str,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    on_tick: Callable[[float], None] | None = None,
    tick_s: float = 0.5,
    on_spawn: Callable[[int | None], None] | None = None,
) -> TrainerRun:
    """Run `python trainer` in `repo` with `env`, output to `log_path`; kill the group past `timeout_s`.

    An exception in the caller's thread (Ctrl-C) ends the child's group before propagating.
    `on_spawn(pgid)` is called once the child runs, `on_spawn(None)` once its group is gone.
    """
    started = time.time()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, trainer],
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if on_spawn is not None:
            on_spawn(proc.pid)
        timed_out = False
        try:
            while True:
                try:
                    proc.wait(timeout=tick_s)
                    break
                except subprocess.TimeoutExpired:
                    elapsed = time.perf_counter() - t0
                    if elapsed > timeout_s:
                        timed_out = True
                        kill_group(proc)
                        break
                    if on_tick is not None:
                        on_tick(elapsed)
        except BaseException:
            kill_group(proc, grace=1.0)
            if on_spawn is not None:
                on_spawn(None)
            raise
        wall = time.perf_counter() - t0
        # Stragglers the trainer left in its group (data workers) must not outlive the experiment.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if on_spawn is not None:
            on_spawn(None)
    if timed_out:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n[loop] killed after {wall:.1f} s: past the {timeout_s:.0f} s limit\n")
    return TrainerRun(returncode=None if timed_out else proc.returncode, wall_seconds=wall, timed_out=timed_out,
                      started=started)
