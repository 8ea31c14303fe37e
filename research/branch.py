"""The branch and work tree a research session works on (`BranchWork`, which `Session` is built on):
starting or resuming `autoresearch/<tag>` (or adopting the branch checked out, for `try` and `transfer`),
refusing one measured under another protocol, evaluator or budget, or stopped for tampering; what in the
tree differs from HEAD and whether it keeps to the one-file rule; putting the tree back to the last kept
commit; and what a run must leave alone outside the tree (refs, git settings and hooks, results.tsv),
read before it and put back after it.

It uses these of the session's attributes: repo, trainer, branch, kept_commit, rows, results_path,
runs_dir, preexisting, pending_edit, owns_tree, lock, console, protocol, budget, evaluator_hash, settings,
source, confine, and its refresh(), branch_rows() and trainer_text().
"""

from __future__ import annotations

import datetime as _dt
import os
import statistics
from pathlib import Path

from research import gitrepo, hparams
from research.errors import SessionError, TamperError
from research.guards import LOCK_FILE, LOCKED_PATHS, scope_problem
from research.ledger import replay

__all__ = ["BranchWork"]


class BranchWork:
    """The git side of a session: its branch, its work tree and what a run must not change."""

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
                f"The work tree has uncommitted changes ({gitrepo.names(dirty)}); commit or revert them first, "
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
        if not self.branch_rows():
            self._flatten_hyperparameters()
        return resumed

    def _flatten_hyperparameters(self) -> None:
        """Before its first run, a branch gets one commit that writes the trainer's hyperparameters for this host
        as one line each (research/hparams.py: flatten): the per-hardware lines go, so what the agent reads top
        to bottom is what runs here. A block whose lines in effect cannot be told is left as it is, said so."""
        text = self.trainer_text()
        try:
            settings = hparams.parse_block(text)
        except hparams.HyperparamError:
            return
        conds = hparams.conditions(settings)
        if not conds:
            return
        truth = self.source.truth(text, settings, self.confine)
        flat = hparams.flatten(text, truth)
        if flat is None:
            self.console.event(f"the hyperparameter block keeps its per-hardware lines (which of them hold here could "
                               f"not be told{': ' + self.source.failures[-1] if self.source.failures else ''}); "
                               "the line in effect is the last one whose conditions hold")
            return
        held = " and ".join(c for c in conds if truth[c]) or "none of its hardware conditions"
        (self.repo / self.trainer).write_text(flat, encoding="utf-8")
        self.kept_commit = gitrepo.commit_paths(
            self.repo, [self.trainer], f"Hyperparameters for this host, one line each ({held})")
        self.console.event(f"wrote the hyperparameters in effect on this host ({held}) into {self.trainer} as one "
                           f"line each, commit {self.kept_commit[:7]}")

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
                    f"Locked files changed since this branch's baseline ({gitrepo.names(changed.split())}); "
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
            gitrepo.save_files(self.repo, new, save_removed)
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


def _loop_file(path: str) -> bool:
    """results.tsv, runs/ and the lock are the loop's own (ignored in this project's .gitignore anyway)."""
    return path in ("results.tsv", "results.tsv.tmp", LOCK_FILE) or path.startswith("runs/")
