"""The loop's own gauge of the machine's speed: a fixed piece of work, timed by the loop.

`gauge()` runs the same CPU workload every time and returns the seconds it took: more seconds, a
slower machine (other jobs on it, a lower clock). The work is split over one thread per core the
process may use (OMP_NUM_THREADS when set, as Ray sets it for each worker), each doing the same
fixed NumPy element-wise operations on a small array (NumPy releases the GIL in them), and the
reading is the wall time until the last thread is done: like a trainer's step, it waits for the
slowest core, so it slows down when other jobs take cores from the trainer. About 0.1 s on a quiet
2-core machine.

The loop reads it just before and just after every run, in the process that starts the trainer (the
loop itself, or the Ray worker that runs it), so each row carries two readings taken on the machine
the trainer ran on, under the load it ran under. Nothing the trainer writes goes into it: it
replaces the trainer's own steps per second as the machine's speed (the drift rule of
research/session.py) and is the keep rule's second covariate (research/noise.py). bench/bench_gauge.py
measures how well it repeats and how it follows a training workload's speed.

`LoadMeter` reads what the kernel counts instead: the cores other programs kept busy while the trainer
trained (the keep rule's first covariate, Linux only). bench/bench_noise.py compares the two.

On CUDA and ROCm hosts it measures the host's CPU, not the GPU. AUTORESEARCH_GAUGE_REPS sets the work per
reading (REPS rounds by default; 0 turns the gauge off: no readings, so the drift rule has nothing to go on).
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
from pathlib import Path

__all__ = ["REPS", "REPS_ENV", "LOAD_ENV", "LoadMeter", "busy_seconds", "gauge", "gauge_reps", "gauge_threads", "slowness",
           "speed_of", "tree_seconds"]

SIZE = 1 << 16  # float32 elements per thread: 256 KiB, inside any core's L2 cache
REPS = 600  # rounds of (sin, multiply, add) per thread: ~0.1 s on the 2-core Xeon the project is tested on
REPS_ENV = "AUTORESEARCH_GAUGE_REPS"


def gauge_reps() -> int:
    """Rounds per reading: AUTORESEARCH_GAUGE_REPS when it is a whole number >= 0, else REPS."""
    try:
        n = int(os.environ.get(REPS_ENV, ""))
    except ValueError:
        return REPS
    return n if n >= 0 else REPS


def gauge_threads() -> int:
    """Threads the gauge uses: OMP_NUM_THREADS when set (a Ray worker's share of the cores), else the
    cores this process may run on (what a trainer's thread pool takes)."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        n = 0
    if n > 0:
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def gauge(reps: int | None = None, threads: int | None = None) -> float | None:
    """Seconds the fixed workload took now (wall time, until the slowest thread is done): on each of
    `threads` threads (default gauge_threads()), `reps` rounds (default gauge_reps()) of sin, multiply and
    add over the same fixed array. Only the machine changes the reading. None when the gauge is off."""
    import numpy as np

    reps = gauge_reps() if reps is None else reps
    if reps <= 0:
        return None
    n = threads or gauge_threads()
    x = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    outs = [np.empty_like(x) for _ in range(n)]
    for y in outs:
        np.sin(x, out=y)  # page the buffers in before the clock starts
    start = threading.Barrier(n + 1)

    def work(y) -> None:
        start.wait()
        for _ in range(reps):
            np.sin(x, out=y)
            np.multiply(y, x, out=y)
            np.add(y, x, out=y)

    pool = [threading.Thread(target=work, args=(y,), daemon=True) for y in outs]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return time.perf_counter() - t0


def speed_of(*readings: float | None) -> float | None:
    """The machine's speed from gauge readings: the fixed work per second, 1 / (mean seconds); None when
    there is no usable reading."""
    xs = [x for x in readings if x is not None and math.isfinite(x) and x > 0]
    return len(xs) / math.fsum(xs) if xs else None


def slowness(*readings: float | None) -> float | None:
    """The machine's slowness around a run, the covariate of the keep rule (research/noise.py): the log of
    the mean seconds of the gauge's readings; None when there is no usable reading."""
    v = speed_of(*readings)
    return -math.log(v) if v else None


# ---------------------------------------------------------------------------
# What other programs took from the machine while a trainer ran (the kernel's accounting)
# ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOAD_ENV = "AUTORESEARCH_LOAD_METER"  # "0": no load readings (the tests' default: their machine's load is not theirs)


def busy_seconds(proc: Path = Path("/proc")) -> float | None:
    """CPU seconds every process of the machine has used since boot, by the kernel's count (/proc/stat:
    user, nice, system, irq, softirq and steal time of all cores); None where there is no /proc/stat."""
    try:
        fields = (proc / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _TICK


def tree_seconds(pid: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds a live process and its live descendants have used (each one's own time and that of the
    children it has waited for); 0 for a process that is gone."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = (proc / str(p) / "stat").read_text()
            for task in (proc / str(p) / "task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        after = stat[stat.rfind(")") + 2:].split()  # fields from the state on; the name may hold spaces
        if len(after) > 14:
            total += sum(int(x) for x in after[11:15]) / _TICK  # utime, stime, cutime, cstime
    return total


def _own_seconds() -> float:
    """CPU seconds of this process and of the children it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMeter:
    """How many cores other programs kept busy while a trainer ran: the machine's busy CPU time by the kernel
    (/proc/stat) minus what this process and all its descendants used, live or ended (the trainer's whole
    sandboxed tree, the waiting harness, and any process of theirs that outlived its parent: the loop is
    their subreaper), per second of wall time. The trainer cannot move it: everything it starts is one of
    this process's descendants and counts as the run's own. None where the kernel does not say (no
    /proc: macOS) and with AUTORESEARCH_LOAD_METER=0."""

    def __init__(self) -> None:
        self.off = os.environ.get(LOAD_ENV, "").strip() == "0"
        self.t0 = time.perf_counter()
        self.busy0 = busy_seconds()
        self.family0 = self._family()

    @staticmethod
    def _family() -> float:
        mine = tree_seconds(os.getpid())  # this process, its waited children, its live descendants
        return mine if mine > 0 else _own_seconds()  # no /proc/<pid>: at least what getrusage says

    def stop(self) -> float | None:
        """Cores used by others on average since the start (0 on a machine the run had to itself)."""
        busy, wall = busy_seconds(), time.perf_counter() - self.t0
        if self.off or busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (self._family() - self.family0)) / wall
