"""The errors a research command reports to its user: one sentence and what to do."""

from __future__ import annotations

__all__ = ["SessionError", "TamperError"]


class SessionError(RuntimeError):
    """Something the user must fix before the loop can run (message is one sentence + what to do)."""


class TamperError(SessionError):
    """A locked file changed during the session; the loop stops."""
