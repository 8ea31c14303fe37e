"""Tests for model/: config math, windows, value-embedding rule, counts, FLOPs, schedules, NumPy reference.

Run: uv run pytest tests/test_model.py
"""

from __future__ import annotations

import numpy as np
import pytest

import model
from model import build_config, flops_per_token, has_value_embedding, param_counts, window_sizes
from model.reference import adamw_reference_update, init_params, muon_reference_update, polar_express, reference_forward


def test_reference_sizes_match_the_published_model():
    # depth 8, aspect 64, head dim 128, vocab 8192, seq 2048: 50.3M parameters (reference summary).
    cfg = build_config(8, 64, 128, None, 8192, 2048)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (512, 4, 4, 128)
    assert round(param_counts(cfg)["total"] / 1e6, 1) == 50.3
    assert window_sizes(cfg) == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]


def test_width_rounds_up_to_head_dim_and_gqa_must_divide():
    cfg = build_config(3, 50, 64, 1, 100, 32)
    assert cfg.n_embd == 192 and cfg.n_head == 3 and cfg.kv_dim == 64
    with pytest.raises(ValueError, match="must divide"):
        build_config(4, 64, 64, 3, 100, 32)
    with pytest.raises(ValueError, match="WINDOW_PATTERN"):
        build_config(2, 64, 64, None, 100, 32, "SX")


def test_windows_cycle_pattern_and_last_layer_is_long():
    cfg = build_config(5, 16, 16, None, 50, 64, "SL")
    assert window_sizes(cfg) == [32, 64, 32, 64, 64]
    cfg = build_config(3, 16, 16, None, 50, 64, "s")
    assert window_sizes(cfg) == [32, 32, 64]


def test_value_embedding_layers_alternate_and_include_last():
    assert [i for i in range(8) if has_value_embedding(i, 8)] == [1, 3, 5, 7]
    assert [i for i in range(5) if has_value_embedding(i, 5)] == [0, 2, 4]


def test_param_counts_by_hand():
    cfg = build_config(2, 32, 32, 1, 10, 8)  # C=64, H=2, Hkv=1, hd=32
    C, V, kv = 64, 10, 32
    per_block = C * C + 2 * kv * C + C * C + 8 * C * C
    expected = {
        "wte": V * C,
        "lm_head": V * C,
        "value_embeds": V * kv,  # only layer 1
        "transformer_matrices": 2 * per_block + 1 * 32,  # one ve_gate (Hkv x 32)
        "scalars": 4,
    }
    counts = param_counts(cfg)
    for key, value in expected.items():
        assert counts[key] == value, key
    assert counts["total"] == sum(expected.values())


def test_flops_per_token_formula():
    cfg = build_config(2, 32, 32, None, 10, 8, "SL")
    c = param_counts(cfg)
    dense = c["total"] - c["wte"] - c["value_embeds"] - c["scalars"]
    attn = 12 * 2 * 32 * 4 + 12 * 2 * 32 * 8  # S window = 4, last layer L = 8
    assert flops_per_token(cfg) == 6 * dense + attn


def test_schedules():
    assert model.lr_multiplier(0.2, 0.0, 0.5, 0.0) == 1.0
    assert model.lr_multiplier(0.75, 0.0, 0.5, 0.0) == pytest.approx(0.5)
    assert model.lr_multiplier(1.0, 0.0, 0.5, 0.1) == pytest.approx(0.1)
    assert model.lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5)
    assert model.muon_momentum(0) == pytest.approx(0.85)
    assert model.muon_momentum(150) == pytest.approx(0.90)
    assert model.muon_momentum(1000) == pytest.approx(0.95)
    assert model.weight_decay_at(0.25, 0.2) == pytest.approx(0.15)


def test_polar_express_nearly_orthogonalizes_both_shapes():
    rng = np.random.default_rng(0)
    for shape in ((16, 4), (4, 16)):
        x = polar_express(rng.normal(size=(2,) + shape))
        s = np.linalg.svd(x, compute_uv=False)
        assert np.all(s > 0.6) and np.all(s < 1.25), s


def test_muon_reference_update_properties():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(2, 8, 4))
    g = rng.normal(size=(2, 8, 4))
    new, mbuf, sbuf = muon_reference_update(
        p, g, np.zeros_like(p), np.zeros((2, 8, 1)), lr=0.01, momentum=0.9, weight_decay=0.0
    )
    assert sbuf.shape == (2, 8, 1)  # tall: one statistic per row
    np.testing.assert_allclose(mbuf, 0.1 * g)
    step = (p - new) / (0.01 * np.sqrt(2.0))  # lr * sqrt(rows / cols)
    # NorMuon renormalization keeps the orthogonalized update's norm.
    ortho = polar_express(g + (mbuf - g) * 0.9)
    np.testing.assert_allclose(np.linalg.norm(step, axis=(1, 2)), np.linalg.norm(ortho, axis=(1, 2)), rtol=1e-6)
    # Cautious weight decay only touches coordinates where update and parameter agree in sign.
    new_wd, _, _ = muon_reference_update(
        p, g, np.zeros_like(p), np.zeros((2, 8, 1)), lr=0.01, momentum=0.9, weight_decay=0.5
    )
    extra = new - new_wd
    agree = (step * p) >= 0
    assert np.allclose(extra[~agree], 0.0) and np.all(np.abs(extra[agree]) > 0)


def test_adamw_reference_first_step_is_sign_like():
    p, g = np.array([1.0, -2.0]), np.array([0.5, -3.0])
    new, m, v = adamw_reference_update(p, g, np.zeros(2), np.zeros(2), step=1, lr=0.1, beta1=0.8, beta2=0.95)
    np.testing.assert_allclose(new, p - 0.1 * np.sign(g), rtol=1e-6)


def test_reference_forward_shape_softcap_and_causality():
    cfg = build_config(2, 32, 16, 2, 40, 12, "SL")
    params = init_params(cfg, seed=0, perturb_zeros=True)
    idx = np.random.default_rng(0).integers(0, 40, size=(2, 12))
    logits = reference_forward(params, cfg, idx)
    assert logits.shape == (2, 12, 40) and np.all(np.abs(logits) < model.SOFTCAP)
    changed = idx.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % 40
    other = reference_forward(params, cfg, changed)
    np.testing.assert_allclose(other[:, :7], logits[:, :7], atol=1e-12)
    assert not np.allclose(other[:, 7:], logits[:, 7:])


def test_reference_init_zeroes_output_projections_and_gates():
    cfg = build_config(2, 32, 16, None, 40, 12)
    params = init_params(cfg, seed=0)
    assert not params["blocks.0.attn.c_proj"].any() and not params["blocks.1.mlp.c_proj"].any()
    assert not params["blocks.1.attn.ve_gate"].any()
    bound = np.sqrt(3) / np.sqrt(cfg.n_embd)
    assert np.abs(params["blocks.0.attn.c_q"]).max() <= bound
    assert params["lm_head"].std() == pytest.approx(0.001, rel=0.1)
