"""Load and check the model graph a trainer handed over (locked; imports no agent code).

A trainer hands over a pure forward for one fixed batch shape (tokens (B, T) -> logits (B, T, V)):
- PyTorch: a `torch.export` ExportedProgram saved as `model.pt2`;
- MLX: an `mx.export_function` file `model.mlxfn`;
plus `facts.json` (its own account of the run, informational only).

A graph is refused (GraphError, one sentence on what the harness needs) when it cannot be loaded,
does not map (B, T) integer tokens to (B, T, vocab) logits, keeps state it writes between calls,
calls anything but the allow-listed functional tensor operators (no I/O such as `aten::from_file`,
no randomness, no Python callbacks or custom operators). The harness then runs the first batch twice
and requires the same logits, so state hidden any other way is caught too.

The hand-over is data, never code. model.pt2 is never given to torch.export.load (which unpickles
parts of the archive, parses shape expressions with sympy and has torch.fx generate and exec Python
source from names in the archive): judge/pt2.py reads it with zipfile and json, builds the weights
from raw bytes and runs the graph by walking its nodes, each target looked up in a fixed table.
model.mlxfn is parsed by MLX's own native importer (mx.import_function), which builds a graph of MLX
primitives and runs no Python; a file it cannot parse, one that makes it fail or allocate past the
harness's limits, and any primitive that reads files are refused or end the harness unscored.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["GraphError", "LoadedGraph", "GRAPH_FILES", "FACTS_FILE", "load_graph", "read_facts", "plain_file",
           "warm_imports"]

GRAPH_FILES = {"torch": "model.pt2", "mlx": "model.mlxfn"}
FACTS_FILE = "facts.json"
MAX_FACTS_BYTES = 1 << 20

_MLX_DENIED = (b"Load",)  # reads from a file at evaluation time


class GraphError(Exception):
    """The handed-over graph cannot be scored; the message says what the harness needs."""


@dataclass
class LoadedGraph:
    framework: str  # torch | mlx
    forward: Callable[[Any], Any]  # device tokens (B, T) -> logits (B, T, V)
    adapter: Any  # backends.*_rt eval adapter: to_input, nats, to_numpy
    batch_size: int
    seq_len: int
    nbytes: int


def plain_file(path: Path) -> bool:
    """True for a regular file that is not a symbolic link: what a trainer left is opened only then
    (a link could point anywhere the reader may read, a FIFO would block it)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_facts(handover: Path) -> dict:
    """The trainer's own account of its run (steps, tokens, memory...); {} when missing or unreadable."""
    path = Path(handover) / FACTS_FILE
    try:
        if not plain_file(path) or path.stat().st_size > MAX_FACTS_BYTES:
            return {}
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            data = json.loads(f.read(MAX_FACTS_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _load_torch(path: Path, expect_T: int) -> LoadedGraph:
    """model.pt2 read as data and run by judge/pt2.py's interpreter: no torch.export.load, no fx code."""
    from backends import detect, torch_rt
    from judge.pt2 import ArchiveError, read_program
    from judge.torch_adapter import eval_adapter

    host = detect()
    try:
        program = read_program(path, torch_rt.device(host))
    except ArchiveError as e:
        raise GraphError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - e.g. weights too large for this machine: the trainer's hand-over
        raise GraphError(f"model.pt2 could not be read ({type(e).__name__}: {str(e)[:200]})") from None
    shape = program.input_shape
    if len(shape) != 2:
        raise GraphError(f"the exported forward's input has shape {shape}; it must be integer tokens (B, T)")
    if shape[1] != expect_T:
        raise GraphError(f"the exported forward takes sequences of {shape[1]} tokens; the protocol scores {expect_T}")
    if not 0 < shape[0] <= 1 << 16:
        raise GraphError(f"the exported forward takes batches of {shape[0]} rows; export it for 1 to 65536")

    # the program runs under inference mode itself
    return LoadedGraph("torch", program, eval_adapter(host), shape[0], shape[1], path.stat().st_size)


def _load_mlx(path: Path, expect_T: int, facts: dict) -> LoadedGraph:
    import mlx.core as mx

    from judge.mlx_adapter import eval_adapter

    data = path.read_bytes()
    for name in _MLX_DENIED:
        if struct.pack("<Q", len(name)) + name in data:
            raise GraphError(f"the exported function uses the {name.decode()} primitive (file access); "
                             "a scored model may only use array operations")
    try:
        fn = mx.import_function(str(path))
    except Exception as e:  # noqa: BLE001
        raise GraphError(f"model.mlxfn is not a loadable mx.export_function file ({e})") from None
    graph = facts.get("graph") if isinstance(facts.get("graph"), dict) else {}
    B = graph.get("batch_size")
    if not isinstance(B, int) or not 0 < B <= 1 << 16:
        raise GraphError("facts.json does not give the exported function's batch size (graph.batch_size)")

    def forward(x):
        out = fn(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    return LoadedGraph("mlx", forward, eval_adapter(), B, expect_T, len(data))


def warm_imports(backend: str) -> None:
    """Import what loading a graph of `backend`'s framework needs (a second or two for torch.export's
    deserializer), so a harness started ahead of the hand-over has it ready. Loads nothing."""
    if backend == "mlx":
        import mlx.core  # noqa: F401

        from judge import mlx_adapter  # noqa: F401
    else:
        import torch  # noqa: F401

        from judge import pt2, torch_adapter  # noqa: F401


def load_graph(handover: Path, seq_len: int, vocab_size: int) -> LoadedGraph:
    """Load the one graph in `handover` and check its shape contract on a batch of zeros."""
    handover = Path(handover)
    found = [(fw, handover / name) for fw, name in GRAPH_FILES.items() if os.path.lexists(handover / name)]
    for _, path in found:
        if not plain_file(path):
            raise GraphError(f"{path.name} is not a regular file (a link or a device); hand over the file itself")
    if len(found) != 1:
        what = "no model" if not found else "two models"
        raise GraphError(f"the trainer handed over {what}; it must end with prepare.hand_over(...), which writes "
                         f"one of {', '.join(GRAPH_FILES.values())}")
    framework, path = found[0]
    g = _load_torch(path, seq_len) if framework == "torch" else _load_mlx(path, seq_len, read_facts(handover))
    try:
        logits = g.forward(g.adapter.to_input(np.zeros((g.batch_size, seq_len), dtype=np.int32)))
        shape = tuple(int(d) for d in logits.shape)
    except Exception as e:  # noqa: BLE001 - a graph that cannot run on its own declared shape
        raise GraphError(f"the handed-over graph fails on a ({g.batch_size}, {seq_len}) batch of tokens "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if shape != (g.batch_size, seq_len, vocab_size):
        raise GraphError(f"the handed-over graph returns shape {shape}; logits must be "
                         f"({g.batch_size}, {seq_len}, {vocab_size})")
    return g
