"""A line of results.tsv that is not a row is skipped, and the reader says which (research/results.py).

Run: `uv run pytest tests/test_results_corrupt.py` (milliseconds).
"""

from __future__ import annotations

from pathlib import Path

from research import results as R


def _row(commit: str, val: float) -> R.Row:
    return R.Row(commit=commit, val_bpb=val, memory_gb=1.0, status="keep", description=f"row {commit}")


def _file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "results.tsv"
    R.ensure_results_file(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(lines))
    return path


def test_a_corrupt_line_is_skipped_and_said_once_with_file_and_line(tmp_path, capsys):
    path = _file(tmp_path, _row("aaaaaaa", 1.5).to_line(), "garbage\tline\n", "\n", _row("bbbbbbb", 1.4).to_line())
    rows = R.read_results(path)
    assert [r.commit for r in rows] == ["aaaaaaa", "bbbbbbb"]  # nothing else lost: the rest is read
    err = capsys.readouterr().err
    # line 1 is the header, 2 the first row, 3 the corrupt one (the blank line 4 is not worth a word)
    assert err == (f"warning: skipped line 3 of {path}: it is not a results row (fewer than the 5 tab-separated "
                   "columns of one); the other rows were read, fix or delete it.\n")
    assert [r.commit for r in R.read_results(path)] == ["aaaaaaa", "bbbbbbb"]
    assert capsys.readouterr().err == ""  # a live page re-reads the file every few seconds: said once


def test_the_caller_can_take_the_sentence_instead(tmp_path, capsys):
    lines = ["oops\n", _row("aaaaaaa", 1.5).to_line(), *[f"bad {i}\n" for i in range(6)]]
    path = _file(tmp_path, *lines)
    problems: list[str] = []
    assert [r.commit for r in R.read_results(path, problems)] == ["aaaaaaa"]
    assert capsys.readouterr().err == ""
    assert problems == [f"warning: skipped lines 2, 4, 5, 6, 7 and 2 more of {path}: they are not results rows "
                        "(fewer than the 5 tab-separated columns of one); the other rows were read, fix or "
                        "delete them."]


def test_a_headerless_file_counts_from_its_first_line(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text(_row("aaaaaaa", 1.5).to_line() + "broken\n")
    problems: list[str] = []
    assert [r.commit for r in R.read_results(path, problems)] == ["aaaaaaa"]
    assert len(problems) == 1 and "skipped line 2 of" in problems[0]


def test_a_clean_file_and_a_torn_last_line_say_nothing(tmp_path, capsys):
    path = _file(tmp_path, _row("aaaaaaa", 1.5).to_line(), "bbbbbbb\t1.4")  # a crash mid-write: no newline
    problems: list[str] = []
    assert [r.commit for r in R.read_results(path, problems)] == ["aaaaaaa"]
    assert problems == [] and capsys.readouterr().err == ""
