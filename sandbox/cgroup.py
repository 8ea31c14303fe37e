"""A memory cgroup (v2) for every sandboxed run, where this host lets the loop make one (locked).

An rlimit on address space (RLIMIT_AS) cannot bound what a run keeps in RAM outside its own address
space: files in a tmpfs (the sandbox's /tmp and /dev/shm), memfd pages written with write(2), SysV
shared memory. A memory cgroup counts all of them, so every run the sandbox starts gets a group of
its own: `memory.max` is the run's memory cap, `memory.swap.max` 0 (no spilling to swap), and
`memory.oom.group` 1, so when the kernel ends a run for its memory it ends every process of the run
at once. `pids.max` is set there too where the pids controller is enabled. The group is removed
once the run's processes are gone (and any left at the loop's exit).

Where groups are made, the first that works:
1. `AUTORESEARCH_CGROUP=/sys/fs/cgroup/...`: a cgroup v2 directory delegated to this user; `none`
   turns groups off.
2. the root of the cgroup v2 hierarchy, where this process may write it (root, or a container's own
   cgroup namespace).
3. the loop's own cgroup, when the loop is alone in it (e.g. started by
   `systemd-run --user --scope -p Delegate=yes uv run loop.py ...`): the loop moves itself into a
   leaf group beside the runs' groups, which cgroup v2 requires.
Elsewhere (cgroup v1 hosts, containers without a writable cgroup, macOS) there is no group: the run's
memory is then bounded by RLIMIT_AS on CPU runs, and its tmpfs by their sizes (see sandbox/confine.py).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ENV_VAR", "RunGroup", "make", "parent", "sweep"]

ENV_VAR = "AUTORESEARCH_CGROUP"
_counter = itertools.count(1)
_made: list[RunGroup] = []


def _v2_mount() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted with its root visible, or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields = head.split()
        if tail.split()[:1] == ["cgroup2"] and len(fields) > 4 and fields[3] == "/":
            return Path(fields[4])
    return None


def _own(mount: Path) -> Path | None:
    """This process's cgroup v2 directory under `mount`."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return mount / line[3:].strip().lstrip("/")
    except OSError:
        pass
    return None


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _enable(group: Path) -> bool:
    """Make the memory controller (and, where it can, pids) available to `group`'s children."""
    if "memory" not in _words(group / "cgroup.controllers"):
        return False
    if "memory" not in _words(group / "cgroup.subtree_control"):
        try:
            (group / "cgroup.subtree_control").write_text("+memory\n")
        except OSError:
            return False
    if "pids" in _words(group / "cgroup.controllers") and "pids" not in _words(group / "cgroup.subtree_control"):
        try:
            (group / "cgroup.subtree_control").write_text("+pids\n")
        except OSError:
            pass
    return True


def _move_self_aside(own: Path) -> bool:
    """When this process is alone in its cgroup `own`, move it into a leaf `own`/autoresearch-loop-<pid>
    (cgroup v2 lets a group with processes have no children with controllers) and enable memory in
    `own`; put everything back when that fails."""
    me = os.getpid()
    if [int(p) for p in _words(own / "cgroup.procs")] != [me]:
        return False
    leaf = own / f"autoresearch-loop-{me}"
    try:
        leaf.mkdir(exist_ok=True)
        (leaf / "cgroup.procs").write_text(f"{me}\n")
    except OSError:
        _rmdir(leaf)
        return False
    if _enable(own):
        return True
    try:
        (own / "cgroup.procs").write_text(f"{me}\n")
    except OSError:
        pass
    _rmdir(leaf)
    return False


def _writable(group: Path) -> bool:
    return os.access(group / "cgroup.procs", os.W_OK) and os.access(group, os.W_OK)


@functools.lru_cache(maxsize=None)
def parent() -> tuple[Path | None, str]:
    """(the cgroup the runs' groups are made in, how it was chosen), or (None, why there is none)."""
    if not sys.platform.startswith("linux"):
        return None, "not Linux"
    forced = os.environ.get(ENV_VAR, "").strip()
    if forced.lower() in ("none", "off", "0"):
        return None, f"{ENV_VAR}={forced}"
    if forced:
        group = Path(forced)
        if not (group / "cgroup.controllers").is_file():
            return None, f"{ENV_VAR}={forced} is not a cgroup v2 directory"
        if not _writable(group) or not _enable(group):
            return None, f"{ENV_VAR}={forced} is not writable here, or has no memory controller"
        return group, f"{ENV_VAR}"
    mount = _v2_mount()
    if mount is None:
        return None, "no cgroup v2 hierarchy is mounted (cgroup v1 or none)"
    if _writable(mount) and _enable(mount):
        return mount, "the cgroup v2 root"
    own = _own(mount)
    if own is not None and own != mount and _writable(own) and _move_self_aside(own):
        return own, "the loop's own cgroup"
    if "memory" not in _words(mount / "cgroup.controllers"):
        return None, f"the cgroup v2 hierarchy at {mount} has no memory controller"
    return None, f"no cgroup under {mount} is writable by this process"


@dataclass
class RunGroup:
    """One run's cgroup: join it with `procs` from the child before exec."""

    path: Path
    memory_bytes: int

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        """How many of the run's processes the kernel ended for the group's memory cap."""
        try:
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, timeout: float = 2.0) -> bool:
        """Remove the group once its processes are gone (waits up to `timeout` for them)."""
        deadline = time.monotonic() + timeout
        while True:
            if _rmdir(self.path) or not self.path.exists():
                if self in _made:
                    _made.remove(self)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)


def make(memory_bytes: int, max_processes: int | None = None) -> RunGroup | None:
    """A new group for one run, capped at `memory_bytes` (and `max_processes` tasks), or None where
    this host gives none (see `parent`)."""
    root, _ = parent()
    if root is None:
        return None
    path = root / f"autoresearch-{os.getpid()}-{next(_counter)}"
    try:
        path.mkdir()
        (path / "memory.max").write_text(f"{int(memory_bytes)}\n")
        for name, value in (("memory.swap.max", 0), ("memory.oom.group", 1), ("pids.max", max_processes)):
            if value is not None and (path / name).exists():
                (path / name).write_text(f"{int(value)}\n")
    except OSError:
        _rmdir(path)
        return None
    group = RunGroup(path, int(memory_bytes))
    if not _made:
        atexit.register(sweep)
    _made.append(group)
    return group


def sweep() -> None:
    """Remove every group this process made whose processes are gone."""
    for group in list(_made):
        group.remove(timeout=0)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except OSError:
        return False
