"""`loop.py check`: a self-test of this host in about a minute, stage by stage.

1. backend: what `backends.detect()` chose and why; a GPU that is there but that PyTorch cannot use is
   named with its likely cause (a CPU-only wheel, a wheel for the other vendor, a driver older than
   the wheel's CUDA).
2. sandbox: a real process started through the loop's own confinement (sandbox/workspace.py,
   sandbox/confine.py) runs, cannot read the repository's .git, and sees the GPU where there is one.
3. data: the protocol's prepared data is there and verifies (prepare's own checks).
4. training: the trainer at this host's default config, for a short budget, through the loop's own
   path (workspace, sandbox, runner, pre-started harness), then the harness's score with its
   causality probe: tokens/s, memory, MFU where the device's peak is known, val_bpb.

Each stage prints PASS, FAIL or SKIP, its time, and on a failure one sentence on what to do. `--report
FILE` writes the same as Markdown for a bug report. Exit status 0 only when every stage passed.
The GPU probes are a `GpuProbe` that tests build by hand.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["DEFAULT_BUDGET_S", "GpuProbe", "Stage", "add_subparser", "gpu_problem", "markdown", "probe_gpu",
           "run_check"]

DEFAULT_BUDGET_S = 5.0  # training seconds of the training stage (after the trainer's uncounted warm-up steps)
TRAINER_LIMIT_S = 420.0  # past this the training stage's trainer is killed (compilation on a GPU included)
HARNESS_LIMIT_S = 300.0
STATUSES = ("PASS", "FAIL", "SKIP")


@dataclass
class Stage:
    name: str
    status: str  # PASS | FAIL | SKIP
    seconds: float
    summary: str  # one line: what was found
    advice: str | None = None  # on FAIL (or SKIP): one sentence on what to do
    details: list[str] = field(default_factory=list)  # more lines (the report shows them; the console some)


# --------------------------------------------------------------------------- stage 1: the GPU, as the OS sees it


@dataclass(frozen=True)
class GpuProbe:
    """What the operating system and the installed PyTorch say about GPUs. `probe_gpu()` reads the host;
    tests build one by hand."""

    nvidia_nodes: tuple[str, ...] = ()  # /dev/nvidia0, /dev/nvidiactl, ...
    nvidia_smi: str | None = None  # the first lines of `nvidia-smi`'s output; None: not installed or failed
    amd_kfd: bool = False  # /dev/kfd: the ROCm compute interface
    torch_version: str | None = None  # None: PyTorch not installed
    torch_cuda: str | None = None  # torch.version.cuda
    torch_hip: str | None = None  # torch.version.hip
    cuda_available: bool = False  # torch.cuda.is_available()
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES as set


def probe_gpu() -> GpuProbe:
    """Look at this host: device nodes, nvidia-smi and the installed PyTorch."""
    nodes = tuple(sorted(p for p in glob.glob("/dev/nvidia*") if os.path.exists(p)))
    smi = None
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe], capture_output=True, text=True, timeout=20)
            smi = (out.stdout or out.stderr).strip()[:2000] or None
            if out.returncode != 0:
                smi = f"(nvidia-smi failed, exit {out.returncode}) {smi or ''}".strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            smi = f"(nvidia-smi failed: {e})"
    info: dict = {}
    try:
        import torch

        info = dict(torch_version=torch.__version__, torch_cuda=getattr(torch.version, "cuda", None),
                    torch_hip=getattr(torch.version, "hip", None), cuda_available=bool(torch.cuda.is_available()))
    except Exception:  # noqa: BLE001 - no (or a broken) PyTorch: the backend stage says so
        pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("HIP_VISIBLE_DEVICES"))
    return GpuProbe(nvidia_nodes=nodes, nvidia_smi=smi, amd_kfd=os.path.exists("/dev/kfd"), visible_devices=visible,
                    **info)


def _version(text: str | None) -> tuple[int, ...] | None:
    m = re.match(r"\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def smi_cuda(smi: str | None) -> str | None:
    """The highest CUDA version the driver supports, from nvidia-smi's header ("CUDA Version: 12.4")."""
    m = re.search(r"CUDA Version:\s*([\d.]+)", smi or "")
    return m.group(1) if m else None


def gpu_problem(g: GpuProbe) -> str | None:
    """One sentence when a GPU is present that PyTorch cannot use, with the likely cause and the fix; None
    when there is no GPU or PyTorch uses it."""
    nvidia = bool(g.nvidia_nodes) or (g.nvidia_smi is not None and not g.nvidia_smi.startswith("(nvidia-smi failed"))
    if g.cuda_available or not (nvidia or g.amd_kfd):
        return None
    torch_name = f"this PyTorch ({g.torch_version})" if g.torch_version else "PyTorch"
    hidden = (f" CUDA_VISIBLE_DEVICES/HIP_VISIBLE_DEVICES is set to '{g.visible_devices}', which may hide it;"
              if g.visible_devices is not None else "")
    if g.torch_version is None:
        return "a GPU is present but PyTorch is not installed: run 'uv sync' to install the locked dependencies."
    if nvidia:
        where = g.nvidia_nodes[0] if g.nvidia_nodes else "nvidia-smi"
        present = f"an NVIDIA GPU is present ({where})"
        if g.torch_hip:
            return (f"{present} but {torch_name} is built for ROCm {g.torch_hip}: install the CUDA build of PyTorch "
                    "(https://pytorch.org/get-started/locally/).")
        if not g.torch_cuda:
            return (f"{present} but {torch_name} has no CUDA: install the CUDA build of PyTorch "
                    "(https://pytorch.org/get-started/locally/), e.g. 'uv sync' on Linux x86_64.")
        driver = smi_cuda(g.nvidia_smi)
        wheel = _version(g.torch_cuda)
        if driver is not None and wheel is not None and _version(driver) is not None and _version(driver) < wheel:
            return (f"{present} but {torch_name} built for CUDA {g.torch_cuda} cannot use it: the driver is too old "
                    f"(nvidia-smi says CUDA {driver}); update the driver or install a PyTorch build for CUDA "
                    f"{driver} or older.")
        if g.nvidia_smi is None or g.nvidia_smi.startswith("(nvidia-smi failed"):
            return (f"{present} but {torch_name} (CUDA {g.torch_cuda}) cannot use it and nvidia-smi "
                    f"{'is not installed' if g.nvidia_smi is None else 'fails'}: the NVIDIA driver is probably not "
                    "loaded; install or reload the driver (nvidia-smi must list the GPU).")
        return (f"{present} but {torch_name} (CUDA {g.torch_cuda}) cannot use it;{hidden} check that nvidia-smi "
                "lists the GPU and that this user may open /dev/nvidia* (in a container: --gpus all).")
    present = "an AMD GPU is present (/dev/kfd)"
    if not g.torch_hip:
        what = f"is built for CUDA {g.torch_cuda}" if g.torch_cuda else "has no ROCm"
        return (f"{present} but {torch_name} {what}: install the ROCm build of PyTorch "
                "(https://pytorch.org/get-started/locally/).")
    return (f"{present} but {torch_name} (ROCm {g.torch_hip}) cannot use it;{hidden} check that this user is in "
            "the 'render' and 'video' groups and that rocminfo lists the GPU.")


def _gpu_line(g: GpuProbe) -> str:
    parts = []
    if g.nvidia_nodes:
        parts.append(f"NVIDIA device nodes {', '.join(g.nvidia_nodes[:4])}{' ...' if len(g.nvidia_nodes) > 4 else ''}")
    driver = smi_cuda(g.nvidia_smi)
    if driver:
        m = re.search(r"Driver Version:\s*([\d.]+)", g.nvidia_smi or "")
        parts.append(f"driver {m.group(1) if m else '?'} (CUDA {driver})")
    if g.amd_kfd:
        parts.append("/dev/kfd (AMD ROCm)")
    if not parts:
        parts.append("no GPU device nodes")
    torch_build = "not installed" if g.torch_version is None else (
        g.torch_version + (f", CUDA {g.torch_cuda}" if g.torch_cuda else "") + (f", ROCm {g.torch_hip}" if g.torch_hip
                                                                                  else "")
        + (", GPU usable" if g.cuda_available else ", no usable GPU"))
    return f"{'; '.join(parts)}; PyTorch {torch_build}"


def stage_backend(backend: str | None, gpu: GpuProbe | None = None, detect: Callable | None = None):
    """(Stage, HostInfo or None). `gpu` and `detect` stand in for the real probes (tests)."""
    import backends

    t0 = time.perf_counter()
    gpu = gpu if gpu is not None else probe_gpu()
    detect = detect or backends.detect
    problem = gpu_problem(gpu)
    details = [_gpu_line(gpu)]
    try:
        host = detect(backend)
    except backends.BackendError as e:
        return Stage("backend", "FAIL", time.perf_counter() - t0, f"no backend: {e}",
                     problem or "pick a backend this host has (see 'uv run python -m backends').", details), None
    details.insert(0, backends.describe(host))
    summary = f"{host.backend} on {host.device_name} ({host.reason})"
    if problem is not None and host.backend not in ("cuda", "rocm"):
        if backend or os.environ.get("AUTORESEARCH_BACKEND"):  # the user chose this backend: a note, no failure
            details.append(f"note: {problem}")
            return Stage("backend", "PASS", time.perf_counter() - t0, summary, None, details), host
        return Stage("backend", "FAIL", time.perf_counter() - t0, f"{summary}, but {problem.split(':')[0]}",
                     problem, details), host
    return Stage("backend", "PASS", time.perf_counter() - t0, summary, None, details), host


# --------------------------------------------------------------------------- stage 2: the sandbox

_PROBE = r"""
import glob, json, os, sys
repo = sys.argv[1]
out = {"pid": os.getpid(), "python": sys.version.split()[0]}
try:
    open(os.path.join(repo, ".git", "HEAD"), "rb").read(1)
    out["git_readable"] = True
except OSError:
    out["git_readable"] = False
out["gpu_nodes"] = sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/kfd") + glob.glob("/dev/dri"))
if sys.argv[2] == "1":
    try:
        import torch
        out["cuda"] = bool(torch.cuda.is_available())
        out["device"] = torch.cuda.get_device_name(0) if out["cuda"] else None
    except Exception as e:
        out["cuda"] = False
        out["device"] = f"{type(e).__name__}: {e}"[:300]
print("CHECK " + json.dumps(out))
"""


def _confinement(repo: Path, host, protocol):
    from sandbox import confine as sandbox
    from sandbox.workspace import Confinement

    kind = sandbox.detect()
    if kind == "landlock":
        sandbox.become_subreaper()  # as the loop does: what a confined run leaves is ended by kill_orphans
    return kind, Confinement(repo, host.trainer, protocol, host, kind)


def stage_sandbox(repo: Path, host, protocol) -> tuple[Stage, object | None]:
    """(Stage, Confinement or None)."""
    from sandbox import confine as sandbox

    t0 = time.perf_counter()
    try:
        kind, confine = _confinement(repo, host, protocol)
    except (sandbox.SandboxError, ValueError) as e:
        return Stage("sandbox", "FAIL", time.perf_counter() - t0, f"cannot set up: {e}",
                     "fix or unset AUTORESEARCH_SANDBOX and the AUTORESEARCH_* size settings."), None
    if kind is None:
        why = ("AUTORESEARCH_SANDBOX=none" if os.environ.get(sandbox.ENV_VAR, "").strip().lower() == "none"
               else "none is available")
        return Stage("sandbox", "FAIL", time.perf_counter() - t0, f"no sandbox: {why}",
                     "install bubblewrap (apt install bubblewrap) or use a kernel with Landlock (Linux), or "
                     "sandbox-exec (macOS); the loop refuses to run trainers without one unless --no-sandbox."), None
    gpu = host.backend in ("cuda", "rocm")
    details = [sandbox.describe(), confine.limits_line()]
    try:
        proc = confine.run_python(["-c", _PROBE, str(repo), "1" if gpu else "0"], timeout_s=120)
    except (OSError, subprocess.SubprocessError, sandbox.SandboxError) as e:
        return Stage("sandbox", "FAIL", time.perf_counter() - t0, f"{kind}: could not start a process ({e})",
                     _sandbox_advice(kind), details), confine
    finally:
        if kind == "landlock":
            sandbox.kill_orphans(exclude=set())
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        details += [f"exit {proc.returncode}: " + " | ".join(tail)]
        return Stage("sandbox", "FAIL", time.perf_counter() - t0,
                     f"{kind}: a confined process failed (exit {proc.returncode})", _sandbox_advice(kind),
                     details), confine
    seen = json.loads(line[len("CHECK "):])
    if seen.get("git_readable"):
        return Stage("sandbox", "FAIL", time.perf_counter() - t0,
                     f"{kind}: a confined process could read the repository's .git", "report this as a bug, with "
                     "this report: the sandbox does not hide what it should.", details), confine
    summary = f"{kind}: a confined process ran and could not read .git"
    if gpu:
        outside = [str(p) for p in sandbox._gpu_paths()]
        missing = [p for p in outside if p not in seen.get("gpu_nodes", []) and not p.startswith("/dev/dri/")]
        details.append(f"GPU nodes inside: {', '.join(seen.get('gpu_nodes') or ['none'])}")
        if missing or not seen.get("cuda"):
            why = f"missing inside: {', '.join(missing)}" if missing else f"torch sees no GPU ({seen.get('device')})"
            return Stage("sandbox", "FAIL", time.perf_counter() - t0, f"{kind}: the GPU is not usable inside ({why})",
                         "report this with this report; meanwhile 'loop.py run --no-sandbox' runs unconfined.",
                         details), confine
        summary += f"; the GPU is usable inside ({seen.get('device')})"
    return Stage("sandbox", "PASS", time.perf_counter() - t0, summary, None, details), confine


def _sandbox_advice(kind: str) -> str:
    if kind == "bwrap":
        return ("bubblewrap could not create its namespaces: allow unprivileged user namespaces "
                "(sysctl kernel.unprivileged_userns_clone=1, or the AppArmor rule for bwrap on Ubuntu 24.04), or "
                "set AUTORESEARCH_SANDBOX=landlock.")
    return f"the {kind} sandbox could not start a process; see the details, or try another AUTORESEARCH_SANDBOX."


# --------------------------------------------------------------------------- stage 3: data


def resolve_protocol(name: str | None):
    """The protocol as the loop picks it (explicit > env > remembered > tiny), without preparing it."""
    import prepare

    try:
        return prepare.get_protocol(name)
    except prepare.PrepareError:
        if name or os.environ.get("AUTORESEARCH_PROTOCOL"):
            raise
        return prepare.get_protocol("tiny")


def stage_data(protocol) -> Stage:
    import prepare

    t0 = time.perf_counter()
    fix = f"run: uv run prepare.py --protocol {protocol.name}"
    where = prepare.cache_root() / protocol.name
    if not prepare.is_prepared(protocol):
        return Stage("data", "FAIL", time.perf_counter() - t0, f"protocol '{protocol.name}' is not prepared "
                     f"(nothing complete in {where})", f"{fix} (the loop also does it on its first start).")
    try:
        prepare.verify_prepared(protocol)
    except prepare.PrepareError as e:
        return Stage("data", "FAIL", time.perf_counter() - t0, f"protocol '{protocol.name}': {e}",
                     f"{fix} (it re-makes what is damaged).")
    return Stage("data", "PASS", time.perf_counter() - t0,
                 f"protocol '{protocol.name}' v{protocol.version} prepared in {where} and verified")


# --------------------------------------------------------------------------- stage 4: a short training, scored


def _tail(path: Path, lines: int = 25) -> list[str]:
    from sandbox.secrets import redact

    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    text = "\n".join(ln.rsplit("\r", 1)[-1] for ln in text.splitlines())  # progress lines: their last state
    return redact(text).splitlines()[-lines:]


def stage_training(host, protocol, confine, budget: float, workdir: Path) -> Stage:
    """Train for `budget` seconds through the loop's path: pre-started harness, sandboxed trainer, go, score."""
    from judge.harness import GO
    from sandbox import confine as sandbox
    from sandbox.runner import end, run_trainer, spawn, wait_child
    from sandbox.workspace import Workspace

    t0 = time.perf_counter()
    log = workdir / "training.log"
    log.write_bytes(b"")
    reap = (lambda keep=frozenset(): sandbox.kill_orphans(exclude=set(keep))) if confine.kind == "landlock" \
        else (lambda keep=frozenset(): None)
    ws = Workspace.create(0)
    judge = None
    try:
        h_argv, h_pre, h_env = confine.harness_run(ws, wait=True)
        judge = spawn(h_argv, cwd=ws.judge, env=h_env, log_path=log, preexec_fn=h_pre, stdin_pipe=True)
        argv, pre, env = confine.trainer_run(ws)
        env["AUTORESEARCH_TIME_BUDGET"] = f"{budget:g}"
        run = run_trainer(argv, cwd=ws.root, env=env, log_path=log, timeout_s=budget + TRAINER_LIMIT_S,
                          preexec_fn=pre, reap=lambda: reap({judge.proc.pid}))
        text = log.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^Attention: (\S+)", text, re.M)
        attention = m.group(1) if m else "?"
        if run.returncode != 0 or run.limit:
            why = run.limit or (f"killed after {run.wall_seconds:.0f} s" if run.timed_out
                                else f"exit status {run.returncode}")
            return Stage("training", "FAIL", time.perf_counter() - t0, f"the trainer failed ({why})",
                         "read the log tail below; with a changed trainer, compare with 'git diff' against the "
                         "shipped one, else report it with this report.", _tail(log))
        try:
            facts = json.loads((ws.handover / "facts.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            facts = {}
        judge.release(GO + b"\n")
        h = wait_child(judge, timeout_s=HARNESS_LIMIT_S, reap=reap, since=time.perf_counter())
        judge = None
        try:
            result = json.loads((ws.judge / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = {"valid": False, "kind": "harness", "reason": f"no result (exit {h.returncode})"}
        details = _training_details(host, facts, result, run.wall_seconds, h.wall_seconds, attention)
        if not result.get("valid"):
            advice = (f"the prepared data is damaged: run: uv run prepare.py --protocol {protocol.name}"
                      if result.get("kind") == "data" else
                      "read the log tail below; report it with this report if the trainer is the shipped one.")
            return Stage("training", "FAIL", time.perf_counter() - t0,
                         f"not scored ({result.get('kind')}): {result.get('reason')}", advice, details + _tail(log))
        summary = (f"{budget:g} s of training at the default config, scored: val_bpb {result['val_bpb']:.4f}, "
                   f"{_tok_s(facts)}, MFU {_mfu(facts, host)}")
        return Stage("training", "PASS", time.perf_counter() - t0, summary, None, details)
    finally:
        if judge is not None:
            end(judge, reap=reap)
        ws.remove()


def _tok_s(facts: dict) -> str:
    try:
        steps, warm = int(facts["num_steps"]), int(facts.get("warmup_steps") or 0)
        tokens = float(facts["total_tokens"]) * (steps - warm) / steps
        return f"{tokens / float(facts['training_seconds']):,.0f} tokens/s"
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return "tokens/s unknown"


def _mfu(facts: dict, host) -> str:
    mfu = facts.get("mfu_percent")
    if isinstance(mfu, (int, float)):
        return f"{mfu:.1f}%"
    return f"n/a (no peak FLOP/s known for {host.device_name})" if not host.peak_flops else "n/a"


def _training_details(host, facts: dict, result: dict, wall: float, harness_s: float, attention: str) -> list[str]:
    hp = facts.get("hyperparams") or {}
    mem = facts.get("peak_vram_mb")
    kind = "GPU memory" if host.backend in ("cuda", "rocm") else "memory"
    lines = [
        f"trainer {host.trainer} on {host.backend}, attention {attention}, "
        f"{'bf16' if host.bf16 else 'fp32'} compute; config DEPTH {hp.get('DEPTH')}, "
        f"TOTAL_BATCH_SIZE {hp.get('TOTAL_BATCH_SIZE')}, DEVICE_BATCH_SIZE {hp.get('DEVICE_BATCH_SIZE')}, "
        f"{(facts.get('num_params') or 0) / 1e6:.2f}M parameters",
        f"{facts.get('num_steps', '?')} steps in {float(facts.get('training_seconds') or 0):.1f} s of training; "
        f"wall {wall:.1f} s to hand-over (start-up {float(facts.get('startup_seconds') or 0):.1f} s, export "
        f"{float(facts.get('export_seconds') or 0):.1f} s)",
        f"{_tok_s(facts)}; peak {kind} {mem:,.0f} MiB; MFU {_mfu(facts, host)}" if isinstance(mem, (int, float))
        else f"{_tok_s(facts)}; MFU {_mfu(facts, host)}",
    ]
    if result.get("valid"):
        lines.append(f"harness ({harness_s:.1f} s): val_bpb {result['val_bpb']:.6f} over {result['tokens']:,} tokens, "
                     f"holdout {result.get('holdout_bpb', float('nan')):.6f}; causality probe: "
                     f"{result.get('probed_rows')} positions probed, look-ahead at "
                     f"{result.get('lookahead_fraction', 0):.1%} escapes with p <= {result.get('escape_bound', 0):.1g}")
    return lines


# --------------------------------------------------------------------------- the whole check


def _skip(name: str, why: str) -> Stage:
    return Stage(name, "SKIP", 0.0, why)


def run_check(repo: Path, *, backend: str | None = None, protocol: str | None = None, budget: float = DEFAULT_BUDGET_S,
              gpu: GpuProbe | None = None, out: Callable[[str], None] = print, training: bool = True,
              detect: Callable | None = None) -> list[Stage]:
    """Run the stages in order, printing each as it ends; a stage whose inputs failed is skipped."""
    import tempfile

    stages: list[Stage] = []

    def done(s: Stage) -> Stage:
        stages.append(s)
        out(format_stage(s))
        return s

    first, host = stage_backend(backend, gpu, detect)
    done(first)
    try:
        proto = resolve_protocol(protocol)
    except Exception as e:  # noqa: BLE001 - a PrepareError: an unknown protocol name or a bad budget setting
        proto = None
        problem = str(e)
    confine = None
    if host is None:
        done(_skip("sandbox", "no backend"))
    elif proto is None:
        done(_skip("sandbox", f"no protocol ({problem})"))
    else:
        s, confine = stage_sandbox(repo, host, proto)
        done(s)
    if proto is None:
        data = done(Stage("data", "FAIL", 0.0, problem, "name one of the protocols with --protocol, e.g. tiny."))
    else:
        data = done(stage_data(proto))
    if not training:
        done(_skip("training", "--no-training"))
    elif host is None or confine is None or data.status != "PASS" or stages[1].status != "PASS":
        done(_skip("training", "an earlier stage failed"))
    else:
        with tempfile.TemporaryDirectory(prefix="autoresearch-check-") as d:
            try:
                done(stage_training(host, proto, confine, budget, Path(d)))
            except Exception as e:  # noqa: BLE001 - one line, and the rest of the report still comes
                done(Stage("training", "FAIL", 0.0, f"{type(e).__name__}: {e}",
                           "report it with this report (--report FILE)."))
    return stages


def format_stage(s: Stage, console_details: int = 4) -> str:
    lines = [f"{s.status:<4}  {s.name:<9} {s.seconds:6.1f} s  {s.summary}"]
    lines += [f"                          {d}" for d in s.details[:console_details]]
    if s.advice:
        lines.append(f"      -> {s.advice}")
    return "\n".join(lines)


def _host_facts(repo: Path) -> list[str]:
    facts = [f"python {sys.version.split()[0]} ({sys.executable})", f"platform {platform.platform()}"]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        facts.append(f"commit {head or '?'}")
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def markdown(stages: list[Stage], repo: Path, argv: list[str] | None = None) -> str:
    """The check as Markdown, for a bug report."""
    ok = all(s.status == "PASS" for s in stages)
    rows = ["# autoresearch host check", "",
            f"Result: **{'PASS' if ok else 'FAIL'}**" + f" (`loop.py check{''.join(' ' + a for a in argv or [])}`)", ""]
    rows += [f"- {f}" for f in _host_facts(repo)] + [""]
    rows += ["| stage | result | time | found |", "|---|---|---|---|"]
    for s in stages:
        rows.append(f"| {s.name} | {s.status} | {s.seconds:.1f} s | {s.summary.replace('|', '/')} |")
    for s in stages:
        if not (s.details or s.advice):
            continue
        rows += ["", f"## {s.name}: {s.status}", ""]
        if s.advice:
            rows += [f"What to do: {s.advice}", ""]
        if s.details:
            rows += ["```", *s.details, "```"]
    return "\n".join(rows) + "\n"


def add_subparser(sub) -> None:
    p = sub.add_parser("check", help="a self-test of this host, stage by stage: backend, sandbox, data, training")
    p.add_argument("--backend", help="cuda|rocm|mps|mlx|cpu (default: detected, or AUTORESEARCH_BACKEND)")
    p.add_argument("--protocol", help="protocol name (default: AUTORESEARCH_PROTOCOL, the prepared one, or tiny)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"training seconds of the training stage (default {DEFAULT_BUDGET_S:g})")
    p.add_argument("--report", metavar="FILE", help="also write the check as Markdown to FILE, for a bug report")
    p.add_argument("--no-training", action="store_true", help="skip the training stage")
    p.set_defaults(func=main)


def main(args) -> int:
    repo = Path(__file__).resolve().parent.parent
    if not args.budget > 0:
        print("error: --budget must be a positive number of seconds", file=sys.stderr)
        return 2
    print(f"checking this host (training stage: {args.budget:g} s budget)...", flush=True)
    stages = run_check(repo, backend=args.backend, protocol=args.protocol, budget=args.budget,
                       training=not args.no_training, out=lambda line: print(line, flush=True))
    ok = all(s.status == "PASS" for s in stages)
    failed = [s.name for s in stages if s.status == "FAIL"]
    print(f"\n{'PASS: every stage passed' if ok else 'FAIL: ' + ', '.join(failed) if failed else 'not every stage ran'}"
          f" ({sum(s.seconds for s in stages):.0f} s)")
    if args.report:
        Path(args.report).write_text(markdown(stages, repo, _argv(args)), encoding="utf-8")
        print(f"report written to {args.report}")
    return 0 if ok else 1


def _argv(args) -> list[str]:
    """The options the check ran with (for the report's first line)."""
    out = []
    for name in ("backend", "protocol", "budget"):
        value = getattr(args, name, None)
        if value is not None and not (name == "budget" and value == DEFAULT_BUDGET_S):
            out += [f"--{name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return out + (["--no-training"] if getattr(args, "no_training", False) else [])
