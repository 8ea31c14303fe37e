"""What keeps an experiment honest: locked-file hashes, the one-file scope rule, the repo lock,
and the allow-listed environment the trainer runs in."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import subprocess
from pathlib import Path

from research.gitrepo import git_bytes

__all__ = [
    "LOCKED_PATHS",
    "scope_problem",
    "LOCK_FILE",
    "LockError",
    "RepoLock",
    "hash_locked",
    "locked_changes",
    "guard_run",
    "text_hash",
]

# The agent may never change these; they are hashed at start and checked before every record.
LOCKED_PATHS = ("prepare.py", "data", "backends", "model", "judge", "sandbox", "research", "agents", "reporting",
                "loop.py")
LOCK_FILE = ".autoresearch.lock"

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
        listing = git_bytes(repo, "ls-tree", "-r", "-z", commit, "--", *LOCKED_PATHS).decode()
        entries = [e.split("\t", 1) for e in listing.split("\0") if e]
        blobs = [(path, meta.split()[2]) for meta, path in entries if meta.split()[1] == "blob"]
        data = git_bytes(repo, "cat-file", "--batch", stdin="".join(f"{b}\n" for _, b in blobs).encode())
        hashes, pos = {}, 0
        for path, _ in blobs:
            header_end = data.index(b"\n", pos)
            size = int(data[pos:header_end].split()[2])
            content = data[header_end + 1 : header_end + 1 + size]
            pos = header_end + 1 + size + 1
            hashes[path] = hashlib.sha256(content).hexdigest()
        return hashes
    listing = git_bytes(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *LOCKED_PATHS)
    hashes = {}
    for rel in dict.fromkeys(p for p in listing.decode().split("\0") if p):
        try:
            hashes[rel] = hashlib.sha256((repo / rel).read_bytes()).hexdigest()
        except (FileNotFoundError, IsADirectoryError):
            continue  # deleted: shows up as a difference
    return hashes


def locked_changes(repo: Path, expected: dict[str, str]) -> list[str]:
    """Locked paths that were modified, added or deleted compared with `expected`."""
    now = hash_locked(repo)
    return sorted(p for p in set(now) | set(expected) if now.get(p) != expected.get(p))


def scope_problem(changes: dict[str, str], trainer: str, *, allow_trainer: bool = True,
                  require_change: bool = False) -> str | None:
    """Why a work tree's changes (gitrepo.changed_paths) break the one-file rule, or None if they keep to it.
    `allow_trainer` False: nothing may have changed at all (a baseline or a rerun runs the kept commit as it
    is); `require_change`: the trainer itself must have changed (an experiment)."""
    if changes.get(trainer) == "D":
        return f"deleted the trainer {trainer}"
    other = sorted(p for p in changes if p != trainer or not allow_trainer)
    if other:
        what = "changed files other than " + trainer if allow_trainer else "the run changed files"
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        return f"{what}: {shown}"
    if require_change and not changes.get(trainer):
        return f"no change to {trainer}"
    return None


def guard_run(s, before, *, tree: Path | None = None, tree_at: str | None = None,
              save_removed: Path | None = None) -> str | None:
    """The one guard every run passes, with one worker or N, before anything is decided about it and before
    any other run is made for it. What a run must leave alone is checked and put back:

    - the repository besides its work tree: every ref, HEAD and what it points at, .git/config, hooks and
      info/, and results.tsv, against `before` (Session.outside_state() from when the run started; with N
      workers, the state the driver itself last left);
    - a worker's git worktree `tree`: HEAD still detached at `tree_at`, the files as committed there;
    - the locked files, in the repository's work tree and in `tree`: a change raises TamperError (research/
      session.py) once the trees are put back, and the loop stops;
    - the repository's work tree: nothing changed in it (with one worker, but for the trainer's commit).
    Files a run added are moved under `save_removed` (when given). `s` is the Session.

    Returns what the run changed, in words, for the row's note (`rejected: <it>`), or None."""
    from research import gitrepo
    from research.errors import TamperError

    changed: list[str] = []
    meddled = s.put_back_outside(before)
    if meddled:
        changed.append(meddled)
    files: list[str] = []
    tampered: TamperError | None = None
    if tree is not None:
        target = gitrepo.git(tree, "symbolic-ref", "-q", "HEAD", check=False)
        at = gitrepo.head(tree, check=False)
        if target or at != tree_at:
            changed.append("the checked-out branch" if target else "the git history")
            gitrepo.git(tree, "update-ref", "--no-deref", "HEAD", tree_at)  # detached again, no branch moved
        try:
            s.verify_locked(tree)
        except TamperError as e:  # raised below, once the worktree is as it was
            tampered = e
        files = sorted(gitrepo.changed_paths(tree))
        if files or changed:
            _put_back_tree(tree, tree_at, files, save_removed)
    try:
        s.verify_locked()
    except TamperError:
        s.restore(save_removed=save_removed)  # tracked locked files come back with the reset
        raise
    if tampered is not None:
        raise tampered
    problem = s.scope_problem(allow_trainer=False)
    if problem:
        s.restore(save_removed=save_removed)
    if changed:
        return f"the run changed {' and '.join(changed)} (put back)"
    if files:
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        return f"the run changed files: {', '.join(files[:5])}{more}"
    return problem


def _put_back_tree(tree: Path, commit: str, paths: list[str], save_removed: Path | None) -> None:
    """A worktree back to `commit` exactly: files it did not hold there copied under `save_removed`, removed."""
    from research import gitrepo

    new = [p for p, kind in gitrepo.changed_paths(tree).items() if kind == "U"]
    if save_removed is not None:
        gitrepo.save_files(tree, new, save_removed)
    gitrepo.git(tree, "reset", "-q", "--hard", commit)
    gitrepo.remove_paths(tree, new)


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


def _runs_file(pid: int, name: str) -> bool:
    """True if process `pid` is running a program whose arguments include a file called `name` (so a pid
    the system has since given to another program is left alone)."""
    if Path("/proc/self").is_dir():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
    else:  # no procfs (macOS): ps prints the command line
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True)
        args = out.stdout.split()
    return any(a and Path(a).name == name for a in args)


class RepoLock:
    """`.autoresearch.lock`: an exclusive kernel lock (flock) on a file naming its holder.

    The file holds the loop's pid and, while an experiment runs, the trainer's process group
    (`trainer <pgid> <file>`). A second loop on the same repository refuses, however close together
    the two start. The kernel drops the lock when its holder dies, however it dies; the next loop
    then takes over and first ends a trainer the dead loop left running (a trainer runs in its own
    session, so it outlives a loop killed with SIGKILL). A live pid in a file nobody holds (an older
    loop, or one written by hand) is respected too.
    """

    def __init__(self, repo: Path):
        self.path = Path(repo) / LOCK_FILE
        self.held = False
        self.ended_trainer: int | None = None  # pgid of a trainer left by a dead loop, ended on takeover
        self.took_over_from: int | None = None  # pid of a loop that died holding the lock (killed, power loss)
        self._fd: int | None = None

    def acquire(self) -> None:
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid, _ = _read_lock(fd)
                os.close(fd)
                if pid == os.getpid():  # this process holds it already
                    self.held = True
                    return
                raise self._busy(pid) from None
            try:
                replaced = os.fstat(fd).st_ino != os.stat(self.path).st_ino
            except FileNotFoundError:
                replaced = True
            if replaced:  # its holder removed the file while we opened it: lock the new one
                os.close(fd)
                continue
            pid, trainer = _read_lock(fd)
            if pid not in (None, os.getpid()):
                if _pid_alive(pid):
                    os.close(fd)
                    raise self._busy(pid)
                self.took_over_from = pid  # a clean exit removes the file: this loop died mid-work
            if trainer is not None and _runs_file(*trainer):
                try:
                    os.killpg(trainer[0], signal.SIGKILL)
                    self.ended_trainer = trainer[0]
                except OSError:
                    pass
            self._fd, self.held = fd, True
            self._write(f"{os.getpid()}\n")
            return
        raise LockError(f"Could not take {self.path}; another loop keeps replacing it.")

    def _busy(self, pid: int | None) -> LockError:
        return LockError(
            f"Another autoresearch loop (pid {pid if pid else 'unknown'}) is running on this repository; "
            f"stop it first (or delete {self.path.name} if that process is not a loop).")

    def _write(self, text: str) -> None:
        data = text.encode()
        os.pwrite(self._fd, data, 0)  # the pid line never changes, so a reader always sees it
        os.ftruncate(self._fd, len(data))

    def note_trainer(self, pgid: int | None, trainer: str = "") -> None:
        """Record the process group of the trainer now running (None: it ended), for whoever takes over."""
        if self._fd is None:
            return
        try:
            self._write(f"{os.getpid()}\n" + (f"trainer {pgid} {trainer}\n" if pgid else ""))
        except OSError:
            pass  # best effort: only matters if this loop is killed while the trainer runs

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a loop starting now locks a fresh file
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RepoLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock(fd: int) -> tuple[int | None, tuple[int, str] | None]:
    """(holder pid, (trainer pgid, trainer file) or None) from a lock file; None for what is unreadable."""
    try:
        lines = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
    except OSError:
        return None, None
    try:
        pid = int(lines[0])
    except ValueError:
        pid = None
    trainer = None
    if len(lines) > 1 and lines[1].startswith("trainer "):
        parts = lines[1].split(" ", 2)
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) > 1 and parts[2]:
            trainer = (int(parts[1]), parts[2])
    return pid, trainer
