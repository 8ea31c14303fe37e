"""Reports on results files: a progress plot and summary, a cross-hardware comparison, a config transfer.

`report` turns one results.tsv into a PNG (every experiment, the kept ones labelled, the running
best) and a Markdown summary (baseline -> best, kept changes with their gains, the kept configs on
the holdout split, wall time and agent cost). `compare` puts the best config of several machines
side by side, with the hyperparameters that differ in bold, and refuses to mix protocols or
evaluators. `transfer` applies the best config found on another machine to this host's trainer
and runs it once, logged with status `transfer`.

matplotlib is imported only when a plot is drawn (and without pyplot), so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

from research.results import MEASURED, Row, read_results

__all__ = [
    "ReportError",
    "Source",
    "Summary",
    "TransferPlan",
    "load_source",
    "summarize",
    "plan_transfer",
    "apply_transfer",
    "run_transfer",
    "progress_markdown",
    "plot_progress",
    "write_report",
    "compare_markdown",
    "plot_compare",
    "write_compare",
    "cmd_report",
    "cmd_compare",
    "cmd_transfer",
    "add_subparsers",
    "main",
]

DEFAULT_OUT_DIR = "reports"
UNKNOWN = "unknown"
# Per-hardware sizes: how much fits and runs fast on a device, not what the model learns.
# A transfer keeps the host's values for these unless told otherwise.
HOST_SPECIFIC = ("DEVICE_BATCH_SIZE",)
MAX_PLOT_LABELS = 30
TRANSFER = "transfer from "  # how a transfer run's description starts (a crashed one is logged as crash)


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
        return _path_label(self.path)

    @property
    def protocol(self) -> str:
        return _common(r.protocol for r in self.rows)

    @property
    def evaluator_hash(self) -> str:
        return _common(r.evaluator_hash for r in self.rows)

    @property
    def backend(self) -> str:
        return _common(r.backend for r in self.rows)

    @property
    def device(self) -> str:
        return _common(r.device for r in self.rows)


def _common(values) -> str:
    counts = Counter(v for v in values if v)
    return counts.most_common(1)[0][0] if counts else ""


def _path_label(path: Path) -> str:
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
        rows = [r for r in (_row_from_run(d) for d in run_dirs) if r is not None]
        source = Source(path, rows, run_dirs[0].parent)
    else:
        raise ReportError(f"{path} does not exist; run the loop first (python loop.py) or pass the results "
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


def _row_from_run(run_dir: Path) -> Row | None:
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
    ev, sm = data.get("eval") or {}, data.get("summary") or {}
    val = _num(ev.get("val_bpb", sm.get("val_bpb"))) or 0.0
    status = "invalid" if ev.get("valid") is False else "discard" if val > 0 else "crash"
    vram = _num(sm.get("peak_vram_mb"))
    return Row(
        commit="",
        val_bpb=val,
        memory_gb=round(vram / 1024, 1) if vram else 0.0,
        status=status,
        description=f"run {run_dir.name}",
        backend=str(sm.get("backend", "")),
        device=str(sm.get("device", "")),
        protocol=str(ev.get("protocol", sm.get("protocol", ""))),
        evaluator_hash=str(ev.get("evaluator_hash", "")),
        training_seconds=_num(sm.get("training_seconds")),
        num_steps=_int(sm.get("num_steps")),
        mfu_percent=_num(sm.get("mfu_percent")),
        num_params_M=_num(sm.get("num_params_M")),
        wall_seconds=_num(sm.get("total_seconds")),
        holdout_bpb=_num(ev.get("holdout_bpb")),
        hyperparams=sm.get("hyperparams") if isinstance(sm.get("hyperparams"), dict) else {},
        run=int(run_dir.name) if run_dir.name.isdigit() else None,
    )


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(value) -> int | None:
    v = _num(value)
    return int(v) if v is not None else None


def _keep_one_run(source: Source, branch: str | None = None) -> None:
    """Keep the rows of one branch under one protocol and evaluator: `branch`, else the latest one's."""
    rows = [r for r in source.rows if r.branch == branch] if branch else source.rows
    if branch and not rows:
        names = sorted({r.branch for r in source.rows if r.branch})
        raise ReportError(f"{source.path} has no rows of branch {branch}; its branches are: "
                          f"{', '.join(names) or 'none recorded'}.")
    measured = [r for r in rows if _measured(r)] or rows
    if not measured:
        return
    last = measured[-1]
    key = (last.protocol, last.evaluator_hash, branch or last.branch)

    def same(r: Row) -> bool:  # a field a row did not record does not set it apart
        return all(not mine or mine == want for mine, want in zip((r.protocol, r.evaluator_hash, r.branch), key))

    keep = [same(r) for r in source.rows]
    source.left_out = [r for r, k in zip(source.rows, keep) if not k]
    source.rows = [r for r, k in zip(source.rows, keep) if k]


def _run_summary(source: Source, row: Row) -> dict:
    if source.runs_dir is None or row.run is None:
        return {}
    return _read_json(source.runs_dir / str(row.run) / "result.json").get("summary") or {}


# ---------------------------------------------------------------------------
# Summary numbers
# ---------------------------------------------------------------------------


@dataclass
class Summary:
    """What a report says about one source; indices are 1-based experiment numbers.

    `baselines` are the baseline runs (the loop repeats it to measure noise) and `baseline_bpb` their
    mean, where the loop's running best starts; `kept` are the kept changes after them, in order.
    """

    counts: Counter
    baselines: list[tuple[int, Row]]
    baseline_bpb: float | None
    kept: list[tuple[int, Row]]
    best: tuple[int, Row] | None  # the best config: the best kept change, else the first baseline run
    best_bpb: float | None
    transfers: list[tuple[int, Row]]
    running_best: list[float | None]  # after each experiment
    wall_seconds: float | None
    cost_usd: float | None
    tokens_in: int | None
    tokens_out: int | None

    @property
    def noise(self) -> float | None:
        """Spread (max - min) of the baseline runs, when there are two or more."""
        vals = [r.val_bpb for _, r in self.baselines]
        return max(vals) - min(vals) if len(vals) > 1 else None


def _measured(row: Row) -> bool:
    return row.status in MEASURED and row.val_bpb > 0


def _is_baseline(row: Row) -> bool:
    # the loop notes its baseline runs; the reference's files (no note) call the first one "baseline"
    return row.note.startswith("baseline") if row.note else row.description.lower().startswith("baseline")


def summarize(source: Source) -> Summary:
    """Counts, baseline, kept changes in order, best config and the running best, as the loop saw them.

    Baseline rows are the kept rows noted as baseline runs (else the first kept row); the running
    best starts at their mean and moves to each better kept change. Where no row is marked `keep`
    (run folders without a status) the first measured run is the baseline and every later run that
    beats the best so far counts as kept.
    """
    rows = source.rows
    indexed = list(enumerate(rows, start=1))
    keeps = [(i, r) for i, r in indexed if r.status == "keep" and r.val_bpb > 0]
    if keeps:
        baselines = [(i, r) for i, r in keeps if _is_baseline(r)] or keeps[:1]
    else:  # no statuses recorded: every measurement is a candidate
        keeps = [(i, r) for i, r in indexed if _measured(r) and r.status != "transfer"]
        baselines = keeps[:1]
    base_ids, keep_ids = {i for i, _ in baselines}, {i for i, _ in keeps}
    kept, seen, best, running = [], [], None, []
    for i, r in indexed:
        if i in base_ids:
            seen.append(r.val_bpb)
            best = sum(seen) / len(seen) if not kept else min(best, r.val_bpb)
        elif i in keep_ids and (best is None or r.val_bpb < best):
            kept.append((i, r))
            best = r.val_bpb
        running.append(best)
    base_bpb = sum(r.val_bpb for _, r in baselines) / len(baselines) if baselines else None
    top = min(kept, key=lambda ir: ir[1].val_bpb) if kept else (baselines[0] if baselines else None)
    best_bpb = top[1].val_bpb if kept else base_bpb
    return Summary(
        counts=Counter(r.status for r in rows),
        baselines=baselines,
        baseline_bpb=base_bpb,
        kept=kept,
        best=top,
        best_bpb=best_bpb,
        transfers=[(i, r) for i, r in indexed if r.status == "transfer" or r.description.startswith(TRANSFER)],
        running_best=running,
        wall_seconds=_total(r.wall_seconds for r in rows),
        cost_usd=_total(r.agent_cost_usd for r in rows),
        tokens_in=_total(r.agent_tokens_in for r in rows),
        tokens_out=_total(r.agent_tokens_out for r in rows),
    )


def _total(values):
    present = [v for v in values if v is not None]
    return sum(present) if present else None


# ---------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------


def _bpb(v: float | None) -> str:
    return f"{v:.6f}" if v else UNKNOWN


def _gain(new: float | None, old: float | None) -> str:
    """Signed change and percentage, e.g. '-0.012345 (-1.24%)'; lower is better."""
    if not new or not old:
        return UNKNOWN
    d = new - old
    return f"{d:+.6f} ({100 * d / old:+.2f}%)"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return UNKNOWN
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, m = divmod(s // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s % 60:02d} s"


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    s = str(text) if text not in (None, "") else UNKNOWN
    return s.replace("|", "\\|").replace("\n", " ")


def _value(v) -> str:
    if v is None:
        return "None"
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _heading_context(source: Source) -> str:
    return (f"protocol {source.protocol or UNKNOWN} · {source.backend or 'backend ' + UNKNOWN} · "
            f"{source.device or 'device ' + UNKNOWN}")


# ---------------------------------------------------------------------------
# report: one results file -> progress PNG + Markdown summary
# ---------------------------------------------------------------------------


def progress_markdown(source: Source, summary: Summary, png_name: str | None = None) -> str:
    """The Markdown summary of one source (links the plot when `png_name` is given)."""
    s, lines = summary, []
    lines.append(f"# Research progress: {_heading_context(source)}")
    lines.append("")
    if png_name:
        lines += [f"![progress]({png_name})", ""]
    branch = _common(r.branch for r in source.rows)
    lines.append(f"Source: `{source.path}`" + (f" · branch `{branch}`" if branch else "") +
                 f" · evaluator `{source.evaluator_hash or UNKNOWN}`")
    if source.left_out:
        other = sorted({f"{r.branch or 'no branch'} / {r.protocol or UNKNOWN}" for r in source.left_out})
        lines.append(f"{_plural(len(source.left_out), 'row')} of other branches or protocols ({', '.join(other)}) "
                     "left out; pick a branch with --branch.")
    lines.append("")
    counts = ", ".join(f"{n} {st}" for st, n in sorted(s.counts.items(), key=lambda kv: (-kv[1], kv[0])))
    lines += ["| | |", "|---|---|"]
    if s.best:
        runs = ", ".join(f"#{i}" for i, _ in s.baselines)
        spread = f"; spread {s.noise:.6f}" if s.noise is not None else ""
        lines.append(f"| baseline val_bpb | {_bpb(s.baseline_bpb)} ({_plural(len(s.baselines), 'run')}: {runs}"
                     f"{spread}) |")
        ti, t = s.best
        where = f"#{ti}, {_cell(t.commit or UNKNOWN)}" if s.kept else "the baseline: no change kept yet"
        lines.append(f"| best val_bpb | **{_bpb(s.best_bpb)}** ({where}) |")
        lines.append(f"| gain | {_gain(s.best_bpb, s.baseline_bpb)} |")
        base_hold = _mean(r.holdout_bpb for _, r in s.baselines)
        best_hold = t.holdout_bpb if s.kept else base_hold
        if base_hold or best_hold:
            lines.append(f"| holdout_bpb, baseline → best | {_bpb(base_hold)} → {_bpb(best_hold)} "
                         f"({_gain(best_hold, base_hold)}) |")
    else:
        lines.append("| best val_bpb | none yet: no experiment has finished with a measurement |")
    lines.append(f"| experiments | {len(source.rows)} ({counts}) |")
    lines.append(f"| wall time (sum of experiments) | {_duration(s.wall_seconds)} |")
    stamps = sorted(r.timestamp for r in source.rows if r.timestamp)
    if stamps:
        lines.append(f"| first → last experiment | {_cell(stamps[0])} → {_cell(stamps[-1])} |")
    cost = f"${s.cost_usd:.2f}" if s.cost_usd is not None else UNKNOWN
    tokens = (f"{s.tokens_in:,} tokens in, {s.tokens_out or 0:,} out" if s.tokens_in is not None else
              f"tokens {UNKNOWN}")
    lines.append(f"| agent cost | {cost} ({tokens}) |")
    lines.append("")
    if s.baselines:
        lines += _kept_table(s)
    if s.transfers:
        lines += _transfer_table(s)
    if s.best and s.best[1].hyperparams:
        lines += ["## Best config", "", "| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(_value(v))} |" for k, v in sorted(s.best[1].hyperparams.items())]
        lines.append("")
    return "\n".join(lines)


def _kept_table(s: Summary) -> list[str]:
    """Baseline runs, then the kept changes in order with their gains; holdout columns when measured."""
    holdout = any(r.holdout_bpb for _, r in s.baselines + s.kept)
    head = "| # | commit | change | val_bpb | vs previous best | vs baseline |"
    lines = ["## Kept changes", "", head + (" holdout_bpb | holdout vs baseline |" if holdout else ""),
             "|---" * (8 if holdout else 6) + "|"]
    base_hold = _mean(r.holdout_bpb for _, r in s.baselines)
    for i, r in s.baselines:
        cells = [str(i), r.commit, r.description, _bpb(r.val_bpb), "—", "—"] + ([_bpb(r.holdout_bpb), "—"]
                                                                              if holdout else [])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for i, r in s.kept:
        before = s.running_best[i - 2]
        cells = [str(i), r.commit, r.description, _bpb(r.val_bpb), _gain(r.val_bpb, before),
                 _gain(r.val_bpb, s.baseline_bpb)]
        if holdout:
            cells += [_bpb(r.holdout_bpb), _gain(r.holdout_bpb, base_hold)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines.append("")
    best_hold = s.best[1].holdout_bpb if s.kept else None
    if not s.kept:
        lines.append("No change has been kept yet.")
    elif not holdout:
        lines.append("No holdout_bpb recorded for these runs, so whether the gains generalise beyond the "
                     "validation shard is unknown.")
    elif best_hold and base_hold and s.best_bpb < s.baseline_bpb:
        d_val, d_hold = s.best_bpb - s.baseline_bpb, best_hold - base_hold
        lines.append(f"The holdout split never takes part in a decision. From baseline to best, val_bpb changes "
                     f"by {d_val:+.6f} and holdout_bpb by {d_hold:+.6f} ({100 * d_hold / d_val:.0f}% of the val "
                     "gain); a much smaller holdout gain means the loop has partly fitted the validation shard.")
    else:
        lines.append("The holdout split never takes part in a decision; compare its column with val_bpb to see "
                     "whether the gains generalise.")
    lines.append("")
    return lines


def _mean(values) -> float | None:
    present = [v for v in values if v]
    return sum(present) / len(present) if present else None


def _transfer_table(s: Summary) -> list[str]:
    lines = ["## Transfers", "",
             "| # | change | val_bpb | host's best before it | carried? |", "|---|---|---|---|---|"]
    noise = s.noise or 0.0  # the baseline runs' spread: a smaller difference says nothing
    for i, r in s.transfers:
        before = s.running_best[i - 2] if i >= 2 else None
        if r.status != "transfer" or not r.val_bpb:
            verdict = f"no: {r.status}"
        elif before is None:
            verdict = UNKNOWN
        elif r.val_bpb < before - noise:
            verdict = f"yes: {r.val_bpb - before:+.6f}, better than the host's best"
        elif r.val_bpb < before + noise:
            verdict = f"as good: {r.val_bpb - before:+.6f}, within the baseline noise ±{noise:.6f}"
        else:
            verdict = f"no: {r.val_bpb - before:+.6f}, worse than the host's best"
        lines.append(f"| {i} | {_cell(r.description)} | {_bpb(r.val_bpb)} | {_bpb(before)} | {verdict} |")
    lines.append("")
    return lines


_STYLE = {
    "discard": dict(marker="o", s=14, color="#9e9e9e", alpha=0.6, label="discarded", zorder=2),
    "baseline": dict(marker="s", s=40, color="#14532d", label="baseline run", zorder=4),
    "keep": dict(marker="o", s=46, color="#2e9d4a", edgecolors="#14532d", linewidths=0.8, label="kept", zorder=4),
    "transfer": dict(marker="D", s=40, color="#1f6fd1", edgecolors="#0b2e5c", linewidths=0.8,
                     label="transferred config", zorder=4),
}
_BAND = {  # statuses without a measurement, drawn in a band at the bottom of the axes
    "crash": dict(marker="x", s=40, color="#d62728", linewidths=1.6, label="crash"),
    "invalid": dict(marker="v", s=34, color="#8e44ad", label="invalid (non-causal)"),
    "rejected": dict(marker="|", s=60, color="#e67e22", linewidths=1.6, label="rejected (edited locked files)"),
}


def _y_limits(source: Source, summary: Summary) -> tuple[float, float]:
    values = [r.val_bpb for r in source.rows if _measured(r)]
    best = summary.best_bpb or min(values)
    base = summary.baseline_bpb or max(values)
    span = max(base - best, 0.02 * best, 1e-4)
    typical = sorted(values)[int(0.9 * (len(values) - 1))]
    # far-off failures would flatten the curve: they go on the top edge as triangles
    top = max(min(max(values), max(base + 0.25 * span, typical)), base)
    lo = min(values)
    height = top - lo or span
    return lo - 0.05 * height, top + 0.06 * height


def plot_progress(source: Source, summary: Summary, out_png: Path) -> Path:
    """Draw every experiment vs its index: discards grey, kept ones green and labelled, the running
    best as a step line, transfers blue; crashes (no val_bpb) as red crosses in a strip below the
    axes; values far above the baseline as triangles on the top edge."""
    from matplotlib.ticker import MaxNLocator

    rows = source.rows
    n = len(rows)
    kept_ids = {i for i, _ in summary.kept}
    base_ids = {i for i, _ in summary.baselines}
    measured = [r for r in rows if _measured(r)]
    lo, hi = _y_limits(source, summary) if measured else (0.0, 1.0)
    groups: dict[str, list[tuple[int, float]]] = {}
    off_scale = []
    for i, r in enumerate(rows, start=1):
        if not _measured(r):
            groups.setdefault(r.status if r.status in _BAND else "crash", []).append((i, 0.5))
        elif r.val_bpb > hi:
            off_scale.append(i)
        else:
            kind = ("baseline" if i in base_ids else "keep" if i in kept_ids else
                    "transfer" if r.status == "transfer" else "discard")
            groups.setdefault(kind, []).append((i, r.val_bpb))
    has_band = any(k in groups for k in _BAND)
    if has_band:
        fig = _figure(13, 6.8)
        ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[14, 1], hspace=0.04))
    else:
        fig = _figure(13, 6.5)
        ax = fig.subplots()
        strip = None
    ax.set_ylim(lo, hi)
    if not measured:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no experiment has a val_bpb yet", transform=ax.transAxes, ha="center",
                color="#555555")
    ax.set_xlim(0.3, max(n, 2) + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for kind, style in _STYLE.items():
        if kind in groups:
            xs, ys = zip(*groups[kind])
            ax.scatter(xs, ys, **style)
    if off_scale:
        ax.scatter(off_scale, [hi - 0.012 * (hi - lo)] * len(off_scale), marker="^", s=22, color="#9e9e9e",
                   label=f"above {hi:.4f} (off scale)", zorder=2)
    xs = [i for i, b in enumerate(summary.running_best, start=1) if b is not None]
    if xs:
        ys = [summary.running_best[i - 1] for i in xs]
        ax.step(xs + [n + 0.7], ys + [ys[-1]], where="post", color="#2e9d4a", linewidth=1.8, alpha=0.9,
                label="running best", zorder=3)
    handles, labels = ax.get_legend_handles_labels()
    if strip is not None:
        strip.set_facecolor("#fdecea")
        strip.set_ylim(0, 1)
        strip.set_yticks([])
        strip.set_ylabel("no\nval_bpb", rotation=0, ha="right", va="center", fontsize=8)
        for kind, style in _BAND.items():
            if kind in groups:
                xs_, ys_ = zip(*groups[kind])
                strip.scatter(xs_, ys_, zorder=3, clip_on=False, **style)
        h, l = strip.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
        strip.set_xlabel("experiment #")
        strip.grid(True, axis="x", alpha=0.25)
    else:
        ax.set_xlabel("experiment #")
    title = f"autoresearch progress: {_heading_context(source)}"
    if summary.best:
        b, t = summary.baseline_bpb, summary.best_bpb
        subtitle = (f"{_plural(n, 'experiment')}, {len(summary.kept)} kept · val_bpb {b:.6f} → {t:.6f} "
                    f"({100 * (t - b) / b:+.2f}%)")
    else:
        subtitle = f"{_plural(n, 'experiment')}, none measured yet"
    ax.set_title(f"{title}\n{subtitle}", fontsize=12)
    ax.set_ylabel(f"val_bpb (lower is better), protocol {source.protocol or UNKNOWN}")
    ax.grid(True, alpha=0.25)
    legend = ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.09)
    _label_points(fig, ax, summary, [legend], hi)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by Agg, without pyplot's global state (no window, no backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _label_points(fig, ax, summary: Summary, artists: list, top: float) -> None:
    """Label kept changes (green) and transfers (blue) with their short description, trying offsets
    until a label overlaps no other label, legend or kept point (else the least overlapping spot)."""
    from matplotlib.text import Text

    kept = summary.kept
    if len(kept) > MAX_PLOT_LABELS:  # label the largest steps; the Markdown lists them all
        steps = {i: (summary.running_best[i - 2] or r.val_bpb) - r.val_bpb for i, r in kept}
        chosen = set(sorted(steps, key=steps.get, reverse=True)[:MAX_PLOT_LABELS])
        kept = [(i, r) for i, r in kept if i in chosen]
    points = [(i, r.val_bpb, _short(r.description, 34), "#14532d", "#2e9d4a") for i, r in kept]
    points += [(i, r.val_bpb, _short(r.description.split(":")[0], 40), "#0b2e5c", "#1f6fd1")
               for i, r in summary.transfers if 0 < r.val_bpb <= top]  # where it came from

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [a.get_window_extent(renderer) for a in artists]
    for _, r in summary.baselines + summary.kept:  # the markers themselves
        x, y = ax.transData.transform((_, r.val_bpb))
        placed.append(_Box(x - 5, y - 5, x + 5, y + 5))
    offsets = [(dx, dy) for dy in (10, -14, 24, -28, 38, -42, 52, -56, 66, -70) for dx in (8, -8)]
    for i, y, label, color, line in sorted(points, key=lambda p: p[0]):
        best_text, best_cost, best_box = None, None, None
        for dx, dy in offsets:
            text = ax.annotate(label, (i, y), xytext=(dx, dy),
                               textcoords="offset points", fontsize=7.5, color=color,
                               ha="left" if dx > 0 else "right", va="center",
                               arrowprops=dict(arrowstyle="-", color=line, lw=0.5, alpha=0.7),
                               bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.75), zorder=5)
            # the text alone: an Annotation's own extent also covers its leader line
            text.update_positions(renderer)
            x0, y0, x1, y1 = Text.get_window_extent(text, renderer).extents
            box = _Box(x0 - 2, y0 - 2, x1 + 2, y1 + 2)
            cost = sum(_overlap(box, p) for p in placed)
            outside = (max(0.0, box.x1 - frame.x1) + max(0.0, frame.x0 - box.x0)) * box.height + \
                      (max(0.0, box.y1 - frame.y1) + max(0.0, frame.y0 - box.y0)) * box.width
            cost += 4 * outside + 0.01 * abs(dy)  # prefer spots close to the point
            if best_cost is None or cost < best_cost:
                if best_text is not None:
                    best_text.remove()
                best_text, best_cost, best_box = text, cost, box
            else:
                text.remove()
            if cost < 1:
                break
        placed.append(best_box)


@dataclass
class _Box:
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def write_report(path: str | Path, out_dir: str | Path, name: str = "report",
                 branch: str | None = None) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.md` and `<out_dir>/<name>.png` for one results file; returns both paths.

    Raises ReportError when the file is missing or holds no experiments.
    """
    source = load_source(path, branch)
    if not source.rows:
        raise ReportError(f"No experiments in {path} yet; run `python loop.py` (or `loop.py try`) first.")
    summary = summarize(source)
    out_dir = Path(out_dir)
    png = plot_progress(source, summary, out_dir / f"{name}.png")
    md = out_dir / f"{name}.md"
    md.write_text(progress_markdown(source, summary, png.name) + "\n", encoding="utf-8")
    return md, png


# ---------------------------------------------------------------------------
# compare: best config per machine, side by side
# ---------------------------------------------------------------------------


def _check_comparable(sources: list[Source]) -> None:
    for s in sources:
        if not s.protocol or not s.evaluator_hash:
            raise ReportError(f"{s.path} does not record its protocol and evaluator hash (a reference-format "
                              "file?), so its val_bpb cannot be checked as comparable; compare results "
                              "written by this loop.")
    protocols = {s.protocol for s in sources}
    if len(protocols) > 1:
        which = ", ".join(f"{s.path}: {s.protocol}" for s in sources)
        raise ReportError(f"Refusing to compare results from different protocols ({which}); val_bpb is "
                          "comparable only under one protocol, so run each machine under the same one.")
    hashes = {s.evaluator_hash for s in sources}
    if len(hashes) > 1:
        which = ", ".join(f"{s.path}: {s.evaluator_hash}" for s in sources)
        raise ReportError(f"Refusing to compare results from different evaluator versions ({which}); "
                          "update both checkouts to the same prepare.py and rerun.")


def _labels(sources: list[Source]) -> list[str]:
    labels = [s.label for s in sources]
    for lab, n in Counter(labels).items():
        if n > 1:
            labels = [f"{x} [{_path_label(s.path)}]" if x == lab else x for x, s in zip(labels, sources)]
    seen = Counter()
    out = []
    for x in labels:  # still equal (same device, same folder name): number them
        seen[x] += 1
        out.append(x if labels.count(x) == 1 else f"{x} #{seen[x]}")
    return out


def _tokens_m(source: Source, row: Row) -> str:
    sm = _run_summary(source, row)
    if _num(sm.get("total_tokens_M")) is not None:
        return f"{float(sm['total_tokens_M']):.1f}"
    batch = _num(row.hyperparams.get("TOTAL_BATCH_SIZE"))
    if row.num_steps and batch:  # every step consumes exactly TOTAL_BATCH_SIZE tokens
        return f"{row.num_steps * batch / 1e6:.1f}"
    return UNKNOWN


def compare_markdown(sources: list[Source], png_name: str | None = None) -> str:
    """Side-by-side Markdown table of the best config of each source; bold marks the lowest val_bpb and
    every hyperparameter whose value differs. Raises ReportError for incomparable sources."""
    _check_comparable(sources)
    labels = _labels(sources)
    summaries = [summarize(s) for s in sources]
    for s, summ in zip(sources, summaries):
        if summ.best is None:
            raise ReportError(f"{s.path} has no finished experiment to compare; let its loop run first.")
    bests = [summ.best[1] for summ in summaries]
    vals = [summ.best_bpb for summ in summaries]
    low = min(vals)

    def row(name: str, cells: list[str]) -> str:
        return f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |"

    lines = [f"# Best config per hardware: protocol {sources[0].protocol}, evaluator {sources[0].evaluator_hash}",
             ""]
    if png_name:
        lines += [f"![running best]({png_name})", ""]
    lines += ["| | " + " | ".join(_cell(x) for x in labels) + " |", "|---" * (len(sources) + 1) + "|"]
    lines.append(row("source", [f"`{s.path}`" for s in sources]))
    lines.append(row("backend", [s.backend for s in sources]))
    lines.append(row("device", [s.device for s in sources]))
    lines.append(row("best val_bpb", [f"**{_bpb(v)}**" if v == low else _bpb(v) for v in vals]))
    lines.append(row("holdout_bpb", [_bpb(r.holdout_bpb) for r in bests]))
    lines.append(row("baseline val_bpb", [_bpb(summ.baseline_bpb) for summ in summaries]))
    lines.append(row("gain over baseline", [_gain(summ.best_bpb, summ.baseline_bpb) for summ in summaries]))
    lines.append(row("experiments (kept changes)", [f"{len(s.rows)} ({len(summ.kept)})"
                                                    for s, summ in zip(sources, summaries)]))
    lines.append(row("steps", [r.num_steps for r in bests]))
    lines.append(row("tokens (M)", [_tokens_m(s, r) for s, r in zip(sources, bests)]))
    lines.append(row("MFU %", [f"{r.mfu_percent:.2f}" if r.mfu_percent is not None else "n/a" for r in bests]))
    lines.append(row("memory (GB)", [f"{r.memory_gb:.1f}" if r.memory_gb else UNKNOWN for r in bests]))
    lines.append(row("params (M)", [f"{r.num_params_M:.1f}" if r.num_params_M is not None else None
                                    for r in bests]))
    lines.append(row("training seconds", [f"{r.training_seconds:.1f}" if r.training_seconds else None
                                          for r in bests]))
    lines.append(row("commit", [r.commit for r in bests]))
    lines.append(row("change", [r.description for r in bests]))
    names = sorted({k for r in bests for k in r.hyperparams})
    if names:
        lines.append("| _hyperparameters_ |" + " |" * len(bests))
    differing = []
    for name in names:
        values = [_value(r.hyperparams[name]) if name in r.hyperparams else "—" for r in bests]
        if len(set(values)) > 1:
            differing.append(name)
            lines.append(row(f"**{name}**", [f"**{v}**" for v in values]))
        else:
            lines.append(row(name, values))
    lines.append("")
    if not names:
        lines.append("No hyperparameters recorded, so the configs cannot be compared beyond the metrics.")
    elif differing:
        lines.append(f"{len(differing)} of {len(names)} hyperparameters differ (bold): {', '.join(differing)}. "
                     "To test whether one machine's winner carries over, run `loop.py transfer --from "
                     "<its results.tsv>` on the other.")
    else:
        lines.append(f"All {len(names)} hyperparameters are the same.")
    lines.append("")
    return "\n".join(lines)


def plot_compare(sources: list[Source], out_png: Path) -> Path:
    """Two panels sharing the experiment axis: each source's running best val_bpb, and the same as a
    percentage of its own baseline (machines start at very different levels)."""
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    fig = _figure(14, 6)
    ax, rel = fig.subplots(1, 2)
    colors = colormaps["tab10"].colors
    for k, (source, label) in enumerate(zip(sources, _labels(sources))):
        summ = summarize(source)
        xs = [i for i, b in enumerate(summ.running_best, start=1) if b is not None]
        if not xs:
            continue
        color = colors[k % len(colors)]
        ys = [summ.running_best[i - 1] for i in xs] + [summ.running_best[-1]]
        xs = xs + [len(source.rows)]
        base = summ.baseline_bpb
        kept_x, kept_y = [i for i, _ in summ.kept], [r.val_bpb for _, r in summ.kept]
        ax.step(xs, ys, where="post", color=color, linewidth=2,
                label=f"{label}: best {summ.best_bpb:.6f} ({len(summ.kept)} kept of {len(source.rows)})")
        ax.scatter(kept_x, kept_y, color=color, s=22, zorder=3)
        rel.step(xs, [100 * (y - base) / base for y in ys], where="post", color=color, linewidth=2)
        rel.scatter(kept_x, [100 * (y - base) / base for y in kept_y], color=color, s=22, zorder=3)
    ax.set_ylabel("best val_bpb so far (lower is better)")
    rel.set_ylabel("change from own baseline (%)")
    rel.axhline(0, color="#888888", linewidth=0.8)
    for a in (ax, rel):
        a.set_xlabel("experiment #")
        a.grid(True, alpha=0.25)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Running best per hardware: protocol {sources[0].protocol or UNKNOWN}, "
                 f"evaluator {sources[0].evaluator_hash or UNKNOWN}", fontsize=12)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 2), fontsize=9, frameon=False)
    rows_of_legend = math.ceil(len(labels) / 2)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * rows_of_legend, 1, 0.96))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def write_compare(paths: list[str | Path], out_dir: str | Path, name: str = "compare") -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.md` and `<out_dir>/<name>.png` comparing the sources; returns both paths.

    Raises ReportError for fewer than two sources, empty ones, or different protocols/evaluators
    (nothing is written then)."""
    if len(paths) < 2:
        raise ReportError("compare needs at least two results files or run folders, e.g. "
                          "`loop.py compare h100/results.tsv mac/results.tsv`.")
    sources = [load_source(p) for p in paths]
    for s in sources:
        if not s.rows:
            raise ReportError(f"No experiments in {s.path} yet; nothing to compare.")
    out_dir = Path(out_dir)
    text = compare_markdown(sources, f"{name}.png")  # raises before anything is written
    png = plot_compare(sources, out_dir / f"{name}.png")
    md = out_dir / f"{name}.md"
    md.write_text(text + "\n", encoding="utf-8")
    return md, png


# ---------------------------------------------------------------------------
# transfer: another machine's best config, run once on this host
# ---------------------------------------------------------------------------


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
        out.append("  applied: " + (", ".join(f"{k}={_value(v)}" for k, v in self.changes.items()) or "nothing"))
        if self.same:
            out.append("  already the same here: " + ", ".join(self.same))
        for name, (host, theirs) in self.kept.items():
            out.append(f"  kept from this host (per-hardware size): {name}={_value(host)} (theirs: {_value(theirs)})")
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
    from research.guards import child_env
    from research.hparams import HyperparamError, conditions, parse_block, probe_conditions

    try:
        conds = conditions(parse_block(text))
        env = child_env(AUTORESEARCH_BACKEND=session.host.backend, AUTORESEARCH_PROTOCOL=session.protocol.name)
        return probe_conditions(session.repo, session.trainer, conds, env)
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
    changed = ", ".join(f"{k}={_value(v)}" for k, v in plan.changes.items())
    description = _short(f"{TRANSFER}{plan.source.label} {plan.row.commit}: {changed}", 300)
    row = experiment.run_experiment(session, description, record_as="transfer").row
    if row.status != "transfer":
        print(f"transfer run ended as {row.status}: {row.note}")
        return 1
    off = [f"{k} (ran with {_value(row.hyperparams[k])})" for k, v in plan.changes.items()
           if k in row.hyperparams and not _same_value(v, row.hyperparams[k])]
    if off:
        print("  warning: the trainer did not use these transferred values: " + ", ".join(off))
    if best is None:
        verdict = "no baseline on this branch to compare with"
    else:  # the loop's own rule: a win must beat the best by more than the noise floor
        would, note, _ = experiment.decide(row.val_bpb, best, session.noise_floor)
        verdict = f"{'it carried' if would == 'keep' else 'it did not carry'} ({note})"
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


# ---------------------------------------------------------------------------
# Command-line entry points
# ---------------------------------------------------------------------------


def _report_names(paths: list[Path]) -> list[str]:
    if len(paths) == 1:
        return ["report"]
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "-", _path_label(p)) or "results" for p in paths]
    return [f"report-{n}" if names.count(n) == 1 else f"report-{n}-{k}" for k, n in enumerate(names, start=1)]


def cmd_report(paths: list[str | Path] | None = None, out_dir: str | Path = DEFAULT_OUT_DIR,
               branch: str | None = None) -> int:
    """`loop.py report`: a PNG and a Markdown summary per results file (default ./results.tsv).

    Prints the paths written. A missing or empty file prints one sentence and writes nothing; the
    exit code is 1 when no file could be reported, else 0.
    """
    paths = [Path(p) for p in (paths or ["results.tsv"])]
    written = 0
    for path, name in zip(paths, _report_names(paths)):
        try:
            md, png = write_report(path, out_dir, name, branch)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        print(md)
        print(png)
        written += 1
    return 0 if written else 1


def cmd_compare(paths: list[str | Path], out_dir: str | Path = DEFAULT_OUT_DIR) -> int:
    """`loop.py compare A B ...`: compare.md + compare.png; prints their paths. Exit 1 with one sentence
    when the inputs cannot be compared (different protocols or evaluators, empty files)."""
    try:
        md, png = write_compare(list(paths), out_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(md)
    print(png)
    return 0


def add_subparsers(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] = ()) -> None:
    """Register `report`, `compare` and `transfer` on loop.py's subparsers.

    Each sets `func`, called as `args.func(args)` and returning the exit code; none needs a session
    opened by the caller (`transfer` opens its own). `parents` are loop.py's shared option parsers,
    given to `transfer` (it reads --backend, --protocol, --baseline-runs, --min-noise and
    --timeout-margin from them); without any, `transfer` gets its own --backend and --protocol.
    """
    out_help = f"where to write (default: {DEFAULT_OUT_DIR}/)"
    p = subparsers.add_parser("report", help="progress plot (PNG) and Markdown summary of results files")
    p.add_argument("paths", nargs="*", metavar="RESULTS", help="results files (default: ./results.tsv)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=out_help)
    p.add_argument("--branch", help="report this branch (default: the branch of the latest experiment)")
    p.set_defaults(func=lambda a: cmd_report(a.paths, a.out_dir, a.branch))

    p = subparsers.add_parser("compare", help="best config per hardware side by side (same protocol only)")
    p.add_argument("paths", nargs="+", metavar="RESULTS", help="results files or run folders, one per machine")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=out_help)
    p.set_defaults(func=lambda a: cmd_compare(a.paths, a.out_dir))

    p = subparsers.add_parser("transfer", parents=list(parents),
                              help="run another machine's best config once here, logged as status transfer")
    p.add_argument("--from", dest="from_path", required=True, metavar="RESULTS",
                   help="the other machine's results.tsv (or its runs/ folder)")
    p.add_argument("--keep", action="append", default=[], metavar="NAME",
                   help=f"keep this host's value of NAME (repeatable; {', '.join(HOST_SPECIFIC)} is kept "
                        "unless --apply-all)")
    p.add_argument("--apply-all", action="store_true", help=f"take every value, {', '.join(HOST_SPECIFIC)} too")
    p.add_argument("--dry-run", action="store_true", help="print what would change; change and run nothing")
    if not parents:
        p.add_argument("--backend", help="cuda|rocm|mps|mlx|cpu (default: detected, or AUTORESEARCH_BACKEND)")
        p.add_argument("--protocol", help="protocol name (default: AUTORESEARCH_PROTOCOL or the prepared one)")
    p.set_defaults(func=_transfer_from_args)


def _transfer_from_args(args: argparse.Namespace) -> int:
    from research.session import Settings

    names = ("baseline_runs", "min_noise", "timeout_margin")
    settings = Settings(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    return cmd_transfer(args.from_path, backend=args.backend, protocol=args.protocol, settings=settings,
                        keep=args.keep, apply_all=args.apply_all, dry_run=args.dry_run)


def main(argv: list[str] | None = None) -> int:
    """`python -m research.report report|compare|transfer ...` (the same commands as loop.py)."""
    parser = argparse.ArgumentParser(prog="python -m research.report", description=__doc__.splitlines()[0])
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
