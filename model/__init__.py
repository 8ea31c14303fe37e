"""Framework-neutral reference of the GPT core both trainers implement, and its accounting.

The trainers hold their research knobs themselves (the config they derive from their
hyperparameters, attention windows, which layers carry value embeddings, constants and
schedules); this package is the reference the parity tests hold them to: the same
definitions in plain Python/NumPy, with the NumPy reference forward in `model.reference`.
What the trainers import from here is the accounting, which is not research surface:
`count_params` and `training_flops`, from the parameters and windows of their own model.

This package is locked: the research agent never edits it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "GPTConfig",
    "build_config",
    "window_sizes",
    "has_value_embedding",
    "VE_GATE_CHANNELS",
    "ROPE_BASE",
    "SOFTCAP",
    "RMS_EPS",
    "param_shapes",
    "param_counts",
    "flops_per_token",
    "count_params",
    "training_flops",
    "POLAR_EXPRESS_COEFFS",
    "lr_multiplier",
    "muon_momentum",
    "weight_decay_at",
]

VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of x
ROPE_BASE = 10000.0
SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP)
RMS_EPS = 1e-6  # epsilon of every RMSNorm in both trainers

# Polar Express coefficients (a, b, c) for the 5 orthogonalization steps of Muon.
POLAR_EXPRESS_COEFFS: list[tuple[float, float, float]] = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. Build it with `build_config` from the trainer's hyperparameters."""

    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "SSSL"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"N_KV_HEAD={self.n_kv_head} must divide the number of heads ({self.n_head}); "
                f"pick one of {[d for d in range(1, self.n_head + 1) if self.n_head % d == 0]}"
            )
        if not self.window_pattern or set(self.window_pattern.upper()) - {"L", "S"}:
            raise ValueError(
                f"WINDOW_PATTERN={self.window_pattern!r} must be a non-empty string of 'L' and 'S'"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim


def build_config(
    depth: int,
    aspect_ratio: int,
    head_dim: int,
    n_kv_head: int | None,
    vocab_size: int,
    sequence_len: int,
    window_pattern: str = "SSSL",
) -> GPTConfig:
    """Derive the model shape the way the reference does.

    width = depth * aspect_ratio rounded up to a multiple of head_dim;
    heads = width / head_dim; n_kv_head None means one kv head per query head.
    """
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise ValueError(
            f"DEPTH ({depth}), ASPECT_RATIO ({aspect_ratio}) and HEAD_DIM ({head_dim}) must be positive"
        )
    base_dim = depth * aspect_ratio
    width = ((base_dim + head_dim - 1) // head_dim) * head_dim
    n_head = width // head_dim
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head if n_kv_head is None else int(n_kv_head),
        n_embd=width,
        window_pattern=window_pattern.upper(),
    )


def window_sizes(cfg: GPTConfig) -> list[int]:
    """Attention window per layer: 'L' = full sequence, 'S' = half; the last layer is always 'L'.

    A window W means position i attends to j exactly when 0 <= i - j <= W
    (FlashAttention's window_size=(W, 0)).
    """
    long_window = cfg.sequence_len
    short_window = long_window // 2
    pattern = cfg.window_pattern.upper()
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(cfg.n_layer)]
    sizes[-1] = long_window
    return sizes


def has_value_embedding(layer_idx: int, n_layer: int) -> bool:
    """Value embeddings sit on alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes shared by both trainers (Linear weights are (out, in))."""
    C, V, L = cfg.n_embd, cfg.vocab_size, cfg.n_layer
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_dim
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, C)}
    for i in range(L):
        p = f"blocks.{i}."
        shapes[p + "attn.c_q"] = (q_dim, C)
        shapes[p + "attn.c_k"] = (kv_dim, C)
        shapes[p + "attn.c_v"] = (kv_dim, C)
        shapes[p + "attn.c_proj"] = (C, q_dim)
        if has_value_embedding(i, L):
            shapes[p + "attn.ve_gate"] = (cfg.n_kv_head, VE_GATE_CHANNELS)
        shapes[p + "mlp.c_fc"] = (4 * C, C)
        shapes[p + "mlp.c_proj"] = (C, 4 * C)
    for i in range(L):
        if has_value_embedding(i, L):
            shapes[f"value_embeds.{i}"] = (V, kv_dim)
    shapes["resid_lambdas"] = (L,)
    shapes["x0_lambdas"] = (L,)
    shapes["lm_head"] = (V, C)
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def count_params(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Parameter counts by group, as the reference reports them, from a model's parameter names and shapes
    (`wte`, `value_embeds.<i>`, `lm_head`, the `resid_lambdas`/`x0_lambdas` scalars, every other one a
    transformer matrix; a `.weight` suffix is allowed). The trainers pass their own model's parameters."""
    counts = {"wte": 0, "value_embeds": 0, "lm_head": 0, "transformer_matrices": 0, "scalars": 0}
    for name, shape in shapes.items():
        top = name.split(".")[0]
        group = top if top in ("wte", "value_embeds", "lm_head") else \
            "scalars" if top in ("resid_lambdas", "x0_lambdas") else "transformer_matrices"
        counts[group] += _numel(tuple(shape))
    counts["total"] = sum(counts.values())
    return counts


def training_flops(counts: dict[str, int], n_head: int, head_dim: int, windows: list[int], sequence_len: int) -> int:
    """Training FLOPs per token (forward + backward), the reference's estimate: 6 x the parameters less the
    embedding tables and scalars, plus 12 x heads x head_dim x the attended length of each layer's window."""
    dense = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
    attn = sum(12 * n_head * head_dim * min(w, sequence_len) for w in windows)
    return 6 * dense + attn


def param_counts(cfg: GPTConfig) -> dict[str, int]:
    """Parameter counts by group of the reference model of `cfg`."""
    return count_params(param_shapes(cfg))


def flops_per_token(cfg: GPTConfig) -> int:
    """Training FLOPs per token of the reference model of `cfg` (see `training_flops`)."""
    return training_flops(param_counts(cfg), cfg.n_head, cfg.head_dim, window_sizes(cfg), cfg.sequence_len)


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Learning-rate multiplier at `progress` = training seconds / time budget (0..1)."""
    if progress < warmup_ratio:
        return progress / warmup_ratio if warmup_ratio > 0 else 1.0
    if progress < 1.0 - warmdown_ratio:
        return 1.0
    cooldown = max(0.0, (1.0 - progress) / warmdown_ratio) if warmdown_ratio > 0 else 0.0
    return cooldown + (1.0 - cooldown) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon's Nesterov momentum: 0.85 at step 0 rising linearly to 0.95 at step 300."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def weight_decay_at(progress: float, weight_decay: float) -> float:
    """Muon's weight decay, decaying linearly to zero with progress."""
    return weight_decay * (1.0 - progress)
