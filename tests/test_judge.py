"""Tests for the judge: the scoring code (judge/evaluate.py), the graph checks (judge/graphs.py) and the
harness process (judge/harness.py) on real torch.export and mx.export_function hand-overs.

Run: uv run pytest tests/test_judge.py      (CPU, no network; about a minute)
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import prepare
from judge import evaluate as E
from judge.graphs import GraphError, load_graph

REPO = Path(__file__).resolve().parents[1]


class NumpyAdapter:
    """The three adapter methods, for NumPy 'models' (float64 log-softmax)."""

    def to_input(self, tokens):
        return np.asarray(tokens)

    def nats(self, logits, targets):
        z = np.asarray(logits, dtype=np.float64)
        top = z.max(axis=-1)
        lse = top + np.log(np.exp(z - top[..., None]).sum(axis=-1))
        return lse - np.take_along_axis(z, targets[..., None].astype(np.int64), axis=-1)[..., 0]

    def to_numpy(self, logits):
        return np.asarray(logits, dtype=np.float32)


def score(p, forward, batch_size, split="val", rng=None):
    rows = E.load_rows(p, split, p.eval_tokens if split == "val" else p.holdout_tokens)
    return E.score_split(forward, NumpyAdapter(), batch_size, rows, prepare.load_token_bytes(p), p.vocab_size, rng)


# --- scoring -----------------------------------------------------------------------------------


def test_score_matches_a_hand_computation_whatever_the_batch_size(tiny_cache):
    p = prepare.get_protocol()
    V = p.vocab_size
    w = np.linspace(-2.0, 3.0, V).astype(np.float32)  # the same logits at every position: causal

    def forward(x):
        return np.broadcast_to(w, (*x.shape, V))

    token_bytes = prepare.load_token_bytes(p)
    lse = math.log(math.fsum(math.exp(float(v)) for v in w))
    rows = E.load_rows(p, "val", p.eval_tokens)
    assert rows.x.shape == (p.eval_tokens // p.max_seq_len, p.max_seq_len)
    counts = Counter(int(t) for t in rows.y.ravel() if token_bytes[t] > 0)  # special tokens: 0 bytes, skipped
    nats = math.fsum(n * (lse - float(w[t])) for t, n in counts.items())
    nbytes = sum(int(token_bytes[t]) * n for t, n in counts.items())
    expected = nats / (math.log(2) * nbytes)
    for B in (32, 7):  # 7 does not divide the 256 rows: the last batch is padded, its padding ignored
        got = score(p, forward, B, rng=np.random.default_rng(B))
        assert got["bpb"] == pytest.approx(expected, rel=1e-9) and got["bytes"] == nbytes
        assert got["tokens"] == p.eval_tokens
        assert got["probed_rows"] >= E.probe_count(E.PROBE_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE)


def test_backend_adapters_give_the_same_bpb(tiny_cache):
    """The one scoring path with the real PyTorch and MLX adapters: same model, same number."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed")
    mx = pytest.importorskip("mlx.core", reason="MLX not installed")
    import backends
    from judge import mlx_adapter, torch_adapter

    p = prepare.get_protocol()
    table = np.random.default_rng(0).normal(0, 0.5, (p.vocab_size, p.vocab_size)).astype(np.float32)  # a bigram model
    info = backends.detect("cpu")
    rows = E.load_rows(p, "holdout", p.holdout_tokens)
    token_bytes = prepare.load_token_bytes(p)
    t_table, m_table = torch.from_numpy(table), mx.array(table)
    via_torch = E.score_split(lambda x: t_table[x.long()], torch_adapter.eval_adapter(info), 32, rows, token_bytes, p.vocab_size)
    via_mlx = E.score_split(lambda x: m_table[x], mlx_adapter.eval_adapter(info), 32, rows, token_bytes, p.vocab_size)
    via_numpy = E.score_split(lambda x: table[x], NumpyAdapter(), 32, rows, token_bytes, p.vocab_size)
    assert via_torch["bpb"] == pytest.approx(via_numpy["bpb"], rel=1e-6)
    assert via_mlx["bpb"] == pytest.approx(via_numpy["bpb"], rel=1e-6)


def test_uniform_model_scores_log2_vocab_bits_per_token(tiny_cache):
    p = prepare.get_protocol()
    got = score(p, lambda x: np.zeros((*x.shape, p.vocab_size), np.float32), 16, "holdout")
    token_bytes = prepare.load_token_bytes(p)
    y = E.load_rows(p, "holdout", p.holdout_tokens).y
    scored = int((token_bytes[y] > 0).sum())
    assert got["bpb"] == pytest.approx(scored * math.log2(p.vocab_size) / int(token_bytes[y].sum()), rel=1e-12)


def looks_ahead(V, fraction):
    """A model that puts a large logit on the next token in rows whose opening tokens hash into `fraction`."""

    def forward(x):
        logits = np.zeros((*x.shape, V), np.float32)
        for b in range(x.shape[0]):
            if (int(x[b, 1]) * 2654435761 + int(x[b, 2])) % 1000 < fraction * 1000:
                logits[b, np.arange(x.shape[1] - 1), x[b, 1:]] = 20.0
        return logits

    return forward


def test_probe_catches_a_model_that_looks_ahead_on_one_row_in_ten(tiny_cache):
    p = prepare.get_protocol()
    forward = looks_ahead(p.vocab_size, 0.10)
    rows = E.load_rows(p, "val", p.eval_tokens)
    hit = sum(looks_ahead(p.vocab_size, 0.10)(rows.x[i:i + 1])[0].max() > 0 for i in range(len(rows.x)))
    assert 0.05 * len(rows.x) < hit < 0.2 * len(rows.x)  # the model really cheats on about a tenth of the rows
    for seed in range(12):  # a secret seed per evaluation: every one of these catches it
        with pytest.raises(E.NonCausalModelError, match="sees the future"):
            score(p, forward, 8, rng=np.random.default_rng(seed))
    assert score(p, forward, 8)["bpb"] < score(p, looks_ahead(p.vocab_size, 0.0), 8)["bpb"]  # unprobed it would win


def test_probe_catches_a_model_that_reads_other_rows(tiny_cache):
    p = prepare.get_protocol()
    V = p.vocab_size

    def neighbour(x):  # row b reads the next token of row b+1 at every position: mixes rows
        logits = np.zeros((*x.shape, V), np.float32)
        nxt = np.roll(x, -1, axis=0)
        for b in range(x.shape[0]):
            logits[b, np.arange(x.shape[1]), nxt[b]] = 3.0
        return logits

    with pytest.raises(E.NonCausalModelError, match="mixes rows|sees the future"):
        score(p, neighbour, 8, rng=np.random.default_rng(0))


# --- graphs and the harness process ------------------------------------------------------------


torch = pytest.importorskip("torch", reason="PyTorch not installed")


class Bigram(torch.nn.Module):
    def __init__(self, V, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=g) * 0.5)

    def forward(self, idx):
        return self.table[idx.long()]


def hand_over_torch(directory: Path, module, B=8, T=None, example=None):
    from backends import detect, torch_rt

    p = prepare.get_protocol()
    directory.mkdir(parents=True, exist_ok=True)
    if example is None:
        graph = torch_rt.export_for_eval(module, directory, B, T or p.max_seq_len, detect("cpu"))
    else:  # export by hand, to build graphs the trainer-side helper would not
        program = torch.export.export(module, (example,))
        if hasattr(module, "forge"):
            program = module.forge(program)
        torch.export.save(program, str(directory / "model.pt2"))
        graph = {"format": "pt2", "batch_size": example.shape[0], "seq_len": example.shape[1]}
    (directory / "facts.json").write_text(json.dumps({"num_steps": 3, "graph": graph}))
    return directory


def run_harness(handover: Path, tmp_path: Path) -> tuple[int, dict, str]:
    out = tmp_path / "result.json"
    proc = subprocess.run(prepare.harness_command(handover, "tiny", out), capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "AUTORESEARCH_BACKEND": "cpu"})
    return proc.returncode, json.loads(out.read_text()), proc.stdout + proc.stderr


def test_harness_scores_an_exported_torch_graph_like_the_model_itself(tiny_cache, tmp_path):
    p = prepare.get_protocol()
    model = Bigram(p.vocab_size)
    code, result, out = run_harness(hand_over_torch(tmp_path / "h", model), tmp_path)
    assert code == 0, out
    table = model.table.detach().numpy()
    direct = score(p, lambda x: table[x], 8)
    assert result["valid"] and result["val_bpb"] == pytest.approx(direct["bpb"], rel=1e-6)
    assert result["holdout_bpb"] == pytest.approx(score(p, lambda x: table[x], 8, "holdout")["bpb"], rel=1e-6)
    assert result["evaluator_hash"] == prepare.evaluator_hash()
    assert result["probed_rows"] >= E.probe_count(p.probe_lookahead, E.PROBE_ESCAPE)  # the protocol's bound
    assert result["lookahead_fraction"] == p.probe_lookahead and result["escape_bound"] <= E.PROBE_ESCAPE
    assert result["batch_size"] == 8 and result["framework"] == "torch"
    assert "val_bpb:" not in out  # the summary block, printed once by whoever shows the run, holds the only one


def test_a_waiting_harness_reads_the_hand_over_only_after_go(tiny_cache, tmp_path):
    """--wait (how the loop starts it, beside the trainer): it prepares, then waits. End of input: it exits
    without a result or a word. `go`: it scores what the hand-over holds then, not what it held at start."""
    import os

    p = prepare.get_protocol()
    env = {**os.environ, "AUTORESEARCH_BACKEND": "cpu"}
    handover = tmp_path / "h"
    handover.mkdir()
    out = tmp_path / "result.json"
    cmd = prepare.harness_command(handover, "tiny", out, wait=True)
    proc = subprocess.run(cmd, input=b"", capture_output=True, timeout=300, env=env)
    assert proc.returncode == 0 and not out.exists() and proc.stdout == proc.stderr == b"", proc

    waiting = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        time.sleep(1.0)
        assert waiting.poll() is None and not out.exists()  # an empty hand-over is not scored: it waits
        model = Bigram(p.vocab_size)
        hand_over_torch(handover, model)  # handed over while it waits
        stdout, _ = waiting.communicate(b"go\n", timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    result = json.loads(out.read_text())
    assert waiting.returncode == 0 and result["valid"], stdout
    table = model.table.detach().numpy()
    assert result["val_bpb"] == pytest.approx(score(p, lambda x: table[x], 8)["bpb"], rel=1e-6)
    assert result["load_seconds"] < result["harness_seconds"]  # timed from the go-ahead


class Stateful(torch.nn.Module):
    def __init__(self, V):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(V, V))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, idx):
        self.calls.add_(1)  # changes between calls: a graph that counts its evaluations
        return self.table[idx.long()] + self.calls


class ReadsAFile(torch.nn.Module):
    """torch.export cannot trace torch.from_file, but a hand-made program can hold it: the forward is
    exported with torch.ones in its place and the node is rewritten to read `path` at evaluation time."""

    def __init__(self, V, path):
        super().__init__()
        self.V, self.path = V, str(path)

    def forward(self, idx):
        peek = torch.ones(16, dtype=torch.uint8).float().sum()
        return torch.zeros(idx.shape[0], idx.shape[1], self.V) + peek

    def forge(self, program):
        for node in program.graph.nodes:
            if node.op == "call_function" and node.target == torch.ops.aten.ones.default:
                node.target = torch.ops.aten.from_file.default
                node.args = (self.path,)
                node.kwargs = {"shared": None, "size": 16, "dtype": torch.uint8, "device": torch.device("cpu"),
                               "pin_memory": False}
        program.graph_module.recompile()
        return program


class Noisy(torch.nn.Module):
    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, idx):
        return torch.randn(idx.shape[0], idx.shape[1], self.V)


@pytest.mark.parametrize("kind", ["stateful", "from_file", "random", "wrong_vocab", "wrong_length"])
def test_harness_refuses_graphs_it_cannot_trust(kind, tiny_cache, tmp_path):
    p = prepare.get_protocol()
    V, T = p.vocab_size, p.max_seq_len
    shard = prepare.split_shards(p, "val")[0]
    example = torch.zeros((8, T), dtype=torch.int32)
    modules = {"stateful": (Stateful(V), example), "from_file": (ReadsAFile(V, shard), example),
               "random": (Noisy(V), example), "wrong_vocab": (Bigram(V // 2), torch.zeros((8, T), dtype=torch.int32)),
               "wrong_length": (Bigram(V), torch.zeros((8, T // 2), dtype=torch.int32))}
    module, ex = modules[kind]
    code, result, out = run_harness(hand_over_torch(tmp_path / "h", module, example=ex), tmp_path)
    assert code == 2 and result["valid"] is False and result["kind"] == "graph", out
    expected = {"stateful": "writes", "from_file": "from_file", "random": "randomness",
                "wrong_vocab": "logits must be", "wrong_length": "sequences of 128 tokens"}[kind]
    assert expected in result["reason"]
    assert "val_bpb" not in result


def test_harness_refuses_missing_or_double_hand_over(tiny_cache, tmp_path):
    p = prepare.get_protocol()
    (tmp_path / "empty").mkdir()
    with pytest.raises(GraphError, match="handed over no model"):
        load_graph(tmp_path / "empty", p.max_seq_len, p.vocab_size)
    d = hand_over_torch(tmp_path / "two", Bigram(p.vocab_size))
    (d / "model.mlxfn").write_bytes(b"x")
    with pytest.raises(GraphError, match="two models"):
        load_graph(d, p.max_seq_len, p.vocab_size)
    (d / "model.mlxfn").unlink()
    (d / "model.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(GraphError, match="not a zip archive"):
        load_graph(d, p.max_seq_len, p.vocab_size)


def test_harness_stops_on_damaged_evaluation_data(tiny_cache, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    p = prepare.get_protocol()
    shard = prepare.split_shards(p, "val")[0]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 32] = bytes(b ^ 0xFF for b in data[mid:mid + 32])  # footer intact, content not
    shard.write_bytes(bytes(data))
    code, result, _ = run_harness(hand_over_torch(tmp_path / "h", Bigram(p.vocab_size)), tmp_path)
    assert code == 3 and result["kind"] == "data" and f"uv run prepare.py --protocol {p.name}" in result["reason"]


def test_evaluator_hash_covers_every_piece_of_evaluation_code(tmp_path, monkeypatch):
    """Editing any file or function that turns a graph into a score changes the hash."""
    h = prepare.evaluator_hash()
    assert len(h) == 12
    monkeypatch.setenv("AUTORESEARCH_PROTOCOL", "standard")
    assert prepare.evaluator_hash() == h  # protocol-independent
    copy = tmp_path / "repo"
    for f in ("judge",):
        shutil.copytree(REPO / f, copy / f, ignore=shutil.ignore_patterns("__pycache__"))
    from data.loader import BestFitPacker
    from judge import entry

    monkeypatch.setattr(entry, "REPO", copy)
    assert prepare.evaluator_hash() == h
    edits = [("judge/evaluate.py", "PROBE_ESCAPE = 1e-3", "PROBE_ESCAPE = 1e-2"),
             ("judge/graphs.py", "MAX_FACTS_BYTES = 1 << 20", "MAX_FACTS_BYTES = 1 << 21"),
             ("judge/pt2.py", '"relu": ("default",), ', '"relu": ("default",), "rand": ("default",), '),
             ("judge/harness.py", "EXIT_GRAPH, EXIT_DATA", "EXIT_GRAPH , EXIT_DATA"),
             ("judge/torch_adapter.py", "chunk_elements: int = 1 << 24", "chunk_elements: int = 1 << 20"),
             ("judge/mlx_adapter.py", "nll = mx.logsumexp(part, axis=-1) - picked", "nll = mx.logsumexp(part, axis=-1)")]
    for rel, old, new in edits:
        path = copy / rel
        text = path.read_text()
        assert old in text, (rel, old)
        path.write_text(text.replace(old, new, 1))
        assert prepare.evaluator_hash() != h, rel
        path.write_text(text)
    (copy / "judge" / "extra.py").write_text("X = 1\n")  # a file added to judge/ is evaluation code too
    assert prepare.evaluator_hash() != h
    (copy / "judge" / "extra.py").unlink()
    stream = list(entry.STREAM_CODE)
    stream[stream.index(BestFitPacker)] = OtherPacker  # the packing code that builds the rows
    monkeypatch.setattr(entry, "STREAM_CODE", tuple(stream))
    assert prepare.evaluator_hash() != h


class OtherPacker:
    def fill(self, rows):
        return 0


@pytest.mark.slow  # an end-to-end run through loop.py (CI runs the slow set)
def test_mlx_hand_over_scores_like_torch(tiny_cache, tmp_path):
    mx = pytest.importorskip("mlx.core", reason="MLX not installed")
    from backends import mlx_rt

    p = prepare.get_protocol()
    model = Bigram(p.vocab_size, seed=3)
    table = model.table.detach().numpy()
    m_table = mx.array(table)
    d = tmp_path / "m"
    d.mkdir()
    graph = mlx_rt.export_for_eval(lambda idx: m_table[idx], d, 16, p.max_seq_len)
    (d / "facts.json").write_text(json.dumps({"graph": graph}))
    code, via_mlx, out = run_harness(d, tmp_path)
    assert code == 0, out
    code, via_torch, out = run_harness(hand_over_torch(tmp_path / "t", model, B=16), tmp_path)
    assert code == 0, out
    assert via_mlx["framework"] == "mlx" and via_mlx["val_bpb"] == pytest.approx(via_torch["val_bpb"], rel=1e-5)


def test_summary_block_format_and_parse():
    result = {"val_bpb": 0.9979, "protocol": "standard"}
    facts = dict(training_seconds=300.06, total_seconds=325.94, peak_vram_mb=45060.2, mfu_percent=39.8,
                 total_tokens=499_600_000, num_steps=953, num_params=50_300_000, depth=8, backend="cuda",
                 device="NVIDIA H100 80GB HBM3", hyperparams={"DEPTH": 8, "MATRIX_LR": 0.04})
    out = "training log ...\n" + prepare.format_summary(result, facts)
    block = out.split("---\n", 1)[1].splitlines()
    assert block[:9] == ["val_bpb:          0.997900", "training_seconds: 300.1", "total_seconds:    325.9",
                         "peak_vram_mb:     45060.2", "mfu_percent:      39.80", "total_tokens_M:   499.6",
                         "num_steps:        953", "num_params_M:     50.3", "depth:            8"]
    assert block[9:12] == ["backend:          cuda", "device:           NVIDIA H100 80GB HBM3", "protocol:         standard"]
    assert block[12] == 'hyperparams:      {"DEPTH": 8, "MATRIX_LR": 0.04}'
    parsed = prepare.parse_summary(out)
    assert list(parsed) == prepare.SUMMARY_KEYS
    assert parsed["val_bpb"] == 0.9979 and parsed["num_steps"] == 953 and parsed["mfu_percent"] == 39.8
    assert parsed["hyperparams"] == {"DEPTH": 8, "MATRIX_LR": 0.04} and parsed["device"] == "NVIDIA H100 80GB HBM3"
    out = prepare.format_summary(result, {**facts, "mfu_percent": None})
    assert "mfu_percent:      n/a" in out and prepare.parse_summary(out)["mfu_percent"] is None
    assert prepare.parse_summary("no summary here\n---\n") == {}


def test_links_and_fifos_in_a_hand_over_are_never_followed(tiny_cache, tmp_path):
    """A trainer decides what its hand-over directory holds: a link to the validation data or a FIFO that
    blocks its reader must not be read by the loop (facts) or the harness (graph)."""
    import os

    from judge.graphs import read_facts

    p = prepare.get_protocol()
    d = tmp_path / "h"
    d.mkdir()
    val = prepare.split_shards(p, "val")[0]
    (d / "facts.json").symlink_to(val)
    os.symlink(val, d / "model.pt2")
    assert read_facts(d) == {}
    with pytest.raises(GraphError, match="not a regular file"):
        load_graph(d, p.max_seq_len, p.vocab_size)
    (d / "facts.json").unlink()
    os.mkfifo(d / "facts.json")
    assert read_facts(d) == {}  # returns at once instead of waiting for a writer
