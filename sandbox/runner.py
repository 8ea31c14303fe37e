"""Run one child process of an experiment (the trainer, then the harness): sandboxed, in its own
process group, timed from outside, its output captured to a capped log, everything it started
ended afterwards.

A sandboxed child's `preexec_fn` is a `sandbox.confine.Confined`: while the child runs, the size of its
write paths is checked about every second (`DISK_CHECK_S`) and once more when it ends, and a child
whose paths hold more than their cap is ended; the kernel may end it for its memory cgroup's cap.
Either way the run's `limit` says so in one sentence, and its log too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["Child", "LeakFilter", "TrainerRun", "end", "run_trainer", "spawn", "wait_child", "kill_group", "LOG_HEAD_BYTES",
           "LOG_TAIL_BYTES"]

TERM_GRACE_S = 5.0  # after SIGTERM, how long the group gets before SIGKILL
DISK_CHECK_S = 1.0  # how often a run's write paths are measured (less often when measuring takes long)
ENTRY_BYTES = 4096  # every file, directory or link counts as at least this much (an inode, a block)
LOG_HEAD_BYTES = 2 << 20  # a run's log keeps its first 2 MiB ...
LOG_TAIL_BYTES = 2 << 20  # ... and its last 2 MiB; what lies between is cut, and the cut is marked


@dataclass
class TrainerRun:
    returncode: int | None  # None when killed by the loop
    wall_seconds: float
    timed_out: bool
    started: float  # time.time() at spawn
    log_bytes: int = 0  # bytes the process wrote (the log may hold fewer: see LOG_HEAD_BYTES)
    stopped: bool = False  # ended by the loop because `should_stop()` said so (early abort)
    limit: str | None = None  # the resource cap it went past and was ended for, in one sentence
    wall_limit_s: float | None = None  # the wall time it was held to (research/clock.py); None: not held to one
    first_step_s: float | None = None  # seconds from its start to its first training step line, as the loop saw it
    tail_s: float | None = None  # seconds from its last training step line to its end


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


# The reference-leak report that extensions built with nanobind print when the interpreter exits (triton since
# its switch to nanobind, whenever torch loaded it; MLX): dozens of lines after the run's own last line, harmless
# and misleading at the end of a crash log. Dropped from run logs, counted in one line instead.
_LEAK_LINE = re.compile(rb"(nanobind: leaked \d+ [\w ]+!|\s*- leaked (instance|type|function|keep_alive)\b.*"
                        rb"|nanobind: this is likely caused by a reference counting issue.*"
                        rb"|See https://nanobind\.readthedocs\.io/\S*refleaks\S*|\s*- \.\.\. skipped remainder)\s*")
_MAX_PARTIAL = 65536  # a line longer than this without its end is written as it is


class LeakFilter:
    """Line by line, drops the exit-time leak report (`_LEAK_LINE`) from a stream of output chunks; what is
    kept comes out unchanged, a line held back until its end arrives (or it grows past _MAX_PARTIAL)."""

    def __init__(self) -> None:
        self.partial = b""
        self.dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > _MAX_PARTIAL:
            lines.append(self.partial)
            self.partial = b""
            last_whole = False
        else:
            last_whole = True
        kept = []
        for i, line in enumerate(lines):
            if _LEAK_LINE.fullmatch(line.rstrip(b"\r")):
                self.dropped += 1
            else:
                kept.append(line if (not last_whole and i == len(lines) - 1) else line + b"\n")
        return b"".join(kept)

    def close(self) -> bytes:
        """The last unfinished line, then one line saying how many were dropped (if any)."""
        rest, self.partial = self.partial, b""
        if rest and _LEAK_LINE.fullmatch(rest.rstrip(b"\r")):
            self.dropped, rest = self.dropped + 1, b""
        note = (f"\n[loop] {self.dropped} lines of nanobind reference-leak warnings printed at exit left out "
                "(harmless)\n") if self.dropped else ""
        return rest + note.encode()


class _CappedLog(threading.Thread):
    """Copy a pipe to a file: the first `head` bytes as they come, then only the last `tail` bytes,
    written with a marker of what was cut once the pipe closes. Never holds more than `tail` in memory.
    `on_chunk(bytes)`, if given, also gets every chunk as it comes (the live loss curve); an error in
    it turns it off and never stops the copy."""

    def __init__(self, pipe, path: Path, head: int, tail: int,
                 on_chunk: Callable[[bytes], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.pipe, self.path, self.head, self.tail = pipe, path, head, tail
        self.on_chunk = on_chunk
        self.total = 0

    def run(self) -> None:
        ring = bytearray()
        leaks = LeakFilter()
        logged = 0  # bytes that went to the log (the leak report left out)
        with open(self.path, "ab") as out:
            while True:
                raw = self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536)
                if not raw:
                    break
                if self.on_chunk is not None:
                    try:
                        self.on_chunk(raw)
                    except Exception:  # noqa: BLE001 - a failing watcher stops watching; the run goes on
                        self.on_chunk = None
                self.total += len(raw)
                chunk = leaks.feed(raw)
                room = max(0, self.head - logged)
                if room:
                    out.write(chunk[:room])
                    out.flush()
                ring += chunk[room:]
                if len(ring) > self.tail:
                    del ring[: len(ring) - self.tail]
                logged += len(chunk)
            cut = logged - self.head - len(ring)
            if cut > 0:
                out.write(f"\n[loop] ... {cut:,} bytes of output cut here (log kept to its first and last "
                          f"{self.head >> 20} MiB) ...\n".encode())
            out.write(bytes(ring) + leaks.close())


@dataclass
class Child:
    """A started child (see `spawn`): its process, the thread copying its output, when it started."""

    proc: subprocess.Popen
    log: _CappedLog
    log_path: Path
    started: float  # time.time() at spawn
    t0: float  # time.perf_counter() at spawn
    on_spawn: Callable[[int | None], None] | None = None
    confined: object | None = None  # the sandbox.confine.Confined it was started with (its cgroup, its caps)

    def release(self, line: bytes | None) -> None:
        """Write `line` to a child started with `stdin_pipe` (e.g. the harness's go-ahead), then close its
        stdin (end of file: a waiting harness then exits unscored). Never raises: a child already gone
        just does not read it."""
        if self.proc.stdin is None:
            return
        try:
            if line:
                self.proc.stdin.write(line)
            self.proc.stdin.close()
        except OSError:
            pass


def spawn(argv: list[str], *, cwd: Path, env: dict[str, str], log_path: Path,
          on_spawn: Callable[[int | None], None] | None = None, preexec_fn: Callable[[], None] | None = None,
          on_output: Callable[[bytes], None] | None = None, stdin_pipe: bool = False) -> Child:
    """Start `argv` (already wrapped in its sandbox) in `cwd` with `env` in a process group of its own,
    output appended to `log_path` (capped) as it comes. With `stdin_pipe` its stdin is a pipe the loop
    writes to (Child.release); otherwise /dev/null. `on_spawn(pgid)` is called once it runs."""
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=preexec_fn)
    log = _CappedLog(proc.stdout, log_path, LOG_HEAD_BYTES, LOG_TAIL_BYTES, on_output)
    log.start()
    if on_spawn is not None:
        on_spawn(proc.pid)
    confined = preexec_fn if hasattr(preexec_fn, "finish") else None
    return Child(proc, log, log_path, started, t0, on_spawn, confined)


def run_trainer(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log_path: Path,
    timeout_s: float,
    on_tick: Callable[[float], None] | None = None,
    tick_s: float = 0.5,
    on_spawn: Callable[[int | None], None] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    reap: Callable[[], None] | None = None,
    on_output: Callable[[bytes], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainerRun:
    """Run `argv` (already wrapped in its sandbox) in `cwd` with `env`, output appended to `log_path`
    (capped); kill its group past `timeout_s`. `reap()` ends whatever it left running afterwards.
    `on_output(chunk)` sees the output as it comes; `should_stop()`, asked every tick, ends the group
    early when it returns True (the run then has `stopped` set and no return code).

    An exception in the caller's thread (Ctrl-C) ends the child's group before propagating.
    `on_spawn(pgid)` is called once the child runs, `on_spawn(None)` once its group is gone.
    """
    child = spawn(argv, cwd=cwd, env=env, log_path=log_path, on_spawn=on_spawn, preexec_fn=preexec_fn,
                  on_output=on_output)
    return wait_child(child, timeout_s=timeout_s, on_tick=on_tick, tick_s=tick_s, reap=reap,
                      should_stop=should_stop)


def wait_child(child: Child, *, timeout_s: float, on_tick: Callable[[float], None] | None = None,
               tick_s: float = 0.5, reap: Callable[[], None] | None = None,
               should_stop: Callable[[], bool] | None = None, since: float | None = None) -> TrainerRun:
    """Wait for a spawned child as `run_trainer` describes; its wall time and `timeout_s` count from
    `since` (a time.perf_counter() value: e.g. when a pre-started harness was given the go-ahead),
    by default from its start."""
    proc, log, log_path = child.proc, child.log, child.log_path
    t0 = child.t0 if since is None else since
    timed_out = stopped = False
    disk = _DiskWatch(getattr(child.confined, "watch", None))
    limit = None  # the cap it went past, in one sentence
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
                if should_stop is not None and should_stop():
                    stopped = True
                    kill_group(proc, grace=1.0)
                    break
                limit = disk.check()
                if limit is not None:  # ended by the loop, like a timeout: no exit code
                    limit += "; ended by the loop"
                    kill_group(proc, grace=1.0)
                    break
                if on_tick is not None:
                    on_tick(elapsed)
    except BaseException:
        end(child, reap)
        raise
    wall = time.perf_counter() - t0
    ended = timed_out or stopped or limit is not None
    memory = _finish(proc, log, reap, child.on_spawn, child.confined)
    limit = limit or memory or (None if ended else disk.check(force=True))
    if timed_out:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n[loop] killed after {wall:.1f} s: past the {timeout_s:.0f} s limit\n")
    elif limit is not None:
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n[loop] {limit}\n")
    return TrainerRun(returncode=None if ended else proc.returncode, wall_seconds=wall, timed_out=timed_out,
                      started=child.started, log_bytes=log.total, stopped=stopped, limit=limit)


class _DiskWatch:
    """Measures a run's write paths (the sandbox's `watch`: paths and the bytes they may hold together)
    about every DISK_CHECK_S, or less often when measuring takes long."""

    def __init__(self, watch: tuple[list[Path], int] | None) -> None:
        self.paths, self.cap = watch if watch else ([], 0)
        self.next = time.monotonic() + DISK_CHECK_S

    def check(self, force: bool = False) -> str | None:
        """One sentence when the paths hold more than the cap, else None."""
        if not self.cap or (not force and time.monotonic() < self.next):
            return None
        t = time.monotonic()
        used = used_bytes(self.paths, stop_at=self.cap)
        self.next = time.monotonic() + max(DISK_CHECK_S, 5 * (time.monotonic() - t))
        if used <= self.cap:
            return None
        from sandbox.confine import size_text

        return (f"wrote more than {size_text(self.cap)} into its workspace, past the cap "
                f"(AUTORESEARCH_WORKSPACE_CAP)")


def used_bytes(paths: list[Path], stop_at: int | None = None) -> int:
    """Disk space the files under `paths` take (allocated blocks, each entry at least ENTRY_BYTES, hard
    links once), symlinks not followed; stops counting once past `stop_at`. Never raises: what cannot
    be read (a file removed meanwhile) does not count."""
    seen: set[tuple[int, int]] = set()
    total, stack = 0, [os.fspath(p) for p in paths]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += max(st.st_blocks * 512, ENTRY_BYTES)
                if stop_at is not None and total > stop_at:
                    return total
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return total


def end(child: Child, reap: Callable[[], None] | None = None) -> None:
    """End a child that is not needed (or on Ctrl-C): its stdin closed, its group killed, its output
    copied, what it left reaped."""
    child.release(None)
    kill_group(child.proc, grace=1.0)
    _finish(child.proc, child.log, reap, child.on_spawn, child.confined)


def _finish(proc: subprocess.Popen, log: _CappedLog, reap: Callable[[], None] | None,
            on_spawn: Callable[[int | None], None] | None, confined=None) -> str | None:
    """Nothing the run started outlives it: its group, then (through `reap`) whatever left the group; then
    its cgroup is removed. Returns the sentence saying the kernel ended it for its memory cap, or None."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if reap is not None:
        reap()
    memory = confined.finish() if confined is not None else None
    log.join(timeout=10)  # the pipe closes once every process holding it is gone
    proc.stdout.close()
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    if on_spawn is not None:
        on_spawn(None)
    return memory
