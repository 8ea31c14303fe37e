"""autoresearch loop: an agent edits the trainer, the loop runs, measures, keeps or reverts, logs.

Usage:
  uv run loop.py                      # = loop.py run: baseline, then experiments until stopped (Ctrl-C)
  uv run loop.py run --agent optuna --max-experiments 3 --tag demo
  uv run loop.py try "raise MATRIX_LR to 0.05"   # one experiment on the trainer as you edited it

The agent is `claude` when ANTHROPIC_API_KEY is set, else the offline `optuna` optimizer.
Results go to results.tsv (one row per experiment) and runs/<n>/ (log, diff, result JSON).
Protocol, budget and backend come from AUTORESEARCH_PROTOCOL / AUTORESEARCH_TIME_BUDGET /
AUTORESEARCH_BACKEND or the flags below. This file is locked: the agent never edits it.
"""

import os  # os and sys come with the interpreter; nothing else may be imported before the next block
import sys

if __name__ == "__main__":
    # Nothing in the work tree may stand in for a module the loop imports (a json.py or numpy.py beside
    # this file, byte-code in __pycache__): sandbox/pyexec.py, read by path, takes this folder off the
    # front of sys.path and makes the repository importable from source only, at the end of it.
    _boot = os.path.join(os.path.dirname(os.path.realpath(__file__)), "sandbox", "pyexec.py")
    with open(_boot, "rb") as _f:
        exec(compile(_f.read(), _boot, "exec"), {"__name__": "__pyexec_boot__", "__file__": _boot,
                                                  "SCRIPT": __file__})
    from sandbox import secrets as _secrets

    # Start again as `python -I loop.py ...` without credentials in the environment (they follow through
    # a pipe and stay in memory): no process the trainer can see holds one.
    _secrets.isolate(os.path.realpath(__file__), sys.argv[1:])

import argparse
import signal
from pathlib import Path

from reporting import report, serve, sharing
from research.console import Console
from research.gitrepo import GitError
from research.guards import LockError
from research.results import ResultsError
from research.session import Session, SessionError, Settings, default_tag
from sandbox import secrets

REPO = Path(__file__).resolve().parent


def _common() -> argparse.ArgumentParser:
    """Options shared by the commands that run experiments."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", help="cuda|rocm|mps|mlx|cpu (default: detected, or AUTORESEARCH_BACKEND)")
    p.add_argument("--protocol", help="protocol name (default: AUTORESEARCH_PROTOCOL, the prepared one, or tiny)")
    p.add_argument("--baseline-runs", type=int, default=Settings.baseline_runs,
                   help=f"baseline repeats to measure the run-to-run noise (default {Settings.baseline_runs})")
    p.add_argument("--min-noise", type=float, default=Settings.min_noise,
                   help=f"smallest run-to-run sigma in val_bpb the rule uses (default {Settings.min_noise})")
    p.add_argument("--confirm", action=argparse.BooleanOptionalAction, default=Settings.confirm,
                   help="run a promising change again and decide on the mean of both runs (default on)")
    p.add_argument("--alpha", type=float, default=Settings.alpha,
                   help=f"keep only at one-sided p below this: the false-keep rate (default {Settings.alpha})")
    p.add_argument("--remeasure-every", type=int, default=Settings.remeasure_every,
                   help=f"re-run the best after this many experiments, 0 never (default {Settings.remeasure_every})")
    p.add_argument("--early-abort", action=argparse.BooleanOptionalAction, default=Settings.early_abort,
                   help="stop a run whose training loss trails the best's by more than the noise allows "
                        "(default on)")
    p.add_argument("--abort-z", type=float, default=Settings.abort_z,
                   help=f"... by more than this many sigmas of the curve noise (default {Settings.abort_z:g})")
    p.add_argument("--abort-min-progress", type=float, default=Settings.abort_min_progress,
                   help=f"... never before this fraction of the budget (default {Settings.abort_min_progress:g})")
    p.add_argument("--timeout-margin", type=float, default=Settings.timeout_margin,
                   help=f"seconds of margin before a run is killed (default {Settings.timeout_margin:g})")
    p.add_argument("--startup-allowance", type=float, default=None,
                   help="seconds past the budget a trainer may take until its hand-over, fixed (default: the "
                        "median of the branch's baselines plus --wall-margin)")
    p.add_argument("--wall-margin", type=float, default=_env_float("AUTORESEARCH_WALL_MARGIN"),
                   help="seconds past the baselines' median wall time a run may take until its hand-over "
                        "(default: AUTORESEARCH_WALL_MARGIN, else 3 x the baselines' spread, at least 0.25 s, "
                        "at most 5%% of the budget)")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run trainers without the OS sandbox: they can then read the validation data, git, "
                        "your files and other processes' environments")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loop.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    common = _common()

    run = sub.add_parser("run", parents=[common], help="the main job: baseline, then experiments until stopped")
    run.add_argument("--tag", default=None, help="branch autoresearch/<tag> to create or resume (default: date)")
    run.add_argument("--agent", choices=("claude", "optuna", "local", "scripted"), default=None,
                     help="who proposes changes (default: claude if ANTHROPIC_API_KEY is set, else optuna)")
    run.add_argument("--sampler", choices=("tpe", "cmaes"), default="tpe",
                     help="the optuna agent's sampler: TPE or CMA-ES (default tpe)")
    run.add_argument("--tune", action="store_true",
                     help="with --agent claude: the optuna agent tunes the hyperparameters, Claude changes code")
    run.add_argument("--model", default=None, help="Claude model (default: AUTORESEARCH_MODEL or a current Sonnet)")
    run.add_argument("--script", default=None, help="JSON list of steps for --agent scripted")
    run.add_argument("--max-experiments", type=int, default=None, help="stop after N experiments (default: never)")
    run.add_argument("--max-fix-attempts", type=int, default=Settings.max_fix_attempts,
                     help="fix attempts after a crash (default 2)")
    run.add_argument("--seed", type=int, default=0, help="seed of the optuna and local agents (default 0)")
    run.add_argument("--workers", type=int, default=None,
                     help="experiments at once, each on its own Ray worker and git worktree (default: one per "
                          "GPU on CUDA/ROCm, else 1)")
    run.add_argument("--ray-address", default=None,
                     help="join this Ray cluster (e.g. ray://head:10001 or head:6379) instead of starting one here")
    serve.add_run_options(run)  # --serve: the live page while the loop runs
    sharing.add_remote_options(run, required=False)  # --remote: publish each experiment, claim before running it

    try_ = sub.add_parser("try", parents=[common],
                          help="one experiment on the trainer as currently edited (uncommitted)")
    try_.add_argument("description", help="one line: what the change is")

    clear = sub.add_parser("clear-tampering",
                           help="lift the stop of a branch where a run handed over a non-causal model")
    clear.add_argument("--tag", default=None, help="the branch autoresearch/<tag> (default: the current branch)")
    clear.set_defaults(func=_clear_tampering)
    report.add_subparsers(sub, parents=[common])  # report, compare, transfer
    serve.add_subparser(sub)  # serve: the live page
    sharing.add_subparser(sub)  # share: publish to a git remote, fetch the other machines'
    from research import check

    check.add_subparser(sub)  # check: a self-test of this host
    return parser


def _env_float(name: str) -> float | None:
    """A number from the environment (unset or empty: None); a value that is not one is an error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        sys.exit(f"error: {name}={raw!r} is not a number of seconds; set it to one or unset it.")


def _clear_tampering(args) -> int:
    """`loop.py clear-tampering`: lift the stop a tampering run put on a branch (research/tamper.py)."""
    from research import gitrepo, tamper
    from research.guards import RepoLock
    from research.results import read_results

    branch = f"autoresearch/{args.tag}" if args.tag else gitrepo.current_branch(REPO)
    if not branch:
        print("error: HEAD is detached; name the branch with --tag.", file=sys.stderr)
        return 1
    lock = RepoLock(REPO)
    try:
        lock.acquire()  # not while a loop runs on this repository
    except LockError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        cleared = tamper.clear(read_results(REPO / "results.tsv"), branch, REPO / "runs")
    finally:
        lock.release()
    if not cleared:
        print(f"Branch {branch} is not stopped for tampering; nothing to clear.")
        return 0
    runs = ", ".join(str(r.run) for r in cleared)
    print(f"Lifted the tampering stop of {branch} (run{'s' if len(cleared) > 1 else ''} {runs}; its rows stay "
          f"in results.tsv as invalid): 'loop.py run' and 'loop.py try' work on it again.")
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _abort_quietly(session: Session | None) -> None:
    """Restore the tree after an unexpected error, without letting a second failure hide the first."""
    if session is None:
        return
    try:
        session.abort()
    except Exception:  # noqa: BLE001 - the first error is the one to report
        pass


def _research(args, session: Session, console: Console, pages: list) -> int:
    """`loop.py run` once the session is open: the agent, the branch, the live page (added to `pages`),
    then the loop itself, on one worker or on N."""
    from agents import make_agent
    from research.driver import research
    from research.pool import default_workers

    workers = args.workers or default_workers(session.host)
    kind = args.agent or ("claude" if secrets.anthropic_credentials() else "optuna")
    agent = make_agent(kind, repo=session.repo, trainer=session.trainer, seed=args.seed, model=args.model,
                       script=args.script, console=console, sampler=args.sampler, tune=args.tune)
    tag = args.tag or default_tag()
    resumed = session.start_branch(tag)
    model = f", model {agent.model}" if hasattr(agent, "model") else ""
    console.event(f"{'resuming' if resumed else 'created'} branch {session.branch} at "
                  f"{session.kept_commit[:7]}; agent {agent.name}{model}")
    console.event(session.allowance_line())
    if args.remote:
        from research.share import Sharing

        session.share = Sharing(session.repo, args.remote, args.host_name, warn=console.event)
        console.event(f"sharing through {args.remote} as {session.share.host}: each finished experiment is "
                      "published, each change claimed before it runs")
        session.publish()  # what an earlier loop could not publish goes out now
    page = serve.start_for_run(args, session.results_path, session.settings, console)
    if page is not None:
        pages.append(page)
    if workers > 1 or args.ray_address:
        from research.parallel import research_parallel

        n = research_parallel(session, agent, workers, args.ray_address, args.max_experiments)
    else:
        n = research(session, agent, args.max_experiments)
    console.event(f"done: {n} experiment(s); best val_bpb {session.best:.6f}" if session.best is not None
                  else f"done: {n} experiment(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import backends

    # Ctrl-C raises KeyboardInterrupt even when SIGINT came in ignored (a background job of a script
    # inherits SIG_IGN, which Python would otherwise keep): the loop then stops as it does in a terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    backends.require_environment("loop.py")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    if getattr(args, "func", None) is not None:  # report / compare / transfer
        return args.func(args)
    console = Console()
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _raise_interrupt)

    from agents import AgentError
    from research.driver import try_change
    from research.session import TamperError

    session: Session | None = None
    pages: list = []  # the live page of `run --serve`, once started
    try:
        import prepare

        if args.command == "run":
            from research.pool import check_workers

            check_workers(args.workers)
        try:
            session = Session.open(REPO, backend=args.backend, protocol=args.protocol, settings=Settings.from_args(args),
                                   console=console)
        except prepare.PrepareError as e:
            raise SessionError(str(e)) from None
        console.event(session.describe())
        console.event(session.confine.limits_line())
        if args.command == "try":
            session.use_current_branch(research_only=True)
            console.event(session.allowance_line())
            out = try_change(session, args.description)
            return 0 if out.status in ("keep", "discard") else 1
        return _research(args, session, console, pages)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        edit = session is not None and session.pending_edit is not None
        if session is not None:
            session.abort()
        tree = (f"your uncommitted edit is back in {session.trainer}" if edit else "the tree restored")
        console.event(f"interrupted: the trainer was stopped and {tree}; rows already logged are kept. "
                      "Run the same command again to resume.")
        return 130
    except (SessionError, TamperError, LockError, AgentError, ResultsError, GitError) as e:
        if session is not None:
            session.abort()
        console.event("")
        at_start = session is None and type(e) is SessionError  # the host, its data or its sandbox failed
        hint = " (`uv run loop.py check` tests this host stage by stage)" if at_start else ""
        print(f"error: {e}{hint}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # a full disk, a path that cannot be written: say which, leave the tree as it was
        _abort_quietly(session)
        console.event("")
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; the loop stopped and restored the tree. Free disk space or fix "
              "the path, then run the same command again to resume.", file=sys.stderr, flush=True)
        return 1
    except Exception:
        _abort_quietly(session)  # whatever went wrong, no half-made experiment is left behind
        raise
    finally:
        for page in pages:
            page.stop()
        if session is not None:
            session.close()


if __name__ == "__main__":
    sys.exit(main())
