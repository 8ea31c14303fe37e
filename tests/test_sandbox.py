"""The trainer sandbox (sandbox/confine.py) against real confined processes.

Run: `.venv/bin/python -m pytest tests/test_sandbox.py -q` (about 10 s; most of it is importing torch).

Each Linux kind ("bwrap", "landlock") runs every behavioural test and is skipped, with the reason,
where this host cannot provide it. A small child (`python -I -c ...`) tries one thing per line
and prints `label OK value` or `label ERR ExceptionName`; the tests read those lines. The layout
imitates the repository and the data cache: the child may read some files, and the files next to
them (a validation shard, .git, runs/, results.tsv) hold markers that must never reach its output.
The Seatbelt tests check the generated profile's text and always run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest

from sandbox import confine as sandbox
from sandbox import seatbelt
from sandbox.confine import SandboxError, SandboxPolicy

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-dummy-" + uuid.uuid4().hex[:8]
MARKERS = {"val": "VALSHARD-MARKER", "git": "GITCONFIG-MARKER", "runs": "RUNLOG-MARKER",
           "results": "RESULTS-MARKER"}


def _kind(name: str):
    ok = sandbox._available(name)
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name} is not available here"))


LINUX_KINDS = [_kind("bwrap"), _kind("landlock")]

PRELUDE = """\
import os, sys
def t(label, fn):
    try:
        print(label, "OK", repr(fn()), flush=True)
    except BaseException as e:
        print(label, "ERR", type(e).__name__, flush=True)
"""


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sandbox")
    repo, tokens = root / "repo", root / "cache" / "tiny" / "tokens" / "abc"
    files = {
        repo / "prepare.py": "PREPARE-OK",
        repo / "backends" / "__init__.py": "NAME = 'backends-ok'\n",
        repo / ".git" / "config": MARKERS["git"],
        repo / "runs" / "old" / "run.log": MARKERS["runs"],
        repo / "results.tsv": MARKERS["results"],
        root / "cache" / "tiny" / "tokenizer" / "tokenizer.pkl": "TOKENIZER-OK",
        tokens / "shard_00000.tokens.npy": "TRAINSHARD-OK",
        tokens / "shard_00005.tokens.npy": MARKERS["val"],
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    train_shard, val_shard = tokens / "shard_00000.tokens.npy", tokens / "shard_00005.tokens.npy"
    (repo / "train_cuda.py").write_text(textwrap.dedent(f"""\
        import backends
        print("import", backends.NAME)
        print("prepare", open("prepare.py").read())
        print("shard", open({str(train_shard)!r}).read())
        print("tokenizer", open({str(root / 'cache/tiny/tokenizer/tokenizer.pkl')!r}).read())
        """))
    return {"root": root, "repo": repo, "train": train_shard, "val": val_shard}


@pytest.fixture
def policy(layout: dict[str, Path], tmp_path: Path) -> SandboxPolicy:
    (tmp_path / "run").mkdir()
    (tmp_path / "tmp").mkdir()
    repo = layout["repo"]
    return SandboxPolicy(
        cwd=repo,
        read_paths=[repo / "prepare.py", repo / "backends", repo / "train_cuda.py",
                    layout["root"] / "cache" / "tiny" / "tokenizer", layout["train"]],
        write_paths=[tmp_path / "run", tmp_path / "tmp"],
    )


def allowed_env(policy: SandboxPolicy) -> dict[str, str]:
    tmp = str(policy.write_paths[1])
    return {"PATH": "/usr/bin:/bin", "TMPDIR": tmp, "HOME": tmp, "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1"}


def run_sandboxed(kind: str, policy: SandboxPolicy, code: str | None = None,
                  argv: list[str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = argv or [sys.executable, "-I", "-c", PRELUDE + textwrap.dedent(code or "")]
    cmd, preexec = sandbox.wrap(kind, argv, policy)
    return subprocess.run(cmd, preexec_fn=preexec, env=allowed_env(policy), cwd=policy.cwd,
                          start_new_session=True, capture_output=True, text=True, timeout=timeout)


def results(proc: subprocess.CompletedProcess) -> dict[str, str]:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        label, _, rest = line.partition(" ")
        out[label] = rest
    return out


def denied(value: str) -> bool:
    return value.startswith("ERR ")


# --- filesystem -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_trainer_imports_from_the_repo_and_reads_allowed_files(kind: str, policy: SandboxPolicy) -> None:
    proc = run_sandboxed(kind, policy, argv=[sys.executable, "train_cuda.py"])
    assert proc.returncode == 0, proc.stderr
    for expected in ("import backends-ok", "prepare PREPARE-OK", "shard TRAINSHARD-OK",
                     "tokenizer TOKENIZER-OK"):
        assert expected in proc.stdout


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_siblings_and_private_repo_files_stay_out_of_reach(kind: str, policy: SandboxPolicy,
                                                           layout: dict[str, Path]) -> None:
    targets = {"val": layout["val"], "git": layout["repo"] / ".git" / "config",
               "runs": layout["repo"] / "runs" / "old" / "run.log",
               "results": layout["repo"] / "results.tsv", "shadow": Path("/etc/shadow"),
               "home": Path.home() / ".bashrc"}
    code = "\n".join(f"t('read-{k}', lambda: open({str(p)!r}).read())" for k, p in targets.items())
    code += "\nt('list-runs', lambda: os.listdir('runs'))"
    code += "\nt('exists', lambda: [os.path.exists(p) for p in ('.git', 'runs', 'results.tsv')])"
    proc = run_sandboxed(kind, policy, code)
    got = results(proc)
    for key in targets:
        assert denied(got[f"read-{key}"]), (key, got[f"read-{key}"])
    assert not any(marker in proc.stdout + proc.stderr for marker in MARKERS.values())
    if kind == "bwrap":  # shown path by path: what is not allowed is not there at all
        assert denied(got["list-runs"])
        assert got["exists"] == "OK [False, False, False]"
    else:  # Landlock's known limit: below a directory Python imports from, names are listable
        assert got["list-runs"] == "OK ['old']"


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_read_paths_site_packages_and_host_tmp_are_not_writable(kind: str, policy: SandboxPolicy,
                                                                 layout: dict[str, Path]) -> None:
    repo = layout["repo"]
    site = Path(sysconfig.get_paths()["purelib"])
    planted = site / f"zz-sandbox-test-{uuid.uuid4().hex[:8]}.pth"
    escape = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex[:8]}"
    code = f"""
        t('append-prepare', lambda: open('prepare.py', 'a').write('x'))
        t('truncate-prepare', lambda: os.truncate('prepare.py', 0))
        t('unlink-prepare', lambda: os.unlink('prepare.py'))
        t('new-module', lambda: open('backends/evil.py', 'w').write('x'))
        t('shadow-stdlib', lambda: open('json.py', 'w').write('x'))
        t('plant-pth', lambda: open({str(planted)!r}, 'w').write('# harmless\\n'))
        t('host-tmp', lambda: open({str(escape)!r}, 'w').write('x'))
        """
    try:
        got = results(run_sandboxed(kind, policy, code))
    finally:
        planted.unlink(missing_ok=True)
        escape.unlink(missing_ok=True)
    for label in ("append-prepare", "truncate-prepare", "unlink-prepare", "new-module",
                  "shadow-stdlib", "plant-pth"):
        assert denied(got[label]), (label, got[label])
    assert (repo / "prepare.py").read_text() == "PREPARE-OK"
    assert not (repo / "backends" / "evil.py").exists() and not (repo / "json.py").exists()
    if kind == "bwrap":
        assert got["host-tmp"].startswith("OK")  # its own tmpfs, gone with the run
    else:
        assert denied(got["host-tmp"])


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_write_paths_are_writable(kind: str, policy: SandboxPolicy) -> None:
    run, tmp = policy.write_paths
    code = f"""
        t('write', lambda: open({str(run / 'out.txt')!r}, 'w').write('written'))
        t('mkdir', lambda: os.makedirs({str(run / 'a' / 'b')!r}))
        t('rename', lambda: os.rename({str(run / 'out.txt')!r}, {str(run / 'a' / 'moved.txt')!r}))
        t('tempfile', lambda: __import__('tempfile').mkstemp()[1].startswith({str(tmp)!r}))
        """
    got = results(run_sandboxed(kind, policy, code))
    assert all(v.startswith("OK") for v in got.values()), got
    assert got["tempfile"] == "OK True"
    assert (run / "a" / "moved.txt").read_text() == "written"


# --- processes, secrets, network --------------------------------------------------------------

RUNNER = """\
import json, os, subprocess, sys, tempfile, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from sandbox import confine as sandbox
spec = json.loads(sys.argv[1])
def alive():
    found = []
    for d in os.listdir("/proc"):
        try:
            if (d.isdigit() and int(d) != os.getpid()
                    and spec["token"].encode() in open(f"/proc/{{d}}/cmdline", "rb").read()):
                found.append(int(d))
        except OSError:
            pass
    return found
sandbox.become_subreaper()
policy = sandbox.SandboxPolicy(cwd=Path(spec["cwd"]), read_paths=[Path(p) for p in spec["read"]],
                               write_paths=[Path(p) for p in spec["write"]])
argv = [a.replace("HELPER_PID", str(os.getpid())) for a in spec["argv"]]
cmd, preexec = sandbox.wrap(spec["kind"], argv, policy)
with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # a log file, as the loop
    proc = subprocess.run(cmd, preexec_fn=preexec, env=spec["env"], cwd=spec["cwd"],
                          start_new_session=True, stdout=out, stderr=err, timeout=120)
    out.seek(0), err.seek(0)
    stdout, stderr = out.read().decode(), err.read().decode()
deadline = time.monotonic() + spec["grace"]
while alive() and time.monotonic() < deadline:
    time.sleep(0.05)
after_run = alive()
killed = sandbox.kill_orphans(set())
print(json.dumps({{"stdout": stdout, "stderr": stderr, "rc": proc.returncode,
                  "after_run": after_run, "killed": killed, "after_kill": alive()}}))
"""


def run_through_runner(kind: str, policy: SandboxPolicy, code: str, token: str = "-",
                       grace: float = 0.0, runner_env: dict[str, str] | None = None) -> dict:
    """Run `code` sandboxed from a separate process acting as the loop (subreaper, own env)."""
    spec = {"kind": kind, "cwd": str(policy.cwd), "read": [str(p) for p in policy.read_paths],
            "write": [str(p) for p in policy.write_paths], "env": allowed_env(policy),
            "argv": [sys.executable, "-I", "-c", PRELUDE + textwrap.dedent(code), token],
            "token": token, "grace": grace}
    proc = subprocess.run([sys.executable, "-I", "-c", RUNNER.format(repo=str(REPO)), json.dumps(spec)],
                          env={**(runner_env or {}), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_other_processes_environments_are_unreadable(kind: str, policy: SandboxPolicy) -> None:
    code = f"""
        t('parent-environ', lambda: open(f'/proc/{{os.getppid()}}/environ').read())
        t('loop-environ', lambda: open('/proc/HELPER_PID/environ').read())
        t('test-environ', lambda: open('/proc/{os.getpid()}/environ').read())
        t('own-status', lambda: open('/proc/self/status').read()[:5])
        def sweep():
            hits = []
            for d in os.listdir('/proc'):
                try:
                    if {SECRET!r} in open(f'/proc/{{d}}/environ').read():
                        hits.append(d)
                except OSError:
                    pass
            return hits
        t('sweep', sweep)
        """
    out = run_through_runner(kind, policy, code, runner_env={"ANTHROPIC_API_KEY": SECRET})
    assert out["rc"] == 0, out["stderr"]
    assert SECRET not in out["stdout"] + out["stderr"]
    got = dict(line.partition(" ")[::2] for line in out["stdout"].splitlines())
    assert denied(got["loop-environ"]) and denied(got["test-environ"])
    if kind == "landlock":  # its parent is the process holding the key (under bwrap: bwrap's init)
        assert denied(got["parent-environ"])
    assert got["own-status"] == "OK 'Name:'"  # what Python and torch read about themselves
    assert got["sweep"] in ("OK []", "ERR PermissionError")


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_no_network_to_the_host(kind: str, policy: SandboxPolicy) -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        code = f"""
            import socket
            t('tcp', lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=3))
            t('udp', lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(
                b'leak', ('127.0.0.1', {udp.getsockname()[1]})))
            """
        got = results(run_sandboxed(kind, policy, code))
        tcp.settimeout(0.2)
        udp.settimeout(0.2)
        with pytest.raises(TimeoutError):
            tcp.accept()
        with pytest.raises(TimeoutError):
            udp.recvfrom(16)
    assert denied(got["tcp"])


ORPHAN = """
    import time
    marker, token = {marker!r}, sys.argv[1]
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, '-c',
                     f'open({{marker!r}}, "w").write("up"); import time; time.sleep(60)', token])
        os._exit(0)
    os.wait()
    deadline = time.time() + 30
    while not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.02)
    t('orphan-started', lambda: os.path.exists(marker))
    """


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_a_setsid_orphan_does_not_outlive_its_run(kind: str, policy: SandboxPolicy) -> None:
    token = f"orphan-{uuid.uuid4().hex}"
    code = ORPHAN.format(marker=str(policy.write_paths[0] / "orphan-up"))
    try:
        out = run_through_runner(kind, policy, code, token=token, grace=5 if kind == "bwrap" else 0)
    finally:
        _kill_token(token)
    assert "orphan-started OK True" in out["stdout"], out
    if kind == "bwrap":
        assert out["after_run"] == []  # the PID namespace went with bwrap
    else:
        assert out["after_run"] and set(out["after_run"]) <= set(out["killed"])
    assert out["after_kill"] == []


def _kill_token(token: str) -> None:
    for d in os.listdir("/proc"):
        try:
            if (d.isdigit() and int(d) != os.getpid()
                    and token.encode() in Path(f"/proc/{d}/cmdline").read_bytes()):
                os.kill(int(d), signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.parametrize("kind", [_kind("landlock")])
def test_landlock_seccomp_refuses_keyring_and_io_uring(kind: str, policy: SandboxPolicy) -> None:
    nrs = {"x86_64": (250, 425), "aarch64": (219, 425)}[os.uname().machine]
    got = results(run_sandboxed(kind, policy, f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        def call(*args):
            ctypes.set_errno(0)
            return libc.syscall(*args), ctypes.get_errno()
        t('keyctl', lambda: call({nrs[0]}, 0, -3, 0))  # KEYCTL_GET_KEYRING_ID, session keyring
        t('io_uring', lambda: call({nrs[1]}, 1, ctypes.create_string_buffer(120)))
        """))
    assert got["keyctl"] == "OK (-1, 1)"  # EPERM
    assert got["io_uring"] == "OK (-1, 38)"  # ENOSYS


# --- what trainers need -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_torch_runs_inside(kind: str, policy: SandboxPolicy) -> None:
    got = results(run_sandboxed(kind, policy, """
        t('matmul', lambda: float(__import__('torch').ones(2) @ __import__('torch').ones(2)))
        """))
    assert got["matmul"] == "OK 2.0"


@pytest.mark.parametrize("kind", LINUX_KINDS)
def test_rlimits_reach_the_child(kind: str, policy: SandboxPolicy) -> None:
    policy.max_memory_bytes = 64 << 30
    got = results(run_sandboxed(kind, policy, """
        import resource
        t('core', lambda: resource.getrlimit(resource.RLIMIT_CORE))
        t('as', lambda: resource.getrlimit(resource.RLIMIT_AS))
        """))
    assert got["core"] == "OK (0, 0)"
    assert got["as"] == f"OK ({64 << 30}, {64 << 30})"


# --- detection and policy checks ------------------------------------------------------------------

def test_forcing_a_kind_this_host_lacks_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = next((k for k in sandbox.KINDS if not sandbox._available(k)), None)
    if missing is None:
        pytest.skip("every kind is available here")
    monkeypatch.setenv(sandbox.ENV_VAR, missing)
    with pytest.raises(SandboxError, match=missing):
        sandbox.detect()
    monkeypatch.setenv(sandbox.ENV_VAR, "chroot")
    with pytest.raises(SandboxError):
        sandbox.detect()
    monkeypatch.setenv(sandbox.ENV_VAR, "none")
    assert sandbox.detect() is None
    assert sandbox.describe().startswith("sandbox: none") and "--no-sandbox" in sandbox.describe()
    monkeypatch.delenv(sandbox.ENV_VAR)
    assert sandbox.describe().startswith("sandbox: ") and "\n" not in sandbox.describe()
    with pytest.raises(SandboxError):
        sandbox.wrap(missing, [sys.executable], SandboxPolicy(Path("/"), [], []))


def test_python_m_backends_reports_the_sandbox() -> None:
    def run(forced: str) -> subprocess.CompletedProcess:
        env = {**os.environ, sandbox.ENV_VAR: forced}
        return subprocess.run([sys.executable, "-m", "backends", "cpu"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)
    ok = run("none")
    assert ok.returncode == 0 and ok.stdout.splitlines()[1].startswith("sandbox: none")
    bad = run("chroot")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_policies_that_cannot_be_enforced_are_refused(tmp_path: Path) -> None:
    (tmp_path / "w" / "inner").mkdir(parents=True)
    kind = sandbox.detect() or pytest.skip("no sandbox here")
    bad = [
        SandboxPolicy(tmp_path, [Path("relative.txt")], [tmp_path / "w"]),
        SandboxPolicy(tmp_path, [tmp_path / "missing"], [tmp_path / "w"]),
        SandboxPolicy(tmp_path, [tmp_path / "w" / "inner"], [tmp_path / "w"]),
        SandboxPolicy(Path("/var"), [], [tmp_path / "w"]),
    ]
    for policy in bad:
        with pytest.raises(SandboxError):
            sandbox.wrap(kind, [sys.executable], policy)


# --- Seatbelt: the profile's text ---------------------------------------------------------------

class Str(str):
    """A string literal read from a profile (as opposed to a symbol)."""


def parse_sbpl(text: str) -> list:
    """The profile as nested lists; fails on anything that is not a paren, string or symbol."""
    token = re.compile(r'\s+|(\()|(\))|"((?:[^"\\]|\\.)*)"|([^\s()"]+)', re.S)
    stack: list[list] = [[]]
    pos = 0
    while pos < len(text):
        m = token.match(text, pos)
        assert m, f"unreadable profile at {text[pos:pos + 40]!r}"
        pos = m.end()
        if m.group(1):
            stack.append([])
        elif m.group(2):
            done = stack.pop()
            stack[-1].append(done)
        elif m.group(3) is not None:
            stack[-1].append(Str(re.sub(r"\\(.)", r"\1", m.group(3))))
        elif m.group(4):
            stack[-1].append(m.group(4))
    assert len(stack) == 1, "unbalanced parentheses"
    return stack[0]


def rules(forms: list, action: str, operation: str) -> list[tuple[str, str]]:
    """(filter, path) pairs of every top-level `(action ... operation ... filters)` form."""
    return [(f[0], f[1]) for form in forms if form[0] == action and operation in form[1:]
            for f in form[1:] if isinstance(f, list) and len(f) == 2]


def test_seatbelt_profile_allows_only_the_policy(tmp_path: Path) -> None:
    readable, data, out = tmp_path / "code", tmp_path / "shard.bin", tmp_path / "run"
    readable.mkdir(), out.mkdir(), data.write_text("x")
    forms = parse_sbpl(seatbelt.build_profile([readable, data], [out]))
    assert forms[0] == ["version", "1"] and forms[1] == ["deny", "default"]
    assert ["deny", "network*"] in forms
    reads = rules(forms, "allow", "file-read*")
    assert ("subpath", str(readable)) in reads and ("literal", str(data)) in reads
    assert ("subpath", "/System") in reads
    writes = rules(forms, "allow", "file-write*") + rules(forms, "allow", "file-write-data")
    assert set(writes) == {("subpath", str(out)), ("literal", "/dev/null")}
    assert not any("network" in str(form) and form[0] == "allow" for form in forms)
    assert "procargs" not in str(forms)
    assert "MTLCompilerService" not in str(forms)
    gpu = parse_sbpl(seatbelt.build_profile([readable], [out], gpu=True))
    assert ("global-name", "com.apple.MTLCompilerService") in rules(gpu, "allow", "mach-lookup")
    assert ("iokit-user-client-class", "IOGPUDeviceUserClient") in rules(gpu, "allow", "iokit-open")


def test_seatbelt_paths_are_escaped(tmp_path: Path) -> None:
    odd = tmp_path / 'we"ird\\dir'
    injection = tmp_path / 'x") (allow file-read* (subpath "/")) ("'
    odd.mkdir(), injection.mkdir(parents=True)
    forms = parse_sbpl(seatbelt.build_profile([odd, injection], []))
    assert ("subpath", str(odd)) in rules(forms, "allow", "file-read*")
    assert ("subpath", str(injection)) in rules(forms, "allow", "file-read*")
    assert ("subpath", "/") not in rules(forms, "allow", "file-read*")
    with pytest.raises(ValueError):
        seatbelt.build_profile([tmp_path / "line\nbreak"], [])
    assert seatbelt.command("(version 1)", ["python", "-c", ""])[:3] == [
        "/usr/bin/sandbox-exec", "-p", "(version 1)"]
