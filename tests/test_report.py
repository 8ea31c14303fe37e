"""Tests for the reports: reporting/report.py (progress report), reporting/compare.py (cross-hardware
comparison), reporting/transfer.py (config transfer) and reporting/summary.py (what they share).

Run: .venv/bin/python -m pytest tests/test_report.py -q      (CPU, no network, ~25 s)

Results files are written here with the loop's own row writer. The transfer test runs
`loop.py transfer` in a temporary git repository with test_loop.py's stand-in trainer on the tiny
protocol (a few seconds per run).
"""

from __future__ import annotations

import argparse
import struct

import pytest

from reporting import compare, report, transfer
from reporting.summary import ReportError, load_source, summarize
from research.results import COLUMNS, UPSTREAM_COLUMNS, Row, infer_reason, read_results

HP_H100 = {"DEPTH": 8, "MATRIX_LR": 0.04, "DEVICE_BATCH_SIZE": 128, "TOTAL_BATCH_SIZE": 2**19,
           "ADAM_BETAS": [0.8, 0.95], "WINDOW_PATTERN": "SSSL"}
HP_MAC = {**HP_H100, "DEPTH": 4, "DEVICE_BATCH_SIZE": 16, "TOTAL_BATCH_SIZE": 2**16}


def row(val, status="discard", desc="change", **kw) -> Row:
    base = dict(commit="abc1234", val_bpb=val, memory_gb=44.0 if val else 0.0, status=status, description=desc,
                backend="cuda", device="NVIDIA H100", protocol="standard", evaluator_hash="e1e1e1e1e1e1",
                num_steps=950, mfu_percent=39.8, num_params_M=50.3, training_seconds=300.0, wall_seconds=330.0,
                agent_cost_usd=0.05, agent_tokens_in=1000, agent_tokens_out=100, hyperparams=HP_H100)
    base.update(kw)
    return Row(**base)


def write(path, rows, header=COLUMNS):
    path.write_text("\t".join(header) + "\n" + "".join(r.to_line() for r in rows), encoding="utf-8")
    return path


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def assert_sane_png(path):
    w, h = png_size(path)
    assert 600 <= w <= 4000 and 400 <= h <= 3000, (w, h)
    assert path.stat().st_size > 10_000  # something was drawn


def history(n=40, hp=HP_H100, start=0.998, **kw) -> list[Row]:
    """A loop's history as it logs it: two baseline runs, then every 4th experiment a keep, every 9th a crash."""
    extra = {k: v for k, v in kw.items() if k != "hyperparams"}
    rows = [row(start + 0.0004, "keep", "baseline", note="baseline 1/2", holdout_bpb=start + 0.01, **kw),
            row(start - 0.0004, "keep", "baseline (repeat 2/2)", note="baseline 2/2", holdout_bpb=start + 0.01, **kw)]
    best = start
    for i in range(2, n):
        if i % 9 == 0:
            rows.append(row(0.0, "crash", f"idea {i} (OOM)", **kw))
        elif i % 4 == 0:
            best -= 0.002
            rows.append(row(best, "keep", f"idea {i}", holdout_bpb=best + 0.011, hyperparams=hp, **extra))
        else:
            rows.append(row(best + 0.001 * (i % 5 + 1), "discard", f"idea {i}", **kw))
    return rows


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def test_report_reads_the_upstream_five_column_file(tmp_path, capsys):
    results = tmp_path / "results.tsv"
    results.write_text("\t".join(UPSTREAM_COLUMNS) + "\n"
                       "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
                       "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR to 0.04\n"
                       "c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to GeLU activation\n"
                       "d4e5f6g\t0.000000\t0.0\tcrash\tdouble model width (OOM)\n", encoding="utf-8")
    out = tmp_path / "reports"
    assert report.cmd_report([results], out) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "report.md"), str(out / "report.png")]
    md = (out / "report.md").read_text()
    assert "protocol unknown" in md and "device unknown" in md
    assert "| baseline val_bpb | 0.997900" in md
    assert "| best val_bpb | **0.993200**" in md
    assert "-0.004700 (-0.47%)" in md
    assert "4 (2 keep incl. 1 baseline run, 1 crash, 1 discard)" in md
    assert "| 2 | b2c3d4e | increase LR to 0.04 | 0.993200 |" in md
    assert "agent cost | unknown" in md and "wall time (sum of experiments) | unknown" in md
    assert "No holdout_bpb recorded" in md
    assert_sane_png(out / "report.png")


@pytest.mark.parametrize("content", ["", "\t".join(COLUMNS) + "\n", "\t".join(UPSTREAM_COLUMNS) + "\n"])
def test_report_on_an_empty_file_says_so_and_writes_nothing(tmp_path, capsys, content):
    results = tmp_path / "results.tsv"
    results.write_text(content, encoding="utf-8")
    assert report.cmd_report([results], tmp_path / "reports") == 1
    err = capsys.readouterr().err
    assert "No experiments in" in err and err.count("\n") == 1
    assert not (tmp_path / "reports").exists()


def test_report_on_a_missing_file_is_one_sentence(tmp_path, capsys):
    assert report.cmd_report([tmp_path / "nope.tsv"], tmp_path / "reports") == 1
    assert "does not exist" in capsys.readouterr().err


def test_report_with_crashes_holdout_and_totals(tmp_path):
    rows = history(40)
    results = write(tmp_path / "results.tsv", rows)
    md_path, png = report.write_report(results, tmp_path / "out")
    md = md_path.read_text()
    kept = [r for r in rows if r.status == "keep" and r.note == ""]
    assert "# Research progress: protocol standard · cuda · NVIDIA H100" in md
    # the baseline is the mean of the baseline runs, as the loop's running best starts there
    assert "| baseline val_bpb | 0.998000 (2 runs: #1, #2; spread 0.000800) |" in md
    assert f"| best val_bpb | **{kept[-1].val_bpb:.6f}** (#{rows.index(kept[-1]) + 1}, abc1234) |" in md
    assert f"| gain | {kept[-1].val_bpb - 0.998:+.6f} ({100 * (kept[-1].val_bpb - 0.998) / 0.998:+.2f}%) |" in md
    assert (f"40 ({sum(r.status == 'discard' for r in rows)} discard, {len(kept) + 2} keep incl. 2 baseline runs, "
            "4 crash)") in md
    assert "| wall time (sum of experiments) | 3 h 40 min |" in md  # 40 x 330 s
    assert "| agent cost | $2.00 (40,000 tokens in, 4,000 out) |" in md
    # every kept change in order, its gain over the best before it, holdout beside val
    assert ("| # | commit | change | val_bpb | vs previous best | vs baseline | holdout_bpb | holdout vs baseline |"
            in md)
    assert "| 5 | abc1234 | idea 4 | 0.996000 | -0.002000 (-0.20%) | -0.002000 (-0.20%) | 1.007000 |" in md
    positions = [md.index(f"| {r.description} | {r.val_bpb:.6f} |") for r in kept]
    assert positions == sorted(positions)
    assert "The holdout split never takes part in a decision" in md
    assert "## Best config" in md and "| DEPTH | 8 |" in md
    assert_sane_png(png)


def test_report_keeps_to_one_branch_and_protocol(tmp_path):
    old = history(10, branch="autoresearch/mar1")
    other = [row(1.5, "keep", "baseline", note="baseline 1/1", protocol="tiny", branch="autoresearch/mar2")]
    new = history(12, start=0.990, branch="autoresearch/mar3")
    results = write(tmp_path / "results.tsv", old + other + new)
    md = report.write_report(results, tmp_path / "out")[0].read_text()
    assert "· branch `autoresearch/mar3` ·" in md and "| experiments | 12 (" in md
    assert "11 rows of other branches or protocols" in md and "autoresearch/mar2 / tiny" in md
    md = report.write_report(results, tmp_path / "out", branch="autoresearch/mar1")[0].read_text()
    assert "| baseline val_bpb | 0.998000" in md and "| experiments | 10 (" in md
    with pytest.raises(ReportError, match="no rows of branch nope"):
        report.write_report(results, tmp_path / "out", branch="nope")


def test_report_of_only_crashes(tmp_path):
    results = write(tmp_path / "results.tsv", [row(0.0, "crash", "baseline"), row(0.0, "crash", "fix")])
    md_path, png = report.write_report(results, tmp_path / "out")
    md = md_path.read_text()
    assert "none yet" in md and "2 (2 crash)" in md
    assert_sane_png(png)


def test_report_shows_whether_a_transfer_carried(tmp_path):
    rows = history(12)
    best = min(r.val_bpb for r in rows if r.status == "keep")
    rows.append(row(best - 0.004, "transfer", "transfer from H100: DEPTH=8", device="Apple M3"))
    rows.append(row(best + 0.01, "transfer", "transfer from 4090: MATRIX_LR=0.06"))
    rows.append(row(best + 0.0003, "transfer", "transfer from A100: WINDOW_PATTERN=L"))
    rows.append(row(0.0, "crash", "transfer from 4090: DEPTH=24"))  # a transfer that crashed is logged as crash
    md = report.write_report(write(tmp_path / "results.tsv", rows), tmp_path / "out")[0].read_text()
    assert "## Transfers" in md
    assert f"| 13 | transfer from H100: DEPTH=8 | {best - 0.004:.6f} | {best:.6f} | yes: -0.004000, better" in md
    assert f"| {best + 0.01:.6f} | {best:.6f} | no: +0.010000, worse than the host's best |" in md
    assert "as good: +0.000300, within the baseline noise ±0.000800" in md  # the baseline runs' spread
    assert "| 16 | transfer from 4090: DEPTH=24 | unknown | " in md and "| no: crash |" in md


def test_report_of_several_files_names_them_apart(tmp_path, capsys):
    (tmp_path / "h100").mkdir()
    (tmp_path / "mac").mkdir()
    a = write(tmp_path / "h100" / "results.tsv", history(8))
    b = write(tmp_path / "mac" / "results.tsv", history(8))
    assert report.cmd_report([a, b], tmp_path / "out") == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["report-h100.md", "report-h100.png", "report-mac.md", "report-mac.png"]


def test_many_experiments_keep_the_plot_readable(tmp_path):
    results = write(tmp_path / "results.tsv", history(160))  # 35 kept: more than the label cap
    md_path, png = report.write_report(results, tmp_path / "out")
    assert md_path.read_text().count("| idea ") >= 35  # the Markdown lists every kept change
    assert_sane_png(png)


def drawn(results):
    """The report's Markdown and its figure's main axes (and the strip below them, if drawn)."""
    source = load_source(results)
    summary = summarize(source)
    fig = report.progress_figure(source, summary)
    return report.progress_markdown(source, summary), fig.axes[0], fig.axes[1] if len(fig.axes) > 1 else None


def points(*axes) -> dict[str, list[float]]:
    """x of every drawn marker, by legend label."""
    return {c.get_label(): [x for x, _ in c.get_offsets()] for ax in axes if ax for c in ax.collections}


def test_report_numbers_experiments_by_their_run_folder(tmp_path):
    """#n in the report is runs/<n>, the number the console shows: other branches' runs and a run
    interrupted before its row (runs/6) leave gaps, not a renumbering."""
    other = [row(1.1, "keep", "baseline", note="baseline 1/1", branch="autoresearch/mar1", run=n) for n in (1, 2, 3)]
    ours = dict(branch="autoresearch/mar2")
    results = write(tmp_path / "results.tsv", other + [
        row(0.9984, "keep", "baseline", note="baseline 1/2", run=4, **ours),
        row(0.9976, "keep", "baseline (repeat 2/2)", note="baseline 2/2", run=5, **ours),
        row(0.9990, "discard", "idea a", run=7, **ours),
        row(0.9950, "keep", "idea b", commit="b0b0b0b", note="win: ...", run=8, **ours),
        row(0.0, "crash", "idea c", note="crash: OOM", run=9, **ours),
        row(0.9940, "transfer", "transfer from Apple M3: DEPTH=4", run=10, **ours)])
    md, ax, strip = drawn(results)
    assert "| baseline val_bpb | 0.998000 (2 runs: #4, #5; spread 0.000800) |" in md
    assert "| best val_bpb | **0.995000** (#8, b0b0b0b) |" in md
    assert "| 8 | b0b0b0b | idea b | 0.995000 | -0.003000 (-0.30%) |" in md
    assert "| 10 | transfer from Apple M3: DEPTH=4 | 0.994000 | 0.995000 | yes: " in md
    drawn_at = points(ax, strip)
    assert drawn_at["baseline run"] == [4, 5] and drawn_at["kept change"] == [8]
    assert drawn_at["discarded"] == [7] and drawn_at["crash"] == [9] and drawn_at["transferred config"] == [10]
    line = next(ln for ln in ax.lines if ln.get_label() == "running best")
    assert list(line.get_xdata())[:3] == [4, 5, 7]


def test_title_and_markdown_count_keeps_the_same_way(tmp_path):
    """One count: every row with status keep, baseline runs included (and said so), in the plot's
    title and the Markdown alike; on the reference's own five columns too."""
    rows = [row(0.9984, "keep", "baseline", note="baseline 1/2"),
            row(0.9976, "keep", "baseline (repeat 2/2)", note="baseline 2/2"),
            row(0.9950, "keep", "idea", note="win: ...")]
    rows += [row(0.9990 + k / 1e4, "discard", f"idea {k}") for k in range(5)] + [row(0.0, "crash", "oom")]
    md, ax, _ = drawn(write(tmp_path / "loop.tsv", rows))
    tally = "5 discard, 3 keep incl. 2 baseline runs, 1 crash"
    assert f"| experiments | 9 ({tally}) |" in md
    assert f"9 experiments ({tally})" in ax.get_title()

    # the reference's format: a baseline, 22 kept changes (one a simplification at equal val_bpb), discards
    lines = ["a000000\t0.997900\t44.0\tkeep\tbaseline\n"]
    val = 0.9979
    for k in range(1, 23):
        val -= 0.0 if k == 10 else 0.0005
        lines.append(f"c{k:06d}\t{val:.6f}\t44.0\tkeep\tchange {k}\n")
        lines.append(f"d{k:06d}\t{val + 0.002:.6f}\t44.0\tdiscard\tidea {k}\n")
    up = tmp_path / "reference.tsv"
    up.write_text("\t".join(UPSTREAM_COLUMNS) + "\n" + "".join(lines), encoding="utf-8")
    md, ax, _ = drawn(up)
    tally = "23 keep incl. 1 baseline run, 22 discard"
    assert f"| experiments | 45 ({tally}) |" in md
    assert f"45 experiments ({tally})" in ax.get_title()
    assert "22 kept" not in ax.get_title() + md
    assert sum(f"| change {k} |" in md for k in range(1, 23)) == 22  # every kept change listed
    assert "| 20 | c000010 | change 10 | 0.993400 | +0.000000 (+0.00%) |" in md


def test_legend_names_the_reason_of_a_rejection(tmp_path):
    rows = history(6) + [
        row(0.0, "rejected", "scratch file", note="rejected: changed files other than train_cuda.py: notes.txt"),
        row(0.0, "rejected", "longer run", note="rejected: trained 331.2 s, past the 300 s budget"),
        row(0.0, "rejected", "longer still", note="rejected (overtime): trained 340.0 s, past the 300 s budget"),
        row(0.0, "rejected", "wrote data", note="rejected: the run changed files: prepare.py"),
        row(0.0, "crash", "oom", note="crash: CUDA out of memory")]
    md, ax, strip = drawn(write(tmp_path / "results.tsv", rows))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-4:] == ["crash", "rejected: overtime", "rejected: more than the trainer",
                           "rejected: changed what it must not"]
    assert points(strip) == {"crash": [11], "rejected: overtime": [8, 9], "rejected: more than the trainer": [7],
                             "rejected: changed what it must not": [10]}
    assert infer_reason("rejected", "baseline 2/2; rejected: deleted the trainer train_cuda.py") == \
        "more than the trainer"


def test_running_best_never_rises(tmp_path):
    """The running best starts at the mean of the baseline runs (the loop's own starting best) from the
    first baseline run on, and only goes down: not up at a second, higher baseline run, nor at a kept
    change that does not beat it."""
    rows = [row(0.9976, "keep", "baseline", note="baseline 1/2"),
            row(0.9984, "keep", "baseline (repeat 2/2)", note="baseline 2/2"),
            row(0.9990, "discard", "idea a"),
            row(0.9950, "keep", "idea b", note="win: ..."),
            row(0.9952, "keep", "simpler, as good", note="kept by hand"),
            row(0.9940, "keep", "idea c", note="win: ..."),
            row(0.9960, "discard", "idea d")]
    results = write(tmp_path / "results.tsv", rows)
    summary = summarize(load_source(results))
    assert summary.running_best == pytest.approx([0.998, 0.998, 0.998, 0.995, 0.995, 0.994, 0.994])
    md, ax, _ = drawn(results)
    ys = list(next(ln for ln in ax.lines if ln.get_label() == "running best").get_ydata())
    assert ys == sorted(ys, reverse=True) and ys[0] == pytest.approx(0.998)
    assert "| 4 | abc1234 | idea b | 0.995000 | -0.003000 (-0.30%) |" in md  # against the baseline mean
    assert "| 5 | abc1234 | simpler, as good | 0.995200 | +0.000200 (+0.02%) |" in md
    assert "| best val_bpb | **0.994000** (#6, abc1234) |" in md


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


def mac_rows(**kw):
    return history(20, hp=HP_MAC, start=1.25, backend="mlx", device="Apple M3 Max", hyperparams=HP_MAC,
                   mfu_percent=None, num_steps=300, **kw)


def test_compare_two_machines(tmp_path, capsys):
    a = write(tmp_path / "h100.tsv", history(30))
    b = write(tmp_path / "mac.tsv", mac_rows())
    out = tmp_path / "reports"
    assert compare.cmd_compare([a, b], out) == 0
    assert capsys.readouterr().out.split() == [str(out / "compare.md"), str(out / "compare.png")]
    md = (out / "compare.md").read_text()
    best_a = min(r.val_bpb for r in read_results(a) if r.status == "keep")
    best_b = min(r.val_bpb for r in read_results(b) if r.status == "keep")
    assert "| | NVIDIA H100 (cuda) | Apple M3 Max (mlx) |" in md
    assert "protocol standard, evaluator e1e1e1e1e1e1" in md
    assert f"| best val_bpb | **{best_a:.6f}** | {best_b:.6f} |" in md
    assert "| steps | 950 | 300 |" in md
    assert "| tokens (M) | 498.1 | 19.7 |" in md  # steps x TOTAL_BATCH_SIZE
    assert "| MFU % | 39.80 | n/a |" in md
    assert "| memory (GB) | 44.0 | 44.0 |" in md
    # differing hyperparameters in bold, equal ones plain
    assert "| **DEPTH** | **8** | **4** |" in md
    assert "| **DEVICE_BATCH_SIZE** | **128** | **16** |" in md
    assert "| **TOTAL_BATCH_SIZE** | **524288** | **65536** |" in md
    assert "| MATRIX_LR | 0.04 | 0.04 |" in md and "| ADAM_BETAS | [0.8, 0.95] | [0.8, 0.95] |" in md
    assert "3 of 6 hyperparameters differ" in md
    assert_sane_png(out / "compare.png")


def test_compare_refuses_different_protocols(tmp_path, capsys):
    a = write(tmp_path / "h100.tsv", history(10))
    b = write(tmp_path / "mac.tsv", [r for r in mac_rows() if setattr(r, "protocol", "tiny") is None])
    assert compare.cmd_compare([a, b], tmp_path / "reports") == 1
    err = capsys.readouterr().err
    assert "different protocols" in err and "standard" in err and "tiny" in err
    assert not (tmp_path / "reports").exists()


def test_compare_refuses_different_evaluators(tmp_path, capsys):
    a = write(tmp_path / "h100.tsv", history(10))
    b = write(tmp_path / "mac.tsv", mac_rows(evaluator_hash="0123456789ab"))
    assert compare.cmd_compare([a, b], tmp_path / "reports") == 1
    err = capsys.readouterr().err
    assert "different evaluator versions" in err and "0123456789ab" in err
    assert not (tmp_path / "reports").exists()


def test_compare_refuses_files_without_protocol_and_a_single_input(tmp_path, capsys):
    a = write(tmp_path / "h100.tsv", history(10))
    up = tmp_path / "upstream.tsv"
    up.write_text("\t".join(UPSTREAM_COLUMNS) + "\na1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    assert compare.cmd_compare([a, up], tmp_path / "reports") == 1
    assert "does not record its protocol" in capsys.readouterr().err
    assert compare.cmd_compare([a], tmp_path / "reports") == 1
    assert "at least two" in capsys.readouterr().err


def test_compare_reads_run_folders(tmp_path):
    """A machine's runs/ folder (result.json per run, as the evaluator writes it) stands in for its results."""
    import json

    a = write(tmp_path / "h100.tsv", history(10))
    runs = tmp_path / "mac" / "runs"
    for n, val in enumerate([1.30, 1.28, 0.0, 1.29], start=1):
        (runs / str(n)).mkdir(parents=True)
        ev = {"val_bpb": val, "valid": True, "protocol": "standard", "evaluator_hash": "e1e1e1e1e1e1"}
        sm = {"val_bpb": val, "num_steps": 200, "total_tokens_M": 13.1, "peak_vram_mb": 8192.0, "backend": "mlx",
              "device": "Apple M2", "mfu_percent": None, "hyperparams": HP_MAC}
        (runs / str(n) / "result.json").write_text(json.dumps({"eval": ev, "summary": sm} if val else {}))
    md_path, png = compare.write_compare([a, runs], tmp_path / "out")
    md = md_path.read_text()
    assert "Apple M2 (mlx)" in md and "| tokens (M) | " in md and "| 13.1 |" in md
    assert "| memory (GB) | 44.0 | 8.0 |" in md
    assert "1.280000" in md
    assert_sane_png(png)


def test_subcommands_register_and_run(tmp_path):
    parser = argparse.ArgumentParser()
    report.add_subparsers(parser.add_subparsers(dest="command", required=True))
    results = write(tmp_path / "results.tsv", history(6))
    args = parser.parse_args(["report", str(results), "--out-dir", str(tmp_path / "o")])
    assert args.func(args) == 0 and (tmp_path / "o" / "report.png").exists()
    args = parser.parse_args(["transfer", "--from", str(results), "--keep", "DEPTH", "--dry-run"])
    assert args.from_path == str(results) and args.keep == ["DEPTH"] and args.dry_run


def test_transfer_reads_every_run_setting_loop_py_has():
    """`loop.py transfer` takes the shared run options the way `run` and `try` do (Settings.from_args): a
    --wall-margin given to it is the margin its run is held to."""
    import loop
    from research.session import Settings

    args = loop.build_parser().parse_args(["transfer", "--from", "x.tsv", "--wall-margin", "3", "--baseline-runs",
                                           "1", "--no-confirm", "--startup-allowance", "9"])
    s = Settings.from_args(args)
    assert (s.wall_margin, s.baseline_runs, s.confirm, s.startup_allowance) == (3.0, 1, False, 9.0)
    assert s.min_noise == Settings.min_noise and s.tick_s == Settings.tick_s  # unset: the defaults


# ---------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------

TRAINER = '''import os
_METAL = os.environ.get("METAL") == "1"
# --- hyperparameters ---
DEPTH = 4 if _METAL else 2
ASPECT_RATIO = 64
TOTAL_BATCH_SIZE = 2**16 if _METAL else 2**11
DEVICE_BATCH_SIZE = 16 if _METAL else 8
MATRIX_LR = 0.04
ADAM_BETAS = (0.8, 0.95)
WINDOW_PATTERN = "SSSL"
# --- end hyperparameters ---
'''


def test_plan_and_apply_transfer(tmp_path):
    theirs = {**HP_H100, "MATRIX_LR": 0.05, "ADAM_BETAS": [0.9, 0.95], "SOFTCAP": 20}
    results = write(tmp_path / "h100.tsv", [row(0.99, "keep", "baseline"), row(0.97, "keep", "lr", hyperparams=theirs),
                                            row(0.96, "discard", "not kept", hyperparams={"DEPTH": 99})])
    host = {"_METAL": False}
    plan = transfer.plan_transfer(results, TRAINER, host)
    assert plan.row.val_bpb == 0.97
    assert plan.changes == {"DEPTH": 8, "MATRIX_LR": 0.05, "TOTAL_BATCH_SIZE": 2**19, "ADAM_BETAS": [0.9, 0.95]}
    assert plan.kept == {"DEVICE_BATCH_SIZE": (8, 128)}
    assert plan.same == ["WINDOW_PATTERN"]
    assert plan.missing == ["SOFTCAP"] and plan.not_recorded == ["ASPECT_RATIO"]
    text = "\n".join(plan.lines())
    assert "applied: DEPTH=8, TOTAL_BATCH_SIZE=524288, MATRIX_LR=0.05, ADAM_BETAS=[0.9, 0.95]\n" in text
    assert "skipped, not hyperparameters of this trainer: SOFTCAP" in text
    assert "kept from this host (per-hardware size): DEVICE_BATCH_SIZE=8 (theirs: 128)" in text
    new = transfer.apply_transfer(plan, TRAINER, host)
    # the branch in effect on this host is edited, the other hardware's baseline stays
    assert "DEPTH = 4 if _METAL else 8\n" in new
    assert "TOTAL_BATCH_SIZE = 2**16 if _METAL else 2**19\n" in new
    assert "DEVICE_BATCH_SIZE = 16 if _METAL else 8\n" in new
    assert "MATRIX_LR = 0.05\n" in new and "ADAM_BETAS = (0.9, 0.95)\n" in new
    assert new.count("\n") == TRAINER.count("\n")
    # everything taken when nothing is kept
    plan = transfer.plan_transfer(results, TRAINER, host, keep=())
    assert plan.changes["DEVICE_BATCH_SIZE"] == 128 and not plan.kept


def test_transfer_needs_recorded_hyperparameters(tmp_path):
    up = tmp_path / "upstream.tsv"
    up.write_text("\t".join(UPSTREAM_COLUMNS) + "\na1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    with pytest.raises(ReportError, match="no hyperparameters"):
        transfer.plan_transfer(up, TRAINER, {})


@pytest.mark.slow
def test_transfer_runs_the_other_machines_config_here(tiny_cache, tmp_path):
    """`loop.py transfer`: another machine's best config goes into this host's trainer (on the lines in
    effect for this hardware), runs once after the branch's baseline under the tiny protocol, is logged
    as `transfer`, and the tree is back at the kept commit."""
    from test_loop import FAKE_TRAINER, fake_bpb, git, loop_env, make_repo, read_rows, run_loop

    repo = make_repo(tmp_path)
    env = loop_env(tiny_cache)
    theirs = {"VAL_BPB": 1.5, "DEPTH": 1, "MATRIX_LR": 0.05, "DEVICE_BATCH_SIZE": 4, "TOTAL_BATCH_SIZE": 2**11,
              "NOT_A_KNOB_HERE": 3}
    other = write(tmp_path / "mac.tsv", [row(2.1, "keep", "baseline", note="baseline 1/1", protocol="tiny",
                                             device="Apple M3", backend="mlx", hyperparams=HP_MAC),
                                         row(1.5, "keep", "sharper", protocol="tiny", device="Apple M3", backend="mlx",
                                             hyperparams=theirs)])
    head = git(repo, "rev-parse", "HEAD")

    dry = run_loop(repo, "transfer", "--from", str(other), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "applied: VAL_BPB=1.5, MATRIX_LR=0.05, DEPTH=1\n" in dry.stdout  # in the block's order
    assert "already the same here: TOTAL_BATCH_SIZE" in dry.stdout
    assert "kept from this host (per-hardware size): DEVICE_BATCH_SIZE=8 (theirs: 4)" in dry.stdout
    assert "skipped, not hyperparameters of this trainer: NOT_A_KNOB_HERE" in dry.stdout
    assert "dry run" in dry.stdout and read_rows(repo) == [] and git(repo, "status", "--porcelain") == ""

    # a wide wall margin: this test is about the transfer, not the wall-time rule, and must hold on a busy host
    out = run_loop(repo, "transfer", "--from", str(other), "--baseline-runs", "1", "--wall-margin", "3", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = read_rows(repo)
    assert [r.status for r in rows] == ["keep", "transfer"]  # the stand-in's score follows its VAL_BPB alone
    assert [r.val_bpb for r in rows] == pytest.approx([fake_bpb(2.0), fake_bpb(1.5)], abs=1.5e-6)
    t = rows[-1]
    assert t.description.startswith("transfer from Apple M3 (mlx) abc1234: VAL_BPB=1.5")
    assert t.hyperparams["DEPTH"] == 1 and t.hyperparams["MATRIX_LR"] == 0.05  # the cpu line of DEPTH was edited
    assert "it carried" in out.stdout
    diff = (repo / "runs" / str(t.run) / "diff.patch").read_text()
    assert "+    DEPTH = 1\n" in diff and "+MATRIX_LR = 0.05\n" in diff and "+DEVICE_BATCH_SIZE" not in diff
    # never kept: the tree is back at the last kept commit, the trainer as it was
    assert git(repo, "rev-parse", "HEAD") == head and git(repo, "status", "--porcelain") == ""
    assert (repo / "train_cuda.py").read_text() == FAKE_TRAINER
    md = report.write_report(repo / "results.tsv", tmp_path / "out")[0].read_text()
    assert "## Transfers" in md and "| 2 | transfer from Apple M3 (mlx)" in md
    assert f"yes: {rows[1].val_bpb - rows[0].val_bpb:+.6f}" in md

    # a transfer starts from the last kept trainer, never on top of someone's edit
    (repo / "train_cuda.py").write_text(FAKE_TRAINER + "\n# local edit\n")
    dirty = run_loop(repo, "transfer", "--from", str(other), env=env)
    assert dirty.returncode == 1 and "uncommitted changes" in dirty.stderr
    assert len(read_rows(repo)) == 2 and (repo / "train_cuda.py").read_text().endswith("# local edit\n")
    (repo / "train_cuda.py").write_text(FAKE_TRAINER)
    (repo / "notes.txt").write_text("mine")  # an untracked file: refused too, and left where it is
    dirty = run_loop(repo, "transfer", "--from", str(other), env=env)
    assert dirty.returncode == 1 and "notes.txt" in dirty.stderr and (repo / "notes.txt").read_text() == "mine"
