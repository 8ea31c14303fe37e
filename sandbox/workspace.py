"""Where and how the trainer and the harness run: a private workspace per run, their environments,
and the sandbox policy each one gets.

The trainer (agent code) reads the project's code, the tokenizer and the train split, and writes
only its workspace: `handover/` (the graph and its facts), `tmp/`, `home/` and `cache/` (compiler
caches: fresh for every run and removed after it, so nothing, a model included, carries from one run
to the next). It never sees the validation or holdout data, `.git`, `runs/`, results.tsv or the
loop's secrets. The harness (locked) reads the code, the tokenizer, the evaluation splits and the
hand-over, and writes only `judge/`, from which the loop takes its result. Neither writes the repo.

What a run may use (`Resources`, from AUTORESEARCH_* settings): its workspace's size on disk (watched
by the runner; also the largest file it may write), its memory (a cgroup per run where the host gives
one, else RLIMIT_AS on CPU runs), and the sizes of its private /tmp and /dev/shm (bwrap). Before every
run the loop checks that the disks holding results.tsv and the workspaces have room for a full
workspace and a margin (`free_space_problem`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from data import PrepareError
from data.integrity import eval_data_paths, tokenizer_paths, train_data_paths
from data.protocols import cache_root
from judge.entry import harness_command, harness_env
from sandbox.secrets import allowed_env

__all__ = ["Workspace", "CODE_PATHS", "Confinement", "RESOURCE_ENV", "Resources", "free_space_problem",
           "parse_size"]

CODE_PATHS = ("prepare.py", "backends", "model", "data", "judge")  # locked code a trainer may import (prepare imports
# judge/entry.py for the harness command it runs when started by hand)
HARNESS_CODE = ("judge", "sandbox/pyexec.py")  # the harness bootstraps its imports through pyexec
_JUDGE_DIRS = ("home", "tmp", "cache")  # the harness's private directories inside its own
MiB, GiB = 1 << 20, 1 << 30
# The settings of what a run may use (README: Security, Environment variables), passed on to workers too.
RESOURCE_ENV = ("AUTORESEARCH_WORKSPACE_CAP", "AUTORESEARCH_MEMORY_CAP", "AUTORESEARCH_TMP_SIZE",
                "AUTORESEARCH_SHM_SIZE", "AUTORESEARCH_MIN_FREE", "AUTORESEARCH_CGROUP")
MEMORY_SHARE = 0.8  # the default memory cap: this share of the machine's RAM


def parse_size(text: str) -> int:
    """Bytes from `4G`, `1.5GiB`, `512M`, `64MB`, `1073741824` (K, M, G, T are powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    shift = {"K": 10, "M": 20, "G": 30, "T": 40}.get(t[-1:], 0)
    number = float(t[:-1] if shift else t)
    if not number > 0 or number != number or number == float("inf"):
        raise ValueError(text)
    return int(number * (1 << shift))


@dataclass(frozen=True)
class Resources:
    """What one sandboxed run (trainer or harness) may use."""

    workspace_bytes: int = 4 * GiB  # its workspace on disk together, and so also any one file in it
    memory_bytes: int | None = None  # memory cgroup cap (and RLIMIT_AS of CPU runs); None: no cap
    tmp_bytes: int = 1 * GiB  # the private /tmp (bwrap: a tmpfs, that is RAM)
    shm_bytes: int = 512 * MiB  # the private /dev/shm (bwrap: a tmpfs, that is RAM)
    min_free_bytes: int = 1 * GiB  # free disk kept beyond a full workspace before each run

    @classmethod
    def from_env(cls, environ=None) -> Resources:
        """The settings, or their defaults; raises PrepareError (one sentence) for a value that is not a size."""

        environ = os.environ if environ is None else environ
        memory = _physical_memory()
        values = {"workspace_bytes": cls.workspace_bytes, "tmp_bytes": cls.tmp_bytes, "shm_bytes": cls.shm_bytes,
                  "memory_bytes": int(memory * MEMORY_SHARE) if memory else None,
                  "min_free_bytes": cls.min_free_bytes}
        names = dict(zip(values, ("AUTORESEARCH_WORKSPACE_CAP", "AUTORESEARCH_TMP_SIZE", "AUTORESEARCH_SHM_SIZE",
                                  "AUTORESEARCH_MEMORY_CAP", "AUTORESEARCH_MIN_FREE")))
        for field, name in names.items():
            text = environ.get(name, "").strip()
            if text:
                try:
                    values[field] = parse_size(text)
                except (ValueError, IndexError):
                    raise PrepareError(f"{name} must be a size such as 4G, 512M or a number of bytes, not "
                                       f"'{text}'; fix or unset it.") from None
        return cls(**values)

    def line(self, kind: str | None, gpu: bool) -> str:
        """What bounds a run here, in one line for the start of a session."""
        from sandbox import cgroup
        from sandbox.confine import size_text as sz

        if kind is None:
            return "resources: no sandbox, no bounds on a run's memory or disk"
        disk = f"workspace {sz(self.workspace_bytes)} (also the largest file)"
        tmp = f"/tmp {sz(self.tmp_bytes)}, /dev/shm {sz(self.shm_bytes)}" if kind == "bwrap" else \
            "/tmp and /dev/shm not writable" if kind == "landlock" else "no /tmp outside the workspace"
        if self.memory_bytes is None:
            return f"resources: {disk}; {tmp}; memory not capped"
        root, why = cgroup.parent()
        if root is not None:
            memory = f"memory {sz(self.memory_bytes)} per run, RAM and tmpfs together (a cgroup under {root})"
        else:
            memory = (f"no memory cgroup ({why}), so memory {sz(self.memory_bytes)} of address space per run "
                      f"(RLIMIT_AS)" if not gpu else
                      f"no memory cgroup ({why}) and no RLIMIT_AS for a GPU run: its memory is NOT capped")
            if kind == "bwrap":
                memory += "; /tmp and /dev/shm bounded by their sizes only"
        return f"resources: {disk}; {tmp}; {memory}"


def free_space_problem(results: Path, res: Resources | None = None, workspaces: Path | None = None) -> str | None:
    """One sentence when a disk the next run writes has too little free space, else None: the one holding
    `results` (results.tsv, runs/) needs the margin (AUTORESEARCH_MIN_FREE), the one the workspaces are
    made on (`workspaces`, default the temporary directory) a full workspace besides; one disk, both."""
    from sandbox.confine import size_text as sz

    res = res or Resources.from_env()
    results = Path(results).resolve()
    workspaces = Path(workspaces or tempfile.gettempdir()).resolve()
    disks: dict[int, tuple[Path, int, list[str]]] = {}  # st_dev -> (a path on it, bytes it needs, what it holds)
    for path, extra, what in ((results.parent, 0, f"where {results.name} lives"),
                              (workspaces, res.workspace_bytes, "where the runs' workspaces are made")):
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        where, need, whats = disks.get(dev, (path, res.min_free_bytes, []))
        disks[dev] = (where, need + extra, [*whats, what])
    for where, need, whats in disks.values():
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            continue
        if free < need:
            cap = (f"the {sz(res.workspace_bytes)} workspace cap, AUTORESEARCH_WORKSPACE_CAP, plus "
                   if need > res.min_free_bytes else "")
            return (f"only {sz(free)} free on {_mount_point(where)} ({' and '.join(whats)}); the next run needs "
                    f"{sz(need)} there ({cap}{sz(res.min_free_bytes)} kept free, AUTORESEARCH_MIN_FREE): free some "
                    f"space or lower the cap, and run again; every recorded run is kept.")
    return None


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while path != path.parent and not os.path.ismount(path):
        path = path.parent
    return path


@dataclass
class Workspace:
    """A run's private directories, outside the repository: `root` is the trainer's to write; the
    harness's directory lies outside `root` and outside the trainer's sandbox, and must hold nothing
    but the harness's own directories when it is told to score, so nothing the trainer left can pass
    for the harness's result."""

    root: Path
    judge_dir: Path | None = None

    @classmethod
    def create(cls, run_no: int) -> Workspace:
        root = Path(tempfile.mkdtemp(prefix=f"autoresearch-run{run_no}-"))
        ws = cls(root)
        for d in (ws.handover, ws.tmp, ws.home, ws.cache):
            d.mkdir()
        return ws

    @property
    def handover(self) -> Path:
        return self.root / "handover"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def fresh_judge(self) -> Path:
        """A new directory for the harness (with its own home, tmp and cache), outside the trainer's
        sandbox (see judge_written)."""
        self.judge_dir = Path(tempfile.mkdtemp(prefix=f"{self.root.name}-judge-"))
        for sub in _JUDGE_DIRS:
            (self.judge_dir / sub).mkdir()
        return self.judge_dir

    def judge_written(self) -> list[str]:
        """Names in the harness's directory besides its home, tmp and cache, before it was told to score:
        a sandboxed trainer cannot write there, so anything found means the run had no sandbox."""
        try:
            return sorted(n for n in os.listdir(self.judge) if n not in _JUDGE_DIRS)
        except OSError as e:
            return [f"unreadable: {e.strerror}"]

    @property
    def judge(self) -> Path:
        """The harness's directory made by the last fresh_judge()."""
        if self.judge_dir is None:
            raise RuntimeError("fresh_judge() first")
        return self.judge_dir

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.judge_dir is not None:
            shutil.rmtree(self.judge_dir, ignore_errors=True)


def _private_env(home: Path, tmp: Path, cache: Path, **extra: str) -> dict[str, str]:
    """The allow-listed part of the loop's environment (sandbox.secrets.allowed_env), with home, temp and
    every per-user cache pointed at the given private directories, and the data cache named explicitly
    (its default lives under the real home, which the child no longer has)."""
    env = allowed_env(
        AUTORESEARCH_CACHE=str(cache_root().resolve()),
        HOME=str(home),
        TMPDIR=str(tmp),
        XDG_CACHE_HOME=str(cache),
        TRITON_CACHE_DIR=str(cache / "triton"),
        TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"),
        MPLCONFIGDIR=str(cache / "matplotlib"),
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        **extra,
    )
    for key in ("AUTORESEARCH_RESULT_JSON", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONUSERBASE"):
        env.pop(key, None)
    return env


class Confinement:
    """Builds the commands for one session's trainer and harness runs, sandboxed with `kind`
    (bwrap, landlock, seatbelt) or, with None (--no-sandbox), run as they are."""

    def __init__(self, repo: Path, trainer: str, protocol, host, kind: str | None) -> None:
        self.repo, self.trainer, self.protocol, self.kind = Path(repo), trainer, protocol, kind
        self.backend, self.reason = host.backend, host.reason
        self.resources = Resources.from_env()

    def limits_line(self) -> str:
        """What bounds a run's memory and disk here, in one line (printed when the loop starts)."""
        return self.resources.line(self.kind, self.backend in ("cuda", "rocm", "mps"))

    def _code(self, extra: tuple[str, ...] = ()) -> list[Path]:
        return [self.repo / p for p in (*CODE_PATHS, *extra) if (self.repo / p).exists()]

    def _wrap(self, argv: list[str], read: list[Path], write: list[Path], cwd: Path
              ) -> tuple[list[str], Callable[[], None] | None]:
        if self.kind is None:
            return argv, None
        from sandbox.confine import SandboxPolicy, wrap

        gpu = self.backend in ("cuda", "rocm", "mps")
        res = self.resources
        policy = SandboxPolicy(cwd=cwd, read_paths=read, write_paths=write, gpu=gpu,
                               max_memory_bytes=None if gpu else res.memory_bytes, memory_cap_bytes=res.memory_bytes,
                               max_file_bytes=res.workspace_bytes, disk_bytes=res.workspace_bytes,
                               tmp_bytes=res.tmp_bytes, shm_bytes=res.shm_bytes)
        return wrap(self.kind, argv, policy)

    def trainer_run(self, ws: Workspace) -> tuple[list[str], Callable[[], None] | None, dict[str, str]]:
        """(argv, preexec_fn, env) of a trainer run handing over into `ws`."""
        p = self.protocol
        try:
            data = [*train_data_paths(p), *tokenizer_paths(p)]
        except PrepareError:  # the tokenizer went missing mid-session: the run fails to load it, and
            data = list(tokenizer_paths(p))  # the loop then stops with prepare's advice (check_data)
        data = [d for d in data if d.exists()]  # a file that is gone cannot be shown to the trainer
        argv = [sys.executable, str(self.repo / self.trainer)]
        env = _private_env(ws.home, ws.tmp, ws.cache, AUTORESEARCH_HANDOVER=str(ws.handover),
                           AUTORESEARCH_PROTOCOL=p.name, AUTORESEARCH_BACKEND=self.backend,
                           AUTORESEARCH_BACKEND_REASON=f"the loop's choice: {self.reason}")
        argv, preexec = self._wrap(argv, [*self._code(), self.repo / self.trainer, *data], [ws.root], ws.root)
        return argv, preexec, env

    def harness_run(self, ws: Workspace, wait: bool = False) -> tuple[list[str], Callable[[], None] | None,
                                                                      dict[str, str]]:
        """(argv, preexec_fn, env) of the harness scoring what `ws` holds; its result lands in ws.judge.
        With `wait` it is started beside the trainer and scores once told to (judge/harness.py --wait)."""
        p = self.protocol
        data = [*tokenizer_paths(p), cache_root() / p.name / "prepared.json"]
        try:
            data += [*eval_data_paths(p, "val"), *eval_data_paths(p, "holdout")]
        except PrepareError:  # e.g. the tokenizer went missing mid-session: the harness finds its data
            pass  # damaged and says so, and the loop stops with prepare's advice (check_data)
        judge = ws.fresh_judge()
        argv = harness_command(ws.handover, p.name, judge / "result.json", wait=wait)
        env = harness_env(_private_env(judge / "home", judge / "tmp", judge / "cache",
                                               AUTORESEARCH_PROTOCOL=p.name, AUTORESEARCH_BACKEND=self.backend))
        read = [*self._code(HARNESS_CODE), ws.handover, *[d for d in data if d.exists()]]
        argv, preexec = self._wrap(argv, read, [judge], judge)
        return argv, preexec, env


    def run_python(self, args: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        """Run `python args` (agent code: e.g. importing the trainer to read its settings) once in the
        trainer's sandbox, in a throwaway workspace, output captured as text."""
        ws = Workspace.create(0)
        preexec = None
        try:
            env = _private_env(ws.home, ws.tmp, ws.cache, AUTORESEARCH_PROTOCOL=self.protocol.name,
                               AUTORESEARCH_BACKEND=self.backend,
                               AUTORESEARCH_BACKEND_REASON=f"the loop's choice: {self.reason}")
            argv, preexec = self._wrap([sys.executable, *args], [*self._code(), self.repo / self.trainer],
                                       [ws.root], ws.root)
            return subprocess.run(argv, cwd=ws.root, env=env, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec)
        finally:
            if hasattr(preexec, "finish"):
                preexec.finish()  # its memory cgroup, if it had one
            ws.remove()


def _physical_memory() -> int | None:
    """Bytes of RAM (the default memory cap is a share of it: MEMORY_SHARE); None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
