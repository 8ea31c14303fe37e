"""What the loop asks of an agent, and what it gets back: the one interface every proposer implements
(agents/: Claude, the optimizer, the local and the scripted proposer).

An agent edits the trainer in the work tree and returns a `Proposal` (a one-line description plus the
tokens and cost it spent), or None when it has nothing to offer this time. The loop validates, commits,
runs and records whatever it left in the tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from research.results import Row

__all__ = ["Agent", "AgentContext", "AgentError", "CrashInfo", "Proposal", "Usage"]


@dataclass
class Usage:
    """Agent tokens and cost behind one experiment (cost None = model price unknown)."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = 0.0

    def add(self, other: Usage) -> None:
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.cost_usd = None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd


class AgentError(RuntimeError):
    """The agent cannot continue (message is one sentence for the user); the loop stops."""


@dataclass
class Proposal:
    description: str
    usage: Usage = field(default_factory=Usage)


@dataclass
class CrashInfo:
    """What an agent sees when asked to fix its crashed change."""

    description: str
    reason: str
    log_tail: str
    diff: str
    attempt: int
    max_attempts: int


@dataclass
class AgentContext:
    repo: Path
    trainer: str
    host: object  # backends.HostInfo
    protocol: object  # prepare.Protocol
    history: list[Row]  # this branch's rows, oldest first
    best: float | None
    noise_floor: float | None
    seen_hashes: set[str]  # trainer versions already run (trainer_hash column)
    crash: CrashInfo | None = None
    confine: object | None = None  # sandbox.workspace.Confinement: where agent code may be imported
    runs_dir: Path | None = None  # runs/<n>/ records (default: <repo>/runs)
    branch: str = ""  # the research branch (default: that of the history's rows)
    in_flight: list[tuple[str, str]] = field(default_factory=list)  # (description, diff) running on other workers
    running: set[str] = field(default_factory=set)  # their trainer hashes (also in seen_hashes)
    # other machines' published measurements of this hardware class, protocol and evaluator, (host, row):
    # their claims, unverified here (research/share.py); empty unless the loop shares through a remote
    shared: list[tuple[str, Row]] = field(default_factory=list)

    @property
    def trainer_path(self) -> Path:
        return self.repo / self.trainer

    @property
    def runs(self) -> Path:
        return self.runs_dir if self.runs_dir is not None else self.repo / "runs"

    @property
    def branch_name(self) -> str:
        return self.branch or next((r.branch for r in self.history if r.branch), "")


class Agent:
    """Base: `propose(ctx)` edits the trainer in place and returns a Proposal, or None."""

    name = "agent"
    can_fix = False  # whether it can be asked to fix a crashed change

    def propose(self, ctx: AgentContext) -> Proposal | None:  # pragma: no cover - interface
        raise NotImplementedError
