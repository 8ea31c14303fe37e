"""One machine's experiments, read from a results file or run folders, and what they add up to.

`load_source` reads a results.tsv (ours or the reference's five columns), a `runs/` folder or one
`runs/<n>/` folder and keeps one branch under one protocol and evaluator. `summarize` turns those rows
into what every report shows: the experiment numbers, the status counts, the baseline runs, the kept
changes, the best config and the running best. The text and figure helpers at the end are the ones
the progress report, the comparison and the transfer all write with.

Definitions every report follows:
- an experiment's number is its `run` (the runs/<n> folder, the number the console shows); a row
  without one (the reference's files) is numbered by its position among the reported rows;
- baseline runs are the kept rows whose note starts with "baseline" (the reference's files, without
  notes: the kept rows described as "baseline", else the first kept row);
- "keep" counts every row whose status is keep, baseline runs included, as the file and the
  reference's own analysis count them; a kept change is a kept row that is not a baseline run;
- in a file the loop wrote (its rows carry trainer hashes) the best and the running best are the
  loop's own (research/ledger.py): the best is the mean of the best trainer's runs at the machine's
  current speed, the best config is the last kept change (what the branch continues from), and the
  running best after each row is the value the loop compared the next experiment with, so every
  screen shows the number the loop decided with and `best_basis` says which runs it is the mean of;
- in a file without trainer hashes (the reference's) the running best starts at the mean of the
  baseline runs, from the first baseline run on, and only ever goes down: to each kept change below it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from research.results import MEASURED, TRANSFER, Kind, Row, read_results

__all__ = [
    "DEFAULT_OUT_DIR",
    "UNKNOWN",
    "TRANSFER",
    "ReportError",
    "Source",
    "Summary",
    "load_source",
    "summarize",
    "measured",
    "run_summary",
    "path_label",
]

DEFAULT_OUT_DIR = "reports"  # where the report and compare commands write, unless told otherwise
UNKNOWN = "unknown"


class ReportError(Exception):
    """Bad input for a report (message is one sentence plus what to do)."""


# ---------------------------------------------------------------------------
# Loading results files and run folders
# ---------------------------------------------------------------------------


@dataclass
class Source:
    """The experiments of one machine: rows of a results file (or rebuilt from run folders)."""

    path: Path
    rows: list[Row]
    runs_dir: Path | None = None  # runs/<n>/result.json with totals the results file lacks
    left_out: list[Row] = field(default_factory=list)  # rows of other branches, protocols or evaluators

    @property
    def label(self) -> str:
        """Short name: device and backend when recorded, else the file's location."""
        devices = Counter(r.device for r in self.rows if r.device)
        backends = Counter(r.backend for r in self.rows if r.backend)
        if devices:
            name = devices.most_common(1)[0][0]
            return f"{name} ({backends.most_common(1)[0][0]})" if backends else name
        return path_label(self.path)

    @property
    def protocol(self) -> str:
        return common(r.protocol for r in self.rows)

    @property
    def evaluator_hash(self) -> str:
        return common(r.evaluator_hash for r in self.rows)

    @property
    def backend(self) -> str:
        return common(r.backend for r in self.rows)

    @property
    def budget(self) -> float | None:
        """The time budget (seconds) the rows were measured with, when recorded."""
        counts = Counter(r.budget_s for r in self.rows if r.budget_s)
        return counts.most_common(1)[0][0] if counts else None

    @property
    def device(self) -> str:
        return common(r.device for r in self.rows)


def common(values) -> str:
    """The most frequent non-empty value, or ''."""
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else ""


def path_label(path: Path) -> str:
    """A short name for a results file or run folder: its folder's name, or the file's stem."""
    path = Path(path)
    if path.name in ("results.tsv", "runs") or path.is_dir() and (path / "results.tsv").exists():
        parent = path.resolve().parent if path.is_file() or path.name == "runs" else path.resolve()
        return parent.name or str(path)
    return path.stem if path.suffix else path.name


def load_source(path: str | Path, branch: str | None = None) -> Source:
    """Read a results file, a folder holding one, a `runs/` folder or a single `runs/<n>/` folder.

    Rows are kept in file order. Only one branch's rows under one protocol and evaluator are kept
    (`branch`, else the branch of the latest measurement); the others go to `left_out`, since
    val_bpb and a running best mean something only within one. Raises ReportError if nothing
    readable is there.
    """
    path = Path(path)
    if path.is_dir() and (path / "results.tsv").is_file():
        path = path / "results.tsv"
    if path.is_file():
        try:
            rows = read_results(path)
        except OSError as e:
            raise ReportError(f"Cannot read {path} ({e.strerror or e}).") from e
        runs = path.parent / "runs"
        source = Source(path, rows, runs if runs.is_dir() else None)
    elif path.is_dir():
        run_dirs = _run_dirs(path)
        if not run_dirs:
            raise ReportError(f"{path} holds neither a results.tsv nor run folders with a result.json; "
                              "pass a results file or a runs/ folder.")
        rows = [r for r in (row_from_run(d) for d in run_dirs) if r is not None]
        source = Source(path, rows, run_dirs[0].parent)
    else:
        raise ReportError(f"{path} does not exist; run the loop first (uv run loop.py) or pass the results "
                          "file to read.")
    _keep_one_run(source, branch)
    return source


def _run_dirs(path: Path) -> list[Path]:
    if (path / "result.json").is_file() or (path / "meta.json").is_file():
        return [path]
    for base in (path, path / "runs"):
        if base.is_dir():
            dirs = [d for d in base.iterdir() if d.is_dir() and d.name.isdigit()
                    and ((d / "result.json").is_file() or (d / "meta.json").is_file())]
            if dirs:
                return sorted(dirs, key=lambda d: int(d.name))
    return []


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def row_from_run(run_dir: Path) -> Row | None:
    """A results row for runs/<n>/: the loop's own record (meta.json) if there, else rebuilt from
    result.json (status then from the outcome: measured, invalid or crash)."""
    meta = _read_json(run_dir / "meta.json").get("row")
    if isinstance(meta, dict) and {"commit", "val_bpb", "status"} <= set(meta):
        names = {f.name for f in fields(Row)}
        try:
            return Row(**{k: v for k, v in meta.items() if k in names})
        except TypeError:
            pass
    data = _read_json(run_dir / "result.json")
    if not data:
        return None
    ev, sm = data.get("eval") or {}, _claims(data)
    own = data.get("loop") if isinstance(data.get("loop"), dict) else sm  # older records: the trainer's word
    val = num(ev.get("val_bpb", sm.get("val_bpb"))) or 0.0
    status = "invalid" if ev.get("valid") is False else "discard" if val > 0 else "crash"
    vram = num(sm.get("peak_vram_mb"))
    steps = num(sm.get("num_steps"))
    return Row(
        commit="",
        val_bpb=val,
        memory_gb=round(vram / 1024, 1) if vram else 0.0,
        status=status,
        description=f"run {run_dir.name}",
        backend=str(own.get("backend", "")),
        device=str(own.get("device", "")),
        protocol=str(ev.get("protocol", sm.get("protocol", ""))),
        evaluator_hash=str(ev.get("evaluator_hash", "")),
        training_seconds=num(sm.get("training_seconds")),
        num_steps=int(steps) if steps is not None else None,
        mfu_percent=num(sm.get("mfu_percent")),
        num_params_M=num(sm.get("num_params_M")),
        wall_seconds=num(own.get("wall_seconds", sm.get("total_seconds"))),
        holdout_bpb=num(ev.get("holdout_bpb")),
        hyperparams=own.get("hyperparams") if isinstance(own.get("hyperparams"), dict) else {},
        run=int(run_dir.name) if run_dir.name.isdigit() else None,
    )


def num(value) -> float | None:
    """`value` as a finite float, else None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _keep_one_run(source: Source, branch: str | None = None) -> None:
    """Keep the rows of one branch under one protocol, evaluator and time budget: `branch`, else the
    latest one's."""
    rows = [r for r in source.rows if r.branch == branch] if branch else source.rows
    if branch and not rows:
        names = sorted({r.branch for r in source.rows if r.branch})
        raise ReportError(f"{source.path} has no rows of branch {branch}; its branches are: "
                          f"{', '.join(names) or 'none recorded'}.")
    done = [r for r in rows if measured(r)] or rows
    if not done:
        return
    last = done[-1]
    key = (last.protocol, last.evaluator_hash, branch or last.branch, last.budget_s)

    def same(r: Row) -> bool:  # a field a row did not record does not set it apart (nor a budget the latest lacks)
        return all(not mine or mine == want for mine, want in zip((r.protocol, r.evaluator_hash, r.branch), key)) \
            and (not r.budget_s or not key[3] or r.budget_s == key[3])

    keep = [same(r) for r in source.rows]
    source.left_out = [r for r, k in zip(source.rows, keep) if not k]
    source.rows = [r for r, k in zip(source.rows, keep) if k]


def _claims(record: dict) -> dict:
    """The trainer's own account of its run in a runs/<n>/result.json ("claims"; "summary" in older ones)."""
    sm = record.get("claims", record.get("summary"))
    return sm if isinstance(sm, dict) else {}


def run_summary(source: Source, row: Row) -> dict:
    """The trainer's claims in the row's runs/<n>/result.json (its facts.json), or {} when there are none."""
    if source.runs_dir is None or row.run is None:
        return {}
    return _claims(_read_json(source.runs_dir / str(row.run) / "result.json"))


# ---------------------------------------------------------------------------
# Summary numbers
# ---------------------------------------------------------------------------


@dataclass
class Summary:
    """What a report says about one source (see the module docstring for the definitions).

    Experiments are referred to by their 1-based position in `source.rows`; `number(pos)` is the
    number a report shows for one. `baselines` are the baseline runs and `baseline_bpb` their mean;
    `kept` are the kept changes, in order.
    """

    counts: Counter  # experiments per status
    numbers: list[int]  # the number shown for each experiment
    baselines: list[tuple[int, Row]]
    baseline_bpb: float | None
    kept: list[tuple[int, Row]]
    best: tuple[int, Row] | None  # the best kept change (the loop's: the last), else the first baseline run
    best_bpb: float | None
    transfers: list[tuple[int, Row]]
    running_best: list[float | None]  # after each experiment
    wall_seconds: float | None
    cost_usd: float | None
    tokens_in: int | None
    tokens_out: int | None
    best_basis: str = ""  # which runs best_bpb is the mean of (a file the loop wrote), e.g. "mean of 3 runs (...)"

    @property
    def noise(self) -> float | None:
        """Spread (max - min) of the baseline runs, when there are two or more."""
        vals = [r.val_bpb for _, r in self.baselines]
        return max(vals) - min(vals) if len(vals) > 1 else None

    @property
    def improved(self) -> bool:
        """True when the best config is a kept change, not the baseline."""
        return self.best is not None and self.best in self.kept

    def number(self, pos: int) -> int:
        """The number shown for the experiment at 1-based position `pos`."""
        return self.numbers[pos - 1]

    def best_before(self, pos: int) -> float | None:
        """The running best just before the experiment at position `pos`."""
        return self.running_best[pos - 2] if pos >= 2 else None

    def tally(self) -> str:
        """The experiments per status, most first, e.g. '5 discard, 3 keep incl. 2 baseline runs, 1 crash'.

        The progress report's title and its Markdown both count with this."""
        parts = []
        for status, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            part = f"{n} {status}"
            if status == "keep" and self.baselines:
                part += f" incl. {plural(len(self.baselines), 'baseline run')}"
            parts.append(part)
        return ", ".join(parts)


def measured(row: Row) -> bool:
    """True for a row whose val_bpb is a real measurement."""
    return row.status in MEASURED and row.val_bpb > 0


def _is_baseline(row: Row) -> bool:
    # the loop notes its baseline runs; the reference's files (no note) call the first one "baseline"
    return row.kind == Kind.BASELINE


def summarize(source: Source, *, min_noise: float | None = None, drift: float | None = None,
              state=None) -> Summary:
    """Numbers, counts, baseline, kept changes in order, best config and the running best.

    Where no row is marked `keep` (run folders without a status) the first measured run is the
    baseline and every later run that beats the best so far counts as kept. A file the loop wrote is
    replayed with the loop's `min_noise` and `drift` (its defaults unless given); `state`, that replay
    already made by the caller (research.ledger.replay of these rows with these settings), is used as is.
    """
    rows = source.rows
    indexed = list(enumerate(rows, start=1))
    keeps = [(i, r) for i, r in indexed if r.status == "keep" and r.val_bpb > 0]
    if keeps:
        baselines = [(i, r) for i, r in keeps if _is_baseline(r)] or keeps[:1]
        base_ids = {i for i, _ in baselines}
        kept = [(i, r) for i, r in keeps if i not in base_ids]
    else:  # no statuses recorded: every measurement is a candidate
        candidates = [(i, r) for i, r in indexed if measured(r) and r.status != "transfer"]
        baselines, kept = candidates[:1], []
        for i, r in candidates[1:]:
            if r.val_bpb < min(x.val_bpb for _, x in baselines + kept):
                kept.append((i, r))
    base_bpb = mean(r.val_bpb for _, r in baselines)
    top = min(kept, key=lambda ir: ir[1].val_bpb) if kept else None
    if top is None or (base_bpb is not None and top[1].val_bpb >= base_bpb):
        top = baselines[0] if baselines else None
    best_bpb = top[1].val_bpb if top in kept else base_bpb
    running, basis = None, ""
    if keeps and any(r.trainer_hash for r in rows):  # the loop's file: its own best, as it decided
        from research.ledger import replay, running_best
        from research.session import Settings

        min_noise = Settings.min_noise if min_noise is None else min_noise
        drift = Settings.drift if drift is None else drift
        st = state if state is not None else replay(rows, min_noise, drift)
        if st.best is not None:
            top = kept[-1] if kept else (baselines[0] if baselines else None)
            best_bpb, basis = st.best, st.basis()
            running = running_best(rows, min_noise, drift)
    chosen = {i for i, _ in baselines + kept}
    return Summary(
        counts=Counter("keep" if i in chosen else r.status for i, r in indexed),
        numbers=[r.run if r.run is not None else i for i, r in indexed],
        baselines=baselines,
        baseline_bpb=base_bpb,
        kept=kept,
        best=top,
        best_bpb=best_bpb,
        best_basis=basis,
        transfers=[(i, r) for i, r in indexed if r.kind == Kind.TRANSFER],
        running_best=running if running is not None else _running_best(len(rows), baselines, base_bpb, kept),
        wall_seconds=_total(r.wall_seconds for r in rows),
        cost_usd=_total(r.agent_cost_usd for r in rows),
        tokens_in=_total(r.agent_tokens_in for r in rows),
        tokens_out=_total(r.agent_tokens_out for r in rows),
    )


def _running_best(n: int, baselines: list[tuple[int, Row]], base_bpb: float | None,
                  kept: list[tuple[int, Row]]) -> list[float | None]:
    """The best after each of n experiments: the baseline mean from the first baseline run on, then
    the lowest kept change so far; it never rises (a later baseline run or a kept change that does
    not beat it leaves it where it is)."""
    steps = {i: r.val_bpb for i, r in kept}
    if baselines:
        steps[baselines[0][0]] = base_bpb
    best, out = None, []
    for i in range(1, n + 1):
        if i in steps:
            best = steps[i] if best is None else min(best, steps[i])
        out.append(best)
    return out


def _total(values):
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def mean(values) -> float | None:
    """Mean of the values that are set (None and 0 mean 'not measured'), else None."""
    present = [v for v in values if v]
    return sum(present) / len(present) if present else None


# ---------------------------------------------------------------------------
# Text and figure helpers the reports share
# ---------------------------------------------------------------------------


def bpb_text(v: float | None) -> str:
    return f"{v:.6f}" if v else UNKNOWN


def gain_text(new: float | None, old: float | None) -> str:
    """Signed change and percentage, e.g. '-0.012345 (-1.24%)'; lower is better."""
    if not new or not old:
        return UNKNOWN
    d = new - old
    return f"{d:+.6f} ({100 * d / old:+.2f}%)"


def cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    s = str(text) if text not in (None, "") else UNKNOWN
    return s.replace("|", "\\|").replace("\n", " ")


def value_text(v) -> str:
    """A hyperparameter value as the trainer would write it (lists as JSON)."""
    if v is None:
        return "None"
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def shorten(text: str, limit: int = 40) -> str:
    """One line of at most `limit` characters, cut with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def new_figure(width: float, height: float):
    """A matplotlib Figure drawn by Agg, without pyplot's global state (no window, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig
