"""A run's log (sandbox/runner.py): the exit-time leak report of nanobind-built extensions (triton since its
switch to nanobind, MLX) is left out of it and counted in one line; everything else is kept as it came.

Run: uv run pytest tests/test_runlog.py
"""

from __future__ import annotations

import sys
import textwrap

from sandbox.runner import LeakFilter, run_trainer

LEAK_REPORT = textwrap.dedent("""\
    nanobind: leaked 1 instances!
     - leaked instance 0x5cc67bd07b00 of type "triton._C.libtriton.ir.context"
    nanobind: leaked 3 types!
     - leaked type "triton._C.libtriton.ir.context"
     - leaked type "VecLib"
     - leaked type "Ukernels"
    nanobind: leaked 2 functions!
     - leaked function "printOpOnDiagnostic"
     - leaked function "__init__"
    nanobind: this is likely caused by a reference counting issue in the binding code.
    See https://nanobind.readthedocs.io/en/latest/refleaks.html
    """)


def test_the_filter_drops_the_report_line_by_line_whatever_the_chunks():
    text = ("step 00001 (3.1%) | loss: 7.0\nval_bpb: 1.234\nnot a nanobind: leaked warning, kept\n" + LEAK_REPORT
            + "last words")
    data = text.encode()
    for size in (1, 7, 64, len(data)):
        f = LeakFilter()
        out = b"".join(f.feed(data[i:i + size]) for i in range(0, len(data), size)) + f.close()
        assert out.startswith(b"step 00001 (3.1%) | loss: 7.0\nval_bpb: 1.234\nnot a nanobind: leaked warning, kept\n")
        assert b"leaked instance" not in out and b"refleaks" not in out and b"reference counting" not in out
        assert b"last words\n[loop] 11 lines of nanobind reference-leak warnings printed at exit left out" in out
        assert f.dropped == 11
    quiet = LeakFilter()
    assert quiet.feed(b"a\r\nb") == b"a\r\n" and quiet.close() == b"b"  # nothing dropped: no note
    long = LeakFilter()
    assert long.feed(b"x" * 70000) == b"x" * 70000  # a line without end is not held back for ever


def test_a_trainer_s_log_leaves_the_report_out(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("import sys\nprint('step 00000 (0.0%) | loss: 7.5', flush=True)\n"
                      f"sys.stderr.write({LEAK_REPORT!r})\n")
    log = tmp_path / "log.txt"
    run = run_trainer([sys.executable, str(script)], cwd=tmp_path, env=None, log_path=log, timeout_s=60)
    text = log.read_text()
    assert run.returncode == 0 and "step 00000 (0.0%) | loss: 7.5" in text
    assert "leaked" not in text.replace("reference-leak warnings", "")
    assert "[loop] 11 lines of nanobind reference-leak warnings printed at exit left out (harmless)" in text
    assert run.log_bytes == len(b"step 00000 (0.0%) | loss: 7.5\n") + len(LEAK_REPORT)  # what it wrote, all of it
