"""Tests for data/integrity.py: damaged data is named, with the fix, and prepare makes it again.

Run: uv run pytest tests/test_data_integrity.py      (CPU, no network, ~20 s)
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from data_helpers import flip_middle, private_tiny, run_cli

import prepare
from data.files import check_parquet
from data.integrity import sha256_file


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


def test_manifest_records_the_hash_of_everything_evaluation_reads(tiny_cache):
    p = prepare.get_protocol()
    manifest = json.loads((tiny_cache / "tiny" / "prepared.json").read_text())
    fingerprint = prepare.Tokenizer.load(p).fingerprint
    assert manifest["sha256"]["val"] == {
        f"{rel}": sha256_file(tiny_cache / "tiny" / rel)
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
    assert val.stat().st_size == len(original[val]) and check_parquet(val, p) > 0  # the footer still reads
    message = rf"{val} does not match the content hash recorded when it was prepared.*run: uv run prepare.py --protocol tiny"
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
    with pytest.raises(prepare.PrepareError, match=rf"{meta} is missing; run: uv run prepare.py --protocol tiny"):
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
                                                   r"run: uv run prepare.py --protocol tiny to record them"):
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
