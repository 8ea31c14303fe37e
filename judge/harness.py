"""The evaluation harness: the only process whose numbers are scores (locked).

    python -I judge/harness.py --handover DIR --protocol NAME --out RESULT.json [--wait]

It checks the validation and holdout data against the hashes recorded at prepare time, loads the
graph a trainer handed over (judge.graphs; the trainer's Python is never imported), runs the model
twice on one batch (a graph with hidden state gives different logits), scores validation and the
holdout split, each with a causality probe drawn from a seed it makes itself and never writes down
(judge/evaluate.py states their bounds), and writes the result JSON atomically to --out.

The loop starts it beside the trainer with --wait, in a sandbox of its own: imports and data checks
run at the lowest CPU priority while the trainer trains, then it waits for a `go` line on stdin,
which the loop writes only once the trainer and everything it started have ended (end of input
instead: it exits without a score). Nothing of the hand-over is read before `go`, and the probe's
seed is drawn after it. A run by hand (prepare.hand_over) starts it after the trainer, without --wait.

Exit status: 0 scored; 2 the graph cannot be scored (a crash of the run); 3 the prepared data is
damaged (nothing is the trainer's fault; re-run prepare); 4 the model is not causal (invalid).
"""

import os
import sys

if __name__ == "__main__":
    # Started with -I: the repository's own modules are imported from their source only (never from a
    # byte-code file planted in a __pycache__), after the standard library and the installed packages.
    _boot = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "sandbox", "pyexec.py")
    with open(_boot, "rb") as _f:
        exec(compile(_f.read(), _boot, "exec"), {"__name__": "__pyexec_boot__", "__file__": _boot,
                                                  "SCRIPT": __file__})

import argparse
import json
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXIT_GRAPH, EXIT_DATA, EXIT_NONCAUSAL = 2, 3, 4
GO = b"go"  # the line a pre-started harness (--wait) waits for: the trainer has ended, score the hand-over


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _same_twice(g) -> str | None:
    """Run one batch of real-looking tokens twice; a pure graph gives the same logits."""
    from judge.evaluate import compare_logits

    rng = np.random.default_rng()
    x = rng.integers(0, 256, size=(g.batch_size, g.seq_len), dtype=np.int32)
    first = g.adapter.to_numpy(g.forward(g.adapter.to_input(x)))
    second = g.adapter.to_numpy(g.forward(g.adapter.to_input(x)))
    moved, diff, tol = compare_logits(first, second)
    if moved:
        return (f"the same batch gave logits differing by up to {diff:.3g} (tolerance {tol:.3g}) on a second call, "
                "so the graph keeps state between calls")
    return None


@dataclass
class Ready:
    """What scoring needs before any graph exists: the protocol, its checked data, the modules."""

    base: dict
    problem: tuple[int, dict] | None = None  # (exit status, result) when the data is damaged
    protocol: Any = None
    token_bytes: Any = None
    val: Any = None
    holdout: Any = None


def prepare_scoring(protocol_name: str) -> Ready:
    """Everything that does not need the hand-over: imports, the data checked against its recorded
    hashes and read. A pre-started harness (--wait) does this while the trainer still trains."""
    from data import PrepareError
    from data.integrity import verify_eval_data
    from data.protocols import get_protocol
    from data.tokenizer import load_token_bytes
    from judge.entry import evaluator_hash
    from judge.evaluate import load_rows
    from judge.graphs import warm_imports

    p = get_protocol(protocol_name)
    base = {"protocol": p.name, "protocol_version": p.version, "evaluator_hash": evaluator_hash(),
            "split": "val", "seq_len": p.max_seq_len}
    try:
        verify_eval_data(p)
        token_bytes = load_token_bytes(p)
    except PrepareError as e:
        return Ready(base, (EXIT_DATA, {**base, "valid": False, "kind": "data", "reason": str(e)}))
    warm_imports(os.environ.get("AUTORESEARCH_BACKEND", ""))
    return Ready(base, None, p, token_bytes, load_rows(p, "val", p.eval_tokens),
                 load_rows(p, "holdout", p.holdout_tokens))


def evaluate(handover: Path, protocol_name: str, ready: Ready | None = None) -> tuple[int, dict]:
    """(exit status, result) for the graph in `handover` under the named protocol."""
    from judge.evaluate import NonCausalModelError, score_split
    from judge.graphs import GraphError, load_graph

    ready = ready or prepare_scoring(protocol_name)
    if ready.problem is not None:
        return ready.problem
    p, base, token_bytes = ready.protocol, ready.base, ready.token_bytes
    t0 = time.perf_counter()
    try:
        g = load_graph(handover, p.max_seq_len, p.vocab_size)
        reason = _same_twice(g)
    except GraphError as e:
        return EXIT_GRAPH, {**base, "valid": False, "kind": "graph", "reason": str(e)}
    if reason is not None:
        return EXIT_NONCAUSAL, {**base, "valid": False, "kind": "state", "reason": reason}
    load_seconds = time.perf_counter() - t0
    rng = np.random.default_rng(secrets.randbits(128))  # the probe's plan: made here, written nowhere
    split = "val"
    try:
        val = score_split(g.forward, g.adapter, g.batch_size, ready.val, token_bytes, p.vocab_size, rng,
                          lookahead_fraction=p.probe_lookahead)  # the protocol's stated bound
        split = "holdout"  # probed too (a looser bound: it is reported, never decides), reported the same way
        hold = score_split(g.forward, g.adapter, g.batch_size, ready.holdout, token_bytes, p.vocab_size, rng,
                           lookahead_fraction=p.holdout_probe_lookahead)
    except NonCausalModelError as e:
        return EXIT_NONCAUSAL, {**base, "valid": False, "kind": "causality", "probe_split": split,
                                "reason": str(e) if split == "val" else f"on the holdout split: {e}"}
    return 0, {**base, "valid": True, "val_bpb": val["bpb"], "nats": val["nats"], "bytes": val["bytes"],
               "tokens": val["tokens"], "rows": val["rows"], "probed_rows": val["probed_rows"],
               "probe_forwards": val["probe_forwards"], "probe_seconds": val["probe_seconds"],
               "lookahead_fraction": val["lookahead_fraction"], "escape_bound": val["escape_bound"],
               "eval_seconds": val["seconds"], "holdout_bpb": hold["bpb"], "holdout_tokens": hold["tokens"],
               "holdout_probed_rows": hold["probed_rows"], "holdout_lookahead_fraction": hold["lookahead_fraction"],
               "holdout_escape_bound": hold["escape_bound"], "holdout_seconds": hold["seconds"],
               "load_seconds": load_seconds, "batch_size": g.batch_size, "framework": g.framework,
               "graph_bytes": g.nbytes}


def _prepare_quietly(protocol_name: str) -> Ready:
    """prepare_scoring in a thread at the lowest CPU priority (Linux: nice is per thread), so a harness
    started beside a training run takes only the time the trainer leaves idle; the thread that later
    scores keeps normal priority. Where a thread cannot be reniced it simply runs at normal priority."""
    def work() -> Ready:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        return prepare_scoring(protocol_name)

    with ThreadPoolExecutor(1, thread_name_prefix="prepare-scoring") as pool:
        return pool.submit(work).result()  # its exception, if any, is raised here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="judge/harness.py", description=__doc__.split("\n")[0])
    parser.add_argument("--handover", required=True, help="directory the trainer handed over")
    parser.add_argument("--protocol", required=True, help="protocol name")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    parser.add_argument("--wait", action="store_true",
                        help=f"prepare (imports, data checks) at low priority, then wait for a {GO!r} line on stdin "
                             "before reading the hand-over; end of input instead: exit unscored, writing nothing")
    args = parser.parse_args(argv)
    ready = None
    if args.wait:
        ready = _prepare_quietly(args.protocol)
        if sys.stdin.buffer.readline().strip() != GO:
            return 0  # the loop needs no score (the run crashed or was rejected, or the loop ended)
    t0 = time.perf_counter()
    status, result = evaluate(Path(args.handover), args.protocol, ready)
    result["harness_seconds"] = time.perf_counter() - t0
    _write(Path(args.out), result)
    if result.get("valid"):
        print(f"harness: val {result['val_bpb']:.6f} bpb over {result['tokens']:,} tokens "
              f"({result['probed_rows']} positions probed for causality: look-ahead at "
              f"{result['lookahead_fraction']:.1%} escapes with p <= {result['escape_bound']:.1g}), "
              f"holdout {result['holdout_bpb']:.6f}, "
              f"{result['harness_seconds']:.1f} s", flush=True)
    else:
        print(f"harness: not scored ({result['kind']}): {result['reason']}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
