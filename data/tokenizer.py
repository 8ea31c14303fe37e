"""The tokenizer: byte-level BPE trained with rustbpe, served with tiktoken, and the byte length of every token.

GPT-4's split pattern with numbers in groups of 1-2; the last 4 ids are reserved special tokens, the first
of them BOS. Byte lengths come from the merge table, never from decoding an id (see token_byte_lengths).
"""

from __future__ import annotations

import hashlib
import pickle
import time
from typing import Iterable, Iterator

import numpy as np
import tiktoken

from data import PrepareError
from data.files import atomic_save_npy, atomic_write_bytes, corrupt_error, read_texts
from data.protocols import Protocol, split_shards, tokenizer_dir

# GPT-4 split pattern with numbers in groups of 1-2 instead of 1-3 (reference).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(4))
BOS_TOKEN = SPECIAL_TOKENS[0]
DOC_CHAR_CAP = 10_000  # tokenizer training sees at most this many characters of one document
TOKENIZER_MAX_CHARS = 1_000_000_000  # ... and about this many characters in all


class Tokenizer:
    """Byte-level BPE served by tiktoken; ids 0..V-5 are merges, the last 4 are reserved, the first of them BOS."""

    def __init__(self, enc: tiktoken.Encoding, fingerprint: str = "") -> None:
        self.enc = enc
        self.bos_token_id: int = enc.encode_single_token(BOS_TOKEN)
        self.vocab_size: int = enc.n_vocab
        self.fingerprint = fingerprint  # names the token cache made with this tokenizer

    @classmethod
    def load(cls, p: Protocol) -> Tokenizer:
        """Load the protocol's trained tokenizer (prepare.py must have run)."""
        path = tokenizer_dir(p) / "tokenizer.pkl"
        try:
            raw = path.read_bytes()
            saved = pickle.loads(raw)
        except FileNotFoundError:
            raise PrepareError(f"Protocol '{p.name}' has no tokenizer yet; run: uv run prepare.py --protocol {p.name}") from None
        except (pickle.UnpicklingError, EOFError, OSError) as e:
            raise corrupt_error(path, p, type(e).__name__) from None
        return cls(_encoding(p, saved["pattern"], saved["mergeable_ranks"]), hashlib.sha256(raw).hexdigest()[:12])

    def encode(self, text: str | list[str], prepend_bos: bool = False, num_threads: int = 8) -> list[int] | list[list[int]]:
        """Token ids of a string, or of each string of a list (encoded in parallel threads)."""
        if isinstance(text, str):
            ids = self.enc.encode_ordinary(text)
            return [self.bos_token_id] + ids if prepend_bos else ids
        if not isinstance(text, list):
            raise TypeError(f"encode takes a str or a list of str, not {type(text).__name__}")
        batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return [[self.bos_token_id] + ids for ids in batch] if prepend_bos else batch

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (special tokens appear by name)."""
        return self.enc.decode(list(ids))


def _encoding(p: Protocol, pattern: str, ranks: dict[bytes, int]) -> tiktoken.Encoding:
    specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=f"autoresearch-{p.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def token_byte_lengths(ranks: dict[bytes, int], vocab_size: int) -> np.ndarray:
    """int32 (vocab,) byte length of every id, read from the merge table; 0 for the special tokens.

    Never from decoding: an id holding part of a multi-byte character decodes to U+FFFD (3 bytes).
    """
    lengths = np.zeros(vocab_size, dtype=np.int32)
    for token, rank in ranks.items():
        lengths[rank] = len(token)
    return lengths


def load_token_bytes(p: Protocol) -> np.ndarray:
    """The protocol's token byte lengths: int32 (vocab,), 0 for special tokens."""
    path = tokenizer_dir(p) / "token_bytes.npy"
    try:
        lengths = np.load(path)
    except FileNotFoundError:
        raise PrepareError(f"Protocol '{p.name}' has no tokenizer yet; run: uv run prepare.py --protocol {p.name}") from None
    except (ValueError, OSError, EOFError) as e:
        raise corrupt_error(path, p, type(e).__name__) from None
    if lengths.shape != (p.vocab_size,) or lengths.dtype != np.int32:
        raise corrupt_error(path, p, f"shape {lengths.shape}, dtype {lengths.dtype}")
    return lengths


def _tokenizer_text(p: Protocol) -> Iterator[str]:
    """Training-split documents capped at DOC_CHAR_CAP characters, about TOKENIZER_MAX_CHARS in all."""
    seen = 0
    for path in split_shards(p, "train"):
        for texts in read_texts(path, p):
            for text in texts:
                doc = text[:DOC_CHAR_CAP]
                seen += len(doc)
                yield doc
                if seen >= TOKENIZER_MAX_CHARS:
                    return


def train_tokenizer(p: Protocol, texts: Iterator[str]) -> None:
    """Train the protocol's BPE with rustbpe, save it and its token byte lengths, and check a round trip."""
    import rustbpe

    t0 = time.perf_counter()
    n_merged = p.vocab_size - len(SPECIAL_TOKENS)
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, n_merged, pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != n_merged or sorted(ranks.values()) != list(range(n_merged)):
        raise PrepareError(
            f"Tokenizer training produced {len(ranks)} of {n_merged} tokens, too little text; "
            f"fetch more shards (--num-shards) and rerun: uv run prepare.py --protocol {p.name}"
        )
    pattern = bpe.get_pattern()
    enc = _encoding(p, pattern, ranks)
    lengths = token_byte_lengths(ranks, p.vocab_size)
    _check_round_trip(p, enc, lengths)
    tok_dir = tokenizer_dir(p)
    atomic_save_npy(tok_dir / "token_bytes.npy", lengths)
    payload = {"pattern": pattern, "mergeable_ranks": ranks, "special_tokens": list(SPECIAL_TOKENS)}
    atomic_write_bytes(tok_dir / "tokenizer.pkl", pickle.dumps(payload))  # written last: marks completion
    print(f"{p.name}: trained a {p.vocab_size}-token BPE in {time.perf_counter() - t0:.1f}s")


def _check_round_trip(p: Protocol, enc: tiktoken.Encoding, lengths: np.ndarray) -> None:
    samples = ["Hello world! Numbers: 123, 4567. Unicode: 你好 — naïve café 🎉\n\n  indented\ttab", "O Romeo, Romeo!"]
    for text in samples:
        ids = enc.encode_ordinary(text)
        if enc.decode(ids) != text or int(lengths[ids].sum()) != len(text.encode("utf-8")):
            raise PrepareError(
                f"The trained tokenizer failed its round-trip check on {text[:20]!r}; "
                f"delete {tokenizer_dir(p)} and rerun: uv run prepare.py --protocol {p.name}"
            )


def ensure_tokenizer(p: Protocol) -> bool:
    """Train the protocol's tokenizer on its training shards unless a readable one of its vocabulary exists."""
    tok_dir = tokenizer_dir(p)
    if (tok_dir / "tokenizer.pkl").exists() and (tok_dir / "token_bytes.npy").exists():
        try:
            if Tokenizer.load(p).vocab_size == p.vocab_size and len(load_token_bytes(p)) == p.vocab_size:
                return False
        except PrepareError:
            pass  # unreadable, or made for another vocabulary: train it again
    if not split_shards(p, "train"):
        raise PrepareError(f"Protocol '{p.name}' has no training shards to train a tokenizer on; rerun: uv run prepare.py --protocol {p.name}")
    print(f"{p.name}: training the tokenizer on up to {TOKENIZER_MAX_CHARS:,} characters")
    train_tokenizer(p, _tokenizer_text(p))
    return True

