"""Research shared across machines through any git remote: results published, others' claims fetched.

The remote is whatever `git push` and `git fetch` accept (a bare repository's path, file://, ssh://,
https://); no server of ours runs there. Everything lives under refs of its own, so a user's branches
and tags are never read or written:

- `refs/autoresearch/hosts/<host>/results` (on the remote): one commit per publication of machine
  `<host>`, whose tree holds `results.tsv` (every row of that machine's results file), `host.json` (its
  name, when it published) and `runs/<n>/` with the run's `diff.patch` and loss curves (`loss.json`,
  `confirm_loss.json`) where its run folder has them. Its first parent is the previous publication (the
  ref only moves forward); its other parents are the trainer commits of the rows new in it, so every
  trainer a row names can be fetched and read (`git show <commit>:train_cuda.py`).
- `refs/autoresearch/claims/<key>` (on the remote): a commit whose `claim.json` says which host runs the
  trainer whose content hash, under one protocol on one hardware class, is `<key>`, and since when.
- `refs/autoresearch/remote/hosts/<host>/results` (here): what the last fetch found of the others.

Publishing is idempotent: each call writes the whole of this machine's results into a new commit only if
something changed, so what an unreachable remote missed goes out with the next call that reaches it.

A claim is taken with a push that may only create the ref (`--force-with-lease=<ref>:`, the empty value
meaning "must not exist"); git updates a ref atomically, so of two machines claiming at once exactly one
push lands, and each reads the ref back to learn who holds it. A claim older than its time to live (two
hours) may be taken over with a lease on the old value. With the remote unreachable a claim is granted
here (the machine goes on alone).

Nothing fetched is trusted: the others' rows are their claims, shown apart (`reporting/frontier.py`),
never written into this machine's results.tsv and never read by the loop's decisions; their trainers are
data, never imported or run (`loop.py transfer --remote` runs another machine's best config here).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from research import gitrepo
from research.gitrepo import GitError
from research.results import COLUMNS, NO_COMMIT, Row, read_results

__all__ = ["HOSTS", "CLAIMS", "FETCHED", "CLAIM_TTL_S", "RUN_FILES", "ShareError", "Published", "Claim", "HostRows",
           "host_name", "hardware_name", "hardware_class", "hardware_of", "claim_key", "publish", "fetch", "fetched", "claim", "Sharing"]

HOSTS = "refs/autoresearch/hosts/"  # on the remote: <host>/results
CLAIMS = "refs/autoresearch/claims/"  # on the remote: <key>
FETCHED = "refs/autoresearch/remote/hosts/"  # here: <host>/results, as the last fetch found them
CLAIM_TTL_S = 2 * 3600.0
RUN_FILES = ("diff.patch", "loss.json", "confirm_loss.json")  # what of runs/<n>/ is published
MAX_FILE_BYTES = 2_000_000  # a run file larger than this is left out
_IDENTITY = {"GIT_AUTHOR_NAME": "autoresearch", "GIT_AUTHOR_EMAIL": "autoresearch@localhost",
             "GIT_COMMITTER_NAME": "autoresearch", "GIT_COMMITTER_EMAIL": "autoresearch@localhost"}


class ShareError(Exception):
    """The remote could not be read or written (one sentence: what failed, what git said)."""


@dataclass
class Published:
    host: str
    rows: int  # rows of this machine on the remote after the call
    new: int  # rows that were not there before
    pushed: bool  # a new publication was pushed (False: the remote already had everything)


@dataclass
class Claim:
    won: bool
    key: str
    holder: str  # the host that holds the claim
    since: float  # when it was taken (seconds since the epoch)
    solo: bool = False  # the remote was unreachable: granted here, unchecked
    note: str = ""  # why, in words (the warning when solo)


@dataclass
class HostRows:
    """Another machine's published rows: its claims, not measurements of this machine."""

    host: str
    commit: str  # the publication they were read from
    rows: list[Row] = field(default_factory=list)


def host_name(name: str | None = None) -> str:
    """This machine's name on the remote (`name`, else the hostname), reduced to what a ref name may hold."""
    raw = name or os.environ.get("AUTORESEARCH_HOST_NAME") or socket.gethostname() or "host"
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", raw).strip("-")[:64]
    return clean or "host"


def hardware_name(backend: str | None, device: str | None) -> str:
    """A hardware class: the backend and the device's name (what every worker of a branch, and every row
    compared with another, must share)."""
    return f"{backend or '?'}: {device or '?'}"


def hardware_class(host) -> str:
    """The hardware class of a host (backends.HostInfo): what every worker of one branch must share."""
    return hardware_name(host.backend, host.device_name)


def hardware_of(row: Row) -> str:
    """The hardware class of a row."""
    return hardware_name(row.backend, row.device)


def claim_key(trainer_text: str, hardware: str, protocol: str) -> str:
    """The claim's name: a hash of the trainer's content, the hardware class and the protocol (a result means
    something for one hardware class under one protocol, so a machine of another class runs it too)."""
    data = f"{protocol}\n{hardware}\n".encode() + trainer_text.encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def _git(repo: Path, *args: str, timeout: float = 30.0) -> str:
    try:
        return gitrepo.remote_git(repo, *args, timeout=timeout)
    except GitError as e:
        raise ShareError(str(e)) from None


def _remote_sha(repo: Path, remote: str, ref: str) -> str:
    """The object `ref` points at on the remote ("" when it has no such ref)."""
    out = _git(repo, "ls-remote", "--refs", remote, ref)
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        if name == ref:
            return sha
    return ""


def _have(repo: Path, sha: str) -> bool:
    try:
        gitrepo.git(repo, "cat-file", "-e", sha)
        return True
    except GitError:
        return False


def _fetch_ref(repo: Path, remote: str, ref: str, sha: str) -> None:
    """Bring `ref`'s objects here without writing any ref (nor FETCH_HEAD); `sha` must then be readable."""
    _git(repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", remote, ref, timeout=120)
    if not _have(repo, sha):
        raise ShareError(f"fetched {ref} but {sha[:12]} is not here (it moved meanwhile)")


def _rows_of(repo: Path, commit: str) -> list[Row]:
    """The rows of a publication's results.tsv (read tolerantly, like any results file)."""
    try:
        text = gitrepo.git_bytes(repo, "cat-file", "blob", f"{commit}:results.tsv")
    except GitError:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.tsv"
        path.write_bytes(text)
        return read_results(path, problems=[])


# --------------------------------------------------------------------------------------------- publish


def _tree(repo: Path, host: str, rows: list[Row], runs_dir: Path | None) -> str:
    """The publication's tree: results.tsv, host.json, runs/<n>/ with the run files that exist."""
    files: list[tuple[str, Path]] = []  # (path in the tree, file here)
    for n in sorted({r.run for r in rows if r.run is not None}):
        for name in RUN_FILES:
            f = runs_dir / str(n) / name if runs_dir else None
            if f is not None and f.is_file() and not f.is_symlink() and f.stat().st_size <= MAX_FILE_BYTES:
                files.append((f"{n}/{name}", f))
    shas = []
    if files:
        out = gitrepo.git_bytes(repo, "hash-object", "-w", "--no-filters", "--stdin-paths",
                                stdin="".join(f"{f}\n" for _, f in files).encode())
        shas = out.decode().split()
    runs: dict[str, list[str]] = {}
    for (path, _), sha in zip(files, shas):
        n, name = path.split("/")
        runs.setdefault(n, []).append(f"100644 blob {sha}\t{name}")
    names = sorted(runs, key=int)
    run_trees = []
    if names:
        batch = "\n\n".join("\n".join(runs[n]) for n in names) + "\n"
        run_trees = gitrepo.git_bytes(repo, "mktree", "--batch", stdin=batch.encode()).decode().split()
    results = "\t".join(COLUMNS) + "\n" + "".join(r.to_line() for r in rows)
    info = json.dumps({"host": host, "rows": len(rows)}, sort_keys=True) + "\n"
    blob = _blobs(repo, [results, info])
    top = [f"100644 blob {blob[0]}\tresults.tsv", f"100644 blob {blob[1]}\thost.json"]
    if names:
        runs_tree = gitrepo.git_bytes(repo, "mktree", stdin="".join(
            f"040000 tree {t}\t{n}\n" for n, t in zip(names, run_trees)).encode()).decode().strip()
        top.append(f"040000 tree {runs_tree}\truns")
    return gitrepo.git_bytes(repo, "mktree", stdin=("\n".join(top) + "\n").encode()).decode().strip()


def _blobs(repo: Path, texts: list[str]) -> list[str]:
    return [gitrepo.git_bytes(repo, "hash-object", "-w", "--no-filters", "--stdin", stdin=t.encode("utf-8"))
            .decode().strip() for t in texts]


def _trainer_commits(repo: Path, rows: list[Row], known: set[str]) -> list[str]:
    """The commits here of the rows' trainers not in `known` (short hashes), as few as reach them all."""
    wanted = sorted({r.commit for r in rows if r.commit and r.commit != NO_COMMIT and r.commit not in known})
    if not wanted:
        return []
    out = gitrepo.git_bytes(repo, "cat-file", "--batch-check=%(objectname) %(objecttype)",
                            stdin="".join(f"{c}^{{commit}}\n" for c in wanted).encode()).decode()
    found = sorted({line.split()[0] for line in out.splitlines() if line.endswith(" commit")})
    if len(found) > 1:
        found = gitrepo.git(repo, "merge-base", "--independent", *found).split()
    return found


def publish(repo: Path, remote: str, host: str, results_path: Path | None = None,
            runs_dir: Path | None = None) -> Published:
    """Publish every row of this machine's results file (and its runs' diffs and curves) under
    `refs/autoresearch/hosts/<host>/results` on `remote`. Writes no ref here. Raises ShareError."""
    repo = Path(repo)
    rows = read_results(results_path or repo / "results.tsv", problems=[])
    ref = f"{HOSTS}{host}/results"
    prev = _remote_sha(repo, remote, ref)
    if not prev and not rows:
        return Published(host, 0, 0, False)
    before: list[Row] = []
    if prev:
        if not _have(repo, prev):  # this machine made it: it is here unless the objects were cleaned up
            _fetch_ref(repo, remote, ref, prev)
        before = _rows_of(repo, prev)
    ours = {_key(r) for r in rows}
    if any(_key(r) not in ours for r in before):
        raise ShareError(f"{remote} holds rows published as {host} that this results file lacks (another clone "
                         f"publishing under the same name?); give this one its own --host-name")
    tree = _tree(repo, host, rows, runs_dir if runs_dir is not None else repo / "runs")
    if prev and gitrepo.git(repo, "rev-parse", f"{prev}^{{tree}}") == tree:
        return Published(host, len(rows), 0, False)
    parents = ([prev] if prev else []) + _trainer_commits(repo, rows, {r.commit for r in before})
    args = ["commit-tree", tree, *[x for p in parents for x in ("-p", p)], "-m",
            f"autoresearch: results of {host} ({len(rows)} rows)"]
    commit = gitrepo.git(repo, *args, env=_IDENTITY)
    _git(repo, "push", "--quiet", "--no-verify", remote, f"{commit}:{ref}", timeout=120)
    seen = {_key(r) for r in before}
    return Published(host, len(rows), sum(_key(r) not in seen for r in rows), True)


def _key(r: Row) -> tuple:
    """What tells one row from another of the same machine."""
    return r.run, r.timestamp, r.commit, r.status, r.kind


# --------------------------------------------------------------------------------------------- fetch


def fetch(repo: Path, remote: str, me: str) -> list[HostRows]:
    """Fetch every machine's publication into `refs/autoresearch/remote/hosts/` here and read the others'
    rows (their claims). Raises ShareError."""
    _git(repo, "fetch", "--quiet", "--no-tags", "--no-write-fetch-head", remote, f"+{HOSTS}*:{FETCHED}*",
         timeout=300)
    return fetched(repo, me)


def fetched(repo: Path, me: str | None = None) -> list[HostRows]:
    """The others' rows as the last fetch left them here (every host's but `me`'s), by host name."""
    listing = gitrepo.git(repo, "for-each-ref", "--format=%(objectname) %(refname)", FETCHED)
    out = []
    for line in sorted(listing.splitlines(), key=lambda x: x.split(" ", 1)[-1]):
        sha, _, ref = line.partition(" ")
        if not ref.endswith("/results"):
            continue
        host = ref[len(FETCHED):-len("/results")]
        if host and host != me:
            out.append(HostRows(host, sha, _rows_of(Path(repo), sha)))
    return out


# --------------------------------------------------------------------------------------------- claims


def _claim_commit(repo: Path, key: str, host: str, now: float) -> str:
    data = json.dumps({"host": host, "key": key, "time": now}, sort_keys=True) + "\n"
    blob = _blobs(repo, [data])[0]
    tree = gitrepo.git_bytes(repo, "mktree", stdin=f"100644 blob {blob}\tclaim.json\n".encode()).decode().strip()
    return gitrepo.git(repo, "commit-tree", tree, "-m", f"autoresearch: {host} claims {key}", env=_IDENTITY)


def _holder(repo: Path, remote: str, ref: str, sha: str) -> tuple[str, float]:
    """(host, time) of the claim at `sha`; a claim that cannot be read is held by nobody since 0."""
    try:
        _fetch_ref(repo, remote, ref, sha)
        info = json.loads(gitrepo.git(repo, "cat-file", "blob", f"{sha}:claim.json"))
        return str(info.get("host", "")), float(info.get("time", 0.0))
    except (ShareError, GitError, ValueError, TypeError, AttributeError):
        return "", 0.0


def claim(repo: Path, remote: str, key: str, host: str, *, ttl: float = CLAIM_TTL_S,
          now: float | None = None) -> Claim:
    """Claim trainer `key` for `host` on `remote`. Won: no one held it, this host held it already, or the
    holder's claim was older than `ttl` (or dated in the future). Never raises: with the remote
    unreachable the claim is granted here (`solo`)."""
    repo, now = Path(repo), time.time() if now is None else now
    ref = f"{CLAIMS}{key}"
    try:
        current = _remote_sha(repo, remote, ref)
        if current:
            holder, since = _holder(repo, remote, ref, current)
            if holder == host:
                return Claim(True, key, host, since, note="already claimed by this host")
            if 0 <= now - since < ttl:
                return Claim(False, key, holder, since, note=f"claimed by {holder} {(now - since) / 60:.0f} min ago")
        mine = _claim_commit(repo, key, host, now)
        try:
            _git(repo, "push", "--quiet", "--no-verify", f"--force-with-lease={ref}:{current}", remote,
                 f"{mine}:{ref}")
        except ShareError:
            pass  # lost the race, or the remote went away: reading the ref back tells which
        after = _remote_sha(repo, remote, ref)
    except ShareError as e:
        return Claim(True, key, host, now, solo=True, note=f"remote unreachable ({e}); claimed here only")
    if after == mine:
        taken = f" (took over an expired claim of {holder})" if current else ""
        return Claim(True, key, host, now, note=f"claimed{taken}")
    holder, since = _holder(repo, remote, ref, after) if after else ("", now)
    return Claim(False, key, holder or "another host", since, note=f"claimed by {holder or 'another host'} first")


# --------------------------------------------------------------------------------------------- in the loop


class Sharing:
    """What the loop does with a remote: publish after every recorded experiment (and fetch the others' rows,
    `others`, which agents see as the other machines' claims), claim before running one.
    A failure is one warning line (once until the remote answers again) and the loop goes on alone;
    after a failure, publishing waits `retry_s` before it tries again (what it missed goes out then)."""

    def __init__(self, repo: Path, remote: str, host: str | None = None, *, warn=None, ttl: float = CLAIM_TTL_S,
                 retry_s: float = 300.0):
        self.repo, self.remote, self.host = Path(repo), remote, host_name(host)
        self.warn = warn or (lambda line: None)
        self.ttl, self.retry_s = ttl, retry_s
        self.failed_at: float | None = None
        self.others: list[HostRows] = []  # the other machines' rows, as the last fetch found them

    def _failed(self, what: str, e: Exception) -> None:
        if self.failed_at is None:
            self.warn(f"share: {what} {self.remote} failed ({e}); going on alone, what is missing is "
                      "published with the next call that reaches it")
        self.failed_at = time.monotonic()

    def publish(self, results_path: Path | None = None, runs_dir: Path | None = None) -> Published | None:
        """Publish this machine's rows; None when skipped (waiting after a failure) or failed."""
        if self.failed_at is not None and time.monotonic() - self.failed_at < self.retry_s:
            return None
        try:
            out = publish(self.repo, self.remote, self.host, results_path, runs_dir)
            self.others = fetch(self.repo, self.remote, self.host)
        except (ShareError, GitError, OSError) as e:
            self._failed("publishing to", e)
            return None
        if self.failed_at is not None:
            self.warn(f"share: {self.remote} answers again; published {out.rows} rows")
        self.failed_at = None
        return out

    def claim(self, trainer_text: str, hardware: str, protocol: str) -> Claim:
        """Claim this trainer (on this hardware class, under this protocol) before running it; granted here
        without asking while the remote is left alone after a failure."""
        if self.failed_at is not None and time.monotonic() - self.failed_at < self.retry_s:
            return Claim(True, "", self.host, time.time(), solo=True, note="remote unreachable a moment ago")
        c = claim(self.repo, self.remote, claim_key(trainer_text, hardware, protocol), self.host, ttl=self.ttl)
        if c.solo:
            self._failed("claiming on", Exception(c.note))
        return c
