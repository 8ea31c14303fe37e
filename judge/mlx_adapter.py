"""The evaluator's MLX adapter: logits -> per-token nats, computed by the judge, never by the model
(locked; part of the evaluator hash)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from backends import HostInfo


class MLXEvalAdapter:
    """Turns an MLX model's logits into per-token nats for prepare.evaluate_bpb."""

    framework = "mlx"

    def __init__(self, chunk_elements: int = 1 << 24) -> None:
        self.chunk_elements = chunk_elements  # bounds the float32 log-softmax temporary

    def to_input(self, tokens: np.ndarray) -> mx.array:
        return mx.array(np.ascontiguousarray(tokens))

    def nats(self, logits: mx.array, targets: np.ndarray) -> np.ndarray:
        """Cross-entropy in float32 per position, returned as float64 (B, T) on the host."""
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)
        y = mx.array(np.ascontiguousarray(targets).reshape(-1).astype(np.int32))
        rows = max(1, self.chunk_elements // V)
        out = np.empty(B * T, dtype=np.float64)
        for start in range(0, B * T, rows):
            part = flat[start : start + rows].astype(mx.float32)
            part = part - mx.max(part, axis=-1, keepdims=True)  # exact in float32; large logits lose no precision
            tgt = y[start : start + rows]
            picked = mx.take_along_axis(part, tgt[:, None], axis=-1)[:, 0]
            nll = mx.logsumexp(part, axis=-1) - picked
            out[start : start + rows] = np.array(nll, dtype=np.float64)
        return out.reshape(B, T)

    def to_numpy(self, logits: mx.array) -> np.ndarray:
        return np.array(logits.astype(mx.float32))


def eval_adapter(info: HostInfo | None = None) -> MLXEvalAdapter:
    """The evaluator adapter for MLX."""
    return MLXEvalAdapter()
