"""One guard for one worker and for N (research/guards.py `guard_run`): what the single-worker loop catches after
a run (tests/test_faults.py, tests/test_hardening.py, tests/test_loop.py) is caught the same way with
`loop.py run --workers 2` on Ray: refs, HEAD, .git/config, hooks and results.tsv put back and the run
rejected, a locked file changed stops the loop, a crash is a crash; and in both the guard comes before
anything is decided about the run, so a run that meddled gets no confirm runs.

The trainers meddle with the repository, which only a trainer without the sandbox can reach (tests/
test_attacks.py tries it in the sandbox), so these loops run with --no-sandbox. Each parallel test starts a
local Ray (about 12 s) and runs the stand-in trainer of tests/test_loop.py: about 40 s for the default one,
90 s for the slow one, 30 s for the single-worker one on a 2-core machine.

Run: `uv run pytest tests/test_workers_guards.py` (add `-m slow` for the long one).
"""

from __future__ import annotations

import pytest

from tests.test_faults import START, WIN, check_after
from tests.test_loop import (STOP_AFTER_MEDDLING, assert_clean, edit, git, loop_env, make_repo, read_rows, run_loop,
                             seed, write_script)
from tests.test_parallel import worktrees

pytest.importorskip("ray")

# Where the trainer finds the repository it was started from: its own folder is a git worktree with a `.git`
# file, git tells the shared git directory.
FIND = ('    here = os.path.dirname(os.path.abspath(__file__))\n'
        '    common = os.path.abspath(os.path.join(here, subprocess.run(["git", "-C", here, "rev-parse", '
        '"--git-common-dir"], capture_output=True, text=True).stdout.strip()))\n'
        '    repo = os.path.dirname(common)\n')
GIT = 'subprocess.run(["git", "-C", here, "-c", "user.name=t", "-c", "user.email=t@t", '
DONE = "    sys.exit(3)\n"  # done meddling: nothing to hand over
OWN_ROW = '    open(os.path.join(repo, "results.tsv"), "a").write("abc1234\\t0.500000\\t0.5\\tkeep\\tmy own row\\n")\n'


def meddle(what: str, code: str) -> dict:
    """A change whose run does `code` to the repository, then ends without a hand-over."""
    return edit(START, START + FIND + code + DONE, what)


def run_args(tag: str, script: str, *more: str) -> list[str]:
    return ["run", "--agent", "scripted", "--script", script, "--tag", tag, "--baseline-runs", "1",
            "--max-fix-attempts", "0", "--remeasure-every", "0", "--no-sandbox", *more]


def _config_and_hooks(repo) -> tuple[bytes, list[str]]:
    return (repo / ".git" / "config").read_bytes(), sorted(p.name for p in (repo / ".git" / "hooks").iterdir())


@pytest.mark.slow  # a long end-to-end loop run on Ray: `uv run pytest -m slow` (CI runs it)
def test_two_workers_put_back_what_runs_change_and_reject_them(tiny_cache, tmp_path):
    """Five runs, two at a time, each changing something the loop owns: its own row in results.tsv (with a
    winning model: it would earn a confirm run if the guard came after the decision), a commit in its
    worktree, a branch checked out there, a hook and a setting planted in .git, the main branch moved. Every
    one is rejected, everything is put back, no confirm run is made, and the repository ends as it began."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "meddle")
    config, hooks = _config_and_hooks(repo)
    script = write_script(tmp_path, [
        {"description": "log a winning result myself",
         "edits": [WIN["edits"][0], {"old": START, "new": START + FIND + OWN_ROW}]},
        meddle("commit a checkpoint", f'    {GIT}"commit", "-q", "--allow-empty", "-m", "checkpoint"], check=True)\n'),
        meddle("train on the main branch", f'    {GIT}"checkout", "-q", "main"], check=True)\n'),
        meddle("plant a hook and a setting",
               '    open(os.path.join(common, "hooks", "pre-commit"), "w").write("#!/bin/sh\\ntouch /tmp/pwned\\n")\n'
               '    open(os.path.join(common, "config"), "a").write("[core]\\n\\tfsmonitor = touch /tmp/pwned\\n")\n'),
        meddle("move the main branch", f'    {GIT}"update-ref", "refs/heads/main", "HEAD"], check=True)\n'),
    ])
    proc = run_loop(repo, *run_args("meddle", script, "--workers", "2", "--max-experiments", "5"),
                    env=loop_env(tiny_cache), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = check_after(prior, ["rejected"] * 5)
    notes = " | ".join(r.note for r in rows)
    assert all(r.note.startswith("rejected: the run changed ") for r in rows), notes
    for found in ("results.tsv", "the git history", "the checked-out branch", "git settings (", "hooks/pre-commit",
                  "refs (refs/heads/main moved)"):
        assert found in notes, (found, notes)
    assert {r.worker.split("@")[0] for r in rows} <= {"w0", "w1"}
    assert "running the best, then the change again" not in proc.stdout  # rejected before any decision
    assert not [r for r in read_rows(repo) if r.status == "rerun"]
    assert git(repo, "rev-parse", "main") == prior.kept
    assert _config_and_hooks(repo) == (config, hooks)
    assert git(repo, "rev-parse", "HEAD") == prior.kept
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == prior.branch
    assert_clean(repo)
    assert len(worktrees(repo)) == 1  # only the repository itself


@pytest.mark.slow  # a loop run on Ray (CI runs the slow set)
def test_two_workers_stop_on_a_locked_file_and_record_a_crash(tiny_cache, tmp_path):
    """Beside a crash (recorded as one, the failing line in its note), a run rewrites a locked file in its
    worktree: rejected, put back, and the loop stops, as with one worker."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "locked")
    script = write_script(tmp_path, [
        edit('MODE = "ok"', 'MODE = "crash"', "a crash"),
        {"description": "rewrite the evaluator at run time",
         "edits": [{"old": 'MODE = "ok"', "new": 'MODE = "tamper"'}, {"old": "SLEEP = 0.0", "new": "SLEEP = 4.0"},
                   STOP_AFTER_MEDDLING]},
        edit("VAL_BPB = 2.0", "VAL_BPB = 1.0", "never reached"),
    ])
    proc = run_loop(repo, *run_args("locked", script, "--workers", "2", "--max-experiments", "3", "--no-confirm"),
                    env=loop_env(tiny_cache), timeout=400)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Locked files were changed during the run (prepare.py)" in proc.stderr
    crash, tampered = check_after(prior, ["crash", "rejected"])
    assert crash.description == "a crash" and "RuntimeError: deliberate crash" in crash.note
    assert tampered.note.startswith("rejected: Locked files were changed during the run (prepare.py)")
    assert "never reached" not in [r.description for r in read_rows(repo)]
    assert_clean(repo)
    assert len(worktrees(repo)) == 1  # only the repository itself


def test_one_worker_guards_before_the_confirm_runs(tiny_cache, tmp_path):
    """A winning run that also wrote its own row: with one worker too, the guard comes first, so it is rejected
    without the best's run and the confirm run a promising change gets."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "first")
    here = "    here = os.path.dirname(os.path.abspath(__file__))\n"
    script = write_script(tmp_path, [{"description": "a win, and my own row", "edits": [
        WIN["edits"][0], {"old": START, "new": START + here + '    open(os.path.join(here, "results.tsv"), "a").write('
                          '"abc1234\\t0.500000\\t0.5\\tkeep\\tmy own row\\n")\n'}]}])
    proc = run_loop(repo, *run_args("first", script, "--max-experiments", "1"), env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = check_after(prior, ["rejected"])
    assert row.note == "rejected: the run changed results.tsv (put back)"
    assert "running the best, then the change again" not in proc.stdout
    assert git(repo, "rev-parse", "HEAD") == prior.kept
    assert_clean(repo)


def test_guard_run_is_the_one_guard_of_both_paths():
    """Both paths call the same function (no guard of their own)."""
    import inspect

    from research import experiment, guards, parallel

    assert "guard_run(" in inspect.getsource(experiment.guard) and "guard(" in inspect.getsource(experiment.run_experiment)
    assert "guard_run(" in inspect.getsource(parallel.Driver._guarded)
    assert not hasattr(parallel.Driver, "_guard")
    assert guards.guard_run.__module__ == "research.guards"
