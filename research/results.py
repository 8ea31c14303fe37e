"""results.tsv: one row per experiment, appended atomically, read back tolerantly.

The first five columns are the reference format (`commit val_bpb memory_gb status
description`); ours follow. A row is written with a single `os.write` of the whole
line on an O_APPEND descriptor followed by fsync, so a killed loop leaves either the
full row or none. A torn last line (a crash in the middle of a write, a full disk) is
ignored when reading and cut off before the next append. A line that is not a row (one
mangled by hand or by another program) is skipped, and the reader says so: file and line.
Files written by the reference (five columns only) are read as well.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from sandbox.secrets import redact

__all__ = [
    "infer_reason",
    "COLUMNS",
    "UPSTREAM_COLUMNS",
    "STATUSES",
    "Status",
    "MEASURED",
    "CLAIMED",
    "Row",
    "Kind",
    "infer_kind",
    "BASELINE",
    "RERUN",
    "BEST_NEXT",
    "CONFIRM_RUN",
    "TRANSFER",
    "ResultsError",
    "append_row",
    "ensure_results_file",
    "read_results",
    "sanitize",
]

UPSTREAM_COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]
COLUMNS = UPSTREAM_COLUMNS + [
    "timestamp",
    "backend",
    "device",
    "protocol",
    "evaluator_hash",
    "training_seconds",
    "num_steps",
    "mfu_percent",
    "num_params_M",
    "wall_seconds",
    "agent_tokens_in",
    "agent_tokens_out",
    "agent_cost_usd",
    "trainer_hash",
    "holdout_bpb",
    "hyperparams",
    "branch",
    "run",
    "note",
    "budget_s",
    "progress",
    "worker",
    "wall_ratio",
    "wall_limit_s",
    "first_step_s",
    "tail_s",
    "gauge_before_s",
    "gauge_after_s",
    "kind",
    "reason",
    "others_cpu",
]


# An aborted row has val_bpb 0.0 (`progress` says how far it got); a rerun is a measurement for the noise
# model and the best's mean, not a decision.
class Status:
    """The values of the `status` column (the first three are the reference's)."""

    KEEP = "keep"  # kept: the branch moves to this commit
    DISCARD = "discard"  # measured, not better by the rule
    CRASH = "crash"  # did not hand over a model that could be scored
    REJECTED = "rejected"  # broke a rule: touched more than the trainer, ran past the clock, ...
    INVALID = "invalid"  # the harness found the model non-causal
    TRANSFER = "transfer"  # another machine's config run here once, never kept
    ABORT = "abort"  # stopped early: its loss trailed the best's by more than the noise allows
    RERUN = "rerun"  # a measured trainer run again (confirm run, re-measurement of the best)
    ALL = (KEEP, DISCARD, CRASH, REJECTED, INVALID, TRANSFER, ABORT, RERUN)
    MEASURED = (KEEP, DISCARD, TRANSFER, RERUN)  # statuses whose val_bpb is a real measurement


STATUSES = Status.ALL
MEASURED = Status.MEASURED
# columns copied from the trainer's own account of its run (facts.json): shown, never used for a decision
CLAIMED = ("memory_gb", "training_seconds", "num_steps", "mfu_percent", "num_params_M")
# What a row's run was for (the `kind` column). Files written before it had one are read with the kind
# inferred from the note and description prefixes the loop wrote then (`infer_kind`, the one place that
# reads them); new rows carry it as data.
BASELINE = "baseline"  # description and note prefix of baseline rows
RERUN = "rerun of the best"  # description prefix of re-measurements of the best
BEST_NEXT = "the best, run next to run"  # note prefix of the best's run between a promising change's two
CONFIRM_RUN = "confirm run of run"  # note prefix of a change's confirm run
TRANSFER = "transfer from "  # description prefix of a transfer run (a crashed one is recorded as crash)


class Kind:
    """The values of the `kind` column."""

    BASELINE = "baseline"  # the branch's starting trainer, run unchanged (its first runs)
    EXPERIMENT = "experiment"  # a change, decided keep / discard / ...
    RERUN = "rerun"  # the best run again to re-measure it (every few experiments, or when the machine changed)
    CONFIRM = "confirm"  # a promising change run a second time
    BEST_NEXT = "best_next"  # the best run between a promising change's two runs
    TRANSFER = "transfer"  # another machine's best config run here once
    ALL = (BASELINE, EXPERIMENT, RERUN, CONFIRM, BEST_NEXT, TRANSFER)


def infer_kind(note: str, description: str, status: str) -> str:
    """The kind of a row written before the `kind` column, from the prefixes the loop wrote then (and, for
    the reference's files, a kept row described as the baseline)."""
    if note.startswith(BASELINE) or (not note and status == "keep" and description.lower().startswith(BASELINE)):
        return Kind.BASELINE
    if note.startswith(CONFIRM_RUN):
        return Kind.CONFIRM
    if note.startswith(BEST_NEXT):
        return Kind.BEST_NEXT
    if description.startswith(RERUN):
        return Kind.RERUN
    if status == "transfer" or description.startswith(TRANSFER):
        return Kind.TRANSFER
    return Kind.EXPERIMENT


# Why a run did not measure or was not counted, in a few words (the `reason` column): the loop's notes have
# fixed forms, so one reading of them serves the rows it writes and the files written before the column.
_REASONS = (  # (status, pattern in the note, reason), the first match wins
    ("rejected", r"overtime|past the [\d.]+ s budget", "overtime"),
    ("rejected", r"Locked files|locked file", "locked files changed"),
    ("rejected", r"changed files other than|deleted the trainer|no change to", "more than the trainer"),
    ("rejected", r"the run changed|put back|refs \(|git settings|results\.tsv", "changed what it must not"),
    ("rejected", r"harness's directory", "wrote to the harness"),
    ("crash", r"syntax error on line", "syntax error"),
    ("crash", r"killed after [\d.]+ s", "timeout"),
    ("crash", r"memory cap|run out of memory", "memory"),
    ("crash", r"into its workspace, past the cap", "disk"),
    ("crash", r"the loop was interrupted", "interrupted"),
    ("crash", r"the worker failed|worker .*lost", "worker failed"),
    ("crash", r"killed by ", "killed by a signal"),
    ("crash", r"exit code", "exit code"),
    ("invalid", r"", "not causal"),
    ("abort", r"", "trailed the best"),
)


def infer_reason(status: str, note: str) -> str:
    """The `reason` of a row from its status and note ("" for a row that measured and counted, or a note
    of a form the loop does not write: then "other")."""
    if status not in ("rejected", "crash", "invalid", "abort"):
        return ""
    for st, pattern, reason in _REASONS:
        if st == status and re.search(pattern, note):
            return reason
    return "other"


NO_COMMIT = "-------"  # commit column of a change that was never committed (rejected before commit)
MAX_DESCRIPTION = 300
_FREE_TEXT = ("description", "note", "device", "branch", "worker", "reason")  # the fields whose text comes from the run or the agent


class ResultsError(Exception):
    """The results file cannot be written (message is one sentence for the user)."""


def sanitize(text: object, limit: int = MAX_DESCRIPTION) -> str:
    """One line without tabs: whitespace runs collapse to a space, long text is cut with an ellipsis."""
    s = re.sub(r"\s+", " ", str(text if text is not None else "")).strip()
    return s if len(s) <= limit else s[: limit - 1].rstrip() + "…"


@dataclass
class Row:
    """One experiment. Fields missing in a file (older or reference format) are None / empty.

    CLAIMED columns are copied from the trainer's own account of its run (its facts.json): memory_gb,
    training_seconds, num_steps, mfu_percent and num_params_M. They are shown and never decide anything.
    Everything else is the loop's or the harness's: hyperparams from the committed trainer's source, backend
    and device from the loop's detection, the machine's speed from its gauge. (Rows written before this
    took the hyperparameters and the device from the trainer too.)
    """

    commit: str
    val_bpb: float
    memory_gb: float
    status: str
    description: str
    timestamp: str = ""
    backend: str = ""
    device: str = ""
    protocol: str = ""
    evaluator_hash: str = ""
    training_seconds: float | None = None
    num_steps: int | None = None
    mfu_percent: float | None = None
    num_params_M: float | None = None
    wall_seconds: float | None = None
    agent_tokens_in: int | None = None
    agent_tokens_out: int | None = None
    agent_cost_usd: float | None = None
    trainer_hash: str = ""
    holdout_bpb: float | None = None
    hyperparams: dict = field(default_factory=dict)
    branch: str = ""
    run: int | None = None
    note: str = ""
    budget_s: float | None = None  # the time budget the run had (None: a row written before it was recorded)
    progress: float | None = None  # abort rows: the fraction of the budget reached when stopped
    worker: str = ""  # parallel runs: the worker slot and host that measured it (`w1@node-3`); "" for one worker
    # The loop's own timing of the trainer (research/clock.py), never the trainer's word: wall_seconds / budget_s,
    # the wall limit the run was held to (empty for baselines, which set it), and from its output as it came,
    # the seconds from its start to its first training step line and from its last one to its end.
    wall_ratio: float | None = None
    wall_limit_s: float | None = None
    first_step_s: float | None = None
    tail_s: float | None = None
    # The loop's own gauge of the machine (research/gauge.py): seconds its fixed workload took just before
    # and just after the run, on the machine that ran it. The speed the drift rule reads; not the trainer's.
    gauge_before_s: float | None = None
    gauge_after_s: float | None = None
    kind: str = ""  # what the run was for (Kind); inferred for rows written before the column
    reason: str = ""  # why it did not measure or count (infer_reason), "" when it did
    # Cores other programs kept busy while the trainer trained, by the kernel's count (research/gauge.py
    # LoadMeter); None off Linux and for rows written before the column.
    others_cpu: float | None = None

    def __post_init__(self) -> None:
        for name in _FREE_TEXT:  # no secret in a row, whoever built it (the loop, a report reading a file)
            value = getattr(self, name)
            if isinstance(value, str) and value:
                setattr(self, name, redact(value))
        if self.kind not in Kind.ALL:
            self.kind = infer_kind(self.note, self.description, self.status)
        if not self.reason:
            self.reason = infer_reason(self.status, self.note)

    @property
    def ok(self) -> bool:
        """True for rows that carry a real measurement (keep, discard or transfer)."""
        return self.status in MEASURED

    def to_line(self) -> str:
        """The row as one tab-separated line, newline included."""
        values = [redact(_format(f.name, getattr(self, f.name))) for f in fields(self)]  # no secret in the file
        return "\t".join(values) + "\n"

    @classmethod
    def from_fields(cls, header: list[str], values: list[str]) -> Row:
        """Parse one split line under `header` (unknown columns are ignored, missing ones default)."""
        raw = dict(zip(header, values))
        kwargs = {}
        for f in fields(cls):
            if f.name in raw:
                kwargs[f.name] = _parse(f.name, raw[f.name])
        for name in UPSTREAM_COLUMNS:
            kwargs.setdefault(name, _parse(name, ""))
        return cls(**kwargs)


_FLOAT_FORMATS = {
    "val_bpb": "{:.6f}",
    "memory_gb": "{:.1f}",
    "training_seconds": "{:.1f}",
    "mfu_percent": "{:.2f}",
    "num_params_M": "{:.1f}",
    "wall_seconds": "{:.2f}",
    "agent_cost_usd": "{:.4f}",
    "holdout_bpb": "{:.6f}",
    "budget_s": "{:g}",
    "progress": "{:.3f}",
    "wall_ratio": "{:.3f}",
    "wall_limit_s": "{:.2f}",
    "first_step_s": "{:.2f}",
    "tail_s": "{:.2f}",
    "gauge_before_s": "{:.4f}",
    "gauge_after_s": "{:.4f}",
    "others_cpu": "{:.3f}",
}
_INT_FIELDS = {"num_steps", "agent_tokens_in", "agent_tokens_out", "run"}


def _format(name: str, value: object) -> str:
    if name == "hyperparams":
        return json.dumps(value or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    if value is None:
        return ""
    if name in _FLOAT_FORMATS:
        v = float(value)
        return _FLOAT_FORMATS[name].format(v) if math.isfinite(v) else ""
    if name in _INT_FIELDS:
        return str(int(value))
    return sanitize(value, MAX_DESCRIPTION if name == "description" else 1000)


def _parse(name: str, text: str) -> object:
    text = text.strip()
    if name == "hyperparams":
        try:
            value = json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    if name in ("val_bpb", "memory_gb"):
        return _to_float(text, 0.0)
    if name in _FLOAT_FORMATS:
        return _to_float(text, None)
    if name in _INT_FIELDS:
        try:
            return int(text) if text else None
        except ValueError:
            return None
    return text


def _to_float(text: str, default):
    try:
        return float(text) if text else default
    except ValueError:
        return default


_SAID: set[str] = set()  # the skipped-lines warnings already printed by this process


def read_results(path: str | os.PathLike, problems: list[str] | None = None) -> list[Row]:
    """All complete rows of a results file, oldest first; [] if it does not exist.

    Accepts our format and the reference's five-column one; a torn last line (no
    trailing newline) and blank lines are skipped quietly. A line that is not a row
    (fewer than the reference's five tab-separated columns) is skipped too, the other
    rows are read, and one sentence naming the file and its line numbers says so:
    appended to `problems` when the caller passes a list, else printed to stderr, once
    per process (a live page re-reads the file every few seconds).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    lines.pop()  # text after the last newline is either empty or a torn row
    if not lines:
        return []
    header = lines[0].split("\t")
    if header[:5] != UPSTREAM_COLUMNS:
        header = COLUMNS  # a file without a header line: assume ours
        first = 1
    else:
        first = 2
    rows, skipped = [], []
    for number, line in enumerate(lines[first - 1:], start=first):
        if not line.strip():
            continue
        values = line.split("\t")
        if len(values) < len(UPSTREAM_COLUMNS):
            skipped.append(number)
            continue
        rows.append(Row.from_fields(header, values))
    if skipped:
        _say(_skipped_sentence(path, skipped), problems)
    return rows


def _skipped_sentence(path: Path, numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:5])
    if len(numbers) > 5:
        shown += f" and {len(numbers) - 5} more"
    one = len(numbers) == 1
    return (f"warning: skipped line{'' if one else 's'} {shown} of {path}: {'it is' if one else 'they are'} not "
            f"{'a results row' if one else 'results rows'} (fewer than the {len(UPSTREAM_COLUMNS)} tab-separated "
            f"columns of one); the other rows were read, fix or delete {'it' if one else 'them'}.")


def _say(sentence: str, problems: list[str] | None) -> None:
    if problems is not None:
        problems.append(sentence)
    elif sentence not in _SAID:
        _SAID.add(sentence)
        print(sentence, file=sys.stderr, flush=True)


def ensure_results_file(path: str | os.PathLike) -> None:
    """Create the file with our header, upgrade a reference-format header, cut off a torn last line.

    Raises ResultsError when the file cannot be written.
    """
    path = Path(path)
    header = "\t".join(COLUMNS) + "\n"
    try:
        if not path.exists():
            _write_atomically(path, header)
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            # a row that was never completed: drop it so the next append starts on a fresh line
            keep = data.rfind(b"\n") + 1
            with open(path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            data = data[:keep]
        first, sep, rest = data.partition(b"\n")
        current = first.decode("utf-8", errors="replace").split("\t")
        if not data:
            _write_atomically(path, header)
        elif current[:5] == UPSTREAM_COLUMNS and current != COLUMNS:
            # the reference's header (or an older one of ours): widen it, keep every row
            _write_atomically(path, header + rest.decode("utf-8", errors="replace"))
        elif current[:5] != UPSTREAM_COLUMNS:
            raise ResultsError(f"{path} does not look like a results file (its first line is not a header); "
                               "move it away or pass another --results path.")
    except OSError as e:
        raise ResultsError(f"Cannot write {path} ({e.strerror or e}); free disk space or fix its permissions.") from e


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_row(path: str | os.PathLike, row: Row) -> None:
    """Append one row with a single write + fsync; a partial write is cut back and reported.

    Raises ResultsError (one sentence) when the row cannot be stored; earlier rows are untouched.
    """
    if row.status not in STATUSES:
        raise ValueError(f"unknown status {row.status!r}")
    data = row.to_line().encode("utf-8")
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise ResultsError(f"Cannot open {path} for writing ({e.strerror or e}); the loop stopped, "
                           "earlier rows are intact.") from e
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the torn tail is ignored on read and cut off on the next start
            raise ResultsError(f"Cannot append to {path} ({e.strerror or e}); the loop stopped, "
                               "earlier rows are intact.") from e
    finally:
        os.close(fd)
