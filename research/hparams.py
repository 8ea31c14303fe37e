"""Read and rewrite the trainer's hyperparameter block.

The block sits between `# --- hyperparameters ---` and `# --- end hyperparameters ---`
and holds lines `NAME = value`, where a value is a constant expression (`0.04`, `2**16`,
`(0.8, 0.95)`, `"SSSL"`). Per-hardware baselines come in two styles, both understood:
a choice inside the line (`DEPTH = 4 if _METAL else 2`) and override blocks
(`if HARDWARE == "cpu":` followed by `DEPTH = 2`). Which line is in effect on this host
is decided by the truth of those conditions, found by `probe_conditions` (it imports the
trainer in a child process and evaluates them in the trainer's namespace); the edit then
goes to that line, so other hardware's baselines stay as they were.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path


__all__ = ["HyperparamError", "Setting", "Spot", "parse_block", "conditions", "in_effect", "effective_values",
           "set_values", "format_value", "probe_conditions", "static_values"]

_START = re.compile(r"^#\s*-+\s*hyperparameters\s*-+\s*$", re.IGNORECASE)
_END = re.compile(r"^#\s*-+\s*end hyperparameters\s*-+\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


class HyperparamError(ValueError):
    """The trainer has no readable hyperparameter block, or a value cannot be edited."""


@dataclass(frozen=True)
class Spot:
    """One editable constant: where it is, its value, and the conditions under which it applies."""

    line: int  # 0-based line index in the file
    start: int
    end: int
    value: object
    source: str
    conds: tuple[tuple[str, bool], ...] = ()  # (condition source, required truth), outermost first


@dataclass(frozen=True)
class Setting:
    """Every spot assigning NAME in the block, in file (execution) order."""

    name: str
    spots: tuple[Spot, ...]


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow, ast.FloorDiv: operator.floordiv}


def _const(node: ast.AST) -> object:
    """Value of a constant expression; raises ValueError for anything that is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _const(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _const(node.left), _const(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b)):
            if isinstance(node.op, ast.Pow) and abs(b) > 64:
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.Tuple):
        return tuple(_const(e) for e in node.elts)
    raise ValueError("not a constant")


def _block_lines(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if _START.match(line.strip())), None)
    if start is None:
        raise HyperparamError("the trainer has no '# --- hyperparameters ---' block")
    end = next((i for i in range(start + 1, len(lines)) if _END.match(lines[i].strip())), None)
    if end is None:
        raise HyperparamError("the hyperparameter block has no '# --- end hyperparameters ---' line")
    return start, end


def parse_block(text: str) -> dict[str, Setting]:
    """Every NAME assigned a constant in the hyperparameter block (at top level or under `if`)."""
    start, end = _block_lines(text)
    lines = text.split("\n")
    body = "\n".join(lines[start + 1 : end])
    try:
        tree = ast.parse(body)
    except SyntaxError as e:
        raise HyperparamError(f"the hyperparameter block does not parse: {e.msg}") from e
    found: dict[str, list[Spot]] = {}
    blocked: set[str] = set()  # names also assigned something we cannot edit

    def spot(node: ast.AST, conds) -> Spot | None:
        if node.lineno != node.end_lineno:
            return None
        try:
            value = _const(node)
        except (ValueError, ArithmeticError):
            return None
        line = start + node.lineno  # body line k (1-based) is file line start + k
        return Spot(line, node.col_offset, node.end_col_offset, value, lines[line][node.col_offset:node.end_col_offset],
                    conds)

    def visit(stmts, conds):
        for node in stmts:
            if isinstance(node, ast.If):
                test = ast.get_source_segment(body, node.test) or ""
                visit(node.body, conds + ((test, True),))
                visit(node.orelse, conds + ((test, False),))
                continue
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                continue
            name = node.targets[0].id
            if not _NAME.match(name):
                continue
            v = node.value
            if isinstance(v, ast.IfExp):
                test = ast.get_source_segment(body, v.test) or ""
                parts = [spot(v.body, conds + ((test, True),)), spot(v.orelse, conds + ((test, False),))]
            else:
                parts = [spot(v, conds)]
            if any(p is None for p in parts):
                blocked.add(name)
            else:
                found.setdefault(name, []).extend(parts)

    visit(tree.body, ())
    return {n: Setting(n, tuple(s)) for n, s in found.items() if n not in blocked}


def conditions(settings: dict[str, Setting]) -> list[str]:
    """Every distinct condition the spots depend on."""
    seen: dict[str, None] = {}
    for s in settings.values():
        for spot in s.spots:
            for c, _ in spot.conds:
                seen.setdefault(c, None)
    return list(seen)


def in_effect(setting: Setting, truth: dict[str, bool]) -> Spot | None:
    """The spot that sets the value on this host: the last one whose conditions all hold."""
    last = None
    for spot in setting.spots:
        if all(c in truth and truth[c] == want for c, want in spot.conds):
            last = spot
        elif any(c not in truth for c, _ in spot.conds):
            return None  # cannot tell
    return last


def effective_values(settings: dict[str, Setting], truth: dict[str, bool]) -> dict[str, object]:
    """NAME -> value in effect on this host (names whose spot cannot be told are left out)."""
    out = {}
    for name, s in settings.items():
        spot = in_effect(s, truth)
        if spot is not None:
            out[name] = spot.value
    return out


def static_values(text: str) -> dict[str, object]:
    """Values that apply whatever the host (names set exactly once, unconditionally)."""
    return {n: s.spots[0].value for n, s in parse_block(text).items() if len(s.spots) == 1 and not s.spots[0].conds}


def format_value(value: object, like: str = "") -> str:
    """Python source for `value`, in the style of `like` (e.g. keeps `2**k` for powers of two)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if re.fullmatch(r"\s*2\s*\*\*\s*\d+\s*", like) and value > 0 and value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HyperparamError("cannot write a non-finite number")
        s = repr(value)  # shortest exact form: a value carried between machines must not change
        return s if any(c in s for c in ".en") else s + ".0"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(format_value(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    raise HyperparamError(f"cannot write a {type(value).__name__} into the hyperparameter block")


def set_values(text: str, changes: dict[str, object], truth: dict[str, bool]) -> str:
    """The trainer text with each NAME in `changes` set to its new value on the line in effect here."""
    settings = parse_block(text)
    lines = text.split("\n")
    edits = []
    for name, new in changes.items():
        setting = settings.get(name)
        if setting is None:
            raise HyperparamError(f"{name} is not an editable constant in the hyperparameter block")
        spot = in_effect(setting, truth)
        if spot is None:
            raise HyperparamError(f"cannot tell which line sets {name} on this host")
        edits.append((spot, format_value(new, spot.source)))
    for spot, src in sorted(edits, key=lambda e: (e[0].line, -e[0].start)):
        line = lines[spot.line]
        lines[spot.line] = line[: spot.start] + src + line[spot.end :]
    return "\n".join(lines)


_PROBE = """
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # the trainer imports the repo's modules beside it
spec = importlib.util.spec_from_file_location("_trainer_probe", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
ns = vars(mod)
print("\\n@@PROBE@@" + json.dumps({c: bool(eval(c, ns)) for c in json.loads(sys.argv[2])}))
"""


def probe_conditions(trainer_path: Path, conds: list[str], run_python, timeout_s: float = 120.0) -> dict[str, bool]:
    """Truth of each condition on this host, evaluated in the trainer's namespace after importing it
    (without training). The trainer is agent code: `run_python(args, timeout_s)` runs `python args` in
    the trainer's sandbox (research.workspace.Confinement.run_python) and returns the completed process.
    Raises HyperparamError if that fails."""
    if not conds:
        return {}
    trainer_path = Path(trainer_path)
    try:
        proc = run_python(["-I", "-c", _PROBE, str(trainer_path), json.dumps(conds)], timeout_s)
    except subprocess.TimeoutExpired:
        raise HyperparamError(f"importing {trainer_path.name} to read its hardware conditions took over {timeout_s:.0f} s")
    marker = proc.stdout.rfind("@@PROBE@@")
    if proc.returncode != 0 or marker < 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HyperparamError(f"importing {trainer_path.name} to read its hardware conditions failed: {tail[0]}")
    return json.loads(proc.stdout[marker + len("@@PROBE@@"):].strip().splitlines()[0])
