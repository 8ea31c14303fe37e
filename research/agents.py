"""The agents that propose experiments: Claude (Messages API with tools), a local offline
proposer, and a scripted one for tests.

An agent edits the trainer in the work tree and returns a `Proposal` (a one-line
description plus the tokens and cost it spent), or None when it has nothing to offer
this time. The loop validates, commits, runs and records whatever it left in the tree.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from research import secrets
from research.console import Console
from research.experiment import Usage
from research.guards import text_hash
from research.hparams import (HyperparamError, conditions, effective_values, parse_block, probe_conditions,
                              set_values)
from research.memory import compact_history, duplicate_of, journal_path, look_back, read_journal, write_journal
from research.results import Row, sanitize
from research.space import same_value

__all__ = [
    "Agent",
    "AgentContext",
    "AgentError",
    "ClaudeAgent",
    "CrashInfo",
    "LocalAgent",
    "Proposal",
    "ScriptedAgent",
    "DEFAULT_MODEL",
    "PRICES",
    "cost_usd",
    "make_agent",
    "AGENTS",
]

DEFAULT_MODEL = "claude-sonnet-5-5"

# USD per million tokens: input, output, 5-minute cache write, cache read (Anthropic's price list).
PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-fable-5-1": (10.0, 50.0, 12.5, 1.0),
    "claude-opus-5-5": (4.0, 20.0, 5.0, 0.4),
    "claude-opus-5": (5.0, 25.0, 6.25, 0.5),
    "claude-sonnet-5-5": (2.0, 10.0, 2.5, 0.1),
    "claude-sonnet-5": (2.0, 10.0, 2.5, 0.2),
    "claude-haiku-5-5": (0.1, 0.5, 0.125, 0.01),  # prompts up to 100k tokens
    "claude-opus-4-8": (5.0, 25.0, 6.25, 0.5),
    "claude-opus-4-7": (5.0, 25.0, 6.25, 0.5),
    "claude-opus-4-6": (5.0, 25.0, 6.25, 0.5),
    "claude-opus-4-5": (5.0, 25.0, 6.25, 0.5),
    "claude-sonnet-4-6": (3.0, 15.0, 3.75, 0.3),
    "claude-sonnet-4-5": (3.0, 15.0, 3.75, 0.3),
    "claude-haiku-4-5": (1.0, 5.0, 1.25, 0.1),
}


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
    confine: object | None = None  # research.workspace.Confinement: where agent code may be imported
    runs_dir: Path | None = None  # runs/<n>/ records (default: <repo>/runs)
    branch: str = ""  # the research branch (default: that of the history's rows)
    in_flight: list[tuple[str, str]] = field(default_factory=list)  # (description, diff) running on other workers
    running: set[str] = field(default_factory=set)  # their trainer hashes (also in seen_hashes)

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
            raise AgentError("A script must be a JSON list of objects (see research.agents.ScriptedAgent).")
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


def layout_key(text: str, settings) -> str:
    """Hash of the trainer with every editable value blanked: versions that differ only in values share it."""
    layout = text
    for s in sorted((sp for st in settings.values() for sp in st.spots), key=lambda sp: (-sp.line, -sp.start)):
        lines = layout.split("\n")
        lines[s.line] = lines[s.line][: s.start] + "_" + lines[s.line][s.end :]
        layout = "\n".join(lines)
    return text_hash(layout)


def host_truth(ctx: AgentContext, text: str, settings, cache: dict, console: Console, who: str) -> dict[str, bool]:
    """Truth of the block's hardware conditions on this host, probed once per trainer layout (`cache`
    maps layouts to answers) by importing the trainer inside its sandbox, never in this process."""
    conds = conditions(settings)
    if not conds:
        return {}
    key = layout_key(text, settings)
    if key not in cache:
        try:
            if ctx.confine is None:
                raise HyperparamError("there is no sandbox to import the trainer in")
            cache[key] = probe_conditions(ctx.trainer_path, conds, ctx.confine.run_python)
        except HyperparamError as e:
            console.event(f"{who}: {e}; only unconditional hyperparameters will be changed")
            cache[key] = {}
    return cache[key]


def _fmt(v: object) -> str:
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
        desc = "; ".join(f"{k} {_fmt(hp[k])} -> {_fmt(v)}" for k, v in changes.items()) + why
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
# Claude agent: Messages API with tools
# ---------------------------------------------------------------------------------------------

_READABLE_FILES = ("train_cuda.py", "train_mlx.py", "prepare.py", "program.md", "README.md")
_READABLE_DIRS = ("backends", "model")
MAX_READ_CHARS = 120_000


def price_of(model: str) -> tuple[float, float, float, float] | None:
    """Prices for a model id (a dated id falls back to its alias), None if unknown."""
    return PRICES.get(model) or PRICES.get(re.sub(r"-\d{8}$", "", model))


def cost_usd(model: str, tokens_in: int, tokens_out: int, cache_write: int = 0, cache_read: int = 0) -> float | None:
    """USD for one call; `tokens_in` excludes the cache tokens. None when the model's price is unknown."""
    p = price_of(model)
    if p is None:
        return None
    return (tokens_in * p[0] + tokens_out * p[1] + cache_write * p[2] + cache_read * p[3]) / 1e6


def _tool_specs(trainer: str) -> list[dict]:
    return [
        {
            "name": "read_file",
            "description": ("Read one file of the project. Readable: train_cuda.py, train_mlx.py, prepare.py, "
                            "program.md, README.md and the .py files under backends/ and model/."),
            "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
        {
            "name": "edit_trainer",
            "description": (f"Edit {trainer}, the only file you may change: replace old_string with new_string. "
                            "old_string must match the file exactly (whitespace included) and occur exactly once; "
                            "include surrounding lines to make it unique. Several calls may build one change."),
            "input_schema": {
                "type": "object",
                "properties": {"old_string": {"type": "string"}, "new_string": {"type": "string"}},
                "required": ["old_string", "new_string"],
            },
        },
        {
            "name": "finish",
            "description": ("End this turn. With description: a one-line summary of the change you made (what and "
                            "why), which becomes the experiment's description. With give_up=true and no edit: run "
                            "no experiment this time (e.g. a crash you cannot fix)."),
            "input_schema": {
                "type": "object",
                "properties": {"description": {"type": "string"}, "give_up": {"type": "boolean"}},
            },
        },
    ]


MEMORY_TOOLS = [
    {
        "name": "journal",
        "description": ("Your research journal for this branch, kept across turns and restarts and shown to you at the "
                        "start of every turn. Write what you learned (findings with run numbers), hypotheses, and "
                        "what to try next. mode 'append' (default) adds a dated entry; mode 'replace' rewrites the "
                        "whole journal (condense it that way when it grows long)."),
        "input_schema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "mode": {"type": "string", "enum": ["append", "replace"]}},
            "required": ["text"],
        },
    },
    {
        "name": "read_run",
        "description": ("Look back at a past experiment of this branch by its run number (#n in the history): its "
                        "result, the diff it made to the trainer, the last lines of its log and its training-loss "
                        "curve. parts: any of 'diff', 'log', 'loss' (default all)."),
        "input_schema": {
            "type": "object",
            "properties": {"run": {"type": "integer"},
                           "parts": {"type": "array", "items": {"type": "string", "enum": ["diff", "log", "loss"]}}},
            "required": ["run"],
        },
    },
]


def prepare_excerpt(repo: Path) -> str:
    """The public surface of prepare.py (docstring, signatures, first docstring lines) for the prompt."""
    path = Path(repo) / "prepare.py"
    try:
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
    except (OSError, SyntaxError):
        return ""
    out = [ast.get_docstring(tree) or ""]
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            head = src.split("\n")[node.lineno - 1].strip()
            doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0]
            out.append(f"{head}\n    {doc}" if doc else head)
        elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            seg = ast.get_source_segment(src, node) or ""
            if len(seg) < 300:
                out.append(seg)
    return "\n\n".join(s for s in out if s)


class ClaudeAgent(Agent):
    """Claude through the anthropic SDK: reads files, edits the trainer, finishes with a description.

    One fresh conversation per proposal; the static context (program.md, tool notes, the
    prepare.py excerpt, the trainer) is marked for prompt caching, the history of past
    experiments comes after it. Overload / rate-limit / server errors are retried by the SDK
    and then by a bounded exponential backoff here (base `backoff_s`, doubling, capped).
    """

    name = "claude"
    can_fix = True

    def __init__(self, repo: Path, trainer: str, *, model: str | None = None, client=None,
                 max_tokens: int = 16000, max_turns: int = 30, attempts: int = 8, backoff_s: float | None = None,
                 backoff_cap_s: float = 120.0, sdk_retries: int = 2, console: Console | None = None,
                 history_tokens: int = 6000):
        import anthropic

        self._anthropic = anthropic
        self.repo = Path(repo)
        self.trainer = trainer
        self.model = model or os.environ.get("AUTORESEARCH_MODEL") or DEFAULT_MODEL
        if client is None:
            # the key comes from the loop's in-memory store (research/secrets.py), never from the environment:
            # the loop runs without it there, so no process the trainer can see holds it
            creds = secrets.anthropic_credentials()
            if not creds:
                raise AgentError("The claude agent needs ANTHROPIC_API_KEY; set it, or run with --agent optuna.")
            client = anthropic.Anthropic(max_retries=sdk_retries, timeout=600.0, **creds)
        self.client = client
        self.max_tokens = max_tokens
        self.max_turns = max_turns
        self.attempts = max(1, attempts)
        env_backoff = os.environ.get("AUTORESEARCH_API_BACKOFF")
        self.backoff_s = backoff_s if backoff_s is not None else float(env_backoff) if env_backoff else 2.0
        self.backoff_cap_s = backoff_cap_s
        self.console = console or Console()
        self.pending = Usage()  # spent on turns that produced no experiment yet
        self.tools = _tool_specs(trainer)
        self.history_tokens = history_tokens  # the compacted history's budget in the prompt
        self.tune_note = ""  # set by the hybrid agent: an optimizer tunes the block's values
        self._truth_cache: dict[str, dict[str, bool]] = {}
        program = (self.repo / "program.md")
        program_text = program.read_text(encoding="utf-8") if program.exists() else ""
        notes = (
            "## How this session works\n"
            f"You are driven by loop.py. Each turn: look at the history, change {trainer} with edit_trainer "
            "(one idea per experiment), then call finish with a one-line description. The loop commits, "
            "trains for the fixed budget, reads val_bpb from the locked evaluator, keeps or reverts, and "
            "calls you again. Do not ask questions; nobody is there to answer.\n\n"
            "## prepare.py (locked) - public interface\n" + prepare_excerpt(self.repo)
        )
        self.system = [
            {"type": "text", "text": program_text or "You improve a GPT pretraining script."},
            {"type": "text", "text": notes, "cache_control": {"type": "ephemeral"}},
        ]

    # -- conversation ---------------------------------------------------------------------

    def propose(self, ctx: AgentContext) -> Proposal | None:
        original = ctx.trainer_path.read_text(encoding="utf-8")
        # the journal and the look-back need a branch to belong to (a bare context, as in `try`, has none)
        self.tools = _tool_specs(ctx.trainer) + (MEMORY_TOOLS if ctx.branch_name else [])
        messages: list[dict] = [{"role": "user", "content": [
            {"type": "text", "text": f"The current {ctx.trainer} (the file you edit):\n\n```python\n{original}```",
             "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": self._task(ctx)},
        ]}]
        nudged = 0
        for _ in range(self.max_turns):
            resp = self._call(messages)
            messages.append({"role": "assistant", "content": resp.content})
            uses = [b for b in resp.content if getattr(b, "type", None) == "tool_use"]
            if not uses:
                if nudged >= 2:
                    break
                nudged += 1
                messages.append({"role": "user", "content": [{"type": "text", "text": (
                    f"Use the tools: change {ctx.trainer} with edit_trainer, then call finish with a one-line "
                    "description (or finish with give_up=true).")}]})
                continue
            results, done = [], None
            for use in uses:
                text, is_error, finish = self._tool(use.name, use.input, ctx, original)
                block = {"type": "tool_result", "tool_use_id": use.id, "content": text}
                if is_error:
                    block["is_error"] = True
                results.append(block)
                done = finish if finish is not None else done
            if done is not None:
                if done == "":
                    return None  # gave up; the loop restores the trainer
                usage, self.pending = self.pending, Usage()
                return Proposal(done, usage)
            messages.append({"role": "user", "content": results})
        self.console.event(f"claude: no finished change after {self.max_turns} turns; skipping this proposal")
        return None

    def _task(self, ctx: AgentContext) -> str:
        p, h = ctx.protocol, ctx.host
        lines = [
            f"Host: backend {h.backend} ({h.device_name}); you edit {ctx.trainer}. Protocol {p.name}: "
            f"time budget {p.time_budget:g} s, vocab {p.vocab_size}, sequence length {p.max_seq_len}.",
        ]
        if ctx.best is not None:
            lines.append(f"Best val_bpb so far: {ctx.best:.6f}. Noise floor: {ctx.noise_floor or 0:.6f} "
                         "(a change is kept only if it beats the best by more than this; lower is better).")
        if ctx.history:
            lines.append("\n" + compact_history(ctx.history, self.history_tokens))
        if self.tune_note:
            lines.append("\n" + self.tune_note)
        if ctx.in_flight:
            lines.append("\n## Running now on other workers (no result yet; do not propose these again)\n" + "\n".join(
                f"- {d}" + (f"\n```diff\n{diff[-1500:]}```" if diff else "") for d, diff in ctx.in_flight))
        if ctx.branch_name:
            journal = read_journal(journal_path(ctx.runs, ctx.branch_name))
            lines.append(f"\n## Your research journal ({ctx.branch_name})\n" + (journal.strip() or
                         "(empty: record findings, hypotheses and next steps with the journal tool)"))
            lines.append("Use read_run to look at a past run's diff, log and loss curve before repeating or building "
                         "on it; a change that repeats an experiment already run is refused at finish.")
        c = ctx.crash
        if c is not None:
            lines += [
                f"\nYour last change ({c.description}) crashed: {c.reason}. This is fix attempt {c.attempt} of "
                f"{c.max_attempts}. The file above is the crashed version. Fix the bug with edit_trainer and "
                "finish with a description (say it is a fix), or finish with give_up=true to drop the idea.",
                f"\nDiff of the crashed change:\n```diff\n{c.diff[-6000:]}```",
                f"\nLast lines of the log:\n```\n{c.log_tail}\n```",
            ]
        else:
            lines.append(f"\nPropose the next experiment: edit {ctx.trainer}, then call finish.")
        return "\n".join(lines)

    def _tool(self, name: str, args, ctx: AgentContext, original: str) -> tuple[str, bool, str | None]:
        """(result text, is_error, finish) where finish is None, a description, or '' for give up."""
        if not isinstance(args, dict):
            return f"{name}: the input must be a JSON object.", True, None
        if name == "read_file":
            path = args.get("path")
            if not isinstance(path, str) or not path:
                return "read_file needs a 'path' string.", True, None
            return self._read(path)
        if name == "edit_trainer":
            old, new = args.get("old_string"), args.get("new_string")
            if not isinstance(old, str) or not isinstance(new, str) or not old:
                return "edit_trainer needs non-empty 'old_string' and a 'new_string', both strings.", True, None
            path = ctx.trainer_path
            text = path.read_text(encoding="utf-8")
            n = text.count(old)
            if n != 1:
                why = "does not occur" if n == 0 else f"occurs {n} times"
                return (f"old_string {why} in {ctx.trainer}; it must match exactly once (copy it from the file, "
                        "include more surrounding lines if needed).", True, None)
            if old == new:
                return "old_string and new_string are the same; nothing changed.", True, None
            path.write_text(text.replace(old, new, 1), encoding="utf-8")
            return f"Edited {ctx.trainer} ({old.count(chr(10)) + 1} lines replaced by {new.count(chr(10)) + 1}).", \
                False, None
        if name == "finish":
            current = ctx.trainer_path.read_text(encoding="utf-8")
            changed = current != original
            if args.get("give_up") is True:
                return "ok", False, ""  # the loop restores the trainer
            desc = sanitize(args.get("description") if isinstance(args.get("description"), str) else "")
            if not changed:
                return (f"You have not changed {ctx.trainer}; edit it first, or finish with give_up=true.", True,
                        None)
            if not desc:
                return "finish needs a one-line 'description' of the change.", True, None
            dup = self._duplicate(ctx, original, current)
            if dup:
                return (f"Not run: {dup}. Change something else (read_run shows what that run did), or finish "
                        "with give_up=true.", True, None)
            return "ok", False, desc
        if name == "journal" and ctx.branch_name:
            text, mode = args.get("text"), args.get("mode", "append")
            if not isinstance(text, str) or not isinstance(mode, str):
                return "journal needs a 'text' string (and optionally mode 'append' or 'replace').", True, None
            last = next((r.run for r in reversed(ctx.history) if r.run is not None), None)
            try:
                return write_journal(journal_path(ctx.runs, ctx.branch_name), text, mode, last), False, None
            except ValueError as e:
                return f"journal: {e}.", True, None
            except OSError as e:
                return f"journal: cannot write ({e.strerror or e}).", True, None
        if name == "read_run" and ctx.branch_name:
            run, parts = args.get("run"), args.get("parts")
            rows = [r for r in ctx.history if r.run == run] if isinstance(run, int) else []
            if not rows:
                runs = [r.run for r in ctx.history if r.run is not None]
                where = f" (runs of this branch: #{min(runs)}..#{max(runs)})" if runs else ""
                return f"read_run: no run #{run} on this branch{where}.", True, None
            if parts is not None and (not isinstance(parts, list) or not all(p in ("diff", "log", "loss")
                                                                             for p in parts)):
                return "read_run: parts must be a list of 'diff', 'log', 'loss'.", True, None
            return look_back(ctx.runs, rows[-1], parts or None), False, None
        return f"Unknown tool {name!r}; use {', '.join(t['name'] for t in self.tools)}.", True, None

    def _duplicate(self, ctx: AgentContext, original: str, current: str) -> str | None:
        """Why the edited trainer repeats an experiment already run (same text, or the same hyperparameter
        values on the current kept trainer), or None."""
        if text_hash(current) in ctx.running:
            return "this exact trainer is running now on another worker"
        values, changed = None, set()
        last_keep = max((i for i, r in enumerate(ctx.history) if r.status == "keep"), default=-1)
        if ctx.crash is None and any(r.hyperparams for r in ctx.history[last_keep + 1:]):
            try:
                before, after = parse_block(original), parse_block(current)
                if layout_key(original, before) == layout_key(current, after):  # only values in the block moved
                    truth = host_truth(ctx, current, after, self._truth_cache, self.console, "claude")
                    old, values = effective_values(before, truth), effective_values(after, truth)
                    changed = {k for k, v in values.items() if k in old and not same_value(old[k], v)}
            except HyperparamError:
                values = None
        return duplicate_of(text_hash(current), values, changed, ctx.history, ctx.seen_hashes)

    def _read(self, rel: str) -> tuple[str, bool, None]:
        root = self.repo.resolve()
        try:
            target = (root / rel).resolve()
            inside = target.relative_to(root).as_posix()
        except (ValueError, OSError):
            inside = None
        allowed = inside is not None and (
            inside in _READABLE_FILES
            or (inside.split("/")[0] in _READABLE_DIRS and inside.endswith(".py") and "/" in inside)
        )
        if not allowed:
            return (f"read_file cannot read {rel!r}: only {', '.join(_READABLE_FILES)} and backends/*.py, "
                    "model/*.py are in scope.", True, None)
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return f"cannot read {rel}: {e}", True, None
        return (text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n[... truncated]"), False, None

    # -- API calls --------------------------------------------------------------------------

    def _call(self, messages: list[dict]):
        """One Messages API call with retries; usage is added to self.pending."""
        a = self._anthropic
        wire = _with_moving_cache_mark(messages)
        last = "no response"
        for attempt in range(self.attempts):
            try:
                resp = self.client.messages.create(model=self.model, max_tokens=self.max_tokens, system=self.system,
                                                   tools=self.tools, messages=wire)
                problem = _malformed(resp)
                if problem is None:
                    self._count(resp)
                    return resp
                last = f"malformed response ({problem})"
            except (a.RateLimitError, a.InternalServerError, a.APIConnectionError) as e:
                last = _describe(e)
            except a.APIResponseValidationError as e:
                last = f"malformed response ({sanitize(e, 120)})"
            except ValueError as e:  # a body that is not JSON at all (cut short, say): the SDK's json error
                last = f"malformed response (not JSON: {sanitize(e, 100)})"
            except a.APIStatusError as e:
                raise AgentError(_status_sentence(e, self.model)) from None
            except a.AnthropicError as e:
                raise AgentError(f"The Anthropic client failed: {sanitize(e, 200)}") from None
            if attempt + 1 == self.attempts:
                break
            delay = min(self.backoff_cap_s, self.backoff_s * 2**attempt)
            self.console.event(f"claude: {last}; retrying in {delay:g} s (attempt {attempt + 2} of {self.attempts})")
            time.sleep(delay)
        raise AgentError(f"The Anthropic API kept failing ({last}) after {self.attempts} attempts; "
                         "the loop stopped, run it again later to resume.")

    def _count(self, resp) -> None:
        u = getattr(resp, "usage", None)
        if u is None:
            return
        fresh = int(getattr(u, "input_tokens", 0) or 0)
        write = int(getattr(u, "cache_creation_input_tokens", 0) or 0)
        read = int(getattr(u, "cache_read_input_tokens", 0) or 0)
        out = int(getattr(u, "output_tokens", 0) or 0)
        self.pending.add(Usage(fresh + write + read, out, cost_usd(self.model, fresh, out, write, read)))


def _with_moving_cache_mark(messages: list[dict]) -> list[dict]:
    """Copy of the conversation with a cache mark on the last user block too (earlier turns then
    come from the cache); at most 3 marks in all: system notes, trainer, latest turn."""
    if len(messages) < 2:
        return messages
    wire = list(messages)
    last = wire[-1]
    if last["role"] == "user" and isinstance(last["content"], list) and last["content"]:
        blocks = list(last["content"])
        blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
        wire[-1] = {**last, "content": blocks}
    return wire


def _malformed(resp) -> str | None:
    """What is wrong with a reply that is not a usable message (a proxy's error page, say), or None."""
    content = getattr(resp, "content", None)
    if not isinstance(content, list):
        return f"no content list in a {type(resp).__name__}"
    for block in content:
        kind = getattr(block, "type", None)
        if not isinstance(kind, str):
            return "a content block without a type"
        if kind == "tool_use" and not (isinstance(getattr(block, "id", None), str)
                                       and isinstance(getattr(block, "name", None), str)):
            return "a tool call without an id or a name"
    return None


def _describe(e: Exception) -> str:
    code = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    kind = body.get("error", {}).get("type") if isinstance(body, dict) and isinstance(body.get("error"), dict) else None
    if code:
        return f"HTTP {code}" + (f" {kind}" if kind else "")
    return sanitize(type(e).__name__ + ": " + str(e), 160)


def _status_sentence(e, model: str) -> str:
    code = getattr(e, "status_code", None)
    detail = sanitize(getattr(e, "message", "") or str(e), 200)
    if code == 401:
        return f"The Anthropic API rejected the credentials (401: {detail}); check ANTHROPIC_API_KEY."
    if code == 403:
        return f"The Anthropic API refused access (403: {detail}); check the key's permissions."
    if code == 404:
        return (f"The Anthropic API does not know the model '{model}' (404: {detail}); "
                "choose another with --model or AUTORESEARCH_MODEL.")
    return f"The Anthropic API refused the request ({code}: {detail})."


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
        from research.tuner import OptunaAgent

        return OptunaAgent(sampler=sampler, seed=seed, console=console)
    if kind == "scripted":
        if not script:
            raise AgentError("--agent scripted needs --script FILE (a JSON list of steps).")
        try:
            return ScriptedAgent(script)
        except (OSError, json.JSONDecodeError) as e:
            raise AgentError(f"Cannot read the script {script}: {e}") from None
    if kind == "claude":
        claude = ClaudeAgent(repo, trainer, model=model, console=console)
        if not tune:
            return claude
        from research.tuner import HybridAgent, OptunaAgent

        return HybridAgent(claude, OptunaAgent(sampler=sampler, seed=seed, console=console), console=console)
    raise AgentError(f"Unknown agent '{kind}'; choose {', '.join(AGENTS)}.")
