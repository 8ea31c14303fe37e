"""The optuna agent: a real optimizer over the trainer's hyperparameter block, and the hybrid agent
that alternates it with Claude's code changes.

`OptunaAgent` keeps one Optuna study per research branch, in memory, fed from the branch's rows:
every finished row is a trial (its hyperparameters -> its val_bpb), so a restarted loop rebuilds
the study from results.tsv and goes on where it was. Failed runs teach it too: a crashed, invalid
or rejected run is told as the branch's worst measured val_bpb plus a margin, an aborted one (its
loss trailed the best's) as the worst measured. Each proposal asks the sampler for a point of the
search space (agents/space.py) and, with TPE, moves `moves` (default 2) of the hyperparameters
it would change away from the kept trainer, keeping the others: a full point of a 14-name space
is far from a tuned baseline, and on the tiny protocol the first full TPE points trained to
val_bpb 3.1-3.8 against a baseline of 2.85 (or ran out of time). The suggestion itself is then
dropped and the point written becomes the trial once it has run. With `moves=None` (and with
CMA-ES) the whole point is written and its trial told directly. The agent writes on the lines in
effect on this host and never proposes a trainer version that has already run.

Samplers: TPE (default; multivariate, the first `startup` trials random) or CMA-ES (started at the
branch's baseline values; categorical names such as WINDOW_PATTERN fall to TPE). TPE resumes
exactly from the rows; CMA-ES's state lives in the process, so after a restart it starts again at
the baseline and learns from the new trials (the rows still reach its independent sampler).
"""

from __future__ import annotations

import math
import random
import warnings

from agents import Agent, AgentContext, AgentError, Proposal, fmt_value, host_truth, layout_key
from agents.space import Space, build_space, repair, same_value
from research.console import Console
from research.guards import text_hash
from research.hparams import HyperparamError, effective_values, parse_block, set_values
from research.results import MEASURED, NO_COMMIT, Row, sanitize

__all__ = ["OptunaAgent", "HybridAgent", "SAMPLERS", "trial_value"]

SAMPLERS = ("tpe", "cmaes")
DEFAULT_STARTUP = 4  # TPE: random trials before the model is used (the baseline rows count)
DEFAULT_MOVES = 2  # TPE: hyperparameters one proposal moves away from the kept trainer (None: all of them)


def trial_value(row: Row, rows: list[Row]) -> float | None:
    """What a row teaches the optimizer: its val_bpb when measured; for a failed run (crash, invalid,
    rejected) the worst val_bpb measured among `rows` plus a margin; for an aborted run the worst
    measured. None when nothing has been measured yet."""
    if row.status in MEASURED and row.val_bpb > 0:
        return float(row.val_bpb)
    measured = [r.val_bpb for r in rows if r.status in MEASURED and r.val_bpb > 0]
    if not measured:
        return None
    worst, best = max(measured), min(measured)
    if row.status == "abort":
        return worst
    return worst + max(0.02 * worst, 0.25 * (worst - best))


class OptunaAgent(Agent):
    """Optuna over the hyperparameter block (see the module docstring)."""

    name = "optuna"
    can_fix = False

    def __init__(self, sampler: str = "tpe", seed: int = 0, console: Console | None = None,
                 startup: int = DEFAULT_STARTUP, max_asks: int = 200, moves: int | None = DEFAULT_MOVES):
        try:
            import optuna
        except ImportError:  # pragma: no cover - a dependency of the project
            raise AgentError("The optuna agent needs the optuna package (uv sync installs it).") from None
        if sampler not in SAMPLERS:
            raise AgentError(f"Unknown sampler '{sampler}'; choose {' or '.join(SAMPLERS)}.")
        if sampler == "cmaes":
            try:
                import cmaes  # noqa: F401
            except ImportError:  # pragma: no cover
                raise AgentError("--sampler cmaes needs the cmaes package (uv sync installs it).") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self.sampler = sampler
        self.seed = seed
        self.startup = max(1, startup)
        self.max_asks = max_asks
        self.moves = moves if sampler == "tpe" and moves else None  # None: the sampler's whole point
        self.console = console or Console()
        self.study = None
        self.space: Space | None = None
        self._branch: str | None = None
        self._consumed = 0  # rows of the branch already turned into trials
        self._shared: set[tuple] = set()  # other machines' rows already turned into trials
        # trainer hash -> what to do when its row arrives: ("tell", trial number) or ("add", the written params)
        self._pending: dict[str, list[tuple[str, object]]] = {}
        self._truth_cache: dict[str, dict[str, bool]] = {}
        self._git_cache: dict[str, dict] = {}

    # -- the study --------------------------------------------------------------------------

    def _make_sampler(self, space: Space):
        optuna = self._optuna
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices
            tpe = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.startup, multivariate=True,
                                             group=True, constant_liar=True, warn_independent_sampling=False)
            if self.sampler == "tpe":
                return tpe
            x0 = {n: d.encode(d.center) for n, d in space.dims.items() if d.kind != "choice"}
            return optuna.samplers.CmaEsSampler(x0={k: v for k, v in x0.items() if v is not None}, seed=self.seed,
                                                n_startup_trials=0, independent_sampler=tpe,
                                                warn_independent_sampling=False)

    def _open(self, ctx: AgentContext, effective: dict, truth: dict) -> None:
        """A new study when the branch is new to this agent: the space is centred on the branch's
        baseline (its first row's values, the current trainer's for names it lacks)."""
        branch = ctx.branch_name
        if self.study is not None and branch == self._branch:
            return
        base = self._row_values(ctx.history[0], ctx, truth) if ctx.history else {}
        center = {n: base.get(n, v) for n, v in effective.items()}
        self.space = build_space(center, int(getattr(ctx.protocol, "max_seq_len", 1) or 1))
        self.study = self._optuna.create_study(direction="minimize", sampler=self._make_sampler(self.space),
                                               study_name=branch or "autoresearch")
        self._branch, self._consumed, self._pending, self._shared = branch, 0, {}, set()
        self.console.event(f"optuna agent ({self.sampler}): searching {len(self.space.dims)} hyperparameters: "
                           f"{self.space.describe()}")

    def _row_values(self, row: Row, ctx: AgentContext, truth: dict) -> dict:
        """A row's hyperparameter values: those in effect in the trainer it ran, read from git at its commit
        where this agent can tell them, else those it recorded (the loop reads them from the committed source;
        rows written before that recorded the trainer's own claim, which the source overrides here)."""
        values = dict(row.hyperparams or {})
        if row.commit and row.commit != NO_COMMIT and ctx.repo is not None:
            if row.commit not in self._git_cache:
                from research import gitrepo

                text = ""
                try:
                    text = gitrepo.git(ctx.repo, "show", f"{row.commit}:{ctx.trainer}", check=False)
                except (OSError, gitrepo.GitError):
                    pass
                found: dict = {}
                if text:
                    try:
                        settings = parse_block(text)
                        found = effective_values(settings, self._truth_cache.get(layout_key(text, settings), {}))
                    except HyperparamError:
                        found = {}
                self._git_cache[row.commit] = found
            values.update(self._git_cache[row.commit])
        return values

    def _sync(self, ctx: AgentContext, truth: dict) -> None:
        """Turn the branch's rows not seen yet into trials: a row of a trainer this agent proposed
        completes that trial; any other row (baseline, re-run, another agent's change) is added."""
        from optuna.trial import TrialState, create_trial

        optuna = self._optuna
        rows = ctx.history
        if len(rows) < self._consumed:  # the history shrank (another results file): start over
            self.study, self._branch = None, None
            return
        dists = self.space.distributions()
        for i in range(self._consumed, len(rows)):
            row = rows[i]
            value = trial_value(row, rows[: i + 1])
            waiting = self._pending.get(row.trainer_hash)
            if waiting and waiting[0][0] == "tell":
                number = waiting.pop(0)[1]
                if value is None:
                    self.study.tell(number, state=TrialState.FAIL)
                else:
                    self.study.tell(number, value)
                continue
            if value is None:
                continue
            if waiting:  # a point this agent wrote: its exact values
                params = waiting.pop(0)[1]
            else:
                params = self.space.encode(self._row_values(row, ctx, truth))
            if not params:
                continue
            try:
                self.study.add_trial(create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=value, user_attrs={"run": row.run, "status": row.status}))
            except (ValueError, optuna.exceptions.OptunaError):
                continue
        self._consumed = len(rows)
        self._add_shared(ctx, dists, create_trial)
        running = ctx.running
        for h, items in self._pending.items():  # proposed but never run (refused, or the loop stopped)
            if h in running:
                continue  # still running on another worker: its row comes later
            for kind, number in items:
                if kind == "tell":
                    self.study.tell(number, state=TrialState.FAIL)
        self._pending = {h: items for h, items in self._pending.items() if h in running}

    def _add_shared(self, ctx: AgentContext, dists: dict, create_trial) -> None:
        """Other machines' measured changes of this hardware class (ctx.shared: their claims, unchecked
        here) as extra trials, at the values they recorded: they steer where this agent looks next, and
        nothing else (a keep here is this machine's own measurement)."""
        for host, row in getattr(ctx, "shared", None) or []:
            key = (host, row.run, row.timestamp, row.commit)
            if key in self._shared or row.status not in ("keep", "discard") or not row.val_bpb > 0:
                continue
            self._shared.add(key)
            params = self.space.encode(dict(row.hyperparams or {}))
            if not params:
                continue
            try:
                self.study.add_trial(create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=row.val_bpb, user_attrs={"host": host, "run": row.run}))
            except (ValueError, self._optuna.exceptions.OptunaError):
                continue

    # -- proposing ---------------------------------------------------------------------------

    def propose(self, ctx: AgentContext) -> Proposal | None:
        from optuna.trial import TrialState

        text = ctx.trainer_path.read_text(encoding="utf-8")
        try:
            settings = parse_block(text)
        except HyperparamError as e:
            self.console.event(f"optuna agent: {e}; nothing to tune")
            return None
        truth = host_truth(ctx, text, settings, self._truth_cache, self.console, "optuna agent")
        effective = effective_values(settings, truth)
        self._open(ctx, effective, truth)
        self._sync(ctx, truth)
        if self.study is None:  # the history was replaced: start again on it
            self._open(ctx, effective, truth)
            self._sync(ctx, truth)
        space = self.space
        names = [n for n in space.dims if n in effective]
        if not names:
            self.console.event("optuna agent: the trainer's hyperparameter block has nothing in the search space")
            return None
        dists = {n: space.dims[n].distribution() for n in names}
        known = _known_values(ctx.history)
        current = {n: effective[n] for n in names}
        subset = self.moves is not None and self.moves < len(names)
        for _ in range(self.max_asks):
            trial = self.study.ask(dists)
            suggested = space.decode(trial.params)
            if subset:
                # move `moves` of the names the sampler would change, from the kept trainer: the suggestion
                # itself is not run, so it is dropped (FAIL); the point written becomes a trial when it has run
                self.study.tell(trial.number, state=TrialState.FAIL)
                differ = [n for n in names if not same_value(suggested[n], current[n])]
                if not differ:
                    continue
                chosen = random.Random(f"{self.seed}:{trial.number}").sample(differ, min(self.moves, len(differ)))
                suggested = {n: suggested[n] for n in chosen}
            values = repair({**current, **suggested}, space.seq_len)
            if values is None:
                if not subset:
                    self._tell_failed(trial.number, ctx.history)
                continue
            changes = {n: values[n] for n in names if not same_value(values[n], effective[n])}
            try:
                new = set_values(text, changes, truth) if changes else text
            except HyperparamError:
                if not subset:
                    self.study.tell(trial.number, state=TrialState.FAIL)
                continue
            h = text_hash(new)
            if h in ctx.seen_hashes or h in self._pending:
                if not subset:
                    value = known.get(h)
                    if value is not None:
                        self.study.tell(trial.number, value)  # already measured: learn it, ask again
                    else:
                        self.study.tell(trial.number, state=TrialState.FAIL)
                continue
            self._pending.setdefault(h, []).append(("add", space.encode(values)) if subset else ("tell", trial.number))
            ctx.trainer_path.write_text(new, encoding="utf-8")
            what = "; ".join(f"{k} {fmt_value(effective[k])} -> {fmt_value(v)}" for k, v in changes.items())
            return Proposal(sanitize(f"optuna {self.sampler} trial {trial.number}: {what}"))
        self.console.event(f"optuna agent: {self.max_asks} points in a row were trainers already run; "
                           "the search space looks exhausted")
        return None

    def _tell_failed(self, number: int, rows: list[Row]) -> None:
        from optuna.trial import TrialState

        probe = Row(commit=NO_COMMIT, val_bpb=0.0, memory_gb=0.0, status="crash", description="")
        value = trial_value(probe, rows)
        if value is None:
            self.study.tell(number, state=TrialState.FAIL)
        else:
            self.study.tell(number, value)

    def best(self) -> tuple[float, dict] | None:
        """(value, block values) of the best trial so far, or None."""
        done = [t for t in self.study.trials if t.value is not None] if self.study is not None else []
        if not done:
            return None
        t = min(done, key=lambda t: t.value)
        return t.value, self.space.decode(t.params)


def _known_values(rows: list[Row]) -> dict[str, float]:
    """Trainer hash -> mean val_bpb of its measured rows on this branch (or its failure value)."""
    sums: dict[str, list[float]] = {}
    failed: dict[str, float] = {}
    for i, r in enumerate(rows):
        if not r.trainer_hash:
            continue
        v = trial_value(r, rows[: i + 1])
        if v is None:
            continue
        if r.status in MEASURED:
            sums.setdefault(r.trainer_hash, []).append(v)
        else:
            failed[r.trainer_hash] = v
    out = dict(failed)
    out.update({h: math.fsum(v) / len(v) for h, v in sums.items()})
    return out


# ---------------------------------------------------------------------------------------------
# hybrid: the optimizer moves hyperparameters, Claude changes code
# ---------------------------------------------------------------------------------------------

STALL = 4  # a proposer whose last this-many experiments kept nothing gives its turn to the other


class HybridAgent(Agent):
    """`--agent claude --tune`: the optuna agent proposes hyperparameter moves and Claude code changes.

    They alternate; one that has stalled (its last STALL experiments kept nothing) while the other
    has not gives up its turn, and when one has nothing to offer the other proposes. Every
    description starts with who proposed it ("optuna ..." or "claude: ..."). A crash is given to
    Claude to fix only when Claude's change crashed; the optimizer's crashes teach the optimizer.
    """

    can_fix = True

    def __init__(self, claude: Agent, tuner: OptunaAgent, console: Console | None = None):
        self.claude = claude
        self.tuner = tuner
        self.console = console or Console()
        self.name = f"{claude.name}+{tuner.name}"
        self.model = getattr(claude, "model", None)
        self.last: str | None = None
        self.turn = "optuna"
        if hasattr(claude, "tune_note"):
            claude.tune_note = (
                "An optimizer (Optuna) tunes the values in the hyperparameter block between your turns (experiments "
                "whose description starts with 'optuna'). Spend your turns on changes to the code (architecture, "
                "optimizer, schedule logic); leave the block's values to it unless a code change needs new ones.")

    @staticmethod
    def proposer(row: Row) -> str | None:
        """Who proposed a row's change, from its description ("optuna ..." or "claude: ...")."""
        d = row.description
        return "optuna" if d.startswith("optuna ") else "claude" if d.startswith("claude:") else None

    def _stalled(self, who: str, rows: list[Row]) -> bool:
        mine = [r for r in rows if self.proposer(r) == who and r.status != "rerun"]
        return len(mine) >= STALL and all(r.status != "keep" for r in mine[-STALL:])

    def propose(self, ctx: AgentContext) -> Proposal | None:
        if ctx.crash is not None:
            if self.last != "claude":
                return None  # the optimizer's crash is a trial like any other; nothing to fix
            return self._from("claude", ctx)
        first = self.turn
        other = "claude" if first == "optuna" else "optuna"
        if self._stalled(first, ctx.history) and not self._stalled(other, ctx.history):
            self.console.event(f"the {first} side has kept nothing in its last {STALL} experiments: "
                               f"{other} proposes instead")
            first, other = other, first
        self.turn = other
        for who in (first, other):
            p = self._from(who, ctx)
            if p is not None:
                return p
            if who == first:
                self.console.event(f"the {who} side has nothing to propose this time; asking {other}")
        return None

    def _from(self, who: str, ctx: AgentContext) -> Proposal | None:
        agent = self.claude if who == "claude" else self.tuner
        before = ctx.trainer_path.read_text(encoding="utf-8")
        p = agent.propose(ctx)
        if p is None:
            ctx.trainer_path.write_text(before, encoding="utf-8")
            return None
        self.last = who
        if who == "claude" and not p.description.startswith("claude"):
            p.description = sanitize(f"claude: {p.description}")
        self.console.event(f"proposed by {who}: {p.description}")
        return p
