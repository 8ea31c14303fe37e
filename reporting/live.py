"""`loop.py serve` (and `loop.py run --serve`): a read-only live page of the research loop.

The page (reporting/static/: index.html, live.js, live.css and the vendored Chart.js) polls one JSON
endpoint and shows, as the loop runs:
- the experiment in progress: its description, training-loss curve so far against the best run's,
  tokens/s, time left and, where the best has two stored curves, the early-abort threshold and margin;
- the progress plot (val_bpb per experiment, keeps highlighted, the running best, holdout_bpb beside
  it) and the results table (status, val_bpb, delta vs the best before it, memory, steps, agent cost),
  each row opening its runs/<n>/diff.patch and the tail of its log;
- agent cost, the noise model's numbers, host and backend; with more results files (other machines),
  the compare view.

Everything comes from disk: results.tsv (read with research/results.py, grouped with
reporting/summary.py like the reports), runs/<n>/ and, for the description of a run in progress, the
subject of the commit the loop made for it. The run in progress is the newest runs/<n>/ without a row;
its loss curve is read from its log.txt as it grows (the trainer's `step N (P%) | loss: L | ...
tok/sec: T | ... remaining: Rs` lines), finished runs' curves from their loss.json. The server never
writes. Files are served only from inside runs/ (as resolved: a link leading out is refused), only
regular files, only by run number and one of a few names; no request names a path.

The web app, the server and the command line are in reporting/serve.py.
"""

from __future__ import annotations

import math
import platform
import re
import threading
import time
from pathlib import Path

from data.steplog import REMAINING, STEP_PREFIX, TOK_S
from reporting import page
from reporting.runfiles import Cached, LogTail, Refused, RunFiles
from reporting.summary import ReportError, Source, load_source, summarize
from research.results import Row
from sandbox.secrets import redact

__all__ = ["Refused", "LiveData", "POLL_SECONDS"]

POLL_SECONDS = 2.0  # how often the page asks for news
STALE_RUN_S = 60.0  # a run without a row whose log has been still this long, with no loop running: interrupted

# the step line's format is data/steplog.py's (what prepare.log_step prints)
_STEP_LINE = re.compile(STEP_PREFIX.pattern + rb"[^\r\n]*")
_HARNESS = b"--- evaluation (judge/harness.py) ---"
_STOPPED = b"[loop] stopped early (abort)"


class LiveData(RunFiles):
    """What the page shows, read from one results file, its runs/ (reporting/runfiles.py) and other machines'
    results files.

    `min_noise`, `abort_z` and `abort_min_progress` are the loop's settings (its defaults unless the
    loop that serves passes its own); they set the noise model's floor and the early-abort threshold.
    """

    def __init__(self, results: str | Path, others: list[str | Path] = (), *, min_noise: float | None = None,
                 abort_z: float | None = None, abort_min_progress: float | None = None,
                 early_abort: bool | None = None, alpha: float | None = None, confirm: bool | None = None,
                 poll_seconds: float = POLL_SECONDS):
        from research.session import Settings

        super().__init__(results)
        self.others = [Path(p).absolute() for p in others]
        default = lambda name, fallback: getattr(Settings, name, fallback)
        self.min_noise = default("min_noise", 0.0005) if min_noise is None else min_noise
        self.abort_z = default("abort_z", 4.0) if abort_z is None else abort_z
        self.abort_min_progress = default("abort_min_progress", 0.3) if abort_min_progress is None \
            else abort_min_progress
        self.early_abort = default("early_abort", True) if early_abort is None else early_abort
        self.alpha = default("alpha", 0.05) if alpha is None else alpha
        self.confirm = default("confirm", True) if confirm is None else confirm
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._tails: dict[Path, LogTail] = {}
        self._files: Cached | None = None
        self._subjects: dict[int, str] = {}

    # -- the state the page polls -------------------------------------------------

    def state(self) -> dict:
        with self._lock:
            return self._state()

    def _signature(self) -> tuple:
        sig = []
        for p in [self.results, *self.others]:
            try:
                st = p.stat()
                sig.append((str(p), st.st_mtime_ns, st.st_size))
            except OSError:
                sig.append((str(p), None, None))
        try:
            sig.append(self.runs.stat().st_mtime_ns)
        except OSError:
            sig.append(None)
        return tuple(sig)

    def _state(self) -> dict:
        sig = self._signature()
        if self._files is None or self._files.key != sig:
            self._files = Cached(sig, self._from_files())
        files = self._files.value
        out = dict(files["public"])
        out["generated_at"] = time.time()
        out["loop"] = page.loop_alive(self.root)
        cur = out["current"] = self._current(files.get("source"), files.get("replay"))
        quiet = cur.get("last_output_s") if cur else None
        if cur and not out["loop"]["running"] and quiet is not None and quiet > STALE_RUN_S:
            # no loop holds the repository and the run's log has been still: it was interrupted (Ctrl-C, a kill)
            # and will get no row; the next `loop.py run` or `try` starts from the last kept commit
            cur["phase"] = "interrupted"
        out["in_flight"] = self._in_flight(files.get("source"), cur) if out["loop"]["running"] else []
        return out

    def _in_flight(self, source: Source | None, cur: dict | None) -> list[int]:
        """With N workers, the other runs without a row made since the loop started (their logs come back
        from the workers when they end, so only the newest one's progress can be shown)."""
        rows = (source.rows + source.left_out) if source is not None else []
        recorded = {r.run for r in rows if r.run is not None}
        since = self._lock_mtime()
        return [n for n in self._run_numbers() if n not in recorded and (cur is None or n != cur["run"])
                and since is not None and (self._mtime_dir(n) or 0) >= since]

    def _lock_mtime(self) -> float | None:
        from research.guards import LOCK_FILE

        try:
            return (self.root / LOCK_FILE).stat().st_mtime - 1.0
        except OSError:
            return None

    def _from_files(self) -> dict:
        out: dict = {
            "server": {"machine": platform.node(), "results": str(self.results), "poll_seconds": self.poll_seconds},
        }
        try:
            source = load_source(self.results)
        except ReportError as e:
            source = None
            out["message"] = str(e)
        if source is not None and not source.rows:
            out["message"] = f"{self.results} has no experiment yet; the first row appears when the first run ends."
        rows = source.rows if source is not None else []
        st = self._replay(rows)  # the decision state: the summary's best and the noise come from this one replay
        summary = summarize(source, min_noise=self.min_noise, state=st) if rows else None
        out["host"] = page.host(source)
        if source is not None:
            from reporting.frontier import others_line

            out["host"]["others"] = others_line(self.root, rows, source.evaluator_hash)
        out["summary"] = page.summary_json(source, summary, st) if summary else None
        out["rows"] = page.rows_json(rows, summary, self._run_numbers()) if summary else []
        out["plot"] = page.plot_json(source, summary) if summary else None
        out["noise"] = page.noise_json(st, summary, self)
        out["compare"] = self._compare(source) if self.others else None
        return {"public": out, "source": source, "replay": st}

    def _replay(self, rows: list[Row]):
        if not rows:
            return None
        try:
            from research.ledger import replay

            return replay(rows, self.min_noise)
        except Exception:  # noqa: BLE001 - the page still shows the rows when the decision state cannot be rebuilt
            return None

    # -- the run in progress ----------------------------------------------------

    def _current(self, source: Source | None, st) -> dict | None:
        numbers = self._run_numbers()
        if not numbers:
            return None
        n = numbers[-1]
        rows = (source.rows + source.left_out) if source is not None else []
        if any(r.run == n for r in rows):
            return None  # the newest run is recorded: nothing is running now
        confirm = self._exists(n, "confirm_log.txt")
        log_name = "confirm_log.txt" if confirm else "log.txt"
        cur: dict = {"run": n, "confirm": confirm, "log": f"runs/{n}/{log_name}"}
        try:
            log = self.run_path(n, log_name)
            tail = self._tails.get(log)
            if tail is None:
                tail = LogTail()
                self._tails = {log: tail}  # only the run in progress is followed
            tail.update(log)
        except (Refused, OSError, ImportError):
            tail = None
        now = time.time()
        started = self._mtime(n, "diff.patch") or self._mtime_dir(n)
        cur["started_at"] = started
        cur["elapsed_s"] = now - started if started else None
        cur["description"], cur["unchanged"] = self._description(n, started)
        points = tail.points() if tail is not None else []
        cur["points"] = [[round(100 * p, 3), v] for _, p, v in points]
        cur["step"] = points[-1][0] if points else None
        cur["progress"] = points[-1][1] if points else 0.0
        cur["loss"] = points[-1][2] if points else None
        last = _STEP_LINE.findall(tail.tail)[-1] if tail is not None and _STEP_LINE.search(tail.tail) else b""
        m = TOK_S.search(last)
        cur["tok_per_s"] = int(m[1].replace(b",", b"")) if m else None
        m = REMAINING.search(last)
        budget = page.budget(rows)
        if m:
            cur["time_left_s"], cur["time_left_from"] = float(m[1]), "the trainer's own count"
        elif budget and points:
            cur["time_left_s"], cur["time_left_from"] = budget * (1 - points[-1][1]), "budget x progress"
        else:
            cur["time_left_s"], cur["time_left_from"] = None, None
        cur["budget_s"] = budget
        cur["last_output_s"] = now - tail.mtime if tail is not None and tail.mtime else None
        blob = tail.tail if tail is not None else b""
        cur["phase"] = ("stopped early" if _STOPPED in blob else "scoring" if _HARNESS in blob else
                        "training" if points else "starting")
        best = self._best_curve(st)
        cur["best"] = best
        branch_rows = source.rows if source is not None else []
        cur["abort"] = self._abort(st, points, branch_rows) if not cur["unchanged"] else {
            "active": False, "why": "the kept trainer's own runs are never stopped early"}
        return cur

    def _description(self, n: int, started: float | None) -> tuple[str, bool]:
        """The change a run in progress tries: the subject of the commit the loop made for it (the
        description is in results.tsv only once the run ends). An empty diff: the kept trainer as it is."""
        try:
            diff, _ = self.read_run_file(n, "diff.patch", limit=4096)
        except Refused:
            return "(no diff.patch yet)", False
        if not diff.strip():
            return "the kept trainer, unchanged: a baseline run or a re-measurement of the best", True
        if n in self._subjects:
            return self._subjects[n], False
        subject = None
        if (self.root / ".git").exists():
            from research import gitrepo

            try:
                line = gitrepo.git(self.root, "log", "-1", "--format=%ct%x09%s", "HEAD", check=False)
                when, _, text = line.partition("\t")
                if text and started and int(when) >= int(started):  # made after the run's diff: its commit
                    subject = redact(text.strip())
            except (OSError, ValueError, gitrepo.GitError):
                subject = None
        if subject is None:
            return "(the description is recorded when the run ends; the diff shows the change)", False
        self._subjects = {n: subject}
        return subject, False

    def _best_curve(self, st) -> dict | None:
        runs = [r.run for r in page.best_runs(st) if r.run is not None]
        for n in reversed(runs):
            curve = self._curve(n)
            if curve:
                return {"run": n, "points": [[round(100 * p, 3), v] for _, p, v in curve]}
        return None

    def _abort(self, st, points: list, rows: list[Row]) -> dict:
        """The early-abort reference (the best's mean curve and the curve noise) and where the run stands."""
        from research.decisions import NBINS, curve_bins
        from research.ledger import abort_reference

        if st is None:
            return {"active": False, "why": "no best yet"}
        ref, why = abort_reference(st, rows, self.runs, self.early_abort)  # the loop's own reference
        if ref is None:
            return {"active": False, "why": why}
        scale = math.sqrt(1.0 + 1.0 / max(1, ref.curves))
        limits = [self.abort_z * s * scale if s else None for s in ref.sigma]
        threshold = [[round(100 * (b + 0.5) / NBINS, 3), m + lim] for b, (m, lim) in enumerate(zip(ref.mean, limits))
                     if m is not None and lim is not None and (b + 1) / NBINS >= self.abort_min_progress]
        out = {"active": True, "z": self.abort_z, "min_progress": self.abort_min_progress, "threshold": threshold,
               "margin": None, "at": None}
        if points:
            bins = curve_bins(points, NBINS)
            done = min(NBINS, int(points[-1][1] * NBINS))
            for b in range(done):
                if (b + 1) / NBINS < self.abort_min_progress or bins[b] is None or ref.mean[b] is None \
                        or limits[b] is None:
                    continue
                out["margin"] = limits[b] - (bins[b] - ref.mean[b])  # > 0: inside the threshold
                out["at"] = (b + 1) / NBINS
        return out

    # -- other machines ----------------------------------------------------------

    def _compare(self, source: Source | None) -> dict:
        from reporting import compare
        from reporting.summary import num

        sources, errors = ([source] if source is not None and source.rows else []), []
        for p in self.others:
            try:
                s = load_source(p)
            except ReportError as e:
                errors.append(str(e))
                continue
            if s.rows:
                sources.append(s)
            else:
                errors.append(f"{p} has no experiment yet.")
        out: dict = {"errors": errors, "sources": [], "hyperparams": [], "refused": None}
        if len(sources) < 2:
            return out
        try:
            compare._check_comparable(sources)
        except ReportError as e:
            out["refused"] = str(e)
            return out
        out["protocol"], out["evaluator"] = sources[0].protocol, sources[0].evaluator_hash
        bests = []
        for s, label in zip(sources, compare._labels(sources)):
            summ = summarize(s)
            best = summ.best[1] if summ.best else None
            bests.append(best)
            base = summ.baseline_bpb
            out["sources"].append({
                "label": label, "path": str(s.path), "backend": s.backend, "device": s.device,
                "best_bpb": summ.best_bpb, "baseline_bpb": base, "holdout_bpb": best.holdout_bpb if best else None,
                "gain_pct": 100 * (summ.best_bpb - base) / base if summ.best_bpb and base else None,
                "experiments": len(s.rows), "kept": len(summ.kept),
                "steps": best.num_steps if best else None, "mfu": best.mfu_percent if best else None,
                "memory_gb": best.memory_gb if best else None, "params_M": best.num_params_M if best else None,
                "tokens_M": num(compare._tokens_m(s, best)) if best else None,
                "commit": best.commit if best else "", "change": best.description if best else "",
                "running_best": [100 * (b - base) / base if b is not None and base else None
                                 for b in summ.running_best],
            })
        names = sorted({k for b in bests if b for k in b.hyperparams})
        from reporting.summary import value_text

        for name in names:
            values = [value_text(b.hyperparams[name]) if b and name in b.hyperparams else "—" for b in bests]
            out["hyperparams"].append({"name": name, "values": values, "differs": len(set(values)) > 1})
        return out
