"""The few git operations the loop needs, each one small and checked.

Every call goes through one runner (`_run`) that keeps git from being steered by the repository it
works on: hooks, fsmonitor, replace objects, signing, pagers, external diff programs, textconv, clean
and smudge filters, automatic gc and the untracked cache are off, the system-wide config is not read
(the user's own ~/.gitconfig is: their identity), and the work tree and git directory are pinned to
the repository (a `core.worktree` planted in .git/config cannot send a reset elsewhere). Commits are
made with a fallback identity, so a fresh machine without `user.name` configured still works.
Nothing here touches files that git ignores (results.tsv, runs/, virtual environments).

`ref_state()` / `put_back_refs()` snapshot every ref, HEAD, the repository's config, hooks and
info/ files around a run and undo whatever changed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import secrets
from sandbox.secrets import redact, without_secrets

__all__ = ["GitError", "git", "git_bytes", "head", "current_branch", "branch_exists", "is_ancestor", "changed_paths",
           "commit_paths", "reset_hard", "remove_paths", "diff", "is_repo", "RefState", "ref_state",
           "put_back_refs", "names", "worktree_add", "worktree_paths", "worktree_remove", "merge_text", "SHARED_REFS",
           "remote_git"]


class GitError(RuntimeError):
    """A git command failed (message carries git's own explanation)."""


_IDENTITY = {
    "GIT_AUTHOR_NAME": "autoresearch",
    "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
    "GIT_COMMITTER_NAME": "autoresearch",
    "GIT_COMMITTER_EMAIL": "autoresearch@localhost",
}

# Settings that would let the repository (its .git/config, hooks, attributes) run a program or change
# what git reads. Given on the command line, they win over every config file.
_SAFE_CONFIG = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.pager=cat",
    "core.editor=true",
    "core.attributesFile=/dev/null",
    "core.quotepath=off",
    "commit.gpgsign=false",
    "tag.gpgsign=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "submodule.recurse=false",
    "protocol.allow=never",
)
# Environment variables git reads that could point it at other files or programs; the identity ones stay.
_KEEP_GIT_ENV = frozenset(_IDENTITY) | {"GIT_AUTHOR_DATE", "GIT_COMMITTER_DATE"}
# Commands that may run content filters (clean/smudge) while reading or writing the work tree.
_CONVERTING = frozenset({"add", "commit", "status", "reset", "checkout", "diff", "stash", "restore", "switch",
                         "show", "log", "apply", "hash-object", "merge", "cherry-pick", "rebase", "revert", "rm",
                         "mv", "update-index", "read-tree", "checkout-index", "diff-files", "diff-index"})
_FILTER_KEY = re.compile(r"^filter\.(.+)\.(clean|smudge|process|required)$", re.IGNORECASE)


def _env(extra: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in without_secrets(os.environ).items()
           if not k.startswith("GIT_") or k in _KEEP_GIT_ENV}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_NO_REPLACE_OBJECTS="1", GIT_ATTR_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0",
               GIT_PAGER="cat", PAGER="cat", GIT_OPTIONAL_LOCKS="0")
    if extra:
        env.update(extra)
    return env


@functools.lru_cache(maxsize=8)
def _git_exe(path: str, repo: str) -> str:
    """git from PATH, leaving out relative entries ("." or an empty one: the current folder) and folders
    inside the repository, where a planted `git` would otherwise run in its place."""
    dirs = [d for d in path.split(os.pathsep) if os.path.isabs(d)
            and not (os.path.realpath(d) + os.sep).startswith(repo + os.sep)]
    return shutil.which("git", path=os.pathsep.join(dirs)) or "git"


def _base(repo: Path, pinned: bool) -> list[str]:
    exe = _git_exe(os.environ.get("PATH", os.defpath), os.path.realpath(repo))
    cmd = [exe, "--no-pager", "--no-replace-objects", "-C", str(repo)]
    if pinned:  # the repository's own .git and work tree, whatever its config says
        root = Path(repo).resolve()
        cmd += [f"--git-dir={root / '.git'}", f"--work-tree={root}"]
    for setting in _SAFE_CONFIG:
        cmd += ["-c", setting]
    return cmd


def _filter_overrides(repo: Path, pinned: bool) -> list[str]:
    """`-c filter.<name>.clean=` (and smudge, process) for every filter driver the config defines:
    an empty command is no filter, so a `.gitattributes` naming the driver runs nothing."""
    proc = subprocess.run([*_base(repo, pinned), "config", "-z", "--name-only", "--get-regexp", r"^filter\."],
                          capture_output=True, env=_env(), stdin=subprocess.DEVNULL)
    names = set()
    for key in proc.stdout.decode("utf-8", errors="surrogateescape").split("\0"):
        m = _FILTER_KEY.match(key.strip())
        if m:
            names.add(m.group(1))
    out = []
    for name in sorted(names):
        out += ["-c", f"filter.{name}.clean=", "-c", f"filter.{name}.smudge=", "-c", f"filter.{name}.process=",
                "-c", f"filter.{name}.required=false"]
    return out


def _run(repo: Path, args: tuple | list, *, stdin: bytes | None = None, env: dict | None = None,
         pinned: bool = True) -> subprocess.CompletedProcess:
    """The one place git is started: `git <safe options> -C repo args...`, output captured as bytes."""
    args = list(args)
    cmd = _base(repo, pinned)
    if args and args[0] in _CONVERTING:
        cmd += _filter_overrides(repo, pinned)
        if args[0] in ("diff", "show", "log"):
            args = [args[0], "--no-ext-diff", "--no-textconv", *args[1:]]
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, env=_env(env),
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def _fail(args, proc: subprocess.CompletedProcess) -> GitError:
    msg = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
    return GitError(f"git {args[0]} failed: {msg[-1] if msg else 'exit code ' + str(proc.returncode)}")


def git(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> str:
    """Run `git -C repo args...` and return stdout (text) without the trailing newline.

    `env`: extra environment variables for this call (on top of the loop's own, minus credentials)."""
    proc = _run(repo, args, env=env)
    if check and proc.returncode != 0:
        raise _fail(args, proc)
    return proc.stdout.decode("utf-8", errors="surrogateescape").rstrip("\n")


def git_bytes(repo: Path, *args: str, stdin: bytes | None = None) -> bytes:
    """Run `git -C repo args...` on raw bytes (file contents, -z listings) and return stdout unchanged."""
    proc = _run(repo, args, stdin=stdin)
    if proc.returncode != 0:
        raise _fail(args, proc)
    return proc.stdout


def is_repo(repo: Path) -> bool:
    """True if `repo` is the top level of a git work tree with at least one commit."""
    proc = _run(repo, ("rev-parse", "--show-toplevel", "--absolute-git-dir"), pinned=False)
    lines = proc.stdout.decode("utf-8", errors="surrogateescape").splitlines()
    if proc.returncode != 0 or len(lines) != 2:
        return False
    root = Path(repo).resolve()
    return (Path(lines[0]).resolve() == root and Path(lines[1]).resolve() == (root / ".git").resolve()
            and bool(head(repo, check=False)))


def head(repo: Path, check: bool = True) -> str:
    """Full hash of HEAD ('' if there is none and check is False)."""
    return git(repo, "rev-parse", "--verify", "-q", "HEAD", check=check)


def current_branch(repo: Path) -> str | None:
    """Name of the checked-out branch, None when HEAD is detached."""
    name = git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    return name or None


def is_ancestor(repo: Path, older: str, newer: str) -> bool:
    """True if commit `older` is reachable from `newer` (or the same commit)."""
    return _run(repo, ("merge-base", "--is-ancestor", older, newer)).returncode == 0


def branch_exists(repo: Path, name: str) -> bool:
    return bool(git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{name}", check=False))


def changed_paths(repo: Path) -> dict[str, str]:
    """Every path that differs from HEAD, with a one-letter kind: M(odified), A(dded), D(eleted), U(ntracked).

    Ignored files are not reported. Renames are reported as a deletion plus an addition.
    """
    args = ("status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames")
    out = _run(repo, args)
    if out.returncode != 0:
        raise _fail(args, out)
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
    return dict(_IDENTITY)


def commit_paths(repo: Path, paths: list[str], message: str) -> str:
    """Stage exactly `paths` and commit them (hooks skipped); returns the new full hash."""
    git(repo, "add", "--", *paths)
    git(repo, "commit", "-q", "--no-verify", "-m", redact(message), "--", *paths, env=_identity_env(repo))
    return head(repo)


def reset_hard(repo: Path, commit: str) -> None:
    """Move the current branch to `commit` and make the tracked files match it."""
    git(repo, "reset", "-q", "--hard", commit)


def save_files(repo: Path, paths: list[str], dest: Path) -> None:
    """Copy the regular files among `paths` (relative to `repo`) under `dest`, keeping their relative paths:
    what the loop is about to remove from a tree, kept for the user. Symbolic links are not followed."""
    for rel in paths:
        src = Path(repo) / rel
        if src.is_file() and not src.is_symlink():
            dst = dest / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


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
    out = git(repo, "diff", "--no-color", *args)
    return out + "\n" if out else ""


# ---------------------------------------------------------------------------------------------------------
# everything of a repository that is not the work tree: refs, HEAD, the repository's own settings and hooks


# Files under .git that steer later git commands (or the user's next commit): compared and put back.
_GIT_FILES = ("config", "config.worktree", "commondir", "shallow", "objects/info/alternates", "MERGE_HEAD",
              "MERGE_MODE", "MERGE_MSG", "CHERRY_PICK_HEAD", "REVERT_HEAD", "BISECT_START")
_GIT_DIRS = ("hooks", "info", "sequencer", "rebase-merge", "rebase-apply")


# Refs the loop itself writes while runs are in flight, outside what a run must leave alone: what was fetched
# from other machines (research/share.py). They hold data only, never read as this machine's results.
SHARED_REFS = "refs/autoresearch/"


@dataclass
class RefState:
    """Every ref with its object (and target, for symbolic ones), what HEAD points at, and the bytes of
    the files under .git that steer git (config, hooks, info/, an operation in progress)."""

    refs: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (object, symbolic target or "")
    head_target: str | None = None  # "refs/heads/<branch>", None when detached
    head_commit: str = ""
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # path under .git -> (kind F/L, content)


def _git_dir(repo: Path) -> Path:
    dot = Path(repo).resolve() / ".git"
    if dot.is_dir():
        return dot
    return Path(git(repo, "rev-parse", "--absolute-git-dir"))


def _read_files(gitdir: Path) -> dict[str, tuple[str, bytes]]:
    out: dict[str, tuple[str, bytes]] = {}

    def take(path: Path) -> None:
        rel = path.relative_to(gitdir).as_posix()
        try:
            if path.is_symlink():
                out[rel] = ("L", os.readlink(path).encode("utf-8", errors="surrogateescape"))
            elif path.is_file():
                out[rel] = ("X" if path.stat().st_mode & 0o111 else "F", path.read_bytes())
        except OSError:
            pass

    for name in _GIT_FILES:
        take(gitdir / name)
    for name in _GIT_DIRS:
        top = gitdir / name
        if top.is_symlink() or not top.is_dir():
            take(top)
            continue
        for base, dirs, files in os.walk(top):
            for d in list(dirs):
                if (Path(base) / d).is_symlink():
                    take(Path(base) / d)
                    dirs.remove(d)
            for f in files:
                take(Path(base) / f)
    return out


def ref_state(repo: Path) -> RefState:
    """A snapshot of everything in the repository a run must leave alone besides the work tree."""
    listing = git_bytes(repo, "for-each-ref", "--format=%(refname)%00%(objectname)%00%(symref)")
    refs = {}
    for line in listing.decode("utf-8", errors="surrogateescape").split("\n"):
        parts = line.split("\0")
        if len(parts) == 3 and parts[0] and not parts[0].startswith(SHARED_REFS):
            refs[parts[0]] = ("", parts[2]) if parts[2] else (parts[1], "")  # a symbolic ref: its target only
    target = git(repo, "symbolic-ref", "-q", "HEAD", check=False) or None
    return RefState(refs=refs, head_target=target, head_commit=head(repo, check=False),
                    files=_read_files(_git_dir(repo)))


def names(items, limit: int = 5) -> str:
    """Paths or refs for a message: the first `limit`, then how many more."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _put_file(gitdir: Path, rel: str, entry: tuple[str, bytes] | None) -> None:
    path = gitdir / rel
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    if entry is None:
        return
    kind, data = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "L":
        os.symlink(data.decode("utf-8", errors="surrogateescape"), path)
    else:
        path.write_bytes(data)
        os.chmod(path, 0o755 if kind == "X" else 0o644)


def put_back_refs(repo: Path, before: RefState) -> list[str]:
    """Undo whatever changed since `before` = ref_state(repo): the files under .git written back (new ones
    removed), every ref moved back, re-created or deleted, HEAD pointed at its branch again and the
    index and work tree reset to its commit if HEAD moved. Returns what was changed, in words
    (empty: nothing): 'the checked-out branch', 'the git history' (the checked-out branch's commit),
    'refs (...)', 'git settings (...)'."""
    repo = Path(repo)
    gitdir = _git_dir(repo)
    changed: list[str] = []
    now_files = _read_files(gitdir)
    files = sorted(p for p in set(before.files) | set(now_files) if before.files.get(p) != now_files.get(p))
    for rel in files:  # new files first (a folder replaced by a link goes), then the old ones come back
        if rel not in before.files:
            _put_file(gitdir, rel, None)
    for rel in files:
        if rel in before.files:
            _put_file(gitdir, rel, before.files[rel])

    now = ref_state(repo)
    moved = sorted(r for r in set(before.refs) | set(now.refs) if before.refs.get(r) != now.refs.get(r))
    lines, symbolic = [], []
    for ref in moved:
        old, new = before.refs.get(ref), now.refs.get(ref)
        if (old and old[1]) or (new and new[1]):
            symbolic.append(ref)
        elif old is None:
            lines.append(f"delete {ref}\n")
        else:
            lines.append(f"update {ref} {old[0]}\n")
    problems = []
    if lines and _run(repo, ("update-ref", "--no-deref", "--stdin"), stdin="".join(lines).encode()).returncode:
        for line in lines:  # one went wrong (an object that is gone): the others still go back
            verb, ref, *value = line.split()
            args = ("update-ref", "--no-deref", "-d", ref) if verb == "delete" else \
                ("update-ref", "--no-deref", ref, value[0])
            if _run(repo, args).returncode:
                problems.append(ref)
    for ref in symbolic:
        old = before.refs.get(ref)
        if old and old[1]:
            ok = _run(repo, ("symbolic-ref", ref, old[1])).returncode == 0
        elif old:
            ok = _run(repo, ("update-ref", "--no-deref", ref, old[0])).returncode == 0
        else:
            ok = _run(repo, ("update-ref", "--no-deref", "-d", ref)).returncode == 0
        if not ok:
            problems.append(ref)

    if now.head_target != before.head_target:
        if before.head_target:
            git(repo, "symbolic-ref", "HEAD", before.head_target)
        else:
            git(repo, "update-ref", "--no-deref", "HEAD", before.head_commit)
        changed.append("the checked-out branch")
    history = before.head_target in moved if before.head_target else now.head_commit != before.head_commit
    if history:
        changed.append("the git history")
    if head(repo, check=False) != now.head_commit or now.head_target != before.head_target:
        reset_hard(repo, "HEAD")  # the index and the work tree follow the commit HEAD is back at
    others = [r for r in moved if r != before.head_target]
    if others:
        words = []
        for ref in others:
            kind = "added" if ref not in before.refs else "deleted" if ref not in now.refs else "moved"
            words.append(f"{ref} {kind}")
        changed.append(f"refs ({names(words, 8)})")
    if files:
        changed.append(f"git settings ({names(files, 8)})")
    if problems:
        changed.append(f"refs that could not be put back ({names(problems, 8)})")
    return changed


# ---------------------------------------------------------------------------------------------------------
# worktrees (parallel experiments: one per worker, outside the repository) and three-way merges of one file


def worktree_add(repo: Path, path: Path, commit: str) -> None:
    """A new work tree of `repo` at `path`, on a detached HEAD at `commit` (no branch is created or moved)."""
    git(repo, "worktree", "add", "-q", "--detach", str(path), commit)


def worktree_paths(repo: Path) -> list[Path]:
    """The work trees git knows for `repo` besides the repository itself."""
    out = git(repo, "worktree", "list", "--porcelain", check=False)
    root = Path(repo).resolve()
    paths = [Path(line[len("worktree "):]) for line in out.split("\n") if line.startswith("worktree ")]
    return [p for p in paths if p.resolve() != root]


def worktree_remove(repo: Path, path: Path) -> None:
    """Remove a work tree made by worktree_add (its files and git's record of it), whatever it holds."""
    _run(repo, ("worktree", "remove", "--force", "--force", str(path)))
    if Path(path).exists():
        shutil.rmtree(path, ignore_errors=True)
    _run(repo, ("worktree", "prune"))


def merge_text(repo: Path, ours: str, base: str, theirs: str) -> str | None:
    """Three-way merge of one file's texts (`git merge-file`): `theirs`' change from `base` applied to
    `ours`; None when the two changes overlap (a conflict)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="autoresearch-merge-") as d:
        files = []
        for name, text in (("ours", ours), ("base", base), ("theirs", theirs)):
            p = Path(d) / name
            p.write_text(text, encoding="utf-8")
            files.append(str(p))
        proc = _run(repo, ("merge-file", "-p", "-q", *files))
    if proc.returncode != 0:
        return None
    return proc.stdout.decode("utf-8", errors="surrogateescape")


# ---------------------------------------------------------------------------------------------------------
# a remote (research/share.py): the transports a user names (a path, file://, ssh, http(s), git), never `ext::`


_REMOTE_PROTOCOLS = ("file", "ssh", "https", "http", "git")


def remote_git(repo: Path, *args: str, timeout: float = 30.0) -> str:
    """`git push/fetch/ls-remote ...` against a remote, through the same safe runner, with a time limit and
    no prompt (ssh in batch mode). Raises GitError with git's last line, or when it ran past `timeout`."""
    cmd = _base(Path(repo), True)
    for name in _REMOTE_PROTOCOLS:
        cmd += ["-c", f"protocol.{name}.allow=always"]
    env = _env({"GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=10"})
    agent = secrets.get("SSH_AUTH_SOCK")  # held back from everything else the loop starts: ssh's keys, for git only
    if agent:
        env["SSH_AUTH_SOCK"] = agent
    try:
        proc = subprocess.run([*cmd, *args], capture_output=True, env=env, stdin=subprocess.DEVNULL,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} gave no answer within {timeout:g} s") from None
    if proc.returncode != 0:
        raise _fail(args, proc)
    return proc.stdout.decode("utf-8", errors="surrogateescape").rstrip("\n")
