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

from data.block import END, START

__all__ = ["HyperparamError", "Setting", "Spot", "SourceValues", "parse_block", "conditions", "in_effect",
           "effective_values", "flatten", "layout_key", "set_values", "format_value", "probe_conditions",
           "static_truth", "static_values"]

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
    start = next((i for i, line in enumerate(lines) if START.match(line.strip())), None)
    if start is None:
        raise HyperparamError("the trainer has no '# --- hyperparameters ---' block")
    end = next((i for i in range(start + 1, len(lines)) if END.match(lines[i].strip())), None)
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


def flatten(text: str, truth: dict[str, bool]) -> str | None:
    """The trainer with its hyperparameter block as one line per value in effect on this host: each name once,
    in the block's order, set to the value of its line in effect (`truth`: the conditions' truth here), with
    that line's comment; the hardware conditions and the block's own comment lines gone, a header saying so.
    None when there is nothing to flatten (no conditions) or it cannot be done faithfully: a condition whose
    truth is unknown, or a block holding anything but constant assignments and `if` blocks of them."""
    settings = parse_block(text)
    conds = conditions(settings)
    if not conds or any(c not in truth for c in conds):
        return None
    start, end = _block_lines(text)
    lines = text.split("\n")
    tree = ast.parse("\n".join(lines[start + 1 : end]))

    def plain(stmts) -> list[ast.Assign] | None:  # the assignments, in order; None if anything else is there
        out = []
        for node in stmts:
            if isinstance(node, ast.If):
                inner = [plain(node.body), plain(node.orelse)]
                if any(x is None for x in inner):
                    return None
                out += inner[0] + inner[1]
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and node.targets[0].id in settings and node.lineno == node.end_lineno):
                out.append(node)
            else:
                return None
        return out

    assigns = plain(tree.body)
    if assigns is None:
        return None
    held = [c for c in conds if truth[c]]
    block = [lines[start], f"# This host's values ({' and '.join(held) or 'no hardware condition holds'}), one line each: the "
             "branch's first commit wrote them", "# from the trainer's per-hardware baselines. Edit the line here."]
    written: set[str] = set()
    for node in assigns:
        name = node.targets[0].id
        if name in written:
            continue
        written.add(name)
        spot = in_effect(settings[name], truth)
        if spot is None:
            continue  # set only under conditions that do not hold here: not set on this host
        own = next((n for n in assigns if n.targets[0].id == name and start + n.lineno == spot.line), node)
        comment = next((c for c in (lines[start + n.lineno][n.end_col_offset:].strip() for n in (own, node))
                        if c.startswith("#")), "")
        block.append(f"{name} = {spot.source}" + (f"  {comment}" if comment else ""))
    return "\n".join(lines[:start] + block + lines[end:])


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
    the trainer's sandbox (sandbox.workspace.Confinement.run_python) and returns the completed process.
    Raises HyperparamError if that fails."""
    if not conds:
        return {}
    trainer_path = Path(trainer_path)
    try:
        proc = run_python(["-I", "-c", _PROBE, str(trainer_path), json.dumps(conds)], timeout_s)
    except subprocess.TimeoutExpired:
        raise HyperparamError(f"importing {trainer_path.name} to read its hardware conditions took over {timeout_s:.0f} s") from None
    marker = proc.stdout.rfind("@@PROBE@@")
    if proc.returncode != 0 or marker < 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise HyperparamError(f"importing {trainer_path.name} to read its hardware conditions failed: {tail[0]}")
    return json.loads(proc.stdout[marker + len("@@PROBE@@"):].strip().splitlines()[0])


def layout_key(text: str, settings: dict[str, Setting]) -> str:
    """Hash of the trainer with every editable value blanked: versions that differ only in values share it
    (and so share the truth of their hardware conditions)."""
    import hashlib

    layout = text
    for s in sorted((sp for st in settings.values() for sp in st.spots), key=lambda sp: (-sp.line, -sp.start)):
        lines = layout.split("\n")
        lines[s.line] = lines[s.line][: s.start] + "_" + lines[s.line][s.end :]
        layout = "\n".join(lines)
    return hashlib.sha256(layout.encode("utf-8")).hexdigest()[:12]


# Anything that can rebind a module's names behind the back of its assignments: a trainer that uses one
# has its conditions probed instead of read.
_DYNAMIC = {"globals", "vars", "locals", "exec", "eval", "setattr", "delattr", "__import__", "compile"}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
           ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}


def _fixed_names(tree: ast.Module, before_line: int) -> dict[str, object] | None:
    """Names the module binds exactly once, by a top-level `NAME = <constant>` above `before_line` (1-based),
    with their values; None when the module could rebind names dynamically (globals(), exec, a star import...)."""
    bindings: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DYNAMIC:
            return None
        if isinstance(node, ast.Attribute) and node.attr == "__dict__":
            return None
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return None
        names: list[str] = []
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            names = [node.id]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [(a.asname or a.name).split(".")[0] for a in node.names]
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names = list(node.names) * 2  # a function rebinding a module name: never fixed
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names = [node.name]
        for n in names:
            bindings[n] = bindings.get(n, 0) + 1
    out: dict[str, object] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.lineno < before_line and bindings.get(node.targets[0].id) == 1):
            try:
                out[node.targets[0].id] = _const(node.value)
            except (ValueError, ArithmeticError):
                pass
    return out


def _eval_condition(node: ast.AST, names: dict[str, object]) -> object:
    """Value of a condition made of fixed names, constants, comparisons, `and`/`or`/`not`; ValueError otherwise."""
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        raise ValueError(f"{node.id} is not fixed")
    if isinstance(node, ast.BoolOp):
        values = [_eval_condition(v, names) for v in node.values]
        if isinstance(node.op, ast.And):
            return all(values)
        return any(values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval_condition(node.operand, names)
    if isinstance(node, ast.Compare) and all(type(op) in _CMPOPS for op in node.ops):
        left = _eval_condition(node.left, names)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval_condition(right_node, names)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return tuple(_eval_condition(e, names) for e in node.elts)
    return _const(node)


def static_truth(text: str, conds: list[str]) -> dict[str, bool]:
    """The conditions that can be read from the source alone: those made only of names the trainer binds once,
    to a constant, above its hyperparameter block (`HARDWARE = "cpu"` ... `if HARDWARE == "cpu":`). The
    others (a name set from the detected hardware, say) are left out: probe_conditions decides them."""
    if not conds:
        return {}
    try:
        tree = ast.parse(text)
        start, _ = _block_lines(text)
    except (SyntaxError, HyperparamError):
        return {}
    fixed = _fixed_names(tree, start + 1)
    if fixed is None:
        return {}
    out = {}
    for c in conds:
        try:
            out[c] = bool(_eval_condition(ast.parse(c, mode="eval").body, fixed))
        except (SyntaxError, ValueError, TypeError, ArithmeticError):
            continue
    return out


class SourceValues:
    """The hyperparameters a trainer's source sets on this host: its block's values, on the lines whose hardware
    conditions hold here. The loop records these for every run (never what the trainer says it ran with).

    The truth of the conditions is read from the source where it can be (static_truth), else probed once per
    trainer layout (layout_key: versions that differ only in values share it) by importing the trainer inside
    its sandbox (probe_conditions). A probe needs the trainer's file: `values(text, confine)` probes when
    `confine`'s trainer file holds exactly `text`; without a probe, names set under an undecided condition
    are left out."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self._truth: dict[str, dict[str, bool]] = {}
        self.timeout_s = timeout_s
        self.failures: list[str] = []  # why a probe failed (one line each), for whoever wants to say so

    def values(self, text: str, confine=None) -> dict[str, object]:
        """NAME -> value in effect on this host, from the trainer source `text` ({} when it has no block)."""
        try:
            settings = parse_block(text)
        except HyperparamError:
            return {}
        return effective_values(settings, self.truth(text, settings, confine))

    def truth(self, text: str, settings: dict[str, Setting], confine=None) -> dict[str, bool]:
        conds = conditions(settings)
        if not conds:
            return {}
        key = layout_key(text, settings)
        known = self._truth.get(key)
        if known is not None:
            return known
        truth = static_truth(text, conds)
        if len(truth) < len(conds) and confine is not None:
            path = Path(confine.repo) / confine.trainer
            try:
                same = path.read_text(encoding="utf-8") == text
            except (OSError, UnicodeDecodeError):
                same = False
            if not same:
                return truth  # not this text in the file (yet): decide later, nothing cached
            try:
                truth = {**probe_conditions(path, [c for c in conds if c not in truth], confine.run_python,
                                            self.timeout_s), **truth}
            except HyperparamError as e:
                self.failures.append(str(e))
        elif len(truth) < len(conds):
            return truth  # no probe possible now: not cached, a later call with a confinement may decide
        self._truth[key] = truth
        return truth
