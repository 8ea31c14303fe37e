"""`loop.py try` as an external coding agent uses it: what it refuses, and that a rejection loses nothing.

Run: uv run pytest tests/test_try.py      (CPU, no network; about half a minute)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import FAKE_TRAINER, git, loop_env, make_repo, read_rows, run_loop


def test_try_refuses_a_branch_that_is_not_a_research_branch(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    (repo / "train_cuda.py").write_text(FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    (repo / "notes.txt").write_text("work in progress\n")
    proc = run_loop(repo, "try", "on main", env=loop_env(tiny_cache))
    assert proc.returncode == 1
    assert "runs on a research branch, not on 'main'" in proc.stderr and "git checkout -b autoresearch/" in proc.stderr
    assert "VAL_BPB = 1.5" in (repo / "train_cuda.py").read_text() and (repo / "notes.txt").exists()
    assert not (repo / "results.tsv").exists() or read_rows(repo) == []


def test_a_rejected_try_keeps_the_edit_and_says_how_to_get_the_rest_back(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "autoresearch/scratch")
    env = loop_env(tiny_cache)
    first = run_loop(repo, "try", "baseline first", "--baseline-runs", "1", env=env)  # no edit: nothing to try
    assert first.returncode == 1 and "Nothing to try" in first.stderr
    edited = FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5")
    (repo / "train_cuda.py").write_text(edited)
    (repo / "scratch.py").write_text("print('a scratch file')\n")
    (repo / "program.md").write_text((repo / "program.md").read_text() + "\nmy notes\n")
    proc = run_loop(repo, "try", "an edit with a scratch file", "--baseline-runs", "1", env=env)
    out = proc.stdout
    assert "REJECTED" in out, out + proc.stderr
    assert (repo / "train_cuda.py").read_text() == edited  # the trainer edit stays, uncommitted
    assert not (repo / "scratch.py").exists() and "my notes" not in (repo / "program.md").read_text()
    moved = re.search(r"moved to (runs/\d+/removed)/ \(scratch\.py\); get them back with: cp -r \1/\. \.", out)
    assert moved, out
    applied = re.search(r"get them back with: git apply --exclude=train_cuda.py (runs/\d+/diff\.patch)", out)
    assert applied, out
    subprocess.run(["cp", "-r", f"{moved.group(1)}/.", "."], cwd=repo, check=True)
    subprocess.run(["git", "apply", "--exclude=train_cuda.py", applied.group(1)], cwd=repo, check=True)
    assert (repo / "scratch.py").exists() and "my notes" in (repo / "program.md").read_text()
    assert (repo / "train_cuda.py").read_text() == edited


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_the_default_cache_under_home_reaches_the_sandboxed_trainer(tiny_cache_root, tmp_path):
    """No AUTORESEARCH_CACHE set: the data lives under ~/.cache/autoresearch, and the trainer (whose HOME
    is its private workspace) and the harness must still find it."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(tiny_cache_root, home / ".cache" / "autoresearch")
    repo = make_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "autoresearch/home")
    (repo / "train_cuda.py").write_text(FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    env = loop_env(tiny_cache_root, HOME=str(home))
    del env["AUTORESEARCH_CACHE"]
    proc = run_loop(repo, "try", "a change", "--baseline-runs", "1", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r.status for r in read_rows(repo)][:1] == ["keep"] and read_rows(repo)[0].val_bpb > 0
