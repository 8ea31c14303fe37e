"""A torch.export archive (model.pt2) read as data and run by interpretation (locked).

The trainer writes model.pt2 inside its sandbox, so every byte of it is the trainer's. torch.export.load
would turn parts of it into Python: torch.fx generates the source of a `forward` from the graph's node,
argument and subgraph names and `exec`s it, and other parts are unpickled or parsed by sympy. None of
that runs here. This module:

- opens the zip with the standard library, and only an archive whose members are all stored
  uncompressed (so nothing inflates past the file's own size), under one top folder, with the
  files torch.export writes;
- parses `models/<name>.json` with `json` and checks it against what a fixed-shape forward needs:
  one integer token input, one output, parameters, buffers and constants by name, no symbolic shapes,
  no script or opaque objects, no mutation of inputs or buffers;
- builds every weight and constant from its raw bytes (`use_pickle` refused) with its dtype, sizes
  and strides checked against the bytes it has;
- checks every node's target against ALLOWED, a fixed table of functional ATen operators (no I/O,
  randomness, in-place or `out=` variants, unchecked indexing, uninitialised memory), plus the two
  higher-order regions torch.export records (autocast and grad mode), whose subgraphs are checked
  the same way;
- runs the graph by walking its nodes in order: each target is looked up in ALLOWED and called with
  the decoded arguments; names only key a dict, so no string of the archive ever becomes code.

Devices recorded in the archive are ignored: everything runs on the harness's device.
Anything that does not fit raises ArchiveError with one sentence saying what the harness needs.
"""

from __future__ import annotations

import json
import math
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ALLOWED", "ArchiveError", "Program", "plain_tensor_pickle", "read_program"]

MAX_JSON_BYTES = 256 << 20  # a graph description larger than this is not a GPT forward
MAX_NODES = 200_000
MAX_DIMS = 8

# Functional ATen operators a scored forward may call: name -> overloads. Everything else is refused.
ALLOWED: dict[str, tuple[str, ...]] = {
    # arithmetic and elementwise functions
    "add": ("Tensor", "Scalar"), "sub": ("Tensor", "Scalar"), "rsub": ("Tensor", "Scalar"),
    "mul": ("Tensor", "Scalar"), "div": ("Tensor", "Scalar", "Tensor_mode", "Scalar_mode"),
    "neg": ("default",), "abs": ("default",), "sign": ("default",), "reciprocal": ("default",),
    "pow": ("Tensor_Scalar", "Tensor_Tensor", "Scalar"), "square": ("default",), "sqrt": ("default",),
    "rsqrt": ("default",), "exp": ("default",), "exp2": ("default",), "expm1": ("default",), "log": ("default",),
    "log1p": ("default",), "log2": ("default",), "sin": ("default",), "cos": ("default",), "tan": ("default",),
    "atan": ("default",), "tanh": ("default",), "sigmoid": ("default",), "erf": ("default",),
    "floor": ("default",), "ceil": ("default",), "round": ("default",), "trunc": ("default",),
    "fmod": ("Tensor", "Scalar"), "remainder": ("Tensor", "Scalar"),
    "relu": ("default",), "gelu": ("default",), "silu": ("default",), "mish": ("default",),
    "softplus": ("default",), "leaky_relu": ("default",), "elu": ("default",), "hardtanh": ("default",),
    "hardswish": ("default",), "hardsigmoid": ("default",), "logit": ("default",),
    "clamp": ("default", "Tensor"), "clamp_min": ("default", "Tensor"), "clamp_max": ("default", "Tensor"),
    "minimum": ("default",), "maximum": ("default",), "lerp": ("Scalar", "Tensor"),
    "addcmul": ("default",), "addcdiv": ("default",),
    "where": ("self", "ScalarOther", "ScalarSelf", "Scalar"),
    "masked_fill": ("Scalar", "Tensor"),
    # comparisons and logic
    "eq": ("Tensor", "Scalar"), "ne": ("Tensor", "Scalar"), "lt": ("Tensor", "Scalar"), "le": ("Tensor", "Scalar"),
    "gt": ("Tensor", "Scalar"), "ge": ("Tensor", "Scalar"), "isnan": ("default",), "isinf": ("default",),
    "logical_and": ("default",), "logical_or": ("default",), "logical_not": ("default",),
    "logical_xor": ("default",), "bitwise_and": ("Tensor", "Scalar"), "bitwise_or": ("Tensor", "Scalar"),
    "bitwise_not": ("default",), "__and__": ("Tensor", "Scalar"), "__or__": ("Tensor", "Scalar"),
    # reductions and normalisations
    "sum": ("default", "dim_IntList"), "mean": ("default", "dim"), "prod": ("default", "dim_int"),
    "amax": ("default",), "amin": ("default",), "max": ("default", "dim"), "min": ("default", "dim"),
    "argmax": ("default",), "argmin": ("default",), "var": ("correction", "dim"), "std": ("correction", "dim"),
    "var_mean": ("correction",), "logsumexp": ("default",), "cumsum": ("default",), "cumprod": ("default",),
    "_safe_softmax": ("default",), "nan_to_num": ("default",),
    "linalg_vector_norm": ("default",), "norm": ("ScalarOpt_dim", "Scalar"), "any": ("dim", "default"),
    "all": ("dim", "default"), "softmax": ("int",), "_softmax": ("default",), "log_softmax": ("int",),
    "_log_softmax": ("default",), "rms_norm": ("default",), "layer_norm": ("default",),
    "native_layer_norm": ("default",), "group_norm": ("default",), "topk": ("default",), "sort": ("default",),
    # products and attention
    "linear": ("default",), "matmul": ("default",), "mm": ("default",), "bmm": ("default",),
    "addmm": ("default",), "baddbmm": ("default",), "einsum": ("default",), "outer": ("default",),
    "scaled_dot_product_attention": ("default",), "embedding": ("default",), "one_hot": ("default",),
    "conv1d": ("default",), "conv2d": ("default",),
    # shapes, views, copies
    "view": ("default", "dtype"), "reshape": ("default",), "permute": ("default",), "transpose": ("int",),
    "t": ("default",), "unsqueeze": ("default",), "squeeze": ("dim", "dims", "default"), "expand": ("default",),
    "flatten": ("using_ints",), "unflatten": ("int",), "slice": ("Tensor",), "select": ("int",),
    "narrow": ("default",), "split": ("Tensor",), "split_with_sizes": ("default",), "chunk": ("default",),
    "unbind": ("int",), "cat": ("default",), "stack": ("default",), "index_select": ("default",),
    "gather": ("default",), "index": ("Tensor",), "scatter": ("src", "value"), "scatter_add": ("default",),
    "repeat": ("default",), "repeat_interleave": ("self_int",), "flip": ("default",), "roll": ("default",),
    "tril": ("default",), "triu": ("default",), "contiguous": ("default",), "clone": ("default",),
    "alias": ("default",), "detach": ("default",), "_to_copy": ("default",), "to": ("dtype", "dtype_layout"),
    "type_as": ("default",), "constant_pad_nd": ("default",), "pad": ("default",),
    "zeros": ("default",), "ones": ("default",), "full": ("default",), "zeros_like": ("default",),
    "ones_like": ("default",), "full_like": ("default",), "arange": ("default", "start", "start_step"),
    "scalar_tensor": ("default",), "lift_fresh_copy": ("default",), "new_zeros": ("default",),
    "new_ones": ("default",), "new_full": ("default",), "_assert_tensor_metadata": ("default",),
}
HIGHER_ORDER = ("wrap_with_autocast", "wrap_with_set_grad_enabled")

_DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float16", 7: "float32", 8: "float64",
           12: "bool", 13: "bfloat16"}  # torch.export's ScalarType numbers the harness accepts
_STRIDED = 7  # torch.export's Layout.Strided
_MEMORY_FORMATS = {1: "contiguous_format", 2: "channels_last", 4: "preserve_format"}
_TARGET = re.compile(r"torch\.ops\.(aten|higher_order)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\Z")
_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


class ArchiveError(Exception):
    """model.pt2 is not a graph the harness scores; the message says what it needs."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ArchiveError(f"model.pt2 {what}; hand over a plain fixed-shape forward with prepare.hand_over")


def _obj(x: Any, what: str) -> dict:
    _need(isinstance(x, dict), f"has a malformed {what}")
    return x


def _list(x: Any, what: str) -> list:
    _need(isinstance(x, list), f"has a malformed {what}")
    return x


def _int(x: Any, what: str) -> int:
    _need(isinstance(x, int) and not isinstance(x, bool), f"has a non-integer {what}")
    return x


def _one(union: Any, what: str) -> tuple[str, Any]:
    """The single (key, value) of a serialized union."""
    d = _obj(union, what)
    _need(len(d) == 1, f"has a malformed {what}")
    return next(iter(d.items()))


def _tensor_name(arg: Any, what: str) -> str:
    name = _obj(arg, what).get("name")
    _need(isinstance(name, str) and 0 < len(name) <= 1000, f"has a malformed {what}")
    return name


@dataclass
class _Node:
    kind: str  # "aten" | "hop"
    op: Any  # the OpOverload, or the higher-order name
    args: list  # decoded argument templates: ("t", name) | ("ts", [names]) | ("g", _Graph) | ("v", value)
    kwargs: dict
    outputs: list  # names (None for an output the graph does not use), or [list of names] for a list return


@dataclass
class _Graph:
    inputs: list[str]
    nodes: list[_Node]
    outputs: list[str]
    free: list[list[str]]  # after node i, the names no later node (nor the outputs) needs


@dataclass
class Program:
    """A checked graph, ready to run on `device`: `program(tokens)` -> logits."""

    graph: _Graph
    constants: dict  # placeholder name -> tensor on the device (parameters, buffers, constants)
    user_input: str
    input_shape: tuple[int, ...]
    input_dtype: Any
    device: Any

    def __call__(self, tokens):
        import torch

        env = dict(self.constants)
        env[self.user_input] = tokens.to(self.input_dtype)
        with torch.inference_mode():
            return _run(self.graph, env, self.device)[0]


def _decode_value(key: str, value: Any, device) -> Any:
    import torch

    if key == "as_none":
        return None
    if key in ("as_int", "as_bool"):
        _need(isinstance(value, bool) if key == "as_bool" else isinstance(value, int) and not isinstance(value, bool),
              f"has a malformed {key}")
        return value
    if key in ("as_ints", "as_bools"):
        want = bool if key == "as_bools" else int
        _need(isinstance(value, list) and len(value) <= 64 and all(type(v) is want for v in value),
              f"has a malformed {key}")
        return list(value)
    if key == "as_float":
        return _float(value)
    if key == "as_floats":
        _need(isinstance(value, list) and len(value) <= 64, "has a malformed as_floats")
        return [_float(v) for v in value]
    if key == "as_string":
        _need(isinstance(value, str) and len(value) <= 32, "has a malformed string argument")
        return value
    if key == "as_scalar_type":
        _need(value in _DTYPES, f"uses the dtype number {value!r}")
        return getattr(torch, _DTYPES[value])
    if key == "as_layout":
        _need(value == _STRIDED, "uses a tensor layout other than strided")
        return torch.strided
    if key == "as_memory_format":
        _need(value in _MEMORY_FORMATS, "uses an unsupported memory format")
        return getattr(torch, _MEMORY_FORMATS[value])
    if key == "as_device":
        return device  # the harness decides where the graph runs
    raise ArchiveError(f"model.pt2 has an argument of kind {key[:40]!r}, which the harness does not run; hand over "
                       "a plain fixed-shape forward with prepare.hand_over")


def _float(v: Any) -> float:
    if isinstance(v, str):
        _need(v in _FLOATS, "has a malformed float")
        return _FLOATS[v]
    _need(isinstance(v, (int, float)) and not isinstance(v, bool), "has a malformed float")
    return float(v)


def _decode_arg(arg: Any, defined: set[str], device, allow_graph: bool) -> tuple:
    key, value = _one(arg, "argument")
    if key == "as_tensor":
        name = _tensor_name(value, "tensor argument")
        _need(name in defined, "uses a tensor before it is defined")
        return ("t", name)
    if key in ("as_tensors", "as_optional_tensors"):
        names = []
        for item in _list(value, key):
            if key == "as_optional_tensors":
                k, v = _one(item, "optional tensor")
                if k == "as_none":
                    names.append(None)
                    continue
                _need(k == "as_tensor", "has a malformed optional tensor")
                item = v
            name = _tensor_name(item, "tensor argument")
            _need(name in defined, "uses a tensor before it is defined")
            names.append(name)
        return ("ts", names)
    if key == "as_optional_tensor":
        k, v = _one(value, "optional tensor")
        if k == "as_none":
            return ("v", None)
        _need(k == "as_tensor", "has a malformed optional tensor")
        name = _tensor_name(v, "tensor argument")
        _need(name in defined, "uses a tensor before it is defined")
        return ("t", name)
    if key == "as_graph":
        _need(allow_graph, "has a subgraph outside an autocast or grad-mode region")
        return ("g", _parse_graph(_obj(_obj(value, "subgraph").get("graph"), "subgraph"), None, device))
    return ("v", _decode_value(key, value, device))


def _resolve(target: Any) -> tuple[str, Any]:
    import torch

    _need(isinstance(target, str), "has a node without an operator name")
    m = _TARGET.match(target)
    if m is None:
        raise ArchiveError(f"model.pt2 calls {target[:80]!r}, which is not a tensor operator the harness runs; a "
                           "scored model may only use functional ATen operators (no I/O, randomness or Python)")
    space, name, overload = m.groups()
    if space == "higher_order":
        _need(name in HIGHER_ORDER and overload is None, f"uses the higher-order operator {name}")
        return "hop", name
    if overload is None or overload not in ALLOWED.get(name, ()):
        raise ArchiveError(f"model.pt2 calls the operator aten::{name}.{overload}, which the harness does not run; a "
                           "scored model may only use functional tensor operators (no I/O, randomness, in-place "
                           "writes or unchecked indexing)")
    op = getattr(getattr(torch.ops.aten, name), overload)
    _need(not op._schema.is_mutable, f"calls aten::{name}.{overload}, which writes to its inputs")
    return "aten", op


def _outputs(outs: Any) -> list:
    result = []
    for out in _list(outs, "node output list"):
        key, value = _one(out, "node output")
        if key == "as_tensor":
            result.append(_tensor_name(value, "node output"))
        elif key == "as_tensors":
            result.append([_tensor_name(v, "node output") for v in _list(value, "node output")])
        elif key == "as_none":
            result.append(None)
        else:
            raise ArchiveError(f"model.pt2 has a node output of kind {key[:40]!r}; hand over a plain fixed-shape "
                               "forward with prepare.hand_over")
    return result


def _parse_graph(g: dict, inputs: list[str] | None, device) -> _Graph:
    """Check one (sub)graph and turn it into a node list the interpreter walks."""
    for key in ("sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"):
        _need(not g.get(key), "has symbolic values or script objects")
    if inputs is None:
        inputs = []
        for a in _list(g.get("inputs"), "graph input list"):
            key, value = _one(a, "graph input")
            _need(key == "as_tensor", "takes a graph input that is not a tensor")
            inputs.append(_tensor_name(value, "graph input"))
    names = inputs
    defined = set(names)
    _need(len(defined) == len(names), "defines a tensor twice")
    nodes = []
    for raw in _list(g.get("nodes"), "node list"):
        raw = _obj(raw, "node")
        kind, op = _resolve(raw.get("target"))
        args, kwargs = [], {}
        for named in _list(raw.get("inputs"), "node input list"):
            named = _obj(named, "node input")
            decoded = _decode_arg(named.get("arg"), defined, device, allow_graph=kind == "hop")
            if named.get("kind") == 2:
                key = named.get("name")
                _need(isinstance(key, str) and key.isidentifier() and key not in kwargs, "has a malformed keyword")
                kwargs[key] = decoded
            else:
                _need(not kwargs, "has a positional argument after a keyword")
                args.append(decoded)
        outputs = _outputs(raw.get("outputs"))
        for out in outputs:
            for name in (out if isinstance(out, list) else [out]):
                if name is not None:
                    _need(name not in defined, "defines a tensor twice")
                    defined.add(name)
        nodes.append(_Node(kind, op, args, kwargs, outputs))
        _need(len(nodes) <= MAX_NODES, "has too many nodes")
    outs = []
    for a in _list(g.get("outputs"), "graph output list"):
        key, value = _one(a, "graph output")
        _need(key == "as_tensor", "returns something other than tensors")
        name = _tensor_name(value, "graph output")
        _need(name in defined, "returns a tensor it never defines")
        outs.append(name)
    return _Graph(names, nodes, outs, _last_uses(names, nodes, outs))


def _last_uses(inputs: list[str], nodes: list[_Node], outputs: list[str]) -> list[list[str]]:
    """For each node, the names that can be dropped once it has run (memory stays bounded by live values)."""
    last: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for a in list(n.args) + list(n.kwargs.values()):
            if a[0] == "t":
                last[a[1]] = i
            elif a[0] == "ts":
                for name in a[1]:
                    if name is not None:
                        last[name] = i
        for out in n.outputs:
            for name in (out if isinstance(out, list) else [out]):
                if name is not None:
                    last.setdefault(name, i)
    keep = set(outputs) | set(inputs)
    free: list[list[str]] = [[] for _ in nodes]
    for name, i in last.items():
        if name not in keep:
            free[i].append(name)
    return free


def _value(a: tuple, env: dict) -> Any:
    if a[0] == "t":
        return env[a[1]]
    if a[0] == "ts":
        return [None if n is None else env[n] for n in a[1]]
    return a[1]


def _run(g: _Graph, env: dict, device) -> list:
    import torch

    for node, free in zip(g.nodes, g.free):
        if node.kind == "aten":
            result = node.op(*[_value(a, env) for a in node.args], **{k: _value(a, env) for k, a in node.kwargs.items()})
        else:
            result = _run_region(node, env, device)
        if len(node.outputs) == 1 and (isinstance(result, torch.Tensor) or isinstance(node.outputs[0], list)):
            result = [result]
        elif not node.outputs and result is None:
            result = []
        _need(isinstance(result, (list, tuple)) and len(result) == len(node.outputs), "has a node whose outputs do "
              "not match what its operator returns")
        for out, value in zip(node.outputs, result):
            if isinstance(out, list):
                _need(isinstance(value, (list, tuple)) and len(value) == len(out), "has a node whose outputs do not "
                      "match what its operator returns")
                env.update((n, v) for n, v in zip(out, value) if n is not None)
            elif out is not None:
                env[out] = value
        for name in free:
            env.pop(name, None)
    return [env[name] for name in g.outputs]


def _run_region(node: _Node, env: dict, device) -> list:
    """An autocast or grad-mode region: its subgraph run under that mode, on the harness's device."""
    import torch

    values = [_value(a, env) for a in node.args]
    if node.op == "wrap_with_autocast":
        _need(len(values) >= 5 and isinstance(node.args[4], tuple) and node.args[4][0] == "g", "has a malformed "
              "autocast region")
        _, dtype, enabled, cache, sub = values[:5]
        operands = values[5:]
        _need(dtype in (None, torch.bfloat16, torch.float16) and isinstance(enabled, bool), "has a malformed "
              "autocast region")
        mode = torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled,
                              cache_enabled=bool(cache) if cache is not None else None)
    else:
        _need(len(values) >= 2 and isinstance(node.args[1], tuple) and node.args[1][0] == "g" and
              isinstance(values[0], bool), "has a malformed grad-mode region")
        sub, operands = values[1], values[2:]
        mode = torch.no_grad()  # scoring never needs gradients, whatever the region asked for
    _need(len(operands) == len(sub.inputs) and all(isinstance(o, torch.Tensor) for o in operands),
          "has a region whose operands do not match its subgraph")
    with mode:
        out = _run(sub, dict(zip(sub.inputs, operands)), device)
    return out if len(out) != 1 else out[0]


# --- the archive -----------------------------------------------------------------------------------------


# What torch.export.save writes, and nothing else (no AOTInductor libraries, no extra files).
_MEMBERS = re.compile(r"(models/[A-Za-z0-9_]{1,64}\.json|data/(weights|constants)/[A-Za-z0-9_.]{1,80}|"
                      r"data/sample_inputs/[A-Za-z0-9_]{1,64}\.pt|archive_format|archive_version|byteorder|"
                      r"\.data/version|\.data/serialization_id)\Z")
# The only globals a pickle of sample tensors names (torch.save of a tuple of integer tensors).
_PICKLE_GLOBALS = {"torch._utils _rebuild_tensor_v2", "collections OrderedDict",
                   *(f"torch {t}Storage" for t in ("Int", "Long", "Float", "BFloat16", "Half", "Double", "Byte",
                                                   "Char", "Short", "Bool"))}
_PICKLE_OPS = {"PROTO", "GLOBAL", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET", "MARK", "BINUNICODE",
               "SHORT_BINUNICODE", "BININT", "BININT1", "BININT2", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
               "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_LIST", "SETITEM", "SETITEMS", "APPEND", "APPENDS", "NEWFALSE",
               "NEWTRUE", "NONE", "BINPERSID", "REDUCE", "STOP", "LONG1", "BINFLOAT", "MEMOIZE", "FRAME"}


def plain_tensor_pickle(data: bytes) -> bool:
    """True when `data` (a torch.save archive) is a pickle of plain tensors: read opcode by opcode with
    pickletools, never unpickled; every global it names is one of torch's tensor rebuilders."""
    import io
    import pickletools

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            pkls = [i for i in z.infolist() if i.filename.endswith("/data.pkl")]
            if len(pkls) != 1 or pkls[0].compress_type != zipfile.ZIP_STORED or pkls[0].file_size > 1 << 20:
                return False
            for op, arg, _ in pickletools.genops(z.read(pkls[0])):
                if op.name not in _PICKLE_OPS or (op.name == "GLOBAL" and arg not in _PICKLE_GLOBALS):
                    return False
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return False
    return True


def _members(z: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    infos = z.infolist()
    _need(0 < len(infos) <= 100_000, "is an empty or oversized archive")
    for i in infos:
        _need(i.compress_type == zipfile.ZIP_STORED, "holds a compressed member (torch.export stores them as they "
              "are)")
        _need(i.file_size == i.compress_size, "holds a member whose sizes disagree")
    tops = {i.filename.split("/", 1)[0] for i in infos}
    _need(len(tops) == 1, "has more than one top folder")
    top = tops.pop()
    members = {i.filename[len(top) + 1:]: i for i in infos}
    for name in members:
        _need(_MEMBERS.match(name) is not None, f"holds {name[:80]!r}, which torch.export does not write")
    return top, members


def _read(z: zipfile.ZipFile, members: dict, name: str, limit: int | None = None) -> bytes:
    info = members.get(name)
    _need(info is not None, f"has no {name}")
    _need(limit is None or info.file_size <= limit, f"has an oversized {name}")
    return z.read(info)


def _json(z: zipfile.ZipFile, members: dict, name: str) -> Any:
    try:
        return json.loads(_read(z, members, name, MAX_JSON_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ArchiveError(f"model.pt2's {name} is not valid JSON; hand over a plain fixed-shape forward with "
                           "prepare.hand_over") from None


def _payloads(z: zipfile.ZipFile, members: dict, folder: str, config_name: str, device) -> dict:
    """FQN -> tensor from a weights or constants folder: raw bytes only, sizes checked against the bytes."""
    import torch

    if folder + config_name not in members:
        return {}
    config = _obj(_obj(_json(z, members, folder + config_name), config_name).get("config"), config_name)
    files: dict[str, Any] = {}
    out = {}
    for fqn, meta in config.items():
        meta = _obj(meta, "payload entry")
        _need(meta.get("use_pickle") is False, "holds pickled objects, which the harness does not load")
        path = meta.get("path_name")
        _need(isinstance(path, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", path) is not None,
              "has a malformed payload file name")
        tm = _obj(meta.get("tensor_meta"), "tensor description")
        _need(tm.get("dtype") in _DTYPES and tm.get("layout", _STRIDED) == _STRIDED, "holds a tensor of a dtype or "
              "layout the harness does not load")
        dtype = getattr(torch, _DTYPES[tm["dtype"]])
        sizes = [_int(_one(s, "size")[1], "size") for s in _list(tm.get("sizes"), "size list")]
        strides = [_int(_one(s, "stride")[1], "stride") for s in _list(tm.get("strides"), "stride list")]
        offset = _int(_one(tm.get("storage_offset", {"as_int": 0}), "storage offset")[1], "storage offset")
        _need(len(sizes) == len(strides) <= MAX_DIMS and all(s >= 0 for s in sizes) and
              all(s >= 0 for s in strides) and offset >= 0, "holds a tensor with a malformed shape")
        if path not in files:
            raw = bytearray(_read(z, members, folder + path))
            item = torch.empty((), dtype=dtype).element_size()
            _need(len(raw) % item == 0, "holds a tensor file whose size is not a whole number of elements")
            files[path] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        flat = files[path]
        _need(flat.dtype == dtype, "holds one file read as two dtypes")
        span = offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1 if all(sizes) else 0
        _need(span <= flat.numel(), "holds a tensor larger than its bytes")
        out[fqn] = torch.as_strided(flat, sizes, strides, offset).to(device) if all(sizes) else \
            torch.zeros(sizes, dtype=dtype, device=device)
    return out


def read_program(path: Path, device) -> Program:
    """The checked, runnable graph of the model.pt2 at `path` (ArchiveError when it is not one)."""
    import torch

    try:
        z = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise ArchiveError(f"model.pt2 is not a zip archive ({e}); hand over a plain fixed-shape forward with "
                           "prepare.hand_over") from None
    with z:
        top, members = _members(z)
        models = [n for n in members if n.startswith("models/") and n.endswith(".json")]
        _need(len(models) == 1, "does not hold exactly one model")
        name = models[0][len("models/"):-len(".json")]
        _need(re.fullmatch(r"[A-Za-z0-9_]{1,64}", name) is not None, "has a malformed model name")
        _need(_read(z, members, "byteorder", 16).strip() == sys.byteorder.encode(), "was written on a machine "
              "of another byte order")
        for sample in (n for n in members if n.startswith("data/sample_inputs/")):
            _need(plain_tensor_pickle(_read(z, members, sample, 16 << 20)), "holds sample inputs that are not "
                  "a plain tensor pickle (the harness never unpickles them, and refuses what could run code)")
        doc = _obj(_json(z, members, models[0]), "model description")
        _need(not doc.get("range_constraints"), "has symbolic shapes")
        gm = _obj(doc.get("graph_module"), "graph module")
        weights = _payloads(z, members, "data/weights/", f"{name}_weights_config.json", device)
        consts = _payloads(z, members, "data/constants/", f"{name}_constants_config.json", device)
    _need(not set(weights) & set(consts), "names one tensor twice")
    stored = {**weights, **consts}
    sig = _obj(gm.get("signature"), "signature")
    constants, user, placeholders = {}, None, []
    for spec in _list(sig.get("input_specs"), "input list"):
        kind, body = _one(spec, "input")
        body = _obj(body, "input")
        if kind == "user_input":
            _need(user is None, "takes more than one input")
            k, v = _one(body.get("arg"), "input")
            _need(k == "as_tensor", "takes an input that is not a tensor")
            user = _tensor_name(v, "input")
            placeholders.append(user)
            continue
        field = {"parameter": "parameter_name", "buffer": "buffer_name",
                 "tensor_constant": "tensor_constant_name"}.get(kind)
        _need(field is not None, f"has an input of kind {kind[:40]!r}")
        fqn = body.get(field)
        _need(isinstance(fqn, str) and fqn in stored, "names a weight it does not hold")
        placeholder = _tensor_name(body.get("arg"), "input")
        constants[placeholder] = stored[fqn]
        placeholders.append(placeholder)
    _need(user is not None, "takes no token input")
    outs = _list(sig.get("output_specs"), "output list")
    _need(len(outs) == 1 and _one(outs[0], "output")[0] == "user_output", "must return exactly one tensor "
          "and change no buffer or input")
    g = _obj(gm.get("graph"), "graph")
    graph = _parse_graph(g, None, device)
    _need(graph.inputs == placeholders, "lists inputs that differ from its signature")
    _need(len(graph.outputs) == 1, "must return exactly one tensor")
    meta = _obj(_obj(g.get("tensor_values"), "tensor list").get(user), "input description")
    _need(meta.get("dtype") in (4, 5), "takes an input that is not integer tokens")
    shape = tuple(_int(_one(s, "size")[1], "size") for s in _list(meta.get("sizes"), "size list"))
    return Program(graph, constants, user, shape, getattr(torch, _DTYPES[meta["dtype"]]), device)
