"""One ledger (research/ledger.py): the loop, the live page, the report and `compare` show the best the
loop decides with, say which runs it is the mean of, and colour each experiment against the value the
loop compared it with."""

from __future__ import annotations

from pathlib import Path

import pytest

from reporting import live
from reporting.report import cmd_report
from reporting.summary import load_source, summarize
from research.ledger import replay, running_best
from research.results import COLUMNS, Row
from research.session import Settings


def row(n: int, val: float, status: str, desc: str, note: str, trainer: str, gauge: float) -> Row:
    return Row(commit=f"c{n:06d}", val_bpb=val, memory_gb=0.5, status=status, description=desc, backend="cpu",
               device="cpu", protocol="tiny", evaluator_hash="e1e1e1e1e1e1", num_steps=100, branch="autoresearch/t",
               run=n, budget_s=60.0, trainer_hash=trainer, note=note, gauge_before_s=gauge, gauge_after_s=gauge)


# Four baselines on a busy machine, the fifth after the load went away (the loop's gauge twice as fast):
# the loop's best is the mean of the five adjusted to the machine's current speed (the rule's speed
# covariate, research/noise.py), here the fifth's value; then a change measured at that speed is compared
# with it.
ROWS = [row(k, v, "keep", "baseline", f"baseline {k}/5", "h0", 0.2) for k, v in
        enumerate([2.48, 2.49, 2.50, 2.47], start=1)]
ROWS += [row(5, 2.2228, "keep", "baseline (repeat 5/5)", "baseline 5/5", "h0", 0.1),
         row(6, 2.20, "discard", "a small change", "gain within the noise", "h1", 0.1)]


@pytest.fixture
def lab(tmp_path) -> Path:
    (tmp_path / "results.tsv").write_text("\t".join(COLUMNS) + "\n" + "".join(r.to_line() for r in ROWS))
    return tmp_path


def test_every_screen_shows_the_loops_best_and_which_runs_count(lab, tmp_path):
    knobs = Settings()
    st = replay(ROWS, knobs.min_noise, knobs.drift)
    assert st.best == pytest.approx(2.2228) and len(st.best_runs) == 5 and st.noise.speed is not None
    assert "mean of 5 runs (runs 1, 2, 3, 4, 5), adjusted to the machine's speed during run 5" in st.basis()

    s = summarize(load_source(lab / "results.tsv"))
    assert s.best_bpb == pytest.approx(st.best) and s.best_basis == st.basis()
    assert s.best_before(6) == pytest.approx(2.2228)  # what the loop compared run 6 with
    assert s.running_best == pytest.approx(running_best(ROWS, knobs.min_noise, knobs.drift))
    assert s.baseline_bpb == pytest.approx((2.48 + 2.49 + 2.50 + 2.47 + 2.2228) / 5)  # the five are still listed

    page = live.LiveData(lab / "results.tsv")._state()
    assert page["summary"]["best_bpb"] == pytest.approx(2.2228) and page["summary"]["best_basis"] == st.basis()
    (run6,) = [r for r in page["rows"] if r["n"] == 6]
    assert run6["delta"] == pytest.approx(2.20 - 2.2228)  # better than the loop's best, as its note says

    assert cmd_report([lab / "results.tsv"], tmp_path / "out") == 0
    md = next((tmp_path / "out").glob("*.md")).read_text()
    assert "**2.222800**" in md and "mean of 5 runs (runs 1, 2, 3, 4, 5), adjusted" in md


def test_a_reference_file_keeps_its_own_rules(tmp_path):
    """Rows without trainer hashes (the reference's five columns): the baseline mean, then kept changes."""
    text = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n" + "".join(
        f"c{k}\t{v}\t1.0\t{st}\t{d}\n" for k, (v, st, d) in enumerate(
            [(2.0, "keep", "baseline"), (1.9, "keep", "a win"), (1.95, "discard", "no gain")]))
    (tmp_path / "results.tsv").write_text(text)
    s = summarize(load_source(tmp_path / "results.tsv"))
    assert s.best_bpb == pytest.approx(1.9) and s.best_basis == "" and s.running_best == [2.0, 1.9, 1.9]


def test_kind_is_data_and_older_files_get_it_inferred(tmp_path):
    """The `kind` column says what each run was for; a file written before it is read with the kind
    inferred from the loop's old note and description prefixes, and upgraded in place."""
    from research.results import COLUMNS, Kind, append_row, ensure_results_file, read_results

    old_columns = COLUMNS[: COLUMNS.index("kind")]
    notes = [("baseline", "baseline 1/2", "keep"), ("rerun of the best (c000001)", "rerun of the best: 10 experiments",
                                                      "rerun"),
             ("a change", "gain 0.01", "keep"), ("a change", "confirm run of run 3", "rerun"),
             ("rerun of the best (c000001)", "the best, run next to run 3", "rerun"),
             ("transfer from mac c1234567: DEPTH 4", "", "transfer"), ("baseline (repeat 2/2)", "baseline 2/2; crash: x",
                                                                       "crash")]
    rows = [Row(commit="c", val_bpb=2.0, memory_gb=0.1, status=st, description=d, note=n) for d, n, st in notes]
    lines = ["\t".join(old_columns)] + ["\t".join(r.to_line().rstrip("\n").split("\t")[: len(old_columns)])
                                        for r in rows]
    path = tmp_path / "results.tsv"
    path.write_text("\n".join(lines) + "\n")
    want = [Kind.BASELINE, Kind.RERUN, Kind.EXPERIMENT, Kind.CONFIRM, Kind.BEST_NEXT, Kind.TRANSFER, Kind.BASELINE]
    assert [r.kind for r in read_results(path)] == want
    ensure_results_file(path)  # the header gains the column; the old rows still read the same
    assert path.read_text().split("\n", 1)[0].split("\t") == COLUMNS
    append_row(path, Row(commit="d", val_bpb=1.9, memory_gb=0.1, status="keep", description="baseline-like words",
                         note="baseline words in a note", kind=Kind.EXPERIMENT))
    back = read_results(path)
    assert [r.kind for r in back] == want + [Kind.EXPERIMENT]  # written as data, never re-read from prose


def test_reason_is_data_and_older_files_get_it_inferred(tmp_path):
    """The `reason` column says in a few words why a run did not measure or count, from the notes the loop
    writes; a file written before the column reads the same reasons, and a reason written stays as written."""
    from research.results import COLUMNS, append_row, ensure_results_file, read_results

    cases = [
        ("keep", "gain 0.01", ""), ("discard", "no gain: ...", ""), ("rerun", "confirm run of run 3", ""),
        ("rejected", "rejected: overtime: handed over 6.07 s after start, past the 2 s budget + 3.77 s allowed",
         "overtime"),
        ("rejected", "rejected: trained 331.2 s, past the 300 s budget", "overtime"),
        ("rejected", "rejected: changed files other than train_cuda.py: notes.txt", "more than the trainer"),
        ("rejected", "baseline 2/2; rejected: deleted the trainer train_cuda.py", "more than the trainer"),
        ("rejected", "rejected: the run changed refs (refs/heads/x) (put back)", "changed what it must not"),
        ("rejected", "rejected: Locked files were changed during the run (prepare.py); the loop stopped",
         "locked files changed"),
        ("rejected", "rejected: the harness's directory was written to during the run (x)", "wrote to the harness"),
        ("crash", "crash: syntax error on line 3: invalid syntax", "syntax error"),
        ("crash", "crash: killed after 130 s (limit 130 s)", "timeout"),
        ("crash", "crash: ended by the kernel for going past its memory cap of 1.2 GB", "memory"),
        ("crash", "crash: wrote more than 2 GB into its workspace, past the cap (AUTORESEARCH_WORKSPACE_CAP)",
         "disk"),
        ("crash", "crash: stopped: the loop was interrupted", "interrupted"),
        ("crash", "crash: the worker failed: RayTaskError", "worker failed"),
        ("crash", "crash: killed by SIGSEGV", "killed by a signal"),
        ("crash", "crash: exit code 1; FAIL: training loss nan at step 3 (NaN or > 100)", "exit code"),
        ("crash", "crash: something new", "other"),
        ("invalid", "invalid: the logits before a changed token moved", "not causal"),
        ("abort", "abort: at 35% of the budget its training loss trailed the best's", "trailed the best"),
    ]
    rows = [Row(commit="c", val_bpb=0.0, memory_gb=0.0, status=st, description="d", note=n) for st, n, _ in cases]
    assert [r.reason for r in rows] == [want for _, _, want in cases]
    old_columns = COLUMNS[: COLUMNS.index("reason")]
    path = tmp_path / "results.tsv"
    path.write_text("\n".join(["\t".join(old_columns)] + ["\t".join(r.to_line().rstrip("\n").split("\t")[
        : len(old_columns)]) for r in rows]) + "\n")
    assert [r.reason for r in read_results(path)] == [want for _, _, want in cases]
    ensure_results_file(path)  # as a loop opening it does: the header gains the column, the rows read the same
    append_row(path, Row(commit="e", val_bpb=0.0, memory_gb=0.0, status="crash", description="d",
                         note="crash: exit code 2", reason="worker failed"))
    assert path.read_text().split("\n", 1)[0].split("\t") == COLUMNS
    assert [r.reason for r in read_results(path)][:-1] == [want for _, _, want in cases]
    assert read_results(path)[-1].reason == "worker failed"  # written as data, never re-read from the note


def test_keeps_out_of_reach_are_said_with_the_numbers(tmp_path):
    """Noise that makes the needed gain exceed 2% of val_bpb gets one sentence, on the terminal's rule and
    on the page; a quiet branch gets none."""
    from research.ledger import OUT_OF_REACH, needed_gain, reach_sentence

    noisy = [row(k, v, "keep", "baseline", f"baseline {k}/3", "h0", 0.1) for k, v in enumerate([2.0, 2.3, 1.8], 1)]
    quiet = [row(k, v, "keep", "baseline", f"baseline {k}/3", "h0", 0.1) for k, v in enumerate([2.0, 2.001, 1.999], 1)]
    knobs = Settings()
    loud, calm = replay(noisy, knobs.min_noise), replay(quiet, knobs.min_noise)
    need = needed_gain(loud, knobs.alpha, knobs.confirm)
    assert need > OUT_OF_REACH * loud.best and needed_gain(calm, knobs.alpha, knobs.confirm) < OUT_OF_REACH * calm.best
    text = reach_sentence(loud, knobs.alpha, knobs.confirm, workers=4)
    assert f"by {need:.4f}" in text and "quieter machine" in text and "fewer workers than 4" in text
    assert reach_sentence(calm, knobs.alpha, knobs.confirm) is None
    (tmp_path / "results.tsv").write_text("\t".join(COLUMNS) + "\n" + "".join(r.to_line() for r in noisy))
    page = live.LiveData(tmp_path / "results.tsv")._state()
    assert page["noise"]["out_of_reach"] == reach_sentence(loud, knobs.alpha, knobs.confirm)
