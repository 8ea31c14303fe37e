"""Training throughput of train_mlx.py next to train_cuda.py on the same small config, on this host.

Times whole optimizer steps (forward, backward, Muon + AdamW) of each trainer's own model and
optimizer on the same random tokens: MLX with its step compiled (mx.compile over explicit state)
and eager, then PyTorch on its backend for this host (MPS on a Mac, else CPU; set
AUTORESEARCH_BACKEND=cpu|mps|cuda to choose). Each figure is the best of --repeats timed runs
(the steadiest number on a busy machine); the two MLX modes alternate.

The PyTorch side is compiled only where the trainer compiles (CUDA/ROCm); on CPU and MPS it runs eager,
and the comparison lines say which mode each side ran in (`mlx_compiled_vs_torch_eager`, and the
like-for-like `mlx_eager_vs_torch_eager`).

Linux CPU: MLX's CPU wheel (mlx[cpu]) bundles the reference BLAS, so MLX trails PyTorch (oneDNN/MKL)
there. A faster BLAS can be preloaded without rebuilding anything; MLX then calls its cblas_sgemm. On
Debian/Ubuntu:

    sudo apt-get install libopenblas0-pthread
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python train_mlx.py     # the trainer with it

When that library is there (or --openblas PATH names one), this script measures MLX both ways in the
same run, without and with the preload, and prints both and their ratio (a 512x512 fp32 matmul and the
training step); without it, it says so and measures MLX once. It is optional and only for speed: the
math is the same. Each framework runs in its own process; PyTorch never gets the preload, whose BLAS
would replace its own. Apple Silicon needs none of this: MLX runs on the GPU through Metal.

Run: .venv/bin/python bench/bench_mlx_vs_torch.py [--depth 2] [--seq-len 256] [--batch-size 4] [--steps 3]
     [--openblas PATH | --openblas none]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def torch_backend() -> str:
    """The PyTorch backend to compare against: AUTORESEARCH_BACKEND if it names one, else MPS or CPU."""
    chosen = os.environ.get("AUTORESEARCH_BACKEND", "").strip().lower()
    if chosen in ("cuda", "rocm", "mps", "cpu"):
        return chosen
    import torch

    return "mps" if torch.backends.mps.is_available() else "cpu"


def time_steps(step, steps: int, sync) -> float:
    """Seconds per step over `steps` steps."""
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def matmul_gflops(mx, n: int = 512, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n fp32 matmul (what a preloaded BLAS speeds up)."""
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def bench_mlx(cfg, tokens, args) -> dict[str, float]:
    import mlx.core as mx

    import train_mlx as tm

    x, y = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])
    schedule = mx.array([1.0, 0.9, 0.1])
    steps = {}
    for mode in ("compiled", "eager"):
        tm.mlx_rt.seed_all(0)
        model = tm.build_model(cfg)
        optimizer = tm.build_optimizer(model)
        fwd_bwd, update = tm.make_step_functions(model, optimizer, mode == "compiled")

        def step(model=model, optimizer=optimizer, fwd_bwd=fwd_bwd, update=update):
            _, grads = fwd_bwd(x, y)
            update(grads, schedule)
            mx.eval(model.state, optimizer.state)

        for _ in range(args.warmup):
            step()
        steps[mode] = step
    # Alternate the two so a busy machine slows both alike; keep each one's best run.
    best = {mode: float("inf") for mode in steps}
    for _ in range(args.repeats):
        for mode, step in steps.items():
            best[mode] = min(best[mode], time_steps(step, args.steps, mx.synchronize))
    return {**best, "matmul_gflops": matmul_gflops(mx), "peak_memory_mb": tm.mlx_rt.peak_memory_mb(),
            "device": tm.HOST.device_name}


def bench_torch(cfg, tokens, args, backend: str) -> dict[str, float]:
    os.environ["AUTORESEARCH_BACKEND"] = backend
    import torch

    import train_cuda as tc
    from backends import torch_rt

    host = tc.HOST
    torch_rt.seed_all(0)
    model = tc.build_model(cfg)
    optimizer = tc.build_optimizer(model)
    step_model = torch.compile(model, dynamic=False) if host.compile else model
    t = torch.from_numpy(tokens).to(tc.DEVICE)
    x, y = t[:, :-1], t[:, 1:]

    def step():
        with torch_rt.autocast(host):
            loss = step_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup + (10 if host.compile else 0)):
        step()
    seconds = min(time_steps(step, args.steps, lambda: torch_rt.synchronize(host)) for _ in range(args.repeats))
    return {"step": seconds, "device": f"{host.backend}: {host.device_name}", "compiled": host.compile}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--aspect-ratio", type=int, default=64)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--openblas", default=None,
                        help=f"BLAS library to measure MLX with as well, preloaded (default {DEFAULT_OPENBLAS} "
                             "on Linux when present; 'none': MLX once, as the environment has it)")
    parser.add_argument("--only", choices=("mlx", "torch"), help=argparse.SUPPRESS)  # one side, JSON out
    args = parser.parse_args()

    import numpy as np

    from model import build_config, param_counts

    cfg = build_config(args.depth, args.aspect_ratio, args.head_dim, None, args.vocab_size, args.seq_len, "SSSL")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch_size, cfg.sequence_len + 1),
                                               dtype=np.int32)
    if args.only:
        result = bench_mlx(cfg, tokens, args) if args.only == "mlx" else bench_torch(cfg, tokens, args,
                                                                                     torch_backend())
        print("RESULT " + json.dumps(result))
        return

    # Each framework in its own process: their thread pools do not fight, and a preloaded BLAS
    # (LD_PRELOAD, for MLX) does not replace the one PyTorch was built with.
    def run(side: str, env: dict) -> dict:
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", side], env=env,
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"{side} benchmark failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return json.loads(lines[-1][len("RESULT "):])

    base_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    blas = args.openblas
    if blas is None and sys.platform.startswith("linux") and Path(DEFAULT_OPENBLAS).exists():
        blas = DEFAULT_OPENBLAS
    if blas == "none" or (blas is None and os.environ.get("LD_PRELOAD")):
        blas = None  # MLX once, with whatever LD_PRELOAD the environment sets
        mlx = run("mlx", dict(os.environ))
        mlx_blas = None
    else:
        mlx = run("mlx", base_env)  # the BLAS the MLX wheel ships
        mlx_blas = run("mlx", dict(base_env, LD_PRELOAD=blas)) if blas else None
    tch = run("torch", base_env)
    tokens_per_step = args.batch_size * cfg.sequence_len
    torch_mode = "compiled" if tch["compiled"] else "eager"
    print(f"config:               depth {cfg.n_layer}, width {cfg.n_embd}, heads {cfg.n_head}, "
          f"seq {cfg.sequence_len}, batch {args.batch_size}, vocab {cfg.vocab_size}, "
          f"params_M {param_counts(cfg)['total'] / 1e6:.2f}")
    print(f"timing:               best of {args.repeats} runs of {args.steps} steps each, after {args.warmup} "
          "untimed steps")
    preload = "none" if mlx_blas is not None else os.environ.get("LD_PRELOAD") or "none"
    print(f"mlx_device:           {mlx['device']} (LD_PRELOAD: {preload})")
    print(f"torch_device:         {tch['device']} (torch.compile {tch['compiled']}: {torch_mode})")
    print(f"mlx_compiled_tok_s:   {tokens_per_step / mlx['compiled']:,.0f}")
    print(f"mlx_eager_tok_s:      {tokens_per_step / mlx['eager']:,.0f}")
    print(f"mlx_compile_speedup:  {mlx['eager'] / mlx['compiled']:.2f}x")
    print(f"mlx_matmul_gflops:    {mlx['matmul_gflops']:.1f} (512x512 fp32)")
    print(f"{f'torch_{torch_mode}_tok_s:':<22}{tokens_per_step / tch['step']:,.0f}")
    print(f"mlx_compiled_vs_torch_{torch_mode}: {tch['step'] / mlx['compiled']:.2f}x")
    print(f"mlx_eager_vs_torch_{torch_mode}:    {tch['step'] / mlx['eager']:.2f}x")
    print(f"mlx_peak_alloc_mb:    {mlx['peak_memory_mb']:.1f} (MLX allocator's peak over both MLX modes, one process)")
    if mlx_blas is not None:
        print(f"mlx_with_preload:     LD_PRELOAD={blas}")
        print(f"  matmul_gflops:      {mlx_blas['matmul_gflops']:.1f} "
              f"({mlx_blas['matmul_gflops'] / mlx['matmul_gflops']:.1f}x the wheel's BLAS)")
        print(f"  compiled_tok_s:     {tokens_per_step / mlx_blas['compiled']:,.0f} "
              f"({mlx['compiled'] / mlx_blas['compiled']:.2f}x the wheel's BLAS)")
        print(f"  eager_tok_s:        {tokens_per_step / mlx_blas['eager']:,.0f} "
              f"({mlx['eager'] / mlx_blas['eager']:.2f}x the wheel's BLAS)")
        print(f"  compiled_vs_torch_{torch_mode}: {tch['step'] / mlx_blas['compiled']:.2f}x")
    elif sys.platform.startswith("linux") and not os.environ.get("LD_PRELOAD"):
        print(f"mlx_with_preload:     not measured ({DEFAULT_OPENBLAS} not found; --openblas PATH names another)")

if __name__ == "__main__":
    main()
