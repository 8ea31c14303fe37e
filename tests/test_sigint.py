"""Ctrl-C stops the loop even when it was started with SIGINT ignored.

A script that starts `loop.py` in the background (`python loop.py run &` in a non-interactive shell, a job
runner) hands it SIGINT as SIG_IGN, which Python keeps unless told otherwise: Ctrl-C or `kill -INT` then did
nothing. loop.py installs its SIGINT handler itself, so the interrupt raises KeyboardInterrupt and the loop
stops the trainer, restores the tree and exits 130 as it does in a terminal.

Run: `uv run pytest tests/test_sigint.py` (seconds; the stand-in trainer, no network, no API key).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_faults import _hung_run, assert_gone, check_after, loop_args, seed
from test_loop import edit, lock_trainer, loop_env, make_repo, write_script


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_sigint_stops_a_loop_started_with_sigint_ignored(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "ign")
    slow = write_script(tmp_path, [edit('MODE = "ok"', 'MODE = "hang"', "a long experiment")])
    log = tmp_path / "loop.log"
    trainer_group = None
    with open(log, "w") as out:  # its own process group, so the finally below can end all of it
        loop = subprocess.Popen([sys.executable, "loop.py", *loop_args("ign", slow)], cwd=repo,
                                env=loop_env(tiny_cache), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_ignore_sigint)
    try:
        workspace, running, trainer_group = _hung_run(repo, loop)  # the loop is in main(), waiting on its trainer
        loop.send_signal(signal.SIGINT)
        try:
            code = loop.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("SIGINT did not stop a loop started with SIGINT ignored") from None
        out = log.read_text()
        assert code == 130, out
        assert "interrupted" in out and "Run the same command again to resume" in out and "Traceback" not in out, out
        assert_gone(running, workspace)
        check_after(prior, [])  # the interrupted experiment left no row, no commit, no lock
    finally:  # a loop that did not stop: end it and its trainer, which runs in a process group of its own
        if loop.poll() is None:
            trainer_group = trainer_group or lock_trainer(repo)
            _kill_group(loop.pid)
            if trainer_group is not None:
                _kill_group(trainer_group)
            loop.wait()

