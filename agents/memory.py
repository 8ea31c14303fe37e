"""What the Claude agent remembers and can look back at.

- The research journal: one Markdown file per branch (runs/journal/<branch>.md) that the agent
  writes with its `journal` tool (findings, hypotheses, what to try next) and reads at each turn.
- Look-back: a past run's row, diff, log tail and loss trajectory (runs/<n>/), for `read_run`. What a
  run wrote (its log, the error line in a crashed run's note) is shown through
  `agents.untrusted.untrusted`: in a block with a random marker, labelled as the trainer's, untrusted.
- The history compacted, not cut: every experiment of the branch appears, however many there are
  — the kept ones and the latest in full, the older ones grouped by the hyperparameters they moved
  (or as code changes) with their results — shortened step by step until it fits a token budget.
- Duplicate ideas: a trainer version already run, or the same hyperparameter values as an
  experiment already run on the current kept trainer, is found before a run.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from agents.space import same_value
from agents.untrusted import untrusted
from research.results import MEASURED, Kind, Row, sanitize
from sandbox.secrets import redact

__all__ = ["journal_path", "read_journal", "write_journal", "look_back", "compact_history", "duplicate_of",
           "MAX_JOURNAL_CHARS", "CHARS_PER_TOKEN"]

MAX_JOURNAL_CHARS = 12_000  # shown each turn; beyond it the start is cut and the agent asked to condense
MAX_JOURNAL_FILE = 200_000  # appends stop growing the file past this
CHARS_PER_TOKEN = 3.5  # a conservative estimate for English and numbers (no tokenizer offline)
_ABBREV = {"keep": "K", "discard": "d", "crash": "c", "invalid": "i", "rejected": "r", "abort": "a", "rerun": "R",
           "transfer": "t"}


# ---------------------------------------------------------------------------------------------
# journal
# ---------------------------------------------------------------------------------------------


def journal_path(runs_dir: Path, branch: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", branch or "no-branch").strip("-.") or "no-branch"
    return Path(runs_dir) / "journal" / f"{safe}.md"


def read_journal(path: Path, limit: int = MAX_JOURNAL_CHARS) -> str:
    """The journal's text ('' when there is none); when longer than `limit`, its end, marked as cut."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    if len(text) <= limit:
        return text
    return (f"[... the first {len(text) - limit} characters are not shown: condense the journal with "
            "journal(mode='replace')]\n" + text[-limit:])


def write_journal(path: Path, text: str, mode: str = "append", run: int | None = None) -> str:
    """Append an entry (headed with the time and the last run number) or replace the whole journal.
    Returns a one-line account for the tool result. Raises ValueError for bad input, OSError on disk errors."""
    if mode not in ("append", "replace"):
        raise ValueError("mode must be 'append' or 'replace'")
    text = redact(text.replace("\r\n", "\n")).strip()
    if not text:
        raise ValueError("the text is empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "replace":
        text = text[:MAX_JOURNAL_FILE]
        path.write_text(text + "\n", encoding="utf-8")
        return f"Journal replaced ({len(text)} characters)."
    size = path.stat().st_size if path.exists() else 0
    if size + len(text) > MAX_JOURNAL_FILE:
        raise ValueError(f"the journal is {size} characters long; condense it with mode='replace' first")
    after = f" (after run #{run})" if run is not None else ""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n## {time.strftime('%Y-%m-%d %H:%M')}{after}\n{text}\n")
    return f"Entry added to the journal ({size + len(text)} characters in all)."


# ---------------------------------------------------------------------------------------------
# look-back
# ---------------------------------------------------------------------------------------------


def _note(r: Row, limit: int | None = None) -> str:
    """A row's note for the agent: as the loop wrote it for a measured run; quoted as untrusted otherwise (a
    crashed, rejected or invalid run's note may end with a line of its output: its FAIL or exception line)."""
    note = sanitize(r.note, limit) if limit else r.note
    return note if r.ok else untrusted(note, inline=True)


def _row_line(r: Row) -> str:
    val = f"{r.val_bpb:.6f}" if r.status in MEASURED and r.val_bpb > 0 else "-"
    hold = f", holdout {r.holdout_bpb:.6f}" if r.holdout_bpb is not None else ""
    steps = f", {r.num_steps} steps" if r.num_steps else ""
    note = f" [{_note(r)}]" if r.note else ""
    return f"run #{r.run}: {r.status} val_bpb {val}{hold}{steps}, commit {r.commit}: {r.description}{note}"


def _loss_lines(path: Path, points: int = 24) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        pts = [(int(s), float(p), float(v)) for s, p, v in data["points"]]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not pts:
        return ""
    if len(pts) > points:
        idx = sorted({round(i * (len(pts) - 1) / (points - 1)) for i in range(points)})
        pts = [pts[i] for i in idx]
    stopped = data.get("stopped_at_progress")
    head = "step  progress  train loss" + (f"  (stopped early at {100 * stopped:.0f}%)" if stopped else "")
    return "\n".join([head] + [f"{s:>5}  {100 * p:6.1f}%  {v:.4f}" for s, p, v in pts])


def look_back(runs_dir: Path, row: Row, parts: list[str] | None = None, log_lines: int = 40,
              diff_chars: int = 8000) -> str:
    """A past run for the agent: its row, then the requested parts ('diff', 'log', 'loss'; all by default)."""
    parts = parts or ["diff", "log", "loss"]
    d = Path(runs_dir) / str(row.run)
    out = [_row_line(row)]
    if "diff" in parts:
        try:
            diff = (d / "diff.patch").read_text(encoding="utf-8", errors="replace")
        except OSError:
            diff = ""
        if len(diff) > diff_chars:
            diff = diff[:diff_chars] + f"\n[... {len(diff) - diff_chars} more characters]"
        out.append(f"\nDiff against the trainer it started from:\n```diff\n{diff}```" if diff.strip()
                   else "\n(no diff stored: a baseline or a re-run of an unchanged trainer)")
    if "log" in parts:
        logs = sorted(d.glob("*log.txt")) if d.is_dir() else []
        for log in logs:
            try:
                lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            tail = "\n".join(lines[-log_lines:])[-6000:]
            n = min(log_lines, len(lines))
            out.append("\n" + untrusted(tail, f"the last {n} lines of run #{row.run}'s {log.name}"))
        if not logs:
            out.append("\n(no log stored)")
    if "loss" in parts:
        curves = sorted(d.glob("*loss.json")) if d.is_dir() else []
        shown = [(c.name, _loss_lines(c)) for c in curves]
        shown = [(n, t) for n, t in shown if t]
        out += [f"\nTraining loss ({n}):\n{t}" for n, t in shown] or ["\n(no loss curve stored)"]
    return redact("\n".join(out))


# ---------------------------------------------------------------------------------------------
# compacted history
# ---------------------------------------------------------------------------------------------


def _val(r: Row, digits: int = 6) -> str:
    return f"{r.val_bpb:.{digits}f}" if r.status in MEASURED and r.val_bpb > 0 else "-"


def _fmt_value(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_fmt_value(x) for x in v) + ")"
    return str(v)


def _moves(rows: list[Row]) -> dict[int, dict]:
    """Row index -> the hyperparameters it changed relative to the kept trainer it started from."""
    out: dict[int, dict] = {}
    current: dict = {}
    for i, r in enumerate(rows):
        hp = r.hyperparams or {}
        if r.kind == Kind.BASELINE or not current:
            if r.status == "keep" and hp:
                current = dict(hp)
            continue
        if r.status == "rerun":
            continue
        out[i] = {k: v for k, v in hp.items() if k in current and not same_value(current[k], v)}
        if r.status == "keep" and hp:
            current = dict(hp)
    return out


def compact_history(rows: list[Row], budget_tokens: int = 6000, recent: int = 12) -> str:
    """Every experiment of the branch in at most `budget_tokens` (estimated at CHARS_PER_TOKEN): counts,
    the kept changes in order, the latest `recent` in full, and the older ones grouped by the
    hyperparameters they moved, or as code changes, each with its result. Descriptions get shorter,
    and then the groups terser, until it fits; no experiment is left out."""
    if not rows:
        return ""
    limit = int(budget_tokens * CHARS_PER_TOKEN)
    text = ""
    for desc_len, n_recent, terse in ((160, recent, False), (100, recent, False), (60, recent, False),
                                      (40, max(4, recent // 2), False), (24, 4, True), (0, 3, True), (0, 0, True)):
        text = _render(rows, desc_len, n_recent, terse)
        if len(text) <= limit:
            break
    return text


def _render(rows: list[Row], desc_len: int, n_recent: int, terse: bool) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    moves = _moves(rows)
    lines = [f"History of this branch: {len(rows)} rows ("
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda x: -x[1])) + "). "
             "#n is the run number: read_run(n) shows its diff, log tail and loss curve."]
    kept = [(i, r) for i, r in enumerate(rows) if r.status == "keep"]
    recent_idx = set(range(max(0, len(rows) - n_recent), len(rows)))
    if kept:
        lines.append("\nKept (each became the best of its time), in order:")
        for _, r in kept:
            d = sanitize(r.description, max(desc_len, 60)) if desc_len or not terse else ""
            lines.append(f"#{r.run} {_val(r)} {d}".rstrip())
    older = [i for i in range(len(rows)) if i not in recent_idx and rows[i].status not in ("keep",)]
    groups: dict[tuple, list[int]] = {}
    code: list[int] = []
    reruns: list[int] = []
    for i in older:
        r = rows[i]
        if r.status == "rerun" or (r.kind == Kind.BASELINE and r.status != "keep"):
            reruns.append(i)
            continue
        moved = moves.get(i) or {}
        if moved:
            groups.setdefault(tuple(sorted(moved)), []).append(i)
        else:
            code.append(i)
    if groups or code or reruns:
        lines.append("\nEarlier experiments, grouped (status: K keep, d discard, c crash, i invalid, r rejected, "
                     "a abort, R re-run):")
    for names, idx in sorted(groups.items(), key=lambda g: g[1][0]):
        items = []
        for i in idx:
            r = rows[i]
            vals = ",".join(_fmt_value(moves[i][n]) for n in names)
            items.append(f"#{r.run} {vals} {_ABBREV.get(r.status, r.status)}{_val(r, 4) if r.status in MEASURED else ''}")
        lines.append(f"- {'+'.join(names)}: " + "; ".join(items))
    if code:
        lines.append("- other changes (code, or nothing recorded):" if not terse else "- other changes:")
        if terse:
            lines.append("  " + "; ".join(
                f"#{rows[i].run} {_ABBREV.get(rows[i].status, rows[i].status)}{_val(rows[i], 4) if rows[i].ok else ''}"
                + (f" {sanitize(rows[i].description, desc_len)}" if desc_len else "") for i in code))
        else:
            for i in code:
                r = rows[i]
                lines.append(f"  #{r.run} {r.status} {_val(r, 4)}: {sanitize(r.description, desc_len)}")
    if reruns:
        lines.append("- re-runs: " + "; ".join(f"#{rows[i].run} {_val(rows[i], 4)}" for i in reruns))
    if recent_idx:
        lines.append(f"\nLatest {len(recent_idx)} (oldest first; run, val_bpb, memory GB, status, description):")
        for i in sorted(recent_idx):
            r = rows[i]
            note = f"  [{_note(r, 160)}]" if r.note and not r.ok else ""
            lines.append(f"#{r.run}\t{_val(r)}\t{r.memory_gb:.1f}\t{r.status}\t{r.description}{note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# duplicates
# ---------------------------------------------------------------------------------------------


def duplicate_of(new_hash: str, values: dict | None, changed: set[str], rows: list[Row],
                 seen_hashes: set[str]) -> str | None:
    """Why a proposed trainer repeats an experiment already run, or None.

    Same trainer text (hash) as any run in this repository; or, when the change only moved values in
    the hyperparameter block (`changed`, the names it moved; `values`, every value in effect after it),
    the same values as an experiment run on the current kept trainer (the rows since the last keep)."""
    if new_hash in seen_hashes:
        same = [r for r in rows if r.trainer_hash == new_hash]
        if same:
            r = same[-1]
            return f"this exact trainer already ran as run #{r.run} ({r.status}, val_bpb {_val(r)}: {r.description})"
        return "this exact trainer already ran (on another branch of this repository)"
    if not values or not changed:
        return None
    last_keep = max((i for i, r in enumerate(rows) if r.status == "keep"), default=-1)
    for r in reversed(rows[last_keep + 1:]):
        hp = r.hyperparams or {}
        if r.status == "rerun" or not changed <= set(hp):
            continue
        if all(same_value(hp[k], values[k]) for k in hp if k in values):
            moved = ", ".join(f"{k} {_fmt_value(values[k])}" for k in sorted(changed))
            return (f"these hyperparameter values ({moved}) already ran on the current trainer as run #{r.run} "
                    f"({r.status}, val_bpb {_val(r)}: {r.description})")
    return None
