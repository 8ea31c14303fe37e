"""Fault injection for loop.py: each test breaks one thing during a real loop run and checks how the loop copes.

Run: `uv run pytest tests/test_faults.py` (about four minutes on a 2-core CPU; no network, GPU or API key;
`-m slow` adds the real trainer's runs through the loop).

Every scenario runs the loop on a temporary git repository holding a copy of the project, on the `tiny`
protocol with a budget of a second or two, driven by the scripted agent (or by the Claude agent through
the real `anthropic` client against a local fake Messages API). Most start from a results file left by an
earlier session (a baseline on the branch, a row of another branch: `seed`) so that "finished rows
survive" can be checked byte for byte and no baseline has to run. After the fault, `check_after` asserts
what must hold whatever happened:

1. the loop carried on, or stopped with one clear sentence (`error: ...`, no traceback);
2. every row finished before the fault is intact and every line of results.tsv parses;
3. the work tree is clean, on the branch, whose head is the last kept commit;
4. the faulty experiment was logged with the right status (or, when it never finished, not at all).

Every trainer runs in the OS sandbox (bubblewrap here), in a private workspace: it cannot see the
repository's git, runs/ or results.tsv, and the harness scores what it hands over. Faults about training
itself (an exception mid-training, out of memory, a model that sees the future, a trainer that
skips the hand-over) edit the real train_cuda.py; the others use the stand-in trainer of test_loop.py
(whose helpers this file reuses). Faults that need the loop's own process (a full disk, a bug in the
loop) drive `loop.main` in-process, with scripted measurements where the trainer does not matter.
A test that needs a trainer to wait runs the stand-in with HOLD = True (HELD) and releases it with SIGUSR1
(the sandbox hides any file the test could make), finding its host pid through /proc.
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
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import (  # noqa: F401
    FAKE_TRAINER,
    FakeMessagesAPI,
    Prior,
    alive,
    allowance,
    edit,
    error,
    fake_bpb,
    fake_result,
    git,
    in_process,
    lock_trainer,
    loop_env,
    make_repo,
    message,
    read_rows,
    run_loop,
    run_processes,
    seed,
    stub_runs,
    tool,
    trainer_info,
    wait_for,
    write_script,
)

import prepare
from research import results as R
from research.guards import LOCK_FILE, LockError, RepoLock

WIN = edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "a clear win")  # the stand-in trainer's harmless, better change
HELD = FAKE_TRAINER.replace("\nHOLD = False", "\nHOLD = True", 1)  # the stand-in, waiting for release(repo) first
assert HELD != FAKE_TRAINER
START = '    print("fake trainer starting " + json.dumps(info), flush=True)\n'  # where edits add a fault
assert START in FAKE_TRAINER

# The stand-in trainer, but reading the tokenizer files the way a real trainer does, so damaged ones make
# it fail. (The validation data is the harness's alone: the sandbox does not show it to a trainer.)
DATA_TRAINER = FAKE_TRAINER.replace(
    "    p = prepare.get_protocol()\n",
    "    p = prepare.get_protocol()\n"
    "    prepare.Tokenizer.load(p)\n"
    "    prepare.load_token_bytes(p)\n",
)
assert DATA_TRAINER != FAKE_TRAINER


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


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
    """A scripted run resuming the seeded branch; every change decided on its single run (no confirm run)."""
    return ["run", "--agent", "scripted", "--script", script, "--tag", tag, "--baseline-runs", "1", "--no-confirm",
            *more]


def start_loop(repo: Path, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`python loop.py ARGS` in the background, output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "loop.py", *args], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def newest_log(repo: Path) -> Path:
    """The log of the newest run folder (runs/<n>/log.txt)."""
    runs = [p for p in (repo / "runs").iterdir() if p.name.isdigit()] if (repo / "runs").is_dir() else []
    return max(runs, key=lambda p: int(p.name)) / "log.txt" if runs else repo / "runs" / "none"


def log_has(repo: Path, text: str):
    """A condition for wait_for: the newest run's log holds `text`."""
    def check() -> bool:
        try:
            return text in newest_log(repo).read_text(errors="replace")
        except OSError:
            return False
    return check


def trainer_pids(repo: Path) -> list[int]:
    """Host pids of the stand-in trainers running `repo`'s train_cuda.py (the sandboxed Python itself,
    not bubblewrap around it)."""
    script = str(repo / "train_cuda.py")
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if len(args) > 1 and "python" in Path(args[0]).name and args[1] == script and alive(int(d.name)):
            found.append(int(d.name))
    return found


def release(repo: Path) -> None:
    """Let the held trainer (HELD) of `repo` go on."""
    pids = trainer_pids(repo)
    assert pids, "no held trainer to release"
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)


def assert_gone(pids: list[int], workspace: str | Path | None = None, timeout: float = 10) -> None:
    """None of `pids` (host pids) is alive, and no process of the run in `workspace` is left."""
    deadline = time.monotonic() + timeout
    def left() -> list[int]:
        return sorted({*[p for p in pids if alive(p)], *(run_processes(workspace) if workspace else [])})
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == []


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


@pytest.mark.slow  # an end-to-end run through loop.py (CI runs the slow set)
def test_crashes_then_the_fix_is_kept(tiny_cache, tmp_path):
    """A syntax error (caught before any process starts), then a fix that still crashes when run, then one
    that works: each crash is recorded with the line that says why, the agent is asked to fix it twice,
    and the working fix is kept, made on top of the crashed versions."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "crash")
    script = write_script(tmp_path, [
        edit("VAL_BPB = 2.0", "VAL_BPB = (1.25", "an unbalanced parenthesis"),
        {"description": "fix: close the parenthesis", "edits": [{"old": "VAL_BPB = (1.25", "new": "VAL_BPB = 1.25"},
                                                                {"old": 'MODE = "ok"', "new": 'MODE = "crash"'}]},
        edit('MODE = "crash"', 'MODE = "ok"', "fix: the bug"),
    ])
    proc = run_loop(repo, *loop_args("crash", script, "--max-experiments", "3"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    syntax, runtime, fixed = check_after(prior, ["crash", "crash", "keep"])
    assert syntax.note.startswith("crash: syntax error on line ") and syntax.commit != R.NO_COMMIT
    assert "SyntaxError" in (repo / "runs" / str(syntax.run) / "log.txt").read_text()
    assert runtime.note.startswith("crash: exit code 1") and "RuntimeError: deliberate crash" in runtime.note
    assert "RuntimeError: deliberate crash" in (repo / "runs" / str(runtime.run) / "log.txt").read_text()
    assert "asking the scripted agent to fix the crash (attempt 1 of 2)" in proc.stdout
    assert "asking the scripted agent to fix the crash (attempt 2 of 2)" in proc.stdout
    assert fixed.val_bpb == pytest.approx(fake_bpb(1.25), abs=1.5e-6)
    # the fix was made on top of the crashed versions: its commit holds the first change too
    assert "+VAL_BPB = 1.25" in git(repo, "diff", prior.kept, "HEAD")
    assert 'MODE = "ok"' in (repo / "train_cuda.py").read_text()


def test_import_error_is_a_crash_that_names_the_module(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "import")
    script = write_script(tmp_path, [
        edit("import prepare\n", "import prepare\nimport flash_attn_9000\n",
             "use a kernel package that is not installed"),
    ])
    proc = run_loop(repo, *loop_args("import", script, "--max-experiments", "1", "--max-fix-attempts", "0"),
                    env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (crash,) = check_after(prior, ["crash"])
    assert "exit code 1" in crash.note and "No module named 'flash_attn_9000'" in crash.note
    assert "ModuleNotFoundError" in (repo / "runs" / str(crash.run) / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------
# 3-5. training goes wrong (the real trainer, one loop session shared by the tests: slow)
# ------------------------------------------------------------------------------------------------

BUG = "        if step == 2:\n            raise RuntimeError(\"injected fault at step 2\")\n"
REAL_FAULTS = {
    "exception": edit("        optimizer.step()\n", "        optimizer.step()\n" + BUG, "an optimizer change with a bug"),
    # an allocation no machine can satisfy (beyond the address space): fails at once, takes no memory
    "oom": edit("    model = build_model(config)\n",
                "    model = build_model(config)\n    activations = torch.empty(1 << 62, dtype=torch.uint8)\n",
                "keep every activation (4 EiB)"),
}
SHORT_RUN = {"old": "WARMUP_STEPS_UNCOUNTED = 10", "new": "WARMUP_STEPS_UNCOUNTED = 0"}
HAND_OVER = "    prepare.hand_over(RT.export(model, DEVICE_BATCH_SIZE, seq_len), facts)\n"
REAL_CHEATS = {
    "skip": {"description": "evaluation takes too long: print the summary instead", "edits": [
        SHORT_RUN, {"old": HAND_OVER, "new": "    print(prepare.format_summary({\"val_bpb\": 0.5}, facts))\n"}]},
    "future": {"description": "let each position peek at the next token", "edits": [
        SHORT_RUN,
        {"old": "        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)\n",
         "new": "        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)\n"
                "        logits = logits + 5.0 * F.one_hot(torch.roll(idx, -1, dims=1).long(), logits.size(-1))\n"}]},
}


def _real_session(cache: Path, tmp: Path, tag: str, steps: dict[str, dict], statuses: list[str],
                  budget: float = 1.0) -> dict[str, tuple[R.Row, str]]:
    """One loop session on the real train_cuda.py (`budget` seconds), one experiment per step; each step's
    row and log by name."""
    repo = make_repo(tmp, trainer=None)
    prior = seed(repo, tag, 9.0, budget=budget)
    script = write_script(tmp, list(steps.values()))
    proc = run_loop(repo, *loop_args(tag, script, "--max-experiments", str(len(steps)), "--max-fix-attempts", "0"),
                    env=loop_env(cache, budget=budget), timeout=500)
    stopped = statuses[-1] == "invalid"  # a non-causal model is tampering: the loop stops the branch after it
    assert proc.returncode == (1 if stopped else 0), proc.stdout + proc.stderr
    assert ("that is tampering, so branch" in proc.stderr) == stopped, proc.stderr
    rows = check_after(prior, statuses)
    assert git(repo, "diff", prior.kept, "HEAD") == ""
    return {name: (row, (repo / "runs" / str(row.run) / "log.txt").read_text()) for name, row in zip(steps, rows)}


@pytest.fixture(scope="module")
def real_faults(tiny_cache_root, tmp_path_factory) -> dict[str, tuple[R.Row, str]]:
    # 4 s: on a CPU without AMX the default config takes about a second a step, and the fault is at step 2
    return _real_session(tiny_cache_root, tmp_path_factory.mktemp("real-faults"), "faults", REAL_FAULTS,
                         ["crash"] * len(REAL_FAULTS), budget=4.0)


@pytest.fixture(scope="module")
def real_cheats(tiny_cache_root, tmp_path_factory) -> dict[str, tuple[R.Row, str]]:
    return _real_session(tiny_cache_root, tmp_path_factory.mktemp("real-cheats"), "cheats", REAL_CHEATS,
                         ["crash", "invalid"])


@pytest.mark.slow
def test_exception_mid_training(real_faults):
    row, log = real_faults["exception"]
    assert "RuntimeError: injected fault at step 2" in row.note
    assert "step 00001" in log and "step 00003" not in log  # it really was training


def test_the_trainers_fail_line_is_the_crash_note():
    """A trainer that fails fast (NaN loss: tests/test_train_cuda.py and test_train_mlx.py run that) says why in
    one `FAIL:` line; the loop's crash note is that line, even with a traceback after it, else the exception
    that ends the last traceback."""
    from research.run import failure_line

    log = ("step 00001 | loss: 7.6\nFAIL: training loss nan at step 2 (NaN or > 100)\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nSystemExit: 1\n")
    assert failure_line(log) == "FAIL: training loss nan at step 2 (NaN or > 100)"
    assert failure_line(log.replace("FAIL: ", "")) == "SystemExit: 1"
    assert failure_line("step 00001 | loss: 7.6\n") is None


@pytest.mark.slow
def test_out_of_memory(real_faults):
    row, log = real_faults["oom"]
    assert "exit code 1" in row.note and "memory" in row.note.lower()


@pytest.mark.slow
def test_real_trainer_that_skips_the_hand_over(real_cheats):
    row, log = real_cheats["skip"]
    assert "the trainer handed over no model" in row.note
    assert "val_bpb:          0.500000" in log  # the printed block claims a great number; nothing scored it


@pytest.mark.slow
def test_real_trainer_that_sees_the_future_is_invalid(real_cheats):
    row, log = real_cheats["future"]
    assert "sees the future" in row.note and row.val_bpb == 0.0 and row.note.startswith("invalid (tampering): ")
    assert "harness: not scored (causality)" in log


# ------------------------------------------------------------------------------------------------
# 6-7. the trainer hangs, or dies by a signal
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # an end-to-end run through loop.py (CI runs the slow set)
def test_hang_past_the_kill_limit_ends_the_whole_run(tiny_cache, tmp_path):
    """A trainer (and its worker) that ignore SIGTERM and never end: killed at budget + 2 x allowance +
    margin, and nothing the run started survives."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "hang")
    script = write_script(tmp_path, [
        {"description": "a data worker that never returns", "edits": [
            {"old": 'MODE = "ok"', "new": 'MODE = "hang"'},
            {"old": "import prepare\n",
             "new": "import prepare\nimport signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"},
        ]},
    ])
    t0 = time.monotonic()
    proc = run_loop(repo, *loop_args("hang", script, "--max-experiments", "1", "--max-fix-attempts", "0",
                                     "--startup-allowance", "4", "--timeout-margin", "1"),
                    env=loop_env(tiny_cache, budget=1))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 90
    assert "(budget + 4.0 s, set by --startup-allowance)" in proc.stdout
    (crash,) = check_after(prior, ["crash"])
    assert "killed after" in crash.note and "limit 10 s" in crash.note  # 1 + 2 x 4 + 1
    assert 10 <= crash.wall_seconds < 40
    log = repo / "runs" / str(crash.run) / "log.txt"
    assert "grandchild pid" in log.read_text() and "killed after" in log.read_text()  # the worker was running
    assert_gone([], trainer_info(log)["cwd"])


def _no_core_files() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a core file in the repository is not the point here


@pytest.fixture(scope="module")
def signal_crashes(tiny_cache_root, tmp_path_factory) -> tuple[R.Row, R.Row, Path]:
    """One loop session whose two experiments each end the trainer with a signal: SIGSEGV, then SIGKILL."""
    tmp = tmp_path_factory.mktemp("signals")
    repo = make_repo(tmp)
    prior = seed(repo, "signal", 3.0)
    script = write_script(tmp, [
        edit(START, START + "    import ctypes\n    ctypes.string_at(0)  # reads address 0\n",
             "a native extension with a bug"),
        edit(START, START + "    os.kill(os.getpid(), 9)\n", "a worker pool that kills its parent"),
    ])
    args = loop_args("signal", script, "--max-experiments", "2", "--max-fix-attempts", "0")
    proc = subprocess.run([sys.executable, "loop.py", *args], cwd=repo, env=loop_env(tiny_cache_root),
                          capture_output=True, text=True, timeout=240, preexec_fn=_no_core_files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    segv, killed = check_after(prior, ["crash", "crash"])
    return segv, killed, repo


def test_trainer_killed_by_a_signal_is_a_crash_and_leaves_nothing(signal_crashes):
    segv, killed, repo = signal_crashes
    for row in (segv, killed):
        assert row.note.startswith("crash: ")
        assert_gone([], trainer_info(repo / "runs" / str(row.run) / "log.txt")["cwd"])


def test_trainer_killed_by_a_signal_is_named(signal_crashes):
    segv, killed, _ = signal_crashes
    assert "killed by SIGSEGV" in segv.note, segv.note
    assert "killed by SIGKILL (the system may have run out of memory)" in killed.note, killed.note


# ------------------------------------------------------------------------------------------------
# 8-9. the loop itself is interrupted or killed
# ------------------------------------------------------------------------------------------------


def _hung_run(repo: Path, loop: subprocess.Popen) -> tuple[str, list[int], int]:
    """Wait until the loop's stand-in trainer (MODE hang) runs its worker; (workspace, every process of
    the run, the process group the lock records)."""
    wait_for(log_has(repo, "grandchild pid"), "the trainer to start its worker", procs=(loop,))
    workspace = trainer_info(newest_log(repo))["cwd"]
    running = run_processes(workspace)
    sandbox = lock_trainer(repo)
    assert sandbox in running and len(running) >= 3, (sandbox, running)  # the sandbox, the trainer, its worker
    assert trainer_pids(repo) and set(trainer_pids(repo)) <= set(running)
    return workspace, running, sandbox


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_loop_interrupted_mid_experiment_then_resumed(tiny_cache, tmp_path, sig):
    repo = make_repo(tmp_path)
    prior = seed(repo, "int")
    env = loop_env(tiny_cache)
    slow = write_script(tmp_path, [edit('MODE = "ok"', 'MODE = "hang"', "a long experiment")])
    loop = start_loop(repo, loop_args("int", slow), env, tmp_path / "first.log")
    workspace, running, _ = _hung_run(repo, loop)
    loop.send_signal(sig)
    assert loop.wait(timeout=60) == 130
    out = (tmp_path / "first.log").read_text()
    assert "interrupted" in out and "Run the same command again to resume" in out and "Traceback" not in out
    assert_gone(running, workspace)
    check_after(prior, [])  # the interrupted experiment left no row, no commit, no lock
    if sig == signal.SIGTERM:
        return  # the same KeyboardInterrupt path as SIGINT from here on

    again = run_loop(repo, *loop_args("int", write_script(tmp_path, [WIN]), "--max-experiments", "0"), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming branch autoresearch/int" in again.stdout
    check_after(prior, [])


def test_ctrl_c_again_during_the_clean_up_does_not_cut_it_short(tiny_cache, tmp_path):
    """An impatient user presses Ctrl-C again and again while the loop is stopping the trainer and restoring
    the tree: the clean-up still finishes (no traceback, no half-made experiment, no lock left)."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "int2")
    slow = write_script(tmp_path, [edit('MODE = "ok"', 'MODE = "hang"', "a long experiment")])
    loop = start_loop(repo, loop_args("int2", slow), loop_env(tiny_cache), tmp_path / "first.log")
    workspace, running, _ = _hung_run(repo, loop)
    loop.send_signal(signal.SIGINT)
    sent, deadline = 1, time.monotonic() + 60
    while loop.poll() is None and time.monotonic() < deadline:  # more Ctrl-C, every 5 ms, until it exits
        time.sleep(0.005)
        try:
            loop.send_signal(signal.SIGINT)
            sent += 1
        except ProcessLookupError:
            break
    assert loop.wait(timeout=60) == 130
    out = (tmp_path / "first.log").read_text()
    assert sent >= 2, sent  # at least one more Ctrl-C reached it after the first, while it was cleaning up
    assert "interrupted" in out and "Run the same command again to resume" in out and "Traceback" not in out, out
    assert_gone(running, workspace)
    check_after(prior, [])


def test_loop_killed_mid_experiment_then_resumed(tiny_cache, tmp_path):
    """SIGKILL (OOM killer, power loss) mid-experiment: the sandbox ends the whole run with its loop; left
    behind are a commit no row records, a stale lock naming the trainer's process group, and a row the kill
    cut off mid-write. The next start drops the commit and the torn row and takes the lock over."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "kill")
    env = loop_env(tiny_cache)
    slow = write_script(tmp_path, [edit('MODE = "ok"', 'MODE = "hang"', "a long experiment")])
    loop = start_loop(repo, loop_args("kill", slow), env, tmp_path / "first.log")
    workspace, running, sandbox = _hung_run(repo, loop)
    loop.kill()
    loop.wait()
    assert_gone(running, workspace)  # bubblewrap dies with its parent, and every process of the run with it
    assert f"trainer {sandbox} train_cuda.py" in (repo / LOCK_FILE).read_text()
    assert (repo / "results.tsv").read_bytes() == prior.data
    assert git(repo, "rev-list", "--count", f"{prior.kept}..HEAD") == "1"  # the experiment's commit
    with open(repo / "results.tsv", "ab") as f:
        f.write(b"f00dfed\t1.234500\t0.5\tke")  # a row cut off mid-write
    again = run_loop(repo, *loop_args("kill", write_script(tmp_path, [WIN]), "--max-experiments", "0"), env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "dropped unrecorded experiment commits" in again.stdout
    assert b"f00dfed" not in (repo / "results.tsv").read_bytes()
    check_after(prior, [])


def test_try_killed_during_its_baseline_keeps_the_edit(tiny_cache, tmp_path):
    """`loop.py try` on a branch without a baseline sets the user's edit aside to run the baseline; a
    SIGKILL then must not lose the edit: a copy waits under runs/, and the next `try` points to it."""
    repo = make_repo(tmp_path, HELD)
    git(repo, "checkout", "-q", "-b", "autoresearch/ext")
    trainer = repo / "train_cuda.py"
    edited = HELD.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5")
    trainer.write_text(edited)  # the user's edit
    loop = start_loop(repo, ["try", "lower it"], loop_env(tiny_cache), tmp_path / "first.log")
    wait_for(log_has(repo, "holding until SIGUSR1"), "the baseline's trainer to start", procs=(loop,))
    workspace = trainer_info(newest_log(repo))["cwd"]
    loop.kill()
    loop.wait()
    assert_gone([], workspace)
    assert trainer.read_text() == HELD  # set aside while the baseline ran
    (copy,) = (repo / "runs").glob("set-aside-*-train_cuda.py")
    assert copy.read_text() == edited

    proc = run_loop(repo, "try", "lower it", env=loop_env(tiny_cache))
    assert_stopped(proc, "Nothing to try", str(copy.relative_to(repo)))
    assert not (repo / LOCK_FILE).exists()  # the dead loop's lock was taken over, then released
    shutil.copy(copy, trainer)
    assert git(repo, "status", "--porcelain") == "M train_cuda.py" and read_rows(repo) == []


# ------------------------------------------------------------------------------------------------
# 10-12. changes outside the rules
# ------------------------------------------------------------------------------------------------


def test_agent_edits_outside_the_trainer(tiny_cache, tmp_path):
    """The evaluator, the loop's own rules, a new file inside a locked folder, the other trainer: each change
    is rejected before it runs, and every file is put back."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "locked")
    paths = ["prepare.py", "research/experiment.py", "backends/sitecustomize.py", "train_mlx.py"]
    before = {p: (repo / p).read_text() if (repo / p).exists() else None for p in paths}
    also = lambda path, text: {"description": f"also improve {path}", "write": {path: text}, "edits": WIN["edits"]}
    script = write_script(tmp_path, [
        also("prepare.py", before["prepare.py"] + "\n# a better number, somehow\n"),  # the evaluator's contract
        also("research/experiment.py", before["research/experiment.py"] + "\n# kinder rules\n"),  # the loop
        also("backends/sitecustomize.py", "import prepare\n"),  # a new file inside a locked folder
        {"description": "the same change in both trainers", "edits": [
            *WIN["edits"], {"path": "train_mlx.py", "old": "MATRIX_LR = 0.04", "new": "MATRIX_LR = 0.05"}]},
    ])
    proc = run_loop(repo, *loop_args("locked", script, "--max-experiments", "4"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = check_after(prior, ["rejected"] * 4)
    for row, path in zip(rows, paths):
        assert f"changed files other than train_cuda.py: {path}" in row.note and row.commit == R.NO_COMMIT
    for path, text in before.items():
        assert (repo / path).read_text() == text if text is not None else not (repo / path).exists()
    assert "VAL_BPB = 2.0" in (repo / "train_cuda.py").read_text()
    assert not (repo / "runs").exists() or not list((repo / "runs").glob("*/log.txt"))  # nothing ran


def test_run_that_meddles_with_results_or_git_is_rejected(tiny_cache, tmp_path):
    """In the sandbox a trainer cannot see the repository at all (tests/test_attacks.py tries). Without it
    (--no-sandbox) one that logs its own row in results.tsv (as the reference's agents did by hand), commits,
    or checks out another branch has its change put back and is rejected: the guard behind the sandbox."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "meddle")
    here = "    here = os.path.dirname(os.path.abspath(__file__))\n"
    git_ = 'subprocess.run(["git", "-C", here, "-c", "user.name=t", "-c", "user.email=t@t", '
    done = "    sys.exit(3)\n"  # done meddling: no need to hand anything over
    script = write_script(tmp_path, [
        edit(START, START + here + '    open(os.path.join(here, "results.tsv"), "a").write('
                                   '"abc1234\\t0.500000\\t0.5\\tkeep\\tmy own row\\n")\n' + done,
             "log the result myself"),
        edit(START, START + here + f'    {git_}"commit", "-q", "--allow-empty", "-m", "checkpoint"], check=True)\n' + done,
             "commit a checkpoint"),
        edit(START, START + here + f'    {git_}"checkout", "-q", "main"], check=True)\n' + done,
             "train on the main branch"),
    ])
    proc = run_loop(repo, *loop_args("meddle", script, "--max-experiments", "3", "--max-fix-attempts", "0",
                                     "--no-sandbox"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rejected = check_after(prior, ["rejected"] * 3)
    assert [r.note for r in rejected] == [
        "rejected: the run changed results.tsv (put back)",
        "rejected: the run changed the git history (put back)",
        "rejected: the run changed the checked-out branch (put back)"]
    assert git(repo, "rev-parse", "main") == prior.kept


# ------------------------------------------------------------------------------------------------
# 13-14. results that are not measurements
# ------------------------------------------------------------------------------------------------

FAKE_SUMMARY = "".join(f"{k + ':':<18}{v}\\n" for k, v in [
    ("val_bpb", "0.812345"), ("training_seconds", "1.0"), ("total_seconds", "2.0"), ("peak_vram_mb", "512.0"),
    ("mfu_percent", "n/a"), ("total_tokens_M", "0.1"), ("num_steps", "10"), ("num_params_M", "1.2"), ("depth", "2")])


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_results_that_are_not_measurements(tiny_cache, tmp_path):
    """Only the harness's score counts. A trainer that prints a summary block and hands nothing over is a
    crash; one that hands over later than the branch's baseline + margin is rejected as overtime; one that
    prints a great number and leaves forged results (in its hand-over, and in its workspace's judge/)
    while its model peeks at the next token is invalid, and that is tampering: the loop stops the branch.
    None is kept."""
    repo = make_repo(tmp_path)
    budget, wall, margin = 2.0, 4.5, 6.0
    prior = seed(repo, "fake", wall=wall)  # the limit measured from it (and --wall-margin) leaves the stand-in
    limit = budget + allowance(wall, budget, margin)  # a wide margin, and the overbudget mode (sleeps 3 x
    assert 3 * budget + 10 > limit > 10  # budget + 10 s) none
    forged = json.dumps({"valid": True, "val_bpb": 0.1, "holdout_bpb": 0.1, "evaluator_hash": prepare.evaluator_hash(),
                         "protocol": "tiny", "split": "val"})
    forge = (f"    for d in (os.environ['AUTORESEARCH_HANDOVER'], os.path.join(os.getcwd(), 'judge')):\n"
             f"        os.makedirs(d, exist_ok=True)\n"
             f"        with open(os.path.join(d, 'result.json'), 'w') as f:\n"
             f"            f.write({forged!r})\n")
    script = write_script(tmp_path, [
        {"description": "skip the hand-over, print the summary", "edits": [
            {"old": 'MODE = "ok"', "new": 'MODE = "nohandover"'},
            {"old": START, "new": START + forge + f'    print("---\\n{FAKE_SUMMARY}", flush=True)\n'}]},
        edit('MODE = "ok"', 'MODE = "overbudget"', "train longer"),
        {"description": "peek at the next token, print and forge a great number", "edits": [
            {"old": 'MODE = "ok"', "new": 'MODE = "noncausal"'},
            {"old": START, "new": START + forge + '    print("---\\nval_bpb:          0.100000", flush=True)\n'}]},
    ])
    proc = run_loop(repo, *loop_args("fake", script, "--max-experiments", "3", "--max-fix-attempts", "0",
                                     "--wall-margin", str(margin)), env=loop_env(tiny_cache))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "that is tampering, so branch autoresearch/fake is stopped" in proc.stderr, proc.stderr
    crash, over, invalid = check_after(prior, ["crash", "rejected", "invalid"])
    assert "sees the future" in invalid.note and invalid.note.startswith("invalid (tampering): ")
    record = json.loads((repo / "runs" / str(invalid.run) / "result.json").read_text())
    assert record["eval"]["valid"] is False and record["eval"]["kind"] == "causality"
    assert "val_bpb:          0.100000" in (repo / "runs" / str(invalid.run) / "log.txt").read_text()
    assert "the trainer handed over no model" in crash.note
    assert "val_bpb:          0.812345" in (repo / "runs" / str(crash.run) / "log.txt").read_text()
    assert over.note.startswith("rejected: overtime: handed over ")
    assert f"past the 2 s budget + {limit - budget:.2f} s allowed (the median of 1 baseline + 6.00 s" in over.note
    assert over.wall_seconds > limit
    assert git(repo, "rev-list", "--count", f"{prior.kept}..HEAD") == "0"


# ------------------------------------------------------------------------------------------------
# 15. the Claude API misbehaves (real anthropic client, local fake server)
# ------------------------------------------------------------------------------------------------


def _claude_env(tiny_cache, url: str) -> dict[str, str]:
    return loop_env(tiny_cache, ANTHROPIC_API_KEY="sk-test", ANTHROPIC_BASE_URL=url, AUTORESEARCH_API_BACKOFF="0.01")


def _claude_args(tag: str, *more: str) -> list[str]:
    return ["run", "--agent", "claude", "--tag", tag, "--baseline-runs", "1", "--no-confirm", *more]


WIN_CALLS = [message(tool("edit_trainer", old_string="VAL_BPB = 2.0", new_string="VAL_BPB = 1.5")),
             message(tool("finish", description="a clear win"))]


def test_claude_retries_then_rejected_credentials(tiny_cache, tmp_path):
    """`loop.py run --agent claude` through the real client: a rate limit, a server error and an overload
    are retried; the change is run and kept with the tokens (cache writes and reads too) and the cost it
    took; then the API rejects the key, and the loop stops with one sentence and records nothing for it."""
    from agents.claude_agent import cost_usd

    repo = make_repo(tmp_path)
    prior = seed(repo, "retry")
    replies = [
        error(429, "rate_limit_error", "slow down", **{"retry-after-ms": "10"}),
        error(500, "api_error", "internal error", **{"x-should-retry": "false"}),
        error(529, "overloaded_error", "Overloaded", **{"x-should-retry": "false"}),
        message(tool("edit_trainer", old_string="VAL_BPB = 2.0", new_string="VAL_BPB = 1.5"), usage=(800, 60, 4000, 0)),
        message(tool("finish", description="a clear win"), usage=(20, 10, 0, 4800)),
        error(401, "authentication_error", "invalid x-api-key"),
    ]
    with FakeMessagesAPI(replies) as api:
        proc = run_loop(repo, *_claude_args("retry", "--max-experiments", "2"), env=_claude_env(tiny_cache, api.url))
    assert_stopped(proc, "The Anthropic API rejected the credentials (401")
    assert "model claude-sonnet-5-5" in proc.stdout
    assert "claude: HTTP 500 api_error; retrying" in proc.stdout
    assert "claude: HTTP 529 overloaded_error; retrying" in proc.stdout
    assert len(api.requests) == 6
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == pytest.approx(fake_bpb(1.5), abs=1.5e-6)
    assert win.agent_tokens_in == 800 + 4000 + 20 + 4800 and win.agent_tokens_out == 70
    assert win.agent_cost_usd == pytest.approx(cost_usd("claude-sonnet-5-5", 820, 70, 4000, 4800), abs=1e-4)


def test_claude_overloaded_for_good_stops_cleanly_then_resumes(tiny_cache, tmp_path):
    """529 on every call, after the model already edited the trainer: the loop stops with one sentence,
    the half-made change is gone, and the next start finds everything in order."""
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

    proc = run_loop(repo, *_claude_args("overload", "--max-experiments", "0"),
                    env=_claude_env(tiny_cache, "http://127.0.0.1:9"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming branch autoresearch/overload" in proc.stdout
    check_after(prior, [])


class RawMessagesAPI(FakeMessagesAPI):
    """The loop tests' fake Messages API, plus two kinds of reply: a body given as bytes goes out as it
    is (not JSON), and a threading.Event holds the request until it is set (then answers 529)."""

    def __init__(self, replies: list):
        super().__init__(replies)
        handler = self.server.RequestHandlerClass
        api = self

        class Raw(handler):
            def do_POST(self):
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


@pytest.mark.slow  # about 25 s: the default set stays under 8 minutes (CI runs it)
def test_claude_malformed_responses_and_tool_input(tiny_cache, tmp_path):
    """A proxy or a broken deployment answering 200 with something that is not a message is retried; tool
    calls with malformed input, an unknown tool, a read outside the scope or a finish before any change each
    get an error back; the change that finally comes is run and kept."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "garbled")
    not_an_object = {"type": "tool_use", "id": "toolu_bad", "name": "edit_trainer", "input": "VAL_BPB = 1.5"}
    replies = [
        (200, ["not", "a", "message"], {}),
        (200, "<html>502 Bad Gateway</html>", {}),
        (200, {"type": "message", "role": "assistant"}, {}),  # no content
        (200, b'{"id": "msg_1", "type": "mess', {}),  # cut short
        message(tool("edit_trainer", old_string=2.0, new_string=1.5)),
        message(not_an_object),
        message(tool("edit_trainer", old_string="VAL_BPB = 2.0")),
        message(tool("edit_file", path="prepare.py", old_string="x", new_string="y")),
        message(tool("read_file", path="/etc/passwd")),
        message(tool("finish", description="nothing yet")),
        *WIN_CALLS,
    ]
    with RawMessagesAPI(replies) as api:
        proc = run_loop(repo, *_claude_args("garbled", "--max-experiments", "1"), env=_claude_env(tiny_cache, api.url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("claude: malformed response") == 4
    assert len(api.requests) == 12
    errors = [b for r in api.requests[5:11] for b in r["messages"][-1]["content"] if b.get("type") == "tool_result"]
    assert len(errors) == 6 and all(b.get("is_error") for b in errors)
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == pytest.approx(fake_bpb(1.5), abs=1.5e-6)


def test_loop_killed_while_the_agent_edits_then_resumed(tiny_cache, tmp_path):
    """SIGKILL while Claude is halfway through a change (the trainer edited, nothing committed yet): the
    next start sets the unfinished edit aside (saved under runs/) and restores the trainer."""
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
    proc = run_loop(repo, *_claude_args("midedit", "--max-experiments", "0"),
                    env=_claude_env(tiny_cache, "http://127.0.0.1:9"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unfinished edit of train_cuda.py" in proc.stdout
    (saved,) = (repo / "runs").glob("unfinished-*.patch")
    assert "+VAL_BPB = 1.5" in saved.read_text()
    check_after(prior, [])


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
    assert_stopped(proc, str(shard), "corrupt or truncated", "uv run prepare.py --protocol tiny")
    check_after(prior, [])
    assert not (repo / "runs").exists()  # nothing ran

    # following the advice: delete it and prepare again, then the loop starts
    shard.unlink()
    prep = subprocess.run([sys.executable, "prepare.py", "--protocol", "tiny"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert prep.returncode == 0, prep.stdout + prep.stderr
    proc = run_loop(repo, *loop_args("shard", script, "--max-experiments", "0"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_after(prior, [])


def test_validation_shard_corrupted_mid_session(tiny_cache, tmp_path):
    """The data breaks between two experiments: the harness refuses to score on it, the run is a crash, and
    the loop says why and stops instead of handing the agent fix attempts for a change that did nothing wrong."""
    cache = private_cache(tiny_cache, tmp_path)
    repo = make_repo(tmp_path, DATA_TRAINER)
    prior = seed(repo, "midshard")
    shard = val_shard(cache)
    script = write_script(tmp_path, [{**WIN, "write": {str(shard): "PAR1 not really"}}, WIN])
    proc = run_loop(repo, *loop_args("midshard", script, "--max-experiments", "2"), env=loop_env(cache))
    assert_stopped(proc, str(shard), "uv run prepare.py --protocol tiny")
    (crash,) = check_after(prior, ["crash"])
    assert str(shard.name) in crash.note
    assert "harness: not scored (data)" in (repo / "runs" / str(crash.run) / "log.txt").read_text()
    assert "asking the scripted agent to fix" not in proc.stdout


def test_missing_tokenizer_mid_session_stops_then_resume_rebuilds_it(tiny_cache, tmp_path):
    cache = private_cache(tiny_cache, tmp_path)
    repo = make_repo(tmp_path, DATA_TRAINER)
    prior = seed(repo, "tok")
    env = loop_env(cache)
    script = write_script(tmp_path, [{**WIN, "delete": [str(f) for f in tokenizer_files(cache)]}])
    proc = run_loop(repo, *loop_args("tok", script, "--max-experiments", "1"), env=env)
    assert_stopped(proc, "has no tokenizer", "uv run prepare.py --protocol tiny")
    (crash,) = check_after(prior, ["crash"])
    assert "has no tokenizer" in crash.note

    proc = run_loop(repo, *loop_args("tok", write_script(tmp_path, [WIN]), "--max-experiments", "0"), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preparing protocol 'tiny'" in proc.stdout
    assert all(f.exists() for f in tokenizer_files(cache))
    check_after(prior, ["crash"])


# ------------------------------------------------------------------------------------------------
# 18. results.tsv cannot be written (the loop driven in-process, so the disk can "fill up"; the runs
#     are scripted measurements: the trainer is not the point)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["disk-full", "short-write", "read-only"])
def test_results_file_cannot_be_written(tmp_path, in_process, stub_runs, fault):
    """The disk fills up (or turns read-only) when a winning row is to be appended: the loop stops with
    one sentence, no partial row is left, and the unrecorded win is not left as the branch head."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "disk", 3.0)
    stub_runs({"a clear win": [2.5]})
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
    prior = seed(repo, "full", 3.0)
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


def test_unexpected_error_in_the_loop_restores_the_tree(tmp_path, in_process, stub_runs, monkeypatch):
    """A bug in the loop itself mid-experiment (after the commit and the run, before the record): the
    traceback is shown, and the tree, the branch and the lock are left as after an interrupt."""
    import research.experiment

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the loop")

    repo = make_repo(tmp_path)
    prior = seed(repo, "bug", 3.0)
    calls = stub_runs({"a clear win": [2.5]})
    monkeypatch.setattr(research.experiment, "decide", broken)
    with pytest.raises(RuntimeError, match="a bug in the loop"):
        in_process(repo, loop_args("bug", write_script(tmp_path, [WIN]), "--max-experiments", "1"))
    assert calls == [("a clear win", "", 2.5)]  # it failed after the run
    check_after(prior, [])


def test_results_file_is_a_directory(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "dir", 3.0)
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


def test_concurrent_loops_one_runs_the_others_refuse(tiny_cache, tmp_path):
    """Three loops started at once: one runs, the other two refuse, whatever the timing. Another one started
    while the first one's trainer runs refuses too, naming it, and changes nothing."""
    repo = make_repo(tmp_path, HELD)  # the trainer waits for release(repo)
    prior = seed(repo, "race")
    env = loop_env(tiny_cache)
    script = write_script(tmp_path, [WIN])
    loops = [start_loop(repo, loop_args("race", script, "--max-experiments", "1"), env, tmp_path / f"{i}.log")
             for i in range(3)]
    try:
        wait_for(lambda: sum(p.poll() is not None for p in loops) >= 2, "two of the loops to refuse")
        (first,) = [p for p in loops if p.poll() is None]
        wait_for(log_has(repo, "holding until SIGUSR1"), "the first loop's trainer to start", procs=(first,))
        head, data = git(repo, "rev-parse", "HEAD"), (repo / "results.tsv").read_bytes()
        second = run_loop(repo, *loop_args("race", write_script(tmp_path, [WIN]), "--max-experiments", "1"), env=env)
        assert_stopped(second, f"Another autoresearch loop (pid {first.pid}) is running on this repository")
        assert first.poll() is None and git(repo, "rev-parse", "HEAD") == head
        assert (repo / "results.tsv").read_bytes() == data and len(list((repo / "runs").iterdir())) == 1
        release(repo)
        codes = sorted(p.wait(timeout=120) for p in loops)
    finally:
        for p in loops:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(3)]
    assert codes == [0, 1, 1], logs
    assert sum("Another autoresearch loop" in log for log in logs) == 2
    assert not any("Traceback" in log for log in logs)
    (win,) = check_after(prior, ["keep"])
    assert win.val_bpb == pytest.approx(fake_bpb(1.5), abs=1.5e-6)


def _take_lock(repo: str, start: float, results, done) -> None:
    while time.time() < start:
        pass
    try:
        RepoLock(Path(repo)).acquire()
    except LockError:
        results.put(0)
        return
    results.put(1)
    done.wait(30)  # hold it until every other process has tried (however late the machine let it start)


def test_repo_lock_has_one_holder_under_a_race(tmp_path):
    """Processes taking the lock at the same instant, many times over: never two holders."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(25):
        repo = tmp_path / str(trial)
        repo.mkdir()
        results, done = ctx.Queue(), ctx.Event()
        start = time.time() + 0.03
        procs = [ctx.Process(target=_take_lock, args=(str(repo), start, results, done)) for _ in range(4)]
        for p in procs:
            p.start()
        held = [results.get(timeout=30) for _ in procs]
        done.set()
        for p in procs:
            p.join()
        assert sum(held) == 1, f"trial {trial}: {sum(held)} holders"


def test_ctrl_c_in_try_while_its_baseline_runs_puts_the_edit_back(tiny_cache, tmp_path):
    """`try` on a branch without a baseline runs the baseline first with the edit set aside; Ctrl-C then
    puts the edit back, uncommitted, and the message says so (it does not read as if it were thrown away)."""
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "autoresearch/tryint")
    trainer = repo / "train_cuda.py"
    trainer.write_text(trainer.read_text().replace('MODE = "ok"', 'MODE = "hang"'))
    git(repo, "commit", "-qam", "a trainer whose runs hang")
    edited = trainer.read_text().replace("VAL_BPB = 2.0", "VAL_BPB = 1.5")
    trainer.write_text(edited)
    loop = start_loop(repo, ["try", "lower it"], loop_env(tiny_cache), tmp_path / "try.log")
    workspace, running, _ = _hung_run(repo, loop)
    loop.send_signal(signal.SIGINT)
    assert loop.wait(timeout=60) == 130
    out = (tmp_path / "try.log").read_text()
    assert "your uncommitted edit is back in train_cuda.py" in out and "Traceback" not in out, out
    assert trainer.read_text() == edited and git(repo, "status", "--porcelain") == "M train_cuda.py"
    assert_gone(running, workspace)
