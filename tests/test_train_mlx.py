"""Tests of the MLX trainer (train_mlx.py) on MLX's CPU build (fp32).

Run: .venv/bin/python -m pytest tests/test_train_mlx.py -q
(well under a minute; the whole-run tests use the prepared tiny protocol from the `tiny_cache`
fixture, a time budget of a few seconds, and the trainer's CPU baseline. The run that trains, hands
over and is scored by the harness is marked slow: `-m slow` runs it.)
Cross-framework checks against train_cuda.py live in tests/test_parity.py.
"""

import json
import math
import re

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import pristine  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from trainer_contract import (  # noqa: E402
    BAD_BATCH_PATTERN,
    BAD_BATCH_SCRIPT,
    NAN_SCRIPT,
    check_fails_fast,
    check_learning_run,
    run_trainer,
)

from model import build_config, flops_per_token, param_counts, param_shapes, window_sizes  # noqa: E402
from params_io import export_params, load_params  # noqa: E402

import prepare  # noqa: E402
from data.block import block_names  # noqa: E402
from model.reference import adamw_reference_update, init_params, muon_reference_update, reference_forward  # noqa: E402

TRAINER = pristine.trainer("train_mlx.py")  # the project's trainer, not a research branch's kept edit


@pytest.fixture(scope="module")
def tm():
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTORESEARCH_BACKEND", "mlx")
    import train_mlx

    yield train_mlx
    mp.undo()


def small_config(n_kv_head=2, seq_len=16, pattern="SL", depth=2):
    # width 128, 4 heads of 32, 2 kv heads: grouped-query attention with a real window on layer 0
    return build_config(depth, 64, 32, n_kv_head, 97, seq_len, pattern)


# --- model ------------------------------------------------------------------


def test_forward_matches_numpy_reference(tm):
    cfg = small_config()
    model = tm.build_model(cfg, dtype=mx.float32)
    params = init_params(cfg, seed=1, perturb_zeros=True)  # non-zero projections and gates: every path counts
    load_params(model, params)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.sequence_len))
    logits = np.array(model(mx.array(idx)), dtype=np.float64)
    np.testing.assert_allclose(logits, reference_forward(params, cfg, idx), atol=2e-5, rtol=1e-4)


def naive_attention(q, k, v, window):
    """Masked softmax written out in NumPy: head h reads kv head h // group; i sees j iff 0 <= i-j <= window."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = np.zeros_like(q)
    for h in range(H):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(0, 2, 1) / math.sqrt(D)  # (B, T, T)
        for i in range(T):
            for j in range(T):
                if not 0 <= i - j <= window:
                    scores[:, i, j] = -np.inf
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, :, h] = (scores / scores.sum(-1, keepdims=True)) @ v[:, :, h // group]
    return out


@pytest.mark.parametrize("window", [0, 3, 8, 15])
def test_attention_sliding_window_gqa_matches_naive(tm, window):
    cfg = small_config(n_kv_head=1)  # 4 query heads share one kv head
    model = tm.build_model(cfg, dtype=mx.float32)
    attn = model.blocks[1].attn  # the last layer carries a value embedding: the gate is exercised too
    rng = np.random.default_rng(window)
    attn.ve_gate.weight = mx.array(rng.normal(size=attn.ve_gate.weight.shape).astype(np.float32))
    B, T, C, H, Hkv, D = 2, cfg.sequence_len, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    x = rng.normal(size=(B, T, C)).astype(np.float32)
    ve = rng.normal(size=(B, T, Hkv * D)).astype(np.float32)
    y = np.array(attn(mx.array(x), mx.array(ve), window), dtype=np.float64)
    # the same layer by hand, in float64
    W = {k: np.array(getattr(attn, k).weight, dtype=np.float64) for k in ("c_q", "c_k", "c_v", "c_proj", "ve_gate")}
    x, ve = x.astype(np.float64), ve.astype(np.float64)
    q = (x @ W["c_q"].T).reshape(B, T, H, D)
    k = (x @ W["c_k"].T).reshape(B, T, Hkv, D)
    v = (x @ W["c_v"].T).reshape(B, T, Hkv, D)
    gate = 2 / (1 + np.exp(-(x[..., :32] @ W["ve_gate"].T)))
    v = v + gate[..., None] * ve.reshape(B, T, Hkv, D)
    theta = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, D, 2) / D)
    cos, sin = np.cos(theta)[None, :, None], np.sin(theta)[None, :, None]

    def rope_norm(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2 :]
        t = np.concatenate([t1 * cos + t2 * sin, -t1 * sin + t2 * cos], -1)
        return t / np.sqrt(np.mean(t * t, -1, keepdims=True) + 1e-6)

    expected = naive_attention(rope_norm(q), rope_norm(k), v, window).reshape(B, T, H * D) @ W["c_proj"].T
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-4)


def test_window_changes_only_what_it_should(tm):
    """A future token never moves earlier logits."""
    cfg = build_config(2, 64, 32, 2, 97, 16, "S")  # layer 0 has a window of 8
    model = tm.build_model(cfg, dtype=mx.float32)
    load_params(model, init_params(cfg, seed=2, perturb_zeros=True))
    idx = np.random.default_rng(0).integers(0, 97, (1, 16))
    changed = idx.copy()
    changed[0, 9] = (changed[0, 9] + 1) % 97
    a, b = np.array(model(mx.array(idx))), np.array(model(mx.array(changed)))
    assert np.array_equal(a[0, :9], b[0, :9])
    assert not np.allclose(a[0, 9:], b[0, 9:])


def test_masks_are_built_once(tm):
    from backends import mlx_rt

    assert tm.attention_mask(16, 16, mx.float32) == "causal"  # a full window takes the fused causal path
    assert tm.attention_mask(16, 8, mx.float32) is mlx_rt.sliding_window_mask(16, 8, mx.float32)


def test_params_and_flops_match_model_package(tm):
    cfg = build_config(4, 64, 64, 2, 101, 32, "SSSL")
    model = tm.build_model(cfg, dtype=mx.float32)
    exported = export_params(model)
    assert {k: v.shape for k, v in exported.items()} == param_shapes(cfg)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == param_counts(cfg)["total"]
    assert model.window_sizes == window_sizes(cfg) == [16, 16, 16, 32]
    # the reference's estimate_flops, recomputed from the MLX module itself (as the PyTorch twin does)
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    excluded = model.wte.weight.size + sum(e.weight.size for e in model.value_embeds.values())
    excluded += model.resid_lambdas.size + model.x0_lambdas.size
    attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in model.window_sizes)
    assert 6 * (total - excluded) + attn == flops_per_token(cfg)


def test_init_follows_the_reference(tm):
    cfg = small_config()
    model = tm.build_model(cfg, dtype=mx.float32)
    p = export_params(model)
    s = 3**0.5 / cfg.n_embd**0.5
    assert abs(p["wte"].std() - 1.0) < 0.05 and abs(p["lm_head"].std() - 0.001) < 1e-4
    for i in range(cfg.n_layer):
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "mlp.c_fc"):
            w = p[f"blocks.{i}.{name}"]
            assert np.abs(w).max() <= s and w.std() > 0.5 * s / 3**0.5
        assert not p[f"blocks.{i}.attn.c_proj"].any() and not p[f"blocks.{i}.mlp.c_proj"].any()
    assert not p["blocks.1.attn.ve_gate"].any() and "blocks.0.attn.ve_gate" not in p
    assert np.abs(p["value_embeds.1"]).max() <= s
    assert np.array_equal(p["x0_lambdas"], np.full(2, 0.1, np.float32)) and np.array_equal(p["resid_lambdas"],
                                                                                          np.ones(2, np.float32))


def test_embeddings_are_stored_in_the_compute_dtype(tm):
    model = tm.build_model(small_config(), dtype=mx.bfloat16)
    assert model.wte.weight.dtype == mx.bfloat16 and model.value_embeds["1"].weight.dtype == mx.bfloat16
    assert model.lm_head.weight.dtype == mx.float32  # matrices stay fp32 masters, cast per matmul
    logits = model(mx.array(np.zeros((1, 16), np.int32)))
    assert logits.dtype == mx.float32 and np.abs(np.array(logits)).max() <= 15.0  # softcapped fp32 logits


def test_export_load_round_trip(tm):
    cfg = small_config()
    model = tm.build_model(cfg, dtype=mx.float32)
    params = init_params(cfg, seed=3, perturb_zeros=True)
    load_params(model, params)
    out = export_params(model)
    assert all(np.array_equal(out[k], params[k]) for k in params)
    with pytest.raises(KeyError):
        load_params(model, {k: v for k, v in params.items() if k != "lm_head"})


# --- optimizer ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_muon_steps_match_numpy_reference(tm, shape):
    rng = np.random.default_rng(0)
    p = rng.normal(0, 0.2, (3, *shape)).astype(np.float32)
    rows, cols = shape
    ref_p, mbuf, sbuf = p.astype(np.float64), np.zeros((3, *shape)), np.zeros((3, rows, 1) if rows >= cols else
                                                                                 (3, 1, cols))
    got, m_mbuf, m_sbuf = mx.array(p), mx.array(mbuf, mx.float32), mx.array(sbuf, mx.float32)
    for _ in range(3):
        g = rng.normal(0, 1, p.shape).astype(np.float32)
        got, m_mbuf, m_sbuf = tm.muon_update(got, mx.array(g), m_mbuf, m_sbuf, mx.array(0.02), mx.array(0.9),
                                             mx.array(0.3))
        ref_p, mbuf, sbuf = muon_reference_update(ref_p, g.astype(np.float64), mbuf, sbuf, lr=0.02, momentum=0.9,
                                                  weight_decay=0.3)
    np.testing.assert_allclose(np.array(got), ref_p, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(np.array(m_sbuf), sbuf, atol=1e-6, rtol=1e-4)
    assert not np.allclose(np.array(got), p)


def test_muon_in_bf16_stays_close_to_fp32(tm):
    """Metal orthogonalizes in bf16 (like the reference on GPUs); the step must stay close to fp32's."""
    rng = np.random.default_rng(2)
    p, g = (mx.array(rng.normal(0, 0.2, (2, 32, 16)).astype(np.float32)) for _ in range(2))
    state = (mx.zeros((2, 32, 16)), mx.zeros((2, 32, 1)))
    lr, momentum, wd = mx.array(0.02), mx.array(0.9), mx.array(0.0)
    full = tm.muon_update(p, g, *state, lr, momentum, wd, ortho_dtype=mx.float32)[0]
    half = tm.muon_update(p, g, *state, lr, momentum, wd, ortho_dtype=mx.bfloat16)[0]
    assert half.dtype == mx.float32  # parameters and buffers stay fp32 whatever the orthogonalization dtype
    step_full, step_half = np.array(full - p), np.array(half - p)
    # bf16 Polar Express lands ~6% (PyTorch) to ~12% (MLX's CPU bf16 matmuls) away from fp32's step.
    assert np.linalg.norm(step_half - step_full) < 0.2 * np.linalg.norm(step_full)


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs an Apple Silicon GPU (Metal)")
def test_metal_trains_in_bf16(tm):
    cfg = small_config()
    model = tm.build_model(cfg)  # the backend's compute dtype: bf16 on Metal
    assert model.wte.weight.dtype == mx.bfloat16
    optimizer = tm.build_optimizer(model)
    fwd_bwd, update = tm.make_step_functions(model, optimizer, True)
    x = mx.array(np.random.default_rng(0).integers(0, 97, (4, 16)))
    y = mx.roll(x, -1, axis=1)
    losses = []
    for step in range(5):
        loss, grads = fwd_bwd(x, y)
        update(grads, mx.array([1.0, tm.get_muon_momentum(step), tm.get_weight_decay(0.0)]))
        mx.eval(model.state, optimizer.state)
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_polar_express_orthogonalizes(tm):
    g = mx.array(np.random.default_rng(0).normal(size=(2, 64, 16)).astype(np.float32))
    x = np.array(tm.polar_express(g))
    singular_values = np.linalg.svd(x, compute_uv=False)
    assert np.all((singular_values > 0.5) & (singular_values < 1.3))  # Polar Express lands near 1, not exactly


def test_adamw_steps_match_numpy_reference(tm):
    rng = np.random.default_rng(1)
    p0 = rng.normal(0, 1, (5, 7)).astype(np.float32)
    got, m, v = mx.array(p0), mx.zeros((5, 7)), mx.zeros((5, 7))
    ref, rm, rv = p0.astype(np.float64), np.zeros((5, 7)), np.zeros((5, 7))
    for step in range(1, 4):
        g = rng.normal(0, 1, (5, 7)).astype(np.float32)
        got, m, v = tm.adamw_update(got, mx.array(g), m, v, mx.array(float(step)), 0.01, 0.8, 0.95)
        ref, rm, rv = adamw_reference_update(ref, g.astype(np.float64), rm, rv, step=step, lr=0.01, beta1=0.8,
                                             beta2=0.95)
    np.testing.assert_allclose(np.array(got), ref, atol=1e-6, rtol=1e-5)


def test_optimizer_groups_follow_the_reference(tm):
    cfg = build_config(3, 64, 64, None, 97, 16, "SSSL")  # width 192
    model = tm.build_model(cfg, dtype=mx.float32)
    opt = tm.build_optimizer(model, unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                             adam_betas=(0.8, 0.95), weight_decay=0.2)
    scale = (192 / 768) ** -0.5
    paths = [k for k, _ in tree_flatten(model.parameters())]
    muon_paths = [k for paths_, _ in opt.muon.values() for k in paths_]
    assert sorted(list(opt.adam) + muon_paths) == sorted(paths)  # every parameter in exactly one group
    assert opt.adam["lm_head.weight"] == pytest.approx((0.004 * scale, 0.8, 0.95))
    assert opt.adam["wte.weight"] == opt.adam["value_embeds.0.weight"] == pytest.approx((0.6 * scale, 0.8, 0.95))
    assert opt.adam["resid_lambdas"] == pytest.approx((0.005, 0.8, 0.95))
    assert opt.adam["x0_lambdas"] == (0.5, 0.96, 0.95)
    assert sorted(muon_paths) == sorted(k for k in paths if k.startswith("blocks."))
    shapes = dict(tree_flatten(model.parameters()))
    for key, (group, lr) in opt.muon.items():
        assert lr == 0.04 and {tuple(shapes[k].shape) for k in group} == {tuple(map(int, key.split("x")))}
    assert opt.state["muon"]["768x192"]["second"].shape == (3, 768, 1)  # c_fc is tall: one statistic per row
    assert opt.state["muon"]["192x768"]["second"].shape == (3, 1, 768)  # mlp c_proj is wide: one per column


def test_compiled_step_matches_eager_step(tm):
    """mx.compile over explicit state must not change the numbers, across several steps."""
    cfg = small_config()
    x = mx.array(np.random.default_rng(0).integers(0, 97, (2, 16)))
    y = mx.roll(x, -1, axis=1)
    losses, finals = [], []
    for compiled in (False, True):
        model = tm.build_model(cfg, dtype=mx.float32)
        load_params(model, init_params(cfg, seed=4))
        optimizer = tm.build_optimizer(model)
        fwd_bwd, update = tm.make_step_functions(model, optimizer, compiled)
        run = []
        for step in range(3):
            loss, grads = fwd_bwd(x, y)
            update(grads, mx.array([1.0, tm.get_muon_momentum(step), tm.get_weight_decay(0.5)]))
            mx.eval(model.state, optimizer.state)
            run.append(loss.item())
        losses.append(run)
        finals.append(export_params(model))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][-1] < losses[0][0]
    for name in finals[0]:
        np.testing.assert_allclose(finals[1][name], finals[0][name], atol=1e-5, err_msg=name)


# --- hyperparameter block -------------------------------------------------------


def test_hyperparameter_block_is_one_line_per_constant(tm):
    text = TRAINER.read_text()
    block = text.split("# --- hyperparameters ---\n")[1].split("# --- end hyperparameters ---")[0]
    names = block_names(text)
    assert names[:3] == ["DEPTH", "ASPECT_RATIO", "HEAD_DIM"] and "FINAL_LR_FRAC" in names
    for name in names:
        assert len(re.findall(rf"^{name} = .+$", block, flags=re.M)) == 1, name  # the reference value
    overrides = re.findall(r"^    ([A-Z_0-9]+) = ", block, flags=re.M)
    assert set(overrides) <= set(names)
    assert tm.HARDWARE == ("metal" if mx.metal.is_available() else "cpu")
    hp = prepare.hyperparameters(vars(tm))
    assert list(hp) == names and hp["DEPTH"] == tm.DEPTH
    json.dumps(hp)  # recorded as one JSON line


def test_same_hyperparameter_names_as_the_torch_trainer(tm):
    names = lambda path: re.findall(r"^([A-Z_0-9]+) = ", path.read_text().split("# --- hyperparameters ---")[1]
                                    .split("# --- end hyperparameters ---")[0], flags=re.M)
    torch_trainer = pristine.trainer("train_cuda.py")
    if not torch_trainer.exists():
        pytest.skip("train_cuda.py not present")
    assert names(TRAINER) == names(torch_trainer)  # a config carries between the trainers


# --- whole runs -------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_run_learns_and_prints_summary(tm, tiny_cache):
    budget = 15.0  # the trainer counts all but its first step on CPU (~1 s each on 2 busy cores): enough to see it learn
    proc = run_trainer("train_mlx.py", "mlx", tiny_cache, budget)
    summary = check_learning_run(proc, budget, "mlx", "mlx_sdpa")
    assert summary["depth"] == tm.DEPTH  # this host's baseline
    assert summary["hyperparams"] == prepare.hyperparameters(vars(tm))


def test_nan_loss_fails_fast(tiny_cache):
    proc = run_trainer("train_mlx.py", "mlx", tiny_cache, 30.0, script=NAN_SCRIPT.format(module="train_mlx"))
    check_fails_fast(proc, "nan")


def test_indivisible_batch_is_a_clear_error(tiny_cache):
    proc = run_trainer("train_mlx.py", "mlx", tiny_cache, 5.0, script=BAD_BATCH_SCRIPT.format(module="train_mlx"))
    check_fails_fast(proc, BAD_BATCH_PATTERN)

