"""Tests for data/loader.py and data/tokens.py: packed batches, determinism, best-fit packing, validation
coverage, and one stream whether documents come from the token cache or are tokenized on the fly.

Run: uv run pytest tests/test_data_loader.py      (CPU, no network, ~15 s)
"""

from __future__ import annotations

import os
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from data_helpers import split_at_bos, val_documents

import prepare
from data import loader, tokens


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

    packer = loader.BestFitPacker(blocks(), capacity=65, buffer_docs=100)
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
    rows = []
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
    assert min(sizes.values()) > loader.BUFFER_DOCS
    start = 0
    for shard_id, n in sizes.items():
        texts = docs[start : start + n]
        start += n
        pq.write_table(pa.table({"text": texts}), tmp_path / "tiny" / "data" / prepare.shard_name(shard_id), row_group_size=100)
    tokens.ensure_pretokenized(p)
    cases = [("val", 0), ("holdout", 0), ("train", 0), ("train", 5)]
    cached = [one_epoch(p, split, seed) for split, seed in cases]
    fingerprint = prepare.Tokenizer.load(p).fingerprint
    for shard in (tmp_path / "tiny" / "data").glob("*.parquet"):
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a copy that did not keep times
        assert tokens.load_token_cache(p, shard, fingerprint) is None
    for (split, seed), expected in zip(cases, cached):
        got = one_epoch(p, split, seed)
        assert got.shape == expected.shape and (got == expected).all(), (split, seed)
    assert cached[0].shape[0] > 200 and not (cached[2] == cached[3]).all()
