"""The dataloader: BOS-aligned best-fit packing of documents into (B, T) NumPy batches.

Documents come in blocks of REFILL_DOCS over a shard's document order, from the token cache or tokenized
on the fly (the same blocks either way); the packer fills rows of T+1 tokens from a buffer of BUFFER_DOCS
documents. This is the code that builds the validation stream, so the evaluator hash covers it.
"""

from __future__ import annotations

import bisect
import itertools
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from data import PrepareError
from data.files import check_parquet, read_texts
from data.protocols import SPLITS, Protocol, data_dir, split_shards
from data.tokenizer import Tokenizer
from data.tokens import load_token_cache, tokenize_texts

BUFFER_DOCS = 1000  # best-fit packing chooses among this many buffered documents
REFILL_DOCS = 128  # documents are added to the buffer this many at a time

Block = tuple[np.ndarray, np.ndarray, int]  # (tokens, offsets, epoch): documents tokens[offsets[i]:offsets[i+1]]


def shard_blocks(p: Protocol, tok: Tokenizer, shard: Path, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A shard's documents in groups of REFILL_DOCS, from the token cache or, failing that, tokenized now."""
    cached = load_token_cache(p, shard, tok.fingerprint)
    if cached is None:
        yield from _prefetch(tokenized_blocks(p, tok, shard, order))
        return
    tokens, offsets = cached
    n_docs = len(offsets) - 1
    for start in range(0, n_docs, REFILL_DOCS):
        if order is None:
            a, b = int(offsets[start]), int(offsets[min(start + REFILL_DOCS, n_docs)])
            yield np.asarray(tokens[a:b]), offsets[start : min(start + REFILL_DOCS, n_docs) + 1] - a
        else:
            docs = [tokens[offsets[i] : offsets[i + 1]] for i in order[start : start + REFILL_DOCS]]
            lengths = np.array([len(d) for d in docs], dtype=np.int64)
            yield np.concatenate(docs), np.concatenate([[0], np.cumsum(lengths)])


def tokenized_blocks(p: Protocol, tok: Tokenizer, shard: Path, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A shard's documents in groups of REFILL_DOCS, tokenized here; the same groups as the token cache gives.

    Groups run over the shard's document order (or `order`), never over parquet row groups: documents
    left over at the end of a row group join the next one's. In document order the shard is streamed a
    row group at a time; a shuffled `order` needs the whole shard's text in memory, 1024 documents
    tokenized at a time.
    """
    groups: Iterable[list[str]] = read_texts(shard, p)
    if order is not None:
        everything = list(itertools.chain.from_iterable(groups))
        groups = ([everything[i] for i in order[k : k + 1024]] for k in range(0, len(order), 1024))
    pending: list[str] = []
    for texts in itertools.chain(groups, [None]):
        if texts is not None:
            pending.extend(texts)
            n = len(pending) - len(pending) % REFILL_DOCS  # whole groups now; the rest waits for more
        else:
            n = len(pending)  # the shard's last, shorter group
        if not n:
            continue
        batch, pending = pending[:n], pending[n:]
        tokens, offsets = tokenize_texts(tok, batch)
        for start in range(0, n, REFILL_DOCS):
            stop = min(start + REFILL_DOCS, n)
            a = int(offsets[start])
            yield tokens[a : offsets[stop]], offsets[start : stop + 1] - a


def _prefetch(items: Iterator[Any], depth: int = 64) -> Iterator[Any]:
    """Run an iterator in a background thread (tokenization releases the GIL), re-raising its errors here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put(e)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer is gone: let the worker end


def doc_blocks(p: Protocol, tok: Tokenizer, shards: list[Path], shuffle_seed: int | None) -> Iterator[Block]:
    """Endless document blocks over `shards`, epoch after epoch; shuffled per epoch when a seed is given."""
    for epoch in itertools.count(1):
        produced = False
        rng = np.random.default_rng([shuffle_seed, epoch]) if shuffle_seed is not None else None
        for i in rng.permutation(len(shards)) if rng is not None else range(len(shards)):
            order = None
            if rng is not None:
                cached = load_token_cache(p, shards[i], tok.fingerprint)
                n_docs = len(cached[1]) - 1 if cached else check_parquet(shards[i], p)
                order = rng.permutation(n_docs)
            for tokens, offsets in shard_blocks(p, tok, shards[i], order):
                produced = True
                yield tokens, offsets, epoch
        if not produced:
            raise PrepareError(f"{', '.join(s.name for s in shards)} in {shards[0].parent} hold no documents; "
                               f"delete them and rerun: uv run prepare.py --protocol {p.name}")


class BestFitPacker:
    """Best-fit packing of BOS-prefixed documents into rows with crop-to-fill and no padding.

    Each row of `capacity` tokens takes the largest buffered document that fits the space left; when
    none fits, the shortest is cropped to fill the row exactly (the rest of it is dropped). Ties go to
    the document buffered first. The output is identical to scanning the buffer per document, but a
    sorted index of lengths makes each choice O(log n). At an epoch boundary the buffer is drained
    before the next epoch's documents enter, so a small split never repeats text within one pass.
    """

    def __init__(self, blocks: Iterator[Block], capacity: int, buffer_docs: int = BUFFER_DOCS) -> None:
        self.capacity = capacity
        self.epoch = 0
        self._blocks = blocks
        self._buffer_docs = buffer_docs
        self._by_length: dict[int, deque] = {}
        self._lengths: list[int] = []  # sorted distinct lengths present in the buffer
        self._count = 0
        self._pending: Block | None = None

    def _refill(self) -> None:
        while self._count < self._buffer_docs:
            block = self._pending if self._pending is not None else next(self._blocks)
            self._pending = None
            tokens, offsets, epoch = block
            if self._count and epoch != self.epoch:
                self._pending = block  # drain this epoch first
                return
            self.epoch = epoch
            bounds = offsets.tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                self._push(tokens[a:b])

    def _push(self, doc: np.ndarray) -> None:
        n = len(doc)
        same = self._by_length.get(n)
        if same is None:
            same = self._by_length[n] = deque()
            bisect.insort(self._lengths, n)
        same.append(doc)
        self._count += 1

    def _pop(self, index: int) -> np.ndarray:
        n = self._lengths[index]
        same = self._by_length[n]
        doc = same.popleft()
        if not same:
            del self._by_length[n]
            del self._lengths[index]
        self._count -= 1
        return doc

    def fill(self, rows: np.ndarray) -> int:
        """Fill every row of `rows` (B, capacity) in place; returns the epoch of the newest documents."""
        cap = self.capacity
        for row in rows:
            pos = 0
            while pos < cap:
                self._refill()
                space = cap - pos
                i = bisect.bisect_right(self._lengths, space) - 1
                if i >= 0:
                    doc = self._pop(i)
                    row[pos : pos + len(doc)] = doc
                    pos += len(doc)
                else:
                    row[pos:] = self._pop(0)[:space]
                    pos = cap
        return self.epoch


def make_dataloader(
    p: Protocol, batch_size: int, seq_len: int | None = None, split: str = "train", seed: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Endless (inputs, targets, epoch) batches: int32 (B, T) NumPy arrays, every row opening with BOS.

    Rows of T+1 tokens are filled by best-fit packing; targets are inputs shifted by one. The
    validation and holdout streams are always the same; `seed` != 0 reshuffles training shards and
    documents every epoch.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    T = seq_len or p.max_seq_len
    if batch_size < 1 or T < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {T}")
    tok = Tokenizer.load(p)
    shards = split_shards(p, split)
    if not shards or not all(s.exists() for s in shards):
        raise PrepareError(f"Protocol '{p.name}' has no {split} data in {data_dir(p)}; run: uv run prepare.py --protocol {p.name}")
    packer = BestFitPacker(doc_blocks(p, tok, shards, seed if split == "train" and seed else None), T + 1)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        while True:
            rows = np.empty((batch_size, T + 1), dtype=np.int32)
            epoch = packer.fill(rows)
            yield np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]), epoch

    return batches()

