"""`loop.py` as the README promises it to a user: the out-of-the-box start, which agent runs (and with which
Claude model), and the --backend and --protocol flags.

Run: uv run pytest tests/test_cli.py      (CPU, no network, no API key; about a minute: the stand-in trainer)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loop import git, loop_env, make_repo, read_rows, run_loop

from agents.claude_agent import DEFAULT_MODEL
from research.session import default_tag

pytestmark = pytest.mark.slow  # whole loop sessions from a fresh start: `uv run pytest -m slow` (CI runs it)


def agent_line(out: str) -> str:
    (line,) = [line for line in out.splitlines() if "branch autoresearch/" in line and "; agent " in line]
    return line


def test_out_of_the_box_start_then_the_agent_and_its_model(tmp_path):
    """`uv run loop.py` on a fresh machine: nothing prepared (the default cache under the home directory is
    empty), no protocol chosen, no --tag, no API key. It prepares the offline tiny protocol, creates the branch
    named by the date and runs the offline optuna agent, even with a Claude model named (--model,
    AUTORESEARCH_MODEL: they choose Claude's model, not the agent). With a key it is Claude, with the model
    --model names, else AUTORESEARCH_MODEL's, else the default. (--max-experiments 0 --baseline-runs 1 only
    keep it short; the backend stays the CPU's so a Mac does not train MLX here.)"""
    repo = make_repo(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = loop_env(tmp_path / "unused", HOME=str(home), AUTORESEARCH_MODEL="claude-from-env")
    for name in ("AUTORESEARCH_CACHE", "AUTORESEARCH_PROTOCOL", "AUTORESEARCH_TIME_BUDGET", "XDG_CACHE_HOME"):
        env.pop(name, None)
    short = ("--max-experiments", "0", "--baseline-runs", "1")
    before = default_tag()
    proc = run_loop(repo, *short, "--model", "claude-from-flag", env=env, timeout=400)
    tags = {before, default_tag()}  # the date may turn during the run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "preparing protocol 'tiny'" in proc.stdout and "protocol tiny" in proc.stdout
    cache = home / ".cache" / "autoresearch"
    assert (cache / "tiny" / "tokenizer" / "tokenizer.pkl").exists()
    branch = git(repo, "symbolic-ref", "--short", "HEAD")
    assert branch in {f"autoresearch/{t}" for t in tags}
    line = agent_line(proc.stdout)
    assert line.startswith(f"created branch {branch}") and line.endswith("; agent optuna"), line  # no model
    (row,) = read_rows(repo)
    assert row.status == "keep" and row.protocol == "tiny" and row.branch == branch and row.budget_s == 60

    key = dict(env, ANTHROPIC_API_KEY="sk-ant-test-0123456789abcdef")  # never used: no experiment is asked for
    proc = run_loop(repo, *short, env=key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert agent_line(proc.stdout).endswith("; agent claude, model claude-from-env")
    assert "preparing protocol" not in proc.stdout and f"resuming branch {branch}" in proc.stdout
    proc = run_loop(repo, *short, "--model", "claude-from-flag", env=key)
    assert agent_line(proc.stdout).endswith("; agent claude, model claude-from-flag")
    key.pop("AUTORESEARCH_MODEL")
    proc = run_loop(repo, *short, env=key)
    assert agent_line(proc.stdout).endswith(f"; agent claude, model {DEFAULT_MODEL}")
    assert len(read_rows(repo)) == 1  # resumed three times, nothing run again


def test_backend_and_protocol_flags_win_over_the_environment(tiny_cache, tmp_path):
    """--backend and --protocol choose over AUTORESEARCH_BACKEND and AUTORESEARCH_PROTOCOL (here naming MLX
    and the unprepared compact protocol, offline), and an unknown value is one sentence."""
    repo = make_repo(tmp_path)
    env = loop_env(tiny_cache, AUTORESEARCH_BACKEND="mlx", AUTORESEARCH_PROTOCOL="compact", HF_HUB_OFFLINE="1")
    proc = run_loop(repo, "run", "--backend", "cpu", "--protocol", "tiny", "--tag", "flags", "--max-experiments", "0",
                    "--baseline-runs", "1", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("backend cpu") and "trainer train_cuda.py, protocol tiny" in proc.stdout
    (row,) = read_rows(repo)
    assert row.backend == "cpu" and row.protocol == "tiny" and row.status == "keep"
    for flag, value, message in (("--backend", "tpu", "Unknown backend 'tpu'"),
                                 ("--protocol", "huge", "Unknown protocol 'huge'")):
        proc = run_loop(repo, "run", flag, value, "--tag", "flags", "--max-experiments", "0", env=loop_env(tiny_cache))
        assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
