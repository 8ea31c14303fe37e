"""NumPy reference of the GPT core and its optimizer math, for parity tests.

Slow and float64 on purpose: it is the yardstick both trainers are held to, not
something to train with. Parameter names follow `model.param_shapes`.
"""

from __future__ import annotations

import numpy as np

from model import (POLAR_EXPRESS_COEFFS, RMS_EPS, ROPE_BASE, SOFTCAP, VE_GATE_CHANNELS, GPTConfig, has_value_embedding,
                   param_shapes, window_sizes)


def rms_norm(x: np.ndarray, eps: float = RMS_EPS) -> np.ndarray:
    """RMSNorm over the last axis, no learned weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def rotary_cos_sin(seq_len: int, head_dim: int, base: float = ROPE_BASE) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables of shape (seq_len, head_dim // 2): theta = pos * base^(-2i/head_dim)."""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)
    return np.cos(freqs), np.sin(freqs)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half rotary on x of shape (B, T, H, D): y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], axis=-1)


def window_mask(seq_len: int, window: int) -> np.ndarray:
    """Boolean (T, T) mask, True where query i may attend key j: 0 <= i - j <= window."""
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    diff = i - j
    return (diff >= 0) & (diff <= window)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, window: int) -> np.ndarray:
    """Naive masked-softmax attention with grouped-query heads.

    q: (B, T, H, D); k, v: (B, T, Hkv, D). Query head h reads kv head h // (H // Hkv).
    """
    B, T, H, D = q.shape
    group = H // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(D)
    scores = np.where(window_mask(T, window)[None, None], scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bjhd->bihd", probs, v)


def reference_forward(params: dict[str, np.ndarray], cfg: GPTConfig, idx: np.ndarray) -> np.ndarray:
    """Softcapped float64 logits (B, T, V) for token ids idx (B, T)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    cos, sin = rotary_cos_sin(T, D)
    x = rms_norm(p["wte"][idx])
    x0 = x
    for i, window in enumerate(window_sizes(cfg)):
        x = p["resid_lambdas"][i] * x + p["x0_lambdas"][i] * x0
        pre = f"blocks.{i}."
        h = rms_norm(x)
        q = (h @ p[pre + "attn.c_q"].T).reshape(B, T, H, D)
        k = (h @ p[pre + "attn.c_k"].T).reshape(B, T, Hkv, D)
        v = (h @ p[pre + "attn.c_v"].T).reshape(B, T, Hkv, D)
        if has_value_embedding(i, cfg.n_layer):
            ve = p[f"value_embeds.{i}"][idx].reshape(B, T, Hkv, D)
            gate_logits = h[..., :VE_GATE_CHANNELS] @ p[pre + "attn.ve_gate"].T
            gate = 2.0 / (1.0 + np.exp(-gate_logits))
            v = v + gate[..., None] * ve
        q = rms_norm(apply_rotary(q, cos, sin))
        k = rms_norm(apply_rotary(k, cos, sin))
        y = attention(q, k, v, window).reshape(B, T, H * D)
        x = x + y @ p[pre + "attn.c_proj"].T
        h = rms_norm(x)
        x = x + (np.maximum(h @ p[pre + "mlp.c_fc"].T, 0.0) ** 2) @ p[pre + "mlp.c_proj"].T
    x = rms_norm(x)
    logits = x @ p["lm_head"].T
    return SOFTCAP * np.tanh(logits / SOFTCAP)


def init_params(cfg: GPTConfig, seed: int = 0, perturb_zeros: bool = False) -> dict[str, np.ndarray]:
    """The reference initialisation in float32.

    With perturb_zeros, the zero-initialised output projections and gates get small
    random values instead, so a parity test exercises every path.
    """
    rng = np.random.default_rng(seed)
    s = np.sqrt(3.0) / np.sqrt(cfg.n_embd)
    out: dict[str, np.ndarray] = {}
    for name, shape in param_shapes(cfg).items():
        if name == "wte":
            w = rng.normal(0.0, 1.0, shape)
        elif name == "lm_head":
            w = rng.normal(0.0, 0.001 if not perturb_zeros else 0.05, shape)
        elif name == "resid_lambdas":
            w = np.ones(shape)
        elif name == "x0_lambdas":
            w = np.full(shape, 0.1)
        elif name.endswith("c_proj") or name.endswith("ve_gate"):
            w = rng.uniform(-s, s, shape) if perturb_zeros else np.zeros(shape)
        else:  # c_q, c_k, c_v, c_fc, value_embeds
            w = rng.uniform(-s, s, shape)
        out[name] = w.astype(np.float32)
    return out


def polar_express(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """Approximately orthogonalize each matrix of g (..., rows, cols), iterating on the smaller Gram side."""
    x = g / (np.linalg.norm(g, axis=(-2, -1), keepdims=True) * 1.02 + 1e-6)
    tall = g.shape[-2] > g.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        xt = np.swapaxes(x, -1, -2)
        if tall:
            A = xt @ x
            x = a * x + x @ (b * A + c * (A @ A))
        else:
            A = x @ xt
            x = a * x + (b * A + c * (A @ A)) @ x
    return x


def muon_reference_update(
    params: np.ndarray,
    grads: np.ndarray,
    momentum_buffer: np.ndarray,
    second_buffer: np.ndarray,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    beta2: float = 0.95,
    ns_steps: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One Muon step on a stack of same-shape matrices (N, rows, cols).

    Returns (new_params, new_momentum_buffer, new_second_buffer). The second buffer
    has shape (N, rows, 1) when rows >= cols, else (N, 1, cols).
    """
    rows, cols = params.shape[-2], params.shape[-1]
    # Nesterov momentum in lerp form.
    mbuf = momentum_buffer + (grads - momentum_buffer) * (1 - momentum)
    g = grads + (mbuf - grads) * momentum
    g = polar_express(g, ns_steps)
    # NorMuon: per-row (tall) or per-column (wide) second moment, then renormalize.
    red_axis = -1 if rows >= cols else -2
    red_size = g.shape[red_axis]
    v_mean = np.mean(g * g, axis=red_axis, keepdims=True)
    v_norm = np.sqrt(np.sum(v_mean, axis=(-2, -1), keepdims=True) * red_size)
    sbuf = second_buffer + (v_mean - second_buffer) * (1 - beta2)
    step_size = 1.0 / np.sqrt(np.maximum(sbuf, 1e-10))
    v_norm_new = np.sqrt(np.sum(v_mean * red_size * step_size**2, axis=(-2, -1), keepdims=True))
    g = g * step_size * (v_norm / np.maximum(v_norm_new, 1e-10))
    # Shape-aware lr and cautious weight decay (only where update and parameter agree in sign).
    eff_lr = lr * max(1.0, rows / cols) ** 0.5
    mask = (g * params) >= 0
    new_params = params - (eff_lr * g + eff_lr * weight_decay * params * mask)
    return new_params, mbuf, sbuf


def adamw_reference_update(
    param: np.ndarray,
    grad: np.ndarray,
    exp_avg: np.ndarray,
    exp_avg_sq: np.ndarray,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float = 1e-10,
    weight_decay: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One AdamW step with bias correction (step counts from 1). Returns (param, exp_avg, exp_avg_sq)."""
    p = param * (1 - lr * weight_decay)
    m = exp_avg + (grad - exp_avg) * (1 - beta1)
    v = exp_avg_sq + (grad * grad - exp_avg_sq) * (1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = np.sqrt(v / bias2) + eps
    return p - (lr / bias1) * m / denom, m, v
