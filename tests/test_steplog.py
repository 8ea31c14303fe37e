"""The lines a trainer prints for the loop (data/steplog.py through prepare.log_step / prepare.fail): one
format, read the same by the loss curve and early abort, the clock, the live page and the crash reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import prepare
from data.steplog import TOK_S, format_step
from reporting import runfiles
from research.clock import StepWatch
from research.decisions import LossCurve
from research.run import failure_line

REPO = Path(__file__).resolve().parent.parent


def test_every_reader_reads_the_line_log_step_prints():
    lines = [format_step(k, k / 10, 5.0 - 0.1 * k, lrm=1.0, dt=0.118, tok_per_sec=17453.2, mfu=None, epoch=1,
                         remaining=20 - 2 * k) for k in range(1, 6)]
    assert lines[0] == ("step 00001 (10.0%) | loss: 4.900000 | lrm: 1.00 | dt: 118ms | tok/sec: 17,453 | mfu: n/a | "
                        "epoch: 1 | remaining: 18s")
    curve = LossCurve()
    seen = []
    watch = StepWatch(seen.append)
    for line in lines:
        curve.feed((line + "\n").encode())
        watch.feed((line + "\n").encode())
    assert [(s, round(p, 3), round(v, 3)) for s, p, v in curve.snapshot()] == \
        [(k, k / 10, round(5.0 - 0.1 * k, 3)) for k in range(1, 6)]
    assert watch.first is not None and watch.last is not None and b"".join(seen).count(b"step ") == 5
    tail = runfiles.LogTail()  # the page, on a line still being drawn in a terminal (no newline yet)
    tail.curve.feed(("\r" + lines[0] + "    \r" + lines[1] + "    ").encode())
    tail.tail = ("\r" + lines[0] + "    \r" + lines[1] + "    ").encode()
    assert [p[0] for p in tail.points()] == [1, 2]
    assert TOK_S.search(lines[1].encode())[1] == b"17,453"


def test_a_log_gets_one_line_per_step_and_fail_ends_the_run_with_its_reason():
    code = ("import prepare\nfor k in range(3):\n    prepare.log_step(k, k / 3, 4.0, lrm=1.0)\n"
            "prepare.fail('training loss nan at step 2 (NaN or > 100)')\nprint('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not reached" not in proc.stdout
    assert proc.stdout.count("\n") >= 4 and "\r" not in proc.stdout  # not a terminal: plain lines
    assert failure_line(proc.stdout) == "FAIL: training loss nan at step 2 (NaN or > 100)"
    assert prepare.log_step is not None and prepare.fail is not None


def test_the_trainers_print_through_the_locked_helpers():
    """The trainers keep no step-line or FAIL f-string of their own (an edit there cannot break the loop)."""
    for name in ("train_cuda.py", "train_mlx.py"):
        text = (REPO / name).read_text()
        assert "prepare.log_step(" in text and "prepare.fail(" in text, name
        assert "loss: {" not in text and "FAIL:" not in text and "def fail" not in text, name
