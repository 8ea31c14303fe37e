"""Load and check the model graph a trainer handed over (locked; imports no agent code).

A trainer hands over a pure forward for one fixed batch shape (tokens (B, T) -> logits (B, T, V)):
- PyTorch: a `torch.export` ExportedProgram saved as `model.pt2`;
- MLX: an `mx.export_function` file `model.mlxfn`;
plus `facts.json` (its own account of the run, informational only).

A graph is refused (GraphError, one sentence on what the harness needs) when it cannot be loaded,
does not map (B, T) integer tokens to (B, T, vocab) logits, keeps state it writes between calls,
calls anything but plain tensor operators (Python callbacks, custom or I/O operators such as
`aten::from_file`) or draws random numbers. The harness then runs the first batch twice and
requires the same logits, so state hidden any other way is caught too.

Loading itself runs none of the trainer's code: torch.export.load would unpickle parts of model.pt2
(sample inputs, retried with weights_only=False; weights and constants marked as pickled; script and
opaque objects), evaluate shape expressions with sympy.sympify and load AOTInductor libraries, so
`_load_pt2` allows only weights_only unpickling and refuses the rest (a fixed-shape forward needs none).
"""

from __future__ import annotations

import json
import operator
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["GraphError", "LoadedGraph", "GRAPH_FILES", "FACTS_FILE", "load_graph", "read_facts", "plain_file",
           "torch_op_problem", "warm_imports"]

GRAPH_FILES = {"torch": "model.pt2", "mlx": "model.mlxfn"}
FACTS_FILE = "facts.json"
MAX_FACTS_BYTES = 1 << 20

# Operators a pure forward never needs: reading files, randomness, printing, host callbacks.
_TORCH_DENIED = ("from_file", "rand", "bernoulli", "multinomial", "normal", "uniform", "exponential", "geometric",
                 "cauchy", "log_normal", "poisson", "dropout", "_print", "save", "load", "_local_scalar_dense")
_TORCH_NAMESPACES = ("aten", "prims")
_TORCH_HIGHER_ORDER = ("wrap_with_autocast", "wrap_with_set_grad_enabled")
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


def torch_op_problem(target: Any) -> str | None:
    """Why a graph node's call target is not allowed in a scored graph, or None when it is fine."""
    import torch

    if target is operator.getitem:
        return None
    if isinstance(target, torch._ops.HigherOrderOperator):
        return None if target.name() in _TORCH_HIGHER_ORDER else f"the higher-order operator {target.name()}"
    if not isinstance(target, torch._ops.OpOverload):
        return f"the Python callable {getattr(target, '__qualname__', repr(target))}"
    name = target.name()  # e.g. "aten::linear" or "aten::linear.default"
    namespace, _, op = name.partition("::")
    base = op.split(".")[0]
    if namespace not in _TORCH_NAMESPACES:
        return f"the custom operator {name}"
    if any(base.startswith(d) or base.endswith("_" + d) for d in _TORCH_DENIED):
        return f"the operator {name} (file access or randomness)"
    if target._schema.is_mutable:
        return f"the operator {name}, which writes to its inputs"
    return None


def _load_pt2(path: Path):
    """torch.export.load(path) with every way the archive could run code closed (see the module docstring):
    torch.load only with weights_only=True, no pickle.loads, no script objects, no AOTInductor library, no
    sympy-parsed shape expression. Raises GraphError for an archive that needs any of them."""
    import pickle

    import torch
    from torch._export.serde import serialize
    from torch.export.pt2_archive import _package

    def refuse(what: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise GraphError(f"model.pt2 holds {what}, which the harness does not load; hand over a plain "
                             "fixed-shape forward with prepare.hand_over")
        return refused

    load = torch.load

    def weights_only(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return load(*args, **kwargs)
        except pickle.UnpicklingError:
            refuse("pickled objects other than tensors")()

    patches = [(torch, "load", weights_only), (pickle, "loads", refuse("pickled objects")),
               (torch._C, "_pickle_load_obj", refuse("script objects")),
               (_package, "_load_aoti", refuse("compiled AOTInductor code")),
               (serialize.GraphModuleDeserializer, "_parse_sym_expr", refuse("symbolic shape expressions"))]
    missing = [name for owner, name, _ in patches if not hasattr(owner, name)]
    if missing:  # torch changed how it loads archives: better no score than an unguarded load
        raise GraphError(f"the harness cannot load model.pt2 safely with torch {torch.__version__} (no "
                         f"{', '.join(missing)}); judge/graphs.py must be updated for it")
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        return torch.export.load(str(path))
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _load_torch(path: Path, expect_T: int) -> LoadedGraph:
    import torch
    from torch.export.graph_signature import InputKind, OutputKind

    from backends import detect, torch_rt

    try:
        ep = _load_pt2(path)
    except GraphError:
        raise
    except Exception as e:  # noqa: BLE001 - any load failure is the trainer's hand-over
        raise GraphError(f"model.pt2 is not a loadable torch.export program ({type(e).__name__}: {e})") from None
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise GraphError("the exported forward writes its own buffers or inputs (state that changes between calls); "
                         "hand over a pure forward")
    users = [s for s in sig.input_specs if s.kind == InputKind.USER_INPUT]
    outs = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(users) != 1 or len(outs) != 1:
        raise GraphError(f"the exported forward takes {len(users)} inputs and returns {len(outs)} outputs; it must map "
                         "one token tensor (B, T) to one logits tensor (B, T, vocab)")
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op == "call_function":
                problem = torch_op_problem(node.target)
                if problem:
                    raise GraphError(f"the exported forward calls {problem}; a scored model may only use tensor "
                                     "operators (no I/O, randomness or Python callbacks)")
            elif node.op in ("call_method", "call_module"):
                raise GraphError(f"the exported forward has a {node.op} node ({node.target}); export with torch.export")
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == users[0].arg.name)
    val = placeholder.meta.get("val")
    shape = tuple(int(d) for d in getattr(val, "shape", ()))
    dtype = getattr(val, "dtype", None)
    if len(shape) != 2 or dtype not in (torch.int32, torch.int64):
        raise GraphError(f"the exported forward's input is {dtype} of shape {shape}; it must be integer tokens (B, T)")
    if shape[1] != expect_T:
        raise GraphError(f"the exported forward takes sequences of {shape[1]} tokens; the protocol scores {expect_T}")
    host = detect()
    module = ep.module()
    adapter = torch_rt.eval_adapter(host)

    @torch.no_grad()
    def forward(x):
        return module(x.to(dtype))

    return LoadedGraph("torch", forward, adapter, shape[0], shape[1], path.stat().st_size)


def _load_mlx(path: Path, expect_T: int, facts: dict) -> LoadedGraph:
    import mlx.core as mx

    from backends import mlx_rt

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

    return LoadedGraph("mlx", forward, mlx_rt.eval_adapter(), B, expect_T, len(data))


def warm_imports(backend: str) -> None:
    """Import what loading a graph of `backend`'s framework needs (a second or two for torch.export's
    deserializer), so a harness started ahead of the hand-over has it ready. Loads nothing."""
    if backend == "mlx":
        import mlx.core  # noqa: F401

        from backends import mlx_rt  # noqa: F401
    else:
        import torch  # noqa: F401
        from torch._export.serde import serialize  # noqa: F401
        from torch.export.pt2_archive import _package  # noqa: F401

        from backends import torch_rt  # noqa: F401


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
