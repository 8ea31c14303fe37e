"""Training throughput of train_cuda.py on this host: tokens/s and MFU for a fixed small config.

Times whole optimizer steps (forward, backward, MuonAdamW) of the trainer's own model and
optimizer on random tokens, so the figure is the model's, not the dataloader's. MFU is
n/a where the device's peak FLOP/s is unknown (CPU, Apple GPUs).

Run: .venv/bin/python bench/bench_train_cuda.py [--depth 4] [--seq-len 512] [--batch-size 8] [--steps 10]
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import backends  # noqa: E402
import train_cuda as tc  # noqa: E402
from backends import torch_rt  # noqa: E402
from model import build_config, flops_per_token, param_counts  # noqa: E402


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
        with torch_rt.autocast(host):
            loss = step_model(x, y)
        loss.backward()
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


if __name__ == "__main__":
    main()
