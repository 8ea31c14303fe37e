"""The trainer's hyperparameter block (locked): the lines between `# --- hyperparameters ---` and
`# --- end hyperparameters ---`, where each value is one constant on one line. The loop reads and edits
the block in the trainer's source (research/hparams.py, with these markers); a trainer reports the values
in effect through `prepare.hyperparameters(globals())`, so the list of names is the block itself and never
kept by hand."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["START", "END", "block_names", "hyperparameters"]

START = re.compile(r"^#\s*-+\s*hyperparameters\s*-+\s*$", re.IGNORECASE)
END = re.compile(r"^#\s*-+\s*end hyperparameters\s*-+\s*$", re.IGNORECASE)
_ASSIGN = re.compile(r"^\s*([A-Z][A-Z0-9_]*)\s*=")


def block_names(text: str) -> list[str]:
    """The names assigned in the block, in order of first appearance ([] without a block)."""
    names: list[str] = []
    inside = False
    for line in text.split("\n"):
        if not inside:
            inside = bool(START.match(line.strip()))
            continue
        if END.match(line.strip()):
            break
        m = _ASSIGN.match(line)
        if m and m[1] not in names:
            names.append(m[1])
    return names


def hyperparameters(namespace: dict) -> dict[str, object]:
    """The values in effect of the block's names, read from a trainer's `globals()` (tuples as lists, so the
    summary's JSON line says what the source says)."""
    text = Path(namespace["__file__"]).read_text(encoding="utf-8")
    values = {name: namespace[name] for name in block_names(text) if name in namespace}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}
