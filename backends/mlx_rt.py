"""MLX runtime helpers shared by train_mlx.py and the evaluator (Apple Metal; CPU on Linux).

Compute dtype by device, peak memory, seeding, cached sliding-window masks and the
evaluator's logits -> nats adapter. Metal-only paths are gated on
`mx.metal.is_available()` so everything runs on MLX's Linux CPU build for tests.
The trainer reaches all of it through one `Runtime` object. Importing it first checks
that this Python has numpy and MLX (one sentence, not a traceback, when it was started
outside the project's environment). Locked: the research agent never edits it.
"""

from __future__ import annotations

import functools
import os
import random
import sys

import backends
from backends import HostInfo, describe, mfu_percent, require_environment

require_environment(os.path.basename(sys.argv[0]) or "train_mlx.py", ("numpy", "mlx"))

import mlx.core as mx  # noqa: E402 - after the check above
import numpy as np  # noqa: E402

__all__ = [
    "Runtime",
    "compute_dtype",
    "export_for_eval",
    "metal_available",
    "peak_memory_mb",
    "reset_peak_memory",
    "seed_all",
    "sliding_window_mask",
    "synchronize",
]


def metal_available() -> bool:
    """True on Apple Silicon with Metal; False on MLX's CPU build."""
    return bool(mx.metal.is_available())


def compute_dtype(info: HostInfo | None = None) -> mx.Dtype:
    """bf16 on Metal; fp32 on CPU, where MLX's bf16 matmuls are many times slower than fp32."""
    return mx.bfloat16 if metal_available() else mx.float32


def synchronize(info: HostInfo | None = None) -> None:
    """Wait for all queued MLX work."""
    mx.synchronize()


def reset_peak_memory() -> None:
    """Start peak-memory tracking afresh."""
    mx.reset_peak_memory()


def peak_memory_mb() -> float:
    """Peak memory MLX allocated, in MiB."""
    return mx.get_peak_memory() / 2**20


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and MLX."""
    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


@functools.lru_cache(maxsize=32)
def _mask(seq_len: int, window: int, dtype_name: str) -> mx.array:
    i = mx.arange(seq_len)[:, None]
    j = mx.arange(seq_len)[None, :]
    diff = i - j
    allowed = (diff >= 0) & (diff <= window)
    dtype = getattr(mx, dtype_name)
    mask = mx.where(allowed, mx.array(0.0, dtype=dtype), mx.array(-float("inf"), dtype=dtype))
    mx.eval(mask)  # cache a materialized array, never a lazy graph captured while tracing a compiled function
    return mask


def sliding_window_mask(seq_len: int, window: int, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Additive (T, T) mask (0 where query i may attend key j, i.e. 0 <= i - j <= window; -inf elsewhere).

    Built once per (T, window, dtype) and cached.
    """
    return _mask(seq_len, window, str(dtype).split(".")[-1])


def export_for_eval(forward, directory, batch_size: int, seq_len: int) -> dict:
    """Export `forward` (tokens (B, T) int32 -> logits (B, T, V)) with mx.export_function as
    directory/model.mlxfn for one fixed shape; the weights are captured as constants. Returns the
    graph's shape facts (the harness reads the batch size from them)."""
    from pathlib import Path

    example = mx.zeros((batch_size, seq_len), dtype=mx.int32)
    mx.export_function(str(Path(directory) / "model.mlxfn"), lambda idx: (forward(idx),), example)
    return {"format": "mlxfn", "batch_size": batch_size, "seq_len": seq_len}


class Runtime:
    """This host as train_mlx.py uses it: the MLX host (whatever the machine's default backend), the compute
    dtype, whether to compile, whether Metal is there, seeding, masks, memory, MFU and the hand-over's export."""

    def __init__(self, host: HostInfo | None = None) -> None:
        if host is None:
            host = backends.detect()
            if host.framework != "mlx":  # the MLX trainer runs on MLX whatever the host's default backend is
                host = backends.detect("mlx")
        self.host = host
        self.backend = host.backend
        self.metal = metal_available()
        self.dtype = compute_dtype(host)  # bf16 on Metal, fp32 on CPU
        self.compile = host.compile  # mx.compile the training step

    def describe(self) -> str:
        """One line: the backend, the device and why it was chosen."""
        return describe(self.host)

    def seed_all(self, seed: int) -> None:
        seed_all(seed)

    def sliding_window_mask(self, seq_len: int, window: int, dtype: mx.Dtype = mx.float32) -> mx.array:
        return sliding_window_mask(seq_len, window, dtype)

    def reset_peak_memory(self) -> None:
        reset_peak_memory()

    def peak_memory_mb(self) -> float:
        return peak_memory_mb()

    def mfu_percent(self, flops_per_token: float, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation in percent of the device's bf16 peak; None where the peak is unknown."""
        return mfu_percent(flops_per_token, tokens_per_second, self.host)

    def export(self, forward, batch_size: int, seq_len: int):
        """What prepare.hand_over calls: export_for_eval of `forward` at (batch_size, seq_len) into its directory."""
        return lambda directory: export_for_eval(forward, directory, batch_size, seq_len)
