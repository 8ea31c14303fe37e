"""Tests for prepare.py: the contract a trainer imports and the command that prepares a protocol.

Run: uv run pytest tests/test_prepare.py      (CPU, no network, ~20 s)

The machinery behind it is tested module by module in tests/test_data_*.py.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pristine
import pytest
from data_helpers import REPO, private_tiny, run_cli

import prepare

# --- the contract -------------------------------------------------------------------


def test_the_contract_is_one_short_file_that_names_what_trainers_and_the_loop_use():
    source = (REPO / "prepare.py").read_text()
    assert len(source.splitlines()) < 300
    names = set(prepare.__all__)
    for name in names:
        assert getattr(prepare, name) is not None, name
    def used_by(paths) -> set[str]:  # every prepare.<name> these files use
        return {node.attr for path in paths for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "prepare"
                and not node.attr.startswith("__")}  # module attributes such as __file__ are no API

    trainers = used_by(map(pristine.trainer, pristine.TRAINERS))
    used = trainers | used_by([REPO / "loop.py", *REPO.glob("judge/*.py"), *REPO.glob("research/*.py")])
    assert used and used <= names, sorted(used - names)
    doc = ast.get_docstring(ast.parse(source))
    assert {"training_protocol", "make_dataloader", "hand_over"} <= trainers
    for name in trainers:  # documented where an agent reads
        assert name in doc, name


def test_importing_the_contract_loads_no_download_or_training_machinery():
    code = "import sys, prepare; print(sorted(m for m in ('huggingface_hub', 'rustbpe', 'tqdm') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- protocols ----------------------------------------------------------------------


def test_standard_protocol_uses_reference_constants():
    p = prepare.PROTOCOLS["standard"]
    assert (p.dataset, p.vocab_size, p.max_seq_len, p.eval_tokens, p.time_budget) == (
        "karpathy/climbmix-400b-shuffle", 8192, 2048, 40 * 524288, 300)
    assert (p.max_shard, p.val_shard) == (6542, 6542) and p.holdout_shard not in range(p.default_num_shards)
    for p in prepare.PROTOCOLS.values():
        assert p.holdout_tokens < p.eval_tokens and p.val_shard != p.holdout_shard
        assert p.eval_tokens % (256 * p.max_seq_len) == 0  # whole steps for power-of-two batches up to 256


def test_protocol_resolution_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    monkeypatch.delenv("AUTORESEARCH_PROTOCOL", raising=False)
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    with pytest.raises(prepare.PrepareError, match=r"uv run prepare.py --protocol tiny"):
        prepare.get_protocol()
    prepare.remember_protocol(prepare.PROTOCOLS["compact"])
    assert prepare.get_protocol().name == "compact"  # remembered
    monkeypatch.setenv("AUTORESEARCH_PROTOCOL", "tiny")
    assert prepare.get_protocol().name == "tiny"  # env beats remembered
    assert prepare.get_protocol("standard").name == "standard"  # argument beats env
    assert prepare.protocol_dir(prepare.get_protocol()) == tmp_path / "tiny"
    p = prepare.get_protocol()
    assert p.time_budget == 60 and not p.time_budget_overridden
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "12.5")
    p = prepare.get_protocol()
    assert p.time_budget == 12.5 and p.time_budget_overridden
    monkeypatch.setenv("AUTORESEARCH_TIME_BUDGET", "soon")
    with pytest.raises(prepare.PrepareError, match="AUTORESEARCH_TIME_BUDGET"):
        prepare.get_protocol()
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET")
    with pytest.raises(prepare.PrepareError, match="Unknown protocol 'huge'.*standard, compact, tiny"):
        prepare.get_protocol("huge")


# --- the command --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--protocol", "huge"], 1, "Unknown protocol 'huge'"),
        (["--protocol", "tiny", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["--protocol", "tiny", "--num-shards", "0"], 2, "--num-shards must be"),
        (["--num-shards", "many"], 2, "invalid int value"),
        (["--protocol", "tiny", "--download-workers", "0"], 2, "--download-workers must be at least 1"),
    ],
)
def test_cli_errors_are_one_sentence_without_traceback(args, code, message, tmp_path):
    proc = run_cli(*args, env={"AUTORESEARCH_CACHE": str(tmp_path)})
    assert proc.returncode == code
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_tiny_prepare_is_idempotent(tiny_cache):
    p = prepare.get_protocol()
    assert prepare.is_prepared(p)
    assert (tiny_cache / "protocol").read_text().strip() == "tiny"
    before = {f: f.stat().st_mtime_ns for f in (tiny_cache / "tiny").rglob("*") if f.is_file()}
    proc = run_cli("--protocol", "tiny")
    assert proc.returncode == 0, proc.stderr
    assert "nothing to do" in proc.stdout
    after = {f: f.stat().st_mtime_ns for f in (tiny_cache / "tiny").rglob("*") if f.is_file()}
    assert after == before


# --- what a trainer may read --------------------------------------------------------

_AUDIT = r"""
import json, os, sys
from pathlib import Path
opened, listed = set(), set()

def record(kind, path):
    if isinstance(path, (str, bytes, os.PathLike)):
        (opened if kind == "open" else listed).add(str(Path(os.fsdecode(path)).resolve()))

sys.addaudithook(lambda event, args: record("open", args[0]) if event == "open" else
                 record("list", args[0]) if event in ("os.listdir", "os.scandir") else None)
import pyarrow.parquet as pq
import prepare

class ParquetFile(pq.ParquetFile):  # pyarrow opens files in C++, out of the audit hook's sight
    def __init__(self, source, *args, **kwargs):
        record("open", source)
        super().__init__(source, *args, **kwargs)

read_metadata = pq.read_metadata
pq.ParquetFile = ParquetFile
pq.read_metadata = lambda where, *a, **k: (record("open", where), read_metadata(where, *a, **k))[1]
p = prepare.get_protocol()
for seed in (0, 3):
    loader = prepare.make_dataloader(p, 16, None, "train", seed=seed)
    while next(loader)[2] == 1:  # one whole epoch
        pass
prepare.load_token_bytes(p)
print(json.dumps({"opened": sorted(opened), "listed": sorted(listed)}))
"""


def test_training_reads_only_train_data_and_tokenizer_paths(tiny_cache, tmp_path, monkeypatch):
    """What a trainer's sandbox must show: get_protocol(), a whole training epoch (shuffled and not) and
    the token byte lengths open nothing under the cache but train_data_paths and tokenizer_paths."""
    from data.tokens import token_cache_paths

    p, cache = private_tiny(tiny_cache, tmp_path, monkeypatch)
    train = prepare.split_shards(p, "train")
    for f in token_cache_paths(train[0], prepare.Tokenizer.load(p).fingerprint):
        f.unlink()  # one shard without its cache: read from the parquet itself
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_PROTOCOL"}  # the marker names it
    proc = subprocess.run([sys.executable, "-c", _AUDIT], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.splitlines()[-1])
    root = str(cache.resolve())
    opened = {f for f in seen["opened"] if f.startswith(root) and Path(f).exists()}  # absent caches: tried, not read
    allowed = {str(f.resolve()) for f in prepare.train_data_paths(p) + prepare.tokenizer_paths(p)}
    assert opened <= allowed, sorted(opened - allowed)
    assert str(train[0].resolve()) in opened and str((cache / "protocol").resolve()) in opened  # the hook saw them
    assert sum(".tokens.npy" in f for f in opened) == len(train) - 1
    assert {f for f in seen["listed"] if f.startswith(root)} == {str((cache / "tiny" / "data").resolve())}
    denied = {str(f.resolve()) for s in ("val", "holdout") for f in prepare.eval_data_paths(p, s)}
    assert not denied & allowed and not denied & opened
