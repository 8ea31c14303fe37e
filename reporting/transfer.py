"""`loop.py transfer`: another machine's best config, run once on this host.

`plan_transfer` matches the best kept config of another machine's results against this trainer's
hyperparameter block (per-hardware sizes such as DEVICE_BATCH_SIZE stay at the host's value unless
told otherwise); `apply_transfer` writes it on the lines in effect on this host; `run_transfer` runs
it once in an open session, logged with status `transfer` and never kept.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from reporting.summary import TRANSFER, UNKNOWN, ReportError, Source, load_source, shorten, summarize, value_text
from research.results import Row

__all__ = ["HOST_SPECIFIC", "TransferPlan", "plan_transfer", "apply_transfer", "run_transfer", "cmd_transfer",
           "add_subparser"]

# Per-hardware sizes: how much fits and runs fast on a device, not what the model learns.
# A transfer keeps the host's values for these unless told otherwise.
HOST_SPECIFIC = ("DEVICE_BATCH_SIZE",)


@dataclass
class TransferPlan:
    """What a transfer changes in this host's trainer, and what it leaves alone and why."""

    source: Source
    row: Row  # the other machine's best kept experiment
    changes: dict[str, object]  # applied: NAME -> their value
    same: list[str]  # their value is already this host's
    kept: dict[str, tuple[object, object]]  # per-hardware sizes kept from the host: NAME -> (host, theirs)
    missing: list[str]  # not an editable hyperparameter of this trainer: skipped
    not_recorded: list[str]  # in this trainer but not in their config: the host's value stays

    def lines(self) -> list[str]:
        """Human-readable account of the plan, one line each."""
        r = self.row
        out = [f"transfer: best kept config of {self.source.label} ({self.source.path}): "
               f"val_bpb {r.val_bpb:.6f}, commit {r.commit or UNKNOWN}, protocol {r.protocol or UNKNOWN}"]
        out.append("  applied: " + (", ".join(f"{k}={value_text(v)}" for k, v in self.changes.items()) or "nothing"))
        if self.same:
            out.append("  already the same here: " + ", ".join(self.same))
        for name, (host, theirs) in self.kept.items():
            out.append(f"  kept from this host (per-hardware size): {name}={value_text(host)} "
                       f"(theirs: {value_text(theirs)})")
        if self.missing:
            out.append("  skipped, not hyperparameters of this trainer: " + ", ".join(self.missing))
        if self.not_recorded:
            out.append("  not in their config, this host's value stays: " + ", ".join(self.not_recorded))
        return out


def plan_transfer(from_path: str | Path, trainer_text: str, truth: dict[str, bool] | None = None,
                  keep: tuple[str, ...] | list[str] = HOST_SPECIFIC) -> TransferPlan:
    """Match the best kept config of `from_path` against this trainer's hyperparameter block.

    `truth` holds this host's values of the block's hardware conditions (`hparams.probe_conditions`),
    so a value the trainer chooses per hardware is compared with the one this host runs. Names in
    `keep` stay at the host's value. Raises ReportError when the source has no kept config with
    recorded hyperparameters or the trainer has no readable block.
    """
    from research.hparams import HyperparamError, effective_values, parse_block

    source = load_source(from_path)
    summary = summarize(source)
    if summary.best is None:
        raise ReportError(f"{from_path} has no finished experiment whose config could be transferred.")
    best = summary.best[1]
    if not best.hyperparams:
        raise ReportError(f"{from_path} records no hyperparameters for its best run (a reference-format file?); "
                          "transfer needs results written by this loop.")
    try:
        settings = parse_block(trainer_text)
    except HyperparamError as e:
        raise ReportError(f"Cannot read this host's hyperparameter block: {e}.") from e
    here = effective_values(settings, truth or {})
    plan = TransferPlan(source, best, {}, [], {}, [], [])
    plan.missing = [n for n in best.hyperparams if n not in settings]
    for name in settings:  # in the block's order
        if name not in best.hyperparams:
            plan.not_recorded.append(name)
            continue
        theirs = best.hyperparams[name]
        if name in here and _same_value(theirs, here[name]):
            plan.same.append(name)
        elif name in keep:
            plan.kept[name] = (here.get(name, UNKNOWN), theirs)
        else:
            plan.changes[name] = theirs
    return plan


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def apply_transfer(plan: TransferPlan, trainer_text: str, truth: dict[str, bool] | None = None) -> str:
    """The trainer text with the plan's changes written on the lines in effect on this host (the
    editor the local agent uses), so the other hardware's baselines in the block stay as they are."""
    from research.hparams import HyperparamError, set_values

    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.changes.items()}
    try:
        return set_values(trainer_text, changes, truth or {})
    except HyperparamError as e:
        raise ReportError(f"Cannot write the transferred config into the trainer: {e}.") from e


def _batch_problem(hp: dict, seq_len: int) -> str | None:
    total, dev = hp.get("TOTAL_BATCH_SIZE"), hp.get("DEVICE_BATCH_SIZE")
    if isinstance(total, int) and isinstance(dev, int) and dev > 0 and total % (dev * seq_len):
        return (f"TOTAL_BATCH_SIZE={total} is not a multiple of DEVICE_BATCH_SIZE={dev} x {seq_len} tokens; "
                "pass --keep TOTAL_BATCH_SIZE to keep this host's, or --apply-all to take theirs too")
    return None


def _host_truth(session, text: str) -> dict[str, bool]:
    from research.hparams import HyperparamError, conditions, parse_block, probe_conditions

    try:
        conds = conditions(parse_block(text))
        return probe_conditions(session.repo / session.trainer, conds, session.confine.run_python)
    except HyperparamError as e:
        raise ReportError(f"Cannot tell which hyperparameter lines apply on this host: {e}.") from e


def run_transfer(session, from_path: str | Path, *, keep: list[str] | None = None, apply_all: bool = False,
                 dry_run: bool = False) -> int:
    """Run another machine's best config once in an open session (branch adopted, tree clean).

    Writes the other machine's best kept hyperparameters into this host's trainer, except names in
    `keep` (plus the per-hardware DEVICE_BATCH_SIZE unless `apply_all`) and names this
    trainer lacks, which are reported and skipped; runs the branch's baseline first if it has none;
    then runs the config as one experiment recorded with status `transfer` (the tree goes back to the
    last kept commit either way). Prints the plan and the verdict; returns the exit code.
    Raises ReportError (one sentence) for bad input.
    """
    from research import experiment
    from research.driver import ensure_baseline
    from research.ledger import covariate

    keep = list(dict.fromkeys([*(() if apply_all else HOST_SPECIFIC), *(keep or [])]))
    dirty = session.dirty_paths()
    if dirty:
        raise ReportError(f"The work tree has uncommitted changes ({', '.join(dirty[:5])}); commit or revert "
                          "them first, so the transfer starts from the last kept trainer.")
    text = session.trainer_text()
    truth = _host_truth(session, text)
    plan = plan_transfer(from_path, text, truth, keep)
    for line in plan.lines():
        print(line)
    if plan.row.protocol and plan.row.protocol != session.protocol.name:
        print(f"  note: that config won under protocol {plan.row.protocol}; here it runs under "
              f"{session.protocol.name}.")
    if not plan.changes:
        raise ReportError("Their best config matches this trainer in every hyperparameter it could change; "
                          "nothing to run.")
    from research.hparams import effective_values, parse_block

    problem = _batch_problem({**effective_values(parse_block(text), truth), **plan.changes},
                             int(session.protocol.max_seq_len))
    if problem:
        raise ReportError(f"The transferred config would not run here: {problem}.")
    new_text = apply_transfer(plan, text, truth)
    if dry_run:
        print("dry run: nothing was changed or run.")
        return 0
    ensure_baseline(session)
    best = session.best
    (session.repo / session.trainer).write_text(new_text, encoding="utf-8")
    changed = ", ".join(f"{k}={value_text(v)}" for k, v in plan.changes.items())
    description = shorten(f"{TRANSFER}{plan.source.label} {plan.row.commit}: {changed}", 300)
    row = experiment.run_experiment(session, description, record_as="transfer").row
    if row.status != "transfer":
        print(f"transfer run ended as {row.status}: {row.note}")
        return 1
    off = [f"{k} (ran with {value_text(row.hyperparams[k])})" for k, v in plan.changes.items()
           if k in row.hyperparams and not _same_value(v, row.hyperparams[k])]
    if off:
        print("  warning: the trainer did not use these transferred values: " + ", ".join(off))
    if best is None:
        verdict = "no baseline on this branch to compare with"
    else:  # the loop's own rule (one run, no confirm): significantly below the best's mean
        st = session.state
        v = experiment.decide([row.val_bpb], st.best_values, st.noise, session.settings.alpha, None,
                              [covariate(row, st.covariate)], st.best_speeds)
        verdict = f"{'it carried' if v.status == 'keep' else 'it did not carry'} ({v.note})"
    print(f"transfer val_bpb {row.val_bpb:.6f} (theirs {plan.row.val_bpb:.6f} on {plan.source.label}); {verdict}.")
    print(f"logged as run {row.run} with status transfer; the trainer is back at the last kept commit.")
    return 0


def cmd_transfer(from_path: str | Path, *, repo: str | Path | None = None, backend: str | None = None,
                 protocol: str | None = None, settings=None, keep: list[str] | None = None,
                 apply_all: bool = False, dry_run: bool = False) -> int:
    """`loop.py transfer --from RESULTS`: open the repository like `loop.py try` (lock, host, protocol,
    current branch) and `run_transfer` in it. One sentence and exit 1 for bad input (the tree is left
    as it was); Ctrl-C or SIGTERM stops the run and restores the tree (exit 130)."""
    import signal

    import prepare
    from research.gitrepo import GitError
    from research.guards import LockError
    from research.results import ResultsError
    from research.session import Session, SessionError

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    session, previous = None, None
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: Ctrl-C still works
        pass
    try:
        session = Session.open(Path(repo) if repo else Path(__file__).resolve().parents[1], backend=backend,
                               protocol=protocol, settings=settings)
        print(session.describe())
        session.use_current_branch()
        return run_transfer(session, from_path, keep=keep, apply_all=apply_all, dry_run=dry_run)
    except ReportError as e:  # raised before anything in the tree changed: leave it alone
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if session is not None:
            session.abort()
        print("interrupted: the trainer was stopped and the tree restored.", file=sys.stderr)
        return 130
    except (SessionError, LockError, ResultsError, GitError, prepare.PrepareError) as e:
        if session is not None:
            session.abort()
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if session is not None:
            session.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)



def _transfer_from_args(args: argparse.Namespace) -> int:
    import tempfile

    from reporting import sharing
    from research.session import Settings

    def run(path) -> int:
        return cmd_transfer(path, backend=args.backend, protocol=args.protocol, settings=Settings.from_args(args),
                            keep=args.keep, apply_all=args.apply_all, dry_run=args.dry_run)

    remote, host = getattr(args, "remote", None), getattr(args, "host", None)
    if bool(args.from_path) == bool(remote) or bool(remote) != bool(host):
        print("error: name the other machine's results with --from RESULTS, or with --remote URL --host NAME "
              "(a machine sharing through that git remote).", file=sys.stderr)
        return 1
    if not remote:
        return run(args.from_path)
    with tempfile.TemporaryDirectory(prefix=f"autoresearch-{host}-") as folder:
        try:
            path = sharing.remote_results(remote, host, Path(folder))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"the results {host} published to {remote} (its claims, measured there; this run measures here)")
        return run(path)


def add_subparser(subparsers, parents: list[argparse.ArgumentParser] = ()) -> None:
    """Register `transfer` on loop.py's subparsers (`func` returns the exit code; it opens its own session).

    `parents` are loop.py's shared option parsers (it reads --backend, --protocol and the run settings from
    them, --wall-margin among them); without any, it gets its own --backend and --protocol.
    """
    from reporting import sharing

    p = subparsers.add_parser("transfer", parents=list(parents),
                              help="run another machine's best config once here, logged as status transfer")
    p.add_argument("--from", dest="from_path", default=None, metavar="RESULTS",
                   help="the other machine's results.tsv (or its runs/ folder)")
    p.add_argument("--remote", default=None, metavar="URL", type=sharing.remote_url,
                   help="with --host: the results that machine published to this git remote (`loop.py share`)")
    p.add_argument("--host", default=None, metavar="NAME", help="the machine's name on --remote")
    p.add_argument("--keep", action="append", default=[], metavar="NAME",
                   help=f"keep this host's value of NAME (repeatable; {', '.join(HOST_SPECIFIC)} is kept "
                        "unless --apply-all)")
    p.add_argument("--apply-all", action="store_true", help=f"take every value, {', '.join(HOST_SPECIFIC)} too")
    p.add_argument("--dry-run", action="store_true", help="print what would change; change and run nothing")
    if not parents:
        p.add_argument("--backend", help="cuda|rocm|mps|mlx|cpu (default: detected, or AUTORESEARCH_BACKEND)")
        p.add_argument("--protocol", help="protocol name (default: AUTORESEARCH_PROTOCOL or the prepared one)")
    p.set_defaults(func=_transfer_from_args)
