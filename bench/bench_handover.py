"""What the hand-over costs per run: exporting the trained model and scoring it in the harness process.

Builds the trainer's own model at this host's baseline size for a protocol (untrained: the cost does
not depend on the weights), times `torch_rt.export_for_eval` (or the MLX export with --mlx), then
runs the harness as the loop does (a fresh process: import, graph checks, purity check, causality
probe, val and holdout) and times it from outside. Prints each figure measured in this run and their
sum as a share of the protocol's time budget (target: <= 5% of tiny's 60 s on a CPU).

Run: .venv/bin/python bench/bench_handover.py [--protocol tiny] [--repeat 3] [--mlx]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prepare


def torch_exporter(p):
    """The PyTorch trainer's model at this host's baseline size, and the export the trainer runs."""
    import train_cuda as tc
    from backends import torch_rt
    from model import build_config

    cfg = build_config(tc.DEPTH, tc.ASPECT_RATIO, tc.HEAD_DIM, tc.N_KV_HEAD, p.vocab_size, p.max_seq_len,
                       tc.WINDOW_PATTERN)
    model = tc.build_model(cfg)
    return lambda d: torch_rt.export_for_eval(model, d, tc.DEVICE_BATCH_SIZE, p.max_seq_len, tc.HOST)


def mlx_exporter(p):
    import train_mlx as tm
    from backends import mlx_rt
    from model import build_config

    cfg = build_config(tm.DEPTH, tm.ASPECT_RATIO, tm.HEAD_DIM, tm.N_KV_HEAD, p.vocab_size, p.max_seq_len,
                       tm.WINDOW_PATTERN)
    model = tm.build_model(cfg)
    return lambda d: mlx_rt.export_for_eval(model, d, tm.DEVICE_BATCH_SIZE, p.max_seq_len)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default=None)
    parser.add_argument("--repeat", type=int, default=3, help="harness runs to time (the median is reported)")
    parser.add_argument("--mlx", action="store_true", help="the MLX trainer's export instead of PyTorch's")
    args = parser.parse_args()
    p = prepare.get_protocol(args.protocol)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "handover"
        d.mkdir()
        export = (mlx_exporter if args.mlx else torch_exporter)(p)
        t0 = time.perf_counter()
        graph = export(d)
        export_s = time.perf_counter() - t0
        (d / "facts.json").write_text(json.dumps({"graph": graph}))
        size = sum(f.stat().st_size for f in d.iterdir())
        walls, inner = [], []
        for _ in range(args.repeat):
            out = Path(tmp) / "result.json"
            t0 = time.perf_counter()
            proc = subprocess.run(prepare.harness_command(d, p.name, out), capture_output=True, text=True,
                                  env=os.environ.copy())
            walls.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                return 1
            inner.append(json.loads(out.read_text()))
    r = inner[-1]
    harness = statistics.median(walls)
    total = export_s + harness
    print(f"protocol {p.name}, budget {p.time_budget:g} s, graph {graph['format']} batch {graph['batch_size']}, "
          f"{size / 2**20:.1f} MiB")
    print(f"export (in the trainer, once):       {export_s:6.2f} s")
    print(f"harness process, median of {len(walls)} (wall): {harness:6.2f} s   runs: "
          + ", ".join(f"{w:.2f}" for w in walls))
    print(f"  of which load + checks:            {statistics.median(x['load_seconds'] for x in inner):6.2f} s")
    print(f"  val scoring ({r['tokens']:,} tokens, {r['probed_rows']} rows probed): "
          f"{statistics.median(x['eval_seconds'] for x in inner):6.2f} s")
    print(f"  holdout scoring ({r['holdout_tokens']:,} tokens): "
          f"{statistics.median(x['holdout_seconds'] for x in inner):6.2f} s")
    print(f"export + harness: {total:.2f} s = {100 * total / p.time_budget:.1f}% of the {p.time_budget:g} s budget")
    return 0


if __name__ == "__main__":
    sys.exit(main())
