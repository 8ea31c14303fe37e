"""Per-hardware frontiers across machines: this machine's measurements beside the others' published claims.

`frontiers` groups rows by (hardware class, protocol, evaluator hash) and finds each host's best trainer
in each group: of each of the host's branches, the best its loop decided with (research/ledger.py's
`replay`, the same code the loop, the live page, the report and `compare` read), and of those the lowest,
with its history (the kept rows of its branch up to it, in order) and what was tried on top of it (the
experiments of its branch after it was kept). Rows of another evaluator are never compared: they are counted in a note. This machine's
rows are labelled measured here; every other host's are its claims, which nothing here has checked.
`frontier_markdown` writes it for `loop.py compare --remote`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reporting.summary import shorten
from research.ledger import replay
from research.results import Kind, Row
from research.share import HostRows, hardware_of

__all__ = ["Entry", "Group", "Frontier", "frontiers", "frontier_markdown", "others_line"]

SHOWN = 8  # rows of a history or of what was tried, at most, in the Markdown


@dataclass
class Entry:
    """One host's best trainer in one group."""

    host: str
    here: bool  # measured on this machine (else: the host's claim)
    best: Row  # the best trainer's last kept row (its last baseline row, when nothing was kept)
    value: float  # the best as the host's loop decided with it (the ledger's replay of its branch)
    runs: int  # how many runs that is the mean of
    history: list[Row] = field(default_factory=list)
    tried: list[Row] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "measured here" if self.here else f"claim of {self.host} (not measured here)"


@dataclass
class Group:
    hardware: str
    protocol: str
    evaluator_hash: str
    entries: list[Entry] = field(default_factory=list)  # best first

    @property
    def best(self) -> Entry | None:
        return self.entries[0] if self.entries else None


@dataclass
class Frontier:
    me: str
    evaluator_hash: str
    groups: list[Group] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # rows left out and why


def _measured(r: Row) -> bool:
    return r.ok and r.val_bpb > 0


def _best_entry(host: str, here: bool, rows: list[Row]) -> Entry | None:
    """The host's best trainer among `rows` (one group's): the lowest of its branches' bests, each as the
    ledger replays it; None when no branch has a measured best."""
    branches: dict[str, list[Row]] = {}
    for r in rows:
        branches.setdefault(r.branch, []).append(r)
    found = []
    for branch in branches.values():
        st = replay(branch, 0.0)
        if st.best is None or not st.best_runs:
            continue
        kept = [r for r in branch if r.status == "keep" and r.trainer_hash == st.best_hash] or st.best_runs
        found.append((st.best, len(st.best_runs), kept[-1], branch))
    if not found:
        return None
    value, runs, best, branch = min(found, key=lambda f: f[0])
    at = next(i for i, r in enumerate(branch) if r is best)
    history = [r for r in branch[:at + 1] if r.status == "keep"]
    tried = [r for r in branch[at + 1:] if r.kind == Kind.EXPERIMENT and r.status != "keep"]
    return Entry(host, here, best, value, runs, history, tried)


def frontiers(mine: list[Row], me: str, evaluator_hash: str, others: list[HostRows]) -> Frontier:
    """The frontier of every (hardware class, protocol) measured with `evaluator_hash`: this machine's rows
    (`mine`, host `me`) and the others' published rows, each host's best in each group, best first."""
    out = Frontier(me, evaluator_hash)
    groups: dict[tuple[str, str, str], dict[str, tuple[bool, list[Row]]]] = {}
    for host, here, rows in [(me, True, mine), *((h.host, False, h.rows) for h in others)]:
        other_eval = [r for r in rows if r.evaluator_hash != evaluator_hash]
        if other_eval:
            vals = [r.val_bpb for r in other_eval if _measured(r)]
            best = f", best val_bpb {min(vals):.6f}" if vals else ""
            hashes = ", ".join(sorted({r.evaluator_hash or "none" for r in other_eval}))
            out.notes.append(f"{host}: {len(other_eval)} rows measured with evaluator {hashes}{best}, not this "
                             f"machine's {evaluator_hash}: shown here only, never compared.")
        for r in rows:
            if r.evaluator_hash == evaluator_hash:
                key = (hardware_of(r), r.protocol, r.evaluator_hash)
                groups.setdefault(key, {}).setdefault(host, (here, []))[1].append(r)
    for (hardware, protocol, ev), hosts in sorted(groups.items()):
        g = Group(hardware, protocol, ev)
        for host, (here, rows) in hosts.items():
            entry = _best_entry(host, here, rows)
            if entry is not None:
                g.entries.append(entry)
        g.entries.sort(key=lambda e: (e.value, not e.here))
        if g.entries:
            out.groups.append(g)
    return out


def _row_text(r: Row) -> str:
    value = f"{r.val_bpb:.6f}" if r.val_bpb else r.status
    return f"{r.commit or '?'} {shorten(r.description, 60)} ({r.status}, {value})"


def frontier_markdown(f: Frontier, remote: str = "") -> str:
    """The frontiers as Markdown: per group a table of each host's best, then the history of the group's
    best and what was tried on top of it."""
    lines = [f"# Frontier per hardware class (this machine: {f.me}, evaluator {f.evaluator_hash})", "",
             "Rows of this machine are measured here; every other host's are its own claims, unchecked here.", ""]
    if not f.groups:
        lines += ["No kept experiment under this evaluator yet, here or published.", ""]
    for g in f.groups:
        lines += [f"## {g.hardware}, protocol {g.protocol or '?'}", "",
                  "| host | best val_bpb | runs | commit | change | source |", "|---|---|---|---|---|---|"]
        for e in g.entries:
            lines.append(f"| {e.host} | {e.value:.6f} | {e.runs} | {e.best.commit} | "
                         f"{shorten(e.best.description, 60).replace('|', '/')} | {e.label} |")
        top = g.best
        lines += ["", f"Best: {top.host}'s {top.value:.6f}, {top.label}."]
        if not top.here:
            where = f" --remote {remote}" if remote else " --remote URL"
            lines.append(f"To measure it here: `loop.py transfer{where} --host {top.host}`.")
        lines.append(f"History of that best ({len(top.history)} kept): "
                     + " → ".join(_row_text(r) for r in top.history[-SHOWN:]))
        lines.append(f"Tried on top of it ({len(top.tried)}): "
                     + ("; ".join(_row_text(r) for r in top.tried[-SHOWN:]) or "nothing yet"))
        lines.append("")
    if f.notes:
        lines += ["## Not compared", "", *[f"- {n}" for n in f.notes], ""]
    return "\n".join(lines)


def others_line(repo, mine: list[Row], evaluator_hash: str) -> str | None:
    """One line for the live page: the best of each hardware class across the machines whose publications
    the loop last fetched (from this repository's refs; nothing is fetched here), theirs marked as claims;
    None when no other machine's rows are here."""
    from research import share

    try:
        others = share.fetched(repo)
    except Exception:  # noqa: BLE001 - no git, not a repository: the page goes on without the line
        return None
    me = share.host_name()
    others = [h for h in others if h.host != me]
    if not others:
        return None
    f = frontiers(mine, me, evaluator_hash, others)
    parts = [f"{g.hardware}, {g.protocol or '?'}: {g.best.value:.6f} by {g.best.host} "
             f"({'measured here' if g.best.here else 'its claim, unchecked here'})" for g in f.groups]
    hosts = ", ".join(h.host for h in others)
    line = f"{len(others)} other machine{'s' if len(others) != 1 else ''} ({hosts})"
    return line + (": " + "; ".join(parts) if parts else ": nothing kept under this evaluator yet")
