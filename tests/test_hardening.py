"""The loop cannot be steered from the tree it works on, and keeps the user's secrets to itself.

- git: hooks, fsmonitor, replace objects, filters, textconv, external diff, a planted core.worktree
  and a `git` program planted in the tree are ignored by every git call the loop makes
  (research/gitrepo.py);
- refs: everything a run changes outside the work tree (branches, tags, replace refs, the stash,
  HEAD, .git/config, hooks) is put back and reported (Session.outside_state / put_back_outside);
- `loop.py try` drops a commit a killed experiment left without a row, keeping its change;
- Python: a json.py, argparse.py, numpy.py... beside loop.py, byte-code in __pycache__ or an extension
  module planted beside a locked module are never imported by the loop (sandbox/pyexec.py);
- secrets: the loop re-executes itself without credentials in its environment; the trainer finds the
  key nowhere (its environment, /proc/*/environ, /proc/*/cmdline), no file under the repository holds
  it, and the claude agent still authenticates with it (sandbox/secrets.py).

Run: `uv run pytest tests/test_hardening.py` (about a minute on a CPU, most of it the three tests that run
the loop with the stand-in trainer; no network, no API key; those three pass --no-sandbox, as they test
the loop's own defences, which must hold without the sandbox too).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import marshal
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_faults import seed
from test_loop import FAKE_TRAINER, FakeMessagesAPI, git, loop_env, make_repo, message, read_rows, run_loop, tool

from research import gitrepo
from research import results as R
from research.guards import hash_locked
from research.session import Session
from sandbox import pyexec, secrets

IDENT = ["-c", "user.name=t", "-c", "user.email=t@t"]


def small_repo(tmp_path: Path) -> Path:
    """A repository with a locked file (prepare.py), a locked folder and a trainer, one commit on main."""
    repo = tmp_path / "repo"
    (repo / "research").mkdir(parents=True)
    (repo / "prepare.py").write_text("REAL = 1\n")
    (repo / "research" / "x.py").write_text("x = 1\n")
    (repo / "train_cuda.py").write_text("A = 1\n")
    git_ = ["git", "-C", str(repo)]
    subprocess.run([*git_, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git_, "add", "-A"], check=True)
    subprocess.run([*git_, *IDENT, "commit", "-qm", "project"], check=True)
    return repo


def arm_traps(repo: Path, marks: Path) -> None:
    """Everything in a repository that could make git run a program: hooks, fsmonitor, clean/smudge
    filters and diff drivers named by an attributes file, an external diff. Each leaves a file in `marks`."""
    marks.mkdir()

    def program(name: str) -> str:
        p = marks.parent / f"{name}.sh"
        p.write_text(f"#!/bin/sh\ntouch {marks}/{name}\ncat\n")
        p.chmod(0o755)
        return str(p)

    for hook in ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-checkout",
                 "post-index-change", "reference-transaction", "pre-auto-gc", "post-rewrite"):
        p = repo / ".git" / "hooks" / hook
        p.write_text(f"#!/bin/sh\ntouch {marks}/hook-{hook}\n")
        p.chmod(0o755)
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("* filter=evil diff=evil\n")
    for key, name in [("core.fsmonitor", "fsmonitor"), ("filter.evil.clean", "clean"),
                      ("filter.evil.smudge", "smudge"), ("diff.evil.textconv", "textconv"),
                      ("diff.evil.command", "diffcmd"), ("diff.external", "external"), ("core.pager", "pager")]:
        git(repo, "config", key, program(name))
    git(repo, "config", "filter.evil.required", "true")


# ------------------------------------------------------------------------------------------------
# 1. git is not steerable from the repository
# ------------------------------------------------------------------------------------------------


def test_git_runs_no_hook_filter_or_fsmonitor_and_ignores_replace_objects(tmp_path):
    repo = small_repo(tmp_path)
    real = git(repo, "rev-parse", "HEAD:prepare.py")
    evil = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input="EVIL = 1\n",
                          capture_output=True, text=True, check=True).stdout.strip()
    git(repo, "replace", real, evil)  # plain git now shows the locked file as EVIL
    assert git(repo, "cat-file", "-p", "HEAD:prepare.py") == "EVIL = 1"
    marks = tmp_path / "marks"
    arm_traps(repo, marks)

    (repo / "train_cuda.py").write_text("A = 2\n")
    assert gitrepo.changed_paths(repo) == {"train_cuda.py": "M"}
    commit = gitrepo.commit_paths(repo, ["train_cuda.py"], "an experiment")
    assert gitrepo.head(repo) == commit and gitrepo.current_branch(repo) == "main"
    assert "+A = 2" in gitrepo.diff(repo, "HEAD~1")
    assert gitrepo.is_ancestor(repo, "HEAD~1", "HEAD") and gitrepo.is_repo(repo)
    real_hash = hashlib.sha256(b"REAL = 1\n").hexdigest()
    assert hash_locked(repo, "HEAD")["prepare.py"] == real_hash  # the blob itself, not its replacement
    assert hash_locked(repo)["prepare.py"] == real_hash
    gitrepo.reset_hard(repo, "HEAD~1")
    gitrepo.put_back_refs(repo, gitrepo.ref_state(repo))
    assert (repo / "train_cuda.py").read_text() == "A = 1\n"
    # the blob committed is the file's content, not what a clean filter would have made of it
    assert gitrepo.git(repo, "cat-file", "-p", f"{commit}:train_cuda.py") == "A = 2"
    assert sorted(os.listdir(marks)) == []

    # the traps are real: plain git springs them
    subprocess.run(["git", "-C", str(repo), *IDENT, "commit", "-q", "--allow-empty", "-m", "x"], capture_output=True)
    subprocess.run(["git", "-C", str(repo), "status"], capture_output=True)
    assert {"hook-pre-commit", "hook-post-commit", "fsmonitor"} <= set(os.listdir(marks))


def test_git_planted_in_the_repository_or_a_relative_path_entry_is_not_run(tmp_path, monkeypatch):
    repo = small_repo(tmp_path)
    marker = tmp_path / "ran"
    for folder in (repo, repo / "research"):
        fake = folder / "git"
        fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        fake.chmod(0o755)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", os.pathsep.join([".", "", str(repo / "research"), os.environ["PATH"]]))
    assert gitrepo.head(repo) and gitrepo.changed_paths(repo) == {"git": "U", "research/git": "U"}
    assert not marker.exists()


def test_git_work_tree_is_pinned_to_the_repository(tmp_path):
    """A core.worktree planted in .git/config would send the loop's reset into another folder."""
    repo = small_repo(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / "train_cuda.py").write_text("A = 2\n")
    gitrepo.commit_paths(repo, ["train_cuda.py"], "an experiment")
    git(repo, "config", "core.worktree", str(elsewhere))
    assert not gitrepo.is_repo(repo)  # the loop refuses to start on such a repository
    gitrepo.reset_hard(repo, "HEAD~1")
    assert (repo / "train_cuda.py").read_text() == "A = 1\n"
    assert list(elsewhere.iterdir()) == []


def test_git_env_carries_no_secret_or_git_redirect(tmp_path, monkeypatch):
    repo = small_repo(tmp_path)
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(tmp_path / "index"))
    monkeypatch.setenv("SOME_API_TOKEN", "tok-123456789")
    calls = []
    real_run = subprocess.run

    def spy(cmd, *args, **kw):
        calls.append((cmd, kw.get("env")))
        return real_run(cmd, *args, **kw)

    monkeypatch.setattr(gitrepo.subprocess, "run", spy)
    assert gitrepo.head(repo) and gitrepo.changed_paths(repo) == {}  # GIT_DIR / GIT_INDEX_FILE were not used
    for cmd, env in calls:
        assert "SOME_API_TOKEN" not in env and "GIT_DIR" not in env and "GIT_INDEX_FILE" not in env
        assert env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_NO_REPLACE_OBJECTS"] == "1"
        assert os.path.isabs(cmd[0]) and cmd[1:3] == ["--no-pager", "--no-replace-objects"]
        assert {"core.hooksPath=/dev/null", "core.fsmonitor=false", "commit.gpgsign=false",
                "core.untrackedCache=false"} <= set(cmd)


# ------------------------------------------------------------------------------------------------
# 2. every ref compared around a run
# ------------------------------------------------------------------------------------------------


def test_refs_hooks_and_config_changed_by_a_run_are_put_back(tmp_path):
    repo = small_repo(tmp_path)
    git(repo, "tag", "v0")
    git(repo, "checkout", "-q", "-b", "autoresearch/x")
    (repo / "train_cuda.py").write_text("A = 2\n")
    git(repo, *IDENT, "commit", "-qam", "kept experiment")
    results = repo / "results.tsv"
    results.write_text("commit\tval_bpb\n")
    s = SimpleNamespace(repo=repo, results_path=results)
    before = Session.outside_state(s)
    refs_before = git(repo, "for-each-ref", "--format=%(refname) %(objectname)")
    config_before = (repo / ".git" / "config").read_bytes()
    assert Session.put_back_outside(s, before) is None  # nothing changed: nothing to say

    # the "run": another branch rewritten, a tag added and one deleted, a replace ref, a stash, a commit
    # on the checked-out branch, HEAD moved to another branch, a hook and a config setting planted
    blob = git(repo, "rev-parse", "HEAD:prepare.py")
    evil = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", "--stdin"], input="EVIL = 1\n",
                          capture_output=True, text=True, check=True).stdout.strip()
    git(repo, "replace", blob, evil)
    git(repo, "tag", "mine")
    git(repo, "tag", "-d", "v0")
    (repo / "train_cuda.py").write_text("A = 3\n")
    git(repo, *IDENT, "stash", "-q")
    git(repo, *IDENT, "commit", "-q", "--allow-empty", "-m", "checkpoint")
    git(repo, "checkout", "-q", "main")
    git(repo, *IDENT, "commit", "-q", "--allow-empty", "-m", "rewritten main")
    (repo / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\ntouch /tmp/pwned\n")
    git(repo, "config", "core.fsmonitor", "/tmp/fsmonitor.sh")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "attributes").write_text("* filter=evil\n")
    git(repo, "update-ref", "refs/notes/x", "HEAD")
    results.write_text("commit\tval_bpb\nabc1234\t0.1\n")

    said = Session.put_back_outside(s, before)
    assert said.startswith("the checked-out branch, the git history, refs (")
    for part in ("refs/heads/main moved", "refs/tags/mine added", "refs/tags/v0 deleted", "refs/replace/",
                 "refs/stash added", "git settings (", "config", "hooks/pre-commit", "info/attributes",
                 "results.tsv"):
        assert part in said, said
    assert git(repo, "for-each-ref", "--format=%(refname) %(objectname)") == refs_before
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/autoresearch/x"
    assert git(repo, "log", "-1", "--format=%s") == "kept experiment"
    assert git(repo, "status", "--porcelain", "-uno") == "" and (repo / "train_cuda.py").read_text() == "A = 2\n"
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()
    assert (repo / ".git" / "config").read_bytes() == config_before
    assert not (repo / ".git" / "info" / "attributes").exists()
    assert results.read_text() == "commit\tval_bpb\n"
    assert Session.put_back_outside(s, before) is None


def test_deleted_branch_and_detached_head_are_put_back(tmp_path):
    repo = small_repo(tmp_path)
    git(repo, "checkout", "-q", "-b", "autoresearch/y")
    s = SimpleNamespace(repo=repo, results_path=repo / "results.tsv")
    before = Session.outside_state(s)
    git(repo, "checkout", "-q", "--detach", "HEAD")
    git(repo, "branch", "-D", "autoresearch/y")
    said = Session.put_back_outside(s, before)
    assert said == "the checked-out branch, the git history"
    assert git(repo, "symbolic-ref", "--short", "HEAD") == "autoresearch/y"
    assert git(repo, "status", "--porcelain") == ""


# ------------------------------------------------------------------------------------------------
# 3. `loop.py try` drops a commit that never got a row
# ------------------------------------------------------------------------------------------------


def decided(repo: Path, prior) -> list[R.Row]:
    """The rows added since `prior` that decide (a confirming re-measurement adds a `rerun` row)."""
    return [r for r in read_rows(repo)[prior.rows:] if r.status != "rerun"]


@pytest.mark.slow  # an end-to-end run through loop.py (CI runs the slow set)
def test_try_drops_a_commit_a_killed_experiment_left(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "tk")  # the stand-in at VAL_BPB 2.0, as the best runs again next to a promising change
    trainer = repo / "train_cuda.py"
    trainer.write_text(FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    git(repo, *IDENT, "commit", "-qam", "lower it")  # committed by a `try` that was then killed
    proc = run_loop(repo, "try", "--no-sandbox", "lower it", env=loop_env(tiny_cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dropped 1 commit(s) after" in proc.stdout and "back in train_cuda.py, uncommitted" in proc.stdout
    rows = decided(repo, prior)
    assert [(r.status, r.hyperparams["VAL_BPB"]) for r in rows] == [("keep", 1.5)]
    assert git(repo, "rev-parse", "HEAD~1") == prior.kept and git(repo, "status", "--porcelain") == ""

    # the same, while the trainer holds another uncommitted edit: that one runs (and crashes, which is
    # quicker), the dropped one is saved under runs/
    kept = git(repo, "rev-parse", "HEAD")
    trainer.write_text(FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.2"))
    git(repo, *IDENT, "commit", "-qam", "lower it more")
    edit = FAKE_TRAINER.replace("VAL_BPB = 2.0", "VAL_BPB = 1.3").replace('MODE = "ok"', 'MODE = "crash"')
    trainer.write_text(edit)
    proc = run_loop(repo, "try", "--no-sandbox", "lower it a bit", env=loop_env(tiny_cache))
    assert proc.returncode == 1 and "CRASH" in proc.stdout, proc.stdout + proc.stderr
    (patch,) = (repo / "runs").glob("unfinished-*.patch")
    assert f"saved in runs/{patch.name}" in proc.stdout
    assert "+VAL_BPB = 1.2" in patch.read_text()
    rows = decided(repo, prior)
    assert [(r.status, r.hyperparams["VAL_BPB"]) for r in rows] == [("keep", 1.5), ("crash", 1.3)]
    assert git(repo, "rev-parse", "HEAD") == kept and trainer.read_text() == edit  # the edit waits for a fix


def test_without_a_sandbox_a_verdict_planted_for_the_waiting_harness_is_refused(tiny_cache, tmp_path):
    """The harness is started before the trainer, its directory beside the trainer's workspace. A sandboxed
    trainer cannot reach it; one run with --no-sandbox can, so the loop checks that the directory holds
    nothing but the harness's own before telling it to score, and rejects the run otherwise."""
    repo = make_repo(tmp_path)
    prior = seed(repo, "verdict")
    plant = (
        "    import glob as _glob\n"
        "    for _d in _glob.glob(os.path.dirname(os.environ['AUTORESEARCH_HANDOVER']) + '-judge-*'):\n"
        "        open(os.path.join(_d, 'result.json'), 'w').write(json.dumps({'valid': True, 'val_bpb': 0.1}))\n"
        "        print('planted in ' + _d, flush=True)\n"
        "    p = prepare.get_protocol()\n")
    assert "    p = prepare.get_protocol()\n" in FAKE_TRAINER
    (repo / "train_cuda.py").write_text(FAKE_TRAINER.replace("    p = prepare.get_protocol()\n", plant, 1))
    proc = run_loop(repo, "try", "--no-sandbox", "plant a verdict", env=loop_env(tiny_cache))
    rows = decided(repo, prior)
    assert [r.status for r in rows] == ["rejected"], proc.stdout + proc.stderr
    assert "the harness's directory was written to during the run (result.json)" in rows[0].note
    (run_dir,) = [repo / "runs" / str(rows[0].run)]
    assert "planted in " in (run_dir / "log.txt").read_text()  # the attempt did reach it
    assert rows[0].val_bpb == 0.0


# ------------------------------------------------------------------------------------------------
# 4. Python cannot be shadowed from the tree
# ------------------------------------------------------------------------------------------------


def _plant(repo: Path, marks: Path) -> None:
    """Modules beside loop.py that shadow the standard library and installed packages, byte-code for a
    locked module in its __pycache__, and a broken extension module beside another."""
    for name in ("json", "argparse", "subprocess", "signal", "numpy", "__future__", "dataclasses", "anthropic"):
        (repo / f"{name}.py").write_text(f"open({str(marks / name)!r}, 'w').close()\n")
    source = repo / "research" / "console.py"
    code = compile(f"open({str(marks / 'pyc')!r}, 'w').close()\n", str(source), "exec")
    st = source.stat()
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(exist_ok=True)
    header = importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + \
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    pyc.write_bytes(header + marshal.dumps(code))  # passes the mtime/size check against console.py
    ext = importlib.machinery.EXTENSION_SUFFIXES[0]
    (repo / "research" / f"results{ext}").write_bytes(b"not an extension module")


def test_tree_cannot_shadow_python_modules(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    _plant(repo, marks)
    env = loop_env(tiny_cache)
    env.pop("PYTHONDONTWRITEBYTECODE")
    # the traps are real: Python started the ordinary way in the repository springs them
    subprocess.run([sys.executable, "-c", "import json, research.console"], cwd=repo, env=env, capture_output=True)
    assert {"json", "pyc"} <= set(os.listdir(marks))
    for f in marks.iterdir():
        f.unlink()

    proc = run_loop(repo, "--help", env=env)
    assert proc.returncode == 0 and "usage: loop.py" in proc.stdout, proc.stderr
    proc = run_loop(repo, "report", env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert sorted(os.listdir(marks)) == []


def test_python_argv_and_launcher(tmp_path):
    argv = pyexec.python_argv(["x.py", "a"])
    assert argv[:2] == [sys.executable, "-I"] and argv[-2:] == ["x.py", "a"]
    repo = tmp_path / "r"
    repo.mkdir()
    (repo / "helper.py").write_text("VALUE = 'from the repo'\n")
    (repo / "json.py").write_text("raise SystemExit('the planted json.py ran')\n")
    (repo / "script.py").write_text("import json, sys\nimport helper\nprint(json.dumps([helper.VALUE, sys.argv[1:], "
                                    "sys.flags.isolated]))\n")
    out = subprocess.run(pyexec.script_argv(repo / "script.py", "x", root=repo), cwd=repo, capture_output=True,
                         text=True, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(repo)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["from the repo", ["x"], 1]
    code = pyexec.preamble(repo) + "import json, helper; print(helper.VALUE)"
    out = subprocess.run(pyexec.python_argv(["-c", code]), cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "from the repo", out.stderr
    # a module planted beside a package of the same name (or the reverse) is refused, neither runs
    (repo / "pkg").mkdir()
    (repo / "pkg" / "__init__.py").write_text("print('package')\n")
    (repo / "pkg.py").write_text("print('module')\n")
    code = pyexec.preamble(repo) + "import pkg"
    out = subprocess.run(pyexec.python_argv(["-c", code]), cwd=repo, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == "" and "one of them was put there" in out.stderr


# ------------------------------------------------------------------------------------------------
# 5. secrets
# ------------------------------------------------------------------------------------------------

# The stand-in trainer, but first looking for the loop's key everywhere it can: its environment, its
# parent's and every other process's environment and command line. It reports what it saw (`loot` in
# LOOT_DIR, its log), names what it found in its run facts (so a row would carry it), and waits for `release`
# there. The directory and the key's length and SHA-256 are written into its text (`thief`; never the key,
# which no file may hold): its environment holds the loop's allow-list only. It looks for that key alone,
# the unique one the test gives the loop, so a key of the user's own (an ANTHROPIC_API_KEY exported in the
# shell that runs pytest, in that shell's and pytest's environment) is not taken for a leak.
THIEF = FAKE_TRAINER.replace("def main():\n", '''def holds_key(text):
    import hashlib
    i = text.find("sk-ant-")
    while i >= 0:
        if hashlib.sha256(text[i:i + KEY_LENGTH].encode()).hexdigest() == KEY_SHA256:
            return True
        i = text.find("sk-ant-", i + 1)
    return False


def steal():
    import glob
    found, read = [], 0
    found += [v for v in os.environ.values() if holds_key(v)]
    for path in glob.glob("/proc/[0-9]*/environ") + glob.glob("/proc/[0-9]*/cmdline"):
        try:
            data = open(path, "rb").read().decode(errors="replace")
        except OSError:
            continue
        read += 1
        found += [part for part in data.split("\\0") if holds_key(part)]
    try:
        parent = open(f"/proc/{os.getppid()}/environ", "rb").read().decode(errors="replace")
    except OSError:
        parent = ""
    return found, read, parent


def main():
    found, read, parent = steal()
    with open(os.path.join(LOOT_DIR, "loot"), "w") as f:
        json.dump({"found": found, "read": read, "parent_seen": "AUTORESEARCH_" in parent}, f)
    print("loot:", found, flush=True)
    with open(os.path.join(LOOT_DIR, "started"), "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(os.path.join(LOOT_DIR, "release")):
        time.sleep(0.05)
''', 1).replace('"device": "fake cpu"', '"device": "fake cpu " + " ".join(steal()[0])')
assert "def holds_key(text)" in THIEF and "def steal()" in THIEF and "steal()[0]" in THIEF


def thief(tmp_path: Path, key: str) -> str:
    """THIEF reporting to (and released from) `tmp_path`, looking for `key` (known to it by length and hash)."""
    known = (f"LOOT_DIR = {str(tmp_path)!r}\nKEY_LENGTH = {len(key)}\n"
             f"KEY_SHA256 = {hashlib.sha256(key.encode()).hexdigest()!r}\n\n\n")
    return THIEF.replace("def holds_key(text):\n", known + "def holds_key(text):\n", 1)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def _files_with(root: Path, needle: bytes) -> list[str]:
    hits = []
    for base, _, files in os.walk(root):
        for f in files:
            p = Path(base) / f
            try:
                if needle in p.read_bytes():
                    hits.append(str(p.relative_to(root)))
            except OSError:
                pass
    return hits


def _run_thief(repo: Path, args: list[str], env: dict, tmp_path: Path, key: str) -> subprocess.CompletedProcess:
    started, release = tmp_path / "started", tmp_path / "release"
    out, err = open(tmp_path / "out.txt", "w+"), open(tmp_path / "err.txt", "w+")
    loop = subprocess.Popen([sys.executable, "loop.py", *args], cwd=repo, env=env, stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert loop.poll() is None, Path(tmp_path / "err.txt").read_text()
            assert time.monotonic() < deadline, "the trainer did not start"
            time.sleep(0.05)
        # while the trainer runs: the loop (same pid, re-executed) and everything under it hold no key
        for pid in [loop.pid, *_descendants(loop.pid)]:
            for what in ("environ", "cmdline"):
                try:
                    data = Path(f"/proc/{pid}/{what}").read_bytes()
                except OSError:
                    continue
                assert key.encode() not in data, f"/proc/{pid}/{what} holds the key"
        assert b"-I" in Path(f"/proc/{loop.pid}/cmdline").read_bytes().split(b"\0")
        release.touch()
        loop.wait(timeout=120)
    finally:
        release.touch()
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(loop.args, loop.returncode, out.read(), err.read())


@pytest.mark.slow  # about 25 s: the default set stays under 8 minutes (CI runs it)
def test_trainer_finds_no_key_and_no_file_holds_it(tiny_cache, tmp_path):
    key = f"sk-ant-dummy-{uuid.uuid4().hex}"
    other = f"hf_{uuid.uuid4().hex}"
    repo = make_repo(tmp_path, thief(tmp_path, key))
    prior = seed(repo, "thief")
    (repo / "train_cuda.py").write_text(thief(tmp_path, key).replace("VAL_BPB = 2.0", "VAL_BPB = 1.5"))
    env = loop_env(tiny_cache, ANTHROPIC_API_KEY=key, HF_TOKEN=other)
    proc = _run_thief(repo, ["try", "--no-sandbox", f"lower it; the key is {key}"], env, tmp_path, key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = decided(repo, prior)
    assert row.status == "keep" and row.description == "lower it; the key is [redacted]"
    loot = json.loads((tmp_path / "loot").read_text())
    assert loot["found"] == [] and loot["read"] > 0 and loot["parent_seen"]  # it could look, it found nothing
    assert key not in proc.stdout + proc.stderr
    for needle in (key, other):
        assert _files_with(repo, needle.encode()) == []


@pytest.mark.slow  # about 25 s: the default set stays under 8 minutes (CI runs it)
def test_claude_agent_gets_the_key_privately(tiny_cache, tmp_path):
    key = f"sk-ant-dummy-{uuid.uuid4().hex}"
    repo = make_repo(tmp_path, thief(tmp_path, key))
    prior = seed(repo, "claude")
    replies = [message(tool("edit_trainer", old_string="VAL_BPB = 2.0", new_string="VAL_BPB = 1.8")),
               message(tool("finish", description="smaller fake loss"))]
    with FakeMessagesAPI(replies) as api:
        headers: list[dict] = []
        handler = api.server.RequestHandlerClass

        class Spy(handler):
            def do_POST(self):
                headers.append({k.lower(): v for k, v in self.headers.items()})
                super().do_POST()

        api.server.RequestHandlerClass = Spy
        env = loop_env(tiny_cache, ANTHROPIC_API_KEY=key, ANTHROPIC_BASE_URL=api.url)
        proc = _run_thief(repo, ["run", "--no-sandbox", "--tag", "claude", "--baseline-runs", "1",
                                 "--max-experiments", "1"], env, tmp_path, key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "agent claude" in proc.stdout
    # the key went out with every request (as x-api-key, or as a bearer token in newer clients)
    sent = [h.get("x-api-key") or h.get("authorization", "").removeprefix("Bearer ") for h in headers]
    assert len(sent) == 2 and set(sent) == {key}
    (row,) = decided(repo, prior)
    assert row.status == "keep" and row.hyperparams["VAL_BPB"] == 1.8
    assert _files_with(repo, key.encode()) == []
    loot = json.loads((tmp_path / "loot").read_text())
    assert loot["found"] == [] and loot["parent_seen"]


def test_redact_and_rows():
    key = f"sk-ant-api03-{uuid.uuid4().hex}"
    secrets.remember({"SOME_TOKEN": "tok-0123456789", "SHORT_PASSWORD": "pw"})
    assert secrets.redact(f"a {key} b tok-0123456789 c pw") == "a [redacted] b [redacted] c pw"
    row = R.Row(commit="abc1234", val_bpb=1.0, memory_gb=0.0, status="keep", description=f"uses {key}",
                note="tok-0123456789", hyperparams={"X": key})
    line = row.to_line()
    assert key not in line and "tok-0123456789" not in line and line.count("[redacted]") == 3
    assert row.description == "uses [redacted]"


def test_handoff_keeps_secrets_out_of_the_environment(tmp_path):
    """The re-execution on its own: a script calling secrets.isolate() sees the key in memory only."""
    key = f"sk-ant-dummy-{uuid.uuid4().hex}"
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.append({str(pyexec.ROOT)!r})\n"
        "from sandbox import secrets\n"
        "secrets.isolate(os.path.realpath(__file__), sys.argv[1:])\n"
        "env = open('/proc/self/environ', 'rb').read()\n"
        "print(repr((secrets.get('ANTHROPIC_API_KEY'), b'sk-ant-' in env, 'ANTHROPIC_API_KEY' in os.environ,\n"
        "            sys.flags.isolated, sys.argv[1:], secrets.HANDOFF_ENV in os.environ)))\n")
    env = {"PATH": os.environ["PATH"], "ANTHROPIC_API_KEY": key, "BIG_SECRET": "x" * 20000}
    out = subprocess.run([sys.executable, str(script), "a b"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr((key, False, False, 1, ["a b"], False))
