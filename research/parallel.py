"""Parallel experiments: N at once, on every GPU of a machine or across the machines of a Ray cluster.

`loop.py run --workers N` (or `--ray-address ADDR`) lands here instead of research/driver.py's
`research()`. The driver (this process) keeps everything that decides and records: proposals from
the agent, commits, the keep rule, the branch and results.tsv, one result at a time. Each worker
is a Ray actor (research/trial_worker.py) with its resources declared (one GPU each on CUDA/ROCm),
so Ray places them; it runs one job at a time, sandboxed, from its own git worktree, and returns
the harness's measurement.

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

import difflib
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from research import gitrepo, tamper
from research.console import clock
from research.driver import MAX_IDLE_PROPOSALS, agent_context, baseline_plan, say_baseline
from research.experiment import (Outcome, abort_monitor, audit_note, confirm_decision, make_row, report_outcome, screen,
                                 syntax_problem, write_meta)
from research.run import NO_CURVE, log_tail
from research.guards import guard_run, scope_problem
from research.ledger import BASELINE, BEST_NEXT, RERUN
from research.pool import HELLO_TIMEOUT_S, Pool, Slot, check_hellos, short_error
from research.proposals import Agent, CrashInfo, Usage
from research.results import CONFIRM_RUN, NO_COMMIT, Kind, Row, sanitize
from research.session import Session, SessionError, TamperError
from research.trial_worker import Job, JobResult, RunResult, RunSpec
from sandbox.secrets import redact

__all__ = ["MAX_REBASES", "research_parallel"]

MAX_REBASES = 2  # a stale win is merged onto the current best and re-run at most this many times in a row
MAX_LOSSES = 2  # a job whose worker is lost this many times is recorded as a crash instead of re-queued


@dataclass
class Ticket:
    """A job waiting for a worker, or (as a Flight) running on one."""

    kind: str  # baseline | rerun | experiment | confirm
    run_no: int
    run_dir: Path
    description: str
    text: str  # the trainer that runs (the change; for a confirm job, the change again)
    commit: str  # full hash checked out in the worktree ("" for a merged change not committed yet)
    base: str  # the kept commit the change was made on
    label: str
    runs: list[RunSpec] = field(default_factory=list)
    usage: Usage | None = None
    diff: str = ""
    baseline: tuple[int, int] | None = None
    rerun: str | None = None
    first: tuple | None = None  # confirm: (first RunResult, its verdict, the best's text)
    rebased: int = 0
    losses: int = 0
    started: float = 0.0  # perf_counter at the first dispatch
    started_at: float = 0.0
    slot: Slot | None = None
    worker: str = ""
    fix_attempt: int = 0  # a fix of a crashed change: which attempt
    tainted: str = ""  # what another run's guard found changed while this one ran (it may have done it)


class Driver:
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

    # -- recording

    def _row(self, t: Ticket, *, status: str, note: str, r: RunResult | None, commit: str | None = None,
             kind: str | None = None, text: str | None = None, description: str | None = None,
             usage: Usage | None = None, progress: float | None = None) -> Row:
        """The row of ticket `t`'s run `r`; its kind follows the ticket's (a confirm ticket's own rows say theirs)."""
        kind = kind or {"baseline": Kind.BASELINE, "rerun": Kind.RERUN}.get(t.kind, Kind.EXPERIMENT)
        return make_row(self.s, kind=kind, commit=commit if commit is not None else t.commit, status=status,
                        description=description or t.description, note=note, run_no=t.run_no,
                        trainer_text=t.text if text is None else text, m=r.measurement if r else None,
                        wall=r.wall_seconds if r else None, usage=usage, progress=progress, worker=t.worker, run=r)

    def _record(self, t: Ticket, row: Row, extra: list[Row] = ()) -> None:
        s = self.s
        for r in (row, *extra):
            s.record(r)
            refs, data = self.outside  # results.tsv as the guard expects it: with the driver's own rows
            self.outside = (refs, (data or b"") + r.to_line().encode("utf-8"))
        s.refresh()
        timings = {"total": time.perf_counter() - t.started} if t.started else {}
        write_meta(t.run_dir, row, timings, started_at=t.started_at, finished_at=time.time(), worker=t.worker)
        out = Outcome(row=row, run_dir=t.run_dir, timings=timings)
        report_outcome(s, t.label, out)
        tamper.stop_if_tampered(s, [row, *extra])  # a non-causal model: the branch stops (the pool is closed)

    def _record_crash(self, t: Ticket, reason: str) -> None:
        if t.kind == "baseline":
            raise SessionError(f"The baseline run failed ({reason}); see {t.run_dir / 'log.txt'}.")
        row = self._row(t, status="crash", note=f"crash: {reason}", r=None, usage=t.usage)
        self._record(t, row)

    def _keep(self, t: Ticket) -> None:
        """Move the branch to the change's commit (its parent is the kept commit: a fast-forward)."""
        s = self.s
        gitrepo.reset_hard(s.repo, t.commit)
        s.kept_commit = gitrepo.head(s.repo)
        refs = self.outside[0]  # the guard expects the branch where the driver moved it
        refs.refs[f"refs/heads/{s.branch}"] = (s.kept_commit, "")
        refs.head_commit = s.kept_commit

    # -- baselines and re-runs

    def _plan_baselines(self) -> None:
        s = self.s
        rows = s.branch_rows()
        done = [r for r in s.baselines_done() if r.ok]
        if len(rows) > len(s.baselines_done()) and done:
            return
        total = max(1, s.settings.baseline_runs)
        if len(done) >= total:
            return
        n = len(self.pool.slots)
        left = -(-(total - len(done)) // n) * n  # whole rounds: each baseline runs beside as many others
        more = f", {left - total + len(done)} more than asked so that every round keeps all {n} workers busy " \
               "(a run alone on shared cores is faster than one beside others)" if left > total - len(done) else ""
        total = len(done) + left
        s.console.event(baseline_plan(s, total, len(done)) + f"; {n} at once{more}")
        text = s.trainer_text()
        for k in range(len(done) + 1, total + 1):
            run_no, run_dir = s.new_run_dir()
            (run_dir / "diff.patch").write_text("", encoding="utf-8")
            desc = BASELINE if k == 1 else f"{BASELINE} (repeat {k}/{total})"
            label = f"baseline {k}/{total}"
            self.queue.append(Ticket("baseline", run_no, run_dir, desc, text, s.kept_commit, s.kept_commit, label,
                                     runs=[RunSpec("", text, label, desc, overtime=False)], baseline=(k, total)))
        self.baselines_left = total - len(done)

    def _baseline(self, t: Ticket, res: JobResult) -> None:
        s = self.s
        r = res.runs[0] if res.runs else None
        k, total = t.baseline
        if r is not None and r.status == "invalid":
            self._record(t, self._row(t, status="invalid", note=f"{BASELINE} {k}/{total}; {tamper.note(r.reason)}",
                                      r=r))
        if r is None or r.status != "ok":
            reason = r.reason if r else "stopped"
            raise SessionError(f"The baseline run failed ({reason}); see {t.run_dir / 'log.txt'} and fix the "
                               "trainer (or the setup) before starting.")
        self._record(t, self._row(t, status="keep", note=f"{BASELINE} {k}/{total}", r=r))
        self.baselines_left -= 1
        if not self.baselines_left:
            say_baseline(s, len(self.pool.slots))

    def _rerun(self, t: Ticket, res: JobResult) -> None:
        r = res.runs[0] if res.runs else None
        if r is not None and r.status == "ok":
            self._record(t, self._row(t, status="rerun", note=f"rerun of the best: {t.rerun}", r=r))
        elif r is not None and r.status == "crash":
            self._record(t, self._row(t, status="crash", note=f"crash: {r.reason}", r=None))
        elif r is not None and r.status == "invalid":
            self._record(t, self._row(t, status="invalid", note=tamper.note(r.reason), r=r))
        else:
            raise SessionError(f"Re-running the best ended as {r.status if r else 'nothing'} "
                               f"({r.reason if r else 'stopped'}); see {t.run_dir / 'log.txt'}.")

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
            self._save_removed(slot, run_dir, changes)
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

    def _save_removed(self, slot: Slot, run_dir: Path, changes: dict) -> None:
        for rel, kind in changes.items():
            src = slot.tree / rel
            if kind == "U" and src.is_file() and not src.is_symlink():
                dst = run_dir / "removed" / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)

    def _abort_spec(self, label: str, text: str):
        monitor = abort_monitor(self.s, label, text)
        if monitor is None:
            return None
        return (monitor.ref, monitor.z, monitor.min_progress, monitor.audit)

    # -- results of changes

    def _experiment(self, t: Ticket, res: JobResult) -> None:
        s = self.s
        r = res.runs[0] if res.runs else RunResult("", "crash", None, "stopped", 0.0)
        if r.status == "abort":
            self._record(t, self._row(t, status="abort", note=f"abort: {r.reason}", r=r, usage=t.usage,
                                      progress=r.fired_at))
            return
        if r.status != "ok":
            if r.status == "crash":
                self._crashed(t, r.reason, r)
                return
            note = tamper.note(r.reason) if r.status == "invalid" else f"{r.status}: {r.reason}"
            self._record(t, self._row(t, status=r.status, note=note, r=r, usage=t.usage))
            return
        m = r.measurement
        if r.first_step_s is None:
            s.console.event(f"[{t.label}] {NO_CURVE}")
        st = s.state
        verdict = screen(s, m.val_bpb)
        note = verdict.note
        if r.audit:
            note += audit_note(s, m.val_bpb, r.fired)
        wins = verdict.status == "keep" or (s.settings.confirm and verdict.promising)
        if wins and t.base != s.kept_commit:
            self._record(t, self._row(t, status="discard", note=self._stale(t, note), r=r, usage=t.usage))
            return
        if wins and s.settings.confirm and st.best_values:
            best_text = gitrepo.git_bytes(s.repo, "show", f"{s.kept_commit}:{s.trainer}").decode("utf-8", "replace")
            s.console.event(f"[{t.label}] promising ({verdict.note}); running the best, then the change again")
            c = Ticket("confirm", t.run_no, t.run_dir, t.description, t.text, t.commit, t.base, t.label + " confirm",
                       usage=t.usage, diff=t.diff, rebased=t.rebased, started=t.started, started_at=t.started_at,
                       first=(r, verdict, best_text, note, t.worker))
            c.runs = [RunSpec("best_", best_text, f"{t.label} best", f"the best next to run {t.run_no}", overtime=True),
                      RunSpec("confirm_", t.text, f"{t.label} confirm", t.description, overtime=True)]
            self.queue.insert(0, c)
            return
        status = verdict.status
        if status == "keep":
            self._keep(t)
        self._record(t, self._row(t, status=status, note=note, r=r, usage=t.usage))

    def _confirm(self, t: Ticket, res: JobResult) -> None:
        s = self.s
        first, verdict, best_text, _, worker1 = t.first
        runs = {r.prefix: r for r in res.runs}
        rows: list[Row] = []
        b = runs.get("best_")
        kept_then = t.base
        if b is not None and b.status == "ok":
            rows.append(self._row(t, status="rerun", note=f"{BEST_NEXT} {t.run_no}", r=b, commit=kept_then, kind=Kind.BEST_NEXT,
                                  text=best_text, description=f"{RERUN} ({kept_then[:7]})"))
        elif b is not None and b.status == "invalid":
            rows.append(self._row(t, status="invalid", note=f"{BEST_NEXT} {t.run_no}; {tamper.note(b.reason)}", r=b,
                                  kind=Kind.BEST_NEXT,
                                  commit=kept_then, text=best_text, description=f"{RERUN} ({kept_then[:7]})"))
        else:
            s.console.event(f"[{t.label}] the best's run next to it did not measure "
                            f"({b.reason if b else 'not run'}); deciding without it")
        c = runs.get("confirm_")
        if c is not None and c.status == "invalid":
            status, note = "invalid", tamper.note(f"its confirm run: {c.reason}")
        elif c is None or c.status != "ok":
            status = "discard"
            note = f"confirm run failed ({c.reason if c else 'not run'}); first run {first.measurement.val_bpb:.6f}: " \
                   f"{verdict.note}"
        else:
            rows.insert(0, self._row(t, status="rerun", note=f"{CONFIRM_RUN} {t.run_no}", r=c, kind=Kind.CONFIRM))
            status, note = confirm_decision(s, first.measurement.val_bpb, c.measurement.val_bpb, rows[1:])
        if b is not None and b.status == "invalid" and status != "invalid":  # the best itself tampers: no keep
            status, note = "discard", "not confirmed: the best's run next to it handed over a non-causal model"
        if status == "keep" and t.base != s.kept_commit:
            status, note = "discard", self._stale(t, note)
        if status == "keep":
            self._keep(t)
        worker, t.worker = t.worker, worker1  # the experiment's row names the worker of its first run
        row = self._row(t, status=status, note=note, r=first, usage=t.usage)
        t.worker = worker
        self._record(t, row, rows)

    def _stale(self, t: Ticket, note: str) -> str:
        """A win measured on an older best: merge its change onto the current best and queue it as a new
        experiment (see the module's docstring). Returns the note for the stale row."""
        s = self.s
        kept = s.kept_commit
        head = f"stale win ({note}), measured on {t.base[:7]} while the best moved to {kept[:7]}"
        if t.rebased >= MAX_REBASES:
            return f"{head}; not merged again (stale {t.rebased + 1} times in a row)"

        def text_at(commit: str) -> str:
            return gitrepo.git_bytes(s.repo, "show", f"{commit}:{s.trainer}").decode("utf-8", "replace")

        kept_text = text_at(kept)
        merged = gitrepo.merge_text(s.repo, kept_text, text_at(t.base), t.text)
        if merged is None:
            return f"{head}; its change does not apply cleanly to the current best: dropped"
        if merged == kept_text:
            return f"{head}; the current best already holds its change"
        run_no, run_dir = s.new_run_dir()
        base_desc = t.description.split(" (merged onto ")[0]
        desc = sanitize(f"{base_desc} (merged onto {kept[:7]})")
        diff = "".join(difflib.unified_diff(kept_text.splitlines(True), merged.splitlines(True),
                                            f"a/{s.trainer}", f"b/{s.trainer}"))
        new = Ticket("experiment", run_no, run_dir, desc, merged, "", kept, f"run {run_no}", diff=diff,
                     rebased=t.rebased + 1)
        (run_dir / "diff.patch").write_text(redact(diff), encoding="utf-8")
        new.runs = [RunSpec("", merged, new.label, desc, overtime=True, abort=self._abort_spec(new.label, merged))]
        self.queue.insert(0, new)
        return f"{head}; merged onto it and re-run as run {run_no}"

    def _crashed(self, t: Ticket, reason: str, r: RunResult | None) -> None:
        s = self.s
        row = self._row(t, status="crash", note=f"crash: {reason}", r=r, usage=t.usage)
        self._record(t, row)
        attempt = t.fix_attempt + 1
        if self.agent.can_fix and attempt <= s.settings.max_fix_attempts and (self.max is None or self.n < self.max):
            tail = log_tail(t.run_dir / "log.txt")
            crash = CrashInfo(t.description, row.note, tail, t.diff, attempt, s.settings.max_fix_attempts)
            s.console.event(f"asking the {self.agent.name} agent to fix the crash of {t.label} (attempt {attempt} of "
                            f"{s.settings.max_fix_attempts})")
            self.fixes.append((crash, t))
        s.check_data()


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
