"""The research loop itself: baseline, then propose -> run -> keep/revert -> log, with fix attempts
after a crash; and `try_change`, one experiment on an edit someone else made."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from research.experiment import Outcome, run_baseline, run_experiment, run_rerun
from research.proposals import Agent, AgentContext, CrashInfo
from research.ledger import busy_sentence, needed_gain, reach_sentence
from research.session import Session, SessionError

__all__ = ["agent_context", "ensure_baseline", "research", "try_change"]

MAX_IDLE_PROPOSALS = 3  # the loop stops after this many proposals in a row without a change


def agent_context(s: Session, crash: CrashInfo | None = None) -> AgentContext:
    """What an agent gets to see for its next proposal."""
    return AgentContext(
        repo=s.repo,
        trainer=s.trainer,
        host=s.host,
        protocol=s.protocol,
        history=s.branch_rows(),
        best=s.best,
        noise_floor=s.noise_floor,
        seen_hashes=s.seen_trainer_hashes(),
        crash=crash,
        confine=s.confine,
        runs_dir=s.runs_dir,
        branch=s.branch or "",
        shared=s.shared_rows(),
    )


def ensure_baseline(s: Session) -> None:
    """Run the baseline runs this branch is missing (only before its first experiment)."""
    rows = s.branch_rows()
    done = [r for r in s.baselines_done() if r.ok]
    if len(rows) > len(s.baselines_done()) and done:
        return  # experiments already started from this baseline
    total = max(1, s.settings.baseline_runs)
    if len(done) < total:
        s.console.event(baseline_plan(s, total, len(done)))
    for k in range(len(done) + 1, total + 1):
        out = run_baseline(s, k, total)
        if out.status != "keep":
            raise SessionError(f"The baseline run failed ({out.row.note}); see {out.run_dir / 'log.txt'} "
                               "and fix the trainer (or the setup) before starting.")
    say_baseline(s)


def say_baseline(s: Session, workers: int = 1) -> None:
    """Once the baselines have run: the best they give (and which runs it is the mean of), the noise, the
    keep rule with its numbers, and the wall-time rule now measured on them."""
    if s.best is None:
        return
    st = s.state
    vals = ", ".join(f"{r.val_bpb:.6f}" for r in s.baselines_done() if r.ok)
    counted = f"; the best is the {st.basis()}" if len(st.best_runs) < len(st.all_best_runs) or st.speed_adjusted \
        else ""
    s.console.event(f"baseline {s.best:.6f} (runs {vals}{counted}); {st.noise.describe()}; {rule_line(s)}")
    s.console.event(s.allowance_line())
    busy = busy_sentence(s.baselines_done(), s.host.backend, os.environ)
    if busy:
        s.console.event(busy)
    say_reach(s, workers)


def say_reach(s: Session, workers: int = 1) -> None:
    """Say so when the noise puts keeps out of reach (research/ledger.py reach_sentence): when it first
    happens, and again only after keeps were within reach in between."""
    text = reach_sentence(s.state, s.settings.alpha, s.settings.confirm, workers)
    if text and not getattr(s, "said_reach", False):
        s.console.event(text)
    s.said_reach = bool(text)


def baseline_plan(s: Session, total: int, done: int) -> str:
    """What the baseline runs are for and what they cost, said before they start."""
    left = total - done
    walls = [r.wall_seconds for r in s.rows if r.wall_seconds and r.budget_s == s.budget and r.ok]
    if walls:  # earlier runs under this budget in this repository say what one costs here
        per = statistics.median(walls)
        cost = f"about {left * per / 60:.0f} min at ~{per:.0f} s each, as earlier runs took here"
    else:
        cost = f"at least {left * s.budget / 60:.1f} min of training, plus start-up and evaluation"
    return (f"running {left} baseline run{'s' if left != 1 else ''} of the unchanged trainer ({cost}): "
            f"{total} runs give {total - 1} degrees of freedom for "
            f"the run-to-run noise, enough for the t-test to need about {_needed_sigmas(s, total):.1f} sigma of gain "
            f"(with a confirm run) instead of {_needed_sigmas(s, 2):.1f} with 2 runs; --baseline-runs N changes it")


def _needed_sigmas(s: Session, m: int) -> float:
    from research.noise import t_ppf

    n = 2 if s.settings.confirm else 1
    df = max(1, m - 1)
    return t_ppf(1 - s.settings.alpha, df) * (1 / m + 1 / n) ** 0.5


def rule_line(s: Session) -> str:
    """The keep rule with this branch's numbers, in one clause."""
    st = s.state
    need = needed_gain(st, s.settings.alpha, s.settings.confirm)
    if need is None:
        return "no best yet"
    m = len(st.best_runs)
    how = "the mean of a run and its confirm run" if s.settings.confirm else "a single run"
    return (f"keep when {how} beats the best's mean of {m} run{'s' if m != 1 else ''} at one-sided "
            f"p < {s.settings.alpha:g}, i.e. by more than {need:.6f} now")


def research(s: Session, agent: Agent, max_experiments: int | None = None) -> int:
    """Baseline if needed, then experiments until `max_experiments` (None: forever). Returns how many ran."""
    ensure_baseline(s)
    n, idle = 0, 0
    limit = (lambda: n < max_experiments) if max_experiments is not None else (lambda: True)
    while limit():
        why = s.rerun_due()
        if why:
            out = run_rerun(s, why)
            if out.status not in ("rerun", "crash"):
                raise SessionError(f"Re-running the best ended as {out.status} ({out.row.note}); see "
                                   f"{out.run_dir / 'log.txt'}.")
            st = s.state
            if out.status == "rerun" and st.drift is not None and len(st.best_runs) == 1:
                s.console.event(f"the machine ran {100 * st.drift:+.0f}% faster by the loop's gauge during this run "
                                "of the best than during its earlier runs, so the best is now this run's value "
                                "alone until it is measured again at this speed")
        say_reach(s)
        proposal = agent.propose(agent_context(s))
        path = s.repo / s.trainer
        claimed = proposal is not None and path.is_file() and not s.claim(path.read_text(encoding="utf-8"))
        if proposal is None or claimed:  # nothing to run, or another machine runs it: not here
            s.restore()
            idle += 1
            if idle >= MAX_IDLE_PROPOSALS:
                what = "proposed only trainers other machines run" if claimed else "has nothing more to propose"
                s.console.event(f"the {agent.name} agent {what}; stopping")
                break
            continue
        idle = 0
        out = run_experiment(s, proposal.description, proposal.usage)
        n += 1
        attempt = 0
        while out.status == "crash" and agent.can_fix and attempt < s.settings.max_fix_attempts and limit():
            attempt += 1
            s.restore(out.trainer_text)  # the crashed version, uncommitted, for the agent to fix
            crash = CrashInfo(out.row.description, out.row.note, out.log_tail, out.diff, attempt,
                              s.settings.max_fix_attempts)
            s.console.event(f"asking the {agent.name} agent to fix the crash (attempt {attempt} of "
                            f"{s.settings.max_fix_attempts})")
            fix = agent.propose(agent_context(s, crash))
            if fix is None:
                s.restore()
                break
            out = run_experiment(s, fix.description, fix.usage)
            n += 1
    return n


def try_change(s: Session, description: str) -> Outcome:
    """One experiment on the trainer as currently edited (uncommitted) on the current branch.

    Runs the branch's baseline first if it has none (the edit is set aside meanwhile and put back,
    also on Ctrl-C). On a crash the edit stays in the work tree, uncommitted, so it can be fixed.
    """
    if not s.dirty_paths():
        left = sorted(s.runs_dir.glob(f"set-aside-*-{s.trainer}")) if s.runs_dir.is_dir() else []
        hint = (f" (a loop that was stopped set an edit aside in {left[-1].relative_to(s.repo)}: copy it over "
                f"{s.trainer} to try it)") if left else ""
        raise SessionError(f"Nothing to try: {s.trainer} has no uncommitted change; edit it first{hint}.")
    rerun = s.rerun_due() if s.baselines_done() else None
    if s.scope_problem() is None and (not s.baselines_done() or rerun):
        s.pending_edit = s.trainer_text()
        copy = _keep_a_copy(s, s.pending_edit)  # the edit lives only in memory meanwhile: a kill must not lose it
        s.restore()
        first = "re-running the best" + f" ({rerun})" if rerun else "this branch has no baseline yet: running it"
        s.console.event(f"{first} first (your edit is set aside, with a copy in {copy.relative_to(s.repo)} until "
                        "it is back)")
        if rerun:
            run_rerun(s, rerun)
        else:
            ensure_baseline(s)
        s.restore(s.pending_edit)
        copy.unlink()
    s.pending_edit = s.trainer_text() if s.scope_problem() is None else None
    out = run_experiment(s, description, keep_edit=True)
    s.pending_edit = None
    if out.status in ("crash", "invalid", "rejected"):
        s.console.event(f"the change is left uncommitted in {s.trainer} so you can fix it and try again; "
                        f"'git checkout -- {s.trainer}' drops it")
    patch = out.run_dir / "diff.patch"
    if out.status == "rejected" and "changed files other than" in out.row.note and patch.is_file():
        rel = patch.relative_to(s.repo)
        s.console.event(f"the changes to other tracked files were undone; they are kept in {rel}: get them back "
                        f"with: git apply --exclude={s.trainer} {rel}")
    removed = out.run_dir / "removed"
    if removed.is_dir():
        rel = removed.relative_to(s.repo)
        files = sorted(str(f.relative_to(removed)) for f in removed.rglob("*") if f.is_file())
        s.console.event(f"other files in the tree were moved to {rel}/ ({', '.join(files[:5])}"
                        f"{' ...' if len(files) > 5 else ''}); get them back with: cp -r {rel}/. .")
    return out


def _keep_a_copy(s: Session, text: str) -> Path:
    s.runs_dir.mkdir(exist_ok=True)
    copy = s.runs_dir / f"set-aside-{time.strftime('%Y%m%d-%H%M%S')}-{s.trainer}"
    copy.write_text(text, encoding="utf-8")
    return copy
