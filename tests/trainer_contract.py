"""What every trainer promises the loop, checked the same way for train_cuda.py and train_mlx.py.

Helpers imported by tests/test_train_cuda.py and tests/test_train_mlx.py: run a trainer by hand (a child
process on the prepared tiny protocol, no loop: its hand-over has the harness score the model and prints
the summary block), then check that it learned and printed the harness's score, or that it failed fast
with one `FAIL:` line before any hand-over; and import the PyTorch trainer in fp32 on CPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pristine

REPO = Path(__file__).resolve().parent.parent


def run_trainer(trainer: str, backend: str, cache: Path, budget: float, script: str | None = None,
                timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the pristine `trainer` (or a Python `script` that imports it) by hand on the tiny protocol with
    `budget` seconds: no AUTORESEARCH_HANDOVER, so its hand-over runs the harness itself and prints the
    summary block. The trainer is the project's (tests/pristine.py), not a research branch's kept edit."""
    env = dict(os.environ, AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PROTOCOL="tiny",
               AUTORESEARCH_TIME_BUDGET=str(budget), AUTORESEARCH_BACKEND=backend,
               PYTHONPATH=os.pathsep.join([str(pristine.trainer_dir()), str(REPO)]))
    env.pop("AUTORESEARCH_HANDOVER", None)
    cmd = [sys.executable, "-c", pristine.script(script)] if script else [sys.executable, str(pristine.trainer(trainer))]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check_learning_run(proc: subprocess.CompletedProcess, budget: float, backend: str, attention: str) -> dict:
    """The run learned (loss fell), respected the budget, handed its model over to the harness (a separate
    process: its line comes before the summary) and printed a summary that parses; returns it."""
    import prepare

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"loss: ([0-9.]+)", proc.stdout)]
    assert len(losses) > 5 and losses[-1] < losses[0] - 0.5
    harness = re.findall(r"^harness: val ([0-9.]+) bpb", proc.stdout, flags=re.M)
    summary = prepare.parse_summary(proc.stdout)
    assert harness and summary and abs(float(harness[-1]) - summary["val_bpb"]) < 1.5e-6
    assert proc.stdout.index("harness: val") < proc.stdout.rindex("\nval_bpb:")
    assert summary["num_steps"] == len(losses)
    assert summary["training_seconds"] >= budget
    assert summary["backend"] == backend
    assert 0 < summary["val_bpb"] < uniform_bpb("val") - LEARNED  # better than a uniform guess (3.83 on tiny)
    assert f"Attention: {attention}" in proc.stdout
    return summary


LEARNED = 0.01  # bpb below a uniform guess that a model must reach: beyond rounding, and an untrained model's


def uniform_bpb(split: str = "val") -> float:
    """What a uniform guess over the vocabulary scores on `split` of the current protocol, computed the way
    the harness scores (log2(V) bits per scored token over the split's bytes; tests/test_judge.py checks
    the harness gives exactly this): 3.83 on tiny's val split. A model that learned anything beats it."""
    import prepare
    from judge import evaluate as E

    p = prepare.get_protocol()
    y = E.load_rows(p, split, p.eval_tokens if split == "val" else p.holdout_tokens).y
    token_bytes = prepare.load_token_bytes(p)[y]
    return int((token_bytes > 0).sum()) * math.log2(p.vocab_size) / int(token_bytes.sum())


def check_fails_fast(proc: subprocess.CompletedProcess, pattern: str) -> None:
    """The run exited 1 with exactly one `FAIL:` line matching `pattern` and handed nothing over."""
    assert proc.returncode == 1
    fail_lines = [line for line in proc.stdout.splitlines() if line.startswith("FAIL:")]
    assert len(fail_lines) == 1 and re.search(pattern, fail_lines[0], re.I), fail_lines
    assert "val_bpb" not in proc.stdout and "harness:" not in proc.stdout


NAN_SCRIPT = "import {module} as t\nt.UNEMBEDDING_LR = float('nan')\nt.main()\n"
BAD_BATCH_SCRIPT = "import {module} as t\nt.DEVICE_BATCH_SIZE = 3\nt.main()\n"
BAD_BATCH_PATTERN = r"^FAIL: TOTAL_BATCH_SIZE .* must be a multiple of DEVICE_BATCH_SIZE"


def torch_trainer_on_cpu():
    """The pristine train_cuda (tests/conftest.py puts its directory first on sys.path) imported (or
    re-imported) with the CPU backend and bf16 off (AUTORESEARCH_CPU_BF16=0), so its numerics are fp32 on
    any host.

    Importing the trainer decides its backend and baseline sizes once; a copy imported earlier for
    another backend is reloaded.
    """
    import importlib

    previous = {name: os.environ.get(name) for name in ("AUTORESEARCH_BACKEND", "AUTORESEARCH_CPU_BF16")}
    os.environ.update(AUTORESEARCH_BACKEND="cpu", AUTORESEARCH_CPU_BF16="0")
    try:
        import train_cuda

        fp32_cpu = train_cuda.BACKEND == "cpu" and train_cuda.COMPUTE_DTYPE is None
        return train_cuda if fp32_cpu else importlib.reload(train_cuda)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
