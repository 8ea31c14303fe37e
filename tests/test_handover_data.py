"""The hand-over is data, never code (judge/pt2.py, judge/graphs.py).

A trainer writes model.pt2 inside its sandbox, so every byte of it is the trainer's. These tests take
real hand-overs of the pristine trainer's model (fp32 and bf16 autocast), show that the harness's
interpreter computes exactly what the model computes, and then mutate them the ways an attacker
would: Python in every name that torch.fx would have written into generated source, forbidden
targets, arguments, constants, weights, sizes and nested subgraphs, members torch never writes, and
random damage. Each mutated archive is refused (GraphError) or runs as the plain graph it
describes; no payload ever runs.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import random
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import prepare

torch = pytest.importorskip("torch", reason="PyTorch not installed")

from backends import detect, torch_rt  # noqa: E402
from judge.graphs import GraphError, load_graph  # noqa: E402
from judge.pt2 import ArchiveError, plain_tensor_pickle, read_program  # noqa: E402

B, T, V = 2, 32, 64


@pytest.fixture(scope="module")
def handovers(tmp_path_factory):
    """{"fp32": dir, "bf16": dir}: the pristine trainer's GPT (2 layers, GQA, windows S and L, value
    embeddings) handed over by the trainer-side export helper, and the model itself."""
    import train_cuda
    from model import build_config

    cfg = build_config(2, 64, 32, 1, V, T, "SL")
    out = {}
    for kind in ("fp32", "bf16"):  # one model each: an export leaves traced state on the model's attention
        torch.manual_seed(0)
        model = train_cuda.build_model(cfg)
        with torch.no_grad():  # the output projections start at zero: give every path a say
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        host = dataclasses.replace(detect("cpu"), bf16=kind == "bf16")
        d = tmp_path_factory.mktemp(kind)
        torch_rt.export_for_eval(model, d, B, T, host)
        (d / "facts.json").write_text(json.dumps({"graph": {"format": "pt2", "batch_size": B, "seq_len": T}}))
        out[kind] = d
    return out, model


def entries(handover: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(handover / "model.pt2") as z:
        return {i.filename: z.read(i.filename) for i in z.infolist()}


def write(tmp: Path, items: dict[str, bytes], name: str = "h", compress=zipfile.ZIP_STORED) -> Path:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(d / "model.pt2", "w", compress) as z:
        for k, v in items.items():
            z.writestr(k, v)
    (d / "facts.json").write_text(json.dumps({"graph": {"format": "pt2", "batch_size": B, "seq_len": T}}))
    return d


def model_json(items: dict[str, bytes]) -> tuple[str, dict]:
    name = next(k for k in items if "/models/" in k and k.endswith(".json"))
    return name, json.loads(items[name])


def with_json(items: dict[str, bytes], doc: dict) -> dict[str, bytes]:
    name, _ = model_json(items)
    return {**items, name: json.dumps(doc).encode()}


def tokens(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(B, T), dtype=np.int32)


def logits_of(handover: Path) -> np.ndarray:
    g = load_graph(handover, T, V)
    return g.adapter.to_numpy(g.forward(g.adapter.to_input(tokens())))


def reference(handover: Path) -> np.ndarray:
    """What torch itself makes of the archive (trusted here: these archives are the tests' own)."""
    program = torch.export.load(str(handover / "model.pt2"))
    with torch.no_grad():
        return program.module()(torch.from_numpy(tokens())).float().numpy()


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_the_interpreter_computes_what_the_model_computes(handovers, kind):
    dirs, model = handovers
    got = logits_of(dirs[kind])
    assert got.shape == (B, T, V)
    np.testing.assert_array_equal(got, reference(dirs[kind]))  # the same operators, in the same order
    if kind == "fp32":
        with torch.no_grad():
            model.eval()
            want = model(torch.from_numpy(tokens()).long()).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def payload(proof: Path, i: int) -> str:
    """A string that is Python wherever generated source would quote it unescaped."""
    return f'n{i}"); open({str(proof)!r}, "w").write("ran"); ("'


def rename_everything(doc: dict, proof: Path) -> dict:
    """Every tensor name, placeholder and subgraph name, consistently, into a Python payload: the
    names torch.fx writes into the source it generates and execs."""
    names: dict[str, str] = {}

    def collect(node):
        if isinstance(node, dict):
            for key in ("as_tensor",):
                if key in node and isinstance(node[key], dict):
                    names.setdefault(node[key]["name"], payload(proof, len(names)))
            if "as_graph" in node:
                node["as_graph"]["name"] = payload(proof, 10_000 + len(names))
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    def swap(node, keys_are_names=False):
        if isinstance(node, dict):
            return {(names.get(k, k) if keys_are_names else k):
                    (names.get(v, v) if k == "name" and isinstance(v, str) else swap(v, k == "tensor_values"))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    doc = copy.deepcopy(doc)
    collect(doc)
    return swap(doc)


@pytest.mark.parametrize("kind", ["fp32", "bf16"])
def test_names_are_data_never_code(handovers, tmp_path, kind):
    """The attack that ran code in the harness: names rewritten into Python. Here they key a dict:
    the graph runs unchanged and nothing runs."""
    dirs, _ = handovers
    proof = tmp_path / "payload-ran"
    items = entries(dirs[kind])
    _, doc = model_json(items)
    forged = rename_everything(doc, proof)
    assert json.dumps(forged) != json.dumps(doc) and "open(" in json.dumps(forged)
    d = write(tmp_path, with_json(items, forged))
    np.testing.assert_array_equal(logits_of(d), logits_of(dirs[kind]))
    assert not proof.exists()


def _nodes(doc):
    return doc["graph_module"]["graph"]["nodes"]


def _first(doc, target):
    return next(n for n in _nodes(doc) if n["target"] == target)


def _evil_pickle(proof: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(proof)!r}, 'w').write('ran')",))

    buf = io.BytesIO()
    torch.save(Payload(), buf)
    return buf.getvalue()


def mutate(items: dict[str, bytes], what: str, proof: Path) -> tuple[dict[str, bytes], int]:
    """One crafted archive per attack on the archive's structure; returns (members, zip compression)."""
    items = dict(items)
    name, doc = model_json(items)
    prefix = name.split("/")[0]
    wcfg_name = f"{prefix}/data/weights/model_weights_config.json"
    wcfg = json.loads(items[wcfg_name])
    first_w = next(iter(wcfg["config"].values()))
    compression = zipfile.ZIP_STORED
    linear = _first(doc, "torch.ops.aten.linear.default")
    code = f"open({str(proof)!r}, 'w').write('ran')"
    if what == "target-python":
        linear["target"] = f"torch.ops.aten.linear.default; {code}"
    elif what == "target-builtin":
        linear["target"] = "builtins.exec"
    elif what.startswith("op-"):
        linear["target"] = {"op-from-file": "torch.ops.aten.from_file.default", "op-rand": "torch.ops.aten.rand.default",
                            "op-inplace": "torch.ops.aten.add_.Tensor", "op-out": "torch.ops.aten.mm.out",
                            "op-unchecked-index": "torch.ops.aten._unsafe_index.Tensor",
                            "op-uninitialised": "torch.ops.aten.empty.memory_format",
                            "op-custom": "torch.ops.mylib.evil.default", "op-prims": "torch.ops.prims.device_put.default",
                            "op-hop": "torch.ops.higher_order.cond"}[what]
    elif what == "arg-sym-int":
        linear["inputs"].append({"name": "n", "arg": {"as_sym_int": {"as_name": "s0"}}, "kind": 2})
    elif what == "arg-operator":
        linear["inputs"].append({"name": "f", "arg": {"as_operator": "builtins.exec"}, "kind": 2})
    elif what == "arg-long-string":
        linear["inputs"].append({"name": "s", "arg": {"as_string": code * 4}, "kind": 2})
    elif what == "arg-keyword-not-identifier":
        linear["inputs"][-1]["kind"] = 2
        linear["inputs"][-1]["name"] = f"x=1); {code}; ("
    elif what == "arg-undefined-tensor":
        linear["inputs"][0]["arg"] = {"as_tensor": {"name": "never_defined"}}
    elif what == "arg-subgraph-in-plain-op":
        linear["inputs"].append({"name": "g", "arg": {"as_graph": {"name": "g", "graph": copy.deepcopy(
            doc["graph_module"]["graph"])}}, "kind": 2})
    elif what == "dtype-complex":
        linear["inputs"].append({"name": "dtype", "arg": {"as_scalar_type": 10}, "kind": 2})
    elif what == "defined-twice":
        linear["outputs"] = _nodes(doc)[0]["outputs"]
    elif what == "output-undefined":
        doc["graph_module"]["graph"]["outputs"] = [{"as_tensor": {"name": "nowhere"}}]
    elif what == "two-user-inputs":
        specs = doc["graph_module"]["signature"]["input_specs"]
        user = next(s for s in specs if "user_input" in s)
        specs.append(copy.deepcopy(user))
    elif what == "custom-object-input":
        doc["graph_module"]["signature"]["input_specs"].insert(0, {"custom_obj": {"arg": {"name": "obj"},
                                                                                  "custom_obj_name": "x"}})
    elif what == "buffer-mutation":
        doc["graph_module"]["signature"]["output_specs"].append(
            {"buffer_mutation": {"arg": {"name": "mul"}, "buffer_name": "model.cos"}})
    elif what == "symbolic-shapes":
        doc["range_constraints"] = {"s0": {"min_val": 2, "max_val": 64}}
    elif what == "weight-pickled":
        first_w["use_pickle"] = True
        items[f"{prefix}/data/weights/{first_w['path_name']}"] = _evil_pickle(proof)
    elif what == "weight-path-traversal":
        first_w["path_name"] = "../../../../etc/passwd"
    elif what == "weight-too-large":
        first_w["tensor_meta"]["sizes"] = [{"as_int": 1 << 40}]
    elif what == "weight-negative-stride":
        first_w["tensor_meta"]["strides"] = [{"as_int": -1}]
    elif what == "weight-symbolic-size":
        first_w["tensor_meta"]["sizes"] = [{"as_expr": {"expr_str": code}}]
    elif what == "weight-unknown":
        doc["graph_module"]["signature"]["input_specs"][0]["parameter"]["parameter_name"] = "not.there"
    elif what == "sample-inputs-pickle":
        items[f"{prefix}/data/sample_inputs/model.pt"] = _evil_pickle(proof)
    elif what == "extra-member-aoti":
        items[f"{prefix}/data/aotinductor/model/model.so"] = b"\x7fELF"
    elif what == "second-model":
        items[f"{prefix}/models/other.json"] = json.dumps(doc).encode()
    elif what == "second-top-folder":
        items["elsewhere/archive_format"] = b"pt2"
    elif what == "compressed":
        compression = zipfile.ZIP_DEFLATED
    elif what == "not-json":
        items[name] = b"{" + code.encode()
    elif what == "byte-order":
        items[f"{prefix}/byteorder"] = b"big"
    else:
        raise AssertionError(what)
    items[name] = items[name] if what == "not-json" else json.dumps(doc).encode()
    items[wcfg_name] = json.dumps(wcfg).encode()
    return items, compression


CRAFTED = ["target-python", "target-builtin", "op-from-file", "op-rand", "op-inplace", "op-out", "op-unchecked-index",
           "op-uninitialised", "op-custom", "op-prims", "op-hop", "arg-sym-int", "arg-operator", "arg-long-string",
           "arg-keyword-not-identifier", "arg-undefined-tensor", "arg-subgraph-in-plain-op", "dtype-complex",
           "defined-twice", "output-undefined", "two-user-inputs", "custom-object-input", "buffer-mutation",
           "symbolic-shapes", "weight-pickled", "weight-path-traversal", "weight-too-large", "weight-negative-stride",
           "weight-symbolic-size", "weight-unknown", "sample-inputs-pickle", "extra-member-aoti", "second-model",
           "second-top-folder", "compressed", "not-json", "byte-order"]


@pytest.mark.parametrize("what", CRAFTED)
def test_a_crafted_archive_is_refused_and_runs_nothing(handovers, tmp_path, what):
    dirs, _ = handovers
    proof = tmp_path / "payload-ran"
    items, compression = mutate(entries(dirs["fp32"]), what, proof)
    d = write(tmp_path, items, compress=compression)
    with pytest.raises(GraphError) as e:
        load_graph(d, T, V)
    assert "model.pt2" in str(e.value) or "graph" in str(e.value)
    assert not proof.exists(), f"{what}: the payload ran"


def test_nested_subgraphs_are_checked_like_the_graph(handovers, tmp_path):
    """The bf16 hand-over keeps its work inside an autocast region; a forbidden op inside it is refused
    before anything runs, and so is a region whose subgraph holds another region's subgraph."""
    dirs, _ = handovers
    items = entries(dirs["bf16"])
    _, doc = model_json(items)
    region = _first(doc, "torch.ops.higher_order.wrap_with_autocast")
    inner = region["inputs"][4]["arg"]["as_graph"]["graph"]
    bad = copy.deepcopy(doc)
    b_inner = _first(bad, "torch.ops.higher_order.wrap_with_autocast")["inputs"][4]["arg"]["as_graph"]["graph"]
    next(n for n in b_inner["nodes"] if n["target"] == "torch.ops.aten.linear.default")["target"] = \
        "torch.ops.aten.from_file.default"
    with pytest.raises(GraphError, match="from_file"):
        load_graph(write(tmp_path, with_json(items, bad), "inner-op"), T, V)
    nested = copy.deepcopy(doc)
    n_inner = _first(nested, "torch.ops.higher_order.wrap_with_autocast")["inputs"][4]["arg"]["as_graph"]["graph"]
    n_inner["nodes"][0]["inputs"].append({"name": "g", "arg": {"as_graph": {"name": "g", "graph": inner}}, "kind": 2})
    with pytest.raises(GraphError, match="subgraph"):
        load_graph(write(tmp_path, with_json(items, nested), "nested"), T, V)


def test_plain_tensor_pickles_pass_and_anything_else_does_not(tmp_path):
    buf = io.BytesIO()
    torch.save((torch.zeros(2, 3, dtype=torch.int32),), buf)
    assert plain_tensor_pickle(buf.getvalue())
    assert not plain_tensor_pickle(_evil_pickle(tmp_path / "x"))
    buf = io.BytesIO()
    torch.save({"f": print}, buf)
    assert not plain_tensor_pickle(buf.getvalue())
    assert not plain_tensor_pickle(b"not a zip")


def _random_damage(doc, rng: random.Random, proof: Path):
    """Replace one random value anywhere in the document with something hostile or malformed."""
    paths = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, path + [i])

    walk(doc, [])
    path = rng.choice(paths[1:])
    holder = doc
    for key in path[:-1]:
        holder = holder[key]
    choices = [f"__import__('os').system('touch {proof}')", 1 << 62, -1, None, {}, [], "Infinity", True, 3.5,
               {"as_sym_int": {"as_name": "s0"}}, {"as_tensor": {"name": "undefined"}}, "torch.ops.aten.rand.default"]
    holder[path[-1]] = rng.choice(choices)


def test_random_damage_is_refused_or_runs_as_a_plain_graph(handovers, tmp_path):
    """Seeded random damage to real hand-overs' graph descriptions: every outcome is a refusal
    (GraphError) or a graph that runs; nothing else escapes and nothing runs."""
    dirs, _ = handovers
    proof = tmp_path / "payload-ran"
    rng = random.Random(1234)
    outcomes = {"refused": 0, "ran": 0}
    for i in range(40):
        kind = "bf16" if i % 3 == 0 else "fp32"
        items = entries(dirs[kind])
        _, doc = model_json(items)
        for _ in range(rng.randint(1, 3)):
            _random_damage(doc, rng, proof)
        d = write(tmp_path, with_json(items, doc), f"d{i}")
        try:
            load_graph(d, T, V)
            outcomes["ran"] += 1
        except GraphError:
            outcomes["refused"] += 1
    assert not proof.exists()
    assert outcomes["refused"] > 10, outcomes  # the damage reached checks, not only unused metadata
    assert outcomes["refused"] + outcomes["ran"] == 40


def test_a_loaded_graph_cannot_write_its_weights(handovers):
    """Weights are built from raw bytes and no allowed operator writes to its inputs, so two calls see
    the same weights (the harness's same-twice check relies on this)."""
    dirs, _ = handovers
    program = read_program(dirs["fp32"] / "model.pt2", torch.device("cpu"))
    before = {k: v.clone() for k, v in program.constants.items()}
    x = torch.from_numpy(tokens())
    program(x)
    program(x)
    assert all(torch.equal(before[k], v) for k, v in program.constants.items())
    from judge.pt2 import ALLOWED

    for name, overloads in ALLOWED.items():
        for overload in overloads:
            op = getattr(getattr(torch.ops.aten, name), overload)
            assert not op._schema.is_mutable, f"aten::{name}.{overload} writes to its inputs"


def test_archive_errors_say_what_the_harness_needs(tmp_path):
    d = tmp_path / "h"
    d.mkdir()
    (d / "model.pt2").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArchiveError, match="prepare.hand_over"):
        read_program(d / "model.pt2", torch.device("cpu"))


# --- model.mlxfn: MLX's own importer, inside the harness process ----------------------------------


def _mlx():
    try:
        import mlx.core as mx
    except Exception:  # noqa: BLE001
        pytest.skip("MLX not installed")
    return mx


@pytest.mark.slow
def test_a_damaged_mlx_hand_over_is_never_a_score(tiny_cache, tmp_path):
    """Whatever MLX's native importer makes of a damaged .mlxfn (an exception, a crash, a huge
    allocation), the harness ends unscored; only a file MLX reads as a whole graph is scored, and
    then by the harness's own sums and probe."""
    mx = _mlx()
    from backends import mlx_rt

    p = prepare.get_protocol()
    table = mx.array(np.random.default_rng(0).standard_normal((p.vocab_size, p.vocab_size)).astype(np.float32))
    good = tmp_path / "good"
    good.mkdir()
    graph = mlx_rt.export_for_eval(lambda idx: table[idx], good, 4, p.max_seq_len)
    (good / "facts.json").write_text(json.dumps({"graph": graph}))
    data = (good / "model.mlxfn").read_bytes()
    rng = np.random.default_rng(7)
    header = min(len(data), 4096)  # the structure (names, shapes, counts) sits before the table's bytes
    damaged = {"truncated": data[: len(data) // 3], "header-cut": data[:200],
               "count-huge": data[:64] + b"\xff" * 8 + data[72:]}
    for i in range(3):
        flip = bytearray(data)
        for pos in rng.integers(0, header, size=8):
            flip[pos] ^= 0xFF
        damaged[f"flipped-{i}"] = bytes(flip)
    for name, blob in damaged.items():
        d = tmp_path / name
        d.mkdir()
        (d / "model.mlxfn").write_bytes(blob)
        (d / "facts.json").write_text(json.dumps({"graph": graph}))
        out = d / "result.json"
        proc = subprocess.run(prepare.harness_command(d, "tiny", out), capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "AUTORESEARCH_BACKEND": "mlx"})
        result = json.loads(out.read_text()) if out.exists() else None
        if proc.returncode == 0:  # MLX read a whole graph: scored by the harness, probe and all
            assert result and result["valid"] and result["probed_rows"] > 0, (name, proc.stdout, proc.stderr)
        else:
            assert not (result and result.get("valid")), (name, result)
