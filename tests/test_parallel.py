"""Parallel experiments on Ray (research/parallel.py, research/trial_worker.py): `loop.py run --workers N`.

The end-to-end tests start a local Ray (2 CPUs) in a loop subprocess on a temporary repository with the
stand-in trainer of tests/test_loop.py and the scripted agent; every run is sandboxed and scored by the
harness as in the single-worker loop. About 70 s for the default ones on a 2-core machine (Ray's start
takes ~12 s of it); the killed-worker and Ctrl-C test (about 80 s) is marked slow.

Run: `uv run pytest tests/test_parallel.py` (add `-m slow` for the killed worker).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.test_loop import (FAKE_TRAINER, assert_clean, edit, git, loop_env, make_repo, read_rows, seed, wait_for,
                             write_script)

pytest.importorskip("ray")

# The stand-in trainer with its val_bpb made of two gains on lines apart, so that two changes made on the
# same best merge cleanly: A_GAIN on one line, B_GAIN two lines further down.
TWO_GAINS = FAKE_TRAINER.replace("VAL_BPB = 2.0\n", "A_GAIN = 0.0\nVAL_BASE = 2.0\nB_GAIN = 0.0\n", 1).replace(
    "# --- end hyperparameters ---\n", "# --- end hyperparameters ---\nVAL_BPB = VAL_BASE - A_GAIN - B_GAIN\n", 1)


def worktrees(repo: Path) -> list[str]:
    return [line for line in git(repo, "worktree", "list", "--porcelain").split("\n") if line.startswith("worktree ")]


def start_loop(repo: Path, args: list[str], env: dict, out: Path) -> subprocess.Popen:
    f = open(out, "w")
    return subprocess.Popen([sys.executable, "loop.py", *args], cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)  # its own group, as a shell


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# without Ray running


def test_bad_worker_counts_and_mixed_hardware_are_refused(tmp_path, tiny_cache):
    from research.pool import check_hellos
    from research.session import SessionError

    repo = make_repo(tmp_path)
    env = loop_env(tiny_cache)
    proc = subprocess.run([sys.executable, "loop.py", "run", "--workers", "0"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--workers must be at least 1 (got 0)" in proc.stderr, proc.stderr

    s = SimpleNamespace(host=SimpleNamespace(backend="cuda", device_name="NVIDIA H100 80GB HBM3"),
                        protocol=SimpleNamespace(name="tiny"), budget=60.0, evaluator_hash="abc")
    hello = {"worker": "w0@a", "hardware": "cuda: NVIDIA H100 80GB HBM3", "protocol": "tiny", "budget": 60.0,
             "evaluator": "abc", "data": "x", "problem": None}
    other = {**hello, "worker": "w1@b", "hardware": "cuda: NVIDIA A100-SXM4-40GB"}
    with pytest.raises(SessionError) as e:
        check_hellos(s, [hello, other])
    msg = str(e.value)
    assert "same hardware class" in msg and "w1@b is cuda: NVIDIA A100-SXM4-40GB" in msg and msg.count(". ") == 0
    with pytest.raises(SessionError, match="60 s budget|30 s budget"):
        check_hellos(s, [{**hello, "budget": 30.0}])


def test_ray_is_imported_only_for_parallel_runs(monkeypatch):
    """The single-worker path never imports Ray (loop.py imports research.pool for its flags only);
    without Ray installed, a parallel run says how to get it."""
    from research import pool
    from research.session import SessionError

    code = "import sys, loop, research.parallel, research.pool; assert 'ray' not in sys.modules, 'ray imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(pool.__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(SessionError, match="run on Ray, which is not installed here"):
        pool.import_ray()


def test_merge_of_a_stale_change(tmp_path):
    from research.gitrepo import merge_text

    base = TWO_GAINS
    ours = base.replace("A_GAIN = 0.0", "A_GAIN = 0.5")
    theirs = base.replace("B_GAIN = 0.0", "B_GAIN = 0.7").replace("SLEEP = 0.0", "SLEEP = 4.0")
    merged = merge_text(tmp_path, ours, base, theirs)
    assert merged is not None and "A_GAIN = 0.5" in merged and "B_GAIN = 0.7" in merged and "SLEEP = 4.0" in merged
    assert merge_text(tmp_path, ours, base, base.replace("A_GAIN = 0.0", "A_GAIN = 0.3")) is None  # same line


# ------------------------------------------------------------------------------------------------
# local Ray, two CPU workers


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_two_workers_one_record_and_the_stale_base_rule(tmp_path, tiny_cache):
    """Two changes proposed from the same best at once: the quick one is kept; the slow one wins against
    the old best, comes back stale, is merged onto the new best and re-run there, and kept. Rows from both
    workers land in one results.tsv; every worktree is gone afterwards and the tree is clean."""
    repo = make_repo(tmp_path, TWO_GAINS)
    script = write_script(tmp_path, [
        edit("A_GAIN = 0.0", "A_GAIN = 0.5", "gain A"),
        {"description": "gain B, slowly", "edits": [{"old": "B_GAIN = 0.0", "new": "B_GAIN = 0.7"},
                                                     {"old": "SLEEP = 0.0", "new": "SLEEP = 5.0"}]},
        edit('MODE = "ok"', 'MODE = "crash"', "a crash"),
    ])
    env = loop_env(tiny_cache, budget=2)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "loop.py", "run", "--workers", "2", "--agent", "scripted", "--script",
                           script, "--tag", "par", "--max-experiments", "3", "--baseline-runs", "2", "--no-confirm",
                           "--max-fix-attempts", "0", "--remeasure-every", "0"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = read_rows(repo)
    by = {r.description: r for r in rows}
    assert [r.status for r in rows if r.note.startswith("baseline")] == ["keep", "keep"]
    assert len({r.worker for r in rows if r.note.startswith("baseline")}) == 2  # one baseline on each worker
    assert {r.worker.split("@")[0] for r in rows} == {"w0", "w1"}
    assert by["gain A"].status == "keep"
    assert by["a crash"].status == "crash" and "deliberate crash" in by["a crash"].note
    stale = by["gain B, slowly"]
    assert stale.status == "discard" and "stale win" in stale.note, stale.note
    merged = [r for r in rows if r.description.startswith("gain B, slowly (merged onto ")]
    assert len(merged) == 1 and merged[0].status == "keep", [(r.description, r.status, r.note) for r in rows]
    assert f"re-run as run {merged[0].run}" in stale.note
    assert merged[0].val_bpb < by["gain A"].val_bpb < rows[0].val_bpb
    trainer = (repo / "train_cuda.py").read_text()
    assert "A_GAIN = 0.5" in trainer and "B_GAIN = 0.7" in trainer
    log = git(repo, "log", "--format=%s", "main..HEAD").split("\n")
    assert log == [merged[0].description, "gain A", 'Hyperparameters for this host, one line each (HARDWARE == "cpu")'], log
    assert_clean(repo)
    assert len(worktrees(repo)) == 1, worktrees(repo)  # only the repository itself
    assert "done: 3 experiment(s)" in proc.stdout
    print(f"two-worker loop: {took:.0f} s")


@pytest.mark.slow
def test_a_killed_worker_is_requeued_and_ctrl_c_stops_every_worker(tmp_path, tiny_cache):
    """A worker process killed mid-run: its job goes back to the queue, runs on a fresh worker and is
    recorded once; nothing recorded is lost. Then a resumed loop with 3 workers is stopped with Ctrl-C
    while its changes run: exit 130, every worktree removed, the tree clean, the rows intact."""
    repo = make_repo(tmp_path)
    seed(repo, "kill")
    script = write_script(tmp_path, [
        edit("SLEEP = 0.0", "SLEEP = 6.0", "a slow change"),
        edit("VAL_BPB = 2.0", "VAL_BPB = 2.2", "a worse change"),
    ])
    env = loop_env(tiny_cache, budget=2)
    out = tmp_path / "out1.txt"
    proc = start_loop(repo, ["run", "--workers", "2", "--agent", "scripted", "--script", script, "--tag", "kill",
                             "--max-experiments", "2", "--baseline-runs", "1", "--remeasure-every", "0"], env, out)
    try:
        started = re.compile(r"\] a slow change$", re.MULTILINE)
        wait_for(lambda: started.search(out.read_text()), "the slow change to start", 240, (proc,))
        text = out.read_text()
        pids = dict(re.findall(r"(w\d)@\S+ \(pid (\d+)\)", text))
        slot = re.search(r"\[run \d+ on (w\d)@\S+\] a slow change", text).group(1)
        time.sleep(3)
        os.kill(int(pids[slot]), signal.SIGKILL)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert f"worker {slot}@" in text and "was lost" in text and "goes back to the queue" in text, text[-3000:]
    rows = read_rows(repo)
    assert [r.description for r in rows].count("a slow change") == 1
    assert {r.status for r in rows if r.description in ("a slow change", "a worse change")} <= {"discard", "keep"}
    assert_clean(repo)
    assert len(worktrees(repo)) == 1
    before = (repo / "results.tsv").read_bytes()

    # resume with another number of workers, then Ctrl-C while the changes run
    script2 = write_script(tmp_path, [edit("SLEEP = 0.0", "SLEEP = 30.0", "a very slow change"),
                                      edit("DEPTH = 8", "DEPTH = 9", "another slow one", )])
    out2 = tmp_path / "out2.txt"
    proc = start_loop(repo, ["run", "--workers", "3", "--agent", "scripted", "--script", script2, "--tag", "kill",
                             "--baseline-runs", "1", "--remeasure-every", "0"], env, out2)
    try:
        wait_for(lambda: "a very slow change" in out2.read_text(), "the change to start", 240, (proc,))
        time.sleep(4)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out2.read_text()
    assert proc.returncode == 130, text[-3000:]
    wait_for(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and _in_group(int(p), proc.pid)],
             "every process of the loop's group to end", 60)
    assert "interrupted" in text
    assert (repo / "results.tsv").read_bytes() == before
    assert_clean(repo)
    assert len(worktrees(repo)) == 1, worktrees(repo)
