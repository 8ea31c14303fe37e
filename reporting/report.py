"""`loop.py report`: one results file as a progress plot (PNG) and a Markdown summary; and the
command-line wiring of report, compare (reporting/compare.py) and transfer (reporting/transfer.py).

The plot shows every experiment at its number (runs/<n>, as the console labels it): discards grey,
baseline runs and kept changes green and labelled, the running best, transfers blue, and runs without
a measurement in a strip below, a rejection under its reason. The Markdown gives baseline -> best,
the kept changes with their gains, the kept configs on the holdout split, wall time and agent cost.
Both count experiments with `Summary.tally` (reporting/summary.py holds the definitions).

matplotlib is imported only when a plot is drawn (and without pyplot), so importing this module is cheap.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from reporting import compare, transfer
from reporting.summary import (DEFAULT_OUT_DIR, UNKNOWN, ReportError, Source, Summary, bpb_text, cell, common,
                               gain_text, load_source, mean, measured, new_figure, path_label, plural, shorten,
                               summarize, value_text)
from research.ledger import ABORT_AUDIT, ABORT_OFF
from research.results import Kind, Row

__all__ = [
    "progress_markdown",
    "progress_figure",
    "plot_progress",
    "write_report",
    "cmd_report",
    "add_subparsers",
    "main",
]

MAX_PLOT_LABELS = 30
MAX_REJECTION_REASONS = 4  # legend entries for rejections; rarer reasons share one


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return UNKNOWN
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, m = divmod(s // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s % 60:02d} s"


def _heading_context(source: Source) -> str:
    budget = budget_text(source)
    return (f"protocol {source.protocol or UNKNOWN}{' · ' + budget if budget else ''} · "
            f"{source.backend or 'backend ' + UNKNOWN} · {source.device or 'device ' + UNKNOWN}")


def budget_text(source: Source) -> str:
    """'budget 60 s', or 'budget 20 s (override; tiny: 60 s)' when it is not the protocol's; '' unrecorded."""
    budget = source.budget
    if not budget:
        return ""
    text = f"budget {budget:g} s"
    try:
        from data.protocols import PROTOCOLS

        default = PROTOCOLS[source.protocol].time_budget
    except (ImportError, KeyError):
        return text
    return text if abs(default - budget) < 1e-6 else f"{text} (override; {source.protocol}: {default:g} s)"


def _noise_line(source: Source) -> str | None:
    """The run-to-run spread the loop decides with, pooled over every trainer that ran more than once."""
    from research.noise import pooled_noise

    groups: dict[str, list] = {}
    for r in source.rows:
        if measured(r) and r.trainer_hash:
            groups.setdefault(r.trainer_hash, []).append((r.val_bpb, r.num_steps))
    noise = pooled_noise(groups, 0.0)
    return None if noise.measured is None else f"| run-to-run noise | {cell(noise.describe())} |"


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def progress_markdown(source: Source, summary: Summary, png_name: str | None = None) -> str:
    """The Markdown summary of one source (links the plot when `png_name` is given)."""
    s, lines = summary, []
    lines.append(f"# Research progress: {_heading_context(source)}")
    lines.append("")
    if png_name:
        lines += [f"![progress]({png_name})", ""]
    branch = common(r.branch for r in source.rows)
    lines.append(f"Source: `{source.path}`" + (f" · branch `{branch}`" if branch else "") +
                 f" · evaluator `{source.evaluator_hash or UNKNOWN}`")
    if source.left_out:
        other = sorted({f"{r.branch or 'no branch'} / {r.protocol or UNKNOWN}" for r in source.left_out})
        lines.append(f"{plural(len(source.left_out), 'row')} of other branches or protocols ({', '.join(other)}) "
                     "left out; pick a branch with --branch.")
    lines.append("")
    lines += ["| | |", "|---|---|"]
    if s.best:
        runs = ", ".join(f"#{s.number(i)}" for i, _ in s.baselines)
        spread = f"; spread {s.noise:.6f}" if s.noise is not None else ""
        lines.append(f"| baseline val_bpb | {bpb_text(s.baseline_bpb)} ({plural(len(s.baselines), 'run')}: {runs}"
                     f"{spread}) |")
        ti, t = s.best
        where = (f"#{s.number(ti)}, {cell(t.commit or UNKNOWN)}" if s.improved else
                 "the baseline: no kept change beat it" if s.kept else "the baseline: no change kept yet")
        basis = f"; {s.best_basis}, as the loop decides with it" if s.best_basis else ""
        lines.append(f"| best val_bpb | **{bpb_text(s.best_bpb)}** ({where}{basis}) |")
        lines.append(f"| gain | {gain_text(s.best_bpb, s.baseline_bpb)} |")
        base_hold = mean(r.holdout_bpb for _, r in s.baselines)
        best_hold = t.holdout_bpb if s.improved else base_hold
        if base_hold or best_hold:
            lines.append(f"| holdout_bpb, baseline → best | {bpb_text(base_hold)} → {bpb_text(best_hold)} "
                         f"({gain_text(best_hold, base_hold)}) |")
    else:
        lines.append("| best val_bpb | none yet: no experiment has finished with a measurement |")
    noise = _noise_line(source)
    if noise:
        lines.append(noise)
    aborts = [r for r in source.rows if r.status == "abort"]
    if aborts:
        reached = [r.progress for r in aborts if r.progress]
        at = f", at {100 * sum(reached) / len(reached):.0f}% of the budget on average" if reached else ""
        audited = [r for r in source.rows if ABORT_AUDIT in r.note]
        wrong = [r for r in audited if ABORT_OFF in r.note or r.status == "keep"]
        audits = (f"; {plural(len(audited), 'audit')} (runs it would have stopped, let through to the end): "
                  f"{len(wrong)} measured below the best, a stop that would have lost it") if audited else \
            "; no audit yet"
        lines.append(f"| stopped early | {plural(len(aborts), 'run')} (status abort: training loss far behind the "
                     f"best's){at}{audits} |")
    lines.append(f"| experiments | {len(source.rows)} ({s.tally()}) |")
    lines.append(f"| wall time (sum of experiments) | {_duration(s.wall_seconds)} |")
    stamps = sorted(r.timestamp for r in source.rows if r.timestamp)
    if stamps:
        lines.append(f"| first → last experiment | {cell(stamps[0])} → {cell(stamps[-1])} |")
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
        lines += [f"| {k} | {cell(value_text(v))} |" for k, v in sorted(s.best[1].hyperparams.items())]
        lines.append("")
    return "\n".join(lines)


def _kept_table(s: Summary) -> list[str]:
    """Baseline runs, then the kept changes in order with their gains; holdout columns when measured."""
    holdout = any(r.holdout_bpb for _, r in s.baselines + s.kept)
    head = "| # | commit | change | val_bpb | vs previous best | vs baseline |"
    lines = ["## Kept changes", "", head + (" holdout_bpb | holdout vs baseline |" if holdout else ""),
             "|---" * (8 if holdout else 6) + "|"]
    base_hold = mean(r.holdout_bpb for _, r in s.baselines)
    for i, r in s.baselines:
        cells = [s.number(i), r.commit, r.description, bpb_text(r.val_bpb), "—", "—"]
        cells += [bpb_text(r.holdout_bpb), "—"] if holdout else []
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    for i, r in s.kept:
        cells = [s.number(i), r.commit, r.description, bpb_text(r.val_bpb), gain_text(r.val_bpb, s.best_before(i)),
                 gain_text(r.val_bpb, s.baseline_bpb)]
        if holdout:
            cells += [bpb_text(r.holdout_bpb), gain_text(r.holdout_bpb, base_hold)]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    lines.append("")
    best_hold = s.best[1].holdout_bpb if s.improved else None
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


def _transfer_table(s: Summary) -> list[str]:
    lines = ["## Transfers", "",
             "| # | change | val_bpb | host's best before it | carried? |", "|---|---|---|---|---|"]
    noise = s.noise or 0.0  # the baseline runs' spread: a smaller difference says nothing
    for i, r in s.transfers:
        before = s.best_before(i)
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
        lines.append(f"| {s.number(i)} | {cell(r.description)} | {bpb_text(r.val_bpb)} | {bpb_text(before)} | "
                     f"{verdict} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------

_STYLE = {
    "discard": dict(marker="o", s=14, color="#9e9e9e", alpha=0.6, label="discarded", zorder=2),
    "baseline": dict(marker="s", s=40, color="#14532d", label="baseline run", zorder=4),
    "keep": dict(marker="o", s=46, color="#2e9d4a", edgecolors="#14532d", linewidths=0.8, label="kept change",
                 zorder=4),
    "transfer": dict(marker="D", s=40, color="#1f6fd1", edgecolors="#0b2e5c", linewidths=0.8,
                     label="transferred config", zorder=4),
    "rerun": dict(marker="s", s=16, color="#7fbf8e", alpha=0.8, label="rerun (confirm or re-measure)", zorder=3),
}
_BAND = {  # statuses without a measurement, drawn in a band at the bottom of the axes
    "crash": dict(marker="x", s=40, color="#d62728", linewidths=1.6, label="crash"),
    "invalid": dict(marker="v", s=34, color="#8e44ad", label="invalid (non-causal)"),
    "abort": dict(marker=">", s=34, color="#6d6875", label="abort (stopped early)"),
}
_REJECTED_COLORS = ("#e67e22", "#8d5524", "#c9a227", "#b03a2e", "#6d6875")  # one per reason, the last for the rest


def _band_styles(rows: list[Row]) -> tuple[dict[str, dict], dict[int, str]]:
    """Styles of the strip's groups (crash, invalid, one per rejection reason), and each unmeasured
    row's group by 1-based position."""
    reasons = [r.reason for r in rows if r.status == "rejected"]  # the `reason` column (research/results.py)
    ranked = sorted(dict.fromkeys(reasons), key=lambda x: -reasons.count(x))  # most frequent first, then in order
    shown = ranked if len(ranked) <= MAX_REJECTION_REASONS else ranked[:MAX_REJECTION_REASONS - 1]
    styles = dict(_BAND)
    for k, reason in enumerate(shown + (["other reasons"] if len(shown) < len(ranked) else [])):
        styles[f"rejected: {reason}"] = dict(marker="|", s=60, linewidths=1.6, color=_REJECTED_COLORS[k],
                                             label=f"rejected: {reason}")
    group = {}
    for i, r in enumerate(rows, start=1):
        if measured(r):
            continue
        if r.status == "rejected":
            group[i] = f"rejected: {r.reason if r.reason in shown else 'other reasons'}"
        else:
            group[i] = r.status if r.status in _BAND else "crash"
    return styles, group


def y_limits(source: Source, summary: Summary) -> tuple[float, float]:
    values = [r.val_bpb for r in source.rows if measured(r)]
    best = summary.best_bpb or min(values)
    base = summary.baseline_bpb or max(values)
    span = max(base - best, 0.02 * best, 1e-4)
    typical = sorted(values)[int(0.9 * (len(values) - 1))]
    # far-off failures would flatten the curve: they go on the top edge as triangles
    top = max(min(max(values), max(base + 0.25 * span, typical)), base)
    lo = min(values)
    height = top - lo or span
    return lo - 0.05 * height, top + 0.06 * height


def progress_figure(source: Source, summary: Summary):
    """The progress plot as a matplotlib Figure: every experiment at its number, discards grey, kept
    ones green and labelled, the running best as a step line, transfers blue; runs without a val_bpb
    in a strip below the axes (crashes, invalid models, rejections by reason); values far above the
    baseline as triangles on the top edge."""
    from matplotlib.ticker import MaxNLocator

    rows = source.rows
    n = len(rows)
    kept_ids = {i for i, _ in summary.kept}
    base_ids = {i for i, _ in summary.baselines}
    has_values = any(measured(r) for r in rows)
    lo, hi = y_limits(source, summary) if has_values else (0.0, 1.0)
    band, band_of = _band_styles(rows)
    groups, off_scale = _point_groups(rows, summary, hi, band_of, kept_ids, base_ids)
    x_label = "experiment # (runs/<n>)" if any(r.run is not None for r in rows) else "experiment #"
    if band_of:
        fig = new_figure(13, 6.8)
        ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw=dict(height_ratios=[14, 1], hspace=0.04))
    else:
        fig = new_figure(13, 6.5)
        ax = fig.subplots()
        strip = None
    ax.set_ylim(lo, hi)
    if not has_values:
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no experiment has a val_bpb yet", transform=ax.transAxes, ha="center",
                color="#555555")
    first, last = min(summary.numbers), max(summary.numbers)
    x_end = max(last, first + 1) + 0.7
    ax.set_xlim(first - 0.7, x_end)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for kind, style in _STYLE.items():
        if kind in groups:
            xs, ys = zip(*groups[kind])
            ax.scatter(xs, ys, **style)
    if off_scale:
        ax.scatter(off_scale, [hi - 0.012 * (hi - lo)] * len(off_scale), marker="^", s=22, color="#9e9e9e",
                   label=f"above {hi:.4f} (off scale)", zorder=2)
    steps = [(summary.number(i), b) for i, b in enumerate(summary.running_best, start=1) if b is not None]
    if steps:
        xs, ys = map(list, zip(*steps))
        ax.step(xs + [x_end], ys + [ys[-1]], where="post", color="#2e9d4a", linewidth=1.8, alpha=0.9,
                label="running best", zorder=3)
    handles, labels = ax.get_legend_handles_labels()
    if strip is not None:
        more_h, more_l = _draw_strip(strip, band, groups, x_label)
        handles, labels = handles + more_h, labels + more_l
    else:
        ax.set_xlabel(x_label)
    title = f"autoresearch progress: {_heading_context(source)}"
    if summary.best:
        b, t = summary.baseline_bpb, summary.best_bpb
        subtitle = (f"{plural(n, 'experiment')} ({summary.tally()}) · val_bpb {b:.6f} → {t:.6f} "
                    f"({100 * (t - b) / b:+.2f}%)")
    else:
        subtitle = f"{plural(n, 'experiment')} ({summary.tally()}), none measured yet"
    ax.set_title(f"{title}\n{subtitle}", fontsize=12)
    ax.set_ylabel(f"val_bpb (lower is better), protocol {source.protocol or UNKNOWN}")
    ax.grid(True, alpha=0.25)
    legend = ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.9, bottom=0.09)
    _label_points(fig, ax, summary, [legend], hi)
    return fig


def _point_groups(rows, summary: Summary, hi: float, band_of: dict, kept_ids: set, base_ids: set):
    """Each row's point by how it is drawn: ({style: [(x, y)]}, the x of values off the top of the scale);
    runs without a val_bpb sit at y 0.5 of the strip under their band style."""
    groups: dict[str, list[tuple[int, float]]] = {}
    off_scale = []
    for i, r in enumerate(rows, start=1):
        x = summary.number(i)
        if i in band_of:
            groups.setdefault(band_of[i], []).append((x, 0.5))
        elif r.val_bpb > hi:
            off_scale.append(x)
        else:
            kind = ("baseline" if i in base_ids else "keep" if i in kept_ids else
                    "transfer" if r.kind == Kind.TRANSFER else
                    "rerun" if r.status == "rerun" or r.kind in (Kind.RERUN, Kind.CONFIRM, Kind.BEST_NEXT) else "discard")
            groups.setdefault(kind, []).append((x, r.val_bpb))
    return groups, off_scale


def _draw_strip(strip, band: dict, groups: dict, x_label: str):
    """The strip under the axes for runs without a val_bpb; returns its legend handles and labels."""
    strip.set_facecolor("#fdecea")
    strip.set_ylim(0, 1)
    strip.set_yticks([])
    strip.set_ylabel("no\nval_bpb", rotation=0, ha="right", va="center", fontsize=8)
    for kind, style in band.items():
        if kind in groups:
            xs, ys = zip(*groups[kind])
            strip.scatter(xs, ys, zorder=3, clip_on=False, **style)
    strip.set_xlabel(x_label)
    strip.grid(True, axis="x", alpha=0.25)
    return strip.get_legend_handles_labels()


def plot_progress(source: Source, summary: Summary, out_png: Path) -> Path:
    """Draw `progress_figure` into `out_png`; returns the path."""
    fig = progress_figure(source, summary)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def _label_points(fig, ax, summary: Summary, artists: list, top: float) -> None:
    """Label kept changes (green) and transfers (blue) with their short description, trying offsets
    until a label overlaps no other label, legend or kept point (else the least overlapping spot)."""
    from matplotlib.text import Text

    kept = summary.kept
    if len(kept) > MAX_PLOT_LABELS:  # label the largest steps; the Markdown lists them all
        steps = {i: (summary.best_before(i) or r.val_bpb) - r.val_bpb for i, r in kept}
        chosen = set(sorted(steps, key=steps.get, reverse=True)[:MAX_PLOT_LABELS])
        kept = [(i, r) for i, r in kept if i in chosen]
    points = [(summary.number(i), r.val_bpb, shorten(r.description, 34), "#14532d", "#2e9d4a") for i, r in kept]
    points += [(summary.number(i), r.val_bpb, shorten(r.description.split(":")[0], 40), "#0b2e5c", "#1f6fd1")
               for i, r in summary.transfers if 0 < r.val_bpb <= top]  # where it came from

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed = [a.get_window_extent(renderer) for a in artists]
    for i, r in summary.baselines + summary.kept:  # the markers themselves
        x, y = ax.transData.transform((summary.number(i), r.val_bpb))
        placed.append(_Box(x - 5, y - 5, x + 5, y + 5))
    offsets = [(dx, dy) for dy in (10, -14, 24, -28, 38, -42, 52, -56, 66, -70) for dx in (8, -8)]
    for x, y, label, color, line in sorted(points, key=lambda p: p[0]):
        best_text, best_cost, best_box = None, None, None
        for dx, dy in offsets:
            text = ax.annotate(label, (x, y), xytext=(dx, dy),
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


# ---------------------------------------------------------------------------
# Writing and the command line
# ---------------------------------------------------------------------------


def write_report(path: str | Path, out_dir: str | Path, name: str = "report",
                 branch: str | None = None) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.md` and `<out_dir>/<name>.png` for one results file; returns both paths.

    Raises ReportError when the file is missing or holds no experiments.
    """
    source = load_source(path, branch)
    if not source.rows:
        raise ReportError(f"No experiments in {path} yet; run `uv run loop.py` (or `uv run loop.py try`) first.")
    summary = summarize(source)
    out_dir = Path(out_dir)
    png = plot_progress(source, summary, out_dir / f"{name}.png")
    md = out_dir / f"{name}.md"
    md.write_text(progress_markdown(source, summary, png.name) + "\n", encoding="utf-8")
    return md, png


def _report_names(paths: list[Path]) -> list[str]:
    if len(paths) == 1:
        return ["report"]
    names = [re.sub(r"[^A-Za-z0-9_.-]+", "-", path_label(p)) or "results" for p in paths]
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


def add_subparsers(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser] = ()) -> None:
    """Register `report`, `compare` and `transfer` on loop.py's subparsers.

    Each sets `func`, called as `args.func(args)` and returning the exit code; none needs a session
    opened by the caller (`transfer` opens its own). `parents` are loop.py's shared option parsers,
    given to `transfer` (see `transfer.add_subparser`).
    """
    p = subparsers.add_parser("report", help="progress plot (PNG) and Markdown summary of results files")
    p.add_argument("paths", nargs="*", metavar="RESULTS", help="results files (default: ./results.tsv)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where to write (default: {DEFAULT_OUT_DIR}/)")
    p.add_argument("--branch", help="report this branch (default: the branch of the latest experiment)")
    p.set_defaults(func=lambda a: cmd_report(a.paths, a.out_dir, a.branch))
    compare.add_subparser(subparsers)
    transfer.add_subparser(subparsers, parents)


def main(argv: list[str] | None = None) -> int:
    """`python -m reporting.report report|compare|transfer ...` (the same commands as loop.py)."""
    parser = argparse.ArgumentParser(prog="python -m reporting.report",
                                     description="Progress report, cross-hardware comparison and config transfer.")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
