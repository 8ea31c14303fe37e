"""The evaluation harness: the only process whose numbers are scores (locked).

    python -I judge/harness.py --handover DIR --protocol NAME --out RESULT.json

It loads the graph a trainer handed over (judge.graphs; the trainer's Python is never imported),
checks the validation and holdout data against the hashes recorded at prepare time, runs the
model twice on one batch (a graph with hidden state gives different logits), scores validation
with a causality probe drawn from a seed it makes itself and never writes down, scores the holdout
split, and writes the result JSON atomically to --out. Started by the loop after the trainer has
exited (and, for a run by hand, by prepare.hand_over).

Exit status: 0 scored; 2 the graph cannot be scored (a crash of the run); 3 the prepared data is
damaged (nothing is the trainer's fault; re-run prepare); 4 the model is not causal (invalid).
"""

import os
import sys

if __name__ == "__main__":
    # Started with -I: the repository's own modules are imported from their source only (never from a
    # byte-code file planted in a __pycache__), after the standard library and the installed packages.
    _boot = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "research", "pyexec.py")
    with open(_boot, "rb") as _f:
        exec(compile(_f.read(), _boot, "exec"), {"__name__": "__pyexec_boot__", "__file__": _boot,
                                                  "SCRIPT": __file__})

import argparse  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

EXIT_GRAPH, EXIT_DATA, EXIT_NONCAUSAL = 2, 3, 4


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


def evaluate(handover: Path, protocol_name: str) -> tuple[int, dict]:
    """(exit status, result) for the graph in `handover` under the named protocol."""
    import prepare
    from judge.evaluate import NonCausalModelError, load_rows, score_split
    from judge.graphs import GraphError, load_graph

    p = prepare.get_protocol(protocol_name)
    base = {"protocol": p.name, "protocol_version": p.version, "evaluator_hash": prepare.evaluator_hash(),
            "split": "val", "seq_len": p.max_seq_len}
    try:
        prepare.verify_eval_data(p)
        token_bytes = prepare.load_token_bytes(p)
    except prepare.PrepareError as e:
        return EXIT_DATA, {**base, "valid": False, "kind": "data", "reason": str(e)}
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
    try:
        val = score_split(g.forward, g.adapter, g.batch_size, load_rows(p, "val", p.eval_tokens), token_bytes,
                          p.vocab_size, rng)
    except NonCausalModelError as e:
        return EXIT_NONCAUSAL, {**base, "valid": False, "kind": "causality", "reason": str(e)}
    hold = score_split(g.forward, g.adapter, g.batch_size, load_rows(p, "holdout", p.holdout_tokens), token_bytes,
                       p.vocab_size)
    return 0, {**base, "valid": True, "val_bpb": val["bpb"], "nats": val["nats"], "bytes": val["bytes"],
               "tokens": val["tokens"], "rows": val["rows"], "probed_rows": val["probed_rows"],
               "eval_seconds": val["seconds"], "holdout_bpb": hold["bpb"], "holdout_tokens": hold["tokens"],
               "holdout_seconds": hold["seconds"], "load_seconds": load_seconds, "batch_size": g.batch_size,
               "framework": g.framework, "graph_bytes": g.nbytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="judge/harness.py", description=__doc__.split("\n")[0])
    parser.add_argument("--handover", required=True, help="directory the trainer handed over")
    parser.add_argument("--protocol", required=True, help="protocol name")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    status, result = evaluate(Path(args.handover), args.protocol)
    result["harness_seconds"] = time.perf_counter() - t0
    _write(Path(args.out), result)
    if result.get("valid"):
        print(f"harness: val {result['val_bpb']:.6f} bpb over {result['tokens']:,} tokens "
              f"({result['probed_rows']} rows probed for causality), holdout {result['holdout_bpb']:.6f}, "
              f"{result['harness_seconds']:.1f} s", flush=True)
    else:
        print(f"harness: not scored ({result['kind']}): {result['reason']}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
