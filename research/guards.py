"""What keeps an experiment honest: locked-file hashes, the one-file scope rule, the repo lock,
and the scrubbed environment the trainer runs in."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

__all__ = [
    "LOCKED_PATHS",
    "LOCK_FILE",
    "LockError",
    "RepoLock",
    "child_env",
    "hash_locked",
    "locked_changes",
    "text_hash",
]

# The agent may never change these; they are hashed at start and checked before every record.
LOCKED_PATHS = ("prepare.py", "backends", "model", "research", "loop.py")
LOCK_FILE = ".autoresearch.lock"

_SECRET = re.compile(r"(_KEY$|_TOKEN$|SECRET|PASSWORD|PASSWD|CREDENTIAL|^ANTHROPIC_API_KEY$)", re.IGNORECASE)


def text_hash(data: str | bytes) -> str:
    """Short content hash used for trainers and locked files (sha256, 12 hex digits)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:12]


def hash_locked(repo: Path) -> dict[str, str]:
    """Hash of every locked file, keyed by repo-relative path (byte-code caches are skipped)."""
    repo = Path(repo)
    hashes: dict[str, str] = {}
    for name in LOCKED_PATHS:
        p = repo / name
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            if "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            hashes[f.relative_to(repo).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashes


def locked_changes(repo: Path, expected: dict[str, str]) -> list[str]:
    """Locked paths that were modified, added or deleted since `expected` was taken."""
    now = hash_locked(repo)
    return sorted(p for p in set(now) | set(expected) if now.get(p) != expected.get(p))


def child_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The trainer's environment: the loop's, minus anything that looks like a credential, plus `extra`."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not _SECRET.search(k)}
    env.update(extra)
    return env


class LockError(RuntimeError):
    """Another loop holds the repository (message is one sentence for the user)."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RepoLock:
    """`.autoresearch.lock` holding our pid: a second loop on the same repo refuses; a stale lock
    (its pid is gone) is taken over."""

    def __init__(self, repo: Path):
        self.path = Path(repo) / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pid = -1
                if pid == os.getpid():
                    self.held = True
                    return
                if _pid_alive(pid):
                    raise LockError(
                        f"Another autoresearch loop (pid {pid}) is running on this repository; "
                        f"stop it first (or delete {self.path.name} if that process is not a loop)."
                    ) from None
                try:
                    self.path.unlink()  # stale: its owner died without cleaning up
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise LockError(f"Could not take {self.path}; another loop keeps replacing it.")

    def release(self) -> None:
        if not self.held:
            return
        try:
            if int(self.path.read_text().split()[0]) == os.getpid():
                self.path.unlink()
        except (OSError, ValueError, IndexError):
            pass
        self.held = False

    def __enter__(self) -> RepoLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
