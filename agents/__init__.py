"""The agents that propose experiments: Claude (Messages API with tools; agents/claude_agent.py), the
optimizer (agents/tuner.py), a local offline proposer, and a scripted one for tests; `make_agent` builds
one. Each implements the loop's interface (research/proposals.py: Agent, AgentContext, Proposal)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from research.console import Console
from research.guards import text_hash
from research.hparams import (HyperparamError, conditions, effective_values, layout_key, parse_block, probe_conditions,
                              set_values, static_truth)
from research.proposals import Agent, AgentContext, AgentError, CrashInfo, Proposal, Usage

__all__ = [
    "Agent",
    "AgentContext",
    "AgentError",
    "CrashInfo",
    "LocalAgent",
    "Proposal",
    "ScriptedAgent",
    "make_agent",
    "AGENTS",
]


# ---------------------------------------------------------------------------------------------
# scripted agent (tests)
# ---------------------------------------------------------------------------------------------


class ScriptedAgent(Agent):
    """Replays a list of steps, one per proposal (fix attempts take the next step too).

    Step (dict):
      description: str                          one-line description (default "scripted change")
      edits: [{"old": str, "new": str, "path": str?}]   exact replacements, `old` must occur once;
                                                path defaults to the trainer
      write: {path: content}                    files to write (any path; for rejection tests)
      delete: [path]                            files to delete
      usage: {"tokens_in", "tokens_out", "cost_usd"}
      give_up: true                             return None (no experiment; for a fix: drop the change)
    The steps come from a list or a JSON file holding one. When they run out, propose returns None.
    """

    name = "scripted"
    can_fix = True

    def __init__(self, steps: list[dict] | str | os.PathLike):
        if not isinstance(steps, list):
            steps = json.loads(Path(steps).read_text(encoding="utf-8"))
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise AgentError("A script must be a JSON list of objects (see agents.ScriptedAgent).")
        self.steps = list(steps)
        self.used = 0

    def propose(self, ctx: AgentContext) -> Proposal | None:
        if self.used >= len(self.steps):
            return None
        step = self.steps[self.used]
        self.used += 1
        if step.get("give_up"):
            return None
        for edit in step.get("edits", []):
            path = ctx.repo / edit.get("path", ctx.trainer)
            text = path.read_text(encoding="utf-8")
            if text.count(edit["old"]) != 1:
                raise AgentError(f"Scripted edit {edit['old'][:40]!r} does not occur exactly once in {path.name}.")
            path.write_text(text.replace(edit["old"], edit["new"]), encoding="utf-8")
        for rel, content in step.get("write", {}).items():
            p = ctx.repo / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content, encoding="utf-8")
        for rel in step.get("delete", []):
            (ctx.repo / rel).unlink(missing_ok=True)
        u = step.get("usage", {})
        usage = Usage(int(u.get("tokens_in", 0)), int(u.get("tokens_out", 0)), u.get("cost_usd", 0.0))
        return Proposal(step.get("description", "scripted change"), usage)


# ---------------------------------------------------------------------------------------------
# local agent: one hyperparameter at a time, offline
# ---------------------------------------------------------------------------------------------

_WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL", "SSSSL", "SLL")


class LocalAgent(Agent):
    """Offline proposer: changes one hyperparameter of the block per experiment.

    Starting from the current (last kept) trainer it tries small steps first (learning rates
    x/÷ sqrt 2 and 2, batch sizes x/÷ 2 keeping TOTAL_BATCH_SIZE divisible by
    DEVICE_BATCH_SIZE x seq_len, depth ±1, window patterns, warm-down ratio ±0.1, weight decay),
    then larger steps, then pairs of small steps. The order is a deterministic shuffle seeded
    by (seed, trainer hash); a trainer version already run (by hash, from results.tsv) is never
    proposed again.
    """

    name = "local"
    can_fix = False

    def __init__(self, seed: int = 0, max_pairs: int = 400, console: Console | None = None):
        self.seed = seed
        self.max_pairs = max_pairs
        self.console = console or Console()
        self.proposed: set[str] = set()
        self._truth_cache: dict[str, dict[str, bool]] = {}

    def propose(self, ctx: AgentContext) -> Proposal | None:
        text = ctx.trainer_path.read_text(encoding="utf-8")
        try:
            settings = parse_block(text)
        except HyperparamError:
            return None
        truth = self._truth(ctx, text, settings)
        effective = effective_values(settings, truth)
        rng = random.Random(f"{self.seed}:{text_hash(text)}")
        seq_len = int(getattr(ctx.protocol, "max_seq_len", 1))
        small, large = candidate_changes(effective, seq_len)
        rng.shuffle(small)
        rng.shuffle(large)
        pairs = [(a, b) for i, a in enumerate(small) for b in small[i + 1 :] if not set(a[0]) & set(b[0])]
        rng.shuffle(pairs)
        merged = [({**a[0], **b[0]}, f"{a[1]}; {b[1]}") for a, b in pairs[: self.max_pairs]]
        for changes, desc in small + large + merged:
            if not _batch_ok({**effective, **changes}, seq_len):
                continue
            try:
                new = set_values(text, changes, truth)
            except HyperparamError:
                continue
            h = text_hash(new)
            if h in ctx.seen_hashes or h in self.proposed or new == text:
                continue
            self.proposed.add(h)
            ctx.trainer_path.write_text(new, encoding="utf-8")
            return Proposal(desc)
        return None

    def _truth(self, ctx: AgentContext, text: str, settings) -> dict[str, bool]:
        return host_truth(ctx, text, settings, self._truth_cache, self.console, "local agent")


def host_truth(ctx: AgentContext, text: str, settings, cache: dict, console: Console, who: str) -> dict[str, bool]:
    """Truth of the block's hardware conditions on this host, probed once per trainer layout (`cache`
    maps layouts to answers) by importing the trainer inside its sandbox, never in this process; conditions on
    names the source fixes to constants are read from it instead (hparams.static_truth)."""
    conds = conditions(settings)
    if not conds:
        return {}
    key = layout_key(text, settings)
    if key not in cache and len(known := static_truth(text, conds)) == len(conds):
        cache[key] = known
    if key not in cache:
        try:
            if ctx.confine is None:
                raise HyperparamError("there is no sandbox to import the trainer in")
            cache[key] = probe_conditions(ctx.trainer_path, conds, ctx.confine.run_python)
        except HyperparamError as e:
            console.event(f"{who}: {e}; only unconditional hyperparameters will be changed")
            cache[key] = {}
    return cache[key]


def fmt_value(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else json.dumps(v) if isinstance(v, str) else str(v)


def _round(v: float) -> float:
    return float(f"{v:.3g}")


def _batch_ok(hp: dict, seq_len: int) -> bool:
    total, dev = hp.get("TOTAL_BATCH_SIZE"), hp.get("DEVICE_BATCH_SIZE")
    if not isinstance(total, int) or not isinstance(dev, int):
        return True
    return dev >= 1 and total >= dev * seq_len and total % (dev * seq_len) == 0


def candidate_changes(hp: dict, seq_len: int) -> tuple[list, list]:
    """(small, large) lists of ({NAME: new value}, description) single-parameter changes."""
    small: list[tuple[dict, str]] = []
    large: list[tuple[dict, str]] = []

    def add(bucket, changes: dict, why: str = ""):
        desc = "; ".join(f"{k} {fmt_value(hp[k])} -> {fmt_value(v)}" for k, v in changes.items()) + why
        bucket.append((changes, desc))

    for name, v in hp.items():
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        if name.endswith("_LR") and isinstance(v, (int, float)) and v > 0:
            for f in (2**-0.5, 2**0.5):
                add(small, {name: _round(v * f)})
            for f in (0.5, 2.0):
                add(large, {name: _round(v * f)})
        elif name == "TOTAL_BATCH_SIZE" and isinstance(v, int):
            dev = hp.get("DEVICE_BATCH_SIZE")
            for f, bucket in ((2, small), (0.5, small), (4, large), (0.25, large)):
                new = int(v * f)
                changes = {name: new}
                if isinstance(dev, int) and new < dev * seq_len and new % seq_len == 0 and new >= seq_len:
                    changes["DEVICE_BATCH_SIZE"] = new // seq_len  # keep whole micro-batches
                add(bucket, changes)
        elif name == "DEVICE_BATCH_SIZE" and isinstance(v, int):
            for f in (2, 0.5):
                if int(v * f) >= 1:
                    add(small, {name: int(v * f)}, " (same tokens per step)")
        elif name == "DEPTH" and isinstance(v, int):
            for d, bucket in ((1, small), (-1, small), (2, large), (-2, large)):
                if v + d >= 1:
                    add(bucket, {name: v + d})
        elif name == "ASPECT_RATIO" and isinstance(v, int):
            for f in (0.75, 1.5):
                new = max(8, int(round(v * f / 8)) * 8)
                if new != v:
                    add(large, {name: new})
        elif name == "WINDOW_PATTERN" and isinstance(v, str):
            for pat in _WINDOW_PATTERNS:
                if pat != v:
                    add(small, {name: pat})
        elif name == "WARMDOWN_RATIO" and isinstance(v, (int, float)):
            for d, bucket in ((0.1, small), (-0.1, small), (0.2, large), (-0.2, large)):
                new = round(v + d, 2)
                if 0.0 <= new <= 1.0:
                    add(bucket, {name: new})
        elif name == "WARMUP_RATIO" and isinstance(v, (int, float)):
            for new in (round(v + 0.05, 2), round(v - 0.05, 2)):
                if 0.0 <= new <= 0.5:
                    add(large, {name: new})
        elif name == "FINAL_LR_FRAC" and isinstance(v, (int, float)):
            for new in (0.0, 0.05, 0.1):
                if abs(new - v) > 1e-12:
                    add(large, {name: new})
        elif name == "WEIGHT_DECAY" and isinstance(v, (int, float)):
            if v > 0:
                add(small, {name: _round(v * 0.5)})
                add(small, {name: _round(v * 2)})
                add(large, {name: 0.0})
            else:
                add(small, {name: 0.1})
    return small, large


# ---------------------------------------------------------------------------------------------


AGENTS = ("claude", "optuna", "local", "scripted")


def make_agent(kind: str, *, repo: Path, trainer: str, seed: int = 0, model: str | None = None,
               script: str | None = None, console: Console | None = None, sampler: str = "tpe",
               tune: bool = False) -> Agent:
    """Build an agent by name: claude (with `tune`: alternating with the optuna agent) | optuna (`sampler`
    tpe or cmaes) | local | scripted (with `script`, a JSON file)."""
    if tune and kind != "claude":
        raise AgentError("--tune goes with --agent claude (the optuna agent then tunes the hyperparameters).")
    if kind == "local":
        return LocalAgent(seed=seed, console=console)
    if kind == "optuna":
        from agents.tuner import OptunaAgent

        return OptunaAgent(sampler=sampler, seed=seed, console=console)
    if kind == "scripted":
        if not script:
            raise AgentError("--agent scripted needs --script FILE (a JSON list of steps).")
        try:
            return ScriptedAgent(script)
        except (OSError, json.JSONDecodeError) as e:
            raise AgentError(f"Cannot read the script {script}: {e}") from None
    if kind == "claude":
        from agents.claude_agent import ClaudeAgent

        claude = ClaudeAgent(repo, trainer, model=model, console=console)
        if not tune:
            return claude
        from agents.tuner import HybridAgent, OptunaAgent

        return HybridAgent(claude, OptunaAgent(sampler=sampler, seed=seed, console=console), console=console)
    raise AgentError(f"Unknown agent '{kind}'; choose {', '.join(AGENTS)}.")
