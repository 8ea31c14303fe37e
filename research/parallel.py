"""Parallel experiments: N at once, on every GPU of a machine or across the machines of a Ray cluster.

`loop.py run --workers N` (or `--ray-address ADDR`) lands here instead of research/driver.py's
`research()`. The driver (this process) keeps everything that decides and records: proposals from
the agent, commits, the keep rule, the branch and results.tsv, one result at a time. Each worker
is a Ray actor (research/trial_worker.py) with its resources declared (one GPU each on CUDA/ROCm),
so Ray places them; it runs one job at a time, sandboxed, from its own git worktree, and returns
the harness's measurement. What a result means (the rows, the screen, the confirm job, the stale-base
rule, crash fixes) is research/parallel_results.py's.

The stale-base rule: a change is proposed from the current best, but while it runs another change
may be kept. When its result comes back and the best has moved, it is compared with the current
best: not a win there, it is discarded; a win (or a promising screen) is recorded as `discard`
("stale win") and its change is merged onto the current best (a three-way merge of the trainer);
when that applies cleanly the merged trainer runs as a new experiment, decided by the usual rule
(screen, confirm run) against the current best, at most `MAX_REBASES` times in a row; when it does
not apply, the change is dropped. A keep therefore always has the kept trainer as its parent,
measured against it.
"""

from __future__ import annotations

import socket
import time

from research import gitrepo
from research.console import clock
from research.driver import MAX_IDLE_PROPOSALS, agent_context
from research.experiment import syntax_problem
from research.guards import guard_run, scope_problem
from research.ledger import BASELINE, RERUN
from research.parallel_results import MAX_REBASES, Decisions, Ticket
from research.pool import HELLO_TIMEOUT_S, Pool, Slot, check_hellos, short_error
from research.proposals import Agent, CrashInfo
from research.results import NO_COMMIT, sanitize
from research.session import Session, SessionError, TamperError
from research.trial_worker import Job, JobResult, RunSpec
from sandbox.secrets import redact

__all__ = ["MAX_REBASES", "research_parallel"]

MAX_LOSSES = 2  # a job whose worker is lost this many times is recorded as a crash instead of re-queued


class Driver(Decisions):
    """The scheduler: keeps every worker busy with the next job (a baseline, a re-run of the best, a
    confirm job, a proposal made in the worker's worktree), waits for results and lost workers, and guards
    each finished job before its result goes to the handlers (research/parallel_results.py)."""

    def __init__(self, s: Session, agent: Agent, pool: Pool, max_experiments: int | None) -> None:
        self.s, self.agent, self.pool, self.max = s, agent, pool, max_experiments
        self.ray = pool.ray
        self.queue: list[Ticket] = []
        self.flights: dict[object, Ticket] = {}
        self.fixes: list[tuple[CrashInfo, Ticket]] = []
        self.n = 0  # the agent's proposals run (what --max-experiments counts)
        self.idle = 0
        self.quiet_agent = False  # the agent had nothing while others ran: ask again after the next result
        self.stop_proposing = False
        self.baselines_left = 0
        self.here = socket.gethostname()
        # What the runs must leave alone, as the driver itself last left it: the guard after every job
        # compares with this and puts it back (research.guards.guard_run); _record and _keep move it along.
        self.outside = s.outside_state()

    # -- the loop

    def run(self) -> int:
        self._plan_baselines()
        while True:
            self._fill()
            if not self.flights and not self.queue:
                return self.n
            self._wait()

    def _free_slots(self) -> list[Slot]:
        return [sl for sl in self.pool.slots if sl.ready and not sl.busy]

    def _fill(self) -> None:
        for slot in self._free_slots():
            ticket = self._next(slot)
            if ticket is None:
                return
            self._dispatch(slot, ticket)

    def _next(self, slot: Slot) -> Ticket | None:
        if self.queue:
            return self.queue.pop(0)
        if self.baselines_left:
            return None  # no proposal before the branch has its baselines
        s = self.s
        why = s.rerun_due()
        if why and not any(t.kind == "rerun" for t in self.flights.values()):
            run_no, run_dir = s.new_run_dir()
            desc = f"{RERUN} ({s.kept_commit[:7]})"
            return Ticket("rerun", run_no, run_dir, desc, s.trainer_text(), s.kept_commit, s.kept_commit, RERUN,
                          runs=[RunSpec("", s.trainer_text(), RERUN, desc, overtime=True)], rerun=why)
        while not self.stop_proposing and not self.quiet_agent and (self.max is None or self.n < self.max):
            ticket = self._propose(slot)
            if ticket is not None:
                return ticket
            if self.quiet_agent:
                break
        return None

    def _dispatch(self, slot: Slot, t: Ticket) -> None:
        s = self.s
        if not t.commit:  # a merged change: commit it on the current best in this worktree
            self.pool.reset_tree(slot, t.base)
            (slot.tree / s.trainer).write_text(t.text, encoding="utf-8")
            t.commit = gitrepo.commit_paths(slot.tree, [s.trainer], t.description)
        elif slot.at != t.commit:
            self.pool.reset_tree(slot, t.commit)
        slot.at = ""
        job = Job(runs=t.runs, tree=str(slot.tree), host=self.here, timeout_s=s.timeout_s,
                  wall_rule=s.wall_rule(), harness_timeout_s=s.harness_timeout_s, best=s.best,
                  run_no=t.run_no)
        ref = slot.actor.run.remote(job)
        slot.busy = True
        t.slot, t.worker = slot, slot.where
        if not t.started:
            t.started, t.started_at = time.perf_counter(), time.time()
        self.flights[ref] = t
        what = {"confirm": "running the best, then the change again", "rerun": t.description}.get(t.kind, t.description)
        s.console.event(f"[{t.label} on {slot.where}] {what}")

    def _wait(self) -> None:
        ray, s = self.ray, self.s
        starting = {sl.hello_ref: sl for sl in self.pool.slots if sl.hello_ref is not None}
        refs = list(self.flights) + list(starting)
        if not refs:
            raise SessionError("Every worker was lost and none could be started again; see Ray's logs "
                               "(/tmp/ray/session_latest/logs), then run the same command to resume.")
        ready, _ = ray.wait(refs, num_returns=1, timeout=s.settings.tick_s * 2)
        self._status()
        now = time.monotonic()
        for sl in starting.values():
            if sl.hello_ref not in ready and now - sl.hello_since > HELLO_TIMEOUT_S:
                s.console.event(f"worker {sl.name} did not start within {HELLO_TIMEOUT_S:.0f} s; going on without it")
                self.pool.kill(sl)
                sl.hello_ref = None
        for ref in ready:
            if ref in starting:
                self._hello(starting[ref], ref)
            else:
                self._finished(ref)

    def _status(self) -> None:
        s = self.s
        now = time.perf_counter()
        parts = [f"{t.label}@{t.slot.name} {clock(now - t.started)}" for t in self.flights.values()]
        best = f" | best {s.best:.6f}" if s.best is not None else ""
        s.console.status(f"{len(parts)} running: {', '.join(parts)}{best}")

    def _hello(self, slot: Slot, ref) -> None:
        slot.hello_ref = None
        try:
            h = self.ray.get(ref)
            check_hellos(self.s, [h])
        except SessionError as e:
            self.s.console.event(f"worker {slot.name} cannot be used: {e}")
            self.pool.kill(slot)
            return
        except Exception as e:  # noqa: BLE001 - the new actor died too
            self.s.console.event(f"worker {slot.name} could not be started again ({short_error(e)})")
            self.pool.kill(slot)
            return
        slot.where, slot.ready = h["worker"], True
        self.s.console.event(f"worker {slot.where} (pid {h['pid']}) is ready again")

    def _finished(self, ref) -> None:
        t = self.flights.pop(ref)
        slot = t.slot
        slot.busy = False
        self.quiet_agent = False
        try:
            res: JobResult = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # the worker's own code failed: recorded, not retried
            if not self._guarded(t, None):
                self._record_crash(t, f"the worker failed: {short_error(e)}")
            return
        except self.ray.exceptions.RayError as e:  # the actor or its node is gone (its worktree: see _lost)
            if not self._guarded(t, None, tree=False):
                self._lost(t, slot, e)
            return
        for name, data in res.files.items():
            (t.run_dir / name).write_bytes(data)
        if not self._guarded(t, res):  # first the guard, then (only for a clean job) any decision or other run
            getattr(self, f"_{t.kind}")(t, res)

    def _guarded(self, t: Ticket, res: JobResult | None, tree: bool = True) -> bool:
        """The guard after a job, the one the single-worker loop runs after each run (research.guards.guard_run),
        before anything is decided about the job or another run made for it: refs, HEAD, git settings, hooks
        and results.tsv as the driver left them, the job's worktree as committed, the locked files intact
        there, in the repository and in the worker's own copy of the code; whatever changed is put back.
        A locked file changed: the job's row is recorded as rejected and TamperError stops the loop. Anything
        else changed: the job is recorded as rejected (a baseline also stops the loop) and so is every job
        that was running beside it when it was found (any of them may have done it). Returns True when the
        job was recorded here. `tree` False: a lost worker's worktree is left to _lost (a job cut short may
        have left the best's trainer in it)."""
        s = self.s
        first = t.first[0] if t.kind == "confirm" else (res.runs[0] if res is not None and res.runs else None)
        where = t.slot.tree if t.slot is not None and tree else None
        try:
            meddled = guard_run(s, self.outside, tree=where, tree_at=t.commit, save_removed=t.run_dir / "removed")
            if res is not None and res.tampered:
                raise TamperError(f"Locked files were changed during the run ({', '.join(res.tampered[:5])} in "
                                  f"{res.worker}'s copy of the code); the loop stopped. Only the trainer may be "
                                  "edited.")
        except TamperError as e:
            self._record(t, self._row(t, status="rejected", note=f"rejected: {e}", r=first, usage=t.usage))
            raise
        if meddled:
            for other in self.flights.values():
                other.tainted = other.tainted or f"{meddled}, found while it ran beside {t.label}"
        why = meddled or t.tainted
        if not why:
            return False
        note = f"rejected: {why}" + (" (its confirm runs)" if t.kind == "confirm" else "")
        if t.kind == "baseline":
            k, total = t.baseline
            self._record(t, self._row(t, status="rejected", note=f"{BASELINE} {k}/{total}; {note}", r=first))
            raise SessionError(f"The baseline run was rejected ({why}); see {t.run_dir / 'log.txt'}.")
        if t.kind == "confirm":
            t.worker = t.first[4]  # the experiment's row names the worker of its first run
        self._record(t, self._row(t, status="rejected", note=note, r=first, usage=t.usage))
        return True

    def _lost(self, t: Ticket, slot: Slot, error: Exception) -> None:
        s = self.s
        t.losses += 1
        slot.at = ""
        self.pool.kill(slot)
        try:
            self.pool.reset_tree(slot, s.kept_commit)
        except gitrepo.GitError:
            pass
        lost = f"worker {slot.where or slot.name} was lost ({short_error(error)})"
        self.pool.launch(slot)  # a fresh actor in its place, if the cluster still has room for it
        if t.losses < MAX_LOSSES:
            s.console.event(f"[{t.label}] {lost}; the job goes back to the queue")
            self.queue.insert(0, t)
        else:
            self._record_crash(t, f"{lost}; its worker was lost {t.losses} times")

    # -- proposals

    def _propose(self, slot: Slot) -> Ticket | None:
        """Ask the agent for one change, made in `slot`'s worktree from the current best (or, for a fix,
        from the crashed change); check and commit it there. None: the agent had nothing (or the change
        was recorded at once, rejected or not compiling: then `_next` asks again)."""
        s = self.s
        crash, fixing = None, None
        slot.at = ""
        if self.fixes:
            crash, fixing = self.fixes.pop(0)
            self.pool.reset_tree(slot, fixing.base)
            (slot.tree / s.trainer).write_text(fixing.text, encoding="utf-8")
            base = fixing.base
        else:
            self.pool.reset_tree(slot, s.kept_commit)
            base = s.kept_commit
        ctx = agent_context(s, crash)
        ctx.repo, ctx.confine = slot.tree, slot.confine
        running = [t for t in self.flights.values() if t.kind in ("experiment", "confirm")] + \
            [t for t in self.queue if t.kind == "experiment"]
        ctx.in_flight = [(t.description, t.diff) for t in running]
        ctx.running = {_hash(t.text) for t in running}
        ctx.seen_hashes = ctx.seen_hashes | ctx.running
        proposal = self.agent.propose(ctx)
        if proposal is None:
            self.pool.reset_tree(slot, s.kept_commit)
            if running or self.flights:
                self.quiet_agent = True  # ask again once another result is in
                return None
            self.idle += 1
            if self.idle >= MAX_IDLE_PROPOSALS:
                s.console.event(f"the {self.agent.name} agent has nothing more to propose; stopping")
                self.stop_proposing = True
            return None
        mine = slot.tree / s.trainer
        if not crash and mine.is_file() and not s.claim(mine.read_text(encoding="utf-8")):
            self.pool.reset_tree(slot, s.kept_commit)  # another machine of this hardware runs it: not here
            self.idle += 1
            self.stop_proposing = self.idle >= MAX_IDLE_PROPOSALS
            return None
        self.idle = 0
        self.n += 1
        run_no, run_dir = s.new_run_dir()
        label = f"run {run_no}"
        description = sanitize(proposal.description) or "(no description)"
        path = slot.tree / s.trainer
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        changes = gitrepo.changed_paths(slot.tree)
        diff = gitrepo.diff(slot.tree, "HEAD") + "".join(f"# untracked file added: {p}\n"
                                                         for p, k in changes.items() if k == "U")
        (run_dir / "diff.patch").write_text(redact(diff), encoding="utf-8")
        t = Ticket("experiment", run_no, run_dir, description, text, "", base, label, usage=proposal.usage,
                   diff=diff, losses=0)
        t.worker = slot.where
        problem = scope_problem(changes, s.trainer, require_change=True)
        if problem:
            gitrepo.save_files(slot.tree, [p for p, kind in changes.items() if kind == "U"], run_dir / "removed")
            self.pool.reset_tree(slot, s.kept_commit)
            t.commit = NO_COMMIT
            self._record(t, self._row(t, status="rejected", note=f"rejected: {problem}", r=None, usage=t.usage))
            return None
        t.commit = gitrepo.commit_paths(slot.tree, [s.trainer], description)
        slot.at = t.commit
        bad = syntax_problem(text, s.trainer, run_dir / "log.txt")
        if bad:
            self._crashed(t, bad, None)
            return None
        t.runs = [RunSpec("", text, label, description, overtime=True, abort=self._abort_spec(label, text))]
        t.fix_attempt = crash.attempt if crash else 0
        return t


def _hash(text: str) -> str:
    from research.guards import text_hash

    return text_hash(text)


def research_parallel(s: Session, agent: Agent, workers: int, address: str | None = None,
                      max_experiments: int | None = None) -> int:
    """Baseline if needed, then experiments on `workers` Ray workers until `max_experiments` proposals
    have run (None: until stopped). Returns how many ran."""
    pool = Pool(s, workers, address)
    driver = None
    try:
        pool.start()
        driver = Driver(s, agent, pool, max_experiments)
        return driver.run()
    finally:
        pool.close(driver.flights if driver is not None else {})
