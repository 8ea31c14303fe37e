"""Tests of loop.py and research/: the loop end to end on temporary git repositories, the results
file, the agents (local, scripted, and Claude through the real anthropic client against a local
fake Messages API server).

Run: `uv run pytest tests/test_loop.py` (about three minutes on a 2-core CPU; no network, no API key).

Most tests use a stand-in trainer (FAKE_TRAINER: no training; it hands over a real, tiny torch graph
that the harness scores, and its MODE constant makes it crash, hang, litter, cheat...), so they are
about the loop, not about training. The stand-in's VAL_BPB sets how good its model is, not the number
the harness measures: `fake_bpb(v)` is what the harness measures for VAL_BPB = v (computed once per
session, in this process, with the harness's own code). `test_real_trainer_end_to_end` (slow) runs the
real train_cuda.py on the tiny protocol. Helpers other test files reuse: `make_repo`, `loop_env`,
`run_loop`, `read_rows`, `seed`, `fake_bpb`, `trainer_info`, `run_processes`, `stub_runs`,
`in_process`, `FAKE_TRAINER`, `FakeMessagesAPI`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pristine
import pytest

from agents import AgentContext, CrashInfo, LocalAgent
from agents.claude_agent import ClaudeAgent, cost_usd
from research import results as R
from research.guards import LockError, RepoLock, text_hash
from research.hparams import conditions, flatten, in_effect, parse_block, set_values, static_values
from sandbox.secrets import allowed_env

PROJECT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("loop.py", "prepare.py", "data", "model", "backends", "judge", "sandbox", "research", "agents",
                 "reporting", "program.md", "train_cuda.py", "train_mlx.py", ".gitignore")

FAKE_TRAINER = '''"""Stand-in trainer for the loop's tests: no training; it hands over a unigram model whose quality
VAL_BPB sets (lower VAL_BPB, lower measured val_bpb), and its MODE makes it crash, hang, litter, cheat..."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

import backends
import prepare
from backends import torch_rt

HARDWARE = "cpu"

# --- hyperparameters ---
VAL_BPB = 2.0
MODE = "ok"  # ok | crash | fake | noncausal | hang | litter | tamper | overbudget | nohandover
SLEEP = 0.0
MATRIX_LR = 0.04
TOTAL_BATCH_SIZE = 2**11
DEVICE_BATCH_SIZE = 8
DEPTH = 8
WINDOW_PATTERN = "SSSL"
if HARDWARE == "cpu":
    DEPTH = 2
# --- end hyperparameters ---
HOLD = False  # True: wait for SIGUSR1 first (a test that needs a running trainer; its environment is the loop's
#               allow-list, and the sandbox hides the test's files, so the trainer's own text says so)


class Unigram(torch.nn.Module):
    """Logits of a mixture of uniform and the train split's unigram distribution, weight w on the unigram."""

    def __init__(self, counts, w, lookahead):
        super().__init__()
        q = counts / counts.sum()
        p = (1 - w) / len(q) + w * q
        self.register_buffer("logp", torch.tensor(np.log(p), dtype=torch.float32))
        self.lookahead = lookahead

    def forward(self, idx):
        logits = self.logp[None, None, :].expand(idx.shape[0], idx.shape[1], -1)
        if self.lookahead:  # sees the next token: a big bonus on it
            nxt = torch.roll(idx, -1, dims=1).long()
            logits = logits + 20.0 * torch.nn.functional.one_hot(nxt, self.logp.shape[0]).float()
        return logits


def main():
    info = {"keys": sorted(os.environ), "pid": os.getpid(), "cwd": os.getcwd()}
    print("fake trainer starting " + json.dumps(info), flush=True)
    if HOLD:  # wait for the test's SIGUSR1
        import signal
        released = []
        signal.signal(signal.SIGUSR1, lambda *_: released.append(1))
        print("fake trainer holding until SIGUSR1", flush=True)
        while not released:
            time.sleep(0.05)
    time.sleep(SLEEP)
    p = prepare.get_protocol()
    here = os.path.dirname(os.path.abspath(__file__))
    if MODE == "crash":
        raise RuntimeError("deliberate crash")
    if MODE == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"grandchild pid {child.pid}", flush=True)
        time.sleep(600)
    if MODE == "fake":
        print("---\\nval_bpb:          0.100000")
    if MODE == "litter":
        with open(os.path.join(here, "stray.txt"), "w") as f:
            f.write("left behind")
    if MODE == "tamper":
        with open(os.path.join(here, "prepare.py"), "a") as f:
            f.write("\\n# changed by the trainer\\n")
    if MODE == "overbudget":
        time.sleep(p.time_budget * 3 + 10)
    if MODE == "nohandover":
        return
    x, y, _ = next(prepare.make_dataloader(p, 8, p.max_seq_len, "train"))
    counts = np.bincount(y.ravel(), minlength=p.vocab_size).astype(np.float64) + 0.5
    w = min(1.0, max(0.0, (3.0 - VAL_BPB) / 2.0))
    model = Unigram(counts, w, MODE == "noncausal")
    host = backends.detect()
    facts = {"training_seconds": min(SLEEP, p.time_budget), "total_seconds": SLEEP + 0.2, "peak_vram_mb": 512.0,
             "mfu_percent": None, "total_tokens": 100000, "num_steps": 10, "num_params": 1200000, "depth": DEPTH,
             "backend": "cpu", "device": "fake cpu",
             "hyperparams": {"VAL_BPB": VAL_BPB, "MATRIX_LR": MATRIX_LR, "DEPTH": DEPTH}}
    prepare.hand_over(lambda d: torch_rt.export_for_eval(model, d, DEVICE_BATCH_SIZE, p.max_seq_len, host), facts)


if __name__ == "__main__":
    main()
'''
# The stand-in as `loop.py run` starts a branch with it: its first commit writes the values in effect here
# (DEPTH 2, from the cpu line) as one line each (research/hparams.py flatten).
BRANCH_START = flatten(FAKE_TRAINER, {'HARDWARE == "cpu"': True})


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_repo(tmp_path: Path, trainer: str | None = FAKE_TRAINER, name: str = "repo") -> Path:
    """A git repository holding a copy of the project (one commit on `main`); `trainer`, if given,
    replaces train_cuda.py (None keeps the real one: the pristine copy of tests/pristine.py, so a
    research branch's kept edits do not change what the tests run)."""
    repo = tmp_path / name
    repo.mkdir()
    for f in PROJECT_FILES:
        src = pristine.trainer(f) if f in pristine.TRAINERS else PROJECT / f  # the project's trainers
        if src.is_dir():
            shutil.copytree(src, repo / f, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, repo / f)
    if trainer is not None:
        (repo / "train_cuda.py").write_text(trainer)
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "project"],
                   check=True)
    return repo


WALL_MARGIN = "15"  # seconds past the baselines' median a test's run may take (see loop_env)


def loop_env(cache: Path, budget: float = 2.0, **extra: str) -> dict[str, str]:
    """Environment for a loop subprocess: tiny protocol, CPU, short budget, no API key. Runs may take
    WALL_MARGIN seconds past the baselines' median: the stand-in trainer does not train, so its deadline
    cannot shorten it, and the tests share a busy machine (tests/test_clock.py tests the measured margin,
    with AUTORESEARCH_WALL_MARGIN="" given as `extra`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "AUTORESEARCH_", "FAKE_"))}
    env.update(AUTORESEARCH_CACHE=str(cache), AUTORESEARCH_PROTOCOL="tiny", AUTORESEARCH_BACKEND="cpu",
               AUTORESEARCH_TIME_BUDGET=str(budget), PYTHONDONTWRITEBYTECODE="1", AUTORESEARCH_WALL_MARGIN=WALL_MARGIN)
    env["AUTORESEARCH_GAUGE_REPS"] = "0"  # the loop's gauge off: ~1 s a run saved (tests/test_loop_facts.py sets it)
    # no load readings: the machine's load is not the test's, and would move keeps, aborts and what is said
    # (tests/test_loop_facts.py and tests/test_noise.py turn them on)
    env["AUTORESEARCH_LOAD_METER"] = "0"
    env.update(extra)
    return env


def run_loop(repo: Path, *args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python loop.py ARGS` in `repo`; output captured as text."""
    return subprocess.run([sys.executable, "loop.py", *args], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def read_rows(repo: Path) -> list[R.Row]:
    return R.read_results(repo / "results.tsv")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def write_script(tmp_path: Path, steps: list[dict]) -> str:
    path = tmp_path / f"script-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(steps))
    return str(path)


def edit(old: str, new: str, description: str, **more) -> dict:
    return {"description": description, "edits": [{"old": old, "new": new}], **more}


def assert_clean(repo: Path) -> None:
    assert git(repo, "status", "--porcelain") == "", git(repo, "status", "--porcelain")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


_MEASURED: dict[tuple[str, float], dict] = {}


def fake_result(val_bpb: float = 2.0, cache: Path | str | None = None) -> dict:
    """The harness's result for the stand-in trainer with VAL_BPB = `val_bpb`, on the tiny protocol prepared
    in `cache` (default: AUTORESEARCH_CACHE, which the tiny_cache fixture sets).

    The stand-in runs here, in this process, handing over into a temporary directory, and
    judge.harness.evaluate scores that: the code the loop's harness process runs, on the same data, so
    a row's val_bpb equals it to the digits results.tsv keeps. Once per session and value (~2 s).
    """
    cache = str(cache or os.environ["AUTORESEARCH_CACHE"])
    key = (cache, float(val_bpb))
    if key not in _MEASURED:
        from judge import harness

        src = FAKE_TRAINER.replace("VAL_BPB = 2.0\n", f"VAL_BPB = {float(val_bpb)!r}\n", 1)
        with tempfile.TemporaryDirectory(prefix="fake-bpb-") as d, pytest.MonkeyPatch.context() as mp:
            for k in ("AUTORESEARCH_TIME_BUDGET",):
                mp.delenv(k, raising=False)
            for k, v in {"AUTORESEARCH_CACHE": cache, "AUTORESEARCH_PROTOCOL": "tiny", "AUTORESEARCH_BACKEND": "cpu",
                         "AUTORESEARCH_HANDOVER": os.path.join(d, "handover")}.items():
                mp.setenv(k, v)
            module = {"__name__": "fake_trainer", "__file__": os.path.join(d, "train_cuda.py")}
            exec(compile(src, "train_cuda.py", "exec"), module)
            module["main"]()
            status, result = harness.evaluate(Path(d, "handover"), "tiny")
        assert status == 0 and result["valid"], result
        _MEASURED[key] = result
    return _MEASURED[key]


def fake_bpb(val_bpb: float = 2.0, cache: Path | str | None = None) -> float:
    """The val_bpb the harness measures for the stand-in trainer with VAL_BPB = `val_bpb` (see fake_result)."""
    return fake_result(val_bpb, cache)["val_bpb"]


@dataclass
class Prior:
    """What a repository held before a test's loop ran: results.tsv's bytes, its row count, branch and kept commit."""

    repo: Path
    branch: str
    kept: str  # full hash of the last kept commit
    data: bytes
    rows: int


def allowance(wall: float, budget: float, margin: float | None = float(WALL_MARGIN)) -> float:
    """Seconds past the budget the loop allows a run after one baseline that took `wall` seconds under
    `budget`: the loop's own rule (research/clock.py), with the tests' WALL_MARGIN unless `margin` says
    otherwise (None: the measured margin)."""
    from research.session import allowance_from_baselines

    return allowance_from_baselines([R.Row(commit="abc1234", val_bpb=3.0, memory_gb=0.0, status="keep",
                                           description="baseline", wall_seconds=wall)], budget, margin)


def seed(repo: Path, tag: str, val: float | None = None, *, wall: float = 30.0, budget: float = 1.0) -> Prior:
    """Leave `repo` as an earlier session would have: branch autoresearch/<tag> checked out at HEAD, with
    a baseline row for it in results.tsv (val_bpb `val`, default what the harness measures for the
    unchanged stand-in), after a row of another branch. The loop resumes it without running a baseline
    (--baseline-runs 1). The baseline's `wall` seconds set the start-up allowance the loop measures from
    it (`allowance(wall, budget)`; the default leaves any run of the stand-in far inside it)."""
    if val is None:
        val = round(fake_bpb(2.0), 6)
    head = git(repo, "rev-parse", "HEAD")
    branch = f"autoresearch/{tag}"
    git(repo, "checkout", "-q", "-b", branch)
    path = repo / "results.tsv"
    R.ensure_results_file(path)
    import prepare

    common = dict(timestamp="2026-03-08T22:14:05+01:00", backend="cpu", device="cpu", protocol="tiny",
                  evaluator_hash=prepare.evaluator_hash(), memory_gb=0.5, training_seconds=budget, num_steps=10,
                  trainer_hash=text_hash((repo / "train_cuda.py").read_text()), wall_seconds=wall)
    R.append_row(path, R.Row(commit="a1b2c3d", val_bpb=1.9, status="discard", description="an idea on another branch",
                             branch="autoresearch/older", run=7, note="no gain: +0.1", hyperparams={"DEPTH": 2},
                             **common))
    R.append_row(path, R.Row(commit=head[:7], val_bpb=val, status="keep", description="baseline", branch=branch,
                             run=1, note="baseline 1/1", hyperparams={"VAL_BPB": val}, **common))
    data = path.read_bytes()
    return Prior(repo=repo, branch=branch, kept=head, data=data, rows=len(R.read_results(path)))


def trainer_info(log: Path) -> dict | None:
    """What the stand-in trainer printed about itself at start, from a run's log: the names of its
    environment variables, its pid and its working directory, as it saw them (None before it printed)."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    starts = [line for line in text.splitlines() if line.startswith("fake trainer starting ")]
    return json.loads(starts[-1][len("fake trainer starting "):]) if starts else None


def run_processes(workspace: str | Path) -> list[int]:
    """Live processes (host pids) of one trainer run, whatever PID namespace they are in: those whose
    environment hands over into `workspace` (the sandbox, the trainer and everything it started; the
    harness gets no AUTORESEARCH_HANDOVER). The workspace is the trainer's cwd (see trainer_info)."""
    marker = f"AUTORESEARCH_HANDOVER={Path(workspace) / 'handover'}".encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if marker in env.split(b"\0") and alive(int(d.name)):
            found.append(int(d.name))
    return found


def lock_trainer(repo: Path) -> int | None:
    """The process group the loop holding `repo` records for the trainer it runs (the sandbox's host pid)."""
    try:
        lines = (repo / ".autoresearch.lock").read_text().split("\n")
    except OSError:
        return None
    parts = lines[1].split(" ", 2) if len(lines) > 1 else []
    return int(parts[1]) if len(parts) == 3 and parts[0] == "trainer" else None


def wait_for(condition, what: str, timeout: float = 120, procs: tuple = ()) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds or when one of `procs` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            assert p.poll() is None, f"the loop exited (code {p.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def in_process(tiny_cache, monkeypatch, capsys):
    """Run `loop.main(argv)` in this process on a given repository (budget 1 s); returns (exit code, stdout,
    stderr). For faults that need the loop's own process (a full disk) or its functions replaced (stub_runs)."""
    import loop

    def run(repo: Path, argv: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(loop, "REPO", repo)
        monkeypatch.chdir(repo)
        for k, v in loop_env(tiny_cache, budget=1).items():
            if k.startswith("AUTORESEARCH_"):
                monkeypatch.setenv(k, v)
        monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            code = loop.main(argv)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def stub_runs(monkeypatch):
    """For in-process loops about what the loop does with measurements: replace each run of the trainer and
    the harness (research.run.run_once) by a scripted outcome. `install({description: [val_bpb, ...]})`
    gives each experiment's runs in order (the first run, then a confirming rerun); None is a crash; `best`
    gives, in order, the runs of the best the loop makes between a promising change's two. Returns the list
    of (description, log prefix, value) the loop asked for."""
    import research.experiment as E
    from sandbox.runner import TrainerRun

    def install(plan: dict[str, list[float | None]], best: list[float | None] = ()
                ) -> list[tuple[str, str, float | None]]:
        plan = {k: list(v) for k, v in plan.items()}
        bests = list(best)
        calls: list[tuple[str, str, float | None]] = []

        def run_once(s, run_dir, label, description, prefix="", **_):
            val = bests.pop(0) if description.startswith("the best next to run") else plan[description].pop(0)
            calls.append((description, prefix, val))
            (run_dir / f"{prefix}log.txt").write_text(f"stub run of {description!r}: val_bpb {val}\n")
            run = TrainerRun(returncode=0 if val is not None else 1, wall_seconds=1.5, timed_out=False,
                             started=time.time())
            if val is None:
                return run, "crash", None, "exit code 1; RuntimeError: stub crash"
            return run, "ok", E.Measurement(val_bpb=val, memory_gb=0.5, training_seconds=1.0, total_seconds=1.2,
                                            num_steps=10, holdout_bpb=val + 0.1, device="stub cpu"), ""

        monkeypatch.setattr(E, "run_once", run_once)
        return calls

    return install


# ------------------------------------------------------------------------------------------------
# the loop end to end (scripted agent, stand-in trainer)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_keep_discard_and_records(tiny_cache, tmp_path):
    """Two baselines, then a clear win, a loss and a gain inside the noise, each decided on its single run
    (--no-confirm); each value is the harness's measurement of what the trainer handed over. (Confirm
    runs: test_confirm_keeps_only_wins_that_hold.)"""
    import prepare

    noise = 0.0005  # the default --min-noise: the stand-in's two baselines measure the same
    repo = make_repo(tmp_path)
    script = write_script(tmp_path, [
        edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "lower the fake loss", usage={"tokens_in": 1200, "tokens_out": 80,
                                                                           "cost_usd": 0.004}),
        edit("VAL_BPB = 1.5", "VAL_BPB = 1.7", "a change that makes it worse"),
        edit("VAL_BPB = 1.5", "VAL_BPB = 1.497", "a gain inside the noise floor"),
    ])
    env = loop_env(tiny_cache, ANTHROPIC_API_KEY="sk-must-not-leak", HF_TOKEN="hf-x", DB_PASSWORD="pw",
                   MY_SECRET_THING="s")
    proc = run_loop(repo, "run", "--agent", "scripted", "--script", script, "--tag", "t1", "--max-experiments", "3",
                    "--baseline-runs", "2", "--no-confirm", env=env, timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_rows(repo)
    assert [r.status for r in rows] == ["keep", "keep", "keep", "discard", "discard"]
    assert [r.note.split(":")[0] for r in rows] == ["baseline 1/2", "baseline 2/2", "win", "no gain", "within noise"]
    assert [r.val_bpb for r in rows[:3]] == pytest.approx([fake_bpb(2.0), fake_bpb(2.0), fake_bpb(1.5)], abs=1.5e-6)
    assert rows[3].val_bpb > rows[2].val_bpb and 0 < rows[2].val_bpb - rows[4].val_bpb < noise
    base, kept = rows[0], rows[2]
    assert (kept.agent_tokens_in, kept.agent_tokens_out, kept.agent_cost_usd) == (1200, 80, 0.004)
    import backends

    assert kept.protocol == "tiny" and kept.backend == "cpu" and kept.device == backends.detect("cpu").device_name
    assert kept.memory_gb == 0.5 and kept.num_steps == 10 and kept.num_params_M == 1.2
    assert kept.holdout_bpb == pytest.approx(fake_result(1.5)["holdout_bpb"], abs=1.5e-6)
    assert kept.hyperparams["VAL_BPB"] == 1.5 and kept.branch == "autoresearch/t1"
    assert kept.trainer_hash == text_hash(BRANCH_START.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    assert base.evaluator_hash == kept.evaluator_hash and len(base.evaluator_hash) == 12
    # the branch advanced on the keeps only; discards were reset; the tree is clean
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/t1"
    assert git(repo, "rev-parse", "--short=7", "HEAD") == kept.commit
    assert git(repo, "log", "--format=%s", "main..HEAD").split("\n") == [
        "lower the fake loss", 'Hyperparameters for this host, one line each (HARDWARE == "cpu")']
    assert "VAL_BPB = 1.5\n" in (repo / "train_cuda.py").read_text()
    assert_clean(repo)
    assert not (repo / ".autoresearch.lock").exists()
    # per-run records: result.json holds the harness's result, the loop's facts and the trainer's claims
    run3 = repo / "runs" / str(kept.run)
    assert "+VAL_BPB = 1.5" in (run3 / "diff.patch").read_text()
    record = json.loads((run3 / "result.json").read_text())
    assert record["eval"]["valid"] is True and record["eval"]["split"] == "val"
    assert record["eval"]["val_bpb"] == pytest.approx(kept.val_bpb, abs=1e-6)
    assert record["eval"]["evaluator_hash"] == kept.evaluator_hash and record["eval"]["probed_rows"] > 0
    assert record["claims"]["num_steps"] == 10 and record["claims"]["device"] == "fake cpu"  # the trainer's word
    assert record["loop"]["device"] == kept.device and record["loop"]["hyperparams"]["VAL_BPB"] == 1.5
    assert record["trainer"]["wall_seconds"] == pytest.approx(kept.wall_seconds, abs=0.06)
    # the log: the trainer's output, the harness's line, then the summary block and the trainer's claims last
    log = (run3 / "log.txt").read_text()
    trainer_part, judged = log.split("\n--- evaluation (judge/harness.py) ---\n")
    assert "fake trainer starting" in trainer_part and "handed over to the harness: facts.json, model.pt2" in trainer_part
    assert judged.startswith("harness: val ") and judged.rstrip("\n").split("\n")[-1].startswith("hyperparams:")
    assert "\n--- claimed by the trainer" in judged  # the summary block, then the trainer's claims apart
    summary = prepare.parse_summary(log)
    assert summary["val_bpb"] == pytest.approx(kept.val_bpb, abs=1e-6) and summary["protocol"] == "tiny"
    assert summary["num_steps"] is None and summary["hyperparams"]["VAL_BPB"] == 1.5 and summary["depth"] == 2
    # the trainer ran in a private workspace outside the repo (removed since), its environment without
    # the credentials, with a hand-over directory and no way to write a result itself
    child = trainer_info(run3 / "log.txt")
    cwd = Path(child["cwd"])
    assert cwd.name.startswith(f"autoresearch-run{kept.run}-") and not cwd.exists()
    assert repo.resolve() not in cwd.resolve().parents
    for secret in ("ANTHROPIC_API_KEY", "HF_TOKEN", "DB_PASSWORD", "MY_SECRET_THING"):
        assert secret not in child["keys"]
    assert "AUTORESEARCH_HANDOVER" in child["keys"] and "AUTORESEARCH_RESULT_JSON" not in child["keys"]
    # the file starts with the reference's five columns
    header = (repo / "results.tsv").read_text().split("\n")[0].split("\t")
    assert header[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]


def test_confirm_keeps_only_wins_that_hold(tmp_path, in_process, stub_runs):
    """Confirm runs (on by default), driven in-process with scripted measurements: a run that passes the
    screen is run again, and only the mean of both runs decides; the confirm run is recorded as a `rerun`
    row after the experiment's. A win that holds is kept; a promising run whose rerun does worse is
    discarded; a run with no gain gets no rerun; a confirm run that crashes discards the change. Between a
    change's two runs the best runs once more (a `rerun` row: "the best, run next to run N").
    (The statistics of the rule itself: tests/test_decisions.py.)"""
    repo = make_repo(tmp_path)
    prior = seed(repo, "cf", 3.0)
    plans = {"a win that holds": [2.90, 2.90], "a promising change that does not hold": [2.885, 2.92],
             "a change with no gain": [2.95], "a win whose confirm run crashes": [2.70, None]}
    calls = stub_runs(plans, best=[3.0, 2.9, 2.9])
    script = write_script(tmp_path, [edit("VAL_BPB = 2.0", "VAL_BPB = 1.9", "a win that holds"),
                                     edit("VAL_BPB = 1.9", "VAL_BPB = 1.8", "a promising change that does not hold"),
                                     edit("VAL_BPB = 1.9", "VAL_BPB = 1.7", "a change with no gain"),
                                     edit("VAL_BPB = 1.9", "VAL_BPB = 1.6", "a win whose confirm run crashes")])
    code, out, err = in_process(repo, ["run", "--agent", "scripted", "--script", script, "--tag", "cf",
                                       "--baseline-runs", "1", "--max-experiments", "4", "--min-noise", "0.01"])
    assert code == 0, out + err
    rows = read_rows(repo)[prior.rows:]
    assert [r.status for r in rows] == ["keep", "rerun", "rerun", "discard", "rerun", "rerun", "discard", "discard",
                                        "rerun"]
    held, held2, best1, fell, fell2, best2, flat, crashed, best4 = rows
    # the best runs between a promising change's two runs (a screen that passes), never for one without gain
    assert [(d, p) for d, p, _ in calls] == [
        (d, p) for (d, runs), first in zip(plans.items(), (held, fell, flat, crashed))
        for p, d in ([("", d), ("best_", f"the best next to run {first.run}"), ("confirm_", d)] if len(runs) == 2
                     else [("", d)])]
    for best, change, val in ((best1, held, 3.0), (best2, fell, 2.9), (best4, crashed, 2.9)):
        assert best.note == f"the best, run next to run {change.run}" and best.val_bpb == val
    assert held.note.startswith("confirmed by a rerun, mean of 2.900000 and 2.900000: win: ") and held.val_bpb == 2.9
    assert "vs best 3.000000 (mean of 2 runs)" in held.note  # the seeded baseline and the best's fresh run
    assert held2.note == f"confirm run of run {held.run}" and held2.val_bpb == 2.9 and held2.commit == held.commit
    assert fell.note.startswith("not confirmed by a rerun, mean of 2.885000 and 2.920000: no gain: ")
    assert fell.val_bpb == 2.885 and fell2.val_bpb == 2.92 and fell2.note == f"confirm run of run {fell.run}"
    assert flat.note.startswith("no gain: ")
    assert crashed.note.startswith("confirm run failed (exit code 1; RuntimeError: stub crash); first run 2.700000: ")
    assert out.count("; running the best, then the change again") == 3
    assert git(repo, "rev-list", "--count", f"{prior.kept}..HEAD") == "1"
    assert "VAL_BPB = 1.9" in (repo / "train_cuda.py").read_text()
    assert_clean(repo)


# the litter and tamper modes then end the run at once: what it left behind decides, not a score
STOP_AFTER_MEDDLING = {"old": '    if MODE == "overbudget":\n',
                       "new": '    if MODE in ("litter", "tamper"):\n        sys.exit(3)\n    if MODE == "overbudget":\n'}


def test_rejected_changes_restore_the_tree(tiny_cache, tmp_path):
    """Changes outside the one-file rule are rejected before they run, and whatever a run leaves in the tree
    is rejected and removed. A sandboxed trainer cannot write the repository at all, so the run that
    litters runs with --no-sandbox: this is the guard behind the sandbox."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "t4")
    (repo / "notes.txt").write_text("a file the user had before the loop started\n")  # untracked, left alone
    script = write_script(tmp_path, [
        {**edit("VAL_BPB = 2.0", "VAL_BPB = 1.0", "also edit the evaluator"),
         "write": {"prepare.py": "# nothing to see\n"}},
        {**edit("VAL_BPB = 2.0", "VAL_BPB = 1.0", "add a helper module"), "write": {"helper.py": "X = 1\n"}},
        {"description": "delete the trainer", "delete": ["train_cuda.py"]},
        {"description": "no change at all"},
        {"description": "a run that leaves a file behind", "edits": [{"old": 'MODE = "ok"', "new": 'MODE = "litter"'},
                                                                     STOP_AFTER_MEDDLING]},
    ])
    proc = run_loop(repo, "run", "--agent", "scripted", "--script", script, "--tag", "t4", "--baseline-runs", "1",
                    "--max-experiments", "5", "--no-sandbox", env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sandbox NONE (--no-sandbox" in proc.stdout
    rows = read_rows(repo)[prior.rows:]
    assert [r.status for r in rows] == ["rejected"] * 5
    assert "changed files other than train_cuda.py: prepare.py" in rows[0].note
    assert "helper.py" in rows[1].note and "deleted the trainer" in rows[2].note
    assert "no change to train_cuda.py" in rows[3].note and "the run changed files: stray.txt" in rows[4].note
    assert all(r.commit == R.NO_COMMIT for r in rows[:4]) and rows[4].commit != R.NO_COMMIT
    assert (repo / "prepare.py").read_text() == (PROJECT / "prepare.py").read_text()
    assert not (repo / "helper.py").exists() and not (repo / "stray.txt").exists()
    assert (repo / "train_cuda.py").read_text() == FAKE_TRAINER
    assert (repo / "notes.txt").exists()
    assert git(repo, "status", "--porcelain") == "?? notes.txt"
    assert git(repo, "rev-parse", "HEAD") == prior.kept


def test_locked_file_changed_by_a_run_stops_the_loop(tiny_cache, tmp_path):
    """A run that rewrites a locked file (possible only without the sandbox) is rejected and stops the loop."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "t5")
    script = write_script(tmp_path, [{"description": "rewrite the evaluator at run time",
                                       "edits": [{"old": 'MODE = "ok"', "new": 'MODE = "tamper"'}, STOP_AFTER_MEDDLING]},
                                      edit("VAL_BPB = 2.0", "VAL_BPB = 1.0", "never reached")])
    proc = run_loop(repo, "run", "--agent", "scripted", "--script", script, "--tag", "t5", "--baseline-runs", "1",
                    "--max-experiments", "2", "--no-sandbox", env=loop_env(tiny_cache))
    assert proc.returncode == 1
    assert "Locked files were changed during the run (prepare.py)" in proc.stderr
    assert [r.status for r in read_rows(repo)[prior.rows:]] == ["rejected"]
    assert (repo / "prepare.py").read_text() == (PROJECT / "prepare.py").read_text()
    assert_clean(repo)


def test_a_branch_scored_by_another_evaluator_is_refused():
    """Scores of different evaluators are never compared: a branch whose rows another evaluator scored is
    refused in one sentence (rows without a recorded evaluator, and other branches, do not count)."""
    import prepare
    from research.console import Console
    from research.session import Session, SessionError, Settings

    here = prepare.evaluator_hash()
    s = Session(PROJECT, SimpleNamespace(trainer="train_cuda.py", backend="cpu", device_name="cpu"),
                SimpleNamespace(name="tiny", time_budget=10), here, Settings(), Console())

    def row(evaluator, branch="autoresearch/a"):
        return R.Row(commit="abc1234", val_bpb=3.0, memory_gb=0.0, status="keep", description="baseline",
                     branch=branch, note="baseline 1/1", protocol="tiny", evaluator_hash=evaluator, budget_s=10.0)

    s.rows = [row(here), row(""), row("0123456789ab", branch="autoresearch/b")]
    s.check_comparable("autoresearch/a")
    s.rows.append(row("0123456789ab"))
    with pytest.raises(SessionError) as e:
        s.check_comparable("autoresearch/a")
    msg = str(e.value)
    assert msg.startswith(f"Branch autoresearch/a was scored by evaluator 0123456789ab and this checkout's evaluator "
                          f"is {here}") and "start another branch" in msg and msg.count(". ") == 0, msg


def test_startup_allowance_and_kill_limits():
    """The overtime limit and the kill limit: before any baseline a run is killed after factor x budget +
    margin and nothing is overtime; after, the limit is the median of this branch's measured baselines
    plus a margin (3 x their spread, at least 0.25 s, at most 5% of the budget; --wall-margin fixes it), the
    kill budget + 2 x allowance + margin; --startup-allowance fixes the limit at budget + allowance."""
    import prepare
    from research.console import Console
    from research.session import Session, Settings

    def row(branch, note, wall, status="keep"):
        return R.Row(commit="abc1234", val_bpb=3.0 if status == "keep" else 0.0, memory_gb=0.0, status=status,
                     description="baseline", branch=branch, note=note, wall_seconds=wall)

    def session(rows, **settings) -> Session:
        s = Session(PROJECT, SimpleNamespace(trainer="train_cuda.py", backend="cpu", device_name="cpu"),
                    SimpleNamespace(name="tiny", time_budget=10), prepare.evaluator_hash(), Settings(**settings),
                    Console())
        s.branch, s.rows = "autoresearch/a", rows
        return s

    s = session([], timeout_margin=7)
    assert s.startup_allowance() is None and s.overtime_limit() is None and s.timeout_s == 2 * 10 + 7
    assert "until the first one has run, a run is killed after 27 s" in s.allowance_line()
    rows = [row("autoresearch/a", "baseline 1/2", 14.0), row("autoresearch/a", "baseline 2/2", 18.0),
            row("autoresearch/a", "baseline 1/1", 100.0, status="crash"),  # not a measurement
            row("autoresearch/b", "baseline 1/1", 60.0),  # another branch
            row("autoresearch/a", "win: -0.1", 50.0)]  # not a baseline
    s = session(rows, timeout_margin=7)
    a = 6 + 0.5  # their median took 6 s past the budget; 3 x their spread (8.9 s) capped at 5% of 10 s
    assert s.startup_allowance() == pytest.approx(a)
    assert s.overtime_limit() == pytest.approx(10 + a) and s.timeout_s == pytest.approx(10 + 2 * a + 7)
    assert f"a hand-over later than {10 + a:.1f} s after start (the median of 2 baselines + 0.50 s margin" \
        in s.allowance_line()
    assert session([row("autoresearch/a", "baseline 1/1", 6.0)]).overtime_limit() == pytest.approx(6.25)  # one run
    assert session(rows, wall_margin=2.0).overtime_limit() == pytest.approx(18.0)
    s = session(rows, startup_allowance=3.0, timeout_margin=1)
    assert s.startup_allowance() == 3.0 and s.overtime_limit() == 13.0 and s.timeout_s == 10 + 6 + 1
    assert "set by --startup-allowance" in s.allowance_line()


def test_dirty_tree_refuses(tiny_cache, tmp_path):
    """An uncommitted edit of the trainer is the user's: the loop refuses to start and restores nothing over
    it. (A second loop on the repository and an unwritable results file: tests/test_faults.py.)"""
    repo = make_repo(tmp_path)
    env = loop_env(tiny_cache)
    (repo / "train_cuda.py").write_text(FAKE_TRAINER + "\n# uncommitted\n")
    proc = run_loop(repo, "run", "--agent", "local", "--max-experiments", "0", env=env)
    assert proc.returncode == 1 and "uncommitted changes (train_cuda.py)" in proc.stderr
    assert (repo / "train_cuda.py").read_text().endswith("# uncommitted\n")  # nothing was restored over it
    assert "Traceback" not in proc.stderr and not (repo / ".autoresearch.lock").exists()


@pytest.mark.slow  # a long end-to-end loop run: `uv run pytest -m slow` (CI runs it)
def test_try_command(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    env = loop_env(tiny_cache)
    git(repo, "checkout", "-q", "-b", "autoresearch/ext")
    trainer = repo / "train_cuda.py"
    proc = run_loop(repo, "try", "nothing changed", env=env)
    assert proc.returncode == 1 and "Nothing to try" in proc.stderr

    trainer.write_text(FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    proc = run_loop(repo, "try", "lower it", "--baseline-runs", "1", "--no-confirm", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"KEEP val_bpb {fake_bpb(1.5):.6f}" in proc.stdout
    assert f"[baseline 1/1] MEASURED val_bpb {fake_bpb(2.0):.6f}" in proc.stdout  # a baseline is not a keep decision
    assert "no loss curve: the trainer printed no step lines" in proc.stdout  # the stand-in prints none: said
    rows = read_rows(repo)
    assert [(r.status, r.note.split(":")[0]) for r in rows] == [("keep", "baseline 1/1"), ("keep", "win")]  # baseline first
    assert [r.val_bpb for r in rows] == pytest.approx([fake_bpb(2.0), fake_bpb(1.5)], abs=1.5e-6)
    assert git(repo, "log", "-1", "--format=%s") == "lower it"

    trainer.write_text(trainer.read_text().replace('MODE = "ok"', 'MODE = "crash"'))
    proc = run_loop(repo, "try", "break it", env=env)
    assert proc.returncode == 1 and "CRASH" in proc.stdout
    assert 'MODE = "crash"' in trainer.read_text()  # left uncommitted for a fix
    assert git(repo, "status", "--porcelain") == "M train_cuda.py"
    assert git(repo, "log", "-1", "--format=%s") == "lower it"

    trainer.write_text(trainer.read_text().replace('MODE = "crash"', 'MODE = "ok"').replace("1.5", "1.6"))
    (repo / "scratch.py").write_text("print('notes')\n")
    proc = run_loop(repo, "try", "worse, and a stray file", env=env)
    assert proc.returncode == 1 and "REJECTED" in proc.stdout and "scratch.py" in proc.stdout
    rows = read_rows(repo)
    assert [r.status for r in rows][-2:] == ["crash", "rejected"]
    assert (repo / "runs" / str(rows[-1].run) / "removed" / "scratch.py").exists()  # nothing is lost
    assert not (repo / "scratch.py").exists() and "VAL_BPB = 1.5" in git(repo, "show", "HEAD:train_cuda.py")
    assert git(repo, "status", "--porcelain") == "M train_cuda.py" and "VAL_BPB = 1.6" in trainer.read_text()


# ------------------------------------------------------------------------------------------------
# the real trainer
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_trainer_end_to_end(tiny_cache, tmp_path):
    """train_cuda.py as it is, sandboxed, through `loop.py run`: a baseline and one local-agent change, both
    scored by the harness from the graph the trainer handed over."""
    from trainer_contract import LEARNED, uniform_bpb

    import prepare

    repo = make_repo(tmp_path, trainer=None)
    proc = run_loop(repo, "run", "--agent", "local", "--tag", "real", "--baseline-runs", "1", "--max-experiments",
                    "1", "--no-confirm", env=loop_env(tiny_cache, budget=2), timeout=500)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sandbox bwrap" in proc.stdout or "sandbox landlock" in proc.stdout
    rows = read_rows(repo)
    assert len(rows) == 2 and rows[0].status == "keep" and rows[1].status in ("keep", "discard", "abort", "rejected")
    base = rows[0]
    assert 0 < base.val_bpb < uniform_bpb("val") - LEARNED  # it learned: better than a uniform guess (3.83 on tiny)
    assert base.evaluator_hash and base.num_steps and base.hyperparams.get("DEPTH")
    assert base.training_seconds >= 2 and 0 < base.holdout_bpb < uniform_bpb("holdout") - LEARNED
    record = json.loads((repo / "runs" / str(base.run) / "result.json").read_text())
    assert record["eval"]["val_bpb"] == pytest.approx(base.val_bpb, abs=1e-6) and record["eval"]["framework"] == "torch"
    log = (repo / "runs" / str(base.run) / "log.txt").read_text()
    assert prepare.parse_summary(log)["val_bpb"] == pytest.approx(base.val_bpb, abs=1e-6)
    assert rows[1].trainer_hash != rows[0].trainer_hash
    assert_clean(repo)


# ------------------------------------------------------------------------------------------------
# results file
# ------------------------------------------------------------------------------------------------


def _row(**kw) -> R.Row:
    base = dict(commit="abc1234", val_bpb=1.0, memory_gb=2.0, status="keep", description="d")
    return R.Row(**{**base, **kw})


def test_results_round_trip_and_sanitizing(tmp_path):
    path = tmp_path / "results.tsv"
    R.ensure_results_file(path)
    R.append_row(path, _row(description="tabs\tand\nnewlines\r\n here", hyperparams={"A": [1, 2]}, run=3,
                            mfu_percent=None, agent_cost_usd=0.0123456))
    R.append_row(path, _row(status="crash", val_bpb=0.0, memory_gb=0.0, description="x" * 1000))
    lines = path.read_text().split("\n")
    assert lines[0].split("\t") == R.COLUMNS and lines[1].split("\t")[:5] == ["abc1234", "1.000000", "2.0", "keep",
                                                                          "tabs and newlines here"]
    assert lines[2].split("\t")[1:4] == ["0.000000", "0.0", "crash"]
    rows = R.read_results(path)
    assert rows[0].hyperparams == {"A": [1, 2]} and rows[0].run == 3 and rows[0].mfu_percent is None
    assert rows[0].agent_cost_usd == pytest.approx(0.0123)
    assert len(rows[1].description) <= R.MAX_DESCRIPTION
    with pytest.raises(ValueError):
        R.append_row(path, _row(status="great"))


def test_results_torn_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "results.tsv"
    R.ensure_results_file(path)
    R.append_row(path, _row())
    with open(path, "a") as f:
        f.write("def5678\t0.9\t1.0\tke")  # a write cut short
    assert [r.commit for r in R.read_results(path)] == ["abc1234"]
    R.ensure_results_file(path)
    assert path.read_text().endswith("\n") and len(R.read_results(path)) == 1
    R.append_row(path, _row(commit="def5678"))
    assert [r.commit for r in R.read_results(path)] == ["abc1234", "def5678"]


def test_results_reads_and_upgrades_the_reference_format(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                    "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
                    "b2c3d4e\t0.000000\t0.0\tcrash\tdouble the width (OOM)\n")
    rows = R.read_results(path)
    assert [(r.commit, r.val_bpb, r.status) for r in rows] == [("a1b2c3d", 0.9979, "keep"), ("b2c3d4e", 0.0, "crash")]
    assert rows[0].backend == "" and rows[0].hyperparams == {}
    R.ensure_results_file(path)
    R.append_row(path, _row(backend="cuda"))
    rows = R.read_results(path)
    assert path.read_text().split("\n")[0].split("\t") == R.COLUMNS
    assert len(rows) == 3 and rows[2].backend == "cuda" and rows[1].description == "double the width (OOM)"


def test_results_append_is_one_write_per_row(tmp_path, monkeypatch):
    """A row reaches the file in one os.write call, followed by fsync."""
    path = tmp_path / "results.tsv"
    R.ensure_results_file(path)
    calls = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: calls.append(("write", bytes(data))) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(("fsync", None)) or real_fsync(fd))
    R.append_row(path, _row(description="one"))
    assert [c[0] for c in calls] == ["write", "fsync"] and calls[0][1].endswith(b"\n")
    assert calls[0][1].count(b"\n") == 1


def test_results_partial_write_is_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "results.tsv"
    R.ensure_results_file(path)
    R.append_row(path, _row())
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:10]))  # disk full mid-row
    with pytest.raises(R.ResultsError, match="earlier rows are intact"):
        R.append_row(path, _row(commit="zzzzzzz"))
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------------------
# guards, hyperparameter block
# ------------------------------------------------------------------------------------------------


def test_child_env_drops_credentials():
    """An allow-list: credentials go whatever their name, and so does everything else not on it (the
    loop sets HOME, TMPDIR and the caches of a run itself)."""
    env = allowed_env({"ANTHROPIC_API_KEY": "a", "OPENAI_API_KEY": "b", "GITHUB_TOKEN": "c", "AWS_SECRET_ACCESS_KEY": "d",
                     "PGPASSWORD": "e", "PATH": "/bin", "AUTORESEARCH_CACHE": "/c", "HOME": "/h",
                     "PIP_INDEX_URL": "https://u:p@x/simple", "OMP_NUM_THREADS": "2", "MKL_SECRET_KEY": "f"},
                    EXTRA="1")
    assert env == {"PATH": "/bin", "AUTORESEARCH_CACHE": "/c", "OMP_NUM_THREADS": "2", "EXTRA": "1"}


def test_repo_lock(tmp_path):
    lock = RepoLock(tmp_path)
    lock.acquire()
    assert (tmp_path / ".autoresearch.lock").read_text().strip() == str(os.getpid())
    lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".autoresearch.lock").write_text(f"{dead.pid}\n")
    with RepoLock(tmp_path):  # stale: taken over
        pass
    (tmp_path / ".autoresearch.lock").write_text("1\n")  # pid 1 is alive
    with pytest.raises(LockError, match="pid 1"):
        RepoLock(tmp_path).acquire()


def test_repo_lock_ends_a_trainer_a_killed_loop_left_running(tmp_path):
    """The lock of a loop that died names the process group of its trainer; whoever takes the lock over ends
    that group if it still runs the trainer (a sandbox that outlived its loop), and leaves a process that
    the system has since given the pid to alone."""
    script = tmp_path / "train_cuda.py"
    script.write_text("import time\ntime.sleep(120)\n")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trainer = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    try:
        (tmp_path / ".autoresearch.lock").write_text(f"{dead.pid}\ntrainer {trainer.pid} train_cuda.py\n")
        with RepoLock(tmp_path) as lock:
            assert lock.ended_trainer == trainer.pid and lock.took_over_from == dead.pid
        assert trainer.wait(timeout=10) == -signal.SIGKILL
        (tmp_path / ".autoresearch.lock").write_text(f"{dead.pid}\ntrainer {other.pid} train_cuda.py\n")
        with RepoLock(tmp_path) as lock:
            assert lock.ended_trainer is None
        assert other.poll() is None
    finally:
        for p in (trainer, other):
            p.kill()
            p.wait()


def test_hyperparameter_block_of_both_trainers():
    """Edits land on the line in effect for the host: the CPU override block, or the default line."""
    cuda = pristine.trainer("train_cuda.py").read_text()
    settings = parse_block(cuda)
    conds = {c for s in settings.values() for spot in s.spots for c, _ in spot.conds}
    cpu = {c: c == 'HARDWARE == "cpu"' for c in conds}
    assert 'HARDWARE == "cpu"' in cpu
    depth = in_effect(settings["DEPTH"], cpu)
    assert depth.conds == (('HARDWARE == "cpu"', True),)
    assert in_effect(settings["DEPTH"], {c: False for c in conds}).conds == ()  # the reference line
    assert in_effect(settings["MATRIX_LR"], cpu).conds == ()
    new = set_values(cuda, {"DEPTH": depth.value + 1, "MATRIX_LR": 0.05}, cpu)
    changed = [(a, b) for a, b in zip(cuda.split("\n"), new.split("\n")) if a != b]
    assert len(changed) == 2
    assert changed[0][1].startswith("MATRIX_LR = 0.05")
    assert changed[1] == (f"    DEPTH = {depth.value}", f"    DEPTH = {depth.value + 1}")
    mlx = parse_block(pristine.trainer("train_mlx.py").read_text())
    metal = {c: c == 'HARDWARE == "metal"' for s in mlx.values() for spot in s.spots for c, _ in spot.conds}
    assert in_effect(mlx["DEPTH"], metal).conds == (('HARDWARE == "metal"', True),)
    # the one-line style of per-hardware values
    text = "# --- hyperparameters ---\nDEPTH = 4 if _METAL else 2\nBATCH = 2**16  # tokens\n# --- end hyperparameters ---\n"
    assert set_values(text, {"DEPTH": 3, "BATCH": 2**15}, {"_METAL": False}).split("\n")[1:3] == [
        "DEPTH = 4 if _METAL else 3", "BATCH = 2**15  # tokens"]


def _block_values(text: str, hardware: str) -> dict:
    ns: dict = {}
    exec(text.split("# --- hyperparameters ---")[1].split("# --- end hyperparameters ---")[0], {"HARDWARE": hardware}, ns)
    return ns


@pytest.mark.parametrize("trainer,hardware", [("train_cuda.py", h) for h in ("gpu", "small-gpu", "mps", "cpu")]
                         + [("train_mlx.py", h) for h in ("metal", "cpu")])
def test_flattening_keeps_every_value_in_effect_on_each_hardware(trainer, hardware):
    """The branch's first commit writes the block as one line per value in effect here: the same values as the
    per-hardware block gives on that hardware, each name once, no condition left, every other line untouched."""
    text = pristine.trainer(trainer).read_text()
    conds = conditions(parse_block(text))
    flat = flatten(text, {c: c == f'HARDWARE == "{hardware}"' for c in conds})
    block = flat.split("# --- hyperparameters ---")[1].split("# --- end hyperparameters ---")[0]
    assigned = [line.split(" = ")[0] for line in block.splitlines() if " = " in line and not line.startswith("#")]
    assert "if " not in block and len(assigned) == len(set(assigned))
    assert not any(line.startswith((" ", "\t")) for line in block.splitlines())
    assert _block_values(flat, "none") == _block_values(text, hardware)
    assert static_values(flat) == _block_values(text, hardware)  # read from the source alone, no probe
    before, after = text.split("# --- hyperparameters ---"), flat.split("# --- hyperparameters ---")
    assert before[0] == after[0] and before[1].split("# --- end hyperparameters ---")[1] == \
        after[1].split("# --- end hyperparameters ---")[1]
    assert flatten(flat, {}) is None  # already flat


def test_flattening_refuses_what_it_cannot_do_faithfully():
    text = pristine.trainer("train_cuda.py").read_text()
    conds = conditions(parse_block(text))
    assert flatten(text, {c: False for c in conds[1:]}) is None  # one condition's truth unknown
    code = text.replace("# --- end hyperparameters ---", "DEPTH = DEPTH + 1 if HARDWARE else DEPTH\n"
                        "# --- end hyperparameters ---", 1)
    assert flatten(code, {c: False for c in conds}) is None  # a line that is not a constant


# ------------------------------------------------------------------------------------------------
# local agent
# ------------------------------------------------------------------------------------------------


def _ctx(repo: Path, seen: set[str] | None = None, crash: CrashInfo | None = None) -> AgentContext:
    import prepare
    from sandbox import confine as sandbox
    from sandbox.workspace import Confinement

    host = SimpleNamespace(backend="cpu", device_name="cpu", reason="test")
    protocol = prepare.PROTOCOLS["tiny"]
    return AgentContext(repo=repo, trainer="train_cuda.py", host=host, protocol=protocol, history=[], best=2.0,
                        noise_floor=0.001, seen_hashes=set(seen or ()), crash=crash,
                        confine=Confinement(repo, "train_cuda.py", protocol, host, sandbox.detect()))


def _proposals(agent: LocalAgent, repo: Path, n: int, seen: set[str]) -> list[str]:
    trainer = repo / "train_cuda.py"
    out = []
    for _ in range(n):
        p = agent.propose(_ctx(repo, seen))
        assert p is not None
        text = trainer.read_text()
        out.append(p.description)
        seen.add(text_hash(text))
        trainer.write_text(FAKE_TRAINER)  # as if discarded
    return out


def test_local_agent_is_deterministic_and_never_repeats(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    first = _proposals(LocalAgent(seed=7), repo, 6, {text_hash(FAKE_TRAINER)})
    again = _proposals(LocalAgent(seed=7), repo, 6, {text_hash(FAKE_TRAINER)})
    other = _proposals(LocalAgent(seed=8), repo, 6, {text_hash(FAKE_TRAINER)})
    assert first == again and first != other
    assert len(set(first)) == 6
    # one hyperparameter at a time, edited on the line in effect on this host
    assert all(d.count("->") == 1 or "DEVICE_BATCH_SIZE" in d for d in first)
    seen = {text_hash(FAKE_TRAINER)}
    descriptions = _proposals(LocalAgent(seed=7), repo, 30, seen)
    assert len(seen) == 31  # 30 distinct trainers, none of them the one already run
    depth = [d for d in descriptions if d.startswith("DEPTH")]
    assert depth and all(d.startswith("DEPTH 2 ->") for d in depth)  # the cpu line, not the default 8
    # a trainer already run (hash from results.tsv) is never proposed again, even by a new agent
    agent = LocalAgent(seed=7)
    p = agent.propose(_ctx(repo, {text_hash(FAKE_TRAINER)} | set()))
    first_text = (repo / "train_cuda.py").read_text()
    (repo / "train_cuda.py").write_text(FAKE_TRAINER)
    p2 = LocalAgent(seed=7).propose(_ctx(repo, {text_hash(FAKE_TRAINER), text_hash(first_text)}))
    assert p2.description != p.description


def test_local_agent_keeps_batch_sizes_divisible(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    seen = {text_hash(FAKE_TRAINER)}
    agent = LocalAgent(seed=1)
    for _ in range(40):
        if agent.propose(_ctx(repo, seen)) is None:
            break
        text = (repo / "train_cuda.py").read_text()
        seen.add(text_hash(text))
        ns = _block_values(text, "cpu")
        total, dev = ns.get("TOTAL_BATCH_SIZE", 2**11), ns.get("DEVICE_BATCH_SIZE", 8)
        assert total % (dev * 256) == 0, text
        (repo / "train_cuda.py").write_text(FAKE_TRAINER)


# ------------------------------------------------------------------------------------------------
# Claude agent against a fake Messages API
# ------------------------------------------------------------------------------------------------


class FakeMessagesAPI:
    """A local HTTP server that answers POST /v1/messages with scripted (status, body, headers) replies
    and keeps the JSON requests it received."""

    def __init__(self, replies: list[tuple[int, dict, dict]]):
        self.replies = list(replies)
        self.requests: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                api.requests.append(body)
                status, reply, headers = api.replies.pop(0) if api.replies else error(
                    400, "invalid_request_error", "no scripted reply left")
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeMessagesAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def message(*blocks: dict, usage=(1000, 50, 0, 0), stop: str = "tool_use") -> tuple[int, dict, dict]:
    fresh, out, write, read = usage
    return 200, {"id": "msg_test", "type": "message", "role": "assistant", "model": "claude-sonnet-5-5",
                 "content": list(blocks), "stop_reason": stop, "stop_sequence": None,
                 "usage": {"input_tokens": fresh, "output_tokens": out, "cache_creation_input_tokens": write,
                           "cache_read_input_tokens": read}}, {}


_ids = iter(range(10**6))


def tool(name: str, **args) -> dict:
    return {"type": "tool_use", "id": f"toolu_{next(_ids)}", "name": name, "input": args}


def error(status: int, kind: str, text: str, **headers: str) -> tuple[int, dict, dict]:
    return status, {"type": "error", "error": {"type": kind, "message": text}}, headers


def _claude(repo: Path, url: str, monkeypatch, **kw) -> ClaudeAgent:
    import anthropic

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    client = anthropic.Anthropic(base_url=url, max_retries=kw.pop("sdk_retries", 2), timeout=20)
    return ClaudeAgent(repo, "train_cuda.py", client=client, model="claude-sonnet-5-5", backoff_s=0.01, **kw)


def test_cost_table():
    assert cost_usd("claude-sonnet-5-5", 1_000_000, 1_000_000, 1_000_000, 1_000_000) == pytest.approx(2 + 10 + 2.5 + 0.1)
    assert cost_usd("claude-haiku-4-5-20251001", 0, 1_000_000) == pytest.approx(5.0)  # dated id -> its alias
    assert cost_usd("claude-unknown-9", 10, 10) is None
    line = _row(agent_tokens_in=10, agent_tokens_out=5, agent_cost_usd=None).to_line().split("\t")
    assert line[R.COLUMNS.index("agent_cost_usd")] == ""  # unknown price: blank, not 0


def test_claude_agent_tool_use_and_caching(tiny_cache, tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    replies = [
        message({"type": "text", "text": "Let me look."}, tool("read_file", path="prepare.py"),
                usage=(100, 40, 5000, 0)),
        message(tool("read_file", path="loop.py"), tool("read_file", path="../../etc/passwd"), usage=(50, 30, 0, 5000)),
        message(tool("edit_trainer", old_string="MATRIX_LR = 0.04", new_string="MATRIX_LR = 0.05"),
                usage=(60, 30, 0, 5000)),
        message(tool("finish", description="raise MATRIX_LR\t0.04 -> 0.05\n(more signal)"), usage=(70, 20, 0, 5000)),
    ]
    with FakeMessagesAPI(replies) as api:
        agent = _claude(repo, api.url, monkeypatch)
        proposal = agent.propose(_ctx(repo))
    assert proposal.description == "raise MATRIX_LR 0.04 -> 0.05 (more signal)"
    assert "MATRIX_LR = 0.05" in (repo / "train_cuda.py").read_text()
    assert proposal.usage.tokens_in == 100 + 5000 + 50 + 5000 + 60 + 5000 + 70 + 5000
    assert proposal.usage.tokens_out == 120
    expected = cost_usd("claude-sonnet-5-5", 280, 120, 5000, 15000)
    assert proposal.usage.cost_usd == pytest.approx(expected) and expected > 0
    first = api.requests[0]
    assert first["model"] == "claude-sonnet-5-5" and "temperature" not in first and "tool_choice" not in first
    assert [t["name"] for t in first["tools"]] == ["read_file", "edit_trainer", "finish"]
    assert first["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "autoresearch" in first["system"][0]["text"]  # program.md is the system prompt
    trainer_block = first["messages"][0]["content"][0]
    assert trainer_block["cache_control"] == {"type": "ephemeral"} and "MATRIX_LR = 0.04" in trainer_block["text"]
    assert "Best val_bpb so far: 2.000000" in first["messages"][0]["content"][1]["text"]
    # tool results went back; reads outside the scope were refused
    results = {b["tool_use_id"]: b for m in api.requests[2]["messages"] if m["role"] == "user"
               for b in m["content"] if b.get("type") == "tool_result"}
    refused = [b for b in results.values() if b.get("is_error")]
    assert len(refused) == 2 and all("cannot read" in b["content"] for b in refused)
    assert any("def hand_over" in b["content"] for b in results.values() if not b.get("is_error"))
    marks = sum(1 for m in api.requests[3]["messages"] for b in m["content"] if isinstance(b, dict)
                and "cache_control" in b) + sum("cache_control" in b for b in api.requests[3]["system"])
    assert marks <= 4


def test_claude_agent_malformed_tool_input_and_crash_context(tiny_cache, tmp_path, monkeypatch):
    repo = make_repo(tmp_path)
    replies = [
        message(tool("edit_trainer", old_string=5)),
        message(tool("edit_trainer", old_string="SLEEP", new_string="X")),  # occurs four times
        message(tool("finish", description="done")),  # nothing changed yet
        message(tool("edit_trainer", old_string='MODE = "crash"', new_string='MODE = "ok"'),
                tool("finish", description="fix: undo the crash")),
    ]
    (repo / "train_cuda.py").write_text(FAKE_TRAINER.replace('MODE = "ok"', 'MODE = "crash"'))
    crash = CrashInfo("an idea", "crash: exit code 1", "RuntimeError: deliberate crash", "-MODE\n+MODE\n", 1, 2)
    with FakeMessagesAPI(replies) as api:
        proposal = _claude(repo, api.url, monkeypatch).propose(_ctx(repo, crash=crash))
    assert proposal.description == "fix: undo the crash"
    task = api.requests[0]["messages"][0]["content"][1]["text"]
    assert "RuntimeError: deliberate crash" in task and "fix attempt 1 of 2" in task
    errors = [b["content"] for r in api.requests[1:] for b in r["messages"][-1]["content"] if b.get("is_error")]
    assert "edit_trainer needs" in errors[0] and "occurs 4 times" in errors[1] and "not changed" in errors[2]
