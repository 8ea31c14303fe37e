"""Cross-backend parity: the PyTorch trainer and the MLX trainer implement the same GPT core.

Identical weights (random everywhere, including the projections and gates the reference
initialises to zero) go into both models through NumPy; both must give the same loss,
logits, gradients and optimizer updates in fp32, and both must match the NumPy reference
in model/reference.py.

Run: .venv/bin/python -m pytest tests/test_parity.py -q     (or: pytest -k parity; a few seconds)
"""


import numpy as np
import pytest

torch = pytest.importorskip("torch")
mx = pytest.importorskip("mlx.core")

from mlx.utils import tree_flatten, tree_map_with_path  # noqa: E402
from params_io import export_params, load_params  # noqa: E402
from trainer_contract import torch_trainer_on_cpu  # noqa: E402

from model import build_config, param_shapes  # noqa: E402
from model.reference import init_params, reference_forward, window_mask  # noqa: E402

# GQA (4 query heads over 2 kv heads), an S window (8) on layer 0 and L (16) on layer 1, a value
# embedding and its gate on layer 1 only: every path of the core is exercised. Width 64 keeps Muon's
# matmuls cheap on MLX's CPU build.
CFG = build_config(depth=2, aspect_ratio=32, head_dim=16, n_kv_head=2, vocab_size=97, sequence_len=16,
                   window_pattern="SL")
LOSS_RTOL = 1e-3


@pytest.fixture(scope="module")
def trainers():
    """(train_cuda, train_mlx), the PyTorch one imported with the CPU backend so every number is fp32."""
    import train_mlx

    return torch_trainer_on_cpu(), train_mlx


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=7, perturb_zeros=True)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, CFG.vocab_size, (2, CFG.sequence_len)).astype(np.int32)
    targets = rng.integers(0, CFG.vocab_size, (2, CFG.sequence_len)).astype(np.int32)
    return idx, targets


def both_models(trainers, params):
    tc, tm = trainers
    tmodel = tc.build_model(CFG, device="cpu")
    mmodel = tm.build_model(CFG, dtype=mx.float32)
    load_params(tmodel, params)
    load_params(mmodel, params)
    return tmodel, mmodel


def mlx_tree(mmodel, named):
    """{canonical name: np array} laid out like the MLX model's parameter tree."""
    return tree_map_with_path(lambda path, _: mx.array(named[path.removesuffix(".weight")]), mmodel.parameters())


def test_parity_exported_names_and_shapes(trainers, params):
    tc, tm = trainers
    tmodel, mmodel = both_models(trainers, params)
    shapes = param_shapes(CFG)
    t_out, m_out = export_params(tmodel), export_params(mmodel)
    assert {k: v.shape for k, v in t_out.items()} == shapes == {k: v.shape for k, v in m_out.items()}
    assert all(np.array_equal(t_out[k], m_out[k]) and np.array_equal(m_out[k], params[k]) for k in shapes)


def test_parity_logits_and_reference(trainers, params, batch):
    tmodel, mmodel = both_models(trainers, params)
    idx, _ = batch
    ref = reference_forward(params, CFG, idx)
    with torch.no_grad():
        t_logits = tmodel(torch.from_numpy(idx).long()).double().numpy()
    m_logits = np.array(mmodel(mx.array(idx)), dtype=np.float64)
    np.testing.assert_allclose(t_logits, ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(m_logits, ref, atol=2e-5, rtol=1e-4)
    for b, t in [(0, 0), (0, 7), (1, 8), (1, 15)]:  # inside the S window, at its edge, past it, the end
        np.testing.assert_allclose(m_logits[b, t], t_logits[b, t], atol=2e-5, rtol=1e-4)
    assert np.abs(ref).max() > 0.5  # the perturbed model produces logits worth comparing


def test_parity_loss(trainers, params, batch):
    tc, tm = trainers
    tmodel, mmodel = both_models(trainers, params)
    idx, targets = batch
    with torch.no_grad():
        t_loss = tmodel(torch.from_numpy(idx).long(), torch.from_numpy(targets).long()).item()
    m_loss = tm.loss_fn(mmodel, mx.array(idx), mx.array(targets)).item()
    ref = reference_forward(params, CFG, idx)
    ref = ref - ref.max(-1, keepdims=True)
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    ref_loss = -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1).mean()
    assert m_loss == pytest.approx(t_loss, rel=LOSS_RTOL)
    assert m_loss == pytest.approx(ref_loss, rel=1e-5) and t_loss == pytest.approx(ref_loss, rel=1e-5)


def test_parity_gradients(trainers, params, batch):
    tc, tm = trainers
    tmodel, mmodel = both_models(trainers, params)
    idx, targets = batch
    tmodel(torch.from_numpy(idx).long(), torch.from_numpy(targets).long()).backward()
    t_grads = {n.removesuffix(".weight"): p.grad.numpy() for n, p in tmodel.named_parameters()}
    _, grads = tm.nn.value_and_grad(mmodel, tm.loss_fn)(mmodel, mx.array(idx), mx.array(targets))
    m_grads = {k.removesuffix(".weight"): np.array(v) for k, v in tree_flatten(grads)}
    assert set(t_grads) == set(m_grads)
    for name, g in t_grads.items():
        assert np.abs(g).max() > 0, f"{name} gets no gradient: a path is not exercised"
        np.testing.assert_allclose(m_grads[name], g, atol=1e-5 * max(1.0, np.abs(g).max()), rtol=1e-3,
                                   err_msg=name)


@pytest.mark.parametrize("window", [0, 1, 7, 8, 15, 16])
def test_parity_window_masks(window):
    from backends import mlx_rt, torch_rt

    T = 16
    allowed = torch_rt.sliding_window_mask(T, window, torch.device("cpu")).numpy()
    additive = np.array(mlx_rt.sliding_window_mask(T, window, mx.float32))
    assert allowed.dtype == np.bool_ and allowed.shape == additive.shape == (T, T)
    np.testing.assert_array_equal(allowed, window_mask(T, window))
    np.testing.assert_array_equal(additive == 0, allowed)
    assert np.all(np.isneginf(additive[~allowed]))


def optimizer_step_both(trainers, torch_side, mlx_side, grads, step, progress, mlx_grads=None):
    """One optimizer step in each trainer, with the schedules as their training loops set them.

    torch_side, mlx_side: (model, optimizer); grads: {canonical name: np array} for torch, and for
    MLX too unless mlx_grads is given.
    """
    tc, tm = trainers
    (tmodel, topt), (mmodel, mopt) = torch_side, mlx_side
    lrm, momentum, wd = tc.get_lr_multiplier(progress), tc.get_muon_momentum(step), tc.get_weight_decay(progress)
    assert (lrm, momentum, wd) == (tm.get_lr_multiplier(progress), tm.get_muon_momentum(step),
                                   tm.get_weight_decay(progress))
    for name, p in tmodel.named_parameters():
        p.grad = torch.from_numpy(grads[name.removesuffix(".weight")].copy())
    for group in topt.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"], group["weight_decay"] = momentum, wd
    topt.step()
    mlx_grads = grads if mlx_grads is None else mlx_grads
    mopt.update(mmodel, mlx_tree(mmodel, mlx_grads), mx.array([lrm, momentum, wd]))
    mx.eval(mmodel.parameters())


def test_parity_optimizer_updates(trainers, params):
    """Same params and grads -> same new params, for the Muon matrices and every AdamW group, over two steps."""
    tc, tm = trainers
    tmodel, mmodel = both_models(trainers, params)
    torch_side, mlx_side = (tmodel, tc.build_optimizer(tmodel)), (mmodel, tm.build_optimizer(mmodel))
    rng = np.random.default_rng(1)
    for step, progress in [(0, 0.0), (1, 0.7)]:  # flat lr, then inside the warm-down with less decay
        grads = {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in params.items()}
        optimizer_step_both(trainers, torch_side, mlx_side, grads, step, progress)
        t_out, m_out = export_params(tmodel), export_params(mmodel)
        for name in params:
            moved = np.abs(t_out[name] - params[name]).max()
            assert moved > 0, f"{name} did not move"
            # Compare against the size of the move (Muon moves every matrix by about its lr).
            off = np.abs(m_out[name] - t_out[name]) > 1e-4 * moved + 1e-7
            # Cautious weight decay tests sign(update * param): where that product rounds to ~0 the two
            # frameworks may decide differently, which moves the element by lr * wd * |param| at most.
            assert off.mean() < 1e-3, f"{name}: {off.sum()} of {off.size} elements differ"
            bound = 0.05 * np.abs(params[name])[off] + 1e-6
            np.testing.assert_array_less(np.abs(m_out[name] - t_out[name])[off], bound, err_msg=name)


def test_parity_training_steps(trainers, params):
    """A few whole training steps (forward, backward, update) on the same batches give the same losses."""
    tc, tm = trainers
    tmodel, mmodel = both_models(trainers, params)
    torch_side, mlx_side = (tmodel, tc.build_optimizer(tmodel)), (mmodel, tm.build_optimizer(mmodel))
    loss_and_grad = tm.nn.value_and_grad(mmodel, tm.loss_fn)
    idx = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, CFG.sequence_len))
    targets = np.roll(idx, -1, axis=1)
    t_losses, m_losses = [], []
    for step in range(4):  # the same batch each step: the model memorises it, so the loss must fall
        tmodel.zero_grad(set_to_none=True)
        t_loss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
        t_loss.backward()
        grads = {n.removesuffix(".weight"): p.grad.numpy().copy() for n, p in tmodel.named_parameters()}
        m_loss, m_grads = loss_and_grad(mmodel, mx.array(idx), mx.array(targets))
        t_losses.append(t_loss.item())
        m_losses.append(m_loss.item())
        # Each side steps with its own gradients, so any drift between the trainers would compound.
        m_named = {k.removesuffix(".weight"): np.array(v) for k, v in tree_flatten(m_grads)}
        optimizer_step_both(trainers, torch_side, mlx_side, grads, step, 0.0, mlx_grads=m_named)
    np.testing.assert_allclose(m_losses, t_losses, rtol=LOSS_RTOL)
    assert t_losses[-1] < t_losses[0] - 0.1


def test_the_core_constants_and_schedules_in_both_trainers_agree_with_the_reference(trainers):
    """The trainers hold these inline (the agent's research surface); the project's own two agree with
    each other and with the NumPy reference's values and schedules in model/."""
    import model

    tc, tm = trainers
    for name in ("SOFTCAP", "ROPE_BASE", "RMS_EPS", "VE_GATE_CHANNELS", "POLAR_EXPRESS_COEFFS"):
        assert getattr(tc, name) == getattr(tm, name) == getattr(model, name), name
    shapes = [(8, 64, 128, None, 8192, 2048, "SSSL"), (3, 50, 64, 1, 100, 32, "SL"), (5, 16, 16, None, 50, 64, "s"),
              (1, 64, 32, 2, 97, 16, "L"), (4, 64, 64, 2, 101, 32, "SSSL")]
    for args in shapes:  # the model's shape, windows and value-embedding layers
        want = model.build_config(*args)
        for t in (tc, tm):
            got = t.build_config(*args)
            assert (got.sequence_len, got.vocab_size, got.n_layer, got.n_head, got.n_kv_head, got.n_embd,
                    got.window_pattern, got.head_dim, got.kv_dim) == \
                (want.sequence_len, want.vocab_size, want.n_layer, want.n_head, want.n_kv_head, want.n_embd,
                 want.window_pattern, want.head_dim, want.kv_dim), args
            assert t.window_sizes(got) == model.window_sizes(want), args
            assert [t.has_value_embedding(i, got.n_layer) for i in range(got.n_layer)] == \
                [model.has_value_embedding(i, want.n_layer) for i in range(want.n_layer)]
    for bad in ((4, 64, 64, 3, 100, 32, "SSSL"), (2, 64, 64, None, 100, 32, "SX"), (0, 64, 64, None, 100, 32, "L")):
        for build in (model.build_config, tc.build_config, tm.build_config):
            with pytest.raises(ValueError):
                build(*bad)
    for t in (tc, tm):
        for p in (0.0, 0.05, 0.3, 0.5, 0.75, 0.99, 1.0):
            want = model.lr_multiplier(p, t.WARMUP_RATIO, t.WARMDOWN_RATIO, t.FINAL_LR_FRAC)
            assert t.get_lr_multiplier(p) == pytest.approx(want, abs=1e-12)
            assert t.get_weight_decay(p) == pytest.approx(model.weight_decay_at(p, t.WEIGHT_DECAY), abs=1e-12)
        for step in (0, 1, 150, 299, 300, 5000):
            assert t.get_muon_momentum(step) == pytest.approx(model.muon_momentum(step), abs=1e-12)
