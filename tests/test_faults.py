"""Fault injection for loop.py: each test breaks one thing during a real loop run and checks how the loop copes.

Run: `uv run pytest tests/test_faults.py` (about three minutes on a 2-core CPU; no network, GPU or API key).

Every scenario runs the loop on a temporary git repository holding a copy of the project, on the `tiny`
protocol with a budget of a second or two, driven by the scripted agent (or by the Claude agent through
the real `anthropic` client against a local fake Messages API). Most start from a results file left by an
earlier session (a baseline on the branch, a row of another branch) so that "finished rows survive" can
be checked byte for byte. After the fault, `check_after` asserts what must hold whatever happened:

1. the loop carried on, or stopped with one clear sentence (`error: ...`, no traceback);
2. every row finished before the fault is intact and every line of results.tsv parses;
3. the work tree is clean, on the branch, whose head is the last kept commit;
4. the faulty experiment was logged with the right status (or, when it never finished, not at all).

Faults about training itself (an exception mid-training, NaN loss, out of memory, a model that sees the
future, a trainer that skips the evaluation) edit the real train_cuda.py; the others use the stand-in
trainer of test_loop.py (whose helpers this file reuses), so they take a second or two each.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import (FAKE_TRAINER, FakeMessagesAPI, alive, edit, error, git, loop_env, make_repo,  # noqa: E402
                       message, read_rows, run_loop, tool, write_script)

import prepare  # noqa: E402
from research import results as R  # noqa: E402
from research.guards import LOCK_FILE, LockError, RepoLock, text_hash  # noqa: E402

WIN = edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "a clear win")  # the stand-in trainer's harmless, better change

# The stand-in trainer, but reading the protocol's data the way a real trainer and the evaluator do
# (tokenizer byte lengths, the validation stream), so damaged data makes it fail.
DATA_TRAINER = FAKE_TRAINER.replace(
    "    p = prepare.get_protocol()\n",
    "    p = prepare.get_protocol()\n"
    "    prepare.Tokenizer.load(p)\n"
    "    prepare.load_token_bytes(p)\n"
    "    next(prepare.make_dataloader(p, 8, p.max_seq_len, \"val\"))\n",
)
assert DATA_TRAINER != FAKE_TRAINER


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@dataclass
class Prior:
    """What a repository held before the fault: results.tsv's bytes, its row count, branch and kept commit."""

    repo: Path
    branch: str
    kept: str  # full hash of the last kept commit
    data: bytes
    rows: int


def seed(repo: Path, tag: str, val: float = 2.0) -> Prior:
    """Leave `repo` as an earlier session would have: branch autoresearch/<tag> checked out at HEAD, with
    a baseline row for it in results.tsv, after a row of another branch. The loop resumes it without
    running a baseline again (--baseline-runs 1)."""
    head = git(repo, "rev-parse", "HEAD")
    branch = f"autoresearch/{tag}"
    git(repo, "checkout", "-q", "-b", branch)
    path = repo / "results.tsv"
    R.ensure_results_file(path)
    common = dict(timestamp="2026-03-08T22:14:05+01:00", backend="cpu", device="cpu", protocol="tiny",
                  evaluator_hash=prepare.evaluator_hash(), memory_gb=0.5, training_seconds=1.0, num_steps=10,
                  trainer_hash=text_hash((repo / "train_cuda.py").read_text()), wall_seconds=3.2)
    R.append_row(path, R.Row(commit="a1b2c3d", val_bpb=1.9, status="discard", description="an idea on another branch",
                             branch="autoresearch/older", run=7, note="no gain: +0.1", hyperparams={"DEPTH": 2},
                             **common))
    R.append_row(path, R.Row(commit=head[:7], val_bpb=val, status="keep", description="baseline", branch=branch,
                             run=1, note="baseline 1/1", hyperparams={"VAL_BPB": val}, **common))
    data = path.read_bytes()
    return Prior(repo=repo, branch=branch, kept=head, data=data, rows=len(R.read_results(path)))


def check_after(prior: Prior, statuses: list[str], *, lock_free: bool = True) -> list[R.Row]:
    """Assert the invariants after a fault; returns the rows added since `prior`, whose statuses must be `statuses`."""
    repo = prior.repo
    data = (repo / "results.tsv").read_bytes()
    # 2. finished rows are intact, byte for byte, and every line of the file parses
    assert data.startswith(prior.data), "a finished row was changed or lost"
    assert data.endswith(b"\n"), f"torn last row: {data[-80:]!r}"
    lines = data.decode("utf-8").split("\n")[:-1]
    assert lines[0].split("\t") == R.COLUMNS
    for line in lines[1:]:
        values = line.split("\t")
        assert len(values) == len(R.COLUMNS), line
        assert values[3] in R.STATUSES and float(values[1]) >= 0 and float(values[2]) >= 0, line
        json.loads(values[R.COLUMNS.index("hyperparams")])
    rows = read_rows(repo)
    new = rows[prior.rows:]
    assert [r.status for r in new] == statuses, [(r.status, r.note) for r in new]
    for r in new:
        assert r.branch == prior.branch and r.protocol == "tiny" and r.description
        if not r.ok:
            assert r.val_bpb == 0.0 and r.memory_gb == 0.0  # the reference's convention for failed runs
    # 3. clean tree, on the branch, at the last kept commit
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "symbolic-ref", "--short", "HEAD") == prior.branch
    kept = [r for r in rows if r.branch == prior.branch and r.status == "keep"][-1]
    head = git(repo, "rev-parse", "HEAD")
    assert head.startswith(kept.commit), f"HEAD {head[:7]} is not the last kept commit {kept.commit}"
    assert git(repo, "rev-list", "--count", f"{prior.kept}..HEAD") == str(sum(r.status == "keep" for r in new))
    if lock_free:
        assert not (repo / LOCK_FILE).exists()
    return new


def assert_stopped(proc, *fragments: str) -> str:
    """The loop exited 1 with one `error:` sentence (no traceback) holding every fragment; returns it."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for f in fragments:
        assert f in last, last
    return last


def loop_args(tag: str, script: str, *more: str) -> list[str]:
    return ["run", "--agent", "scripted", "--script", script, "--tag", tag, "--baseline-runs", "1", *more]


def start_loop(repo: Path, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python loop.py ARGS` in the background, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "loop.py", *args], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_for(condition, what: str, timeout: float = 120, procs: tuple = ()) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds or when one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            assert p.poll() is None, f"the loop exited (code {p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def trainer_pid(repo: Path) -> int:
    """Pid (= process group) of the newest stand-in trainer run, from the file it writes at start."""
    newest = max((repo / "runs").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    return json.loads((newest / "child_env.json").read_text())["pid"]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs (macOS): ask the kernel whether the group still exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(d.name))
    return members


def assert_gone(pgid: int, *pids: int, timeout: float = 10) -> None:
    """No process of group `pgid` (and none of `pids`) survives."""
    deadline = time.monotonic() + timeout
    while (group_members(pgid) or any(alive(p) for p in pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == [] and not any(alive(p) for p in pids)


def private_cache(tiny_cache: Path, tmp_path: Path) -> Path:
    """A copy of the prepared tiny cache this test may damage."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    return cache


def val_shard(cache: Path) -> Path:
    p = prepare.PROTOCOLS["tiny"]
    return cache / p.name / "data" / prepare.shard_name(p.val_shard)


def tokenizer_files(cache: Path) -> list[Path]:
    return [cache / "tiny" / "tokenizer" / name for name in ("tokenizer.pkl", "token_bytes.npy")]


# ------------------------------------------------------------------------------------------------
# 1-2. the edited trainer does not even start
# ------------------------------------------------------------------------------------------------


def test_syntax_error_is_a_crash_then_the_fix_is_kept(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "syntax")
    script = write_script(tmp_path, [
        edit("VAL_BPB = 2.0", "VAL_BPB = (1.5", "an unbalanced parenthesis"),
        edit("VAL_BPB = (1.5", "VAL_BPB = 1.5", "fix: close the parenthesis"),
    ])
    proc = run_loop(repo, *loop_args("syntax", script, "--max-experiments", "2"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    crash, fixed = check_after(prior, ["crash", "keep"])
    assert crash.note.startswith("crash: syntax error on line ") and crash.commit != R.NO_COMMIT
    assert "SyntaxError" in (repo / "runs" / str(crash.run) / "log.txt").read_text()
    assert "asking the scripted agent to fix the crash (attempt 1 of 2)" in proc.stdout
    assert fixed.val_bpb == 1.5 and "VAL_BPB = 1.5" in (repo / "train_cuda.py").read_text()


def test_import_error_is_a_crash_and_the_loop_carries_on(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "import")
    script = write_script(tmp_path, [
        edit("import prepare\n", "import prepare\nimport flash_attn_9000\n",
             "use a kernel package that is not installed"),
        WIN,
    ])
    proc = run_loop(repo, *loop_args("import", script, "--max-experiments", "2", "--max-fix-attempts", "0"),
                    env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    crash, win = check_after(prior, ["crash", "keep"])
    assert "exit code 1" in crash.note and "No module named 'flash_attn_9000'" in crash.note
    assert "ModuleNotFoundError" in (repo / "runs" / str(crash.run) / "log.txt").read_text()
    assert win.val_bpb == 1.5


# ------------------------------------------------------------------------------------------------
# 3-5. training goes wrong (the real trainer)
# ------------------------------------------------------------------------------------------------


def _real_trainer_fault(tiny_cache, tmp_path, tag: str, step: dict) -> tuple[R.Row, str]:
    """One experiment on the real train_cuda.py with `step` applied; returns its row and log."""
    repo = make_repo(tmp_path, trainer=None)
    prior = seed(repo, tag)
    script = write_script(tmp_path, [step])
    proc = run_loop(repo, *loop_args(tag, script, "--max-experiments", "1", "--max-fix-attempts", "0"),
                    env=loop_env(tiny_cache, budget=1), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = check_after(prior, [step["expect"]])
    assert git(repo, "diff", prior.kept, "HEAD") == ""
    return row, (repo / "runs" / str(row.run) / "log.txt").read_text()


def test_exception_mid_training(tiny_cache, tmp_path):
    bug = "        if step == 2:\n            raise RuntimeError(\"injected fault at step 2\")\n"
    step = edit("        optimizer.step()\n", "        optimizer.step()\n" + bug, "an optimizer change with a bug",
                expect="crash")
    row, log = _real_trainer_fault(tiny_cache, tmp_path, "exception", step)
    assert "RuntimeError: injected fault at step 2" in row.note
    assert "step 00001" in log and "step 00003" not in log  # it really was training


def test_nan_loss_fails_fast(tiny_cache, tmp_path):
    step = edit("EMBEDDING_LR = 0.6", "EMBEDDING_LR = float(\"nan\")", "a learning rate that is not a number",
                expect="crash")
    row, log = _real_trainer_fault(tiny_cache, tmp_path, "nan", step)
    assert "FAIL: training loss nan" in row.note
    assert "val_bpb" not in log  # stopped before evaluating


def test_out_of_memory(tiny_cache, tmp_path):
    # an allocation no machine can satisfy (beyond the address space): fails at once, takes no memory
    step = edit("    model = build_model(config)\n",
                "    model = build_model(config)\n    activations = torch.empty(1 << 62, dtype=torch.uint8)\n",
                "keep every activation (4 EiB)", expect="crash")
    row, log = _real_trainer_fault(tiny_cache, tmp_path, "oom", step)
    assert "exit code 1" in row.note and "memory" in row.note.lower()


# ------------------------------------------------------------------------------------------------
# 6-7. the trainer hangs, or dies by a signal
# ------------------------------------------------------------------------------------------------


def test_hang_past_the_timeout_kills_the_whole_group(tiny_cache, tmp_path):
    """A trainer (and its worker) that ignore SIGTERM and never end: killed at the limit, nothing survives."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "hang")
    pid_file = tmp_path / "worker.pid"
    script = write_script(tmp_path, [
        {"description": "a data worker that never returns", "edits": [
            {"old": 'MODE = "ok"', "new": 'MODE = "hang"'},
            {"old": "import prepare\n",
             "new": "import prepare\nimport signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"},
        ]},
        WIN,
    ])
    t0 = time.monotonic()
    proc = run_loop(repo, *loop_args("hang", script, "--max-experiments", "2", "--max-fix-attempts", "0",
                                     "--timeout-margin", "1"),
                    env=loop_env(tiny_cache, budget=1, FAKE_PID_FILE=str(pid_file)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 90
    crash, win = check_after(prior, ["crash", "keep"])
    assert "killed after" in crash.note and "limit 3 s" in crash.note
    assert 3 <= crash.wall_seconds < 30
    assert "killed after" in (repo / "runs" / str(crash.run) / "log.txt").read_text()
    hung = json.loads((repo / "runs" / str(crash.run) / "child_env.json").read_text())["pid"]
    assert_gone(hung, read_int(pid_file))
    assert win.val_bpb == 1.5


def _no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core file in the repository is not the point here


@pytest.mark.parametrize("how,signame", [
    ("import ctypes\n    ctypes.string_at(0)  # reads address 0", "SIGSEGV"),
    ("os.kill(os.getpid(), 9)", "SIGKILL"),
], ids=["segfault", "sigkill"])
def test_trainer_killed_by_a_signal(tiny_cache, tmp_path, how, signame):
    repo = make_repo(tmp_path)
    prior = seed(repo, "signal")
    start = '    print("fake trainer starting", flush=True)\n'
    script = write_script(tmp_path, [edit(start, f"{start}    {how}\n", "a native extension with a bug"), WIN])
    args = loop_args("signal", script, "--max-experiments", "2", "--max-fix-attempts", "0")
    proc = subprocess.run([sys.executable, "loop.py", *args], cwd=repo, env=loop_env(tiny_cache), capture_output=True,
                          text=True, timeout=240, preexec_fn=_no_core_files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    crash, win = check_after(prior, ["crash", "keep"])
    assert signame in crash.note, crash.note
    assert_gone(json.loads((repo / "runs" / str(crash.run) / "child_env.json").read_text())["pid"])


# ------------------------------------------------------------------------------------------------
# 8-9. the loop itself is interrupted or killed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_loop_interrupted_mid_experiment_then_resumed(tiny_cache, tmp_path, sig):
    repo = make_repo(tmp_path)
    prior = seed(repo, "int")
    pid_file = tmp_path / "worker.pid"
    env = loop_env(tiny_cache, FAKE_PID_FILE=str(pid_file))
    slow = write_script(tmp_path, [edit('MODE = "ok"', 'MODE = "hang"', "a long experiment")])
    loop = start_loop(repo, loop_args("int", slow), env, tmp_path / "first.log")
    wait_for(lambda: read_int(pid_file) is not None, "the trainer to start its worker", procs=(loop,))
    trainer, worker = trainer_pid(repo), read_int(pid_file)
    assert group_members(trainer)
    loop.send_signal(sig)
    assert loop.wait(timeout=60) == 130
    out = (tmp_path / "first.log").read_text()
    assert "interrupted" in out and "Run the same command again to resume" in out and "Traceback" not in out
    assert_gone(trainer, worker)
    check_after(prior, [])  # the interrupted experiment left no row, no commit, no lock

    again = run_loop(repo, *loop_args("int", write_script(tmp_path, [WIN]), "--max-experiments", "1"), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming branch autoresearch/int" in again.stdout
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == 1.5


def test_loop_killed_mid_experiment_then_resumed(tiny_cache, tmp_path):
    """SIGKILL (OOM killer, power loss): no row, a commit no row records, a stale lock and a trainer still
    running are left behind; the next start ends the trainer, drops the commit, takes the lock over."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "kill")
    pid_file = tmp_path / "worker.pid"
    env = loop_env(tiny_cache, FAKE_PID_FILE=str(pid_file))
    slow = write_script(tmp_path, [edit('MODE = "ok"', 'MODE = "hang"', "a long experiment")])
    loop = start_loop(repo, loop_args("kill", slow), env, tmp_path / "first.log")
    wait_for(lambda: read_int(pid_file) is not None, "the trainer to start its worker", procs=(loop,))
    trainer, worker = trainer_pid(repo), read_int(pid_file)
    loop.kill()
    loop.wait()
    assert (repo / LOCK_FILE).exists() and (repo / "results.tsv").read_bytes() == prior.data
    assert git(repo, "rev-list", "--count", f"{prior.kept}..HEAD") == "1"  # the experiment's commit
    try:
        assert group_members(trainer)  # the trainer lives in its own session: the kill did not reach it
        again = run_loop(repo, *loop_args("kill", write_script(tmp_path, [WIN]), "--max-experiments", "1"), env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "dropped unrecorded experiment commits" in again.stdout
        assert f"ended the trainer (process group {trainer}) that a killed loop left running" in again.stdout
        assert_gone(trainer, worker)
        (win,) = check_after(prior, ["keep"])
        assert win.val_bpb == 1.5 and git(repo, "rev-parse", "HEAD~1") == prior.kept
    finally:
        for pid in group_members(trainer):
            os.kill(pid, signal.SIGKILL)


def test_try_killed_during_its_baseline_keeps_the_edit(tiny_cache, tmp_path):
    """`loop.py try` on a branch without a baseline sets the user's edit aside to run the baseline; a
    SIGKILL then must not lose the edit: a copy waits under runs/, and the next `try` points to it."""
    waiting = FAKE_TRAINER.replace(
        "    time.sleep(SLEEP)\n",
        "    while not os.path.exists(os.environ[\"RELEASE_FILE\"]):\n        time.sleep(0.05)\n")
    repo = make_repo(tmp_path, waiting)
    git(repo, "checkout", "-q", "-b", "autoresearch/ext")
    trainer = repo / "train_cuda.py"
    trainer.write_text(waiting.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))  # the user's edit
    release = tmp_path / "release"
    env = loop_env(tiny_cache, RELEASE_FILE=str(release))
    loop = start_loop(repo, ["try", "lower it"], env, tmp_path / "first.log")
    wait_for(lambda: (repo / "runs").is_dir() and any((repo / "runs").glob("*/child_env.json")),
             "the baseline's trainer to start", procs=(loop,))
    loop.kill()
    loop.wait()
    assert trainer.read_text() == waiting  # set aside while the baseline ran
    (copy,) = (repo / "runs").glob("set-aside-*-train_cuda.py")
    assert "VAL_BPB = 1.5" in copy.read_text()

    proc = run_loop(repo, "try", "lower it", env=env)
    assert_stopped(proc, "Nothing to try", str(copy.relative_to(repo)))
    shutil.copy(copy, trainer)
    release.touch()
    proc = run_loop(repo, "try", "lower it", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(r.status, r.val_bpb) for r in read_rows(repo)] == [("keep", 2.0), ("keep", 2.0), ("keep", 1.5)]
    assert git(repo, "status", "--porcelain") == "" and git(repo, "log", "-1", "--format=%s") == "lower it"
    assert not (repo / LOCK_FILE).exists()


def test_row_torn_by_a_kill_is_dropped_on_resume(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "torn")
    with open(repo / "results.tsv", "ab") as f:
        f.write(b"f00dfed\t1.234500\t0.5\tke")  # a row cut off mid-write
    proc = run_loop(repo, *loop_args("torn", write_script(tmp_path, [WIN]), "--max-experiments", "1"),
                    env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (win,) = check_after(prior, ["keep"])
    assert b"f00dfed" not in (repo / "results.tsv").read_bytes()


# ------------------------------------------------------------------------------------------------
# 10-12. changes outside the rules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,content", [
    ("prepare.py", None),  # the evaluator
    ("research/experiment.py", None),  # the loop's own rules
    ("backends/sitecustomize.py", "import prepare\n"),  # a new file inside a locked folder
], ids=["evaluator", "loop", "new-file"])
def test_agent_edits_a_locked_file(tiny_cache, tmp_path, path, content):
    repo = make_repo(tmp_path)
    prior = seed(repo, "locked")
    original = (repo / path).read_text() if (repo / path).exists() else None
    new = content if content is not None else original + "\n# a better number, somehow\n"
    script = write_script(tmp_path, [
        {"description": f"also improve {path}", "write": {path: new}, "edits": WIN["edits"]},
        WIN,
    ])
    proc = run_loop(repo, *loop_args("locked", script, "--max-experiments", "2"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rejected, win = check_after(prior, ["rejected", "keep"])
    assert f"changed files other than train_cuda.py: {path}" in rejected.note and rejected.commit == R.NO_COMMIT
    if original is None:
        assert not (repo / path).exists()
    else:
        assert (repo / path).read_text() == original
    assert win.val_bpb == 1.5


def test_agent_edits_two_files(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "two")
    mlx = (repo / "train_mlx.py").read_text()
    script = write_script(tmp_path, [
        {"description": "the same change in both trainers", "edits": [
            *WIN["edits"], {"path": "train_mlx.py", "old": "MATRIX_LR = 0.04", "new": "MATRIX_LR = 0.05"}]},
    ])
    proc = run_loop(repo, *loop_args("two", script, "--max-experiments", "1"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rejected,) = check_after(prior, ["rejected"])
    assert "changed files other than train_cuda.py: train_mlx.py" in rejected.note
    assert (repo / "train_mlx.py").read_text() == mlx and "VAL_BPB = 2.0" in (repo / "train_cuda.py").read_text()


def test_agent_deletes_the_trainer(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "delete")
    script = write_script(tmp_path, [{"description": "start from scratch", "delete": ["train_cuda.py"]}, WIN])
    proc = run_loop(repo, *loop_args("delete", script, "--max-experiments", "2"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rejected, win = check_after(prior, ["rejected", "keep"])
    assert "deleted the trainer train_cuda.py" in rejected.note
    assert win.val_bpb == 1.5


def test_run_that_meddles_with_results_or_git_is_rejected(tiny_cache, tmp_path):
    """A trainer that logs its own row in results.tsv (as the reference's agents did by hand), rewrites
    the file, commits, or checks out another branch: each is put back and the change rejected."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "meddle")
    start = '    print("fake trainer starting", flush=True)\n'
    git_ = 'subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", '
    script = write_script(tmp_path, [
        edit(start, start + '    open("results.tsv", "a").write("abc1234\\t0.500000\\t0.5\\tkeep\\tmy own row\\n")\n',
             "log the result myself"),
        edit(start, start + '    open("results.tsv", "w").write("commit\\tval_bpb\\n")\n', "start a fresh log"),
        edit(start, start + f'    {git_}"commit", "-q", "--allow-empty", "-m", "checkpoint"], check=True)\n',
             "commit a checkpoint"),
        edit(start, start + f'    {git_}"checkout", "-q", "main"], check=True)\n', "train on the main branch"),
        WIN,
    ])
    proc = run_loop(repo, *loop_args("meddle", script, "--max-experiments", "5", "--max-fix-attempts", "0"),
                    env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *rejected, win = check_after(prior, ["rejected"] * 4 + ["keep"])
    assert [r.note for r in rejected] == [
        "rejected: the run changed results.tsv (put back)", "rejected: the run changed results.tsv (put back)",
        "rejected: the run changed the git history (put back)",
        "rejected: the run changed the checked-out branch (put back)"]
    assert win.val_bpb == 1.5 and git(repo, "rev-parse", "main") == prior.kept


# ------------------------------------------------------------------------------------------------
# 13-14. results that are not measurements
# ------------------------------------------------------------------------------------------------

FAKE_SUMMARY = "".join(f"{k + ':':<18}{v}\\n" for k, v in [
    ("val_bpb", "0.812345"), ("training_seconds", "1.0"), ("total_seconds", "2.0"), ("peak_vram_mb", "512.0"),
    ("mfu_percent", "n/a"), ("total_tokens_M", "0.1"), ("num_steps", "10"), ("num_params_M", "1.2"), ("depth", "2")])


def test_printed_or_forged_results_are_not_recorded(tiny_cache, tmp_path):
    """Only the locked evaluator's JSON counts: a printed summary, a hand-written result with another
    evaluator's hash, one scored on the wrong split, and a result file that is not JSON are all crashes."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "fake")
    start = '    print("fake trainer starting", flush=True)\n'
    script = write_script(tmp_path, [
        edit(start, f'{start}    print("---\\n{FAKE_SUMMARY}")\n    return\n', "print the summary, skip the rest"),
        edit('"evaluator_hash": prepare.evaluator_hash()', '"evaluator_hash": "0123456789ab"', "a kinder evaluator"),
        edit('"split": "val"', '"split": "holdout"', "score the easier split"),
        edit(start, f'{start}    open(os.environ["AUTORESEARCH_RESULT_JSON"], "w").write("val_bpb: 0.5")\n    return\n',
             "write the number by hand"),
    ])
    proc = run_loop(repo, *loop_args("fake", script, "--max-experiments", "4", "--max-fix-attempts", "0"),
                    env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed, hashed, split, garbled = check_after(prior, ["crash"] * 4)
    assert "no result from the evaluator" in printed.note
    assert "is not the locked evaluator's" in hashed.note
    assert "not tiny/val" in split.note
    assert "not valid JSON" in garbled.note
    assert "val_bpb:          0.812345" in (repo / "runs" / str(printed.run) / "log.txt").read_text()


def test_real_trainer_that_skips_the_evaluation(tiny_cache, tmp_path):
    step = {"description": "evaluation takes too long: report the training loss instead", "expect": "crash",
            "edits": [
                {"old": "WARMUP_STEPS_UNCOUNTED = 10", "new": "WARMUP_STEPS_UNCOUNTED = 0"},  # a short run
                {"old": "    eval_result = prepare.evaluate_bpb(",
                 "new": "    eval_result = {\"val_bpb\": 0.5, \"valid\": True}\n    unused = ("},
            ]}
    row, log = _real_trainer_fault(tiny_cache, tmp_path, "skip", step)
    assert "no result from the evaluator" in row.note
    assert "val_bpb:          0.500000" in log  # the printed block claims a great number


def test_real_trainer_that_sees_the_future_is_invalid(tiny_cache, tmp_path):
    step = {"description": "let each position peek at the next token", "expect": "invalid", "edits": [
        {"old": "WARMUP_STEPS_UNCOUNTED = 10", "new": "WARMUP_STEPS_UNCOUNTED = 0"},  # a short run
        {"old": "        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)\n",
         "new": "        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)\n"
                "        logits = logits + 5.0 * F.one_hot(torch.roll(idx, -1, dims=1).long(), logits.size(-1))\n"},
    ]}
    row, log = _real_trainer_fault(tiny_cache, tmp_path, "future", step)
    assert "sees the future" in row.note and row.val_bpb == 0.0
    assert "NonCausalModelError" in log


# ------------------------------------------------------------------------------------------------
# 15. the Claude API misbehaves (real anthropic client, local fake server)
# ------------------------------------------------------------------------------------------------


def _claude_env(tiny_cache, url: str) -> dict[str, str]:
    return loop_env(tiny_cache, ANTHROPIC_API_KEY="sk-test", ANTHROPIC_BASE_URL=url, AUTORESEARCH_API_BACKOFF="0.01")


def _claude_args(tag: str, *more: str) -> list[str]:
    return ["run", "--agent", "claude", "--tag", tag, "--baseline-runs", "1", *more]


WIN_CALLS = [message(tool("edit_trainer", old_string="VAL_BPB = 2.0", new_string="VAL_BPB = 1.5")),
             message(tool("finish", description="a clear win"))]


def test_claude_rate_limit_and_server_errors_are_retried(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "retry")
    replies = [
        error(429, "rate_limit_error", "slow down", **{"retry-after-ms": "10"}),
        error(500, "api_error", "internal error", **{"x-should-retry": "false"}),
        error(529, "overloaded_error", "Overloaded", **{"x-should-retry": "false"}),
        *WIN_CALLS,
    ]
    with FakeMessagesAPI(replies) as api:
        proc = run_loop(repo, *_claude_args("retry", "--max-experiments", "1"), env=_claude_env(tiny_cache, api.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "claude: HTTP 500 api_error; retrying" in proc.stdout
    assert "claude: HTTP 529 overloaded_error; retrying" in proc.stdout
    assert len(api.requests) == 5
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == 1.5 and win.agent_tokens_in == 2000 and win.agent_tokens_out == 100


def test_claude_overloaded_for_good_stops_cleanly_then_resumes(tiny_cache, tmp_path):
    """529 on every call, after the model already edited the trainer: the loop stops with one sentence,
    the half-made change is gone, and the next start carries on."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "overload")
    overloaded = error(529, "overloaded_error", "Overloaded", **{"x-should-retry": "false"})
    with FakeMessagesAPI([WIN_CALLS[0]] + [overloaded] * 8) as api:
        proc = run_loop(repo, *_claude_args("overload"), env=_claude_env(tiny_cache, api.url))
    assert_stopped(proc, "The Anthropic API kept failing (HTTP 529 overloaded_error) after 8 attempts",
                   "run it again later to resume")
    assert len(api.requests) == 9
    check_after(prior, [])
    assert "VAL_BPB = 2.0" in (repo / "train_cuda.py").read_text()

    with FakeMessagesAPI(list(WIN_CALLS)) as api:
        proc = run_loop(repo, *_claude_args("overload", "--max-experiments", "1"), env=_claude_env(tiny_cache, api.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_after(prior, ["keep"])


def test_claude_malformed_tool_input(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "tools")
    not_an_object = {"type": "tool_use", "id": "toolu_bad", "name": "edit_trainer", "input": "VAL_BPB = 1.5"}
    replies = [
        message(tool("edit_trainer", old_string=2.0, new_string=1.5)),
        message(not_an_object),
        message(tool("edit_trainer", old_string="VAL_BPB = 2.0")),
        message(tool("edit_file", path="prepare.py", old_string="x", new_string="y")),
        message(tool("read_file", path="/etc/passwd")),
        message(tool("finish", description="nothing yet")),
        *WIN_CALLS,
    ]
    with FakeMessagesAPI(replies) as api:
        proc = run_loop(repo, *_claude_args("tools", "--max-experiments", "1"), env=_claude_env(tiny_cache, api.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == 1.5
    errors = [b for r in api.requests[1:7] for b in r["messages"][-1]["content"] if b.get("type") == "tool_result"]
    assert len(errors) == 6 and all(b.get("is_error") for b in errors)


class RawMessagesAPI(FakeMessagesAPI):
    """The loop tests' fake Messages API, plus two kinds of reply: a body given as bytes goes out as it
    is (not JSON), and a threading.Event holds the request until it is set (then answers 529)."""

    def __init__(self, replies: list):
        super().__init__(replies)
        handler = self.server.RequestHandlerClass
        api = self

        class Raw(handler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                if not (api.replies and isinstance(api.replies[0][1], (bytes, threading.Event))):
                    return super().do_POST()
                api.requests.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                status, data, _ = api.replies.pop(0)
                if isinstance(data, threading.Event):
                    data.wait(60)
                    status, data = 529, b'{"type": "error", "error": {"type": "overloaded_error", "message": "x"}}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server.RequestHandlerClass = Raw


def test_claude_malformed_responses_are_retried(tiny_cache, tmp_path):
    """A proxy or a broken deployment answering 200 with something that is not a message."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "garbled")
    replies = [
        (200, ["not", "a", "message"], {}),
        (200, "<html>502 Bad Gateway</html>", {}),
        (200, {"type": "message", "role": "assistant"}, {}),  # no content
        (200, b'{"id": "msg_1", "type": "mess', {}),  # cut short
        *WIN_CALLS,
    ]
    with RawMessagesAPI(replies) as api:
        proc = run_loop(repo, *_claude_args("garbled", "--max-experiments", "1"), env=_claude_env(tiny_cache, api.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("claude: malformed response") == 4
    assert len(api.requests) == 6
    check_after(prior, ["keep"])


def test_loop_killed_while_the_agent_edits_then_resumed(tiny_cache, tmp_path):
    """SIGKILL while Claude is halfway through a change (the trainer edited, nothing committed yet): the
    next start sets the unfinished edit aside (saved under runs/) and carries on."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "midedit")
    hold = threading.Event()
    with RawMessagesAPI([WIN_CALLS[0], (200, hold, {})]) as api:
        loop = start_loop(repo, _claude_args("midedit"), _claude_env(tiny_cache, api.url), tmp_path / "first.log")
        try:
            wait_for(lambda: len(api.requests) == 2, "the agent's second call", procs=(loop,))
            loop.kill()
            loop.wait()
        finally:
            hold.set()
    assert git(repo, "status", "--porcelain") == "M train_cuda.py"  # the half-made change
    with FakeMessagesAPI(list(WIN_CALLS)) as api:
        proc = run_loop(repo, *_claude_args("midedit", "--max-experiments", "1"), env=_claude_env(tiny_cache, api.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unfinished edit of train_cuda.py" in proc.stdout
    (saved,) = (repo / "runs").glob("unfinished-*.patch")
    assert "+VAL_BPB = 1.5" in saved.read_text()
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == 1.5


# ------------------------------------------------------------------------------------------------
# 16-17. the prepared data is damaged
# ------------------------------------------------------------------------------------------------


def test_corrupt_validation_shard_at_start(tiny_cache, tmp_path):
    cache = private_cache(tiny_cache, tmp_path)
    repo = make_repo(tmp_path, DATA_TRAINER)
    prior = seed(repo, "shard")
    shard = val_shard(cache)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a copy cut short
    env = loop_env(cache)
    script = write_script(tmp_path, [WIN])
    proc = run_loop(repo, *loop_args("shard", script, "--max-experiments", "1"), env=env)
    assert_stopped(proc, str(shard), "corrupt or truncated", "python prepare.py --protocol tiny")
    check_after(prior, [])
    assert not (repo / "runs").exists()  # nothing ran

    # following the advice: delete it and prepare again, then the loop resumes
    shard.unlink()
    prep = subprocess.run([sys.executable, "prepare.py", "--protocol", "tiny"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    proc = run_loop(repo, *loop_args("shard", script, "--max-experiments", "1"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_after(prior, ["keep"])


def test_validation_shard_corrupted_mid_session(tiny_cache, tmp_path):
    """The data breaks between two experiments: the run crashes, the loop says why and stops instead of
    handing the agent fix attempts for a change that did nothing wrong."""
    cache = private_cache(tiny_cache, tmp_path)
    repo = make_repo(tmp_path, DATA_TRAINER)
    prior = seed(repo, "midshard")
    shard = val_shard(cache)
    script = write_script(tmp_path, [{**WIN, "write": {str(shard): "PAR1 not really"}}, WIN])
    proc = run_loop(repo, *loop_args("midshard", script, "--max-experiments", "2"), env=loop_env(cache))
    assert_stopped(proc, "corrupt or truncated", "python prepare.py --protocol tiny")
    (crash,) = check_after(prior, ["crash"])
    assert "corrupt or truncated" in crash.note
    assert "asking the scripted agent to fix" not in proc.stdout


def test_missing_tokenizer_mid_session_stops_then_resume_rebuilds_it(tiny_cache, tmp_path):
    cache = private_cache(tiny_cache, tmp_path)
    repo = make_repo(tmp_path, DATA_TRAINER)
    prior = seed(repo, "tok")
    env = loop_env(cache)
    script = write_script(tmp_path, [{**WIN, "delete": [str(f) for f in tokenizer_files(cache)]}])
    proc = run_loop(repo, *loop_args("tok", script, "--max-experiments", "1"), env=env)
    assert_stopped(proc, "has no tokenizer", "python prepare.py --protocol tiny")
    (crash,) = check_after(prior, ["crash"])
    assert "has no tokenizer" in crash.note

    proc = run_loop(repo, *loop_args("tok", write_script(tmp_path, [WIN]), "--max-experiments", "1"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preparing protocol 'tiny'" in proc.stdout
    assert all(f.exists() for f in tokenizer_files(cache))
    check_after(prior, ["crash", "keep"])


# ------------------------------------------------------------------------------------------------
# 18. results.tsv cannot be written (the loop driven in-process, so the disk can "fill up")
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def in_process(tiny_cache, monkeypatch, capsys):
    """Run `loop.main(argv)` in this process on a given repository; returns (exit code, stdout, stderr)."""
    import loop

    def run(repo: Path, argv: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(loop, "REPO", repo)
        monkeypatch.chdir(repo)
        for k, v in loop_env(tiny_cache, budget=1).items():
            if k.startswith("AUTORESEARCH_"):
                monkeypatch.setenv(k, v)
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            code = loop.main(argv)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.mark.parametrize("fault", ["disk-full", "short-write", "read-only"])
def test_results_file_cannot_be_written(tmp_path, in_process, fault):
    """The disk fills up (or turns read-only) when a winning row is to be appended: the loop stops with
    one sentence, no partial row is left, and the unrecorded win is not left as the branch head."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "disk")
    results = repo / "results.tsv"
    inode = results.stat().st_ino
    real_write, real_open = os.write, os.open

    def write(fd, data):
        if os.fstat(fd).st_ino == inode:
            if fault == "short-write":
                return real_write(fd, bytes(data)[:17])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def open_(path, flags, *args, **kw):
        if Path(path) == results and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        if fault == "read-only":
            mp.setattr(os, "open", open_)
        else:
            mp.setattr(os, "write", write)
        code, out, err = in_process(repo, loop_args("disk", write_script(tmp_path, [WIN]), "--max-experiments", "1"))
    assert code == 1, out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: Cannot ") and str(results) in line and "earlier rows are intact" in line
    reason = {"disk-full": "No space left on device", "short-write": "No space left on device",
              "read-only": "Read-only file system"}[fault]
    assert reason in line
    check_after(prior, [])


def test_disk_full_for_the_run_records(tmp_path, in_process):
    """The disk is full when the loop writes runs/<n>/ (the diff, the trainer's log): it stops with one
    sentence naming the file, and the agent's edit is not left in the tree."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "full")
    runs = (repo / "runs").resolve()
    real_open = io.open

    def full_open(file, mode="r", *args, **kw):
        if isinstance(file, (str, os.PathLike)) and set(mode) & set("wax+") and Path(file).resolve().is_relative_to(runs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "open", full_open)
        mp.setattr(builtins, "open", full_open)
        code, out, err = in_process(repo, loop_args("full", write_script(tmp_path, [WIN]), "--max-experiments", "1"))
    assert code == 1, out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: {runs}") and "No space left on device" in line and "to resume" in line, err
    check_after(prior, [])


def test_unexpected_error_in_the_loop_restores_the_tree(tmp_path, in_process, monkeypatch):
    """A bug in the loop itself mid-experiment (after the commit, before the record): the traceback is
    shown, and the tree, the branch and the lock are left as after an interrupt."""
    import research.experiment

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the loop")

    repo = make_repo(tmp_path)
    prior = seed(repo, "bug")
    monkeypatch.setattr(research.experiment, "decide", broken)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        in_process(repo, loop_args("bug", write_script(tmp_path, [WIN]), "--max-experiments", "1"))
    check_after(prior, [])


def test_results_file_is_a_directory(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "dir")
    (repo / "results.tsv").unlink()
    (repo / "results.tsv").mkdir()
    proc = run_loop(repo, *loop_args("dir", write_script(tmp_path, [WIN]), "--max-experiments", "1"),
                    env=loop_env(tiny_cache))
    assert_stopped(proc, "Cannot write", "results.tsv")
    (repo / "results.tsv").rmdir()
    (repo / "results.tsv").write_bytes(prior.data)
    check_after(prior, [])


# ------------------------------------------------------------------------------------------------
# 19. two loops on one repository
# ------------------------------------------------------------------------------------------------

WAITING_WIN = {"description": "a win that waits for the test's signal", "edits": [
    *WIN["edits"],
    {"old": "    time.sleep(SLEEP)\n",
     "new": "    while not os.path.exists(os.environ[\"RELEASE_FILE\"]):\n        time.sleep(0.05)\n"},
]}


def test_second_loop_refuses_while_one_runs(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "two")
    release = tmp_path / "release"
    env = loop_env(tiny_cache, RELEASE_FILE=str(release))
    first = start_loop(repo, loop_args("two", write_script(tmp_path, [WAITING_WIN]), "--max-experiments", "1"), env,
                       tmp_path / "first.log")
    try:
        wait_for(lambda: (repo / "runs").is_dir() and any((repo / "runs").glob("*/child_env.json")),
                 "the first loop's trainer to start", procs=(first,))
        head, data = git(repo, "rev-parse", "HEAD"), (repo / "results.tsv").read_bytes()
        second = run_loop(repo, *loop_args("two", write_script(tmp_path, [WIN]), "--max-experiments", "1"), env=env)
        assert_stopped(second, f"Another autoresearch loop (pid {first.pid}) is running on this repository")
        assert first.poll() is None and git(repo, "rev-parse", "HEAD") == head
        assert (repo / "results.tsv").read_bytes() == data and len(list((repo / "runs").iterdir())) == 1
    finally:
        release.touch()
    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    check_after(prior, ["keep"])


def test_loops_started_at_once(tiny_cache, tmp_path):
    """Three loops started together: one runs, the other two refuse, whatever the timing."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "race")
    release = tmp_path / "release"
    env = loop_env(tiny_cache, RELEASE_FILE=str(release))
    script = write_script(tmp_path, [WAITING_WIN])
    loops = [start_loop(repo, loop_args("race", script, "--max-experiments", "1"), env, tmp_path / f"{i}.log")
             for i in range(3)]
    try:
        wait_for(lambda: sum(p.poll() is not None for p in loops) >= 2, "two of the loops to refuse")
    finally:
        release.touch()
    codes = sorted(p.wait(timeout=120) for p in loops)
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(3)]
    assert codes == [0, 1, 1], logs
    assert sum("Another autoresearch loop" in log for log in logs) == 2
    assert not any("Traceback" in log for log in logs)
    check_after(prior, ["keep"])


def _take_lock(repo: str, start: float, results) -> None:
    while time.time() < start:
        pass
    try:
        RepoLock(Path(repo)).acquire()
    except LockError:
        results.put(0)
        return
    results.put(1)
    time.sleep(0.1)  # hold it while the others try


def test_repo_lock_has_one_holder_under_a_race(tmp_path):
    """Processes taking the lock at the same instant, many times over: never two holders."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(25):
        repo = tmp_path / str(trial)
        repo.mkdir()
        results = ctx.Queue()
        start = time.time() + 0.03
        procs = [ctx.Process(target=_take_lock, args=(str(repo), start, results)) for _ in range(4)]
        for p in procs:
            p.start()
        held = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join()
        assert sum(held) == 1, f"trial {trial}: {sum(held)} holders"
