"""The Claude agent: Anthropic's Messages API with tools to read the project, edit the trainer and
keep a journal; prices and token accounting. Built by agents/__init__.py make_agent."""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

from agents import Agent, AgentContext, AgentError, Proposal, host_truth, layout_key
from agents.memory import compact_history, duplicate_of, journal_path, look_back, read_journal, write_journal
from agents.space import same_value
from agents.untrusted import untrusted
from research.console import Console
from research.guards import text_hash
from research.hparams import HyperparamError, effective_values, parse_block
from research.proposals import Usage
from research.results import sanitize
from sandbox import secrets

__all__ = ["ClaudeAgent", "DEFAULT_MODEL", "PRICES", "cost_usd", "price_of"]

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


SHARED_SHOWN = 12  # rows of other machines in the prompt, at most: their best kept ones, then their latest


def shared_text(shared: list[tuple[str, object]]) -> str:
    """Other machines' published rows, one line each: their best kept rows, then their latest ones."""
    kept = sorted((x for x in shared if x[1].status == "keep"), key=lambda x: x[1].val_bpb)[:SHARED_SHOWN // 2]
    latest = [x for x in shared if x not in kept][-(SHARED_SHOWN - len(kept)):]
    return "\n".join(f"{host}: {r.status} val_bpb {r.val_bpb:.6f} ({r.kind}): {sanitize(r.description, 160)}; "
                     f"hyperparameters {sanitize(r.hyperparams, 400)}" for host, r in [*kept, *latest])


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
            # the key comes from the loop's in-memory store (sandbox/secrets.py), never from the environment:
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
        if ctx.shared:
            lines.append("\n## What other machines of this hardware published (their claims, not measured here)\n"
                         + untrusted(shared_text(ctx.shared), "rows other machines published: unverified claims"))
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
                f"\nYour last change ({c.description}) crashed: {untrusted(c.reason, inline=True)}. This is fix "
                f"attempt {c.attempt} of {c.max_attempts}. The file above is the crashed version. Fix the bug with "
                "edit_trainer and finish with a description (say it is a fix), or finish with give_up=true to drop "
                "the idea.",
                f"\nDiff of the crashed change:\n```diff\n{c.diff[-6000:]}```",
                "\n" + untrusted(c.log_tail, "the last lines of the crashed run's log"),
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
