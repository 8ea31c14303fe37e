"""The trainers the tests test: the product's, not whatever the research agent left on a research branch.

After a night of research the checkout is on `autoresearch/<tag>`, and its train_cuda.py / train_mlx.py
carry the kept changes (another EMBEDDING_LR, a rewritten line a scripted edit relied on). The suite
tests the project as shipped, so every test that reads, imports, copies or runs a trainer takes it from
here:

- on a research branch (`autoresearch/*`): the trainers as they were where the branch forked, i.e. at the
  newest commit of HEAD's history that some other branch (local or remote, research branches excluded)
  also holds: `git merge-base HEAD main` when `main` is the branch it came from;
- anywhere else (main, a feature branch, a detached HEAD, a copy without git): the work tree's files, so
  a developer's uncommitted edit of a trainer is what the tests test.

`trainer_dir()` writes them once per process into a temporary directory that is put first on sys.path
(tests/conftest.py), so `import train_cuda` in a test imports the same file the subprocesses run.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
TRAINERS = ("train_cuda.py", "train_mlx.py")
RESEARCH_PREFIX = "autoresearch/"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    except FileNotFoundError:  # no git on this machine: not a checkout as far as the tests can tell
        return subprocess.CompletedProcess(args, 127, "", "git not found")


def fork_point(repo: Path = PROJECT) -> str | None:
    """The commit the research branch checked out in `repo` forked from, or None when `repo` is not a git
    checkout on a research branch."""
    branch = _git(repo, "symbolic-ref", "-q", "--short", "HEAD")
    if branch.returncode != 0 or not branch.stdout.strip().startswith(RESEARCH_PREFIX):
        return None
    # the commits only research branches hold, oldest first; the fork point is the first one's parent
    only_research = _git(repo, "rev-list", "--topo-order", "--reverse", "HEAD", "--not",
                         f"--exclude={RESEARCH_PREFIX}*", "--branches", f"--exclude=*/{RESEARCH_PREFIX}*", "--remotes")
    if only_research.returncode != 0:
        return None
    commits = only_research.stdout.split()
    if not commits:  # another branch holds HEAD itself: nothing was kept on top of it
        return _git(repo, "rev-parse", "HEAD").stdout.strip()
    parent = _git(repo, "rev-parse", "-q", "--verify", f"{commits[0]}^")
    # no other branch at all: the branch's root commit is the oldest version there is
    return parent.stdout.strip() if parent.returncode == 0 else commits[0]


def write_trainers(dest: Path, repo: Path = PROJECT) -> tuple[Path, str | None]:
    """Write the pristine trainers of `repo` into `dest`; returns (dest, the fork-point commit they came
    from, or None when they are the work tree's)."""
    dest.mkdir(parents=True, exist_ok=True)
    commit = fork_point(repo)
    for name in TRAINERS:
        if commit is not None:
            shown = _git(repo, "show", f"{commit}:{name}")
            if shown.returncode == 0:  # else not in the project at the fork point: no pristine version
                (dest / name).write_text(shown.stdout, encoding="utf-8")
        elif (repo / name).exists():
            shutil.copy2(repo / name, dest / name)
    return dest, commit


_DIR: Path | None = None


def trainer_dir() -> Path:
    """A directory holding this checkout's pristine train_cuda.py and train_mlx.py, written once per process."""
    global _DIR
    if _DIR is None:
        tmp = Path(tempfile.mkdtemp(prefix="autoresearch-pristine-"))
        atexit.register(shutil.rmtree, tmp, True)
        _DIR, _ = write_trainers(tmp)
    return _DIR


def trainer(name: str) -> Path:
    """The pristine copy of one trainer (`train_cuda.py` or `train_mlx.py`)."""
    return trainer_dir() / name


def script(source: str) -> str:
    """`source` for `python -c` that imports the pristine trainers: `-c` puts the working directory (the
    checkout, with the agent's trainers) first on sys.path, ahead of PYTHONPATH."""
    return f"import sys; sys.path.insert(0, {str(trainer_dir())!r})\n" + source
