"""PyTorch runtime helpers shared by train_cuda.py and the evaluator (CUDA, ROCm, MPS, CPU).

Per-device differences live here behind small functions, so the trainer never
branches on the backend: device and compute dtype, autocast, synchronize, peak
memory, seeding, host-to-device copies, the attention fallback chain
(FlashAttention-3 -> FlexAttention -> SDPA with an explicit sliding-window mask)
and the evaluator's logits -> nats adapter. The trainer reaches all of it through
one `Runtime` object. Locked: the research agent never edits it.

Importing it first checks that this Python has numpy and torch (one sentence, not a
traceback, when it was started outside the project's environment) and sets the CUDA
allocator's fragmentation setting before torch starts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import resource
import sys
from typing import Callable

import backends
from backends import HostInfo, describe, mfu_percent, require_environment

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # less fragmentation on CUDA
require_environment(os.path.basename(sys.argv[0]) or "train_cuda.py", ("numpy", "torch"))

import numpy as np  # noqa: E402 - after the check above
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

__all__ = [
    "Attention",
    "Runtime",
    "autocast",
    "compute_dtype",
    "device",
    "export_for_eval",
    "make_attention",
    "peak_memory_mb",
    "reset_peak_memory",
    "seed_all",
    "sliding_window_mask",
    "synchronize",
    "to_device",
]


def device(info: HostInfo) -> torch.device:
    """The torch device serving this backend (ROCm GPUs appear as 'cuda' in PyTorch)."""
    if info.backend in ("cuda", "rocm"):
        return torch.device("cuda")
    if info.backend == "mps":
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype(info: HostInfo) -> torch.dtype | None:
    """bf16 where the device runs it fast (CUDA sm80+, ROCm, MPS, CPUs with native bf16); None means fp32."""
    return torch.bfloat16 if info.bf16 else None


def autocast(info: HostInfo):
    """Autocast context for the forward pass; a no-op context in fp32."""
    dtype = compute_dtype(info)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device(info).type, dtype=dtype)


def synchronize(info: HostInfo) -> None:
    """Wait for queued device work (for honest timings); a no-op on CPU."""
    if info.backend in ("cuda", "rocm"):
        torch.cuda.synchronize()
    elif info.backend == "mps":
        torch.mps.synchronize()


def reset_peak_memory(info: HostInfo) -> None:
    """Start peak-memory tracking afresh where the backend allows it."""
    if info.backend in ("cuda", "rocm"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(info: HostInfo) -> float:
    """Peak memory in MiB: the CUDA/ROCm allocator's peak, MPS driver memory, or the CPU process's max RSS.

    MPS has no peak counter; its driver-allocated memory at the time of the call is
    reported (the caching allocator keeps it near the peak after training).
    """
    if info.backend in ("cuda", "rocm"):
        return torch.cuda.max_memory_allocated() / 2**20
    if info.backend == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_device(array: np.ndarray, info: HostInfo) -> torch.Tensor:
    """Copy a NumPy batch to the device; pinned and asynchronous on CUDA/ROCm."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    dev = device(info)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


# ---------------------------------------------------------------------------
# Attention: one API, three kernels.
# q: (B, T, H, D), k/v: (B, T, Hkv, D) -> (B, T, H, D). Causal; query i sees key j
# exactly when 0 <= i - j <= window (FlashAttention's window_size=(window, 0)).
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def sliding_window_mask(seq_len: int, window: int, dev: str = "cpu") -> torch.Tensor:
    """Boolean (T, T) mask, True where attention is allowed; built once per (T, window, device)."""
    i = torch.arange(seq_len, device=dev)[:, None]
    j = torch.arange(seq_len, device=dev)[None, :]
    diff = i - j
    return (diff >= 0) & (diff <= window)


_EXPORTING = False  # while True, every kernel computes through SDPA (see export_for_eval)
_EXPORT_SDPA: "SDPAAttention | None" = None


class Attention:
    """A chosen attention kernel. Call it as attn(q, k, v, window)."""

    name = "base"

    def prepare(self, seq_len: int, windows, dev) -> None:
        """Build per-window state ahead of time (outside any compiled region); optional."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        raise NotImplementedError


class SDPAAttention(Attention):
    """torch's scaled_dot_product_attention with an explicit sliding-window causal mask."""

    name = "sdpa"

    def __init__(self, native_gqa: bool = True) -> None:
        self.native_gqa = native_gqa

    def __call__(self, q, k, v, window):
        T = q.size(1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        group = q.size(1) // k.size(1)
        kwargs = {}
        if group > 1:
            if self.native_gqa:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
        if window >= T - 1:  # the window covers the whole causal past
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        else:
            mask = sliding_window_mask(T, window, str(q.device))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)
        return y.transpose(1, 2)


class FlexAttention(Attention):
    """FlexAttention with a sliding-window block mask (compiled; CUDA/ROCm)."""

    name = "flex"

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self._create_block_mask = create_block_mask
        self._flex = torch.compile(flex_attention, dynamic=False)
        self._masks: dict = {}

    def prepare(self, seq_len: int, windows, dev) -> None:
        for window in set(windows):
            self._block_mask(seq_len, window, torch.device(dev))

    def _block_mask(self, T: int, window: int, dev):
        dev = torch.device(dev)
        key = (T, window, dev.type, dev.index or 0)  # "cuda" and "cuda:0" are the same device
        if key not in self._masks:

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

            self._masks[key] = self._create_block_mask(mask_mod, None, None, T, T, device=dev)
        return self._masks[key]

    def __call__(self, q, k, v, window):
        if _EXPORTING:
            return _EXPORT_SDPA(q, k, v, window)
        T = q.size(1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = self._flex(q, k, v, block_mask=self._block_mask(T, window, q.device), enable_gqa=q.size(1) != k.size(1))
        return y.transpose(1, 2)


class FA3Attention(Attention):
    """FlashAttention-3 (Hopper), native (B, T, H, D) layout, GQA and sliding windows."""

    name = "fa3"

    def __init__(self) -> None:
        import flash_attn_interface

        self._fn = flash_attn_interface.flash_attn_func

    def __call__(self, q, k, v, window):
        if _EXPORTING:
            return _EXPORT_SDPA(q, k, v, window)
        out = self._fn(q, k, v, causal=True, window_size=(window, 0))
        return out[0] if isinstance(out, tuple) else out


def make_attention(info: HostInfo, prefer: str | None = None) -> Attention:
    """Pick the best attention kernel this host offers: fa3 -> flex -> sdpa.

    `prefer` (or AUTORESEARCH_ATTENTION) forces one of the kernels listed in
    info.attention; a kernel that fails to load falls through to the next.
    """
    prefer = prefer or os.environ.get("AUTORESEARCH_ATTENTION")
    order = list(info.attention)
    if prefer:
        if prefer not in order:
            raise ValueError(
                f"Attention kernel '{prefer}' is not available on this host; choose one of: {', '.join(order)}."
            )
        order = [prefer] + [k for k in order if k != prefer]
    builders: dict[str, Callable[[], Attention]] = {
        "fa3": FA3Attention,
        "flex": FlexAttention,
        "sdpa": lambda: SDPAAttention(native_gqa=info.backend != "mps"),
    }
    for name in order:
        try:
            return builders[name]()
        except Exception as e:  # noqa: BLE001 - a kernel that cannot load falls back to the next one, said once
            print(f"attention: {name} could not be loaded ({type(e).__name__}: {str(e).strip()[:200]}); "
                  "falling back to the next kernel", file=sys.stderr, flush=True)
            continue
    return SDPAAttention(native_gqa=info.backend != "mps")


# ---------------------------------------------------------------------------
# Hand-over: the trained model as a pure graph for the judge's harness.
# ---------------------------------------------------------------------------


class _Logits(torch.nn.Module):
    """The model's inference forward: tokens (B, T) -> logits (B, T, V), nothing else."""

    def __init__(self, model: torch.nn.Module, info: HostInfo) -> None:
        super().__init__()
        self.model = model
        self.device_type, self.dtype = device(info).type, compute_dtype(info)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(idx)
        # Autocast entered inside the traced forward is recorded (a wrap_with_autocast region); one entered
        # around torch.export is not, and the graph then mixes bf16 embeddings with fp32 weights.
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            return self.model(idx)


def export_for_eval(model: torch.nn.Module, directory, batch_size: int, seq_len: int, info: HostInfo) -> dict:
    """Export `model`'s forward for (batch_size, seq_len) int32 tokens with torch.export and save it as
    directory/model.pt2; returns the graph's shape facts.

    FlashAttention-3 and FlexAttention compute through SDPA with the same sliding-window causal mask
    while exporting, so every kernel maps to one exported semantics the harness can run anywhere
    torch runs (their equivalence is tested). The graph holds the run's autocast (bf16 where the trainer
    trains in it), in eval mode and without gradients.
    """
    global _EXPORTING, _EXPORT_SDPA
    from pathlib import Path

    model.eval()
    example = torch.zeros((batch_size, seq_len), dtype=torch.int32, device=device(info))
    _EXPORT_SDPA = SDPAAttention(native_gqa=info.backend != "mps")
    _EXPORTING = True
    sliding_window_mask.cache_clear()  # the masks are traced into the graph, never cached from a trace
    try:
        with torch.no_grad():
            program = torch.export.export(_Logits(model, info), (example,))
    finally:
        _EXPORTING = False
        sliding_window_mask.cache_clear()
    path = Path(directory) / "model.pt2"
    torch.export.save(program, str(path))
    return {"format": "pt2", "batch_size": batch_size, "seq_len": seq_len}


# ---------------------------------------------------------------------------
# The trainer's one handle on all of the above.
# ---------------------------------------------------------------------------


class Runtime:
    """This host's device as train_cuda.py uses it: which backend and device, the compute dtype, whether to
    compile, the attention kernel, seeding, batches onto the device, timing, memory, MFU and the hand-over's
    export. `Runtime()` detects the host (AUTORESEARCH_BACKEND, else the hardware: backends.detect)."""

    def __init__(self, host: HostInfo | None = None) -> None:
        self.host = host if host is not None else backends.detect()
        self.backend = self.host.backend  # cuda | rocm | mps | cpu
        self.device = device(self.host)
        self.dtype = compute_dtype(self.host)  # bf16 where supported and fast, None = fp32
        self.compile = self.host.compile  # torch.compile pays off here

    def describe(self) -> str:
        """One line: the backend, the device and why it was chosen."""
        return describe(self.host)

    def seed_all(self, seed: int) -> None:
        seed_all(seed)

    def attention(self, prefer: str | None = None) -> Attention:
        """The best attention kernel this host offers (fa3 -> flex -> sdpa); see make_attention."""
        return make_attention(self.host, prefer)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        return to_device(array, self.host)

    def autocast(self):
        return autocast(self.host)

    def synchronize(self) -> None:
        synchronize(self.host)

    def reset_peak_memory(self) -> None:
        reset_peak_memory(self.host)

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.host)

    def mfu_percent(self, flops_per_token: float, tokens_per_second: float) -> float | None:
        """Model FLOPs utilisation in percent of the device's bf16 peak; None where the peak is unknown."""
        return mfu_percent(flops_per_token, tokens_per_second, self.host)

    def export(self, model: torch.nn.Module, batch_size: int, seq_len: int) -> Callable:
        """What prepare.hand_over calls: export_for_eval of `model` at (batch_size, seq_len) into its directory."""
        return lambda directory: export_for_eval(model, directory, batch_size, seq_len, self.host)
