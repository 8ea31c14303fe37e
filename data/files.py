"""File primitives shared by the data layer: atomic writes, and reading and checking parquet shards.

Every file the data layer makes is written to <name>.tmp and renamed into place, so an interrupted
prepare never leaves a partial file under a final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import PrepareError

if TYPE_CHECKING:
    from data.protocols import Protocol


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through path.tmp and a rename, making the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save `array` to `path` through path.tmp and a rename, making the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_parquet(path: Path, texts: list[str]) -> None:
    """Write a `text` column atomically (a .tmp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=1024)
    os.replace(tmp, path)


def corrupt_error(path: Path, p: Protocol, why: str) -> PrepareError:
    """The error for a damaged file: names it, why, and the fix."""
    return PrepareError(f"{path} is corrupt or truncated ({why}); delete it and rerun: uv run prepare.py --protocol {p.name}")


def check_parquet(path: Path, p: Protocol, deep: bool = False) -> int:
    """Check that `path` is a readable parquet file with a `text` column; returns its row count.

    The quick check reads the footer (catches truncation); `deep` also decodes every text value.
    """
    try:
        meta = pq.read_metadata(path)
        names = meta.schema.to_arrow_schema().names
        if deep and "text" in names:
            with pq.ParquetFile(path) as pf:  # one row group at a time: bounded memory
                for i in range(pf.num_row_groups):
                    pf.read_row_group(i, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        raise corrupt_error(path, p, type(e).__name__) from None
    if "text" not in names:
        raise PrepareError(f"{path} has no 'text' column; delete it and rerun: uv run prepare.py --protocol {p.name}")
    return meta.num_rows


def read_texts(path: Path, p: Protocol) -> Iterator[list[str]]:
    """The `text` column of a parquet shard, one row group at a time; corruption is a PrepareError."""
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise PrepareError(f"{path} has no 'text' column; delete it and rerun: uv run prepare.py --protocol {p.name}")
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise corrupt_error(path, p, type(e).__name__) from None

