"""Dataloader throughput: prepare.make_dataloader against a straightforward pure-Python best-fit packer.

Run: .venv/bin/python bench/bench_dataloader.py [--batches 30] [--batch-size 128] [--seq-len 2048]

Uses the tiny protocol's training split (Shakespeare, prepared on the fly if needed, in the usual cache
or AUTORESEARCH_CACHE). Its documents are scene pieces of at most 256 tokens, so a 2048-token row holds
about eight of them: more packing decisions per token than typical web text. Prints tokens/s for the
pre-tokenized path, the tokenize-on-the-fly fallback, and the pure-Python packer (which scans the
buffer for every document, as the reference does) fed the same documents, and checks the outputs agree.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare
from data.loader import BUFFER_DOCS, doc_blocks
from data.tokens import load_token_cache


def python_best_fit(blocks, batch_size: int, seq_len: int, buffer_docs: int = BUFFER_DOCS):
    """Best-fit packing the straightforward way: Python lists, a linear scan of the buffer per document."""
    capacity = seq_len + 1
    buffer: list[list[int]] = []
    pending = None
    epoch = 0
    while True:
        rows = []
        for _ in range(batch_size):
            row: list[int] = []
            while len(row) < capacity:
                while len(buffer) < buffer_docs:
                    block = pending if pending is not None else next(blocks)
                    pending = None
                    tokens, offsets, block_epoch = block
                    if buffer and block_epoch != epoch:  # drain the epoch first, like prepare's packer
                        pending = block
                        break
                    epoch = block_epoch
                    flat = tokens.tolist()
                    bounds = offsets.tolist()
                    buffer.extend(flat[a:b] for a, b in zip(bounds[:-1], bounds[1:]))
                space = capacity - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= space:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row.extend(buffer.pop(best))
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(shortest)[:space])
            rows.append(row)
        array = np.array(rows, dtype=np.int32)
        yield array[:, :-1], array[:, 1:], epoch


def tokens_per_second(loader, batches: int, tokens_per_batch: int) -> tuple[float, list[np.ndarray]]:
    first = [next(loader)[0]]  # warm-up: opens shards, fills the buffer
    t0 = time.perf_counter()
    for _ in range(batches):
        first.append(next(loader)[0])
    return batches * tokens_per_batch / (time.perf_counter() - t0), first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--python-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()

    p = prepare.PROTOCOLS["tiny"]
    if not prepare.is_prepared(p):
        prepare.prepare(p)
    B, T = args.batch_size, args.seq_len
    per_batch = B * T
    tok = prepare.Tokenizer.load(p)
    shards = prepare.split_shards(p, "train")
    n_tokens = sum(len(load_token_cache(p, s, tok.fingerprint)[0]) for s in shards)
    print(f"data: tiny protocol training split, {len(shards)} shards, {n_tokens / 1e6:.2f}M tokens, "
          f"documents of at most {p.max_seq_len} tokens (+BOS)")
    print(f"batch: B={B} T={T} ({per_batch:,} tokens), {os.cpu_count()} CPU cores")

    ours, ours_rows = tokens_per_second(prepare.make_dataloader(p, B, T, "train"), args.batches, per_batch)
    print(f"prepare.make_dataloader, pre-tokenized:      {ours / 1e6:8.2f}M tokens/s")

    with tempfile.TemporaryDirectory() as tmp:  # the same data without its token cache
        shutil.copytree(prepare.protocol_dir(p), Path(tmp) / p.name, ignore=shutil.ignore_patterns("tokens"))
        cache = os.environ.get("AUTORESEARCH_CACHE")
        os.environ["AUTORESEARCH_CACHE"] = tmp
        try:
            fly, _ = tokens_per_second(prepare.make_dataloader(p, B, T, "train"), min(args.batches, 10), per_batch)
        finally:
            os.environ.pop("AUTORESEARCH_CACHE") if cache is None else os.environ.update(AUTORESEARCH_CACHE=cache)
    print(f"prepare.make_dataloader, tokenize on the fly: {fly / 1e6:8.2f}M tokens/s")

    blocks = doc_blocks(p, tok, shards, None)
    py, py_rows = tokens_per_second(python_best_fit(blocks, B, T), args.python_batches, per_batch)
    print(f"pure-Python best-fit packer, same documents:  {py / 1e6:8.2f}M tokens/s")
    same = all((a == b).all() for a, b in zip(ours_rows, py_rows))
    print(f"speed-up: {ours / py:.0f}x; identical batches for the first {len(py_rows)}: {'yes' if same else 'NO'}")
    if not same:  # a faster loader that packs other batches is a bug, not a speed-up
        sys.exit("the loader's batches differ from the reference packer's")


if __name__ == "__main__":
    main()
