"""Tests for `loop.py check` (research/check.py): the stages, their advice, the Markdown report.

Run: uv run pytest tests/test_check.py (the end-to-end check trains for real: -m slow)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import backends
from backends import Probe
from research import check
from research.check import GpuProbe, gpu_problem

ROOT = Path(__file__).resolve().parents[1]
CPU_ONLY = Probe(torch=True, cpu_name="Test CPU", ram_gb=8)  # what PyTorch reports when it cannot use the GPU

SMI_124 = ("+-----------------------------------------------------------------------------+\n"
           "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |\n")
CPU_WHEEL = GpuProbe(nvidia_nodes=("/dev/nvidia0", "/dev/nvidiactl"), nvidia_smi=SMI_124, torch_version="2.13.0+cpu")
NEW_WHEEL = GpuProbe(nvidia_nodes=("/dev/nvidia0",), nvidia_smi=SMI_124, torch_version="2.13.0+cu132",
                     torch_cuda="13.2")
ROCM_NO_HIP = GpuProbe(amd_kfd=True, torch_version="2.13.0+cu128", torch_cuda="12.8")


def _detect_cpu(override=None):
    return backends.detect(override, probe=CPU_ONLY)


# ----------------------------------------------------------------------------- GPU present but unusable


def test_gpu_problem_names_the_cause_and_the_fix():
    assert gpu_problem(GpuProbe()) is None  # no GPU: nothing to say
    assert gpu_problem(GpuProbe(nvidia_nodes=("/dev/nvidia0",), torch_version="2.13", torch_cuda="12.4",
                                cuda_available=True)) is None  # a usable GPU
    cpu = gpu_problem(CPU_WHEEL)
    assert "NVIDIA GPU is present (/dev/nvidia0)" in cpu and "2.13.0+cpu" in cpu and "has no CUDA" in cpu
    assert "install the CUDA build" in cpu
    old = gpu_problem(NEW_WHEEL)
    assert "built for CUDA 13.2 cannot use it: the driver is too old (nvidia-smi says CUDA 12.4)" in old
    assert "update the driver" in old
    amd = gpu_problem(ROCM_NO_HIP)
    assert "AMD GPU is present (/dev/kfd)" in amd and "install the ROCm build" in amd
    no_driver = gpu_problem(GpuProbe(nvidia_nodes=("/dev/nvidia0",), torch_version="2.13", torch_cuda="12.4"))
    assert "driver is probably not loaded" in no_driver
    hidden = gpu_problem(GpuProbe(nvidia_nodes=("/dev/nvidia0",), nvidia_smi=SMI_124, torch_version="2.13",
                                  torch_cuda="12.4", visible_devices=""))
    assert "CUDA_VISIBLE_DEVICES" in hidden
    assert check.smi_cuda(SMI_124) == "12.4"


@pytest.mark.parametrize("gpu, sentence", [
    (CPU_WHEEL, "has no CUDA: install the CUDA build"),
    (NEW_WHEEL, "the driver is too old (nvidia-smi says CUDA 12.4)"),
])
def test_unusable_gpu_fails_the_backend_stage(gpu, sentence, monkeypatch):
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    stage, host = check.stage_backend(None, gpu, _detect_cpu)
    assert host.backend == "cpu"
    assert stage.status == "FAIL" and sentence in stage.advice
    assert "cpu on Test CPU" in stage.summary
    # chosen on purpose (--backend cpu), the same GPU is a note, not a failure
    chosen, _ = check.stage_backend("cpu", gpu, _detect_cpu)
    assert chosen.status == "PASS" and any(sentence in d for d in chosen.details)


def test_unusable_gpu_fails_the_whole_check(tiny_cache, monkeypatch, capsys):
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    stages = check.run_check(ROOT, gpu=CPU_WHEEL, detect=_detect_cpu, training=False)
    assert [s.status for s in stages] == ["FAIL", "PASS", "PASS", "SKIP"]
    printed = capsys.readouterr().out
    assert "FAIL  backend" in printed and "-> an NVIDIA GPU is present (/dev/nvidia0)" in printed


# ----------------------------------------------------------------------------- data


def test_missing_data_fails_with_the_prepare_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("AUTORESEARCH_PROTOCOL", "tiny")
    stages = check.run_check(ROOT, gpu=GpuProbe(), detect=_detect_cpu)
    data = next(s for s in stages if s.name == "data")
    assert data.status == "FAIL" and "uv run prepare.py --protocol tiny" in data.advice
    assert stages[-1].name == "training" and stages[-1].status == "SKIP"
    assert "uv run prepare.py --protocol tiny" in capsys.readouterr().out


def test_damaged_data_fails_with_the_prepare_command(tiny_cache, tmp_path, monkeypatch):
    import prepare

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(copy))
    shard = prepare.split_shards(prepare.get_protocol("tiny"), "val")[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # cut short
    stage = check.stage_data(prepare.get_protocol("tiny"))
    assert stage.status == "FAIL" and "uv run prepare.py --protocol tiny" in stage.advice


def test_unknown_protocol_fails_the_data_stage(tiny_cache):
    stages = check.run_check(ROOT, protocol="nonesuch", gpu=GpuProbe(), detect=_detect_cpu)
    assert [(s.name, s.status) for s in stages] == [("backend", "PASS"), ("sandbox", "SKIP"), ("data", "FAIL"),
                                                    ("training", "SKIP")]


# ----------------------------------------------------------------------------- sandbox


def test_no_sandbox_fails_with_what_to_install(tiny_cache, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_SANDBOX", "none")
    stages = check.run_check(ROOT, gpu=GpuProbe(), detect=_detect_cpu, training=False)
    sandbox = stages[1]
    assert sandbox.name == "sandbox" and sandbox.status == "FAIL" and "bubblewrap" in sandbox.advice


# ----------------------------------------------------------------------------- the report, the command


def test_markdown_has_every_stage():
    stages = [check.Stage("backend", "PASS", 1.0, "cpu on X"), check.Stage("sandbox", "PASS", 0.5, "bwrap | ok"),
              check.Stage("data", "FAIL", 0.1, "not prepared", "run: uv run prepare.py --protocol tiny"),
              check.Stage("training", "SKIP", 0.0, "an earlier stage failed")]
    md = check.markdown(stages, ROOT, ["--budget", "2"])
    assert md.startswith("# autoresearch host check") and "Result: **FAIL** (`loop.py check --budget 2`)" in md
    for s in stages:
        assert f"| {s.name} | {s.status} |" in md
    assert "What to do: run: uv run prepare.py --protocol tiny" in md
    assert "bwrap / ok" in md  # a | would break the table


def test_loop_py_has_the_check_command():
    out = subprocess.run([sys.executable, str(ROOT / "loop.py"), "check", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--report" in out.stdout and "--budget" in out.stdout


@pytest.mark.slow
def test_check_passes_end_to_end_and_writes_the_report(tiny_cache, tmp_path, monkeypatch, capsys):
    """The whole check on this CPU host: a real sandboxed training of one second, scored by the harness."""
    monkeypatch.delenv("AUTORESEARCH_BACKEND", raising=False)
    monkeypatch.setenv("AUTORESEARCH_BACKEND", "cpu")  # a GPU host runs the same check on its CPU here
    report = tmp_path / "check.md"
    args = argparse.Namespace(backend=None, protocol="tiny", budget=1.0, report=str(report), no_training=False)
    rc = check.main(args)
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name in ("backend", "sandbox", "data", "training"):
        assert f"PASS  {name}" in printed
    assert "val_bpb" in printed and "tokens/s" in printed and "causality probe" in printed
    md = report.read_text(encoding="utf-8")
    for name in ("backend", "sandbox", "data", "training"):
        assert f"| {name} | PASS |" in md
    assert "Result: **PASS** (`loop.py check --protocol tiny --budget 1`)" in md
