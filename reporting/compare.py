"""`loop.py compare`: the best config of several machines side by side.

`compare_markdown` writes one column per machine (best val_bpb, holdout, gain over its own baseline,
steps, tokens, MFU, memory, then every hyperparameter, those that differ in bold); `plot_compare`
draws each machine's running best, absolute and relative to its own baseline. Results of different
protocols or evaluators are refused: their val_bpb are not comparable.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

from reporting.summary import (DEFAULT_OUT_DIR, UNKNOWN, ReportError, Source, bpb_text, cell, gain_text, load_source,
                               new_figure, num, path_label, plural, run_summary, summarize, value_text)
from research.results import Row

__all__ = ["compare_markdown", "plot_compare", "write_compare", "cmd_compare", "add_subparser"]


def _check_comparable(sources: list[Source]) -> None:
    for s in sources:
        if not s.protocol or not s.evaluator_hash:
            raise ReportError(f"{s.path} does not record its protocol and evaluator hash (a reference-format "
                              "file?), so its val_bpb cannot be checked as comparable; compare results "
                              "written by this loop.")
    for field, what, remedy in (
            ("protocol", "protocols", "val_bpb is comparable only under one protocol, so run each machine under the "
                                      "same one"),
            ("evaluator_hash", "evaluator versions", "update both checkouts to the same prepare.py and rerun")):
        if len({getattr(s, field) for s in sources}) > 1:
            which = ", ".join(f"{s.path}: {getattr(s, field)}" for s in sources)
            raise ReportError(f"Refusing to compare results from different {what} ({which}); {remedy}.")


def _labels(sources: list[Source]) -> list[str]:
    labels = [s.label for s in sources]
    for lab, n in Counter(labels).items():
        if n > 1:
            labels = [f"{x} [{path_label(s.path)}]" if x == lab else x for x, s in zip(labels, sources)]
    seen = Counter()
    out = []
    for x in labels:  # still equal (same device, same folder name): number them
        seen[x] += 1
        out.append(x if labels.count(x) == 1 else f"{x} #{seen[x]}")
    return out


def _tokens_m(source: Source, row: Row) -> str:
    sm = run_summary(source, row)
    if num(sm.get("total_tokens_M")) is not None:
        return f"{float(sm['total_tokens_M']):.1f}"
    batch = num(row.hyperparams.get("TOTAL_BATCH_SIZE"))
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
        return f"| {name} | " + " | ".join(cell(c) for c in cells) + " |"

    lines = [f"# Best config per hardware: protocol {sources[0].protocol}, evaluator {sources[0].evaluator_hash}",
             ""]
    if png_name:
        lines += [f"![running best]({png_name})", ""]
    lines += ["| | " + " | ".join(cell(x) for x in labels) + " |", "|---" * (len(sources) + 1) + "|"]
    lines.append(row("source", [f"`{s.path}`" for s in sources]))
    lines.append(row("backend", [s.backend for s in sources]))
    lines.append(row("device", [s.device for s in sources]))
    lines.append(row("best val_bpb", [f"**{bpb_text(v)}**" if v == low else bpb_text(v) for v in vals]))
    lines.append(row("holdout_bpb", [bpb_text(r.holdout_bpb) for r in bests]))
    lines.append(row("baseline val_bpb", [bpb_text(summ.baseline_bpb) for summ in summaries]))
    lines.append(row("gain over baseline", [gain_text(summ.best_bpb, summ.baseline_bpb) for summ in summaries]))
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
        values = [value_text(r.hyperparams[name]) if name in r.hyperparams else "—" for r in bests]
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

    fig = new_figure(14, 6)
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
                label=f"{label}: best {summ.best_bpb:.6f} ({plural(len(summ.kept), 'kept change')} in "
                      f"{plural(len(source.rows), 'experiment')})")
        ax.scatter(kept_x, kept_y, color=color, s=22, zorder=3)
        rel.step(xs, [100 * (y - base) / base for y in ys], where="post", color=color, linewidth=2)
        rel.scatter(kept_x, [100 * (y - base) / base for y in kept_y], color=color, s=22, zorder=3)
    ax.set_ylabel("best val_bpb so far (lower is better)")
    rel.set_ylabel("change from own baseline (%)")
    rel.axhline(0, color="#888888", linewidth=0.8)
    for a in (ax, rel):
        a.set_xlabel("experiments on the branch")  # a count, so machines line up: not the runs/<n> number
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


def add_subparser(subparsers) -> None:
    """Register `compare` on loop.py's subparsers (`func` returns the exit code)."""
    from reporting import sharing

    p = subparsers.add_parser("compare", help="best config per hardware side by side (same protocol only)")
    p.add_argument("paths", nargs="*", metavar="RESULTS", help="results files or run folders, one per machine")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where to write (default: {DEFAULT_OUT_DIR}/)")
    sharing.add_remote_options(p, required=False)  # --remote: every machine's published results, per hardware
    p.add_argument("--repo", default=str(sharing.REPO), help=argparse.SUPPRESS)
    p.add_argument("--evaluator", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_compare_from_args)


def _compare_from_args(a) -> int:
    from reporting import sharing

    if a.remote:
        if a.paths:
            print("error: give either results files or --remote, not both; compare a fetched machine's results "
                  "with `loop.py compare --remote URL`.", file=sys.stderr)
            return 1
        return sharing.cmd_compare_remote(a.remote, a.host_name, Path(a.repo), a.evaluator, a.out_dir)
    if not a.paths:
        print("error: name the results files to compare (one per machine), or --remote URL for the machines "
              "sharing through a git remote.", file=sys.stderr)
        return 1
    return cmd_compare(a.paths, a.out_dir)
