"""The token cache: each shard tokenized once into a flat token array plus document offsets.

<protocol dir>/tokens/<tokenizer fingerprint>/shard_NNNNN.{tokens,offsets}.npy hold a shard's documents,
each opening with BOS: document i is tokens[offsets[i]:offsets[i+1]]. The .meta.json beside them,
written last, records the parquet file's size and mtime; a cache whose shard changed is ignored and the
dataloader tokenizes that shard on the fly instead, with the same result.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from data.files import atomic_save_npy, atomic_write_bytes, corrupt_error, read_texts
from data.protocols import Protocol, split_shards
from data.tokenizer import Tokenizer

PRETOKENIZE_TRAIN_SHARDS = 32  # hub protocols: training shards tokenized ahead; later ones on the fly


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokenize_texts(tok: Tokenizer, texts: list[str], num_threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) for a list of documents: document i is tokens[offsets[i]:offsets[i+1]], BOS first."""
    batch = tok.enc.encode_ordinary_batch(texts, num_threads=num_threads)
    lengths = np.fromiter((len(ids) + 1 for ids in batch), dtype=np.int64, count=len(batch))
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = itertools.chain.from_iterable(itertools.chain((tok.bos_token_id,), ids) for ids in batch)
    tokens = np.fromiter(flat, dtype=_token_dtype(tok.vocab_size), count=int(offsets[-1]))
    return tokens, offsets


def token_cache_paths(shard: Path, fingerprint: str) -> tuple[Path, Path, Path]:
    """The (tokens, offsets, meta) files of a shard's cache made with the tokenizer `fingerprint`."""
    base = shard.parent.parent / "tokens" / fingerprint / shard.stem  # <protocol dir>/tokens/<tokenizer>/
    return base.with_suffix(".tokens.npy"), base.with_suffix(".offsets.npy"), base.with_suffix(".meta.json")


def _shard_stat(shard: Path) -> dict[str, int]:
    st = shard.stat()
    return {"parquet_bytes": st.st_size, "parquet_mtime_ns": st.st_mtime_ns}


def load_token_cache(p: Protocol, shard: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The shard's pre-tokenized (tokens, offsets), or None when missing or stale (the parquet changed)."""
    tokens_path, offsets_path, meta_path = token_cache_paths(shard, fingerprint)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    if {k: meta.get(k) for k in ("parquet_bytes", "parquet_mtime_ns")} != _shard_stat(shard):
        return None
    for path in (tokens_path, offsets_path):
        if not path.exists():
            return None
    try:
        tokens = np.load(tokens_path, mmap_mode="r")
        offsets = np.load(offsets_path)
    except (ValueError, OSError, EOFError) as e:
        raise corrupt_error(tokens_path.parent, p, f"{type(e).__name__} in {tokens_path.name}") from None
    if offsets.ndim != 1 or len(offsets) != meta.get("docs", -1) + 1 or int(offsets[-1]) != len(tokens):
        raise corrupt_error(tokens_path, p, "token and offset files disagree")
    return tokens, offsets


def _pretokenize_shard(p: Protocol, tok: Tokenizer, shard: Path) -> None:
    """Tokenize one shard into its cache files, the meta file last."""
    parts = [tokenize_texts(tok, texts) for texts in read_texts(shard, p)]
    tokens = np.concatenate([t for t, _ in parts]) if parts else np.zeros(0, _token_dtype(tok.vocab_size))
    shifts = np.cumsum([0] + [len(t) for t, _ in parts])
    offsets = np.concatenate([[0]] + [o[1:] + s for (_, o), s in zip(parts, shifts)]).astype(np.int64)
    tokens_path, offsets_path, meta_path = token_cache_paths(shard, tok.fingerprint)
    atomic_save_npy(tokens_path, tokens)
    atomic_save_npy(offsets_path, offsets)
    meta = {**_shard_stat(shard), "docs": len(offsets) - 1, "tokens": len(tokens)}
    atomic_write_bytes(meta_path, json.dumps(meta).encode())  # written last: marks completion


def ensure_pretokenized(p: Protocol) -> bool:
    """Tokenize into the cache every evaluation shard and the first training shards whose cache is missing or stale."""
    from tqdm import tqdm

    train = split_shards(p, "train")
    if p.source.startswith("hub"):
        train = train[:PRETOKENIZE_TRAIN_SHARDS]  # a 5-minute run reads only the first few shards
    shards = split_shards(p, "val") + split_shards(p, "holdout") + train
    tok = Tokenizer.load(p)
    todo = [s for s in shards if load_token_cache(p, s, tok.fingerprint) is None]
    if not todo:
        return False
    for shard in tqdm(todo, desc=f"{p.name}: tokenizing shards", unit="shard", disable=len(todo) < 8):
        _pretokenize_shard(p, tok, shard)
    return True

