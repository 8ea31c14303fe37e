"""What a run may use: sized /tmp and /dev/shm, a read-only /dev, a workspace cap watched by the runner, the
largest file (RLIMIT_FSIZE), memory (a cgroup per run where the host gives one, else RLIMIT_AS), and the
free-space check before every run.

Run: `uv run pytest tests/test_resources.py` (about two minutes on a 2-core CPU). The caps are set small
through the AUTORESEARCH_* settings, so no test writes or allocates more than about 100 MiB; where a
trainer asks for more memory than its cap, RLIMIT_AS refuses it before any page is touched.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_faults import START, check_after, loop_args
from test_loop import edit, loop_env, make_repo, read_rows, run_loop, seed, write_script

from sandbox import cgroup, runner
from sandbox import confine as sb
from sandbox.workspace import Resources, free_space_problem, parse_size

MiB = 1 << 20
HAS_BWRAP = shutil.which("bwrap") is not None and sb._available("bwrap")
HAS_LANDLOCK = sb._available("landlock")

# Small caps for the loop: a 64 MiB workspace, 16 MiB tmpfs, 2 GiB of memory (the stand-in trainer and the
# harness need about 1 GiB of address space for torch).
CAPS = dict(AUTORESEARCH_WORKSPACE_CAP="64M", AUTORESEARCH_TMP_SIZE="16M", AUTORESEARCH_SHM_SIZE="16M",
            AUTORESEARCH_MEMORY_CAP="2G")


def fill(path: str, mib: int = 100) -> str:
    """Trainer code (indented for main()) writing `mib` MiB to `path`, 1 MiB at a time."""
    return (f"    with open({path}, 'wb') as f:\n"
            f"        for _ in range({mib}):\n"
            f"            f.write(b'x' * (1 << 20))\n")


# ------------------------------------------------------------------------------------------------
# the sandbox and the runner, without the loop
# ------------------------------------------------------------------------------------------------


def _run(kind: str, code: str, tmp_path: Path, **caps) -> tuple[runner.TrainerRun, str]:
    """Run `python -c code` in sandbox `kind` with `caps` (SandboxPolicy fields); (run, its log)."""
    ws = Path(tempfile.mkdtemp(prefix="autoresearch-test-ws-"))
    try:
        policy = sb.SandboxPolicy(cwd=ws, read_paths=[], write_paths=[ws], **caps)
        argv, preexec = sb.wrap(kind, [sys.executable, "-I", "-c", code], policy)
        log = tmp_path / f"{kind}.log"
        run = runner.run_trainer(argv, cwd=ws, env={"PATH": os.environ["PATH"], "TMPDIR": str(ws)}, log_path=log,
                                 timeout_s=60, preexec_fn=preexec, tick_s=0.1)
        return run, log.read_text()
    finally:
        shutil.rmtree(ws, ignore_errors=True)


WRITES = """
import errno, os
for path in ("/tmp/fill", "/dev/shm/fill", "/dev/fill"):
    try:
        with open(path, "wb") as f:
            for _ in range(100):
                f.write(b"x" * (1 << 20))
        print(path, "100 MiB written")
    except OSError as e:
        print(path, errno.errorcode[e.errno])
"""


@pytest.mark.skipif(not HAS_BWRAP, reason="needs bubblewrap")
def test_bwrap_tmp_and_shm_are_sized_and_dev_is_read_only(tmp_path):
    run, log = _run("bwrap", WRITES, tmp_path, tmp_bytes=16 * MiB, shm_bytes=8 * MiB)
    assert run.returncode == 0 and run.limit is None, log
    assert "/tmp/fill ENOSPC" in log and "/dev/shm/fill ENOSPC" in log, log
    assert "/dev/fill EROFS" in log, log
    assert "written" not in log


@pytest.mark.skipif(not HAS_LANDLOCK, reason="needs Landlock")
def test_landlock_tmp_and_shm_are_not_writable(tmp_path):
    run, log = _run("landlock", WRITES, tmp_path)
    assert run.returncode == 0, log
    for path in ("/tmp/fill", "/dev/shm/fill", "/dev/fill"):
        assert f"{path} EACCES" in log, log


BIG_FILE = """
import errno, os
fd = os.open("far", os.O_WRONLY | os.O_CREAT)
os.lseek(fd, 100 << 20, os.SEEK_SET)
try:
    os.write(fd, b"x")
    print("wrote at 100 MiB")
except OSError as e:
    print(errno.errorcode[e.errno])
"""


@pytest.mark.parametrize("kind", ["bwrap", "landlock"])
def test_no_file_larger_than_the_cap(kind, tmp_path):
    if not sb._available(kind):
        pytest.skip(f"needs {kind}")
    run, log = _run(kind, BIG_FILE, tmp_path, max_file_bytes=16 * MiB)
    assert run.returncode == 0 and "EFBIG" in log, log


GROW = """
import os, time
for i in range(10):
    with open(f"part{i}", "wb") as f:
        f.write(b"x" * (10 << 20))
print("100 MiB written", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["bwrap", "landlock"])
def test_workspace_past_its_cap_is_ended(kind, tmp_path):
    if not sb._available(kind):
        pytest.skip(f"needs {kind}")
    run, log = _run(kind, GROW, tmp_path, disk_bytes=64 * MiB)
    assert run.returncode is None and not run.timed_out and run.wall_seconds < 30, log
    assert run.limit == ("wrote more than 64 MiB into its workspace, past the cap (AUTORESEARCH_WORKSPACE_CAP); "
                         "ended by the loop"), run.limit
    assert f"[loop] {run.limit}" in log


SYSV_SHM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
sid = libc.shmget(0, 16 << 20, 0o1600)
if sid < 0:
    print("shmget refused", ctypes.get_errno())
else:
    addr = libc.shmat(sid, None, 0)
    ctypes.memset(addr, 1, 16 << 20)  # 16 MiB of RAM, no longer in the address space once detached
    libc.shmdt(ctypes.c_void_p(addr))
    print("segment left", sid)
"""


def _sysv_segments() -> set[str]:
    try:
        return {line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}
    except OSError:
        return set()


@pytest.mark.parametrize("kind", ["bwrap", "landlock"])
def test_no_shared_memory_segment_outlives_the_run(kind, tmp_path):
    """A System V segment keeps its RAM after its maker exits and counts in no rlimit: under Landlock
    (no IPC namespace) seccomp refuses shmget; under bubblewrap it lives in the run's IPC namespace and
    is gone with it."""
    if not sb._available(kind):
        pytest.skip(f"needs {kind}")
    before = _sysv_segments()
    run, log = _run(kind, SYSV_SHM, tmp_path)
    assert run.returncode == 0, log
    assert ("shmget refused 1" if kind == "landlock" else "segment left") in log, log
    assert _sysv_segments() <= before


def test_workspace_over_its_cap_at_exit_is_caught(tmp_path, monkeypatch):
    """A run that writes past the cap and exits before the first check is still caught."""
    kind = sb.detect()
    if kind is None:
        pytest.skip("no sandbox")
    monkeypatch.setattr(runner, "DISK_CHECK_S", 3600.0)  # no check while it runs, however slow the machine
    run, log = _run(kind, GROW.replace("time.sleep(60)", ""), tmp_path, disk_bytes=64 * MiB)
    assert run.returncode == 0
    assert run.limit == "wrote more than 64 MiB into its workspace, past the cap (AUTORESEARCH_WORKSPACE_CAP)"


def test_used_bytes_counts_blocks_entries_and_links_once(tmp_path):
    d = tmp_path / "ws"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "data").write_bytes(b"x" * (3 * MiB))
    os.link(d / "sub" / "data", d / "hardlink")  # the same blocks: counted once
    with open(d / "sparse", "wb") as f:  # 1 GiB long, no blocks
        f.truncate(1 << 30)
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * (8 * MiB))
    (d / "link").symlink_to(outside)  # not followed
    for i in range(100):
        (d / f"empty{i}").touch()
    used = runner.used_bytes([d])
    floor = runner.ENTRY_BYTES
    assert 3 * MiB + 103 * floor <= used < 3 * MiB + 110 * floor, used
    assert runner.used_bytes([d], stop_at=MiB) > MiB  # stops counting past the cap
    assert runner.used_bytes([tmp_path / "missing"]) == 0


# ------------------------------------------------------------------------------------------------
# settings and the free-space check
# ------------------------------------------------------------------------------------------------


def test_sizes_and_settings():
    assert parse_size("64M") == 64 * MiB and parse_size("1.5GiB") == 3 << 29 and parse_size("4096") == 4096
    assert parse_size("2gb") == 2 << 30 and parse_size(" 1T ") == 1 << 40
    for bad in ("", "lots", "-1G", "0", "nan"):
        with pytest.raises((ValueError, IndexError)):
            parse_size(bad)
    res = Resources.from_env({})
    assert (res.workspace_bytes, res.tmp_bytes, res.shm_bytes, res.min_free_bytes) == (4 << 30, 1 << 30, 512 * MiB,
                                                                                      1 << 30)
    assert res.memory_bytes is None or 0 < res.memory_bytes < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    res = Resources.from_env(CAPS)
    assert (res.workspace_bytes, res.tmp_bytes, res.shm_bytes, res.memory_bytes) == (64 * MiB, 16 * MiB, 16 * MiB,
                                                                                     2 << 30)
    from data import PrepareError

    with pytest.raises(PrepareError, match="AUTORESEARCH_WORKSPACE_CAP must be a size"):
        Resources.from_env({"AUTORESEARCH_WORKSPACE_CAP": "big"})


def test_free_space_problem(tmp_path):
    res = Resources.from_env({})
    results = tmp_path / "results.tsv"
    free = shutil.disk_usage(tmp_path).free
    if free > res.workspace_bytes + res.min_free_bytes:
        assert free_space_problem(results, res) is None
    short = free_space_problem(results, dataclasses.replace(res, min_free_bytes=free + (1 << 40)))
    assert short is not None and short.startswith("only ") and "results.tsv" in short, short
    assert "AUTORESEARCH_MIN_FREE" in short and "free some space" in short and "every recorded run is kept" in short


# ------------------------------------------------------------------------------------------------
# the memory cgroup (its logic on a stand-in directory; a real one where this host gives one)
# ------------------------------------------------------------------------------------------------


def test_run_group_logic_on_a_stand_in_cgroup(tmp_path, monkeypatch):
    """With AUTORESEARCH_CGROUP naming a delegated v2 group: memory (and pids) enabled for its children, each
    run's group gets memory.max, no swap, the whole run ended on OOM and pids.max; the preexec joins it; an
    OOM kill is reported in one sentence; the group is removed after the run."""
    root = tmp_path / "delegated"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    (root / "cgroup.procs").write_text("")
    monkeypatch.setenv(cgroup.ENV_VAR, str(root))
    cgroup.parent.cache_clear()
    made = []

    def fake_mkdir(self, *a, **k):  # a real cgroup directory comes with its control files
        os.mkdir(self)
        for name in ("memory.max", "memory.swap.max", "memory.oom.group", "pids.max", "cgroup.procs"):
            (self / name).write_text("")
        made.append(self)

    monkeypatch.setattr(Path, "mkdir", fake_mkdir)
    monkeypatch.setattr(cgroup, "_rmdir", lambda p: shutil.rmtree(p, ignore_errors=True) or not p.exists())
    try:
        assert cgroup.parent() == (root, cgroup.ENV_VAR)
        assert (root / "cgroup.subtree_control").read_text().strip() == "+pids"  # +memory, then +pids
        group = cgroup.make(256 * MiB, 64)
        assert group is not None and group.path.parent == root
        assert (group.path / "memory.max").read_text() == f"{256 * MiB}\n"
        assert (group.path / "memory.swap.max").read_text() == "0\n"
        assert (group.path / "memory.oom.group").read_text() == "1\n"
        assert (group.path / "pids.max").read_text() == "64\n"
        confined = sb.Confined({}, [], group, None)
        assert confined.procs == [str(group.path / "cgroup.procs")]
        (group.path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
        assert confined.finish() == ("ended by the kernel for going past its memory cap of 256 MiB (memory cgroup: "
                                     "RAM, /tmp and /dev/shm files together)")
        assert not group.path.exists()
    finally:
        cgroup.parent.cache_clear()


def test_no_cgroup_says_why(monkeypatch):
    monkeypatch.setenv(cgroup.ENV_VAR, "none")
    cgroup.parent.cache_clear()
    try:
        assert cgroup.parent() == (None, "AUTORESEARCH_CGROUP=none")
        assert cgroup.make(1 << 30) is None
        line = Resources.from_env(CAPS).line("bwrap", gpu=False)
        assert "no memory cgroup (AUTORESEARCH_CGROUP=none), so memory 2 GiB of address space per run" in line, line
        assert "/tmp 16 MiB, /dev/shm 16 MiB" in line and "workspace 64 MiB" in line
        line = Resources.from_env(CAPS).line("bwrap", gpu=True)
        assert "its memory is NOT capped" in line, line
    finally:
        cgroup.parent.cache_clear()


@pytest.mark.skipif(not HAS_BWRAP or cgroup.parent()[0] is None,
                    reason=f"needs bubblewrap and a writable memory cgroup ({cgroup.parent()[1]})")
def test_memory_cgroup_counts_tmpfs_files(tmp_path):
    """The pages of a tmpfs file are RAM the run's cgroup pays for: a run that writes 512 MiB into /dev/shm
    under a 256 MiB memory cap is ended by the kernel, and says so."""
    code = ("with open('/dev/shm/fill', 'wb') as f:\n"
            "    for _ in range(512):\n"
            "        f.write(b'x' * (1 << 20))\n"
            "print('written')\n")
    run, log = _run("bwrap", code, tmp_path, memory_cap_bytes=256 * MiB, shm_bytes=1 << 30)
    assert run.limit is not None and "memory cap of 256 MiB" in run.limit, log
    assert "written" not in log


# ------------------------------------------------------------------------------------------------
# through the loop: each run is recorded with its reason, the loop goes on, nothing recorded is lost
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped_session(tiny_cache_root, tmp_path_factory):
    """One loop session, caps set small: five runs that each go past one bound, then a harmless win."""
    tmp = tmp_path_factory.mktemp("resources")
    repo = make_repo(tmp)
    with pytest.MonkeyPatch.context() as mp:  # the stand-in's measured val_bpb is read from the tiny cache
        mp.setenv("AUTORESEARCH_CACHE", str(tiny_cache_root))
        mp.setenv("AUTORESEARCH_PROTOCOL", "tiny")
        prior = seed(repo, "caps")
    script = write_script(tmp, [
        edit(START, START + fill("'/tmp/fill'"), "fills the sandbox's /tmp"),
        edit(START, START + fill("'/dev/shm/fill'"), "fills /dev/shm"),
        edit(START, START + "    for i in range(10):\n"
                            "        with open(os.path.join(os.environ['TMPDIR'], f'part{i}'), 'wb') as f:\n"
                            "            f.write(b'x' * (10 << 20))\n"
                            "    time.sleep(20)\n", "fills its workspace"),
        edit(START, START + "    with open(os.path.join(os.environ['TMPDIR'], 'far'), 'wb') as f:\n"
                            "        f.seek(100 << 20)\n"
                            "        f.write(b'x')\n", "one file past the cap"),
        edit(START, START + "    hog = bytearray(3 << 30)\n", "allocates past its memory cap"),
        edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "a clear win"),
    ])
    proc = run_loop(repo, *loop_args("caps", script, "--max-experiments", "6", "--max-fix-attempts", "0"),
                    env=loop_env(tiny_cache_root, **CAPS), timeout=480)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = check_after(prior, ["crash", "crash", "crash", "crash", "crash", "keep"])
    return rows, proc.stdout


@pytest.mark.slow  # one loop session of five over-cap runs (CI runs the slow set)
def test_the_caps_are_said_at_start(capped_session):
    _, out = capped_session
    line = next(ln for ln in out.splitlines() if "resources: " in ln)
    assert "workspace 64 MiB" in line and "memory 2 GiB" in line, line
    if HAS_BWRAP:
        assert "/tmp 16 MiB, /dev/shm 16 MiB" in line, line


@pytest.mark.skipif(not HAS_BWRAP, reason="the sandbox's own /tmp and /dev/shm are bubblewrap's")
@pytest.mark.slow  # one loop session of five over-cap runs (CI runs the slow set)
def test_a_full_tmp_or_shm_is_the_runs_crash(capped_session):
    (tmp, shm, *_), _ = capped_session
    for row in (tmp, shm):
        assert "No space left on device" in row.note, row.note


@pytest.mark.slow  # one loop session of five over-cap runs (CI runs the slow set)
def test_a_full_workspace_ends_the_run(capped_session):
    (_, _, ws, *_), _ = capped_session
    assert ws.note == ("crash: wrote more than 64 MiB into its workspace, past the cap "
                       "(AUTORESEARCH_WORKSPACE_CAP); ended by the loop"), ws.note  # not its 20 s sleep's end


@pytest.mark.slow  # one loop session of five over-cap runs (CI runs the slow set)
def test_one_file_past_the_cap_fails_to_write(capped_session):
    (*_, big, _, _), _ = capped_session
    assert "File too large" in big.note, big.note


@pytest.mark.slow  # one loop session of five over-cap runs (CI runs the slow set)
def test_memory_past_the_cap_is_the_runs_crash(capped_session):
    (*_, hog, win), _ = capped_session
    assert "MemoryError" in hog.note or "memory cap of 2 GiB" in hog.note, hog.note
    assert win.status == "keep"  # and the loop went on


def test_too_little_free_space_stops_the_loop_before_a_run(tiny_cache, tmp_path):
    repo = make_repo(tmp_path)
    prior = seed(repo, "full")
    script = write_script(tmp_path, [edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "a clear win")])
    proc = run_loop(repo, *loop_args("full", script, "--max-experiments", "1"),
                    env=loop_env(tiny_cache, AUTORESEARCH_MIN_FREE="1000T"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: only ") and "AUTORESEARCH_MIN_FREE" in last and "run again" in last, last
    assert (repo / "results.tsv").read_bytes() == prior.data  # nothing recorded is lost, nothing half-made added
    assert len(read_rows(repo)) == prior.rows
    assert subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True,
                          text=True).stdout == ""
