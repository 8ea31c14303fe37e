"""The causality probe against a look-ahead graph: how often it escapes, and what the probe costs.

Attack: a graph of pure tensor operations (a bigram table) that adds +25 to the logit of the next input
token at a fraction f of the positions, chosen by a hash of the current and the previous token (by
content, as a graph built to slip past a sampled probe would; its one constant is set so that at least
ceil(f * positions) of the split's positions cheat). For each f it runs K real evaluations
(judge/evaluate.py's score_split, a different secret seed each) and counts escapes; then, since whether
an evaluation catches such a graph is decided by its plan alone (does a cut land on a cheating
position), it draws many more plans with the same code and counts those that miss every cheating
position. It prints the measured escape rates beside the exact probability for this graph (windows
sampled without replacement) and the stated bound (1 - f)**n.

Cost: an honest model the size of the PyTorch trainer's CPU baseline (build_model at train_cuda's cpu
hyperparameters, batch 8, untrained: the cost does not depend on the weights), scored on a split the
size of the protocol's (tiny: 256 rows of 256 tokens, vocab 2048; holdout 128 rows) with and without the
probe: extra forwards and seconds. --cost none skips it; --cost bigram uses the attack's bigram table.

Run: .venv/bin/python bench/bench_probe.py [--fractions 0.001,0.004] [--evaluations 10] [--plans 2000]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from judge import evaluate as E


def synthetic_rows(n: int, seq: int, vocab: int, seed: int) -> E.EvalRows:
    x = np.random.default_rng(seed).integers(0, vocab, size=(n, seq + 1), dtype=np.int32)
    return E.EvalRows(x[:, :-1], x[:, 1:])


def _hash(x: np.ndarray) -> np.ndarray:
    a = x.astype(np.int64)
    h = (a * 2654435761 + np.roll(a, 1, axis=1) * 40503 + 12345) % 1048573
    h[:, -1] = 2**40  # the last position has no next input token in its row: never cheats
    return h


def threshold(x: np.ndarray, fraction: float) -> int:
    """The hash threshold under which at least ceil(fraction * positions) positions of `x` fall: the
    graph's one constant (what a graph aiming at a share of the validation positions would calibrate)."""
    k = max(1, math.ceil(fraction * x.size))
    return int(np.partition(_hash(x).ravel(), k - 1)[k - 1]) + 1


def cheat_mask(x: np.ndarray, limit: int) -> np.ndarray:
    """Where the look-ahead graph cheats: a hash of the (previous, current) token below `limit`."""
    return _hash(x) < limit


def lookahead_graph(vocab: int, limit: int, seed: int = 0):
    import torch

    table = torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (vocab, vocab)).astype(np.float32))

    def forward(idx):
        with torch.no_grad():
            logits = table[idx.long()]
            gate = torch.from_numpy(cheat_mask(idx.numpy(), limit))
            nxt = torch.roll(idx, -1, dims=1).long()
            bonus = torch.zeros_like(logits).scatter_(2, nxt[..., None], 25.0)
            return logits + gate[..., None].float() * bonus

    return forward


def plan_escapes(seed: int, n_rows: int, seq: int, batch: int, vocab: int, probes: int, cheat: np.ndarray) -> bool:
    """True when the plan score_split draws from this seed puts no cut on a cheating position."""
    windows = E._plan_probes(np.random.default_rng(seed), n_rows, seq, batch, vocab, probes)
    return not any(cheat[w.src, w.cut].any() for w in windows)


def exact_escape(n_rows: int, seq: int, batch: int, vocab: int, probes: int, cheat: np.ndarray) -> float:
    """The probability that a plan misses every cheating position: per window, n_w of M_w positions drawn
    without replacement miss its K_w cheating ones, C(M_w - K_w, n_w) / C(M_w, n_w); windows independent."""
    windows = E._plan_probes(np.random.default_rng(0), n_rows, seq, batch, vocab, probes)  # sizes only
    log_p = 0.0
    for w in windows:
        m, k, n = (w.stop - w.start) * seq, int(cheat[w.start:w.stop].sum()), len(w.src)
        if n > m - k:
            return 0.0
        log_p += (math.lgamma(m - k + 1) - math.lgamma(m - k - n + 1)) - (math.lgamma(m + 1) - math.lgamma(m - n + 1))
    return math.exp(log_p)


def attack(args) -> None:
    import torch

    from backends import detect
    from judge import torch_adapter

    adapter = torch_adapter.eval_adapter(detect("cpu"))
    split = synthetic_rows(args.rows, args.seq, args.vocab, 1)
    token_bytes = np.ones(args.vocab, dtype=np.int64)
    probes = min(args.rows * args.seq, E.probe_count(E.PROBE_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE))
    M = args.rows * args.seq
    print(f"attack: {args.rows} rows x {args.seq} positions = {M:,}, vocab {args.vocab}, batch {args.batch}; "
          f"{probes} probes per evaluation (PROBE_LOOKAHEAD_FRACTION {E.PROBE_LOOKAHEAD_FRACTION:g}, "
          f"PROBE_ESCAPE {E.PROBE_ESCAPE:g})")
    print(f"{'f':>8} {'cheats':>7} {'real: escaped/K':>16} {'s/eval':>7} {'plans: escaped/P':>17} {'rate':>9} "
          f"{'exact':>9} {'bound (1-f)^n':>14}")
    for f in args.fractions:
        limit = threshold(split.x, f)
        cheat = cheat_mask(split.x, limit)
        forward = lookahead_graph(args.vocab, limit)
        escaped, agree, t0 = 0, 0, time.perf_counter()
        for i in range(args.evaluations):
            seed = 10_000 + i
            try:
                E.score_split(forward, adapter, args.batch, split, token_bytes, args.vocab,
                              np.random.default_rng(seed))
                caught = False
            except E.NonCausalModelError:
                caught = True
            escaped += not caught
            agree += caught != plan_escapes(seed, args.rows, args.seq, args.batch, args.vocab, probes, cheat)
        per_eval = (time.perf_counter() - t0) / max(1, args.evaluations)
        plans = sum(plan_escapes(20_000 + i, args.rows, args.seq, args.batch, args.vocab, probes, cheat)
                    for i in range(args.plans))
        exact = exact_escape(args.rows, args.seq, args.batch, args.vocab, probes, cheat)
        bound = E.escape_bound(f, probes, M)
        print(f"{f:8.4%} {int(cheat.sum()):7d} {escaped:>7d}/{args.evaluations:<8d} {per_eval:7.1f} "
              f"{plans:>8d}/{args.plans:<8d} {plans / max(1, args.plans):9.2e} {exact:9.2e} {bound:14.2e}"
              + ("" if agree == args.evaluations else f"   ({args.evaluations - agree} runs disagree with their plan)"))
    del torch


def honest_model(kind: str, vocab: int, seq: int):
    import torch

    if kind == "bigram":
        table = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (vocab, vocab)).astype(np.float32))
        return (lambda idx: table[idx.long()]), 8, "bigram table"
    os.environ.setdefault("AUTORESEARCH_BACKEND", "cpu")
    import train_cuda as tc
    from backends import torch_rt
    from model import build_config

    cfg = build_config(tc.DEPTH, tc.ASPECT_RATIO, tc.HEAD_DIM, tc.N_KV_HEAD, vocab, seq, tc.WINDOW_PATTERN)
    model = torch_rt._Logits(tc.build_model(cfg), tc.HOST).eval()
    params = sum(p.numel() for p in model.parameters())
    return model, tc.DEVICE_BATCH_SIZE, f"the trainer's {tc.HARDWARE} baseline GPT ({params / 1e6:.2f}M parameters)"


def cost(args) -> None:
    import torch

    from backends import detect
    from judge import torch_adapter

    adapter = torch_adapter.eval_adapter(detect("cpu"))
    model, batch, name = honest_model(args.cost, args.vocab, args.seq)
    token_bytes = np.ones(args.vocab, dtype=np.int64)
    print(f"\ncost: {name}, batch {batch}, torch threads {torch.get_num_threads()}")
    for label, n_rows, fraction in (("val", args.rows, E.PROBE_LOOKAHEAD_FRACTION),
                                    ("holdout", args.holdout_rows, E.HOLDOUT_LOOKAHEAD_FRACTION)):
        split = synthetic_rows(n_rows, args.seq, args.vocab, 2)
        with torch.no_grad():
            plain = E.score_split(model, adapter, batch, split, token_bytes, args.vocab)
            probed = E.score_split(model, adapter, batch, split, token_bytes, args.vocab, np.random.default_rng(0),
                                   lookahead_fraction=fraction)
        forwards = math.ceil(n_rows / batch)
        extra = probed["seconds"] - plain["seconds"]
        print(f"  {label:8s} {n_rows} rows: {forwards} forwards in {plain['seconds']:.1f} s unprobed; the probe "
              f"({probed['probed_rows']} probes, f {fraction:g}, escape <= {probed['escape_bound']:.2g}) adds "
              f"{probed['probe_forwards']} forwards ({probed['probe_forwards'] / forwards:.1f}x) and {extra:.1f} s "
              f"({probed['probe_seconds']:.1f} s in probe forwards and comparisons)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fractions", default="0.0001,0.0003,0.001,0.004",
                        type=lambda s: [float(v) for v in s.split(",") if v])
    parser.add_argument("--evaluations", type=int, default=10, help="real evaluations per fraction (K)")
    parser.add_argument("--plans", type=int, default=2000, help="plans drawn per fraction (P)")
    parser.add_argument("--rows", type=int, default=256, help="validation rows (tiny: 2^16 tokens / 256)")
    parser.add_argument("--holdout-rows", type=int, default=128, help="holdout rows (tiny: 2^15 tokens / 256)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="the attack graph's batch size")
    parser.add_argument("--cost", choices=("gpt", "bigram", "none"), default="gpt")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-attack", action="store_true")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_attack:
        attack(args)
    if args.cost != "none":
        cost(args)
    probes = E.probe_count(E.PROBE_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE)
    held = E.probe_count(E.HOLDOUT_LOOKAHEAD_FRACTION, E.PROBE_ESCAPE)
    print(f"\nstandard (T 2048, 10240 val rows, 2048 holdout rows): the probe adds {probes} val row-forwards "
          f"(+{probes / 10240:.0%}) and {held} holdout row-forwards (+{held / 2048:.0%}); "
          f"tiny (256 + 128 rows): +{probes} (+{probes / 256:.0%}) and +{held} (+{held / 128:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
