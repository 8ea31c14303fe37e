"""The few git operations the loop needs, each one small and checked.

Commits are made with hooks and signing off and with a fallback identity, so a fresh
machine without `user.name` configured still works. Nothing here touches files that
git ignores (results.tsv, runs/, virtual environments).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["GitError", "git", "git_bytes", "head", "current_branch", "branch_exists", "is_ancestor", "changed_paths", "commit_paths",
           "reset_hard", "remove_paths", "diff", "is_repo"]


class GitError(RuntimeError):
    """A git command failed (message carries git's own explanation)."""


_IDENTITY = {
    "GIT_AUTHOR_NAME": "autoresearch",
    "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
    "GIT_COMMITTER_NAME": "autoresearch",
    "GIT_COMMITTER_EMAIL": "autoresearch@localhost",
}


def git(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> str:
    """Run `git -C repo args...` and return stdout without the trailing newline."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "-c", "commit.gpgsign=false", "-c", "core.quotepath=off", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise GitError(f"git {args[0]} failed: {msg[-1] if msg else 'exit code ' + str(proc.returncode)}")
    return proc.stdout.rstrip("\n")


def git_bytes(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """Run `git -C repo args...` on raw bytes (file contents, -z listings) and return stdout unchanged."""
    proc = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise GitError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def is_repo(repo: Path) -> bool:
    """True if `repo` is the top level of a git work tree with at least one commit."""
    top = git(repo, "rev-parse", "--show-toplevel", check=False)
    return bool(top) and Path(top).resolve() == Path(repo).resolve() and bool(head(repo, check=False))


def head(repo: Path, check: bool = True) -> str:
    """Full hash of HEAD ('' if there is none and check is False)."""
    return git(repo, "rev-parse", "--verify", "-q", "HEAD", check=check)


def current_branch(repo: Path) -> str | None:
    """Name of the checked-out branch, None when HEAD is detached."""
    name = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    return name or None


def is_ancestor(repo: Path, older: str, newer: str) -> bool:
    """True if commit `older` is reachable from `newer` (or the same commit)."""
    proc = subprocess.run(["git", "-C", str(repo), "merge-base", "--is-ancestor", older, newer],
                          capture_output=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def branch_exists(repo: Path, name: str) -> bool:
    return bool(git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{name}", check=False))


def changed_paths(repo: Path) -> dict[str, str]:
    """Every path that differs from HEAD, with a one-letter kind: M(odified), A(dded), D(eleted), U(ntracked).

    Ignored files are not reported. Renames are reported as a deletion plus an addition.
    """
    out = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    if out.returncode != 0:
        raise GitError(f"git status failed: {out.stderr.decode(errors='replace').strip()}")
    changes: dict[str, str] = {}
    for entry in out.stdout.decode("utf-8", errors="surrogateescape").split("\0"):
        if len(entry) < 4:
            continue
        code, path = entry[:2], entry[3:]
        if code == "??":
            changes[path] = "U"
        elif "D" in code:
            changes[path] = "D"
        elif "A" in code:
            changes[path] = "A"
        else:
            changes[path] = "M"
    return changes


def _identity_env(repo: Path) -> dict | None:
    if git(repo, "config", "user.email", check=False) and git(repo, "config", "user.name", check=False):
        return None
    return {**os.environ, **_IDENTITY}


def commit_paths(repo: Path, paths: list[str], message: str) -> str:
    """Stage exactly `paths` and commit them (hooks skipped); returns the new full hash."""
    git(repo, "add", "--", *paths)
    git(repo, "commit", "-q", "--no-verify", "-m", message, "--", *paths, env=_identity_env(repo))
    return head(repo)


def reset_hard(repo: Path, commit: str) -> None:
    """Move the current branch to `commit` and make the tracked files match it."""
    git(repo, "reset", "-q", "--hard", commit)


def remove_paths(repo: Path, paths: list[str]) -> None:
    """Delete untracked files, then any directories that became empty (up to the repo root)."""
    root = Path(repo).resolve()
    for rel in paths:
        p = root / rel
        try:
            if p.is_symlink() or p.is_file():
                p.unlink()
        except FileNotFoundError:
            continue
        parent = p.parent
        while parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent


def diff(repo: Path, *args: str) -> str:
    """`git diff` output (text), e.g. diff(repo, "HEAD", "--", "train_cuda.py")."""
    out = git(repo, "diff", "--no-color", "--no-ext-diff", *args)
    return out + "\n" if out else ""
