"""Training throughput of train_cuda.py on this host: tokens/s and MFU for a fixed small config.

Times whole optimizer steps (forward, backward, MuonAdamW) of the trainer's own model and
optimizer on random tokens, so the figure is the model's, not the dataloader's. MFU is
n/a where the device's peak FLOP/s is unknown (CPU, Apple GPUs).

`--profile N` then profiles N more steps with torch.profiler and prints where a step's time goes:
forward, backward and optimizer (wall, per step), and the operators with the most self time. On CPU,
AUTORESEARCH_CPU_BF16=0|1 compares fp32 with bf16 autocast. The comparison config of
bench_experiment.py (depth 2, width 128, 4,096 tokens per step, tiny's vocabulary):

  .venv/bin/python bench/bench_train_cuda.py --depth 2 --head-dim 32 --seq-len 256 --batch-size 16 \
      --vocab-size 2048 --steps 20 --profile 10

Run: .venv/bin/python bench/bench_train_cuda.py [--depth 4] [--seq-len 512] [--batch-size 8] [--steps 10]
                                                [--profile N]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import backends
import train_cuda as tc
from backends import torch_rt
from model import build_config, flops_per_token, param_counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 3, or 10 when compiling)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="then profile N steps (torch.profiler)")
    args = parser.parse_args()

    host = tc.HOST
    print(backends.describe(host))
    torch_rt.seed_all(0)
    cfg = build_config(args.depth, args.aspect_ratio, args.head_dim, None, args.vocab_size, args.seq_len, "SSSL")
    model = tc.build_model(cfg)
    optimizer = tc.build_optimizer(model)
    step_model = torch.compile(model, dynamic=False) if host.compile else model
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.sequence_len + 1), device=tc.DEVICE)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def train_step():
        with torch.profiler.record_function("## forward"), torch_rt.autocast(host):
            loss = step_model(x, y)
        with torch.profiler.record_function("## backward"):
            loss.backward()
        with torch.profiler.record_function("## optimizer"):
            optimizer.step()
            model.zero_grad(set_to_none=True)

    warmup = args.warmup if args.warmup is not None else (10 if host.compile else 3)
    for _ in range(warmup):
        train_step()
    torch_rt.synchronize(host)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    torch_rt.synchronize(host)
    seconds = time.perf_counter() - t0

    tok_per_sec = args.batch_size * cfg.sequence_len * args.steps / seconds
    flops = flops_per_token(cfg)
    mfu = backends.mfu_percent(flops, tok_per_sec, host)
    print(f"config:          depth {cfg.n_layer}, width {cfg.n_embd}, heads {cfg.n_head}, seq {cfg.sequence_len}, "
          f"batch {args.batch_size}, vocab {cfg.vocab_size}")
    print(f"params_M:        {param_counts(cfg)['total'] / 1e6:.2f}")
    print(f"attention:       {model.attention_name}")
    print(f"step_ms:         {1000 * seconds / args.steps:.1f}")
    print(f"tokens_per_sec:  {tok_per_sec:,.0f}")
    print(f"mfu_percent:     {f'{mfu:.2f}' if mfu is not None else 'n/a'}")
    what = {"cuda": "allocator peak", "rocm": "allocator peak", "mps": "driver-allocated at the end"}.get(
        host.backend, "this process's max RSS: Python, libraries and data included; one process, not a best of N")
    print(f"peak_memory_mb:  {torch_rt.peak_memory_mb(host):.1f} ({what})")
    if args.profile:
        profile(train_step, args.profile, host)


def profile(train_step, steps: int, host) -> None:
    """Where `steps` steps spend their time: the phases (the record_function labels) and the top operators."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if host.backend in ("cuda", "rocm") else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            train_step()
        torch_rt.synchronize(host)
    events = prof.key_averages()
    print(f"\nprofile of {steps} steps ({'bf16 autocast' if torch_rt.compute_dtype(host) else 'fp32'}):")
    for e in events:
        if e.key.startswith("## "):
            print(f"  {e.key[3:]:<10} {e.cpu_time_total / 1000 / steps:8.1f} ms per step (wall, CPU side)")
    sort = "self_cuda_time_total" if host.backend in ("cuda", "rocm") else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
