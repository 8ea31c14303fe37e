"""Tests for data/tokenizer.py: the round trip and the byte length of every token.

Run: uv run pytest tests/test_data_tokenizer.py      (CPU, no network, a few seconds)
"""

from __future__ import annotations

import numpy as np

import prepare


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
