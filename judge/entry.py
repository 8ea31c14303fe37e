"""How the judge is started and what identifies it (locked): the harness's command line and environment,
and the evaluator hash recorded with every score."""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path

from data.loader import BestFitPacker, doc_blocks, make_dataloader, shard_blocks, tokenized_blocks
from data.tokenizer import load_token_bytes, token_byte_lengths
from data.tokens import tokenize_texts

REPO = Path(__file__).resolve().parent.parent
# the code that builds the validation rows and counts their bytes (data/loader.py, tokens.py, tokenizer.py)
STREAM_CODE = (make_dataloader, BestFitPacker, doc_blocks, shard_blocks, tokenized_blocks, tokenize_texts, load_token_bytes,
               token_byte_lengths)


def evaluator_hash() -> str:
    """First 12 hex digits of the sha256 of everything that turns a graph into a score: every file of judge/
    (the harness, the graph reader, the scorer, the logits -> nats adapters) and the code that builds the
    validation stream (protocol-independent)."""
    parts = [f"{f.name}\n{f.read_text(encoding='utf-8')}" for f in sorted((REPO / "judge").glob("*.py"))]
    parts += [inspect.getsource(obj) for obj in STREAM_CODE]
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:12]


def harness_command(handover: Path, protocol: str, out: Path, wait: bool = False) -> list[str]:
    """The command that scores a handed-over model: the locked harness, in isolated mode (`wait`: started
    ahead of the hand-over, it scores once a `go` line comes on its stdin; see judge/harness.py)."""
    return [sys.executable, "-I", str(REPO / "judge" / "harness.py"), "--handover", str(handover),
            "--protocol", protocol, "--out", str(out), *(["--wait"] if wait else [])]


def harness_env(env: dict[str, str]) -> dict[str, str]:
    """The harness's environment: `env` with OpenMP's waiting threads asleep (OMP_WAIT_POLICY=PASSIVE)
    unless it sets a policy. Spinning threads fight every other process for the cores: on a 2-core
    machine at load 3 the harness took 48-50 s to score tiny with them and 9-11 s without, while on a
    quiet machine passive waiting costs it about a second. (Trainers keep OpenMP's default: spinning
    was ~25% faster for training on a quiet machine, and slower only on a busy one.)"""
    return {**env, "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY") or "PASSIVE"}
