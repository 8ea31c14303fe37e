"""The commands of research shared through a git remote (research/share.py has the how):

- `loop.py share --remote URL`: publish this machine's finished experiments, fetch the others', say what
  happened;
- `loop.py compare --remote URL`: the same fetch, then per hardware class and protocol the best trainer
  across machines (reporting/frontier.py), the others' rows labelled as their claims;
- `loop.py transfer --remote URL --host H`: another machine's published results as the source of a
  transfer (`remote_results` writes them to a file the transfer reads like any results file).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from reporting.frontier import frontier_markdown, frontiers
from reporting.summary import DEFAULT_OUT_DIR, ReportError
from research import share
from research.results import COLUMNS, read_results

__all__ = ["cmd_share", "cmd_compare_remote", "remote_results", "add_subparser", "add_remote_options", "remote_url"]

REPO = Path(__file__).resolve().parents[1]


def _hosts_line(others: list[share.HostRows]) -> str:
    if not others:
        return "hosts seen: none besides this one"
    parts = []
    for h in others:
        kinds = Counter(share.hardware_of(r) for r in h.rows)
        parts.append(f"{h.host}: {len(h.rows)} rows ({', '.join(k for k, _ in kinds.most_common(2)) or 'none'})")
    return "hosts seen (their rows are their claims): " + "; ".join(parts)


def cmd_share(remote: str, host: str | None = None, repo: Path = REPO) -> int:
    """Publish, then fetch; one line each. Exit 1 with one sentence when the remote cannot be reached."""
    me = share.host_name(host)
    try:
        out = share.publish(repo, remote, me)
        others = share.fetch(repo, remote, me)
    except share.ShareError as e:
        print(f"error: sharing through {remote} failed ({e}); check that the remote exists and that this "
              "machine can push to it (`git ls-remote URL`), then run the same command again.", file=sys.stderr)
        return 1
    what = f"published {out.rows} rows ({out.new} new) as {me} to {remote}" if out.pushed else \
        f"{remote} already had all {out.rows} rows of {me}"
    print(what)
    print(_hosts_line(others))
    return 0


def cmd_compare_remote(remote: str, host: str | None = None, repo: Path = REPO, evaluator: str | None = None,
                       out_dir: str | Path = DEFAULT_OUT_DIR) -> int:
    """Fetch the others' rows and print (and write to `<out_dir>/frontier.md`) the frontier per hardware
    class. When the remote cannot be reached, the rows fetched last time are shown, with a warning."""
    me = share.host_name(host)
    try:
        others = share.fetch(repo, remote, me)
    except share.ShareError as e:
        print(f"warning: fetching from {remote} failed ({e}); showing what was fetched last time.",
              file=sys.stderr)
        others = share.fetched(repo, me)
    if evaluator is None:
        import prepare

        evaluator = prepare.evaluator_hash()
    mine = read_results(Path(repo) / "results.tsv")
    md = frontier_markdown(frontiers(mine, me, evaluator, others), remote)
    out = Path(out_dir) / "frontier.md"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md, encoding="utf-8")
    except OSError as e:
        print(f"warning: cannot write {out} ({e.strerror or e}).", file=sys.stderr)
    print(md)
    return 0


def remote_results(remote: str, host: str, folder: Path, repo: Path = REPO) -> Path:
    """Fetch, then write host `host`'s published rows to `<folder>/results.tsv` for a transfer to read.
    Raises ReportError (one sentence) when the remote cannot be reached or has no such host."""
    try:
        others = share.fetch(repo, remote, me="")
    except share.ShareError as e:
        raise ReportError(f"Cannot fetch from {remote} ({e}); check the URL and that this machine can reach "
                          "it.") from None
    found = [h for h in others if h.host == host]
    if not found:
        names = ", ".join(h.host for h in others) or "none"
        raise ReportError(f"{remote} has no published results of host {host!r} (hosts there: {names}); pass "
                          "one of those to --host.")
    path = Path(folder) / "results.tsv"
    path.write_text("\t".join(COLUMNS) + "\n" + "".join(r.to_line() for r in found[0].rows), encoding="utf-8")
    return path


def remote_url(text: str) -> str:
    """A --remote value: a path that exists made absolute (git runs in the repository), a URL as given."""
    if not text or text.startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a git remote; give a bare repository's path or a URL")
    return os.path.abspath(text) if os.path.exists(text) else text


def add_remote_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """--remote and --host-name (this machine's name on the remote), as `run`, `share` and `compare` take them."""
    p.add_argument("--remote", required=required, metavar="URL", type=remote_url,
                   help="a git remote every machine can push to (a bare repository's path, file://, ssh://...)")
    p.add_argument("--host-name", default=None, metavar="NAME",
                   help="this machine's name on the remote (default: AUTORESEARCH_HOST_NAME, else the hostname)")


def add_subparser(subparsers) -> None:
    """Register `share` on loop.py's subparsers (`func` returns the exit code)."""
    p = subparsers.add_parser("share", help="publish this machine's experiments to a git remote, fetch the others'")
    add_remote_options(p, required=True)
    p.add_argument("--repo", default=str(REPO), help=argparse.SUPPRESS)
    p.set_defaults(func=lambda a: cmd_share(a.remote, a.host_name, Path(a.repo)))
