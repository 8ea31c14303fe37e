"""A model the harness finds non-causal is tampering: the loop records it and stops the branch
(research/tamper.py), `loop.py try` and `loop.py run` refuse the branch until `loop.py clear-tampering`.

End to end with the stand-in trainer of tests/test_loop.py (MODE "noncausal": its unigram graph adds a bonus
on the next token), through `loop.py try`, then `loop.py run --workers 2` on Ray. About 1 min for the first
on a 2-core machine, 1 more for the second (Ray's start).

Run: uv run pytest tests/test_tamper_stop.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import (FAKE_TRAINER, assert_clean, edit, git, loop_env, make_repo, read_rows, run_loop, seed,
                       write_script)

from research import tamper
from research.run import read_result
from research.results import Row

PEEK = ('MODE = "ok"', 'MODE = "noncausal"')
# the look-ahead in operators every graph loader of the harness runs (one_hot is not among them)
ONE_HOT = "logits + 20.0 * torch.nn.functional.one_hot(nxt, self.logp.shape[0]).float()"
EQ_HOT = "logits + 20.0 * (torch.arange(self.logp.shape[0]) == nxt[..., None]).float()"
PEEKS = [PEEK] + ([(ONE_HOT, EQ_HOT)] if ONE_HOT in FAKE_TRAINER else [])
STOPPED = "that is tampering, so branch autoresearch/{tag} is stopped"
REFUSED = "Branch autoresearch/{tag} is stopped for tampering: run {run} handed over a non-causal model"


def _trainer(repo: Path, old: str, new: str) -> None:
    path = repo / "train_cuda.py"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_both_verdicts_of_the_harness_are_tampering_and_a_cleared_run_stays_cleared(tmp_path):
    """'causality' and 'state' are invalid (and nothing else the harness says is); the stop follows the rows:
    the latest tampering row of the branch not listed as cleared."""
    for kind in tamper.KINDS:
        status, m, reason = read_result({"valid": False, "kind": kind, "reason": "why"}, facts={},
                                        evaluator_hash="x", protocol="tiny")
        assert (status, m, reason) == ("invalid", None, "why")
    assert read_result({"valid": False, "kind": "graph", "reason": "no"}, facts={}, evaluator_hash="x",
                       protocol="tiny")[0] == "crash"
    runs = tmp_path / "runs"

    def row(run, note, status="invalid", branch="autoresearch/a"):
        return Row("abc1234", 0.0, 0.0, status, "x", branch=branch, run=run, note=note)

    rows = [row(1, "invalid: an old row, before tampering stopped branches"),  # not a stop
            row(2, "discard", status="discard"), row(3, tamper.note("logits at position 5 moved")),
            row(4, tamper.note("x"), branch="autoresearch/b")]
    assert tamper.stopped_by(rows, "autoresearch/a", runs) is rows[2]
    with pytest.raises(tamper.BranchStopped, match=r"^Branch autoresearch/a is stopped for tampering: run 3 "):
        tamper.check_not_stopped(rows, "autoresearch/a", runs)
    assert [r.run for r in tamper.clear(rows, "autoresearch/a", runs)] == [3]
    assert tamper.stopped_by(rows, "autoresearch/a", runs) is None and tamper.clear(rows, "autoresearch/a", runs) == []
    assert tamper.stopped_by(rows, "autoresearch/b", runs) is rows[3]  # another branch: its own stop
    state = tamper.note("the same batch gave logits differing ..., so the graph keeps state between calls")
    rows.append(row(5, f"baseline 1/1; {state}"))
    with pytest.raises(tamper.BranchStopped, match="run 5 handed over a model that keeps state"):
        tamper.check_not_stopped(rows, "autoresearch/a", runs)
    (runs / tamper.CLEARED_FILE).unlink()  # the record of clearing is lost: stopped again, never the reverse
    assert tamper.stopped_by(rows, "autoresearch/a", runs) is rows[4]


@pytest.mark.slow  # an end-to-end run through loop.py (CI runs the slow set)
def test_a_non_causal_hand_over_through_try_stops_the_branch_until_cleared(tmp_path, tiny_cache):
    repo = make_repo(tmp_path)
    seed(repo, "tamper")
    env = loop_env(tiny_cache)
    for old, new in PEEKS:
        _trainer(repo, old, new)
    proc = run_loop(repo, "try", "peek at the next token", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = read_rows(repo)[-1]
    assert row.status == "invalid" and row.note.startswith("invalid (tampering): ") and "sees the future" in row.note
    assert STOPPED.format(tag="tamper") in proc.stderr and proc.stderr.count("error: ") == 1, proc.stderr
    assert f"runs/{row.run}/" in proc.stderr and "loop.py clear-tampering" in proc.stderr
    assert 'MODE = "noncausal"' in (repo / "train_cuda.py").read_text()  # the edit is left to look at
    n = len(read_rows(repo))

    refused = REFUSED.format(tag="tamper", run=row.run)
    again = run_loop(repo, "try", "try it once more", env=env)
    assert again.returncode == 1 and refused in again.stderr, again.stdout + again.stderr
    git(repo, "checkout", "-q", "--", "train_cuda.py")
    script = write_script(tmp_path, [edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "a clear win")])
    run = run_loop(repo, "run", "--agent", "scripted", "--script", script, "--tag", "tamper", "--max-experiments",
                   "1", env=env)
    assert run.returncode == 1 and refused in run.stderr, run.stdout + run.stderr
    assert len(read_rows(repo)) == n  # neither ran anything

    cleared = run_loop(repo, "clear-tampering", env=env)
    assert cleared.returncode == 0, cleared.stdout + cleared.stderr
    assert f"Lifted the tampering stop of autoresearch/tamper (run {row.run};" in cleared.stdout
    assert json.loads((repo / "runs" / tamper.CLEARED_FILE).read_text())["autoresearch/tamper"][0]["run"] == row.run
    assert "is not stopped for tampering" in run_loop(repo, "clear-tampering", env=env).stdout
    _trainer(repo, "VAL_BPB = 2.0", "VAL_BPB = 1.5")
    ok = run_loop(repo, "try", "a clear win", "--no-confirm", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert read_rows(repo)[-1].status == "keep"
    assert read_rows(repo)[n - 1].status == "invalid"  # the tampering row stays


@pytest.mark.slow  # a loop run on Ray (CI runs the slow set)
def test_a_non_causal_hand_over_stops_a_two_worker_run(tmp_path, tiny_cache):
    pytest.importorskip("ray")
    repo = make_repo(tmp_path)
    seed(repo, "par")
    env = loop_env(tiny_cache)
    script = write_script(tmp_path, [{"description": "peek at the next token",
                                      "edits": [{"old": old, "new": new} for old, new in PEEKS]},
                                     edit("VAL_BPB = 2.0", "VAL_BPB = 1.9", "a small win")])
    args = ["run", "--workers", "2", "--agent", "scripted", "--script", script, "--tag", "par", "--max-experiments",
            "2", "--no-confirm", "--max-fix-attempts", "0", "--remeasure-every", "0"]
    proc = subprocess.run([sys.executable, "loop.py", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=400, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert STOPPED.format(tag="par") in proc.stderr, proc.stderr
    rows = read_rows(repo)
    bad = [r for r in rows if r.status == "invalid"]
    assert len(bad) == 1 and bad[0].note.startswith("invalid (tampering): ") and bad[0].worker.startswith("w")
    assert_clean(repo)
    assert len([ln for ln in git(repo, "worktree", "list").split("\n") if ln.strip()]) == 1  # the pool is gone
    again = subprocess.run([sys.executable, "loop.py", *args], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=400, stdin=subprocess.DEVNULL)
    assert again.returncode == 1 and REFUSED.format(tag="par", run=bad[0].run) in again.stderr, again.stderr
    assert len(read_rows(repo)) == len(rows)
