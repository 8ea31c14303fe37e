"""One experiment, end to end: check the change, commit, run, read the evaluator's result,
keep or revert, record.

`run_experiment(session, description)` takes the trainer as it is in the work tree;
`run_baseline(session, k, n)` runs the current commit unchanged. Both return an
`Outcome` whose `row` is what was appended to results.tsv. The result is read from
the evaluator's JSON file only (never from what the trainer prints).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from research import gitrepo
from research.console import clock
from research.guards import text_hash
from research.hparams import HyperparamError, static_values
from research.results import MEASURED, NO_COMMIT, Row, sanitize
from research.secrets import redact
from judge.graphs import plain_file, read_facts
from research.runner import run_trainer
from research.session import BASELINE, Session, TamperError, replay
from research.workspace import Workspace

__all__ = ["Outcome", "Measurement", "Usage", "run_experiment", "run_baseline", "read_result", "decide",
           "log_tail", "failure_line", "exit_reason"]

@dataclass
class Usage:
    """Agent tokens and cost behind one experiment (cost None = model price unknown)."""

    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = 0.0

    def add(self, other: Usage) -> None:
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.cost_usd = None if self.cost_usd is None or other.cost_usd is None else self.cost_usd + other.cost_usd


@dataclass
class Measurement:
    """What the evaluator and the summary reported for one run."""

    val_bpb: float
    memory_gb: float = 0.0
    training_seconds: float | None = None
    total_seconds: float | None = None
    num_steps: int | None = None
    mfu_percent: float | None = None
    num_params_M: float | None = None
    holdout_bpb: float | None = None
    eval_seconds: float | None = None
    device: str | None = None
    hyperparams: dict = field(default_factory=dict)


@dataclass
class Outcome:
    row: Row
    run_dir: Path
    log_tail: str = ""
    diff: str = ""
    trainer_text: str = ""  # the trainer that ran (or was rejected)
    timings: dict = field(default_factory=dict)  # seconds per phase: commit, trainer, parse, bookkeeping, total

    @property
    def status(self) -> str:
        return self.row.status


def log_tail(path: Path, lines: int = 40, chars: int = 6000) -> str:
    """The last lines of a log (what an agent sees after a crash)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")
    tail = "\n".join(line for line in text.split("\n") if line.strip())
    tail = "\n".join(tail.split("\n")[-lines:])
    return tail[-chars:]


def failure_line(log: str) -> str | None:
    """The line of a crashed run's log that says what went wrong: the trainer's own `FAIL:` line,
    else the exception line that ends a Python traceback."""
    lines = [ln.rstrip() for ln in log.split("\n") if ln.strip()]
    fail = next((ln for ln in reversed(lines) if ln.startswith("FAIL:")), None)
    if fail is not None:
        return sanitize(fail, 300)
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    # after the header come indented frames, then the unindented `Type: message` line
    exc = next((ln for ln in lines[starts[-1] + 1 :] if not ln[:1].isspace()), None)
    return sanitize(exc, 300) if exc else None


def exit_reason(returncode: int | None) -> str:
    """`exit code 1`, or the signal that ended the process (`killed by SIGSEGV`)."""
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {returncode}"


def _num(d: dict, key: str, cast=float):
    v = d.get(key)
    try:
        v = cast(v)
    except (TypeError, ValueError):
        return None
    return v if not isinstance(v, float) or math.isfinite(v) else None


_FACT_KEYS = ("training_seconds", "startup_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens",
              "num_steps", "num_params", "depth", "backend", "device", "hyperparams")


def trainer_facts(facts: dict) -> dict:
    """The trainer's own account of its run, cut down to the keys the loop shows (it is not trusted:
    nothing in it decides anything)."""
    out = {}
    for key in _FACT_KEYS:
        v = facts.get(key)
        if key == "hyperparams":
            out[key] = v if isinstance(v, dict) else {}
        elif isinstance(v, str):
            out[key] = sanitize(v, 120)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = v
    return out


def read_result(result: dict | None, *, facts: dict, evaluator_hash: str, protocol: str
                ) -> tuple[str, Measurement | None, str]:
    """(status, measurement, reason) from the harness's result and the trainer's facts.

    status is "ok", "crash" (nothing scorable, or the harness could not score the hand-over) or
    "invalid" (a model that sees the future, mixes rows or keeps state between calls).
    """
    if not isinstance(result, dict):
        return "crash", None, "the harness wrote no result"
    if result.get("valid") is not True:
        reason = sanitize(result.get("reason") or "the harness did not score the model")
        return ("invalid" if result.get("kind") in ("causality", "state") else "crash"), None, reason
    if result.get("evaluator_hash") != evaluator_hash:
        return "crash", None, f"evaluator hash {result.get('evaluator_hash')!r} is not the locked evaluator's {evaluator_hash}"
    if result.get("protocol") != protocol or result.get("split") != "val":
        return "crash", None, f"evaluated on {result.get('protocol')}/{result.get('split')}, not {protocol}/val"
    val = _num(result, "val_bpb")
    if val is None or val <= 0:
        return "crash", None, "the harness reported no finite val_bpb"
    vram = _num(facts, "peak_vram_mb")
    params = _num(facts, "num_params")
    m = Measurement(
        val_bpb=val,
        memory_gb=vram / 1024 if vram and vram > 0 else 0.0,
        training_seconds=_num(facts, "training_seconds"),
        total_seconds=_num(facts, "total_seconds"),
        num_steps=_num(facts, "num_steps", int),
        mfu_percent=_num(facts, "mfu_percent"),
        num_params_M=params / 1e6 if params is not None else None,
        holdout_bpb=_num(result, "holdout_bpb"),
        eval_seconds=_num(result, "harness_seconds"),
        device=facts.get("device") if isinstance(facts.get("device"), str) else None,
        hyperparams=facts.get("hyperparams") or {},
    )
    return "ok", m, ""


def decide(val: float, best: float | None, noise: float | None) -> tuple[str, str, bool]:
    """(status, note, borderline) for a measured value against the best so far and the noise floor.

    A win must beat the best by more than the noise floor; a win by less than twice the floor is
    borderline (worth a confirming rerun when --confirm is on).
    """
    if best is None:
        return "keep", "first measurement on this branch", False
    noise = noise or 0.0
    delta = val - best
    where = f"{delta:+.6f} vs best {best:.6f}, noise floor {noise:.6f}"
    if delta < -noise:
        return "keep", f"win: {where}", delta >= -2 * noise
    if delta < 0:
        return "discard", f"within noise: {where}", False
    return "discard", f"no gain: {where}", False


def _row(s: Session, *, commit: str, status: str, description: str, note: str, run_no: int, trainer_text: str,
         m: Measurement | None, wall: float | None, usage: Usage | None) -> Row:
    hp = m.hyperparams if m and m.hyperparams else {}
    if not hp:
        try:
            hp = static_values(trainer_text)
        except HyperparamError:
            hp = {}
    measured = m is not None and status in MEASURED
    return Row(
        commit=commit[:7] if commit else NO_COMMIT,
        val_bpb=m.val_bpb if measured else 0.0,
        memory_gb=m.memory_gb if measured else 0.0,
        status=status,
        description=description,
        timestamp=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        backend=s.host.backend,
        device=(m.device if m and m.device else s.host.device_name),
        protocol=s.protocol.name,
        evaluator_hash=s.evaluator_hash,
        training_seconds=m.training_seconds if m else None,
        num_steps=m.num_steps if m else None,
        mfu_percent=m.mfu_percent if m else None,
        num_params_M=m.num_params_M if m else None,
        wall_seconds=wall,
        agent_tokens_in=usage.tokens_in if usage else None,
        agent_tokens_out=usage.tokens_out if usage else None,
        agent_cost_usd=usage.cost_usd if usage else None,
        trainer_hash=text_hash(trainer_text),
        holdout_bpb=m.holdout_bpb if m else None,
        hyperparams=hp,
        branch=s.branch,
        run=run_no,
        note=note,
    )


def _run_once(s: Session, run_dir: Path, label: str, description: str, prefix: str = "", overtime: bool = True):
    """Train once (sandboxed, timed from outside), then have the harness score what was handed over.

    Returns (TrainerRun, status, measurement, reason). The run's log gets the trainer's output, the
    harness's, and the summary block last; runs/<n>/result.json gets the harness's result beside
    the trainer's own account of its run.
    """
    log_path = run_dir / f"{prefix}log.txt"
    log_path.write_bytes(b"")
    best = f"{s.best:.6f}" if s.best is not None else "-"
    short = sanitize(description, 48)
    budget = s.budget
    limit = s.overtime_limit() if overtime else None  # baselines are what the allowance is measured on

    def tick(elapsed: float) -> None:
        over = f"start-up allowance to {clock(limit)}" if limit is not None else "baseline: no overtime check"
        s.console.status(f"[{label}] {short} | {clock(elapsed)} since start; budget {clock(budget)} + {over}, "
                         f"killed at {clock(s.timeout_s)} | best {best}")

    ws = Workspace.create(int(run_dir.name) if run_dir.name.isdigit() else 0)
    try:
        argv, preexec, env = s.confine.trainer_run(ws)
        run = run_trainer(argv, cwd=ws.root, env=env, log_path=log_path, timeout_s=s.timeout_s, on_tick=tick,
                          tick_s=s.settings.tick_s, preexec_fn=preexec, reap=s.reap,
                          on_spawn=lambda pgid: s.lock.note_trainer(pgid, s.trainer))
        if run.timed_out:
            return run, "crash", None, f"killed after {run.wall_seconds:.0f} s (limit {s.timeout_s:.0f} s)"
        if run.returncode != 0:
            fail = failure_line(log_tail(log_path, 200, 20000))
            reason = exit_reason(run.returncode)
            return run, "crash", None, f"{reason}; {fail}" if fail else reason
        if limit is not None and run.wall_seconds > limit:
            return run, "rejected", None, (f"overtime: handed over {run.wall_seconds:.1f} s after start, past the "
                                           f"{budget:g} s budget + {limit - budget:.1f} s start-up allowance")
        facts = trainer_facts(read_facts(ws.handover))
        _append(log_path, "\n--- evaluation (judge/harness.py) ---\n")
        h_argv, h_preexec, h_env = s.confine.harness_run(ws)
        s.console.status(f"[{label}] {short} | scoring the hand-over")
        harness = run_trainer(h_argv, cwd=ws.judge, env=h_env, log_path=log_path, timeout_s=s.harness_timeout_s,
                              tick_s=s.settings.tick_s, preexec_fn=h_preexec, reap=s.reap)
        out = ws.judge / "result.json"
        try:
            result = json.loads(out.read_text(encoding="utf-8")) if plain_file(out) else None
        except (OSError, ValueError):
            result = None
        if harness.timed_out:
            result = {"valid": False, "kind": "timeout", "reason": f"the harness ran past {s.harness_timeout_s:.0f} s"}
        status, m, reason = read_result(result, facts=facts, evaluator_hash=s.evaluator_hash, protocol=s.protocol.name)
        record = {"eval": result, "summary": facts, "trainer": {"wall_seconds": run.wall_seconds,
                                                                "log_bytes": run.log_bytes}}
        (run_dir / f"{prefix}result.json").write_text(redact(json.dumps(record, indent=2, default=str)),
                                                        encoding="utf-8")
        if status == "ok":
            import prepare

            _append(log_path, prepare.format_summary(result, facts))
        return run, status, m, reason
    finally:
        ws.remove()
        _redact_file(log_path)


def _redact_file(path: Path) -> None:
    """Scrub known secret values from a run's log (capped in size, so it is read whole)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    clean = redact(text)
    if clean != text:
        path.write_text(clean, encoding="utf-8")


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _write_meta(run_dir: Path, row: Row, timings: dict, **extra) -> None:
    meta = {"row": asdict(row), "timings": {k: round(v, 4) for k, v in timings.items()}, **extra}
    try:
        (run_dir / "meta.json").write_text(redact(json.dumps(meta, indent=1, default=str)), encoding="utf-8")
    except OSError:
        pass  # the row in results.tsv is the record; meta.json is a convenience


def run_baseline(s: Session, index: int, total: int) -> Outcome:
    """Run the current commit unchanged as baseline `index` of `total` and record it as keep (or crash)."""
    return run_experiment(s, BASELINE if index == 1 else f"{BASELINE} (repeat {index}/{total})",
                          baseline=(index, total))


def run_experiment(s: Session, description: str, usage: Usage | None = None, *,
                   baseline: tuple[int, int] | None = None, keep_edit: bool = False,
                   record_as: str | None = None, label: str | None = None) -> Outcome:
    """Check, commit, run and record the trainer as it is in the work tree.

    - baseline=(k, n): run the last kept commit as it is (no change expected), status keep.
    - keep_edit: on a crash, an invalid model or a rejection the edit is written back to the work
      tree, uncommitted (`loop.py try`, so an external agent can fix it); other files it left are
      moved to runs/<n>/removed/.
    - record_as: record a measured run with this status (e.g. "transfer") instead of keep/discard;
      the note still compares it with the best, and the tree always goes back to the last kept commit.
    Raises TamperError (after restoring and recording) when a locked file was changed, and
    SessionError (after recording the crash) when a run crashed and the prepared data is damaged.
    """
    t0 = time.perf_counter()
    started_at = time.time()
    timings: dict[str, float] = {}
    run_no, run_dir = s.new_run_dir()
    label = label or (f"baseline {baseline[0]}/{baseline[1]}" if baseline else f"run {run_no}")
    description = sanitize(description) or "(no description)"
    text = s.trainer_text() if (s.repo / s.trainer).exists() else ""

    def finish(row: Row, diff: str, tail: str = "", restore: bool = True) -> Outcome:
        t_rec = time.perf_counter()
        if restore:
            kept_edit = keep_edit and row.status in ("crash", "invalid", "rejected") and bool(text)
            s.restore(text if kept_edit else None, save_removed=run_dir / "removed")
        s.record(row)
        if row.status == "keep":
            s.best = row.val_bpb if not baseline else s.best
        timings["bookkeeping"] = time.perf_counter() - t_rec
        timings["total"] = time.perf_counter() - t0
        _write_meta(run_dir, row, timings, started_at=started_at, finished_at=time.time())
        return Outcome(row=row, run_dir=run_dir, log_tail=tail, diff=diff, trainer_text=text, timings=timings)

    # 1. the change keeps to the one-file rule
    if baseline:
        commit, diff = s.kept_commit, ""
        problem = s.scope_problem(allow_trainer=False)
    else:
        problem = s.scope_problem()
        if problem is None and not s.changes().get(s.trainer):
            problem = f"no change to {s.trainer}"
        diff = gitrepo.diff(s.repo, "HEAD") + _untracked_listing(s)
    (run_dir / "diff.patch").write_text(redact(diff), encoding="utf-8")
    if problem:
        note = f"rejected: {problem}"
        if baseline:
            note = f"{BASELINE} {baseline[0]}/{baseline[1]}; {note}"
        row = _row(s, commit="", status="rejected", description=description, note=note,
                   run_no=run_no, trainer_text=text, m=None, wall=None, usage=usage)
        out = finish(row, diff, restore=True)
        _report(s, label, out)
        return out
    t = time.perf_counter()
    if not baseline:
        commit = gitrepo.commit_paths(s.repo, [s.trainer], description)
    timings["commit"] = time.perf_counter() - t

    # 2. run (compile check first: a syntax error needs no process)
    t = time.perf_counter()
    outside = s.outside_state()
    try:
        compile(text, s.trainer, "exec")
    except SyntaxError as e:
        (run_dir / "log.txt").write_text(f"SyntaxError: {e.msg} ({s.trainer}, line {e.lineno})\n", encoding="utf-8")
        run, status, m, reason = None, "crash", None, f"syntax error on line {e.lineno}: {e.msg}"
    else:
        s.console.event(f"[{label}] {description}")
        run, status, m, reason = _run_once(s, run_dir, label, description, overtime=not baseline)
    timings["trainer"] = time.perf_counter() - t
    wall = run.wall_seconds if run else 0.0
    tail = log_tail(run_dir / "log.txt")

    # 3. decide (a borderline win may get a confirming rerun first)
    t = time.perf_counter()
    note = ""
    if status == "ok" and baseline:
        status = "keep"
    elif status == "ok":
        status, note, borderline = decide(m.val_bpb, s.best, s.noise_floor)
        if record_as:
            status = record_as
        elif status == "keep" and borderline and s.settings.confirm:
            status, note, m = _confirm(s, run_dir, label, description, m, note)
    else:
        note = f"{status}: {reason}"

    # 4. guards, after every run: branch, history and results.tsv untouched, locked files intact,
    #    nothing in the tree but the trainer's commit
    meddled = s.put_back_outside(outside)
    try:
        s.verify_locked()
    except TamperError as e:
        # restore (tracked locked files come back with the reset), record why, then stop the loop;
        # record() verifies again, so a change the reset cannot undo stops without a row
        row = _row(s, commit=commit, status="rejected", description=description,
                   note=f"rejected: {e}", run_no=run_no, trainer_text=text, m=None, wall=wall, usage=usage)
        finish(row, diff, tail)
        raise
    problem = s.scope_problem(allow_trainer=False)
    if problem:
        status, note = "rejected", f"rejected: {problem}"
    if meddled:
        status, note = "rejected", f"rejected: the run changed {meddled} (put back)"
    if baseline:  # baseline rows are recognised by this note prefix, whatever their status
        note = f"{BASELINE} {baseline[0]}/{baseline[1]}" + (f"; {note}" if note else "")
    timings["parse"] = time.perf_counter() - t

    row = _row(s, commit=commit, status=status, description=description, note=note, run_no=run_no,
               trainer_text=text, m=m, wall=wall, usage=usage)
    out = finish(row, diff, tail, restore=status != "keep")
    if status == "keep":
        s.kept_commit = gitrepo.head(s.repo)
    if baseline:
        state = replay(s.branch_rows(), s.settings.min_noise)
        s.best, s.noise_floor = state.best, state.noise_floor
    _report(s, label, out)
    if status == "crash":
        s.check_data()  # damaged data is not the change's fault: stop and say so (SessionError)
    return out


def _confirm(s: Session, run_dir: Path, label: str, description: str, m: Measurement, note: str):
    """Rerun a borderline win; keep it only if the mean of both runs still wins."""
    s.console.event(f"[{label}] borderline win ({note}); confirming with a second run")
    run, status, m2, reason = _run_once(s, run_dir, label + " confirm", description, prefix="confirm_")
    if status != "ok":
        return "discard", f"confirm run failed ({reason}); first run {m.val_bpb:.6f}", m
    first, second = m.val_bpb, m2.val_bpb
    m.val_bpb = (first + second) / 2
    status, note2, _ = decide(m.val_bpb, s.best, s.noise_floor)
    verdict = "confirmed" if status == "keep" else "not confirmed"
    return status, f"{verdict} by a rerun, mean of {first:.6f} and {second:.6f}: {note2}", m


def _untracked_listing(s: Session) -> str:
    new = [p for p, k in s.changes().items() if k == "U"]
    return "".join(f"# untracked file added: {p}\n" for p in new)


def _report(s: Session, label: str, out: Outcome) -> None:
    r = out.row
    val = f"val_bpb {r.val_bpb:.6f}" if r.ok else r.note
    extra = f" | {r.note}" if r.ok else ""
    best = f" | best {s.best:.6f}" if s.best is not None else ""
    s.console.event(f"[{label}] {r.status.upper()} {val}{extra} | {clock(out.timings.get('total', 0))}{best}")
