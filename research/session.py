"""A repository opened for research: the lock held, host and protocol known, history replayed.

`Session.open()` does the start-up work every command shares (lock, backend detection,
protocol preparation, locked-file hashes, results file check); `start_branch()` creates
or resumes `autoresearch/<tag>`; `restore()` puts the tree back to the last kept commit.
The experiment itself is `research.experiment.run_experiment`.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import statistics
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from research import gitrepo
from research.clock import WallRule, fixed_rule, rule_from_baselines
from research.console import Console
from research.guards import LOCK_FILE, LOCKED_PATHS, RepoLock, hash_locked, locked_changes, scope_problem
from research.hparams import SourceValues
from research.ledger import Replay, abort_reference, replay
from research.results import Kind, Row, append_row, ensure_results_file, read_results

__all__ = ["Settings", "Session", "SessionError", "TamperError", "allowance_from_baselines", "default_tag"]



def allowance_from_baselines(baselines: list[Row], budget: float, margin: float | None = None) -> float | None:
    """Seconds past the budget a hand-over may take, measured on these baselines (research/clock.py: the
    good baselines' median wall time plus a margin from their spread, less the budget); None when no
    baseline has run."""
    rule = rule_from_baselines(baselines, budget, margin)
    return None if rule is None else rule.allowance


class SessionError(RuntimeError):
    """Something the user must fix before the loop can run (message is one sentence + what to do)."""


class TamperError(SessionError):
    """A locked file changed during the session; the loop stops."""


@dataclass
class Settings:
    """Knobs of the loop (CLI flags map onto these)."""

    # decisions (research/decisions.py; the README's "How a change is kept" gives the reasons)
    baseline_runs: int = 5  # baseline repeats at the start of a branch: 4 degrees of freedom for the noise
    min_noise: float = 0.0005  # smallest run-to-run sigma the rule uses, whatever the repeats say
    alpha: float = 0.05  # a trainer identical to the best is kept at most this often
    confirm: bool = True  # a promising single run is run again; the mean of both must pass at alpha
    confirm_alpha: float = 0.2  # the screen a single run must pass to earn its confirm run
    remeasure_every: int = 10  # re-run the best after this many experiments (0: never)
    drift: float = 0.15  # relative change of the loop's gauge that counts as the machine's speed drifting
    early_abort: bool = True  # stop a run whose training loss trails the best's by more than the noise allows
    abort_z: float = 4.0  # ... by more than this many curve-noise sigmas
    abort_min_progress: float = 0.3  # ... never before this fraction of the budget
    abort_audit_every: int = 5  # every n-th run that would be stopped runs to the end instead, as a check
    timeout_factor: float = 2.0  # before any baseline, a run is killed past factor x budget + margin
    timeout_margin: float = 120.0
    startup_allowance: float | None = None  # seconds past the budget a hand-over may take; None: measured
    wall_margin: float | None = None  # seconds past the baselines' median a run may take; None: from their spread
    no_sandbox: bool = False  # run trainers without an OS sandbox (they can then read val data, git, secrets)
    max_fix_attempts: int = 2  # fix attempts an agent gets after its change crashed
    tick_s: float = 0.5  # status-line refresh

    @classmethod
    def from_args(cls, args) -> Settings:
        """The settings named by loop.py's parsed options (`--baseline-runs` is `baseline_runs`); an option a
        command does not have, or left unset (None), keeps its default. One reading for every command."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if getattr(args, f.name, None) is not None}
        return cls(**values)


def default_tag(today: _dt.date | None = None) -> str:
    """Branch tag from the date, like `nov23`."""
    d = today or _dt.date.today()
    return d.strftime("%b").lower() + str(d.day)


class Session:
    """State shared by the experiments of one loop process. Build with `Session.open`."""

    def __init__(self, repo: Path, host, protocol, evaluator_hash: str, settings: Settings, console: Console):
        self.repo = Path(repo).resolve()
        self.host = host
        self.protocol = protocol
        self.evaluator_hash = evaluator_hash
        self.settings = settings
        self.console = console
        self.trainer: str = host.trainer
        self.results_path = self.repo / "results.tsv"
        self.runs_dir = self.repo / "runs"
        self.lock = RepoLock(self.repo)
        self.locked: dict[str, str] = {}
        self.preexisting: set[str] = set()
        self.branch: str = ""
        self.kept_commit: str = ""
        self.rows: list[Row] = []  # every row in the file
        self.best: float | None = None
        self.noise_floor: float | None = None
        self.state: Replay = Replay(best=None, noise_floor=None)  # the decision state, see refresh()
        self.sandbox: str | None = None  # bwrap | landlock | seatbelt; None only with --no-sandbox
        self.confine = None  # sandbox.workspace.Confinement, set by open()
        self.owns_tree = False  # set once a branch is adopted: from then on an abort restores the tree
        self.pending_edit: str | None = None  # an edit to put back on abort (loop.py try)
        self.source = SourceValues()  # the hyperparameters each trainer's source sets on this host (its rows')

    # ------------------------------------------------------------------ start-up

    @classmethod
    def open(cls, repo: Path, *, backend: str | None = None, protocol: str | None = None,
             settings: Settings | None = None, console: Console | None = None, prepare_missing: bool = True
             ) -> Session:
        """Lock the repo, detect the host, make sure the protocol is prepared, check the results file.

        Raises SessionError / LockError with a message for the user.
        """
        import backends
        import prepare

        repo = Path(repo).resolve()
        console = console or Console()
        if not gitrepo.is_repo(repo):
            raise SessionError(f"{repo} is not the top of a git repository with a commit; "
                               "clone the project or run 'git init && git add -A && git commit'.")
        lock = RepoLock(repo)
        lock.acquire()
        if lock.ended_trainer is not None:
            console.event(f"ended the trainer (process group {lock.ended_trainer}) that a killed loop left running")
        try:
            try:
                host = backends.detect(backend)
            except backends.BackendError as e:
                raise SessionError(str(e)) from None
            proto = _protocol(prepare, protocol, prepare_missing, console)
            s = cls(repo, host, proto, prepare.evaluator_hash(), settings or Settings(), console)
            s.lock = lock
            s._choose_sandbox()
            s.check_data()
            if not (repo / s.trainer).is_file():
                raise SessionError(f"The trainer for backend '{host.backend}' ({s.trainer}) is missing from {repo}; "
                                   "restore it with 'git checkout -- " + s.trainer + "'.")
            ensure_results_file(s.results_path)
            s.rows = read_results(s.results_path)
            s.locked = hash_locked(repo, "HEAD")  # as committed: an uncommitted edit is already a change
            s.preexisting = {p for p, kind in gitrepo.changed_paths(repo).items() if kind == "U"}  # left alone
            return s
        except BaseException:
            lock.release()
            raise

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_branch(self, tag: str) -> bool:
        """Create `autoresearch/<tag>` from HEAD or resume it; returns True when resumed.

        The work tree must be clean apart from files that were untracked before.
        """
        name = f"autoresearch/{tag}"
        dirty = self.dirty_paths()
        if (dirty == [self.trainer] and self.lock.took_over_from is not None
                and gitrepo.current_branch(self.repo) == name):
            self._set_aside_unfinished_edit()
            dirty = []
        if dirty:
            raise SessionError(
                f"The work tree has uncommitted changes ({_names(dirty)}); commit or revert them first, "
                "or use 'loop.py try \"description\"' to test an edit of the trainer.")
        resumed = gitrepo.branch_exists(self.repo, name)
        self.check_comparable(name)
        self.check_not_stopped(name)
        if gitrepo.current_branch(self.repo) != name:
            if resumed:
                gitrepo.git(self.repo, "checkout", "-q", name)
            else:
                gitrepo.git(self.repo, "checkout", "-q", "-b", name)
        self._adopt_branch(name, drop_unrecorded=True)
        return resumed

    def _set_aside_unfinished_edit(self) -> None:
        """The loop that held this branch died (SIGKILL, power loss) while its agent was editing the
        trainer: save that never-run edit under runs/ and put the trainer back to its commit."""
        self.runs_dir.mkdir(exist_ok=True)
        saved = self.runs_dir / f"unfinished-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.patch"
        saved.write_text(gitrepo.diff(self.repo, "HEAD", "--", self.trainer), encoding="utf-8")
        gitrepo.git(self.repo, "checkout", "-q", "--", self.trainer)
        self.console.event(f"resume: the loop that stopped (pid {self.lock.took_over_from}) left an unfinished edit "
                           f"of {self.trainer}, never run; saved it to {saved.relative_to(self.repo)} and restored "
                           "the trainer")

    def use_current_branch(self, research_only: bool = False) -> None:
        """Work on whatever branch is checked out (`loop.py try`, which passes research_only: it commits,
        resets and moves stray files, so never on a branch people develop on; `transfer`)."""
        name = gitrepo.current_branch(self.repo)
        if name is None:
            raise SessionError("HEAD is detached; check out a branch first (e.g. 'git checkout -b autoresearch/mytag').")
        if research_only and not name.startswith("autoresearch/"):
            raise SessionError(f"'loop.py try' runs on a research branch, not on '{name}'; create one first: "
                               "git checkout -b autoresearch/<tag>")
        self.preexisting = set()  # an external agent works between calls: every untracked file counts
        self.check_comparable(name)
        self.check_not_stopped(name)
        self._drop_unrecorded_try(name)
        if gitrepo.changed_paths(self.repo).get(self.trainer) == "M":
            self.pending_edit = self.trainer_text()  # never lost, whatever happens next
        self._adopt_branch(name, drop_unrecorded=False)

    def _drop_unrecorded_try(self, name: str) -> None:
        """`loop.py try` killed between its commit and its row leaves a trainer-only commit after the last
        kept one that no row records: take it off the branch, its change back in the work tree, uncommitted
        (as `run` drops it on resume). If the trainer already has another uncommitted edit, that edit stays
        and the dropped change is saved under runs/ instead."""
        self.branch = name
        state = replay(self.branch_rows(), self.settings.min_noise)
        kept = state.kept_commit or (state.baselines[0].commit if state.baselines else None)
        if not kept:
            return
        kept_full = gitrepo.git(self.repo, "rev-parse", "--verify", "-q", f"{kept}^{{commit}}", check=False)
        head = gitrepo.head(self.repo)
        if not kept_full or kept_full == head or not self._only_trainer_commits(kept_full, head):
            return
        commits = gitrepo.git(self.repo, "rev-list", f"{kept_full}..{head}").split()
        recorded = {r.commit for r in self.rows if r.branch == name and r.commit}
        if any(c[: len(r)] == r for c in commits for r in recorded):
            return  # a commit with a row is not an experiment cut short
        dropped = gitrepo.diff(self.repo, kept_full, head, "--", self.trainer)
        other_edit = gitrepo.changed_paths(self.repo).get(self.trainer) == "M"
        saved = None
        if other_edit:
            self.runs_dir.mkdir(exist_ok=True)
            saved = self.runs_dir / f"unfinished-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.patch"
            saved.write_text(dropped, encoding="utf-8")
        gitrepo.git(self.repo, "reset", "-q", "--mixed", kept_full)  # the work tree keeps what it holds
        what = f"dropped {len(commits)} commit(s) after {kept_full[:7]} that no row records (an experiment cut short)"
        if saved is not None:
            self.console.event(f"try: {what}; {self.trainer} keeps its other uncommitted edit, and the dropped "
                               f"change is saved in {saved.relative_to(self.repo)}")
        else:
            self.console.event(f"try: {what}; its change is back in {self.trainer}, uncommitted")

    def _adopt_branch(self, name: str, drop_unrecorded: bool) -> None:
        self.branch = name
        state = self.refresh()
        head = gitrepo.head(self.repo)
        kept = state.kept_commit or (state.baselines[0].commit if state.baselines else None)
        kept_full = gitrepo.git(self.repo, "rev-parse", "--verify", "-q", f"{kept}^{{commit}}", check=False) if kept else ""
        self.kept_commit = head
        if drop_unrecorded and kept_full and kept_full != head and self._only_trainer_commits(kept_full, head):
            # commits after the last kept one that no row records: an experiment cut short
            self.kept_commit = kept_full
            gitrepo.git(self.repo, "reset", "-q", "--keep", kept_full)
            self.console.event(f"resume: dropped unrecorded experiment commits after {kept_full[:7]}")
        if state.baselines:
            base = state.baselines[0].commit
            changed = gitrepo.git(self.repo, "diff", "--name-only", base, "HEAD", "--", *LOCKED_PATHS, check=False)
            if changed:
                raise TamperError(
                    f"Locked files changed since this branch's baseline ({_names(changed.split())}); "
                    f"revert them (git checkout {base} -- <file>) or start a new branch with --tag.")
        self.owns_tree = True

    def _only_trainer_commits(self, base: str, head: str) -> bool:
        if not gitrepo.is_ancestor(self.repo, base, head):
            return False
        ok = gitrepo.git(self.repo, "rev-list", "--count", f"{base}..{head}", check=False)
        if not ok or int(ok) == 0:
            return False
        files = gitrepo.git(self.repo, "diff", "--name-only", base, head, check=False).split()
        return files == [self.trainer]

    # ------------------------------------------------------------------ state

    def branch_rows(self) -> list[Row]:
        return [r for r in self.rows if r.branch == self.branch]

    def seen_trainer_hashes(self) -> set[str]:
        """Every trainer version ever run in this repo (any branch, any status)."""
        return {r.trainer_hash for r in self.rows if r.trainer_hash}

    def baselines_done(self) -> list[Row]:
        return [r for r in self.branch_rows() if r.kind == Kind.BASELINE]

    # ------------------------------------------------------------------ decisions

    def refresh(self) -> Replay:
        """Recompute best, noise model and re-measurement state from this branch's rows."""
        self.state = replay(self.branch_rows(), self.settings.min_noise, self.settings.drift)
        self.best, self.noise_floor = self.state.best, self.state.noise_floor
        return self.state

    def check_comparable(self, branch: str) -> None:
        """Refuse (SessionError, one sentence) to work on `branch` under another protocol, evaluator or time
        budget than its rows were measured with: val_bpb after 20 s of training says nothing about a best
        found with 60 s. Rows written before the budget was recorded count by their median training_seconds
        (off by more than 25% and 2 s: another budget)."""
        rows = [r for r in self.rows if r.branch == branch and r.status in ("keep", "discard", "rerun", "abort")]
        if not rows:
            return
        p = self.protocol
        protocols = sorted({r.protocol for r in rows if r.protocol and r.protocol != p.name})
        if protocols:
            raise SessionError(
                f"Branch {branch} was measured under protocol {protocols[0]}, not {p.name}, and results of "
                f"different protocols are never compared: run with --protocol {protocols[0]}, or start another "
                f"branch for {p.name} (loop.py run --tag <new>, or git checkout -b autoresearch/<new> for try).")
        evaluators = sorted({r.evaluator_hash for r in rows
                             if r.evaluator_hash and r.evaluator_hash != self.evaluator_hash})
        if evaluators:
            raise SessionError(
                f"Branch {branch} was scored by evaluator {evaluators[0]} and this checkout's evaluator is "
                f"{self.evaluator_hash} (judge/, an evaluation adapter or the validation stream changed), and "
                f"scores of different evaluators are never compared: start another branch (loop.py run --tag "
                f"<new>, or git checkout -b autoresearch/<new> for try), or check out the commit its evaluator "
                f"came from.")
        budgets = [r.budget_s for r in rows if r.budget_s]
        if budgets:
            theirs = budgets[-1]
            differs = any(abs(b - self.budget) > 1e-6 for b in budgets)
        else:
            secs = [r.training_seconds for r in rows if r.training_seconds]
            theirs = statistics.median(secs) if secs else None
            differs = theirs is not None and abs(theirs - self.budget) > max(2.0, 0.25 * self.budget)
        if differs:
            how = "AUTORESEARCH_TIME_BUDGET" if getattr(p, "time_budget_overridden", False) else "the protocol"
            fix = ("unset AUTORESEARCH_TIME_BUDGET" if how != "the protocol" else
                   f"set AUTORESEARCH_TIME_BUDGET={theirs:g}")
            raise SessionError(
                f"Branch {branch} compares runs of a {theirs:g} s budget and this one would train for "
                f"{self.budget:g} s ({how}), so its val_bpb could not be compared with the branch's best: {fix}, "
                f"or start another branch for this budget (loop.py run --tag <new>, or git checkout -b "
                f"autoresearch/<new> for try).")

    def check_not_stopped(self, branch: str) -> None:
        """Refuse (one sentence) a branch a tampering run stopped (research/tamper.py), until it is cleared."""
        from research import tamper

        tamper.check_not_stopped(self.rows, branch, self.runs_dir)

    def rerun_due(self) -> str | None:
        """Why the best should be run again before the next experiment, or None: every
        `remeasure_every` experiments since it last ran, or after a third of that when the machine's
        speed moved by more than `drift` (the best's last run started a new stretch and has no second
        run yet, or the machine was that much faster or slower by the loop's gauge for the last three runs
        than for the best's)."""
        every = self.settings.remeasure_every
        st = self.state
        if every <= 0 or st.best is None or not st.best_runs:
            return None
        if st.since_best_run >= every:
            return f"{st.since_best_run} experiments since the best last ran"
        if st.drift_reason and st.since_best_run >= max(1, every // 3):
            return st.drift_reason
        return None

    def abort_reference(self):
        """(Reference, None) for early abort against the best trainer's curves, or (None, why not)."""
        return abort_reference(self.state, self.branch_rows(), self.runs_dir, self.settings.early_abort)

    @property
    def budget(self) -> float:
        return float(self.protocol.time_budget)

    def wall_rule(self) -> WallRule | None:
        """The wall-time rule every run but a baseline is held to (research/clock.py): the median of this
        branch's baselines plus a small margin from their spread (--wall-margin fixes the margin), told to
        the trainer as its deadline; None until a baseline has run (baselines are never held to it: they
        are what it is measured on). --startup-allowance S fixes the limit at budget + S instead."""
        if self.settings.startup_allowance is not None:
            return fixed_rule(self.budget, self.settings.startup_allowance, self.baselines_done())
        return rule_from_baselines(self.baselines_done(), self.budget, self.settings.wall_margin)

    def startup_allowance(self) -> float | None:
        """Seconds past the budget a trainer may take from start to hand-over (see wall_rule); None until a
        baseline has run."""
        rule = self.wall_rule()
        return None if rule is None else rule.allowance

    def overtime_limit(self) -> float | None:
        """Wall seconds from trainer start to hand-over past which a run is rejected (overtime)."""
        rule = self.wall_rule()
        return None if rule is None else rule.limit

    @property
    def timeout_s(self) -> float:
        """When a trainer is killed: before any baseline, factor x budget + margin; after, the overtime
        limit plus the allowance again plus the margin (a hung run is cut short, a slow one is not)."""
        allowance = self.startup_allowance()
        if allowance is None:
            return self.settings.timeout_factor * self.budget + self.settings.timeout_margin
        return self.budget + 2 * allowance + self.settings.timeout_margin

    @property
    def harness_timeout_s(self) -> float:
        return max(300.0, 2 * self.budget) + self.settings.timeout_margin

    def _choose_sandbox(self) -> None:
        """Pick the OS sandbox every trainer and harness run goes through, or refuse to run without one."""
        from sandbox import confine as sandbox
        from sandbox.workspace import Confinement

        if self.settings.no_sandbox:
            self.sandbox = None
        else:
            try:
                self.sandbox = sandbox.detect()
            except sandbox.SandboxError as e:
                raise SessionError(str(e)) from None
            if self.sandbox is None:
                raise SessionError(
                    "No sandbox is available on this machine (Linux: install bubblewrap, or use a kernel with "
                    "Landlock; macOS: sandbox-exec); install one, or run with --no-sandbox, which lets the "
                    "trainer read the validation data, the repository's git, your files and other processes.")
        sandbox.become_subreaper()
        self.confine = Confinement(self.repo, self.trainer, self.protocol, self.host, self.sandbox)

    def reap(self, keep: set[int] = frozenset()) -> None:
        """End every process a finished run left behind (they were re-parented to this loop), but for
        `keep` (the run's pre-started harness, still to score it)."""
        from sandbox import confine as sandbox

        sandbox.kill_orphans(exclude=set(keep))

    def changes(self) -> dict[str, str]:
        """Paths that differ from HEAD (kind M/A/D/U, see gitrepo.changed_paths), leaving out the loop's
        own files and, in `run`, the untracked files that were there before it started."""
        return {p: k for p, k in gitrepo.changed_paths(self.repo).items()
                if p not in self.preexisting and not _loop_file(p)}

    def dirty_paths(self) -> list[str]:
        return sorted(self.changes())

    def scope_problem(self, allow_trainer: bool = True) -> str | None:
        """Why the tree's changes break the one-file rule, or None if they keep to it (guards.scope_problem)."""
        return scope_problem(self.changes(), self.trainer, allow_trainer=allow_trainer)

    # ------------------------------------------------------------------ actions

    def restore(self, trainer_text: str | None = None, save_removed: Path | None = None) -> None:
        """Back to the last kept commit: tracked files reset, files the experiment added removed
        (copied under `save_removed` first, if given, so nothing is lost).

        `trainer_text`, if given, is written back to the trainer afterwards (an edit to keep).
        """
        gitrepo.reset_hard(self.repo, self.kept_commit)
        new = [p for p, k in self.changes().items() if k == "U"]
        if save_removed is not None:
            for rel in new:
                src = self.repo / rel
                if src.is_file() and not src.is_symlink():
                    dst = save_removed / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
        gitrepo.remove_paths(self.repo, new)
        if trainer_text is not None:
            (self.repo / self.trainer).write_text(trainer_text, encoding="utf-8")

    def outside_state(self) -> tuple[gitrepo.RefState, bytes | None]:
        """What a run must leave alone besides the work tree: every ref (branches, tags, replace refs, the
        stash...), what HEAD points at, the repository's config, hooks and info/ files, and results.tsv."""
        try:
            data = self.results_path.read_bytes()
        except OSError:
            data = None
        return gitrepo.ref_state(self.repo), data

    def put_back_outside(self, before: tuple[gitrepo.RefState, bytes | None]) -> str | None:
        """Undo what a run changed outside the work tree since `outside_state()` gave `before`: refs moved
        back, re-created or deleted, the branch checked out again at its commit, the repository's settings
        and hooks written back, results.tsv written back. Returns what it changed, in words (None: nothing)."""
        refs, data = before
        changed = gitrepo.put_back_refs(self.repo, refs)
        now = self.results_path.read_bytes() if self.results_path.is_file() else None
        if data is not None and now != data:
            tmp = self.results_path.with_name(self.results_path.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.results_path)
            changed.append(self.results_path.name)
        return ", ".join(changed) or None

    def abort(self) -> None:
        """After Ctrl-C or an error: restore the tree if the session owns it (keeping a pending edit)."""
        if self.owns_tree and self.kept_commit:
            self.restore(self.pending_edit)

    def check_data(self) -> None:
        """Raise SessionError when the protocol's prepared data is missing or damaged: the tokenizer, and
        the shards evaluation and training read (each parquet checked by its footer, which a cut-short
        copy lacks). Runs at start and after every crash, so broken data stops the loop with the
        reason instead of being blamed on the agent's change."""
        import prepare

        try:
            prepare.verify_prepared(self.protocol)
        except prepare.PrepareError as e:
            raise SessionError(f"{e}, then start the loop again (it resumes where it stopped)") from None

    def verify_locked(self, tree: Path | None = None) -> None:
        """Raise TamperError if a locked file differs from its hash at start (in the repository, or in `tree`:
        a worker's git worktree, whose locked files are the repository's)."""
        changed = locked_changes(tree or self.repo, self.locked)
        if changed:
            raise TamperError(f"Locked files were changed during the run ({_names(changed)}); the loop stopped "
                              "and restored the tree. Only the trainer may be edited.")

    def record(self, row: Row) -> None:
        """Verify the locked files, then append the row (atomic) and remember it."""
        self.verify_locked()
        append_row(self.results_path, row)
        self.rows.append(row)

    def new_run_dir(self) -> tuple[int, Path]:
        """Create runs/<n>/ with the next free number, once the disks have room for a run (else SessionError)."""
        from sandbox.workspace import free_space_problem

        if (short := free_space_problem(self.results_path, getattr(self.confine, "resources", None))) is not None:
            raise SessionError(short)
        self.runs_dir.mkdir(exist_ok=True)
        existing = [int(p.name) for p in self.runs_dir.iterdir() if p.name.isdigit()]
        n = max(existing, default=0) + 1
        while True:
            try:
                (self.runs_dir / str(n)).mkdir()
                return n, self.runs_dir / str(n)
            except FileExistsError:
                n += 1

    def trainer_text(self) -> str:
        return (self.repo / self.trainer).read_text(encoding="utf-8")

    def describe(self) -> str:
        p = self.protocol
        budget = f"{p.time_budget:g} s" + (" (override)" if getattr(p, "time_budget_overridden", False) else "")
        return (f"backend {self.host.backend} ({self.host.device_name}) - {self.host.reason}\n"
                f"trainer {self.trainer}, protocol {p.name} v{p.version}, budget {budget}, "
                f"evaluator {self.evaluator_hash}\n"
                f"sandbox {self.sandbox or 'NONE (--no-sandbox: the trainer can read val data, git and your files)'}")

    def allowance_line(self) -> str:
        """The wall-time rule in one line (known once the branch is adopted: it comes from its baselines)."""
        if self.wall_rule() is None:
            return (f"wall-time rule: measured on the baselines, which are not held to it (until the first one "
                    f"has run, a run is killed after {self.timeout_s:.0f} s)")
        return f"wall-time rule: {self.wall_rule().describe()}; a run is killed after {self.timeout_s:.0f} s"


def _protocol(prepare, name: str | None, prepare_missing: bool, console: Console):
    """The protocol to run: explicit > env > remembered > tiny; prepared if it is not."""
    try:
        p = prepare.get_protocol(name)
    except prepare.PrepareError:
        if name or os.environ.get("AUTORESEARCH_PROTOCOL"):
            raise
        p = prepare.get_protocol("tiny")  # nothing prepared yet: the offline protocol works everywhere
    if not prepare.is_prepared(p):
        if not prepare_missing:
            raise SessionError(f"Protocol '{p.name}' is not prepared; run: uv run prepare.py --protocol {p.name}")
        console.event(f"preparing protocol '{p.name}' (first run only)...")
        try:
            prepare.prepare(p)
        except prepare.PrepareError as e:
            raise SessionError(str(e)) from None
    return p


def _loop_file(path: str) -> bool:
    """results.tsv, runs/ and the lock are the loop's own (ignored in this project's .gitignore anyway)."""
    return path in ("results.tsv", "results.tsv.tmp", LOCK_FILE) or path.startswith("runs/")


def _names(paths, limit: int = 5) -> str:
    paths = list(paths)
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
