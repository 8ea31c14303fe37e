"""The run stage of an experiment: the trainer trains once, sandboxed and timed from outside, and the
harness scores what it handed over.

`run_once(session, run_dir, ...)` returns the loop's own account of the run (a TrainerRun with its wall
time, gauge readings and the hyperparameters read from the committed source), a status, the harness's
Measurement and a reason. It is the same code with one worker and with N (research/trial_worker.py).
The result is read from the harness's JSON file only, never from what the trainer prints.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data.steplog import FAIL_PREFIX
from judge.graphs import plain_file, read_facts
from judge.harness import GO
from research.clock import StepWatch, WallRule, deadline_env
from research.console import clock
from research.decisions import AbortMonitor, LossCurve, write_curve
from research.gauge import LoadMeter, gauge
from research.results import sanitize
from sandbox.runner import end, run_trainer, spawn, wait_child
from sandbox.secrets import redact
from sandbox.workspace import Workspace

if TYPE_CHECKING:  # the session is passed in; importing it here would tie the run stage to the orchestration
    from research.session import Session

__all__ = ["Measurement", "run_once", "read_result", "trainer_facts", "claims_block", "log_tail", "failure_line", "NO_CURVE",
           "exit_reason", "CLAIMS_HEADER"]


@dataclass
class Measurement:
    """One scored run. val_bpb, holdout_bpb and eval_seconds are the harness's; every other field is the
    trainer's CLAIM, copied from its facts.json (research.results.CLAIMED columns; its device and
    hyperparameters only into runs/<n>/result.json's "claims"): shown, never used for a decision. What
    the loop knows itself (the hyperparameters in the committed source, the device, the gauge) is not
    here but on the run (see run_once)."""

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
    fail = next((ln for ln in reversed(lines) if ln.startswith(FAIL_PREFIX.rstrip())), None)
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


def run_once(s: Session, run_dir: Path, label: str, description: str, prefix: str = "",
              monitor: AbortMonitor | None = None, overtime: bool = True):
    """Train once (sandboxed, timed from outside), then have the harness score what was handed over.

    Returns (TrainerRun, status, measurement, reason). Before the trainer starts, the loop reads the
    hyperparameters from the trainer's source (s.source; the file holds the committed text) and its gauge
    (research/gauge.py), and reads the gauge again once the trainer has ended: the TrainerRun carries
    them (`hyperparams`, `gauge_before_s`, `gauge_after_s`), with the cores other programs kept busy
    while it trained (`others_cpu`, research/gauge.py LoadMeter). The run's log gets the trainer's output,
    the harness's, and the summary block last (the harness's and the loop's facts, then the trainer's
    claims apart); runs/<n>/result.json gets the harness's result, the loop's facts and, under "claims",
    the trainer's own account of its run; runs/<n>/loss.json the per-step loss read from its output.
    `monitor` (early abort) watches that loss and may stop the run: status "abort".
    """
    curve = monitor.curve if monitor is not None else LossCurve()
    log_path = run_dir / f"{prefix}log.txt"
    log_path.write_bytes(b"")
    short = sanitize(description, 48)
    rule = s.wall_rule() if overtime else None  # baselines are what the wall-time rule is measured on
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
        load = LoadMeter()  # what other programs take from the machine while it trains
        if monitor is not None:
            monitor.load = load.stop  # early abort spares a run the machine slowed more than the best's
        run = _train(s, ws, log_path, rule, curve, monitor, _ticker(s, label, short, curve, rule), judge)
        run.others_cpu = load.stop()
        run.gauge_before_s, run.gauge_after_s, run.hyperparams = gauge_before, gauge(), hyperparams
        write_curve(run_dir / f"{prefix}loss.json", curve.snapshot(), wall_seconds=run.wall_seconds,
                    stopped_at=monitor.fired_at if run.stopped else None)
        if getattr(monitor, "spared", None):
            _append(log_path, f"\n[loop] {monitor.spared}\n")
            s.console.event(f"[{label}] {monitor.spared}")
        ended = _trainer_outcome(s, run, rule, log_path, monitor)
        if ended is not None:
            return run, ended[0], None, ended[1]
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
        result = _harness_result(s, ws, harness)
        status, m, reason = read_result(result, facts=facts, evaluator_hash=s.evaluator_hash, protocol=s.protocol.name)
        _write_record(s, run_dir / f"{prefix}result.json", result, facts, run)
        if status == "ok":
            if run.first_step_s is None:
                s.console.event(f"[{label}] {NO_CURVE}")
                _append(log_path, f"\n[loop] {NO_CURVE}\n")
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


def _ticker(s: Session, label: str, short: str, curve: LossCurve, rule):
    """The status line's refresh while the trainer runs: progress first (a narrow terminal cuts the end)."""
    best = f"{s.best:.6f}" if s.best is not None else "-"
    limit = rule.limit if rule is not None else None

    def tick(elapsed: float) -> None:
        over = f"hand-over by {clock(limit)}" if limit is not None else "baseline: no overtime check"
        at = f"{100 * curve.progress:3.0f}% | " if curve.progress else ""
        s.console.status(f"[{label}] {at}{short} | {clock(elapsed)} since start; budget {clock(s.budget)} + {over}, "
                         f"killed at {clock(s.timeout_s)} | best {best}")
    return tick


def _train(s: Session, ws, log_path: Path, rule, curve: LossCurve, monitor: AbortMonitor | None, tick, judge):
    """The trainer's run in its sandbox, told its deadline, timed from outside (wall time, and when its
    first and last step lines came: the reserve for later runs), watched by early abort."""
    argv, preexec, env = s.confine.trainer_run(ws)
    steps = StepWatch(curve.feed)
    started = time.time()  # before the spawn: the deadline it is told is never later than its limit
    env = {**env, **deadline_env(rule, started)}
    run = run_trainer(argv, cwd=ws.root, env=env, log_path=log_path, timeout_s=s.timeout_s, on_tick=tick,
                      tick_s=s.settings.tick_s, preexec_fn=preexec, reap=lambda: s.reap(keep={judge.proc.pid}),
                      on_spawn=lambda pgid: s.lock.note_trainer(pgid, s.trainer), on_output=steps.feed,
                      should_stop=monitor.check if monitor is not None else None)
    run.wall_limit_s = rule.limit if rule is not None else None
    run.first_step_s, run.tail_s = steps.times(run.started, run.started + run.wall_seconds)
    return run


def _trainer_outcome(s: Session, run, rule, log_path: Path, monitor: AbortMonitor | None) -> tuple[str, str] | None:
    """(status, reason) when the trainer's run ends the experiment before scoring: stopped early (abort),
    killed, past a cap or failed (crash), or handed over past its wall limit (rejected); None: score it."""
    if run.stopped:
        _append(log_path, f"\n[loop] stopped early (abort): {monitor.fired}\n")
        return "abort", monitor.fired
    if run.timed_out:
        return "crash", f"killed after {run.wall_seconds:.0f} s (limit {s.timeout_s:.0f} s)"
    if run.limit:  # past its workspace or memory cap (sandbox/runner.py says which)
        return "crash", run.limit
    if run.returncode != 0:
        fail = failure_line(log_tail(log_path, 200, 20000))
        code = run.returncode
        if s.sandbox == "bwrap" and code is not None and 128 < code < 160:
            code = 128 - code  # bwrap exits 128 + N when the trainer inside died of signal N
        reason = exit_reason(code)
        return "crash", f"{reason}; {fail}" if fail else reason
    if rule is not None and run.wall_seconds > rule.limit:
        return "rejected", (f"overtime: handed over {run.wall_seconds:.2f} s after start, past the {s.budget:g} s "
                            f"budget + {rule.limit - s.budget:.2f} s allowed ({_limit_why(rule)})")
    return None


def _harness_result(s: Session, ws, harness) -> dict | None:
    """The harness's result.json (None: none readable); a timeout or an unclean exit voids a score."""
    out = ws.judge / "result.json"
    try:
        result = json.loads(out.read_text(encoding="utf-8")) if plain_file(out) else None
    except (OSError, ValueError):
        result = None
    if harness.timed_out:
        return {"valid": False, "kind": "timeout", "reason": f"the harness ran past {s.harness_timeout_s:.0f} s"}
    if harness.returncode != 0 and isinstance(result, dict) and result.get("valid"):
        return {**result, "valid": False, "kind": "harness",  # a score comes with a clean exit only
                "reason": f"the harness reported a score but ended with {exit_reason(harness.returncode)}"}
    return result


def _write_record(s: Session, path: Path, result, facts: dict, run) -> None:
    """runs/<n>/result.json: the harness's result, the loop's own facts, the trainer's claims apart."""
    own = {"backend": s.host.backend, "device": s.host.device_name, "hyperparams": run.hyperparams,
           "wall_seconds": run.wall_seconds, "gauge_before_s": run.gauge_before_s,
           "gauge_after_s": run.gauge_after_s, "others_cpu": getattr(run, "others_cpu", None)}
    record = {"eval": result, "loop": own, "claims": facts,
              "trainer": {"wall_seconds": run.wall_seconds, "log_bytes": run.log_bytes,
                          "wall_limit_s": run.wall_limit_s, "first_step_s": run.first_step_s, "tail_s": run.tail_s}}
    path.write_text(redact(json.dumps(record, indent=2, default=str)), encoding="utf-8")


NO_CURVE = ("no loss curve: the trainer printed no step lines (prepare.log_step), so early abort could not watch "
            "it and the live page shows no curve for it")
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
