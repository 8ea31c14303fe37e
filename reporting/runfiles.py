"""The files of a results folder's runs/ as the live page reads them (reporting/live.py): only from inside
runs/ (as resolved: a link leading out is refused), only regular files, only by run number and one of a
few names; a growing log followed incrementally (`LogTail`), finished runs' loss curves cached per file
state. Nothing here writes."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from data.steplog import STEP_LINE
from sandbox.secrets import redact

__all__ = ["Refused", "RunFiles", "LogTail", "Cached", "RUN_FILES", "MAX_JSON_BYTES", "screen_lines"]

RUN_FILES = {"diff": "diff.patch", "log": "log.txt", "confirm_log": "confirm_log.txt"}  # what a row opens
_READABLE = frozenset({*RUN_FILES.values(), "loss.json", "confirm_loss.json", "result.json", "meta.json"})
MAX_DIFF_CHARS = 200_000
LOG_TAIL_LINES = 150
LOG_TAIL_BYTES = 64_000
MAX_JSON_BYTES = 8_000_000
MAX_READ_PER_POLL = 16_000_000  # a huge log is caught up with over several polls
_RUN_NO = re.compile(r"[0-9]{1,9}")
_PENDING = re.compile(rb"^" + STEP_LINE.pattern + rb"\s*\|")  # a line still being drawn, its loss complete


class Refused(Exception):
    """A request the server will not answer: not a run number or file it serves (400), a path that
    leads outside runs/ or is not a regular file (403), or a file that is not there (404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------
# Reading runs/ safely
# ---------------------------------------------------------------------------


def _open_regular(path: Path) -> int:
    """An fd on `path` if it is a regular file (no FIFO or device can block or feed the server)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused(403, f"{path.name} is not a regular file")
    return fd


def _read_fd(fd: int, start: int, limit: int) -> bytes:
    chunks, left = [], limit
    while left > 0:
        chunk = os.pread(fd, min(left, 1 << 20), start)
        if not chunk:
            break
        chunks.append(chunk)
        start += len(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def screen_lines(text: str) -> list[str]:
    """Lines as a terminal shows them: of a line redrawn with carriage returns, the last drawing."""
    out = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        out.append(parts[-1].rstrip() if parts else "")
    return out


class LogTail:
    """A growing log read incrementally: its loss curve so far and its last few kilobytes."""

    def __init__(self) -> None:
        from research.decisions import LossCurve

        self.key: tuple[int, int] | None = None
        self.offset = 0
        self.curve = LossCurve()
        self.tail = b""
        self.mtime = 0.0

    def update(self, path: Path) -> None:
        from research.decisions import LossCurve

        fd = _open_regular(path)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key != self.key or st.st_size < self.offset:  # a new file, or one cut back: start over
                self.key, self.offset, self.curve, self.tail = key, 0, LossCurve(), b""
            data = _read_fd(fd, self.offset, min(st.st_size - self.offset, MAX_READ_PER_POLL))
        finally:
            os.close(fd)
        self.mtime = st.st_mtime
        if data:
            self.offset += len(data)
            self.curve.feed(data)
            self.tail = (self.tail + data)[-16384:]

    def points(self) -> list[tuple[int, float, float]]:
        """The curve so far, with the step line still being drawn (no line end yet, as in a terminal)
        once its loss is followed by the next field, so it was written whole."""
        pts = self.curve.snapshot()
        last = re.split(rb"[\r\n]", self.tail)[-1]
        m = _PENDING.search(last)
        if m:
            step, progress, loss = int(m[1]), float(m[2]) / 100.0, float(m[3])
            if 0.0 <= progress <= 1.0 and math.isfinite(loss) and (not pts or progress >= pts[-1][1]):
                pts.append((step, progress, loss))
        return pts


@dataclass
class Cached:
    key: tuple
    value: object

class RunFiles:
    """runs/<n>/ beside one results file, read safely (see the module's docstring)."""

    def __init__(self, results: str | Path) -> None:
        path = Path(results).absolute()
        self.results = path / "results.tsv" if path.is_dir() else path
        self.root = self.results.parent
        self.runs = self.root / "runs"
        self._curves: dict[Path, Cached] = {}

    def run_path(self, run: str | int, name: str) -> Path:
        """runs/<run>/<name>, resolved; Refused unless it stays inside runs/ (links followed)."""
        run = str(run)
        if not _RUN_NO.fullmatch(run):
            raise Refused(400, "a run is asked for by its number, as in runs/<n>")
        if name not in _READABLE:
            raise Refused(400, f"runs/<n>/ files served: {', '.join(sorted(_READABLE))}")
        try:
            base = self.runs.resolve(strict=True)
        except OSError:
            raise Refused(404, f"there is no runs/ folder beside {self.results.name} yet") from None
        real = (self.runs / run / name).resolve()
        if not real.is_relative_to(base) or real == base:
            raise Refused(403, f"runs/{run}/{name} leads outside runs/; refused")
        return real

    def read_run_file(self, run: str | int, name: str, *, tail: int | None = None, limit: int = MAX_DIFF_CHARS
                      ) -> tuple[str, bool]:
        """(text, cut): the file's first `limit` bytes, or its last `tail` bytes. Refused (404) if absent."""
        path = self.run_path(run, name)
        try:
            fd = _open_regular(path)
        except FileNotFoundError:
            raise Refused(404, f"runs/{run}/{name} does not exist") from None
        except OSError as e:
            raise Refused(403 if e.errno in (errno.ELOOP, errno.ENOTDIR) else 404,
                          f"runs/{run}/{name} cannot be read ({e.strerror})") from None
        try:
            size = os.fstat(fd).st_size
            if tail is not None:
                start = max(0, size - tail)
                data, cut = _read_fd(fd, start, size - start), start > 0
            else:
                data, cut = _read_fd(fd, 0, limit), size > limit
        finally:
            os.close(fd)
        return redact(data.decode("utf-8", errors="replace")), cut

    def run_text(self, run: str, kind: str) -> dict:
        """What a table row opens: its diff, or the tail of its log (or its confirm run's log)."""
        if kind not in RUN_FILES:
            raise Refused(400, f"a run's {kind!r} is not served; ask for one of {', '.join(RUN_FILES)}")
        name = RUN_FILES[kind]
        if kind == "diff":
            text, cut = self.read_run_file(run, name)
        else:
            text, cut = self.read_run_file(run, name, tail=LOG_TAIL_BYTES)
            lines = screen_lines(text)
            if cut:
                lines = lines[1:]  # the first line was cut in the middle
            cut = cut or len(lines) > LOG_TAIL_LINES
            text = "\n".join(lines[-LOG_TAIL_LINES:])
        return {"run": int(run), "kind": kind, "file": f"runs/{int(run)}/{name}", "text": text, "cut": cut}

    def _json(self, run: int, name: str) -> dict | None:
        try:
            text, cut = self.read_run_file(run, name, limit=MAX_JSON_BYTES)
            data = None if cut else json.loads(text)
        except (Refused, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def _curve(self, run: int, prefix: str = "") -> list | None:
        """A finished run's loss curve: runs/<n>/loss.json, else read from its log. Cached per file state."""
        try:
            from research.decisions import load_curve
        except ImportError:  # a loop without stored curves
            return None
        for name, kind in ((f"{prefix}loss.json", "json"), (f"{prefix}log.txt", "log")):
            try:
                path = self.run_path(run, name)
                st = path.stat()
            except (Refused, OSError):
                continue
            key = (st.st_mtime_ns, st.st_size)
            hit = self._curves.get(path)
            if hit is None or hit.key != key:
                if kind == "json":
                    curve = load_curve(path) if stat.S_ISREG(st.st_mode) and st.st_size < MAX_JSON_BYTES else None
                else:
                    t = LogTail()
                    try:
                        t.update(path)
                    except (Refused, OSError):
                        continue
                    curve = t.curve.snapshot() or None
                hit = self._curves[path] = Cached(key, curve)
            if hit.value:
                return hit.value
        return None

    def _run_numbers(self) -> list[int]:
        try:
            names = [e.name for e in os.scandir(self.runs) if _RUN_NO.fullmatch(e.name) and e.is_dir()]
        except OSError:
            return []
        return sorted(int(n) for n in names)

    def _exists(self, n: int, name: str) -> bool:
        try:
            return self.run_path(n, name).is_file()
        except Refused:
            return False

    def _mtime(self, n: int, name: str) -> float | None:
        try:
            return self.run_path(n, name).stat().st_mtime
        except (Refused, OSError):
            return None

    def _mtime_dir(self, n: int) -> float | None:
        try:
            return (self.runs / str(n)).stat().st_mtime
        except OSError:
            return None
