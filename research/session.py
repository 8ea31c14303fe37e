"""A repository opened for research: the lock held, host and protocol known, history replayed.

`Session.open()` does the start-up work every command shares (lock, backend detection,
protocol preparation, locked-file hashes, results file check); the branch and the work tree
(`start_branch()`, `restore()`, what a run must leave alone) are research/branch.py's; the
decision state is research/ledger.py's replay of the rows; the clock's limits come from
research/clock.py. The experiment itself is `research.experiment.run_experiment`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

from research import gitrepo
from research.clock import WallRule, fixed_rule, rule_from_baselines
from research.branch import BranchWork
from research.console import Console
from research.errors import SessionError, TamperError
from research.guards import RepoLock, hash_locked, locked_changes, text_hash
from research.hparams import SourceValues
from research.ledger import Replay, abort_reference, replay
from research.results import Kind, Row, append_row, ensure_results_file, read_results
from research.share import hardware_class, hardware_of

__all__ = ["Settings", "Session", "SessionError", "TamperError", "allowance_from_baselines", "default_tag"]



def allowance_from_baselines(baselines: list[Row], budget: float, margin: float | None = None) -> float | None:
    """Seconds past the budget a hand-over may take, measured on these baselines (research/clock.py: the
    good baselines' median wall time plus a margin from their spread, less the budget); None when no
    baseline has run."""
    rule = rule_from_baselines(baselines, budget, margin)
    return None if rule is None else rule.allowance


@dataclass
class Settings:
    """Knobs of the loop (CLI flags map onto these)."""

    # decisions (research/noise.py and research/decisions.py; the README's "How a change is kept" gives the reasons)
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


class Session(BranchWork):
    """State shared by the experiments of one loop process: the lock, host, protocol, sandbox and
    settings, the results file and the branch's decision state, and the clock's limits. Build with
    `Session.open`; the branch and work tree it works on are research/branch.py's (`BranchWork`)."""

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
        self.share = None  # research.share.Sharing when the loop shares through a git remote (`run --remote`)
        self.claimed_elsewhere: set[str] = set()  # trainer hashes another machine claimed first

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

    # ------------------------------------------------------------------ state

    def branch_rows(self) -> list[Row]:
        return [r for r in self.rows if r.branch == self.branch]

    def seen_trainer_hashes(self) -> set[str]:
        """Every trainer version ever run in this repo (any branch, any status), and those another machine
        sharing the remote claimed first."""
        return {r.trainer_hash for r in self.rows if r.trainer_hash} | self.claimed_elsewhere

    def baselines_done(self) -> list[Row]:
        return [r for r in self.branch_rows() if r.kind == Kind.BASELINE]

    # ------------------------------------------------------------------ decisions

    def refresh(self) -> Replay:
        """Recompute best, noise model and re-measurement state from this branch's rows."""
        self.state = replay(self.branch_rows(), self.settings.min_noise, self.settings.drift)
        self.best, self.noise_floor = self.state.best, self.state.noise_floor
        return self.state

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
            raise TamperError(f"Locked files were changed during the run ({gitrepo.names(changed)}); the loop stopped "
                              "and restored the tree. Only the trainer may be edited.")

    def record(self, row: Row) -> None:
        """Verify the locked files, then append the row (atomic) and remember it."""
        self.verify_locked()
        append_row(self.results_path, row)
        self.rows.append(row)

    def publish(self) -> None:
        """Publish the rows to the git remote the loop shares through, if any (a failure is one warning
        line: the loop goes on alone, and what is missing goes out with the next publish)."""
        if self.share is not None:
            self.share.publish(self.results_path, self.runs_dir)

    def claim(self, text: str) -> bool:
        """Claim this trainer on the shared remote before running it: False when another machine of this
        hardware class runs it under this protocol (said in one line); True without a remote."""
        if self.share is None:
            return True
        c = self.share.claim(text, hardware_class(self.host), self.protocol.name)
        if not c.won:
            self.claimed_elsewhere.add(text_hash(text))
            self.console.event(f"skipped: {c.holder} already runs this trainer ({c.note}); asking for another "
                               "change")
        return c.won

    def shared_rows(self) -> list[tuple[str, Row]]:
        """The other machines' measured rows of this hardware class, protocol and evaluator, as last fetched
        from the shared remote: (host, row), their claims; [] without a remote."""
        if self.share is None:
            return []
        hardware = hardware_class(self.host)
        return [(h.host, r) for h in self.share.others for r in h.rows
                if r.ok and hardware_of(r) == hardware and r.protocol == self.protocol.name
                and r.evaluator_hash == self.evaluator_hash]

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
