"""Tests for backends/: detection with faked hardware, overrides, peak table, runtime helpers.

Run: uv run pytest tests/test_backends.py
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pristine
import pytest

import backends
from backends import BackendError, Probe, describe, detect, mfu_percent, peak_bf16_flops

ROOT = Path(__file__).resolve().parents[1]

HOPPER = Probe(
    torch=True, cuda=True, gpu_name="NVIDIA H100 80GB HBM3", gpu_capability=(9, 0), gpu_memory_gb=79.1,
    fa3=True, flex=True, cpu_name="Xeon", ram_gb=1024,
)
AMPERE = Probe(
    torch=True, cuda=True, gpu_name="NVIDIA A100-SXM4-40GB", gpu_capability=(8, 0), gpu_memory_gb=39.4,
    fa3=True, flex=True,
)
ROCM = Probe(
    torch=True, cuda=True, hip_version="6.2.41133", gpu_name="AMD Instinct MI300X", gpu_capability=(9, 4),
    gpu_memory_gb=192.0, flex=True,
)
APPLE = Probe(
    system="Darwin", machine="arm64", torch=True, mps=True, mlx=True, mlx_metal=True,
    mlx_device_name="Apple M1 Max", unified_memory_gb=64.0,
)
APPLE_NO_MLX = Probe(system="Darwin", machine="arm64", torch=True, mps=True)
CPU_ONLY = Probe(torch=True, cpu_name="AMD EPYC", ram_gb=24.0)
MLX_ONLY = Probe(mlx=True, cpu_name="AMD EPYC", ram_gb=24.0)


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)


def test_hopper_gets_cuda_with_fa3_first_and_known_peak():
    info = detect(probe=HOPPER)
    assert info.backend == "cuda" and info.framework == "torch"
    assert info.attention == ("fa3", "flex", "sdpa")
    assert info.bf16 and info.compile
    assert info.peak_flops == pytest.approx(989.5e12)
    assert info.trainer == "train_cuda.py"
    assert "H100" in info.reason


def test_ampere_has_no_fa3_but_flex():
    info = detect(probe=AMPERE)
    assert info.backend == "cuda"
    assert info.attention == ("flex", "sdpa")  # FA3 is Hopper-only even if installed
    assert info.peak_flops == pytest.approx(312e12)


def test_rocm_reported_honestly():
    info = detect(probe=ROCM)
    assert info.backend == "rocm"
    assert "fa3" not in info.attention
    assert info.peak_flops == pytest.approx(1307.4e12)
    assert "ROCm" in info.reason
    with pytest.raises(BackendError, match="AMD GPU through ROCm"):
        detect("cuda", probe=ROCM)


def test_apple_defaults_to_mlx_with_mps_selectable():
    info = detect(probe=APPLE)
    assert info.backend == "mlx" and info.trainer == "train_mlx.py"
    assert info.bf16
    assert info.peak_flops is None  # unknown stays unknown
    mps = detect("mps", probe=APPLE)
    assert mps.backend == "mps" and mps.trainer == "train_cuda.py" and not mps.compile
    assert detect(probe=APPLE_NO_MLX).backend == "mps"


def test_cpu_and_mlx_cpu():
    info = detect(probe=CPU_ONLY)
    assert info.backend == "cpu" and not info.bf16 and info.attention == ("sdpa",)
    assert info.peak_flops is None
    assert detect(probe=MLX_ONLY).backend == "mlx"
    assert not detect(probe=MLX_ONLY).bf16  # MLX CPU runs fp32
    assert not detect(probe=MLX_ONLY).compile  # and eager: mx.compile is slower there, counting its JIT


def test_cpu_bf16_where_the_cpu_has_it_natively(monkeypatch):
    """bf16 autocast on CPUs with native bf16 (AVX512-BF16 / AMX), fp32 elsewhere; AUTORESEARCH_CPU_BF16
    decides instead, on the CPU backend only."""
    from backends import torch_rt

    monkeypatch.delenv("AUTORESEARCH_CPU_BF16", raising=False)
    native = dataclasses.replace(CPU_ONLY, cpu_bf16=True)
    assert detect(probe=native).bf16 and torch_rt.compute_dtype(detect(probe=native)) == torch.bfloat16
    assert not detect(probe=CPU_ONLY).bf16 and torch_rt.compute_dtype(detect(probe=CPU_ONLY)) is None
    assert "bf16 compute" in describe(detect(probe=native)) and "fp32 compute" in describe(detect(probe=CPU_ONLY))
    monkeypatch.setenv("AUTORESEARCH_CPU_BF16", "0")
    assert not detect(probe=native).bf16
    monkeypatch.setenv("AUTORESEARCH_CPU_BF16", "1")
    assert detect(probe=CPU_ONLY).bf16
    assert not detect(probe=MLX_ONLY).bf16  # the MLX trainer on CPU is not the CPU backend


def test_the_probe_reads_native_bf16_from_the_cpu_flags():
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this host")
    assert backends.probe_host("cpu").cpu_bf16 == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_env_override_and_argument_precedence(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    assert detect(probe=HOPPER).backend == "cpu"
    assert detect("cuda", probe=HOPPER).backend == "cuda"  # an explicit argument beats the env
    assert "requested explicitly" in detect(probe=HOPPER).reason


def test_unavailable_or_unknown_backend_is_one_clear_sentence():
    with pytest.raises(BackendError) as err:
        detect("cuda", probe=CPU_ONLY)
    msg = str(err.value)
    assert "no GPU" in msg and "pick one of: cpu" in msg and "\n" not in msg
    with pytest.raises(BackendError, match="Unknown backend 'tpu'"):
        detect("tpu", probe=CPU_ONLY)
    with pytest.raises(BackendError, match="uv sync"):
        detect(probe=Probe())


def test_peak_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_bf16_flops("Some Unknown GPU") is None
    info = detect(probe=HOPPER)
    assert mfu_percent(1e9, 989.5e3, info) == pytest.approx(100.0)
    assert mfu_percent(1e9, 1e3, detect(probe=CPU_ONLY)) is None


def host_backend() -> str:
    """This host's best backend, asked of the frameworks directly (not through backends' probe)."""
    import torch

    if torch.cuda.is_available():
        return "rocm" if getattr(torch.version, "hip", None) else "cuda"
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return "mlx"
    except ImportError:
        pass
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def test_real_host_detection_and_cli(monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    backends._detect_cached.cache_clear()
    try:
        info = detect()
    finally:
        backends._detect_cached.cache_clear()
    assert info.backend == host_backend()
    env = {k: v for k, v in os.environ.items() if k != "AUTORESEARCH_BACKEND"}
    out = subprocess.run([sys.executable, "-m", "backends"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith(f"backend: {info.backend} (")
    bad = subprocess.run(
        [sys.executable, "-m", "backends", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "Unknown backend 'nope'" in bad.stderr and "Traceback" not in bad.stderr


# --- PyTorch runtime helpers -------------------------------------------------

torch = pytest.importorskip("torch")


def test_torch_sdpa_matches_naive_sliding_window_gqa():
    from backends import torch_rt
    from model.reference import attention as naive

    attn = torch_rt.make_attention(detect("cpu"))
    assert attn.name == "sdpa"
    rng = np.random.default_rng(0)
    B, T, H, Hkv, D = 2, 11, 6, 2, 8
    q, k, v = rng.normal(size=(B, T, H, D)), rng.normal(size=(B, T, Hkv, D)), rng.normal(size=(B, T, Hkv, D))
    for window in (0, 1, 5, T - 1, T):
        got = attn(*(torch.tensor(a) for a in (q, k, v)), window).numpy()
        np.testing.assert_allclose(got, naive(q, k, v, window), atol=1e-10)


def test_torch_window_mask_semantics():
    from backends.torch_rt import sliding_window_mask

    m = sliding_window_mask(6, 2).numpy()
    assert m[5].tolist() == [False, False, False, True, True, True]  # i - j in {0, 1, 2}
    assert not m[0, 1]  # never the future


def test_forcing_an_unavailable_kernel_is_refused():
    from backends import torch_rt

    with pytest.raises(ValueError, match="not available"):
        torch_rt.make_attention(detect("cpu"), prefer="fa3")


def test_torch_helpers_on_cpu():
    from backends import torch_rt

    info = detect("cpu")
    assert torch_rt.device(info).type == "cpu"
    assert torch_rt.compute_dtype(info) == (torch.bfloat16 if info.bf16 else None)
    assert torch_rt.peak_memory_mb(info) > 1.0
    torch_rt.seed_all(3)
    a = torch.rand(3)
    torch_rt.seed_all(3)
    assert torch.equal(a, torch.rand(3))
    x = torch_rt.to_device(np.arange(6, dtype=np.int32).reshape(2, 3), info)
    assert x.dtype == torch.int32 and x.shape == (2, 3)


def _nats_by_hand(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def test_torch_adapter_nats_match_hand_computation_in_chunks():
    from judge import torch_adapter

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
    adapter = torch_adapter.TorchEvalAdapter(detect("cpu"), chunk_elements=25)  # forces 2-row chunks
    got = adapter.nats(torch.tensor(logits), targets)
    assert got.dtype == np.float64 and got.shape == (3, 7)
    np.testing.assert_allclose(got, _nats_by_hand(logits, targets), rtol=1e-6)


# --- MLX runtime helpers -----------------------------------------------------


def test_mlx_adapter_equals_torch_adapter_for_same_logits():
    mx = pytest.importorskip("mlx.core")
    from judge import mlx_adapter, torch_adapter

    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(2, 9, 13)) * 4).astype(np.float32)
    targets = rng.integers(0, 13, size=(2, 9)).astype(np.int32)
    t = torch_adapter.eval_adapter(detect("cpu")).nats(torch.tensor(logits), targets)
    m = mlx_adapter.MLXEvalAdapter(chunk_elements=30).nats(mx.array(logits), targets)
    np.testing.assert_allclose(m, t, rtol=1e-5)
    np.testing.assert_allclose(m, _nats_by_hand(logits, targets), rtol=1e-5)


def test_mlx_mask_matches_torch_mask():
    pytest.importorskip("mlx.core")
    from backends import mlx_rt, torch_rt

    for window in (0, 3, 8):
        additive = np.array(mlx_rt.sliding_window_mask(8, window))
        boolean = torch_rt.sliding_window_mask(8, window).numpy()
        assert np.array_equal(additive == 0, boolean)
        assert np.all(np.isneginf(additive[~boolean]))
    assert mlx_rt.sliding_window_mask(8, 3) is mlx_rt.sliding_window_mask(8, 3)  # cached


def test_a_kernel_that_fails_to_load_is_reported_and_sdpa_used(capsys):
    torch_rt = pytest.importorskip("backends.torch_rt", reason="PyTorch not installed")
    import dataclasses

    info = dataclasses.replace(detect("cpu"), attention=("fa3", "sdpa"))  # flash_attn_interface is not installed here
    attn = torch_rt.make_attention(info)
    assert attn.name == "sdpa"
    err = capsys.readouterr().err
    assert "attention: fa3 could not be loaded (ModuleNotFoundError" in err and "falling back" in err


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_cpu_detection_imports_neither_framework(how):
    """The CPU backend, asked for by argument or by AUTORESEARCH_BACKEND=cpu (as the loop sets it for every
    process it starts), costs no torch or MLX import."""
    call = "backends.detect('cpu')" if how == "argument" else "backends.detect()"
    code = f"import sys, backends; {call}; print('torch' in sys.modules, 'mlx.core' in sys.modules)"
    env = dict(os.environ, AUTORESEARCH_BACKEND="cpu" if how == "environment" else "")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    assert out == ["False", "False"]


def test_the_loop_can_say_why_it_chose_the_backend(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")
    monkeypatch.setenv("AUTORESEARCH_BACKEND_REASON", "the loop's choice: no GPU found: PyTorch on CPU")
    backends._detect_cached.cache_clear()
    try:
        assert detect().reason == "the loop's choice: no GPU found: PyTorch on CPU"
        assert detect("cpu").reason == "the loop's choice: no GPU found: PyTorch on CPU"
    finally:
        backends._detect_cached.cache_clear()


@pytest.mark.parametrize("entry", ["train_cuda.py", "train_mlx.py"])
def test_an_entry_point_outside_the_environment_says_so_in_one_sentence(entry):
    """`-S` leaves site-packages out, as a Python outside the project's environment would."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-S", str(pristine.trainer(entry))], cwd=root, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(root)))  # the project beside it
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{entry}: this Python" in lines[0] and f"uv run {entry}" in lines[0]
