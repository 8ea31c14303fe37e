"""Data integrity: the manifest prepared.json, content hashes of everything evaluation reads, and the
files each side (trainer, harness) may open.

prepare() records the sha256 of the tokenizer and of the validation and holdout shards and token caches
in the manifest; verify_eval_data re-hashes them and names any file that changed. The path lists tell the
sandbox what a trainer (train_data_paths, tokenizer_paths) and the harness (eval_data_paths) read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from data import PrepareError
from data.files import check_parquet, corrupt_error
from data.protocols import Protocol, cache_root, protocol_dir, split_shards, tokenizer_dir
from data.tokenizer import Tokenizer, load_token_bytes
from data.tokens import token_cache_paths

# ---------------------------------------------------------------------------
# The manifest: prepared.json, written last by prepare()
# ---------------------------------------------------------------------------


def manifest_path(p: Protocol) -> Path:
    """<protocol dir>/prepared.json."""
    return protocol_dir(p) / "prepared.json"


def read_manifest(p: Protocol) -> dict | None:
    """The protocol's manifest, or None when it is missing, unreadable or made for another protocol version."""
    try:
        manifest = json.loads(manifest_path(p).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("protocol") != p.name or manifest.get("version") != p.version:
        return None
    return manifest


# ---------------------------------------------------------------------------
# Data integrity: content hashes of what evaluation reads, and the files each side may open
# ---------------------------------------------------------------------------

HASHED_PARTS = ("tokenizer", "val", "holdout")  # the manifest's "sha256" sections


def sha256_file(path: Path) -> str:
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
    path = tokenizer_dir(p) / "tokenizer.pkl"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except FileNotFoundError:
        raise PrepareError(f"Protocol '{p.name}' has no tokenizer yet; run: uv run prepare.py --protocol {p.name}") from None
    except OSError as e:
        raise corrupt_error(path, p, type(e).__name__) from None


def tokenizer_paths(p: Protocol) -> list[Path]:
    """The tokenizer files: tokenizer.pkl (read by Tokenizer.load) and token_bytes.npy (load_token_bytes)."""
    tok_dir = tokenizer_dir(p)
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
    return [path for shard in split_shards(p, split) for path in (shard, *token_cache_paths(shard, fingerprint))]


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
        paths += [f for f in token_cache_paths(shard, fingerprint) if f.exists()]
    marker = cache_root() / "protocol"
    if marker.exists():
        paths.append(marker)
    return paths


def _hashed_paths(p: Protocol, part: str) -> list[Path]:
    return tokenizer_paths(p) if part == "tokenizer" else eval_data_paths(p, part)


def content_hashes(p: Protocol, memo: dict | None = None) -> dict[str, dict[str, str]]:
    """{part: {path relative to the protocol dir: sha256}} for the tokenizer and the evaluation splits."""
    memo = {} if memo is None else memo
    out: dict[str, dict[str, str]] = {}
    for part in HASHED_PARTS:
        out[part] = {}
        for path in _hashed_paths(p, part):
            out[part][_relative(p, path)] = _cached_sha256(path, memo)
    return out


def _cached_sha256(path: Path, memo: dict) -> str:
    """sha256_file, remembered in `memo` while the file's identity, size and mtime stay the same."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in memo:
        memo[key] = sha256_file(path)
    return memo[key]


def verify_eval_data(p: Protocol, splits: Iterable[str] = ("val", "holdout")) -> None:
    """Re-hash the files evaluation reads and raise PrepareError, naming the file and the fix, unless each
    matches the sha256 recorded in the manifest when it was prepared.

    Checks the tokenizer files and, for each of `splits`, eval_data_paths(p, split). A missing file, a
    manifest without recorded hashes (one written by an older prepare.py) and a file without one are
    errors too; `uv run prepare.py --protocol NAME` repairs each of them.
    """
    fix = f"uv run prepare.py --protocol {p.name}"
    manifest = read_manifest(p)
    where = manifest_path(p)
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
            if sha256_file(path) != want:
                raise PrepareError(f"{path} does not match the content hash recorded when it was prepared (it was "
                                   f"changed or damaged); run: {fix} to restore it")


def discard_damaged_sources(p: Protocol, recorded: dict, memo: dict) -> None:
    """Delete tokenizer files and evaluation shards that differ from their recorded hash, so the steps that
    follow make them again. An evaluation shard without a recorded hash (an older manifest) is decoded
    in full instead, and deleted when that fails."""
    tok_files = [f for f in tokenizer_paths(p) if f.exists()]
    tok_hashes = recorded.get("tokenizer", {})
    if any(tok_hashes.get(_relative(p, f)) not in (None, _cached_sha256(f, memo)) for f in tok_files):
        print(f"{p.name}: the tokenizer in {tokenizer_dir(p)} differs from the one prepared; making it again")
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


def discard_unverified_eval_caches(p: Protocol, recorded: dict, memo: dict) -> None:
    """Delete the evaluation splits' token cache files unless each matches its recorded hash (none is
    recorded by an older manifest), so they are tokenized again from the checked shards."""
    fingerprint = _tokenizer_fingerprint(p)
    for split in ("val", "holdout"):
        for shard in split_shards(p, split):
            files = token_cache_paths(shard, fingerprint)
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
    manifest = read_manifest(p)
    if manifest is None:
        return False
    recorded = manifest.get("sha256")
    tok_dir = tokenizer_dir(p)
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
                raise PrepareError(f"{shard} is missing; run: uv run prepare.py --protocol {p.name}")
            check_parquet(shard, p)
    verify_eval_data(p)
    if not is_prepared(p):
        raise PrepareError(f"Protocol '{p.name}' is no longer fully prepared; run: uv run prepare.py --protocol {p.name}")

