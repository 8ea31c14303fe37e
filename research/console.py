"""Terminal output: event lines, plus one self-updating status line when stdout is a terminal."""

from __future__ import annotations

import shutil
import sys
from typing import TextIO

from sandbox.secrets import redact

__all__ = ["Console", "clock"]


def clock(seconds: float) -> str:
    """`75.4` -> `1:15`."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Console:
    """`event()` prints a permanent line; `status()` redraws the live line (TTY only, else nothing)."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.quiet = quiet
        self._live = False

    def event(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        print(redact(text), file=self.stream, flush=True)

    def status(self, text: str) -> None:
        if self.quiet or not self.tty:
            return
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        self.stream.write("\r" + redact(text)[:width] + "\x1b[K")
        self.stream.flush()
        self._live = True

    def _clear(self) -> None:
        if self._live:
            self.stream.write("\r\x1b[K")
            self._live = False
