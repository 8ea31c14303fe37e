"""Tests of the PyTorch trainer (train_cuda.py) on CPU.

Run: .venv/bin/python -m pytest tests/test_train_cuda.py -q
(about half a minute on a small CPU; the real run -- 10 uncounted steps, a 4 s budget, the
hand-over and the harness's scoring -- is marked slow and runs with `-m slow`). The runs use the
prepared tiny protocol from the `tiny_cache` fixture.
"""

import math
import re

import numpy as np
import pristine
import pytest
import torch
from trainer_contract import (BAD_BATCH_PATTERN, BAD_BATCH_SCRIPT, NAN_SCRIPT, check_fails_fast, check_learning_run,
                              run_trainer, torch_trainer_on_cpu)

from model import build_config, flops_per_token, param_counts, param_shapes, window_sizes
from params_io import export_params, load_params

import prepare
from data.block import block_names
from model.reference import adamw_reference_update, init_params, muon_reference_update, reference_forward

TRAINER = pristine.trainer("train_cuda.py")  # the project's trainer, not a research branch's kept edit


@pytest.fixture(scope="module")
def tc():
    """train_cuda imported with the CPU backend, so numerics are fp32 whatever the host."""
    return torch_trainer_on_cpu()


def small_config(n_kv_head=2, seq_len=16, pattern="SL", depth=2):
    # width 128, 4 heads of 32, 2 kv heads: grouped-query attention with a real window on layer 0
    return build_config(depth, 64, 32, n_kv_head, 97, seq_len, pattern)


# --- model ------------------------------------------------------------------


def test_forward_matches_numpy_reference(tc):
    cfg = small_config()
    model = tc.build_model(cfg, device="cpu")
    params = init_params(cfg, seed=1, perturb_zeros=True)  # non-zero projections and gates: every path counts
    load_params(model, params)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.sequence_len))
    with torch.no_grad():
        logits = model(torch.from_numpy(idx)).double().numpy()
    ref = reference_forward(params, cfg, idx)
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-4)


def naive_attention(q, k, v, window):
    """Masked softmax written out: query head h reads kv head h // group; i sees j iff 0 <= i-j <= window."""
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = torch.zeros_like(q)
    for h in range(H):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(-1, -2) / math.sqrt(D)  # (B, T, T)
        for i in range(T):
            for j in range(T):
                if not 0 <= i - j <= window:
                    scores[:, i, j] = float("-inf")
        out[:, :, h] = torch.softmax(scores, dim=-1) @ v[:, :, h // group]
    return out


@pytest.mark.parametrize("window", [0, 3, 8, 15])
def test_attention_sliding_window_gqa_matches_naive(tc, window):
    torch.manual_seed(0)
    cfg = small_config(n_kv_head=1)  # 4 query heads share one kv head
    model = tc.build_model(cfg, device="cpu")
    attn = model.blocks[1].attn  # the last layer carries a value embedding: the gate is exercised too
    torch.nn.init.normal_(attn.ve_gate.weight)
    B, T, C, H, Hkv, D = 2, cfg.sequence_len, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    x = torch.randn(B, T, C)
    ve = torch.randn(B, T, Hkv * D)
    with torch.no_grad():
        y = attn(x, ve, (model.cos[:, :T], model.sin[:, :T]), window)
        # the same layer by hand
        q = (x @ attn.c_q.weight.T).view(B, T, H, D)
        k = (x @ attn.c_k.weight.T).view(B, T, Hkv, D)
        v = (x @ attn.c_v.weight.T).view(B, T, Hkv, D)
        gate = 2 * torch.sigmoid(x[..., :32] @ attn.ve_gate.weight.T)
        v = v + gate[..., None] * ve.view(B, T, Hkv, D)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        theta = pos * 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
        cos, sin = theta.cos().float()[None, :, None], theta.sin().float()[None, :, None]

        def rope_norm(t):
            t1, t2 = t[..., : D // 2], t[..., D // 2 :]
            t = torch.cat([t1 * cos + t2 * sin, -t1 * sin + t2 * cos], -1)
            return t / torch.sqrt(t.square().mean(-1, keepdim=True) + 1e-6)

        expected = naive_attention(rope_norm(q), rope_norm(k), v, window).reshape(B, T, H * D) @ attn.c_proj.weight.T
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)


def test_window_changes_only_what_it_should(tc):
    """A future token never moves earlier logits; a token outside a 1-layer model's window never moves later ones."""
    cfg = build_config(1, 64, 32, 2, 97, 16, "S")  # one layer: always the full window (last layer is L)
    model = tc.build_model(cfg, device="cpu")
    load_params(model, init_params(cfg, seed=2, perturb_zeros=True))
    idx = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 97
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[0, :9], b[0, :9])
    assert not torch.allclose(a[0, 9:], b[0, 9:])


def test_params_and_flops_match_model_package(tc):
    cfg = build_config(4, 64, 64, 2, 101, 32, "SSSL")
    model = tc.build_model(cfg, device="cpu")
    exported = export_params(model)
    assert {k: v.shape for k, v in exported.items()} == param_shapes(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg)["total"]
    # the reference's estimate_flops, recomputed from the torch module itself
    excluded = model.wte.weight.numel() + sum(p.numel() for p in model.value_embeds.parameters())
    excluded += model.resid_lambdas.numel() + model.x0_lambdas.numel()
    dense = sum(p.numel() for p in model.parameters()) - excluded
    attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, cfg.sequence_len) for w in model.window_sizes)
    assert model.window_sizes == window_sizes(cfg) == [16, 16, 16, 32]
    assert 6 * dense + attn == flops_per_token(cfg)


def test_init_follows_the_reference(tc):
    cfg = small_config()
    model = tc.build_model(cfg, device="cpu")
    s = 3**0.5 / cfg.n_embd**0.5
    assert abs(model.wte.weight.std().item() - 1.0) < 0.05
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    for block in model.blocks:
        assert block.attn.c_q.weight.abs().max() <= s and block.mlp.c_fc.weight.abs().max() <= s
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert not model.blocks[1].attn.ve_gate.weight.any() and model.blocks[0].attn.ve_gate is None
    assert torch.equal(model.x0_lambdas, torch.full((2,), 0.1)) and torch.equal(model.resid_lambdas, torch.ones(2))


def test_export_load_round_trip(tc):
    cfg = small_config()
    model = tc.build_model(cfg, device="cpu")
    params = init_params(cfg, seed=3, perturb_zeros=True)
    load_params(model, params)
    out = export_params(model)
    assert all(np.array_equal(out[k], params[k]) for k in params)
    with pytest.raises(KeyError):
        load_params(model, {k: v for k, v in params.items() if k != "lm_head"})


def test_a_bf16_model_hands_over_a_graph_the_harness_runs(tc, tiny_cache, tmp_path):
    """Where the trainer trains in bf16 (GPUs, CPUs with native bf16) its embeddings are bf16 and the rest
    fp32 under autocast; the exported graph must carry that autocast, or the harness cannot run it."""
    import dataclasses

    import prepare
    from backends import detect, torch_rt
    from judge.graphs import load_graph

    p = prepare.get_protocol("tiny")
    cfg = build_config(2, 64, 32, 2, p.vocab_size, p.max_seq_len, "SL")
    model = tc.build_model(cfg, device="cpu")
    model.wte.to(dtype=torch.bfloat16)  # what build_model does when the compute dtype is bf16
    for ve in model.value_embeds.values():
        ve.to(dtype=torch.bfloat16)
    x = np.random.default_rng(0).integers(0, p.vocab_size, (2, p.max_seq_len), dtype=np.int32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(torch.as_tensor(x)).float().numpy()
    bf16 = dataclasses.replace(detect("cpu"), bf16=True)
    torch_rt.export_for_eval(model, tmp_path, 2, p.max_seq_len, bf16)
    g = load_graph(tmp_path, p.max_seq_len, p.vocab_size)
    got = g.adapter.to_numpy(g.forward(g.adapter.to_input(x)))
    assert np.allclose(got, want, atol=1e-5), np.abs(got - want).max()


# --- optimizer ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (24, 24)])
def test_muon_steps_match_numpy_reference(tc, shape):
    rng = np.random.default_rng(0)
    p0 = rng.normal(0, 0.2, (3, *shape)).astype(np.float32)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    group = dict(kind="muon", params=params, lr=0.02, momentum=0.9, ns_steps=5, beta2=0.95, weight_decay=0.3)
    opt = tc.MuonAdamW([group], ortho_dtype=torch.float32)
    ref_p = p0.astype(np.float64)
    mbuf = np.zeros_like(ref_p)
    rows, cols = shape
    sbuf = np.zeros((3, rows, 1) if rows >= cols else (3, 1, cols))
    for _ in range(3):
        grads = rng.normal(0, 1, ref_p.shape).astype(np.float32)
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        ref_p, mbuf, sbuf = muon_reference_update(ref_p, grads.astype(np.float64), mbuf, sbuf, lr=0.02, momentum=0.9,
                                                  weight_decay=0.3)
    got = np.stack([p.detach().numpy() for p in params])
    np.testing.assert_allclose(got, ref_p, atol=2e-5, rtol=1e-4)
    assert not np.allclose(got, p0)


def test_adamw_steps_match_numpy_reference(tc):
    rng = np.random.default_rng(1)
    p0 = rng.normal(0, 1, (5, 7)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = tc.MuonAdamW([dict(kind="adamw", params=[param], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)])
    ref, m, v = p0.astype(np.float64), np.zeros((5, 7)), np.zeros((5, 7))
    for step in range(1, 4):
        g = rng.normal(0, 1, (5, 7)).astype(np.float32)
        param.grad = torch.from_numpy(g.copy())
        opt.step()
        ref, m, v = adamw_reference_update(ref, g.astype(np.float64), m, v, step=step, lr=0.01, beta1=0.8, beta2=0.95)
    np.testing.assert_allclose(param.detach().numpy(), ref, atol=1e-6, rtol=1e-5)


def test_optimizer_groups_follow_the_reference(tc):
    cfg = build_config(3, 64, 64, None, 97, 16, "SSSL")  # width 192
    model = tc.build_model(cfg, device="cpu")
    opt = tc.build_optimizer(model, unembedding_lr=0.004, embedding_lr=0.6, matrix_lr=0.04, scalar_lr=0.5,
                             adam_betas=(0.8, 0.95), weight_decay=0.2)
    scale = (192 / 768) ** -0.5
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(by_param) == len(list(model.parameters()))  # every parameter in exactly one group
    lr = lambda p: by_param[id(p)]["lr"]
    assert lr(model.lm_head.weight) == pytest.approx(0.004 * scale)
    assert lr(model.wte.weight) == lr(model.value_embeds["0"].weight) == pytest.approx(0.6 * scale)
    assert lr(model.resid_lambdas) == pytest.approx(0.005)
    assert lr(model.x0_lambdas) == 0.5 and by_param[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon)
    assert sum(len(g["params"]) for g in muon) == len(list(model.blocks.parameters()))
    assert all(g["lr"] == 0.04 and g["weight_decay"] == 0.2 for g in muon)


# --- hyperparameter block -------------------------------------------------------


def test_hyperparameter_block_is_one_line_per_constant(tc):
    text = TRAINER.read_text()
    block = text.split("# --- hyperparameters ---\n")[1].split("# --- end hyperparameters ---")[0]
    names = block_names(text)
    assert names[:3] == ["DEPTH", "ASPECT_RATIO", "HEAD_DIM"] and "FINAL_LR_FRAC" in names
    for name in names:
        assert len(re.findall(rf"^{name} = .+$", block, flags=re.M)) == 1, name  # the reference value
    overrides = re.findall(r"^    ([A-Z_0-9]+) = ", block, flags=re.M)
    assert set(overrides) <= set(names)
    assert tc.HARDWARE == "cpu" and prepare.hyperparameters(vars(tc))["DEPTH"] == tc.DEPTH


# --- whole runs -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("bf16", ["0", "1"])
def test_tiny_run_learns_and_prints_summary(tiny_cache, bf16, monkeypatch):
    """In fp32 and in bf16 autocast (the default where the CPU has native bf16; emulated, slower, elsewhere)."""
    monkeypatch.setenv("AUTORESEARCH_CPU_BF16", bf16)
    # The trainer counts all but its first step on CPU: 10 s are enough steps to see it learn, except in
    # emulated bf16 (a CPU without avx512_bf16/amx_bf16), whose steps are ~20x slower than fp32's.
    from backends import cpu_has_bf16

    budget = 10.0 if bf16 == "0" or cpu_has_bf16() else 30.0
    proc = run_trainer("train_cuda.py", "cpu", tiny_cache, budget)
    assert ("bf16 compute" if bf16 == "1" else "fp32 compute") in proc.stdout
    summary = check_learning_run(proc, budget, "cpu", "sdpa")
    assert summary["depth"] == 2


def test_nan_loss_fails_fast(tiny_cache):
    proc = run_trainer("train_cuda.py", "cpu", tiny_cache, 30.0, script=NAN_SCRIPT.format(module="train_cuda"))
    check_fails_fast(proc, "nan")


def test_indivisible_batch_is_a_clear_error(tiny_cache):
    proc = run_trainer("train_cuda.py", "cpu", tiny_cache, 5.0, script=BAD_BATCH_SCRIPT.format(module="train_cuda"))
    check_fails_fast(proc, BAD_BATCH_PATTERN)



# --- per-hardware baselines -------------------------------------------------------

BASELINE_SCRIPT = """
import json, sys
import backends
import prepare
from backends import Probe

probes = {
    "h100": ("cuda", Probe(torch=True, cuda=True, gpu_name="NVIDIA H100 80GB HBM3", gpu_capability=(9, 0),
                           gpu_memory_gb=79.1, cpu_name="Xeon", ram_gb=1024)),
    "rtx4090": ("cuda", Probe(torch=True, cuda=True, gpu_name="NVIDIA GeForce RTX 4090", gpu_capability=(8, 9),
                              gpu_memory_gb=23.6, cpu_name="Ryzen", ram_gb=64)),
    "mi300x": ("rocm", Probe(torch=True, cuda=True, hip_version="6.2", gpu_name="AMD Instinct MI300X",
                             gpu_capability=(9, 4), gpu_memory_gb=192.0, cpu_name="EPYC", ram_gb=1024)),
    "m1": ("mps", Probe(system="Darwin", machine="arm64", torch=True, mps=True, unified_memory_gb=32.0)),
    "cpu": ("cpu", Probe(torch=True, cpu_name="EPYC", ram_gb=24.0)),
}
out = {}
detect = backends.detect
for name, (backend, probe) in probes.items():
    info = detect(backend, probe=probe)
    backends.detect = lambda *a, info=info, **k: info  # what the trainer sees on that host
    sys.modules.pop("train_cuda", None)
    import train_cuda
    out[name] = [train_cuda.BACKEND, train_cuda.HARDWARE, prepare.hyperparameters(vars(train_cuda))]
print("RESULT " + json.dumps(out))
"""


def test_each_host_gets_its_baseline():
    """The trainer picks its baseline block from the host: the reference (H100) sizes on GPUs with 40 GB or
    more, smaller batches on a smaller GPU, a smaller model on MPS, and the ~1M-parameter one on CPU.
    Each host is faked (backends.detect), the pristine trainer imported for it; nothing runs on a device."""
    import json
    import os
    import subprocess
    import sys

    import pristine

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pristine.trainer_dir()), str(pristine.PROJECT)]))
    proc = subprocess.run([sys.executable, "-c", pristine.script(BASELINE_SCRIPT)], cwd=pristine.PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("RESULT ", 1)[1])
    sizes = {name: (backend, hw, hp["DEPTH"], hp["HEAD_DIM"], hp["DEVICE_BATCH_SIZE"], hp["TOTAL_BATCH_SIZE"])
             for name, (backend, hw, hp) in got.items()}
    assert sizes == {
        "h100": ("cuda", "gpu", 8, 128, 128, 2**19),  # the reference's
        "rtx4090": ("cuda", "small-gpu", 8, 128, 16, 2**17),
        "mi300x": ("rocm", "gpu", 8, 128, 128, 2**19),
        "m1": ("mps", "mps", 4, 128, 16, 2**16),
        "cpu": ("cpu", "cpu", 2, 32, 8, 2**11),
    }
    # only the sizes differ: every learning rate is the reference's on every host
    lrs = {name: {k: v for k, v in hp.items() if k.endswith("_LR")} for name, (_, _, hp) in got.items()}
    assert all(v == lrs["h100"] for v in lrs.values()) and lrs["h100"]["MATRIX_LR"] == 0.04
