"""The evaluator's PyTorch adapter: logits -> per-token nats, computed by the judge, never by the model
(locked; part of the evaluator hash)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from backends import HostInfo
from backends.torch_rt import device, to_device


class TorchEvalAdapter:
    """Turns a PyTorch model's logits into per-token nats for prepare.evaluate_bpb."""

    framework = "torch"

    def __init__(self, info: HostInfo, chunk_elements: int = 1 << 24) -> None:
        self.info = info
        self.device = device(info)
        self.chunk_elements = chunk_elements  # bounds the float32 log-softmax temporary

    def to_input(self, tokens: np.ndarray) -> torch.Tensor:
        return to_device(tokens, self.info)

    @torch.no_grad()
    def nats(self, logits: torch.Tensor, targets: np.ndarray) -> np.ndarray:
        """Cross-entropy in float32 per position, returned as float64 (B, T) on the host."""
        B, T, V = logits.shape
        flat = logits.reshape(B * T, V)
        y = torch.from_numpy(np.ascontiguousarray(targets)).to(self.device).reshape(-1).long()
        rows = max(1, self.chunk_elements // V)
        out = np.empty(B * T, dtype=np.float64)
        for start in range(0, B * T, rows):
            part = F.cross_entropy(flat[start : start + rows].float(), y[start : start + rows], reduction="none")
            out[start : start + rows] = part.double().cpu().numpy()
        return out.reshape(B, T)

    @torch.no_grad()
    def to_numpy(self, logits: torch.Tensor) -> np.ndarray:
        return logits.detach().float().cpu().numpy()


def eval_adapter(info: HostInfo) -> TorchEvalAdapter:
    """The evaluator adapter for this host's PyTorch device."""
    return TorchEvalAdapter(info)
