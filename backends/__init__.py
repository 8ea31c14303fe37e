"""Host detection: which backend serves this machine, and what it can do.

`detect()` runs one ordered check (CUDA/ROCm -> Apple MLX -> MPS -> CPU), computed
once per process, overridable with `AUTORESEARCH_BACKEND` or an explicit argument,
and returns a small `HostInfo` record with a one-line reason. torch and MLX are
imported lazily, so a Mac without torch and a Linux box without MLX both work.

Runtime helpers the trainers import live in `backends.torch_rt` and
`backends.mlx_rt`. This package is locked: the research agent never edits it.

Run `python -m backends` to print what was detected.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import platform
import sys
from dataclasses import dataclass, field

__all__ = [
    "BACKENDS",
    "BackendError",
    "CPU_BF16_ENV",
    "HostInfo",
    "Probe",
    "detect",
    "mfu_percent",
    "peak_bf16_flops",
    "probe_host",
    "require_environment",
]

CPU_BF16_ENV = "AUTORESEARCH_CPU_BF16"  # 0 or 1: bf16 autocast off or on for the CPU backend (default: native bf16 only)

BACKENDS = ("cuda", "rocm", "mps", "mlx", "cpu")
TRAINERS = {"torch": "train_cuda.py", "mlx": "train_mlx.py"}


class BackendError(RuntimeError):
    """A backend was asked for that this host cannot provide (message says what to do)."""


# Peak dense (no sparsity) bf16 tensor FLOP/s by device-name fragment, most specific first.
# Sources: vendor datasheets, where bf16 figures quoted "with sparsity" are halved.
_PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835e12),  # NVIDIA H100 datasheet: NVL 1,671 TFLOPS sparse
    ("H100 PCIe", 756e12),  # NVIDIA H100 datasheet: PCIe 1,513 TFLOPS sparse
    ("H100", 989.5e12),  # NVIDIA H100 datasheet: SXM 1,979 TFLOPS sparse (reference MFU uses 989.5)
    ("H200", 989.5e12),  # NVIDIA H200 datasheet: 1,979 TFLOPS sparse
    ("GH200", 989.5e12),  # NVIDIA GH200 datasheet: 1,979 TFLOPS sparse
    ("B200", 2250e12),  # NVIDIA DGX B200 datasheet: 72 PF FP8 sparse / 8 GPUs -> 2.25 PF bf16 dense
    ("A100", 312e12),  # NVIDIA A100 datasheet: 312 TFLOPS bf16 dense
    ("A10G", 70e12),  # AWS G5 / NVIDIA A10G: 70 TFLOPS bf16 dense
    ("L40S", 362.05e12),  # NVIDIA L40S datasheet: 733 TFLOPS sparse
    ("L4", 121e12),  # NVIDIA L4 datasheet: 242 TFLOPS sparse
    ("A10", 125e12),  # NVIDIA A10 datasheet: 250 TFLOPS sparse
    ("MI300X", 1307.4e12),  # AMD Instinct MI300X datasheet: 1,307.4 TFLOPS bf16 dense
    ("MI250X", 383e12),  # AMD Instinct MI250X datasheet: 383 TFLOPS bf16
    ("MI210", 181e12),  # AMD Instinct MI210 datasheet: 181 TFLOPS bf16
]


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a named device, or None when it is not in the table (MFU is then n/a)."""
    for fragment, flops in _PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops
    return None


@dataclass(frozen=True)
class Probe:
    """What the host looks like. `probe_host()` fills it in; tests build one by hand to fake hardware."""

    system: str = "Linux"
    machine: str = "x86_64"
    torch: bool = False
    cuda: bool = False
    hip_version: str | None = None
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None
    gpu_memory_gb: float | None = None
    mps: bool = False
    mlx: bool = False
    mlx_metal: bool = False
    mlx_device_name: str | None = None
    unified_memory_gb: float | None = None
    fa3: bool = False
    flex: bool = False
    cpu_name: str = "CPU"
    cpu_bf16: bool = False  # the CPU computes in bf16 natively (x86 AVX512-BF16 or AMX-BF16)
    ram_gb: float | None = None


@dataclass(frozen=True)
class HostInfo:
    """The chosen backend and its capabilities."""

    backend: str  # cuda | rocm | mps | mlx | cpu
    framework: str  # torch | mlx
    device_name: str
    memory_gb: float | None
    bf16: bool
    attention: tuple[str, ...]  # kernels available, best first
    compile: bool
    peak_flops: float | None  # dense bf16 FLOP/s; None = unknown
    trainer: str  # the trainer file serving this backend
    reason: str
    extra: dict = field(default_factory=dict, compare=False)


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _cpuinfo(key: str) -> str | None:
    """The value of the first `key` line of /proc/cpuinfo (Linux); None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "CPU"


def cpu_has_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (Linux x86: the avx512_bf16 or amx_bf16 flag). Elsewhere
    False: on CPUs without it PyTorch emulates bf16 and runs slower than fp32."""
    return bool(set((_cpuinfo("flags") or "").split()) & {"avx512_bf16", "amx_bf16"})


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


PROJECT_PACKAGES = ("numpy", "pyarrow", "tiktoken")  # what every entry point needs besides a framework


def require_environment(prog: str, packages: tuple[str, ...] = PROJECT_PACKAGES) -> None:
    """Exit with one sentence when this Python lacks the project's packages (it was started outside the
    project's environment, e.g. `python loop.py` instead of `uv run loop.py`). Imports nothing."""
    missing = [name for name in packages if not _has_module(name)]
    if missing:
        raise SystemExit(f"{prog}: this Python ({sys.executable}) lacks {', '.join(missing)}; run it through uv "
                         f"(uv run {prog} ...), which installs the locked dependencies, or run 'uv sync' first.")


def probe_host(choice: str | None = None) -> Probe:
    """Look at the real machine. Imports torch / MLX only if they are installed, and only the one the
    chosen backend needs (a CPU run imports neither: it only needs to know that torch is there)."""
    info: dict = dict(
        system=platform.system(), machine=platform.machine(), cpu_name=_cpu_name(), cpu_bf16=cpu_has_bf16(),
        ram_gb=_ram_gb()
    )
    want_torch = choice in (None, "cuda", "rocm", "mps")
    want_mlx = choice in (None, "mlx")
    if not want_torch:
        info["torch"] = _has_module("torch")
    if not want_mlx:
        info["mlx"] = _has_module("mlx")
    if want_torch and _has_module("torch"):
        import torch

        info["torch"] = True
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(
                cuda=True,
                hip_version=getattr(torch.version, "hip", None),
                gpu_name=torch.cuda.get_device_name(0),
                gpu_capability=tuple(torch.cuda.get_device_capability(0)),
                gpu_memory_gb=props.total_memory / 2**30,
                fa3=_has_module("flash_attn_interface"),
                flex=_has_module("torch.nn.attention.flex_attention") and _has_module("triton"),
            )
        mps = getattr(torch.backends, "mps", None)
        info["mps"] = bool(mps is not None and mps.is_available())
    if want_mlx and _has_module("mlx"):
        try:
            import mlx.core as mx

            info["mlx"] = True
            info["mlx_metal"] = bool(mx.metal.is_available())
            if info["mlx_metal"]:
                dev = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
                info["mlx_device_name"] = str(dev.get("device_name", "Apple GPU"))
                mem = dev.get("memory_size")
                info["unified_memory_gb"] = mem / 2**30 if mem else None
        except Exception:  # noqa: BLE001 - a broken MLX install means "no MLX", not a crash
            info["mlx"] = False
    return Probe(**info)


def _missing(backend: str, p: Probe) -> str | None:
    """Why `backend` cannot run on probe `p` (the first half of an error sentence), or None if it can."""
    is_rocm = p.hip_version is not None
    if backend in ("cuda", "rocm"):
        if not (p.torch and p.cuda):
            return f"Backend '{backend}' is not available: PyTorch sees no GPU on this host"
        if (backend == "rocm") != is_rocm:
            found = "an AMD GPU through ROCm" if is_rocm else "an NVIDIA GPU through CUDA"
            return f"Backend '{backend}' is not available: PyTorch sees {found}"
        return None
    if backend == "mlx":
        return None if p.mlx else (
            "Backend 'mlx' needs MLX, which is not importable here (install 'mlx' on macOS, 'mlx[cpu]' on Linux)"
        )
    if backend == "mps":
        return None if (p.torch and p.mps) else (
            "Backend 'mps' is not available: it needs PyTorch with Metal support on Apple Silicon"
        )
    if backend == "cpu":
        return None if p.torch else "Backend 'cpu' runs the PyTorch trainer, but PyTorch is not installed"
    return f"Unknown backend '{backend}'"


def available_backends(p: Probe) -> list[str]:
    """Every backend this probe could serve, in detection order."""
    return [b for b in ("cuda", "rocm", "mlx", "mps", "cpu") if _missing(b, p) is None]


def _info_for(backend: str, p: Probe, reason: str) -> HostInfo:
    """Build the HostInfo for `backend` on probe `p`, or raise BackendError if unavailable."""
    problem = _missing(backend, p)
    if problem is not None:
        choices = ", ".join(available_backends(p)) or "none (run 'uv sync' to install PyTorch and MLX)"
        raise BackendError(f"{problem}; unset AUTORESEARCH_BACKEND or pick one of: {choices}.")
    if backend in ("cuda", "rocm"):
        is_rocm = backend == "rocm"
        name = p.gpu_name or "GPU"
        cap = p.gpu_capability or (0, 0)
        hopper = not is_rocm and cap[0] == 9
        attention = (("fa3",) if hopper and p.fa3 else ()) + (("flex",) if p.flex else ()) + ("sdpa",)
        return HostInfo(
            backend=backend,
            framework="torch",
            device_name=name,
            memory_gb=p.gpu_memory_gb,
            bf16=is_rocm or cap[0] >= 8,
            attention=attention,
            compile=True,
            peak_flops=peak_bf16_flops(name),
            trainer=TRAINERS["torch"],
            reason=reason,
            extra={"capability": cap, "hip_version": p.hip_version},
        )
    if backend == "mlx":
        metal = p.mlx_metal
        return HostInfo(
            backend="mlx",
            framework="mlx",
            device_name=(p.mlx_device_name or "Apple GPU") if metal else f"{p.cpu_name} (MLX CPU)",
            memory_gb=p.unified_memory_gb if metal else p.ram_gb,
            bf16=metal,
            attention=("mlx_sdpa",),
            # mx.compile on MLX's CPU build JIT-compiles C++ at the first step (~50 s on a 2-core machine)
            # and then ran no faster than eager (0.91x, bench/bench_mlx_vs_torch.py): Metal only.
            compile=metal,
            peak_flops=None,  # no published dense bf16 peak for Apple GPUs: MFU is n/a
            trainer=TRAINERS["mlx"],
            reason=reason,
        )
    if backend == "mps":
        return HostInfo(
            backend="mps",
            framework="torch",
            device_name=p.mlx_device_name or "Apple GPU (MPS)",
            memory_gb=p.unified_memory_gb or p.ram_gb,
            bf16=True,
            attention=("sdpa",),
            compile=False,  # torch.compile on MPS is not reliable enough to default on
            peak_flops=None,
            trainer=TRAINERS["torch"],
            reason=reason,
        )
    return HostInfo(
        backend="cpu",
        framework="torch",
        device_name=p.cpu_name,
        memory_gb=p.ram_gb,
        # bf16 autocast where the CPU computes bf16 natively (~15% more tokens/s on a 2-core Sapphire Rapids
        # at the default CPU size); fp32 elsewhere, where bf16 is emulated and slower. See detect().
        bf16=p.cpu_bf16,
        attention=("sdpa",),
        compile=False,
        peak_flops=None,
        trainer=TRAINERS["torch"],
        reason=reason,
    )


def _auto(p: Probe) -> HostInfo:
    if p.torch and p.cuda:
        backend = "rocm" if p.hip_version else "cuda"
        kind = f"ROCm {p.hip_version}" if p.hip_version else "CUDA"
        return _info_for(backend, p, f"{kind} GPU found: {p.gpu_name}")
    if p.mlx and p.mlx_metal:
        return _info_for("mlx", p, "Apple Silicon with Metal: native MLX is the default (MPS selectable)")
    if p.torch and p.mps:
        return _info_for("mps", p, "Apple GPU through PyTorch MPS (MLX not installed)")
    if p.torch:
        return _info_for("cpu", p, "no GPU found: PyTorch on CPU")
    if p.mlx:
        return _info_for("mlx", p, "no GPU and no PyTorch: MLX on CPU")
    raise BackendError("Neither PyTorch nor MLX is installed; run 'uv sync' to install the dependencies.")


def detect(override: str | None = None, probe: Probe | None = None) -> HostInfo:
    """Choose the backend: explicit `override`, else AUTORESEARCH_BACKEND, else auto-detection.
    On the CPU backend, AUTORESEARCH_CPU_BF16=0 or 1 turns bf16 autocast off or on whatever the CPU has.

    Results for the real host are cached per override; passing `probe` fakes the hardware.
    """
    choice = (override or os.environ.get("AUTORESEARCH_BACKEND") or "").strip().lower() or None
    info = _detect(choice, probe) if probe is not None else _detect_cached(choice)
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if info.backend == "cpu" and forced in ("0", "1"):
        info = dataclasses.replace(info, bf16=forced == "1")
    return info


@functools.lru_cache(maxsize=None)
def _detect_cached(choice: str | None) -> HostInfo:
    return _detect(choice, probe_host(choice))


def _detect(choice: str | None, p: Probe) -> HostInfo:
    if choice is None:
        return _auto(p)
    if choice not in BACKENDS:
        raise BackendError(
            f"Unknown backend '{choice}' (from AUTORESEARCH_BACKEND or --backend); "
            f"choose one of: {', '.join(BACKENDS)}."
        )
    # The loop passes its own choice on to the trainer, with the reason it had (AUTORESEARCH_BACKEND_REASON)
    reason = os.environ.get("AUTORESEARCH_BACKEND_REASON") if choice == os.environ.get("AUTORESEARCH_BACKEND") else None
    return _info_for(choice, p, reason or f"backend '{choice}' requested explicitly")


def mfu_percent(flops_per_token: float, tokens_per_second: float, info: HostInfo) -> float | None:
    """Model FLOPs utilisation in percent, or None when the device's peak is unknown."""
    if not info.peak_flops or tokens_per_second <= 0:
        return None
    return 100.0 * flops_per_token * tokens_per_second / info.peak_flops


def describe(info: HostInfo) -> str:
    """One line for start-up logs."""
    mem = f"{info.memory_gb:.1f} GB" if info.memory_gb else "memory unknown"
    peak = f"{info.peak_flops / 1e12:.1f} TFLOP/s bf16" if info.peak_flops else "peak FLOP/s unknown"
    return (
        f"backend: {info.backend} ({info.device_name}, {mem}, {peak}, {'bf16' if info.bf16 else 'fp32'} compute, "
        f"attention {'/'.join(info.attention)}, trainer {info.trainer}) - {info.reason}"
    )
