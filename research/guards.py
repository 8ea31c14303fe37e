"""What keeps an experiment honest: locked-file hashes, the one-file scope rule, the repo lock,
and the scrubbed environment the trainer runs in."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
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


def hash_locked(repo: Path, commit: str | None = None) -> dict[str, str]:
    """sha256 of every locked file, keyed by repo-relative path.

    With `commit`, the files as committed there; without, the work tree: tracked files plus
    untracked ones git does not ignore (byte-code caches are ignored, so they never count).
    """
    repo = Path(repo)
    if commit is not None:
        listing = _git(repo, "ls-tree", "-r", "-z", commit, "--", *LOCKED_PATHS).decode()
        entries = [e.split("\t", 1) for e in listing.split("\0") if e]
        blobs = [(path, meta.split()[2]) for meta, path in entries if meta.split()[1] == "blob"]
        data = _git(repo, "cat-file", "--batch", stdin="".join(f"{b}\n" for _, b in blobs).encode())
        hashes, pos = {}, 0
        for path, _ in blobs:
            header_end = data.index(b"\n", pos)
            size = int(data[pos:header_end].split()[2])
            content = data[header_end + 1 : header_end + 1 + size]
            pos = header_end + 1 + size + 1
            hashes[path] = hashlib.sha256(content).hexdigest()
        return hashes
    listing = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *LOCKED_PATHS)
    hashes = {}
    for rel in dict.fromkeys(p for p in listing.decode().split("\0") if p):
        try:
            hashes[rel] = hashlib.sha256((repo / rel).read_bytes()).hexdigest()
        except (FileNotFoundError, IsADirectoryError):
            continue  # deleted: shows up as a difference
    return hashes


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def locked_changes(repo: Path, expected: dict[str, str]) -> list[str]:
    """Locked paths that were modified, added or deleted compared with `expected`."""
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
