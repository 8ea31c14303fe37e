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

from research import gitrepo, tamper
from research.clock import StepWatch, WallRule, deadline_env
from research.console import clock
from research.guards import guard_run, text_hash
from research.gauge import gauge
from research.decisions import AbortMonitor, LossCurve, NoiseModel, Verdict, decide_runs, write_curve
from research.results import MEASURED, NO_COMMIT, Row, sanitize
from sandbox.secrets import redact
from judge.graphs import plain_file, read_facts
from judge.harness import GO
from sandbox.runner import end, run_trainer, spawn, wait_child
from research.session import ABORT_AUDIT, ABORT_OFF, BASELINE, BEST_NEXT, RERUN, Session, TamperError, replay
from sandbox.workspace import Workspace

__all__ = ["Outcome", "Measurement", "Usage", "run_experiment", "run_baseline", "run_rerun", "read_result",
           "decide", "log_tail", "failure_line", "exit_reason"]

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
    """One scored run. val_bpb, holdout_bpb and eval_seconds are the harness's; every other field is the
    trainer's CLAIM, copied from its facts.json (research.results.CLAIMED columns; its device and
    hyperparameters only into runs/<n>/result.json's "claims"): shown, never used for a decision. What
    the loop knows itself (the hyperparameters in the committed source, the device, the gauge) is not
    here but on the run (see _run_once)."""

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


_FACT_KEYS = ("training_seconds", "startup_seconds", "total_seconds", "export_seconds", "peak_vram_mb", "mfu_percent",
              "total_tokens", "num_steps", "warmup_steps", "num_params", "depth", "backend", "device",
              "hyperparams")


def trainer_facts(facts: dict) -> dict:
    """The trainer's own account of its run (its facts.json), cut down to the keys the loop shows: a claim,
    kept apart from what the loop measured (runs/<n>/result.json's "claims", the summary's claims section,
    the CLAIMED columns). Nothing in it decides anything."""
    out = {}
    for key in _FACT_KEYS:
        v = facts.get(key)
        if key == "hyperparams":
            out[key] = v if isinstance(v, dict) and len(json.dumps(v, default=str)) <= 4000 else {}
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


def decide(cand: list[float], best: list[float], noise: NoiseModel | None, alpha: float,
           confirm_alpha: float | None = None) -> Verdict:
    """Keep or discard a candidate's runs against the best trainer's runs (research/decisions.py has the
    rule): kept when the one-sided t-test against the pooled run-to-run noise gives p < alpha;
    `promising` when p < confirm_alpha (worth a confirming rerun). With no best yet, keep."""
    if not best or noise is None:
        return Verdict("keep", "first measurement on this branch", False, 0.0, 0.0, 0.0, 0.0)
    return decide_runs(cand, best, noise, alpha, confirm_alpha)


def _row(s: Session, *, commit: str, status: str, description: str, note: str, run_no: int, trainer_text: str,
         m: Measurement | None, wall: float | None, usage: Usage | None, progress: float | None = None,
         worker: str = "", run=None) -> Row:
    """One results row. `run` (a TrainerRun or RunResult) gives the loop's own timing of the trainer, its
    gauge readings and the hyperparameters it read from the committed source before the run. The
    hyperparameters and the device are the loop's (never the trainer's claim); memory, training seconds,
    steps, MFU and parameters are the trainer's claim (research.results.CLAIMED)."""
    hp = getattr(run, "hyperparams", None)
    if hp is None:
        hp = s.source.values(trainer_text)
    measured = m is not None and status in MEASURED
    return Row(
        commit=commit[:7] if commit else NO_COMMIT,
        val_bpb=m.val_bpb if measured else 0.0,
        memory_gb=m.memory_gb if measured else 0.0,
        status=status,
        description=description,
        timestamp=datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        backend=s.host.backend,
        device=s.host.device_name,
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
        budget_s=s.budget,
        progress=progress,
        worker=worker,
        wall_ratio=wall / s.budget if wall and s.budget else None,
        wall_limit_s=getattr(run, "wall_limit_s", None),
        first_step_s=getattr(run, "first_step_s", None),
        tail_s=getattr(run, "tail_s", None),
        gauge_before_s=getattr(run, "gauge_before_s", None),
        gauge_after_s=getattr(run, "gauge_after_s", None),
    )


def _run_once(s: Session, run_dir: Path, label: str, description: str, prefix: str = "",
              monitor: AbortMonitor | None = None, overtime: bool = True):
    """Train once (sandboxed, timed from outside), then have the harness score what was handed over.

    Returns (TrainerRun, status, measurement, reason). Before the trainer starts, the loop reads the
    hyperparameters from the trainer's source (s.source; the file holds the committed text) and its gauge
    (research/gauge.py), and reads the gauge again once the trainer has ended: the TrainerRun carries
    them (`hyperparams`, `gauge_before_s`, `gauge_after_s`). The run's log gets the trainer's output,
    the harness's, and the summary block last (the harness's and the loop's facts, then the trainer's
    claims apart); runs/<n>/result.json gets the harness's result, the loop's facts and, under "claims",
    the trainer's own account of its run; runs/<n>/loss.json the per-step loss read from its output.
    `monitor` (early abort) watches that loss and may stop the run: status "abort".
    """
    curve = monitor.curve if monitor is not None else LossCurve()
    log_path = run_dir / f"{prefix}log.txt"
    log_path.write_bytes(b"")
    best = f"{s.best:.6f}" if s.best is not None else "-"
    short = sanitize(description, 48)
    budget = s.budget
    rule = s.wall_rule() if overtime else None  # baselines are what the wall-time rule is measured on
    limit = rule.limit if rule is not None else None

    def tick(elapsed: float) -> None:
        over = f"hand-over by {clock(limit)}" if limit is not None else "baseline: no overtime check"
        at = f" | at {100 * curve.progress:.0f}%" if curve.progress else ""
        s.console.status(f"[{label}] {short} | {clock(elapsed)} since start; budget {clock(budget)} + {over}, "
                         f"killed at {clock(s.timeout_s)}{at} | best {best}")

    try:
        text = (Path(s.confine.repo) / s.trainer).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    hyperparams = s.source.values(text, s.confine)  # what the source sets here, read before it runs
    gauge_before = gauge()  # the machine's speed, by the loop's own fixed workload
    ws = Workspace.create(int(run_dir.name) if run_dir.name.isdigit() else 0)
    judge = None
    try:
        # The harness starts first, in its own sandbox, and prepares (imports, data checks) at the lowest
        # priority while the trainer trains; it reads nothing of the hand-over before the go-ahead.
        h_argv, h_preexec, h_env = s.confine.harness_run(ws, wait=True)
        judge = spawn(h_argv, cwd=ws.judge, env=h_env, log_path=log_path, preexec_fn=h_preexec, stdin_pipe=True)
        argv, preexec, env = s.confine.trainer_run(ws)
        steps = StepWatch(curve.feed)  # when its first and last step lines came: the reserve for later runs
        started = time.time()  # before the spawn: the deadline it is told is never later than its limit
        env = {**env, **deadline_env(rule, started)}
        run = run_trainer(argv, cwd=ws.root, env=env, log_path=log_path, timeout_s=s.timeout_s, on_tick=tick,
                          tick_s=s.settings.tick_s, preexec_fn=preexec, reap=lambda: s.reap(keep={judge.proc.pid}),
                          on_spawn=lambda pgid: s.lock.note_trainer(pgid, s.trainer), on_output=steps.feed,
                          should_stop=monitor.check if monitor is not None else None)
        run.gauge_before_s, run.gauge_after_s, run.hyperparams = gauge_before, gauge(), hyperparams
        run.wall_limit_s = limit
        run.first_step_s, run.tail_s = steps.times(run.started, run.started + run.wall_seconds)
        write_curve(run_dir / f"{prefix}loss.json", curve.snapshot(), wall_seconds=run.wall_seconds,
                    stopped_at=monitor.fired_at if run.stopped else None)
        if run.stopped:
            _append(log_path, f"\n[loop] stopped early (abort): {monitor.fired}\n")
            return run, "abort", None, monitor.fired
        if run.timed_out:
            return run, "crash", None, f"killed after {run.wall_seconds:.0f} s (limit {s.timeout_s:.0f} s)"
        if run.limit:  # past its workspace or memory cap (sandbox/runner.py says which)
            return run, "crash", None, run.limit
        if run.returncode != 0:
            fail = failure_line(log_tail(log_path, 200, 20000))
            code = run.returncode
            if s.sandbox == "bwrap" and code is not None and 128 < code < 160:
                code = 128 - code  # bwrap exits 128 + N when the trainer inside died of signal N
            reason = exit_reason(code)
            return run, "crash", None, f"{reason}; {fail}" if fail else reason
        if limit is not None and run.wall_seconds > limit:
            return run, "rejected", None, (f"overtime: handed over {run.wall_seconds:.2f} s after start, past the "
                                           f"{budget:g} s budget + {limit - budget:.2f} s allowed ({_limit_why(rule)})")
        facts = trainer_facts(read_facts(ws.handover))
        _append(log_path, "\n--- evaluation (judge/harness.py) ---\n")
        s.console.status(f"[{label}] {short} | scoring the hand-over")
        written = ws.judge_written()
        if written:  # only reachable without a sandbox: the harness's directory must hold only its own output
            return run, "rejected", None, (f"the harness's directory was written to during the run "
                                           f"({', '.join(written)}); nothing but the harness may write there")
        go = time.perf_counter()
        judge.release(GO + b"\n")  # the trainer and everything it started are gone: score the hand-over
        harness = wait_child(judge, timeout_s=s.harness_timeout_s, tick_s=s.settings.tick_s, reap=s.reap, since=go)
        judge = None
        out = ws.judge / "result.json"
        try:
            result = json.loads(out.read_text(encoding="utf-8")) if plain_file(out) else None
        except (OSError, ValueError):
            result = None
        if harness.timed_out:
            result = {"valid": False, "kind": "timeout", "reason": f"the harness ran past {s.harness_timeout_s:.0f} s"}
        elif harness.returncode != 0 and isinstance(result, dict) and result.get("valid"):
            result = {**result, "valid": False, "kind": "harness",  # a score comes with a clean exit only
                      "reason": f"the harness reported a score but ended with {exit_reason(harness.returncode)}"}
        status, m, reason = read_result(result, facts=facts, evaluator_hash=s.evaluator_hash, protocol=s.protocol.name)
        own = {"backend": s.host.backend, "device": s.host.device_name, "hyperparams": hyperparams,
               "wall_seconds": run.wall_seconds, "gauge_before_s": run.gauge_before_s,
               "gauge_after_s": run.gauge_after_s}
        record = {"eval": result, "loop": own, "claims": facts, "trainer": {"wall_seconds": run.wall_seconds,
                                                                "log_bytes": run.log_bytes,
                                                                "wall_limit_s": run.wall_limit_s,
                                                                "first_step_s": run.first_step_s,
                                                                "tail_s": run.tail_s}}
        (run_dir / f"{prefix}result.json").write_text(redact(json.dumps(record, indent=2, default=str)),
                                                        encoding="utf-8")
        if status == "ok":
            import prepare

            loop_facts = {"total_seconds": run.wall_seconds, "depth": hyperparams.get("DEPTH"),
                          "backend": s.host.backend, "device": s.host.device_name, "hyperparams": hyperparams}
            _append(log_path, prepare.format_summary(result, loop_facts) + claims_block(facts))
        return run, status, m, reason
    finally:
        if judge is not None:  # not needed (the run crashed, was rejected or stopped) or Ctrl-C: no score
            end(judge, reap=s.reap)
        ws.remove()
        _redact_file(log_path)


CLAIMS_HEADER = "--- claimed by the trainer (its facts.json: not checked, decides nothing) ---"
_CLAIM_KEYS = ("training_seconds", "total_seconds", "startup_seconds", "export_seconds", "peak_vram_mb", "mfu_percent",
               "total_tokens", "num_steps", "warmup_steps", "num_params", "depth", "backend", "device", "hyperparams")


def claims_block(facts: dict) -> str:
    """The trainer's claims as the summary shows them, apart from the summary block proper and after it: a
    header line, then `key: value` lines (n/a where it claimed nothing)."""
    lines = [CLAIMS_HEADER]
    for key in _CLAIM_KEYS:
        v = facts.get(key)
        if key == "hyperparams":
            text = json.dumps(v if isinstance(v, dict) else {}, default=str)
        elif isinstance(v, float):
            text = f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        else:
            text = "n/a" if v is None else str(v)
        lines.append(f"{key + ':':<18}{sanitize(text, 2000)}")
    return "\n".join(lines) + "\n"


def _limit_why(rule: WallRule) -> str:
    if not rule.baselines:
        return "set by --startup-allowance"
    return f"the median of {rule.baselines} baseline{'s' if rule.baselines != 1 else ''} + {rule.margin:.2f} s margin"


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


def run_rerun(s: Session, why: str) -> Outcome:
    """Run the best (the last kept commit) again, unchanged and never stopped early, and record it as
    `rerun`: one more measurement for the best's mean and the noise model (`why` goes in the note)."""
    return run_experiment(s, f"{RERUN} ({s.kept_commit[:7]})", rerun=why, label=RERUN)


def run_experiment(s: Session, description: str, usage: Usage | None = None, *,
                   baseline: tuple[int, int] | None = None, keep_edit: bool = False,
                   record_as: str | None = None, label: str | None = None, rerun: str | None = None) -> Outcome:
    """Check, commit, run and record the trainer as it is in the work tree.

    - baseline=(k, n): run the last kept commit as it is (no change expected), status keep.
    - rerun=why: the same, recorded as status rerun (a re-measurement of the best).
    - otherwise the change is decided by the rule in research/decisions.py: a promising single run
      is run again (a `rerun` row after the experiment's row) and the mean of both is tested; while it
      trains, early abort may stop it (status abort) when its loss trails the best's.
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
    same = bool(baseline or rerun)  # the last kept commit as it is, no decision
    extra: list[Row] = []  # rows recorded after the experiment's (its confirm run)
    description = sanitize(description) or "(no description)"
    text = s.trainer_text() if (s.repo / s.trainer).exists() else ""
    s.source.values(text, s.confine)  # its hyperparameters, read from the source in the tree (the row's)

    def finish(row: Row, diff: str, tail: str = "", restore: bool = True) -> Outcome:
        t_rec = time.perf_counter()
        if restore:
            kept_edit = keep_edit and row.status in ("crash", "invalid", "rejected") and bool(text)
            s.restore(text if kept_edit else None, save_removed=run_dir / "removed")
        s.record(row)
        for r in extra:
            s.record(r)
        s.refresh()  # best, noise model and re-measurement state from the rows
        timings["bookkeeping"] = time.perf_counter() - t_rec
        timings["total"] = time.perf_counter() - t0
        _write_meta(run_dir, row, timings, started_at=started_at, finished_at=time.time())
        return Outcome(row=row, run_dir=run_dir, log_tail=tail, diff=diff, trainer_text=text, timings=timings)

    # 1. the change keeps to the one-file rule
    if same:
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
    if not same:
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
        monitor = None if same or record_as else _abort_monitor(s, label)
        run, status, m, reason = _run_once(s, run_dir, label, description, monitor=monitor,
                                           overtime=not baseline)
    timings["trainer"] = time.perf_counter() - t
    wall = run.wall_seconds if run else 0.0
    tail = log_tail(run_dir / "log.txt")

    def guard(before) -> str | None:
        """research.guards.guard_run after a run of this experiment: what it changed (put back), or None; a
        locked file changed: the row is recorded as rejected, then TamperError stops the loop (record()
        verifies again, so a change the reset cannot undo stops without a row)."""
        try:
            return guard_run(s, before, save_removed=run_dir / "removed")
        except TamperError as e:
            row = _row(s, commit=commit, status="rejected", description=description, note=f"rejected: {e}",
                       run_no=run_no, trainer_text=text, m=None, wall=wall, usage=usage, run=run)
            finish(row, diff, tail)
            raise

    # 3. guards, after every run and before anything is decided on it: branch, refs, git settings, hooks and
    #    results.tsv untouched, locked files intact, nothing in the tree but the trainer's commit
    t = time.perf_counter()
    note, progress, confirm = "", None, None
    meddled = guard(outside)
    if meddled:
        status, note, m = "rejected", f"rejected: {meddled}", None

    # 4. decide (a promising run gets a confirming rerun first, each of its runs guarded in turn)
    if status == "rejected" and meddled:
        pass
    elif status == "ok" and baseline:
        status = "keep"
    elif status == "ok" and rerun:
        status, note = "rerun", f"rerun of the best: {rerun}"
    elif status == "ok":
        st = s.state
        verdict = decide([m.val_bpb], st.best_values, st.noise, s.settings.alpha,
                         s.settings.confirm_alpha if s.settings.confirm and not record_as else None)
        status, note = verdict.status, verdict.note
        if record_as:
            status = record_as
        elif s.settings.confirm and st.best_values and (verdict.status == "keep" or verdict.promising):
            status, note, confirm = _confirm(s, run_dir, label, description, m, verdict, commit=commit,
                                             run_no=run_no, text=text, guard=guard)
        if monitor is not None and monitor.audit and monitor.fired:
            note += f"; {ABORT_AUDIT} it would have been stopped {monitor.fired}"
            if st.best is not None and m.val_bpb < st.best:
                note += f", yet it measured below the best's mean {st.best:.6f}: {ABORT_OFF}"
    elif status == "abort":
        progress = monitor.fired_at if monitor is not None else None
        note = f"abort: {reason}"
    elif status == "invalid":
        note = tamper.note(reason)  # a non-causal model: recorded, then the branch stops (below)
    else:
        note = f"{status}: {reason}"

    if confirm and status != "rejected":
        extra.extend(confirm)  # the confirm run, and the best's run next to it
    if baseline:  # baseline rows are recognised by this note prefix, whatever their status
        note = f"{BASELINE} {baseline[0]}/{baseline[1]}" + (f"; {note}" if note else "")
    timings["parse"] = time.perf_counter() - t

    row = _row(s, commit=commit, status=status, description=description, note=note, run_no=run_no,
               trainer_text=text, m=m, wall=wall, usage=usage, progress=progress, run=run)
    out = finish(row, diff, tail, restore=status != "keep")
    if status == "keep":
        s.kept_commit = gitrepo.head(s.repo)
    _report(s, label, out)
    tamper.stop_if_tampered(s, [row, *extra])  # BranchStopped when a run of it handed over a non-causal model
    if status == "crash":
        s.check_data()  # damaged data is not the change's fault: stop and say so (SessionError)
    return out


def _confirm(s: Session, run_dir: Path, label: str, description: str, m: Measurement, first: Verdict, *,
             commit: str, run_no: int, text: str, guard):
    """A promising change: the best (the last kept commit's trainer) runs once now, then the change again,
    both never stopped early; the change is decided on the mean of its two runs against the best's runs
    at the machine's current speed, the fresh one included. The best's run sits between the change's
    two, so a machine that gets faster or slower during the night moves both sides alike.

    Each run is guarded (`guard`: research.guards.guard_run) before anything else happens: one that changed
    what it must leave alone ends the confirmation (the change's own run: rejected; the best's: discarded).

    Returns (status, note, rows to record after the experiment's: the confirm run and the best's run)."""
    s.console.event(f"[{label}] promising ({first.note}); running the best, then the change again")
    rows: list[Row] = []
    before = s.outside_state()
    best = _run_best_next_to(s, run_dir, label, run_no)
    meddled = guard(before)
    if meddled:
        if best is not None:
            rows.append(_row(s, commit=s.kept_commit, status="rejected", description=f"{RERUN} ({s.kept_commit[:7]})",
                             note=f"{BEST_NEXT} {run_no}; rejected: {meddled}", run_no=run_no, trainer_text=best[2],
                             m=None, wall=best[0].wall_seconds, usage=None, run=best[0]))
        return "discard", f"not confirmed: the best's run next to it was rejected ({meddled})", rows
    if best is not None:
        run_b, m_b, best_text, why = best
        rows.append(_row(s, commit=s.kept_commit, status="rerun" if why is None else "invalid",
                         description=f"{RERUN} ({s.kept_commit[:7]})",
                         note=f"{BEST_NEXT} {run_no}" if why is None else f"{BEST_NEXT} {run_no}; {tamper.note(why)}",
                         run_no=run_no, trainer_text=best_text, m=m_b, wall=run_b.wall_seconds, usage=None, run=run_b))
        if why is not None:
            return "discard", "not confirmed: the best's run next to it handed over a non-causal model", rows
    before = s.outside_state()
    run2, status2, m2, reason = _run_once(s, run_dir, label + " confirm", description, prefix="confirm_")
    meddled = guard(before)
    if meddled:
        return "rejected", f"rejected: {meddled} (its confirm run)", rows
    if status2 == "invalid":
        return "invalid", tamper.note(f"its confirm run: {reason}"), rows
    if status2 != "ok":
        return "discard", f"confirm run failed ({reason}); first run {m.val_bpb:.6f}: {first.note}", rows
    rows.insert(0, _row(s, commit=commit, status="rerun", description=description, note=f"confirm run of run {run_no}",
                        run_no=run_no, trainer_text=text, m=m2, wall=run2.wall_seconds, usage=None, run=run2))
    st = replay(s.branch_rows() + rows[1:], s.settings.min_noise, s.settings.drift)
    v = decide([m.val_bpb, m2.val_bpb], st.best_values, st.noise, s.settings.alpha)
    verdict = "confirmed" if v.status == "keep" else "not confirmed"
    return v.status, f"{verdict} by a rerun, mean of {m.val_bpb:.6f} and {m2.val_bpb:.6f}: {v.note}", rows


def _run_best_next_to(s: Session, run_dir: Path, label: str, run_no: int):
    """Run the last kept commit's trainer once, in place of the change (put back afterwards, whatever
    happens): (run, measurement, its text, None), (run, None, its text, the harness's reason) when it
    handed over a non-causal model, or None when it did not measure."""
    path = s.repo / s.trainer
    mine = path.read_bytes()
    try:
        best_bytes = gitrepo.git_bytes(s.repo, "show", f"{s.kept_commit}:{s.trainer}")
        path.write_bytes(best_bytes)
        run, status, m, reason = _run_once(s, run_dir, f"{label} best", f"the best next to run {run_no}",
                                           prefix="best_")
    finally:
        path.write_bytes(mine)
    text = best_bytes.decode("utf-8", errors="replace")
    if status == "invalid":
        return run, None, text, reason
    if status != "ok":
        s.console.event(f"[{label}] the best's run next to it did not measure ({reason}); deciding without it")
        return None
    return run, m, text, None


def _abort_monitor(s: Session, label: str) -> AbortMonitor | None:
    """The early-abort watcher for one experiment, or None (off, or nothing to compare with yet)."""
    ref, why = s.abort_reference()
    if ref is None:
        if s.settings.early_abort and why != getattr(s, "_abort_why", None):  # say it once per reason
            s.console.event(f"[{label}] not watched for early abort: {why}")
        s._abort_why = why
        return None
    s._abort_why = None
    every = s.settings.abort_audit_every
    audit = every > 0 and (s.state.would_abort + 1) % every == 0
    return AbortMonitor(LossCurve(), ref, z=s.settings.abort_z, min_progress=s.settings.abort_min_progress,
                        audit=audit)


def _untracked_listing(s: Session) -> str:
    new = [p for p, k in s.changes().items() if k == "U"]
    return "".join(f"# untracked file added: {p}\n" for p in new)


def _report(s: Session, label: str, out: Outcome) -> None:
    r = out.row
    val = f"val_bpb {r.val_bpb:.6f}" if r.ok else r.note
    extra = f" | {r.note}" if r.ok else ""
    best = f" | best {s.best:.6f}" if s.best is not None else ""
    s.console.event(f"[{label}] {r.status.upper()} {val}{extra} | {clock(out.timings.get('total', 0))}{best}")
