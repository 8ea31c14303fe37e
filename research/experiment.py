"""One experiment, end to end: check the change, commit, run, read the evaluator's result,
keep or revert, record.

`run_experiment(session, description)` takes the trainer as it is in the work tree;
`run_baseline(session, k, n)` runs the current commit unchanged. Both return an
`Outcome` whose `row` is what was appended to results.tsv. The result is read from
the evaluator's JSON file only (never from what the trainer prints).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from research import gitrepo, tamper
from research.console import clock
from research.decisions import AbortMonitor, LossCurve, curve_shaping_changes
from research.noise import NoiseModel, Verdict, decide_runs
from research.guards import guard_run, scope_problem, text_hash
from research.ledger import ABORT_AUDIT, ABORT_OFF, BASELINE, BEST_NEXT, RERUN, covariate, replay
from research.proposals import Usage
from research.run import Measurement, log_tail, run_once
from research.results import CONFIRM_RUN, MEASURED, NO_COMMIT, Kind, Row, sanitize
from research.session import Session, TamperError
from sandbox.secrets import redact

__all__ = ["Outcome", "Trial", "run_experiment", "begin", "check", "commit_change", "run_change", "guard",
           "decide_trial", "record", "run_baseline", "run_rerun", "decide", "make_row", "write_meta",
           "abort_monitor", "report_outcome"]


@dataclass
class Outcome:
    row: Row
    run_dir: Path
    log_tail: str = ""
    diff: str = ""
    trainer_text: str = ""  # the trainer that ran (or was rejected)
    timings: dict = field(default_factory=dict)  # seconds per phase: commit, trainer, parse, bookkeeping, total

    @property
    def status(self) -> str:
        return self.row.status


def decide(cand: list[float], best: list[float], noise: NoiseModel | None, alpha: float,
           confirm_alpha: float | None = None, cand_speed: list | None = None, best_speed: list | None = None
           ) -> Verdict:
    """Keep or discard a candidate's runs against the best trainer's runs (research/noise.py has the
    rule): kept when the one-sided t-test against the pooled run-to-run noise gives p < alpha, the runs
    adjusted for the machine's speed when the noise model says it matters (`cand_speed`, `best_speed`:
    each run's covariate value, research/ledger.py); `promising` when p < confirm_alpha (worth a confirming
    rerun). With no best yet, keep."""
    if not best or noise is None:
        return Verdict("keep", "first measurement on this branch", False, 0.0, 0.0, 0.0, 0.0)
    return decide_runs(cand, best, noise, alpha, confirm_alpha, cand_speed, best_speed)


def run_covariate(s: Session, run) -> float | None:
    """The keep rule's covariate, as the branch's noise model uses it, for a run not recorded yet (a
    research.run TrainerRun or a RunResult); None when the rule does not adjust."""
    return covariate(run, s.state.covariate)


def syntax_problem(text: str, trainer: str, log_path: Path) -> str | None:
    """The check stage's compile: a trainer that does not parse needs no process. Writes the error to the
    run's log and returns the reason, or None."""
    try:
        compile(text, trainer, "exec")
    except SyntaxError as e:
        log_path.write_text(f"SyntaxError: {e.msg} ({trainer}, line {e.lineno})\n", encoding="utf-8")
        return f"syntax error on line {e.lineno}: {e.msg}"
    return None


def screen(s: Session, value: float, speed: float | None = None, *, confirm: bool = True) -> Verdict:
    """A change's first run (`speed`: its covariate value, run_covariate) against the best's runs (`confirm`:
    and whether it earns a confirm run)."""
    st = s.state
    return decide([value], st.best_values, st.noise, s.settings.alpha,
                  s.settings.confirm_alpha if s.settings.confirm and confirm else None, [speed], st.best_speeds)


def audit_note(s: Session, value: float, fired: str | None) -> str:
    """The note of a run early abort would have stopped but let through as an audit (`fired`: why it would
    have been stopped); an audited run that measured below the best turns early abort off."""
    if not fired:
        return ""
    st = s.state
    note = f"; {ABORT_AUDIT} it would have been stopped {fired}"
    if st.best is not None and value < st.best:
        note += f", yet it measured below the best's mean {st.best:.6f}: {ABORT_OFF}"
    return note


def confirm_decision(s: Session, first: float, second: float, best_rows: list[Row], runs: tuple = (None, None)
                     ) -> tuple[str, str]:
    """A promising change after its confirm run: the mean of its two runs (`runs`: the two runs, for the
    rule's covariate) against the best's runs at the machine's current speed, `best_rows` (the best's run
    next to it, when it measured) counted in. Returns (status, note)."""
    st = replay(s.branch_rows() + best_rows, s.settings.min_noise, s.settings.drift)
    speeds = [covariate(r, st.covariate) for r in runs]
    v = decide([first, second], st.best_values, st.noise, s.settings.alpha, None, speeds, st.best_speeds)
    verdict = "confirmed" if v.status == "keep" else "not confirmed"
    return v.status, f"{verdict} by a rerun, mean of {first:.6f} and {second:.6f}: {v.note}"


def make_row(s: Session, *, kind: str, commit: str, status: str, description: str, note: str, run_no: int,
             trainer_text: str,
         m: Measurement | None, wall: float | None, usage: Usage | None, progress: float | None = None,
         worker: str = "", run=None) -> Row:
    """One results row. `run` (a TrainerRun or RunResult) gives the loop's own timing of the trainer, its
    gauge readings and the hyperparameters it read from the committed source before the run. The
    hyperparameters and the device are the loop's (never the trainer's claim); memory, training seconds,
    steps, MFU and parameters are the trainer's claim (research.results.CLAIMED)."""
    hp = getattr(run, "hyperparams", None)
    if hp is None:
        hp = s.source.values(trainer_text)
    measured = m is not None and status in MEASURED
    return Row(
        kind=kind,
        commit=commit[:7] if commit else NO_COMMIT,
        val_bpb=m.val_bpb if measured else 0.0,
        memory_gb=m.memory_gb if measured else 0.0,
        status=status,
        description=description,
        timestamp=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        backend=s.host.backend,
        device=s.host.device_name,
        protocol=s.protocol.name,
        evaluator_hash=s.evaluator_hash,
        training_seconds=m.training_seconds if m else None,
        num_steps=m.num_steps if m else None,
        mfu_percent=m.mfu_percent if m else None,
        num_params_M=m.num_params_M if m else None,
        wall_seconds=wall,
        agent_tokens_in=usage.tokens_in if usage else None,
        agent_tokens_out=usage.tokens_out if usage else None,
        agent_cost_usd=usage.cost_usd if usage else None,
        trainer_hash=text_hash(trainer_text),
        holdout_bpb=m.holdout_bpb if m else None,
        hyperparams=hp,
        branch=s.branch,
        run=run_no,
        note=note,
        budget_s=s.budget,
        progress=progress,
        worker=worker,
        wall_ratio=wall / s.budget if wall and s.budget else None,
        wall_limit_s=getattr(run, "wall_limit_s", None),
        first_step_s=getattr(run, "first_step_s", None),
        tail_s=getattr(run, "tail_s", None),
        gauge_before_s=getattr(run, "gauge_before_s", None),
        gauge_after_s=getattr(run, "gauge_after_s", None),
        others_cpu=getattr(run, "others_cpu", None),
    )


def write_meta(run_dir: Path, row: Row, timings: dict, **extra) -> None:
    meta = {"row": asdict(row), "timings": {k: round(v, 4) for k, v in timings.items()}, **extra}
    try:
        (run_dir / "meta.json").write_text(redact(json.dumps(meta, indent=1, default=str)), encoding="utf-8")
    except OSError:
        pass  # the row in results.tsv is the record; meta.json is a convenience


def run_baseline(s: Session, index: int, total: int) -> Outcome:
    """Run the current commit unchanged as baseline `index` of `total` and record it as keep (or crash)."""
    return run_experiment(s, BASELINE if index == 1 else f"{BASELINE} (repeat {index}/{total})",
                          baseline=(index, total))


def run_rerun(s: Session, why: str) -> Outcome:
    """Run the best (the last kept commit) again, unchanged and never stopped early, and record it as
    `rerun`: one more measurement for the best's mean and the noise model (`why` goes in the note)."""
    return run_experiment(s, f"{RERUN} ({s.kept_commit[:7]})", rerun=why, label=RERUN)


@dataclass
class Trial:
    """One experiment on its way through the stages of `run_experiment`: what it is (set at the start), and
    what each stage found (the commit, the run, its measurement, the decision)."""

    s: Session
    description: str
    usage: Usage | None
    kind: str
    run_no: int
    run_dir: Path
    label: str
    text: str  # the trainer as it is in the work tree (the one that runs)
    baseline: tuple[int, int] | None = None
    rerun: str | None = None
    record_as: str | None = None
    keep_edit: bool = False
    commit: str = ""
    diff: str = ""
    run: object | None = None  # research.run.TrainerRun
    status: str = ""  # ok | crash | invalid | rejected | abort, then the decision's
    m: Measurement | None = None
    reason: str = ""
    monitor: AbortMonitor | None = None
    note: str = ""
    progress: float | None = None
    tail: str = ""
    extra: list[Row] = field(default_factory=list)  # rows recorded after the experiment's (its confirm run)
    timings: dict[str, float] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)

    @property
    def same(self) -> bool:
        """The last kept commit as it is (a baseline or a rerun): nothing to commit, nothing to decide."""
        return bool(self.baseline or self.rerun)

    @property
    def wall(self) -> float:
        return self.run.wall_seconds if self.run else 0.0

    def row(self, status: str | None = None, note: str | None = None, *, measured: bool = True) -> Row:
        return make_row(self.s, kind=self.kind, commit=self.commit, status=status or self.status,
                        description=self.description, note=self.note if note is None else note, run_no=self.run_no,
                        trainer_text=self.text, m=self.m if measured else None, wall=self.wall,
                        usage=self.usage, progress=self.progress, run=self.run)


def run_experiment(s: Session, description: str, usage: Usage | None = None, *,
                   baseline: tuple[int, int] | None = None, keep_edit: bool = False,
                   record_as: str | None = None, label: str | None = None, rerun: str | None = None) -> Outcome:
    """Check, commit, run, guard, decide and record the trainer as it is in the work tree.

    - baseline=(k, n): run the last kept commit as it is (no change expected), status keep.
    - rerun=why: the same, recorded as status rerun (a re-measurement of the best).
    - otherwise the change is decided by the rule in research/noise.py: a promising single run
      is run again (a `rerun` row after the experiment's row) and the mean of both is tested; while it
      trains, early abort may stop it (status abort) when its loss trails the best's.
    - keep_edit: on a crash, an invalid model or a rejection the edit is written back to the work
      tree, uncommitted (`loop.py try`, so an external agent can fix it); other files it left are
      moved to runs/<n>/removed/.
    - record_as: record a measured run with this status (e.g. "transfer") instead of keep/discard;
      the note still compares it with the best, and the tree always goes back to the last kept commit.
    Raises TamperError (after restoring and recording) when a locked file was changed, and
    SessionError (after recording the crash) when a run crashed and the prepared data is damaged.
    """
    t = begin(s, description, usage, baseline=baseline, keep_edit=keep_edit, record_as=record_as, label=label,
              rerun=rerun)
    problem = check(t)
    if problem:
        note = f"rejected: {problem}"
        if baseline:
            note = f"{BASELINE} {baseline[0]}/{baseline[1]}; {note}"
        out = record(t, make_row(s, kind=t.kind, commit="", status="rejected", description=t.description,
                                 note=note, run_no=t.run_no, trainer_text=t.text, m=None, wall=None, usage=usage))
        report_outcome(s, t.label, out)
        return out
    commit_change(t)
    before = s.outside_state()
    run_change(t)
    decide_trial(t, meddled=guard(t, before))
    out = record(t, t.row(), restore=t.status != "keep")
    if t.status == "keep":
        s.kept_commit = gitrepo.head(s.repo)
    report_outcome(s, t.label, out)
    tamper.stop_if_tampered(s, [out.row, *t.extra])  # BranchStopped when a run of it handed over a non-causal model
    if t.status == "crash":
        s.check_data()  # damaged data is not the change's fault: stop and say so (SessionError)
    return out


def begin(s: Session, description: str, usage: Usage | None, *, baseline, keep_edit, record_as, label,
          rerun) -> Trial:
    """The trial for the trainer in the work tree: its run folder, label, kind and source (its
    hyperparameters read from it now, for the row)."""
    run_no, run_dir = s.new_run_dir()
    kind = (Kind.BASELINE if baseline else Kind.RERUN if rerun else Kind.TRANSFER if record_as == "transfer"
            else Kind.EXPERIMENT)
    text = s.trainer_text() if (s.repo / s.trainer).exists() else ""
    s.source.values(text, s.confine)
    return Trial(s, sanitize(description) or "(no description)", usage, kind, run_no, run_dir,
                 label or (f"baseline {baseline[0]}/{baseline[1]}" if baseline else f"run {run_no}"), text,
                 baseline=baseline, rerun=rerun, record_as=record_as, keep_edit=keep_edit)


def check(t: Trial) -> str | None:
    """Stage 1: the change keeps to the one-file rule (a baseline or rerun: nothing changed at all). Writes
    the diff to the run folder; returns what is wrong, or None."""
    s = t.s
    if t.same:
        t.commit, t.diff = s.kept_commit, ""
        problem = s.scope_problem(allow_trainer=False)
    else:
        problem = scope_problem(s.changes(), s.trainer, require_change=True)
        t.diff = gitrepo.diff(s.repo, "HEAD") + _untracked_listing(s)
    (t.run_dir / "diff.patch").write_text(redact(t.diff), encoding="utf-8")
    return problem


def commit_change(t: Trial) -> None:
    """Stage 2: commit the trainer (a baseline or rerun runs the kept commit as it is)."""
    started = time.perf_counter()
    if not t.same:
        t.commit = gitrepo.commit_paths(t.s.repo, [t.s.trainer], t.description)
    t.timings["commit"] = time.perf_counter() - started


def run_change(t: Trial) -> None:
    """Stage 3: run it (sandboxed trainer, then the harness), a syntax error without a process; early
    abort watches an experiment's curve."""
    s, started = t.s, time.perf_counter()
    bad = syntax_problem(t.text, s.trainer, t.run_dir / "log.txt")
    if bad:
        t.status, t.reason = "crash", bad
    else:
        s.console.event(f"[{t.label}] {t.description}")
        t.monitor = None if t.same or t.record_as else abort_monitor(s, t.label, t.text)
        t.run, t.status, t.m, t.reason = run_once(s, t.run_dir, t.label, t.description, monitor=t.monitor,
                                                   overtime=not t.baseline)
    t.timings["trainer"] = time.perf_counter() - started
    t.tail = log_tail(t.run_dir / "log.txt")


def guard(t: Trial, before) -> str | None:
    """Stage 4, after every run of the trial and before anything is decided on it (research.guards.guard_run):
    branch, refs, git settings, hooks and results.tsv untouched, locked files intact, nothing in the tree but
    the trainer's commit. What the run changed is put back and returned (the trial is then rejected), or
    None. A locked file changed: the row is recorded as rejected, then
    TamperError stops the loop (record() verifies again, so a change the reset cannot undo stops without a row)."""
    try:
        meddled = guard_run(t.s, before, save_removed=t.run_dir / "removed")
    except TamperError as e:
        record(t, t.row("rejected", f"rejected: {e}", measured=False))
        raise
    return meddled


def decide_trial(t: Trial, meddled: str | None) -> None:
    """Stage 5: the trial's status and note from its run and its guard (`meddled`: what the run changed that
    it must leave alone; it is then rejected, unmeasured); a promising change gets its confirm run first,
    each of its runs guarded in turn."""
    s, started = t.s, time.perf_counter()
    if meddled:
        t.status, t.note, t.m = "rejected", f"rejected: {meddled}", None
    elif t.status == "ok" and t.baseline:
        t.status = "keep"
    elif t.status == "ok" and t.rerun:
        t.status, t.note = "rerun", f"rerun of the best: {t.rerun}"
    elif t.status == "ok":
        verdict = screen(s, t.m.val_bpb, run_covariate(s, t.run), confirm=not t.record_as)
        t.status, t.note = verdict.status, verdict.note
        confirm = None
        if t.record_as:
            t.status = t.record_as
        elif s.settings.confirm and s.state.best_values and (verdict.status == "keep" or verdict.promising):
            t.status, t.note, confirm = _confirm(s, t.run_dir, t.label, t.description, t.m, verdict, commit=t.commit,
                                                 run_no=t.run_no, text=t.text, guard=lambda before: guard(t, before),
                                                 first_run=t.run)
        if t.monitor is not None and t.monitor.audit:
            t.note += audit_note(s, t.m.val_bpb, t.monitor.fired)
        if confirm and t.status != "rejected":
            t.extra.extend(confirm)  # the confirm run, and the best's run next to it
    elif t.status == "abort":
        t.progress = t.monitor.fired_at if t.monitor is not None else None
        t.note = f"abort: {t.reason}"
    elif t.status == "invalid":
        t.note = tamper.note(t.reason)  # a non-causal model: recorded, then the branch stops
    else:
        t.note = f"{t.status}: {t.reason}"
    if t.baseline:  # baseline rows are recognised by this note prefix, whatever their status
        t.note = f"{BASELINE} {t.baseline[0]}/{t.baseline[1]}" + (f"; {t.note}" if t.note else "")
    t.timings["parse"] = time.perf_counter() - started


def record(t: Trial, row: Row, restore: bool = True) -> Outcome:
    """Stage 6: the tree back at the kept commit (unless kept; `loop.py try` gets a failed edit back,
    uncommitted), the row and its confirm rows in results.tsv, the session's state refreshed, meta.json."""
    s, started = t.s, time.perf_counter()
    if restore:
        kept_edit = t.keep_edit and row.status in ("crash", "invalid", "rejected") and bool(t.text)
        s.restore(t.text if kept_edit else None, save_removed=t.run_dir / "removed")
    s.record(row)
    for r in t.extra:
        s.record(r)
    s.refresh()  # best, noise model and re-measurement state from the rows
    s.publish()  # to the git remote the loop shares through, if any
    t.timings["bookkeeping"] = time.perf_counter() - started
    t.timings["total"] = time.perf_counter() - t.t0
    write_meta(t.run_dir, row, t.timings, started_at=t.started_at, finished_at=time.time())
    return Outcome(row=row, run_dir=t.run_dir, log_tail=t.tail, diff=t.diff, trainer_text=t.text, timings=t.timings)


def _confirm(s: Session, run_dir: Path, label: str, description: str, m: Measurement, first: Verdict, *,
             commit: str, run_no: int, text: str, guard, first_run=None):
    """A promising change: the best (the last kept commit's trainer) runs once now, then the change again,
    both never stopped early; the change is decided on the mean of its two runs against the best's runs
    at the machine's current speed, the fresh one included. The best's run sits between the change's
    two, so a machine that gets faster or slower during the night moves both sides alike.

    Each run is guarded (`guard`: research.guards.guard_run) before anything else happens: one that changed
    what it must leave alone ends the confirmation (the change's own run: rejected; the best's: discarded).

    Returns (status, note, rows to record after the experiment's: the confirm run and the best's run)."""
    s.console.event(f"[{label}] promising ({first.note}); running the best, then the change again")
    rows: list[Row] = []
    before = s.outside_state()
    best = _run_best_next_to(s, run_dir, label, run_no)
    meddled = guard(before)
    if meddled:
        if best is not None:
            rows.append(make_row(s, kind=Kind.BEST_NEXT, commit=s.kept_commit, status="rejected",
                                 description=f"{RERUN} ({s.kept_commit[:7]})",
                                 note=f"{BEST_NEXT} {run_no}; rejected: {meddled}", run_no=run_no, trainer_text=best[2],
                                 m=None, wall=best[0].wall_seconds, usage=None, run=best[0]))
        return "discard", f"not confirmed: the best's run next to it was rejected ({meddled})", rows
    if best is not None:
        run_b, m_b, best_text, why = best
        rows.append(make_row(s, kind=Kind.BEST_NEXT, commit=s.kept_commit,
                             status="rerun" if why is None else "invalid", description=f"{RERUN} ({s.kept_commit[:7]})",
                             note=f"{BEST_NEXT} {run_no}" if why is None else f"{BEST_NEXT} {run_no}; {tamper.note(why)}",
                             run_no=run_no, trainer_text=best_text, m=m_b, wall=run_b.wall_seconds, usage=None,
                             run=run_b))
        if why is not None:
            return "discard", "not confirmed: the best's run next to it handed over a non-causal model", rows
    before = s.outside_state()
    run2, status2, m2, reason = run_once(s, run_dir, label + " confirm", description, prefix="confirm_")
    meddled = guard(before)
    if meddled:
        return "rejected", f"rejected: {meddled} (its confirm run)", rows
    if status2 == "invalid":
        return "invalid", tamper.note(f"its confirm run: {reason}"), rows
    if status2 != "ok":
        return "discard", f"confirm run failed ({reason}); first run {m.val_bpb:.6f}: {first.note}", rows
    rows.insert(0, make_row(s, kind=Kind.CONFIRM, commit=commit, status="rerun", description=description,
                            note=f"{CONFIRM_RUN} {run_no}", run_no=run_no, trainer_text=text, m=m2,
                            wall=run2.wall_seconds, usage=None, run=run2))
    status, note = confirm_decision(s, m.val_bpb, m2.val_bpb, rows[1:], (first_run, run2))
    return status, note, rows


def _run_best_next_to(s: Session, run_dir: Path, label: str, run_no: int):
    """Run the last kept commit's trainer once, in place of the change (put back afterwards, whatever
    happens): (run, measurement, its text, None), (run, None, its text, the harness's reason) when it
    handed over a non-causal model, or None when it did not measure."""
    path = s.repo / s.trainer
    mine = path.read_bytes()
    try:
        best_bytes = gitrepo.git_bytes(s.repo, "show", f"{s.kept_commit}:{s.trainer}")
        path.write_bytes(best_bytes)
        run, status, m, reason = run_once(s, run_dir, f"{label} best", f"the best next to run {run_no}",
                                           prefix="best_")
    finally:
        path.write_bytes(mine)
    text = best_bytes.decode("utf-8", errors="replace")
    if status == "invalid":
        return run, None, text, reason
    if status != "ok":
        s.console.event(f"[{label}] the best's run next to it did not measure ({reason}); deciding without it")
        return None
    return run, m, text, None


def abort_monitor(s: Session, label: str, text: str) -> AbortMonitor | None:
    """The early-abort watcher for one experiment whose trainer source is `text`, or None: off, nothing to
    compare with yet, or a change to the schedule, size or batch (research/decisions.py CURVE_SHAPING), whose
    curve says nothing mid-run about its end."""
    ref, why = s.abort_reference()
    if ref is not None:
        best_text = gitrepo.git_bytes(s.repo, "show", f"{s.kept_commit}:{s.trainer}").decode("utf-8", "replace")
        shaping = curve_shaping_changes(s.source.values(best_text, s.confine), s.source.values(text, s.confine))
        if shaping:
            s.console.event(f"[{label}] not watched for early abort: it changes {', '.join(shaping)}, which shapes "
                            "the training curve itself, so trailing the best's curve mid-run says nothing about its end")
            return None
    if ref is None:
        if s.settings.early_abort and why != getattr(s, "_abort_why", None):  # say it once per reason
            s.console.event(f"[{label}] not watched for early abort: {why}")
        s._abort_why = why
        return None
    s._abort_why = None
    every = s.settings.abort_audit_every
    audit = every > 0 and (s.state.would_abort + 1) % every == 0
    return AbortMonitor(LossCurve(), ref, z=s.settings.abort_z, min_progress=s.settings.abort_min_progress,
                        audit=audit)


def _untracked_listing(s: Session) -> str:
    new = [p for p, k in s.changes().items() if k == "U"]
    return "".join(f"# untracked file added: {p}\n" for p in new)


def report_outcome(s: Session, label: str, out: Outcome) -> None:
    r = out.row
    val = f"val_bpb {r.val_bpb:.6f}" if r.ok else r.note
    extra = f" | {r.note}" if r.ok else ""
    best = f" | best {s.best:.6f}" if s.best is not None else ""
    what = "MEASURED" if r.kind == Kind.BASELINE and r.status == "keep" else r.status.upper()  # a baseline decides nothing
    s.console.event(f"[{label}] {what} {val}{extra} | {clock(out.timings.get('total', 0))}{best}")
