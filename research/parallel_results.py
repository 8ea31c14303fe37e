"""What the parallel driver (research/parallel.py) does with a job's result once it is guarded: the
baselines' and re-runs' rows, a change's screen, its confirm job and the decision on it, the stale-base
rule (a win measured on an older best is merged onto the current one and run again, at most MAX_REBASES
times in a row), crash-fix requests, and recording rows (which moves the guard's expected state along).
The same step functions as the single-worker path decide (research/experiment.py: screen, audit_note,
confirm_decision, make_row)."""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from pathlib import Path

from research import gitrepo, tamper
from research.driver import baseline_plan, say_baseline
from research.experiment import (Outcome, abort_monitor, audit_note, confirm_decision, make_row, report_outcome,
                                 run_covariate, screen, write_meta)
from research.ledger import BASELINE, BEST_NEXT, RERUN
from research.pool import Slot
from research.proposals import CrashInfo, Usage
from research.results import CONFIRM_RUN, Kind, Row, sanitize
from research.run import NO_CURVE, log_tail
from research.session import SessionError
from research.trial_worker import JobResult, RunResult, RunSpec
from sandbox.secrets import redact

__all__ = ["MAX_REBASES", "Ticket", "Decisions"]

MAX_REBASES = 2  # a stale win is merged onto the current best and re-run at most this many times in a row


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


class Decisions:
    """The result handlers of the parallel driver (a mixin of `research.parallel.Driver`, which provides
    `s`, `agent`, `queue`, `fixes`, `outside`, `n`, `max` and the pool)."""

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
        s.publish()  # to the git remote the loop shares through, if any
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

    def _abort_spec(self, label: str, text: str):
        monitor = abort_monitor(self.s, label, text)
        if monitor is None:
            return None
        return (monitor.ref, monitor.z, monitor.min_progress, monitor.audit)

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
        verdict = screen(s, m.val_bpb, run_covariate(s, r))
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
            status, note = confirm_decision(s, first.measurement.val_bpb, c.measurement.val_bpb, rows[1:],
                                            (first, c))
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
