"""The OS sandbox every trainer run goes through (locked).

The runner builds a `SandboxPolicy`, asks `wrap(detect(), argv, policy)` for the command line and
a `preexec_fn`, and starts that with its own scrubbed `env`, `cwd=policy.cwd` and
`start_new_session=True`. Three kinds, best first:

- "bwrap" (Linux, bubblewrap): new user, PID, mount, network, IPC, UTS and cgroup namespaces, all
  capabilities dropped, no nested user namespaces where bwrap >= 0.8, `--die-with-parent`,
  `--new-session`. The child's root is an empty tmpfs onto which only the allowed paths are
  bound (read-only, or read-write for `write_paths`), so everything else, the repository's
  `.git`, `runs/`, `results.tsv` and the cache's other files included, does not exist there.
  It gets a fresh /proc showing only its own processes, a minimal read-only /dev, private tmpfs
  on /tmp and /dev/shm of a set size (`tmp_bytes`, `shm_bytes`: their pages are RAM, which
  RLIMIT_AS does not count), and no network but its own loopback. When the trainer exits, bwrap exits and
  its PID 1 is killed, which kills every process left in the namespace, `setsid` or not.
- "landlock" (Linux fallback, unprivileged): sandbox/landlock.py confines itself with Landlock and
  seccomp and execs the program. Files outside the policy cannot be opened, listed, written or
  executed; TCP (ABI >= 4), every new socket (seccomp), signals and abstract sockets leaving the
  run (ABI >= 6) are refused; of /proc only the trainer's own /proc/<pid> and a few global
  files (cpuinfo, meminfo, stat) are readable, and Landlock's ptrace rule keeps other
  processes' environ and memory closed regardless. It cannot hide that a path exists, cannot
  hide the names in a directory that holds an allowed file (Python must list the directory a
  module is imported from), and cannot end processes: the caller calls `become_subreaper()`
  once and `kill_orphans(...)` after each run. /dev/shm and the host's /tmp are not writable
  (the trainer's TMPDIR is in its workspace, whose size the runner watches).
- "seatbelt" (macOS `sandbox-exec`): see sandbox/seatbelt.py; untested on hardware.

Set AUTORESEARCH_SANDBOX=bwrap|landlock|seatbelt|none to force one (tests, users).

For the caller: the env passed to Popen is the trainer's own (and, under bwrap, that of the
namespace's PID 1, which the trainer can read), so it must already be free of secrets; set HOME
and TMPDIR to the private tmp (the host's /tmp is not writable under Landlock) and compiler caches
(TRITON_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, CUDA_CACHE_PATH) to a write path. Spawn and wait from
the same thread: "die with parent" fires when the spawning thread ends. Treat what a run wrote as
hostile: its directories may hold symlinks pointing anywhere and FIFOs that block a reader.

Rlimits: RLIMIT_CORE 0 always; RLIMIT_AS when `max_memory_bytes`; RLIMIT_FSIZE when
`max_file_bytes` (a write past it fails with EFBIG, or SIGXFSZ for programs that do not ignore it);
RLIMIT_NPROC is per real uid and counts threads, so it is set to the tasks the user already runs
plus `max_processes`; the kernel ignores it for root, so for root it is not set.

Memory: with `memory_cap_bytes`, every run joins a cgroup of its own (sandbox/cgroup.py: memory.max,
no swap, the whole run ended on OOM) where this host lets the loop make one; it counts what RLIMIT_AS
cannot (tmpfs files, memfd and shared memory pages). The `preexec_fn` that `wrap` returns is a
`Confined`: its `group` (or None) and `watch` (the write paths and `disk_bytes`, their allowed size
together, or None) are for the runner, which watches the size, ends a run past it, and removes the
group after the run (`Confined.finish`).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sandbox import cgroup

__all__ = ["KINDS", "Confined", "size_text", "SandboxError", "SandboxPolicy", "become_subreaper", "describe", "detect",
           "kill_orphans", "wrap"]

KINDS = ("bwrap", "landlock", "seatbelt")
ENV_VAR = "AUTORESEARCH_SANDBOX"
LAUNCHER = Path(__file__).resolve().parent / "landlock.py"
MAX_POLICY_ARG = 100_000  # one argv string may hold 128 KiB on Linux

# /etc is shown entry by entry: the dynamic linker's cache, name service and user lookup, time
# zone, TLS roots and the alternatives links behind cc/c++ (which Triton and Inductor invoke).
# The rest stays hidden because it can hold credentials (shadow, ssh host keys, pip.conf index
# tokens, netrc, NetworkManager connections, proxy settings in /etc/environment).
ETC_ENTRIES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "passwd", "group",
               "hosts", "host.conf", "resolv.conf", "gai.conf", "localtime", "timezone", "ssl",
               "ca-certificates", "pki", "crypto-policies", "alternatives", "os-release",
               "lsb-release", "debian_version", "protocols", "services", "mime.types",
               "locale.alias", "locale.conf")
ROOT_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
PROC_FILES = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/sys/vm/overcommit_memory")
GPU_GLOBS = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri", "/dev/kfd")
GPU_DIRS = ("/opt/rocm",)
BWRAP_FLAGS = ("--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
               "--die-with-parent", "--new-session")
BWRAP_FLAGS_OLD = ("--unshare-all", "--cap-drop", "ALL", "--die-with-parent", "--new-session")


class SandboxError(RuntimeError):
    """The requested sandbox cannot be had, or a policy cannot be enforced."""


@dataclass
class SandboxPolicy:
    """What one trainer run may touch; the system part (see ETC_ENTRIES etc.) is added by wrap."""

    cwd: Path  # inside a read or write path, or a directory holding read paths (the repo)
    read_paths: list[Path]  # files or directories, read-only: an exact allowlist
    write_paths: list[Path]  # directories, read-write: per-run dir, private tmp, compiler cache
    gpu: bool = False  # also GPU device nodes (and /proc/driver, /opt/rocm)
    max_processes: int | None = 512
    max_memory_bytes: int | None = None  # RLIMIT_AS
    memory_cap_bytes: int | None = None  # memory.max of the run's own cgroup, where one can be made
    max_file_bytes: int | None = None  # RLIMIT_FSIZE: the largest file the run may write
    disk_bytes: int | None = None  # what the write paths may hold together (watched by the runner)
    tmp_bytes: int | None = None  # size of the private /tmp tmpfs (bwrap; None: unsized)
    shm_bytes: int | None = None  # size of the private /dev/shm tmpfs (bwrap; None: unsized)


# --- what this host can enforce -------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bwrap_flags() -> tuple[str, ...] | None:
    """The namespace flags bwrap accepts here (it is started once to find out), or None."""
    exe = shutil.which("bwrap")
    if exe is None or not sys.platform.startswith("linux"):
        return None
    for flags in (BWRAP_FLAGS, BWRAP_FLAGS_OLD):
        probe = [exe, *flags, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
                 sys.executable, "-I", "-c", ""]
        try:
            if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
                return flags
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


@functools.lru_cache(maxsize=None)
def _bwrap_version() -> str:
    out = subprocess.run([shutil.which("bwrap") or "bwrap", "--version"], capture_output=True,
                         text=True).stdout.split()
    return out[-1] if out else "?"


@functools.lru_cache(maxsize=None)
def landlock_abi() -> int:
    """The Landlock ABI of this kernel; 0 when it has none."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    return max(libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)), 0)


def _available(kind: str) -> bool:
    if kind == "bwrap":
        return _bwrap_flags() is not None
    if kind == "landlock":
        return landlock_abi() >= 1 and os.uname().machine in ("x86_64", "aarch64")
    return sys.platform == "darwin" and os.path.exists("/usr/bin/sandbox-exec")


def detect() -> str | None:
    """"bwrap", "landlock" or "seatbelt": the best this host enforces; None when none.

    AUTORESEARCH_SANDBOX forces a kind ("none" forces None); forcing one this host lacks raises.
    """
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced == "none":
        return None
    if forced:
        if forced not in KINDS:
            raise SandboxError(f"{ENV_VAR}={forced} is not one of {', '.join(KINDS)} or none.")
        if not _available(forced):
            raise SandboxError(f"{ENV_VAR}={forced} asks for a sandbox this host cannot provide.")
        return forced
    return next((kind for kind in KINDS if _available(kind)), None)


def describe() -> str:
    """One line for `python -m backends`: the sandbox trainer runs will get."""
    kind = detect()
    if kind == "bwrap":
        return (f"sandbox: bubblewrap {_bwrap_version()} (user/PID/mount/network/IPC namespaces, "
                "fresh /proc, no capabilities)")
    if kind == "landlock":
        abi = landlock_abi()
        extra = "".join([", TCP denied" if abi >= 4 else "",
                         ", signals and abstract sockets scoped" if abi >= 6 else ""])
        return (f"sandbox: Landlock ABI {abi} (filesystem allowlist{extra}; seccomp denies "
                "sockets; leftover processes ended by the loop)")
    if kind == "seatbelt":
        return "sandbox: Seatbelt via /usr/bin/sandbox-exec (profile untested on hardware)"
    if os.environ.get(ENV_VAR, "").strip().lower() == "none":
        return f"sandbox: none ({ENV_VAR}=none) — loop.py refuses to run trainers unless --no-sandbox"
    return "sandbox: none available — loop.py refuses to run trainers unless --no-sandbox"


# --- the policy, checked and completed --------------------------------------------------------

def _python_dirs() -> list[Path]:
    """The interpreter's installation and environment: readable and executable, never writable."""
    import site
    dirs = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), *site.getsitepackages()}
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    if user_site and os.path.isdir(user_site):
        dirs.add(user_site)
    found = {Path(d) for d in dirs if d and os.path.isdir(d)}
    return sorted(d for d in found if not any(o != d and _inside(d, o) for o in found))


def _gpu_paths() -> list[Path]:
    found = dict.fromkeys(p for pattern in GPU_GLOBS for p in sorted(glob.glob(pattern)))
    return [Path(p) for p in found if os.path.exists(p)]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _absolute(paths: Iterable[Path | str], what: str) -> list[Path]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_absolute():
            raise SandboxError(f"{what} path {p} is not absolute.")
        if not p.exists():
            raise SandboxError(f"{what} path {p} does not exist.")
        out.append(Path(os.path.abspath(p)))
    return out


def _checked(policy: SandboxPolicy) -> tuple[list[Path], list[Path], Path]:
    """Read paths, write paths and cwd, absolute and existing; raises SandboxError otherwise."""
    read = _absolute(policy.read_paths, "read")
    write = _absolute(policy.write_paths, "write")
    fixed = [*read, *_python_dirs()]
    for w in write:
        if not w.is_dir():
            raise SandboxError(f"write path {w} is not a directory.")
        for r in fixed:
            if _inside(r.resolve(), w.resolve()):
                # Landlock adds up rights along a path, so a read-only path inside a writable one
                # would be writable there; no kind accepts what one of them cannot enforce.
                raise SandboxError(f"read-only path {r} lies inside write path {w}.")
    cwd = _absolute([policy.cwd], "cwd")[0]
    if not any(_inside(cwd, p) or _inside(p, cwd) for p in [*read, *write]):
        raise SandboxError(f"cwd {cwd} is neither inside nor above an allowed path.")
    return read, write, cwd


def _user_tasks(uid: int) -> int:
    """Threads (what RLIMIT_NPROC counts) whose real uid is `uid`, across the system."""
    total = 0
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in open(status).read().splitlines()
                          if ":" in line)
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"])
        except (OSError, KeyError, ValueError):
            continue
    return total


def _rlimits(policy: SandboxPolicy) -> dict[str, int]:
    limits = {"CORE": 0}
    if policy.max_memory_bytes:
        limits["AS"] = int(policy.max_memory_bytes)
    if policy.max_file_bytes:
        limits["FSIZE"] = int(policy.max_file_bytes)
    if policy.max_processes and os.geteuid() != 0 and sys.platform.startswith("linux"):
        limits["NPROC"] = _user_tasks(os.getuid()) + int(policy.max_processes)
    return limits


_PIDS_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))  # cgroup v1 pids hierarchy, or v2
_pids_group: Path | None = None


def pids_cgroup(max_processes: int | None) -> Path | None:
    """As root RLIMIT_NPROC does not apply, so a pids cgroup bounds a run's tasks instead: one group per
    loop process (runs never overlap), its pids.max set to `max_processes`, removed at exit. None when
    not root, no limit is asked for, or no writable pids controller is mounted."""
    global _pids_group
    if os.geteuid() != 0 or not max_processes or not sys.platform.startswith("linux"):
        return None
    if _pids_group is None:
        for root in _PIDS_ROOTS:
            v2 = root == Path("/sys/fs/cgroup")
            try:
                if v2 and "pids" not in (root / "cgroup.subtree_control").read_text().split():
                    continue
                group = root / f"autoresearch-{os.getpid()}"
                group.mkdir(exist_ok=True)
                if not (group / "pids.max").exists():
                    group.rmdir()
                    continue
            except OSError:
                continue
            _pids_group = group
            atexit.register(_remove_group, group)
            break
        else:
            return None
    (_pids_group / "pids.max").write_text(f"{int(max_processes)}\n")
    return _pids_group


def _remove_group(group: Path) -> None:
    try:
        group.rmdir()
    except OSError:
        pass


class Confined:
    """The `preexec_fn` of a sandboxed run: in the forked child before exec it joins the run's cgroups
    (the pids group, then its memory group) and sets `limits`; it touches nothing that could hold a
    lock. For the runner: `group` (the run's memory cgroup, or None), `watch` ((write paths, the bytes
    they may hold together), or None), and `finish()` once the run's processes are gone."""

    def __init__(self, limits: dict[str, int], groups: Iterable[Path] = (), group: cgroup.RunGroup | None = None,
                 watch: tuple[list[Path], int] | None = None) -> None:
        self.resolved = [(getattr(resource, f"RLIMIT_{name}"), value) for name, value in limits.items()]
        self.group, self.watch = group, watch
        self.procs = [str(g / "cgroup.procs") for g in groups] + ([str(group.procs)] if group is not None else [])

    def __call__(self) -> None:
        for procs in self.procs:
            with open(procs, "w") as f:
                f.write("0\n")  # this process, and every task it starts, counts against the group's limits
        for which, value in self.resolved:
            hard = resource.getrlimit(which)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(which, (value, value))

    def finish(self) -> str | None:
        """After the run: one sentence when the kernel ended it for its memory cap, else None; the run's
        cgroup is removed (or left to a later sweep while a process of it is still exiting)."""
        if self.group is None:
            return None
        kills = self.group.oom_kills()
        self.group.remove()
        cgroup.sweep()
        if kills:
            return (f"ended by the kernel for going past its memory cap of {size_text(self.group.memory_bytes)} "
                    f"(memory cgroup: RAM, /tmp and /dev/shm files together)")
        return None


def size_text(n: int) -> str:
    """Bytes as the README and the settings write them: 1.5 GiB, 256 MiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} bytes"


# --- the three kinds -------------------------------------------------------------------------

def _bwrap_command(argv: list[str], policy: SandboxPolicy) -> list[str]:
    read, write, cwd = _checked(policy)
    flags = _bwrap_flags()
    assert flags is not None
    cmd = [shutil.which("bwrap") or "bwrap", *flags]
    mounts: list[tuple[str, list[str]]] = []  # (destination, arguments), mounted parents first

    def bind(option: str, path: Path | str, both: bool = True) -> None:
        """Mount `path` where it is named and, with `both`, also where its symlinks lead."""
        given, real = os.path.abspath(path), os.path.realpath(path)
        for dest in dict.fromkeys([given, real] if both else [given]):
            mounts.append((dest, [option, real, dest]))

    for top in ROOT_DIRS:
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            bind("--ro-bind", top)
    bind("--ro-bind", "/usr")
    for entry in ETC_ENTRIES:
        if os.path.exists(f"/etc/{entry}"):
            bind("--ro-bind", f"/etc/{entry}", both=False)
    for path in _python_dirs():
        bind("--ro-bind", path)
    bind("--ro-bind", "/sys")

    def tmpfs(dest: str, size: int | None) -> tuple[str, list[str]]:
        return dest, [*(["--size", str(int(size))] if size else []), "--tmpfs", dest]

    mounts += [("/proc", ["--proc", "/proc"]), ("/dev", ["--dev", "/dev"]),
               tmpfs("/dev/shm", policy.shm_bytes), tmpfs("/tmp", policy.tmp_bytes)]
    if policy.gpu:
        for path in _gpu_paths():
            mounts.append((str(path), ["--dev-bind-try", str(path), str(path)]))
        for path in GPU_DIRS:
            if os.path.isdir(path):
                bind("--ro-bind", path)
    for path in read:
        bind("--ro-bind", path)
    for path in write:
        bind("--bind", path)
    # The directories that hold mount points (the repository directory among them) are made on
    # tmpfs, and made read-only at the end so nothing can be created beside the allowed files.
    # Under the writable /tmp that takes a tmpfs of their own.
    holders = _tmp_holders([*read, *write, *_python_dirs()])
    mounts += [(str(h), ["--tmpfs", str(h)]) for h in holders]
    # A deeper mount must come later or the shallower one would cover it (a write path under a
    # read-only tree, a read path under /tmp's tmpfs).
    for _, args in sorted(mounts, key=lambda m: len(Path(m[0]).parts)):
        cmd += args
    # /dev is a tmpfs of its own, unsized: read-only too, once its nodes and /dev/shm are mounted.
    for holder in ["/", "/dev", *map(str, holders)]:
        cmd += ["--remount-ro", holder]
    return [*cmd, "--chdir", str(cwd), "--", *argv]


def _tmp_holders(paths: list[Path]) -> list[Path]:
    """The top directories under /tmp that contain an allowed path without being one."""
    tops = {Path("/tmp", p.relative_to("/tmp").parts[0]) for p in paths
            if _inside(p, Path("/tmp")) and p != Path("/tmp")}
    return sorted(tops - set(paths))


def _landlock_command(argv: list[str], policy: SandboxPolicy) -> list[str]:
    read, write, cwd = _checked(policy)
    rules: list[list[str]] = []
    rules += [[d, "rx"] for d in (*ROOT_DIRS, "/usr")]
    rules += [[str(p), "rx"] for p in _python_dirs()]
    rules += [[f"/etc/{e}", "ro"] for e in ETC_ENTRIES]
    rules += [["/sys", "ro"]] + [[p, "ro"] for p in PROC_FILES] + [[d, "dev"] for d in DEVICES]
    if policy.gpu:
        rules += [[str(p), "dev"] for p in _gpu_paths()]
        rules += [["/proc/driver", "ro"]] + [[d, "rx"] for d in GPU_DIRS]
    # Python imports a module only after listing the directory it lies in, and the data loader
    # lists its shard directory. Listing applies to a whole tree, so never to "/".
    rules += [[str(p.parent), "list"] for p in read if p.parent != Path("/")]
    rules += [[str(p), "ro"] for p in read] + [[str(p), "rw"] for p in write]
    rules = [list(r) for r in dict.fromkeys(map(tuple, rules))]
    spec = json.dumps({"rules": rules, "proc_self": True, "cwd": str(cwd),
                       "rlimits": _rlimits(policy)}, separators=(",", ":"))
    if len(spec) > MAX_POLICY_ARG:
        raise SandboxError("the policy is too long for one argument: allow directories, not files.")
    return [sys.executable, "-I", str(LAUNCHER), spec, "--", *argv]


def _seatbelt_command(argv: list[str], policy: SandboxPolicy) -> list[str]:
    from sandbox import seatbelt

    read, write, _ = _checked(policy)
    try:
        profile = seatbelt.build_profile([*_python_dirs(), *read], write, gpu=policy.gpu)
    except seatbelt.ProfileError as e:
        raise SandboxError(str(e)) from None
    return seatbelt.command(profile, argv)


def wrap(kind: str, argv: list[str], policy: SandboxPolicy
         ) -> tuple[list[str], Callable[[], None] | None]:
    """(command line, preexec_fn) that run `argv` confined by `policy` under sandbox `kind`.

    Pass both to Popen with your own scrubbed `env`, `cwd=policy.cwd` and
    `start_new_session=True`; `argv[0]` should be an absolute path.
    """
    if kind not in KINDS:
        raise SandboxError(f"unknown sandbox kind {kind!r}.")
    if not _available(kind):
        raise SandboxError(f"this host cannot provide the {kind} sandbox.")
    argv = [str(a) for a in argv]
    command = (_landlock_command(argv, policy) if kind == "landlock" else
               _bwrap_command(argv, policy) if kind == "bwrap" else _seatbelt_command(argv, policy))
    pids = pids_cgroup(policy.max_processes)
    group = cgroup.make(policy.memory_cap_bytes, policy.max_processes) if policy.memory_cap_bytes else None
    if pids is not None and group is not None and (pids / "cgroup.controllers").exists():
        pids = None  # a v2 pids group: a process is in one v2 group, and the run's group has pids.max
    watch = ([Path(p) for p in policy.write_paths], int(policy.disk_bytes)) if policy.disk_bytes else None
    limits = {} if kind == "landlock" else _rlimits(policy)  # the launcher sets the rlimits itself
    return command, Confined(limits, [pids] if pids is not None else [], group, watch)


# --- ending what a run left behind (the caller's part on the Landlock path) --------------------

def become_subreaper() -> bool:
    """Make orphans of this process's descendants its children (Linux); False elsewhere.

    A trainer that double-forks and calls setsid leaves the process group the runner kills; as
    a subreaper the loop inherits such processes instead of init, and `kill_orphans` finds them.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SandboxError(f"cannot become a subreaper: {os.strerror(ctypes.get_errno())}")
    return True


def _children(parent: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is `parent`, read from /proc/*/stat."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = open(stat).read()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
        if len(fields) > 1 and int(fields[1]) == parent:
            found.append((int(stat.split("/")[2]), fields[0]))
    return found


def kill_orphans(exclude: set[int], timeout: float = 10.0) -> list[int]:
    """SIGKILL and reap every child of this process not in `exclude`; returns the pids killed.

    Call it after the trainer's Popen has been waited for, with `exclude` naming every other
    child the caller still runs (an agent client, a server). Repeats until none is left, since
    the children of a killed orphan are reparented here in turn (this process being a
    subreaper). Zombies are reaped without counting as killed. Linux only; [] elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return []
    me, killed = os.getpid(), []
    deadline = time.monotonic() + timeout
    while True:
        targets = [(pid, state) for pid, state in _children(me) if pid not in exclude]
        if not targets:
            return killed
        if time.monotonic() > deadline:
            raise SandboxError(f"processes {sorted(p for p, _ in targets)} would not die.")
        for pid, state in targets:
            if state != "Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        for pid, _ in targets:
            _reap(pid, deadline)


def _reap(pid: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.01)
