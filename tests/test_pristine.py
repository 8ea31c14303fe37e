"""The tests test the project's trainers, not a research branch's kept edits (tests/pristine.py).

Run: uv run pytest tests/test_pristine.py      (a few seconds; git only)
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pristine

EDIT_LR = ("EMBEDDING_LR = 0.6", "EMBEDDING_LR = 0.9")
EDIT_STEP = ("        optimizer.step()\n", "        optimizer.step()  # kept by the agent\n")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def project_repo(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A repository on `main` holding the project's two trainers; returns it and their texts."""
    repo = tmp_path / "repo"
    repo.mkdir()
    texts = {name: pristine.trainer(name).read_text() for name in pristine.TRAINERS}
    for name, text in texts.items():
        (repo / name).write_text(text)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    return repo, texts


def keep_an_edit(repo: Path) -> None:
    """What a night of research leaves: a committed edit of the trainer (another learning rate, and a line a
    scripted edit of the tests relies on rewritten)."""
    trainer = repo / "train_cuda.py"
    text = trainer.read_text()
    assert EDIT_LR[0] in text and EDIT_STEP[0] in text  # the edits below really change something
    trainer.write_text(text.replace(EDIT_LR[0], EDIT_LR[1]).replace(EDIT_STEP[0], EDIT_STEP[1]))
    (repo / "train_mlx.py").write_text((repo / "train_mlx.py").read_text().replace(EDIT_LR[0], EDIT_LR[1]))
    git(repo, "commit", "-qam", "a kept change")


def leave_an_unfinished_edit(repo: Path) -> None:
    trainer = repo / "train_cuda.py"
    trainer.write_text(trainer.read_text() + "\n# the agent's unfinished edit\n")


def pristine_texts(repo: Path, dest: Path) -> tuple[dict[str, str], str | None]:
    out, commit = pristine.write_trainers(dest, repo)
    return {name: (out / name).read_text() for name in pristine.TRAINERS}, commit


def test_on_a_research_branch_the_trainers_are_those_of_the_fork_point(tmp_path):
    repo, texts = project_repo(tmp_path)
    fork = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "autoresearch/x")
    keep_an_edit(repo)
    leave_an_unfinished_edit(repo)
    git(repo, "commit", "-qam", "another kept change")  # the unfinished edit, kept after all
    git(repo, "checkout", "-q", "main")  # main moves on after the fork: still the fork point's trainers
    (repo / "train_cuda.py").write_text(texts["train_cuda.py"] + "# later on main\n")
    git(repo, "commit", "-qam", "main moves on")
    git(repo, "checkout", "-q", "autoresearch/x")
    git(repo, "branch", "autoresearch/other")  # other research branches do not count as the project
    leave_an_unfinished_edit(repo)
    got, commit = pristine_texts(repo, tmp_path / "a")
    assert commit == fork == git(repo, "merge-base", "HEAD", "main")
    assert got == texts
    assert EDIT_LR[1] in (repo / "train_cuda.py").read_text()  # the checkout itself keeps the agent's trainer


def test_a_clone_without_a_local_main_forks_from_the_remote_branch(tmp_path):
    origin, texts = project_repo(tmp_path)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    git(clone, "checkout", "-q", "-b", "autoresearch/night")
    git(clone, "branch", "-D", "main")
    keep_an_edit(clone)
    leave_an_unfinished_edit(clone)
    got, commit = pristine_texts(clone, tmp_path / "b")
    assert commit == git(origin, "rev-parse", "main") and got == texts


def test_off_a_research_branch_the_work_tree_is_tested(tmp_path):
    """On main (or any other branch) a developer's uncommitted edit of a trainer is what the tests test."""
    repo, texts = project_repo(tmp_path)
    (repo / "train_cuda.py").write_text(texts["train_cuda.py"] + "# a developer's edit\n")
    got, commit = pristine_texts(repo, tmp_path / "c")
    assert commit is None and got["train_cuda.py"].endswith("# a developer's edit\n")
    plain = tmp_path / "no-git"  # not a git checkout at all: the files as they are
    plain.mkdir()
    (plain / "train_cuda.py").write_text("X = 1\n")
    got, commit = pristine.write_trainers(tmp_path / "d", plain)
    assert commit is None and (got / "train_cuda.py").read_text() == "X = 1\n" and not (got / "train_mlx.py").exists()


def test_the_suite_imports_and_runs_the_pristine_copies(pristine_trainers, tmp_path):
    """The session's copies are what write_trainers gives for this checkout, and `import train_cuda` finds them."""
    assert pristine_trainers == pristine.trainer_dir()
    again, _ = pristine_texts(pristine.PROJECT, tmp_path / "again")
    for name in pristine.TRAINERS:
        assert (pristine_trainers / name).read_text() == again[name]
        assert Path(importlib.util.find_spec(name.removesuffix(".py")).origin) == pristine_trainers / name
