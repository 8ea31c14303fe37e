"""The worker side of parallel experiments: what runs inside a Ray actor, one experiment at a time.

A worker gets a `Job` (one to three trainer texts to run: a baseline, a change, a confirm pair)
and returns a `JobResult` (the harness's measurement of each run and the files of the run
directory). It never decides, commits or writes results.tsv: the driver (research/parallel.py)
does all of that, one result at a time.

Every run goes through the same code as the single-worker loop, `research.run.run_once`:
the trainer runs in the OS sandbox from its own tree (a git worktree of the repository on the
driver's machine; on another machine a private copy of the locked code with the trainer written
into it), timed from outside, and the separate harness scores its hand-over. The harness itself
runs from the worker's own copy of the locked code (the one this module was imported from).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "WORKER_CODE",
    "Job",
    "JobResult",
    "RunResult",
    "RunSpec",
    "TrialWorker",
    "data_fingerprint",
]

# What a tree a trainer runs from must hold besides the trainer (the locked code it may import, and
# the harness's code, which the harness reads from the worker's own copy).
WORKER_CODE = ("prepare.py", "backends", "model", "data", "judge", "sandbox")


@dataclass
class RunSpec:
    """One run of a trainer text, with the limits the driver computed from the branch."""

    prefix: str  # file prefix in the run directory: "" (the run), "best_" (the best next to it), "confirm_"
    text: str  # the trainer's source
    label: str
    description: str
    overtime: bool  # False for baselines (what the wall-time rule is measured on)
    abort: tuple | None = None  # (Reference, z, min_progress, audit) for early abort, or None


@dataclass
class Job:
    runs: list[RunSpec]
    tree: str  # the worktree on the driver's machine
    host: str  # the driver's machine
    timeout_s: float
    wall_rule: object | None  # research.clock.WallRule the runs but baselines are held to (None: none yet)
    harness_timeout_s: float
    best: float | None  # shown in the status line only
    run_no: int


@dataclass
class RunResult:
    prefix: str
    status: str  # ok | crash | invalid | rejected | abort
    measurement: object | None  # research.run.Measurement
    reason: str
    wall_seconds: float
    fired: str | None = None  # early abort: why it stopped (or, auditing, would have stopped) the run
    fired_at: float | None = None
    audit: bool = False
    wall_limit_s: float | None = None  # the loop's own timing of the trainer (research/clock.py)
    first_step_s: float | None = None
    tail_s: float | None = None
    gauge_before_s: float | None = None  # the loop's gauge of the machine around the run (research/gauge.py)
    gauge_after_s: float | None = None
    others_cpu: float | None = None  # cores other programs kept busy while it trained (research/gauge.py)
    hyperparams: dict | None = None  # what the trainer's source sets on this host, read before it ran


@dataclass
class JobResult:
    runs: list[RunResult]
    files: dict[str, bytes] = field(default_factory=dict)  # the run directory's files, by name
    worker: str = ""
    tampered: list[str] = field(default_factory=list)  # locked files of the worker's code changed by the job


def code_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file of the locked code (WORKER_CODE) under `root`, by path (byte-code caches left out)."""
    out: dict[str, str] = {}
    for rel in WORKER_CODE:
        top = root / rel
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        for path in paths:
            if "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            try:
                out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
    return out


def data_fingerprint(protocol) -> str:
    """A short hash of the content hashes prepare recorded for what evaluation reads (tokenizer, val,
    holdout): equal on two machines only when they prepared the same data."""
    import prepare

    manifest = prepare.cache_root() / protocol.name / "prepared.json"
    try:
        sha = json.loads(manifest.read_text(encoding="utf-8")).get("sha256", {})
    except (OSError, ValueError):
        return "missing"
    return hashlib.sha256(json.dumps(sha, sort_keys=True).encode()).hexdigest()[:16]


class _Quiet:
    """The console of a worker: the driver prints what happens."""

    def event(self, text: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass


class _NoLock:
    def note_trainer(self, pgid, trainer) -> None:
        pass


class _Settings:
    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s


class _SplitConfinement:
    """The trainer runs from its tree; the harness from the worker's own locked code."""

    def __init__(self, trainer_side, harness_side) -> None:
        self.trainer_side, self.harness_side = trainer_side, harness_side
        self.repo, self.trainer = trainer_side.repo, trainer_side.trainer  # where the trainer's source is

    def run_python(self, args, timeout_s):
        return self.trainer_side.run_python(args, timeout_s)

    def trainer_run(self, ws):
        return self.trainer_side.trainer_run(ws)

    def harness_run(self, ws, wait=False):
        return self.harness_side.harness_run(ws, wait=wait)


class _RunContext:
    """What `research.run.run_once` reads from a Session, for one job in a worker."""

    def __init__(self, worker: TrialWorker, job: Job, tree: Path) -> None:
        from sandbox.workspace import Confinement

        self.console = _Quiet()
        self.lock = _NoLock()
        self.host = worker.host
        self.source = worker.source
        self.settings = _Settings(0.5)
        self.best = job.best
        self.budget = float(worker.protocol.time_budget)
        self.timeout_s = job.timeout_s
        self.harness_timeout_s = job.harness_timeout_s
        self._rule = job.wall_rule
        self.sandbox = worker.sandbox
        self.trainer = worker.host.trainer
        self.evaluator_hash = worker.evaluator_hash
        self.protocol = worker.protocol
        self.confine = _SplitConfinement(
            Confinement(tree, self.trainer, worker.protocol, worker.host, worker.sandbox),
            Confinement(worker.code_root, self.trainer, worker.protocol, worker.host, worker.sandbox))
        self._worker = worker

    def wall_rule(self):
        return self._rule

    def reap(self, keep: set[int] = frozenset()) -> None:
        self._worker.reap(keep)


class TrialWorker:
    """One experiment slot (a Ray actor started by research/pool.py): runs jobs, one at a time."""

    def __init__(self, name: str, backend: str | None, protocol: str, sandbox: str | None) -> None:
        import backends
        import prepare
        from research.hparams import SourceValues
        from sandbox import confine as sb

        self.name = name
        self.where = f"{name}@{socket.gethostname()}"
        self.host = backends.detect(backend)
        self.protocol = prepare.get_protocol(protocol)
        self.evaluator_hash = prepare.evaluator_hash()
        self.code_root = Path(prepare.__file__).resolve().parent
        self.sandbox = sandbox
        self.problem = None
        if sandbox is not None and not sb._available(sandbox):
            self.problem = f"{self.where} cannot provide the {sandbox} sandbox the loop uses"
        sb.become_subreaper()
        self._own_children = {pid for pid, _ in sb._children(os.getpid())}
        self._stop = threading.Event()
        self._mirror: Path | None = None
        self.source = SourceValues()  # hyperparameters from each trainer's source, its conditions probed once
        self._code = code_hashes(self.code_root)  # the harness's code: a job that changes it stops the loop

    def hello(self) -> dict:
        """What the driver checks before giving this worker a job: same hardware, protocol, budget,
        evaluator and data as the branch."""
        import prepare
        from research.share import hardware_class

        try:
            prepare.verify_prepared(self.protocol)
            data = data_fingerprint(self.protocol)
        except prepare.PrepareError as e:
            data = f"not prepared ({e})"
        return {"worker": self.where, "host": socket.gethostname(), "hardware": hardware_class(self.host),
                "protocol": self.protocol.name, "budget": float(self.protocol.time_budget),
                "evaluator": self.evaluator_hash, "data": data, "problem": self.problem, "pid": os.getpid()}

    def stop(self) -> None:
        """Stop the job in progress (its trainer or harness is ended; the job returns as a crash)."""
        self._stop.set()

    def reap(self, keep: set[int] = frozenset()) -> None:
        """End every process a job left behind, but for `keep` (e.g. its pre-started harness)."""
        from sandbox import confine as sb

        sb.kill_orphans(exclude=self._own_children | set(keep))

    def _tree(self, job: Job) -> Path:
        """The tree this job's trainer runs from: the driver's worktree when this worker is on the
        driver's machine, else a private copy of the locked code (made once) with the trainer in it."""
        tree = Path(job.tree)
        if job.host == socket.gethostname() and tree.is_dir():
            return tree
        if self._mirror is None:
            self._mirror = Path(tempfile.mkdtemp(prefix=f"autoresearch-{self.name}-tree-"))
            for rel in WORKER_CODE:
                src = self.code_root / rel
                dst = self._mirror / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if src.is_dir():
                    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                elif src.exists():
                    shutil.copy2(src, dst)
        return self._mirror

    def _tampered(self, tree: Path) -> list[str]:
        """Locked files of this worker's code (and of its private copy for trainers, if any) that differ from
        what it started with: only a trainer without a sandbox can get there."""
        out = [p for p, h in code_hashes(self.code_root).items() if self._code.get(p) != h]
        out += [p for p in self._code if not (self.code_root / p).is_file()]
        if self._mirror is not None and tree == self._mirror:
            mirror = code_hashes(self._mirror)
            out += [f"{p} (trainers' copy)" for p in set(mirror) | set(self._code)
                    if mirror.get(p) != self._code.get(p)]
        return sorted(set(out))

    def run(self, job: Job) -> JobResult:
        from research.decisions import AbortMonitor, LossCurve
        from research.run import run_once
        from research.guards import text_hash

        self._stop.clear()
        tree = self._tree(job)
        trainer = tree / self.host.trainer
        run_dir = Path(tempfile.mkdtemp(prefix=f"autoresearch-{self.name}-run-"))
        results: list[RunResult] = []
        try:
            ctx = _RunContext(self, job, tree)
            for spec in job.runs:
                if self._stop.is_set():
                    break
                if tree == Path(job.tree) and not spec.prefix:
                    if text_hash(trainer.read_text(encoding="utf-8")) != text_hash(spec.text):
                        results.append(RunResult(spec.prefix, "rejected", None, "the worktree's trainer is not the "
                                                 "one the driver committed", 0.0))
                        continue
                original = trainer.read_bytes() if trainer.exists() else None
                trainer.write_text(spec.text, encoding="utf-8")
                monitor = None
                if spec.abort is not None:
                    ref, z, min_progress, audit = spec.abort
                    monitor = AbortMonitor(LossCurve(), ref, z=z, min_progress=min_progress, audit=audit)
                stopper = _Stopper(self._stop, monitor)
                try:
                    run, status, m, reason = run_once(ctx, run_dir, spec.label, spec.description,
                                                       prefix=spec.prefix, monitor=stopper.monitor,
                                                       overtime=spec.overtime)
                finally:
                    if original is not None:
                        trainer.write_bytes(original)
                if self._stop.is_set() and status == "abort":
                    status, reason = "crash", "stopped: the loop was interrupted"
                results.append(RunResult(spec.prefix, status, m, reason, run.wall_seconds,
                                         fired=monitor.fired if monitor else None,
                                         fired_at=monitor.fired_at if monitor else None,
                                         audit=bool(monitor and monitor.audit), wall_limit_s=run.wall_limit_s,
                                         first_step_s=run.first_step_s, tail_s=run.tail_s,
                                         gauge_before_s=getattr(run, "gauge_before_s", None),
                                         gauge_after_s=getattr(run, "gauge_after_s", None),
                                         others_cpu=getattr(run, "others_cpu", None),
                                         hyperparams=getattr(run, "hyperparams", None)))
            files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
            return JobResult(results, files, self.where, tampered=self._tampered(tree))
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


class _Stopper:
    """Early abort's monitor, with the loop's stop request folded in: `run_once` asks `monitor.check()`
    every tick and reads `monitor.curve`, `fired` and `fired_at`."""

    def __init__(self, stop: threading.Event, monitor) -> None:
        from research.decisions import LossCurve

        self._stop, self._inner = stop, monitor
        self.curve = monitor.curve if monitor is not None else LossCurve()
        self.monitor = self

    @property
    def fired(self):
        if self._stop.is_set():
            return "the loop was interrupted"
        return self._inner.fired if self._inner is not None else None

    @property
    def fired_at(self):
        return self._inner.fired_at if self._inner is not None else None

    @property
    def audit(self):
        return self._inner.audit if self._inner is not None else False

    @property
    def spared(self):
        return getattr(self._inner, "spared", None)

    @property
    def load(self):
        return getattr(self._inner, "load", None)

    @load.setter
    def load(self, read) -> None:
        if self._inner is not None:
            self._inner.load = read

    def check(self) -> bool:
        if self._stop.is_set():
            return True
        return self._inner.check() if self._inner is not None else False
