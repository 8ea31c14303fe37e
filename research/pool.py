"""The workers of parallel experiments: Ray, one actor per worker (research/trial_worker.py), each with
its own git worktree of the repository, started, checked against this host and stopped.

`Pool(session, n, address).start()` brings the actors up and checks that every one runs the same code,
protocol, budget, evaluator and data as this process (`check_hellos`); `close()` stops them, giving
running trainers `STOP_GRACE_S` to end. research/parallel.py's driver hands them jobs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from research import gitrepo
from research.results import sanitize
from research.session import Session, SessionError
from research.share import hardware_class
from research.trial_worker import TrialWorker
from sandbox.workspace import RESOURCE_ENV

__all__ = ["HELLO_TIMEOUT_S", "STOP_GRACE_S", "Pool", "Slot", "check_hellos", "check_workers", "default_workers", "import_ray",
           "short_error"]

HELLO_TIMEOUT_S = 600.0  # a worker not up after this long (no free resources on the cluster) is given up
STOP_GRACE_S = 20.0  # after Ctrl-C, how long the workers get to end their trainers before they are killed
EXCLUDES = [".git", ".venv", "runs", "reports", "results.tsv", "results.tsv.tmp", ".autoresearch.lock",
            "__pycache__", "*.pyc", ".pytest_cache"]


def check_workers(workers: int | None) -> None:
    if workers is not None and workers < 1:
        raise SessionError(f"--workers must be at least 1 (got {workers}); 1 runs one experiment at a time.")


def default_workers(host) -> int:
    """One per GPU on CUDA/ROCm; 1 on CPU, MPS and MLX (where --workers N gives N slots)."""
    if host.backend in ("cuda", "rocm"):
        try:
            import torch

            return max(1, torch.cuda.device_count())
        except Exception:  # noqa: BLE001 - no usable torch: one worker
            return 1
    return 1


def import_ray():
    # Ray's `uv run` hook would start each worker with `uv run` in an unpacked copy of the repository, a
    # new environment there; the workers run in this environment instead (on other nodes: theirs).
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
    except ImportError:
        raise SessionError("Parallel experiments run on Ray, which is not installed here: run 'uv sync' (or "
                           "'pip install \"ray>=2.40\"'), or run with --workers 1.") from None
    return ray


def check_hellos(s: Session, hellos: list[dict]) -> None:
    """Refuse (one sentence) workers that would not measure what this branch measures: another hardware
    class, protocol, budget, evaluator or prepared data than the branch's, or no sandbox."""
    want = hardware_class(s.host)
    for h in hellos:
        who = h["worker"]
        if h.get("problem"):
            raise SessionError(f"Worker {who}: {h['problem']}; install it there, or run with --no-sandbox.")
        if h["hardware"] != want:
            raise SessionError(
                f"All workers of one branch must be the same hardware class, so that the noise model and the "
                f"budget stay valid: {who} is {h['hardware']} and this branch runs on {want}; give the loop one "
                f"kind of machine (one loop, with its own --tag, per kind).")
        if h["protocol"] != s.protocol.name or abs(h["budget"] - s.budget) > 1e-6:
            raise SessionError(f"Worker {who} would run protocol {h['protocol']} with a {h['budget']:g} s budget, "
                               f"not {s.protocol.name} with {s.budget:g} s: set AUTORESEARCH_PROTOCOL and "
                               "AUTORESEARCH_TIME_BUDGET alike on every node.")
        if h["evaluator"] != s.evaluator_hash:
            raise SessionError(f"Worker {who} has evaluator {h['evaluator']}, not this repository's "
                               f"{s.evaluator_hash}: run the same commit of the project on every node.")
    import prepare
    from research.trial_worker import data_fingerprint

    mine = data_fingerprint(s.protocol)
    for h in hellos:
        if h["data"] != mine:
            raise SessionError(f"Worker {h['worker']}'s prepared data for {s.protocol.name} differs from this "
                               f"machine's ({h['data']} vs {mine}): run 'uv run prepare.py --protocol "
                               f"{s.protocol.name}' on that node from the same commit (the hashes in "
                               f"{prepare.cache_root().name}/{s.protocol.name}/prepared.json must match).")


# ---------------------------------------------------------------------------------------------------------
# the workers: Ray actors, each with a git worktree on this machine


@dataclass
class Slot:
    name: str  # w0, w1, ...
    tree: Path
    actor: object = None
    where: str = ""  # w0@host, from its hello
    ready: bool = False
    busy: bool = False
    hello_ref: object = None
    hello_since: float = 0.0
    confine: object = None  # Confinement of its tree: where agents may import its trainer
    at: str = ""  # the commit its tree was just left at, clean (after a proposal): no reset needed


class Pool:
    """Ray, the actors and their worktrees. `start()` brings them up and checks them; `close()` stops
    every worker (their trainers ended), removes every worktree and shuts down a Ray it started."""

    worker_cls = TrialWorker  # what each actor runs (bench/bench_parallel.py puts a stand-in here)

    def __init__(self, s: Session, workers: int, address: str | None) -> None:
        self.s, self.n, self.address = s, workers, address
        self.ray = import_ray()
        digest = hashlib.sha1(str(s.repo).encode()).hexdigest()[:10]
        self.root = Path(tempfile.gettempdir()) / f"autoresearch-worktrees-{digest}"
        self.slots: list[Slot] = []
        self.started_ray = False
        self.actor_cls = None

    # -- worktrees

    def clear_worktrees(self) -> None:
        """Remove the worktrees of an earlier loop on this repository (killed before it could)."""
        for path in gitrepo.worktree_paths(self.s.repo):
            if path.parent == self.root:
                gitrepo.worktree_remove(self.s.repo, path)
        shutil.rmtree(self.root, ignore_errors=True)
        gitrepo.worktree_remove(self.s.repo, self.root / "none")  # prune records of trees that are gone

    def reset_tree(self, slot: Slot, commit: str) -> None:
        """The slot's worktree back to `commit`, exactly: HEAD detached there (whatever a run checked out: no
        branch moves), tracked files reset, anything else removed."""
        gitrepo.git(slot.tree, "update-ref", "--no-deref", "HEAD", commit)
        gitrepo.git(slot.tree, "reset", "-q", "--hard", commit)
        extra = [p for p, k in gitrepo.changed_paths(slot.tree).items() if k == "U"]
        gitrepo.remove_paths(slot.tree, extra)

    # -- Ray

    def start(self) -> None:
        ray, s = self.ray, self.s
        self.clear_worktrees()
        self.root.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items()
               if k in ("AUTORESEARCH_PROTOCOL", "AUTORESEARCH_TIME_BUDGET", "AUTORESEARCH_BACKEND",
                        "AUTORESEARCH_CACHE", "AUTORESEARCH_SANDBOX", "AUTORESEARCH_GAUGE_REPS", "AUTORESEARCH_LOAD_METER",
                        *RESOURCE_ENV)}
        env["AUTORESEARCH_PROTOCOL"] = s.protocol.name
        runtime_env = {"working_dir": str(s.repo), "excludes": EXCLUDES, "env_vars": env}
        gpu = s.host.backend in ("cuda", "rocm")
        cpus = os.cpu_count() or 1
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="error",
                          runtime_env=runtime_env)
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(num_cpus=max(cpus, self.n), **kwargs)
            self.started_ray = True
        if gpu:
            options = {"num_gpus": 1, "num_cpus": 1 if self.address else max(1, cpus // self.n)}
        else:  # CPU, MPS, MLX: N slots as asked; the cores shared out (each trainer's threads follow)
            options = {"num_cpus": 1 if self.address else max(1, cpus // self.n)}
        self.actor_cls = ray.remote(max_concurrency=2, max_restarts=0, **options)(self.worker_cls)
        self.options = options
        for k in range(self.n):
            path = self.root / f"w{k}"
            gitrepo.worktree_add(s.repo, path, s.kept_commit)
            slot = Slot(name=f"w{k}", tree=path)
            from sandbox.workspace import Confinement

            slot.confine = Confinement(path, s.trainer, s.protocol, s.host, s.sandbox)
            self.slots.append(slot)
            self.launch(slot)
        s.console.event(f"starting {self.n} workers on Ray ({'cluster ' + self.address if self.address else 'local'}"
                        f", {', '.join(f'{k} {v:g}' for k, v in options.items())} each)")
        refs = [slot.hello_ref for slot in self.slots]
        waited, told = 0.0, False
        while waited < HELLO_TIMEOUT_S:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10.0)
            if len(ready) == len(refs):
                break
            waited += 10.0
            if waited >= 60 and not told:
                told = True
                s.console.event(f"{len(refs) - len(ready)} of {len(refs)} workers not up after {waited:.0f} s (a "
                                "worker that fails to start says why in Ray's logs: /tmp/ray/session_latest/logs/"
                                f"worker-*.err); waiting up to {HELLO_TIMEOUT_S:.0f} s")
        try:
            hellos = self.ray.get(refs, timeout=1.0)
        except ray.exceptions.GetTimeoutError:
            raise SessionError(f"The {self.n} workers did not all start within {HELLO_TIMEOUT_S:.0f} s: the Ray "
                               f"cluster has no room for {self.n} actors with {options} each; ask for fewer "
                               "--workers or add nodes.") from None
        except ray.exceptions.RayError as e:
            raise SessionError(f"A worker could not start ({short_error(e)}); see Ray's logs in "
                               "/tmp/ray/session_latest/logs.") from None
        check_hellos(s, hellos)
        for slot, h in zip(self.slots, hellos):
            slot.where, slot.ready, slot.hello_ref = h["worker"], True, None
        s.console.event("workers ready: " + ", ".join(f"{sl.where} (pid {h['pid']})" for sl, h in
                                                      zip(self.slots, hellos)))

    def launch(self, slot: Slot) -> None:
        s = self.s
        slot.actor = self.actor_cls.remote(slot.name, s.host.backend, s.protocol.name, s.sandbox)
        slot.hello_ref = slot.actor.hello.remote()
        slot.hello_since = time.monotonic()
        slot.ready = slot.busy = False

    def kill(self, slot: Slot) -> None:
        if slot.actor is not None:
            try:
                self.ray.kill(slot.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        slot.actor, slot.ready = None, False

    def close(self, flights: dict) -> None:
        """Stop every worker (a running trainer is ended first), remove the worktrees, shut Ray down."""
        ray = self.ray
        try:
            busy = [sl for sl in self.slots if sl.busy and sl.actor is not None]
            for sl in busy:
                try:
                    sl.actor.stop.remote()
                except Exception:  # noqa: BLE001
                    pass
            if flights:
                try:
                    ray.wait(list(flights), num_returns=len(flights), timeout=STOP_GRACE_S)
                except Exception:  # noqa: BLE001
                    pass
            for sl in self.slots:
                self.kill(sl)
        finally:
            for sl in self.slots:
                gitrepo.worktree_remove(self.s.repo, sl.tree)
            shutil.rmtree(self.root, ignore_errors=True)
            if self.started_ray:
                try:
                    ray.shutdown()
                except Exception:  # noqa: BLE001
                    pass


# ---------------------------------------------------------------------------------------------------------
# the driver


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return sanitize(f"{type(e).__name__}: {text[-1] if text else ''}", 200)
