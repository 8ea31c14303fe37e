"""Tests of the live page (reporting/live.py, reporting/static/; `loop.py serve` and `loop.py run --serve`).

Run: `uv run pytest tests/test_live.py` (about 45 s on a 2-core CPU; no network).

The server tests drive the Starlette app with its TestClient over results files and runs/ folders made
here: a torn results file, missing run folders, paths that lead outside runs/ (`..`, absolute, links,
a FIFO) are refused or shown without breaking the page. The browser tests run a real short loop
(`loop.py run --serve`, scripted agent, test_loop.py's stand-in trainer taught to print step lines:
one baseline and two experiments, ~25 s, once per module), then serve its results with `loop.py serve`
and drive the page in Debian's Chromium through Playwright: the table has the rows, a row appended to
results.tsv appears without a reload, a click shows the diff, the run in progress shows its loss
curve, and a screenshot is saved (its path is printed). They are skipped, with the reason, where
Playwright or a Chromium is missing (`.ci/run` installs both; AUTORESEARCH_CHROMIUM names another
Chromium binary).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from reporting import live, serve
from research.results import COLUMNS, Row, append_row, read_results

PROJECT = Path(__file__).resolve().parents[1]

try:
    from starlette.testclient import TestClient
except ImportError as e:  # pragma: no cover - starlette is a dependency; say so plainly if it is missing
    pytest.skip(f"starlette's TestClient cannot be imported ({e}); run `uv sync`", allow_module_level=True)


# ------------------------------------------------------------------------------------------------
# results files and runs/ folders made here
# ------------------------------------------------------------------------------------------------


def row(n: int | None, val: float, status: str, desc: str, **kw) -> Row:
    base = dict(commit=f"c{n or 0:06d}", val_bpb=val, memory_gb=0.5 if val else 0.0, status=status, description=desc,
                backend="cpu", device="fake cpu", protocol="tiny", evaluator_hash="e1e1e1e1e1e1", num_steps=10,
                branch="autoresearch/t", run=n, budget_s=20.0, trainer_hash=f"h{n}", agent_cost_usd=0.01,
                hyperparams={"MATRIX_LR": 0.04, "DEPTH": 4})
    base.update(kw)
    return Row(**base)


HISTORY = [
    row(1, 2.0, "keep", "baseline", note="baseline 1/2", holdout_bpb=2.01, trainer_hash="h1"),
    row(2, 2.001, "keep", "baseline (repeat 2/2)", note="baseline 2/2", holdout_bpb=2.012, trainer_hash="h1"),
    row(3, 1.9, "keep", "lower the learning rate", note="win", holdout_bpb=1.92),
    row(4, 1.95, "discard", "a bigger batch", note="no gain"),
    row(5, 0.0, "crash", "an edit that crashes", note="crash: RuntimeError"),
]


def step_lines(n: int, upto: int = 10, base: float = 3.0) -> str:
    """What the trainers print while training (a carriage return redraws the line)."""
    return "".join(f"\rstep {k:05d} ({10.0 * k:.1f}%) | loss: {base + 4 / k:.6f} | lrm: 1.00 | dt: 10ms | "
                   f"tok/sec: {12000 + k:,} | mfu: n/a | epoch: 1 | remaining: {20 - 2 * k}s    "
                   for k in range(1, upto + 1))


def write_results(path: Path, rows: list[Row]) -> Path:
    path.write_text("\t".join(COLUMNS) + "\n" + "".join(r.to_line() for r in rows), encoding="utf-8")
    return path


def make_lab(root: Path, rows: list[Row] = HISTORY, runs: tuple[int, ...] = (1, 2, 3, 4, 5)) -> Path:
    """root/results.tsv with `rows`, and runs/<n>/ (diff, log with step lines) for `runs`."""
    root.mkdir(parents=True, exist_ok=True)
    write_results(root / "results.tsv", rows)
    for n in runs:
        d = root / "runs" / str(n)
        d.mkdir(parents=True)
        diff = "" if n <= 2 else f"--- a/train_cuda.py\n+++ b/train_cuda.py\n@@ -1 +1 @@\n-LR = 1\n+LR = {n}\n"
        (d / "diff.patch").write_text(diff)
        (d / "log.txt").write_text("trainer starting\n" + step_lines(n, base=3.0 - 0.01 * n) + "\n---\nval_bpb: x\n")
    return root


def client(data: live.LiveData, hosts: list[str] | None = None) -> TestClient:
    return TestClient(serve.make_app(data, hosts), base_url="http://127.0.0.1:8765")


def state(c: TestClient) -> dict:
    r = c.get("/api/state")
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------------
# server tests
# ------------------------------------------------------------------------------------------------


def test_state_rows_summary_noise_and_the_run_in_progress(tmp_path):
    lab = make_lab(tmp_path / "lab")
    run6 = lab / "runs" / "6"
    run6.mkdir()
    (run6 / "diff.patch").write_text("-LR = 1\n+LR = 6\n")
    (run6 / "log.txt").write_text("trainer starting\n" + step_lines(6, upto=4))
    # run 3 (the best) has a stored curve: it is preferred to reading the log
    (lab / "runs" / "3" / "loss.json").write_text(json.dumps({"points": [[k, k / 10, 2.5 + 1 / k] for k in range(1, 11)]}))
    c = client(live.LiveData(lab / "results.tsv"))
    s = state(c)
    assert [r["n"] for r in s["rows"]] == [1, 2, 3, 4, 5]
    assert [r["kind"] for r in s["rows"]] == ["baseline", "baseline", "keep", "discard", "crash"]
    by = {r["n"]: r for r in s["rows"]}
    assert by[3]["delta"] == pytest.approx(1.9 - 2.0005) and by[4]["delta"] == pytest.approx(0.05)
    assert by[5]["val_bpb"] is None and by[1]["delta"] is None and by[3]["cost_usd"] == 0.01
    assert by[5]["reason"] == "other" and by[4]["reason"] == ""  # the reason column (a note of no known form)
    assert s["summary"]["best_bpb"] == 1.9 and s["summary"]["best_n"] == 3 and s["summary"]["cost_usd"] == 0.05
    # the loop's own best after each row (research/ledger.py): the first baseline alone, then their mean
    assert s["plot"]["running_best"] == pytest.approx([2.0, 2.0005, 1.9, 1.9, 1.9])
    assert s["noise"]["sigma"] == pytest.approx(0.000707, abs=1e-6) and s["noise"]["df"] == 1
    assert s["host"]["device"] == "fake cpu" and s["host"]["protocol"] == "tiny"
    cur = s["current"]
    assert cur["run"] == 6 and cur["phase"] == "training" and cur["step"] == 4
    assert cur["progress"] == pytest.approx(0.4) and cur["tok_per_s"] == 12004 and cur["time_left_s"] == 12.0
    assert [p[0] for p in cur["points"]] == [10, 20, 30, 40]
    assert cur["best"]["run"] == 3 and cur["best"]["points"][0] == [10.0, 3.5]
    assert not cur["unchanged"] and cur["description"]
    # the log grows: the next poll reads only what was added
    with open(run6 / "log.txt", "a") as f:
        f.write(step_lines(6, upto=6)[-200:])
    assert state(c)["current"]["step"] == 6
    # the run ends: its row is written, nothing is running any more
    append_row(lab / "results.tsv", row(6, 1.97, "discard", "six"))
    s = state(c)
    assert s["current"] is None and s["rows"][-1]["description"] == "six"
    d = c.get("/api/runs/3/diff").json()
    assert d["text"].endswith("+LR = 3\n") and d["file"] == "runs/3/diff.patch"
    log = c.get("/api/runs/3/log").json()["text"]
    assert log.split("\n")[1].startswith("step 00010 (100.0%)")  # the last drawing of a redrawn line


def test_torn_results_file_is_read_up_to_its_last_whole_row(tmp_path):
    lab = make_lab(tmp_path / "lab")
    whole = (lab / "results.tsv").read_text()
    torn = row(6, 1.8, "keep", "a row cut in the middle").to_line()[:37]
    (lab / "results.tsv").write_text(whole + torn)
    c = client(live.LiveData(lab / "results.tsv"))
    s = state(c)
    assert [r["n"] for r in s["rows"]] == [1, 2, 3, 4, 5]
    assert "cut in the middle" not in json.dumps(s)
    # garbage in the file: lines that are not rows are skipped, the page still answers
    (lab / "results.tsv").write_text(whole + "not\ta\trow\n\x00\x01\xff binary\n" + "\t" * 40 + "\n")
    s = state(c)
    assert [r["n"] for r in s["rows"]][:5] == [1, 2, 3, 4, 5]
    assert c.get("/").status_code == 200


def test_missing_results_file_and_missing_run_folders(tmp_path):
    empty = tmp_path / "nothing-yet"
    empty.mkdir()
    c = client(live.LiveData(empty / "results.tsv"))
    s = state(c)
    assert s["rows"] == [] and s["summary"] is None and s["current"] is None
    assert "does not exist" in s["message"]
    r = c.get("/api/runs/1/diff")
    assert r.status_code == 404 and "no runs/ folder" in r.json()["error"]
    # rows whose run folders are gone (deleted, or copied without runs/)
    lab = make_lab(tmp_path / "lab", runs=(1, 2))
    c = client(live.LiveData(lab / "results.tsv"))
    s = state(c)
    assert [r["has_run"] for r in s["rows"]] == [True, True, False, False, False]
    r = c.get("/api/runs/4/diff")
    assert r.status_code == 404 and r.json()["error"] == "runs/4/diff.patch does not exist"
    assert c.get("/api/runs/4/log").status_code == 404
    # a run folder with nothing in it yet (the loop just made it) is the run in progress
    (lab / "runs" / "6").mkdir()
    cur = state(c)["current"]
    assert cur["run"] == 6 and cur["points"] == [] and cur["phase"] == "starting"
    # an empty results file (header only)
    write_results(lab / "results.tsv", [])
    s = state(c)
    assert s["rows"] == [] and "no experiment yet" in s["message"]


def test_paths_outside_runs_are_refused(tmp_path):
    lab = make_lab(tmp_path / "lab")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("TOPSECRET\n")
    (outside / "diff.patch").write_text("TOPSECRET diff\n")
    (outside / "log.txt").write_text("TOPSECRET\n" + step_lines(0, base=100.0))
    runs = lab / "runs"
    (runs / "7").symlink_to(outside, target_is_directory=True)  # a run folder that is a link out
    (runs / "8").mkdir()
    (runs / "8" / "diff.patch").symlink_to(secret)  # a file that is a link out
    (runs / "8" / "log.txt").symlink_to("../../../outside/secret.txt")
    (runs / "9").mkdir()
    os.mkfifo(runs / "9" / "log.txt")  # would block a plain open()
    (runs / "9" / "diff.patch").symlink_to(runs / "3" / "diff.patch")  # a link that stays inside is fine
    c = client(live.LiveData(lab / "results.tsv"))
    probes = ["/api/runs/7/diff", "/api/runs/7/log", "/api/runs/8/diff", "/api/runs/8/log", "/api/runs/9/log",
              "/api/runs/../../outside/secret.txt", "/api/runs/..%2F..%2Foutside/diff",
              "/api/runs/%2Fetc%2Fpasswd/diff", "/api/runs/-1/diff", "/api/runs/1e3/diff", "/api/runs/3/..%2F..%2F..%2Foutside%2Fsecret.txt",
              "/api/runs/3/diff.patch", "/api/runs/3/result", "/api/runs/3/%2E%2E",
              "/static/..%2F..%2F..%2Foutside%2Fsecret.txt", "/static/../../live.py", "/static/%2e%2e/live.py",
              "/..%2F..%2Foutside%2Fsecret.txt", "/api/state/../../outside/secret.txt"]
    for url in probes:
        r = c.get(url)
        assert 400 <= r.status_code < 500, (url, r.status_code)
        assert "TOPSECRET" not in r.text and "def " not in r.text, url
    for url in ("/api/runs/7/diff", "/api/runs/8/diff", "/api/runs/8/log"):
        r = c.get(url)
        assert r.status_code == 403 and "outside runs/" in r.json()["error"], url
    assert c.get("/api/runs/9/log").status_code == 403  # not a regular file
    assert c.get("/api/runs/9/diff").json()["text"].endswith("+LR = 3\n")
    with pytest.raises(live.Refused):
        live.LiveData(lab / "results.tsv").run_path("7", "diff.patch")
    # the newest run folder links out: the page shows no curve from it and still answers
    (runs / "10").symlink_to(outside, target_is_directory=True)
    s = state(c)
    assert "TOPSECRET" not in json.dumps(s)
    assert s["current"] is None or s["current"]["points"] == []
    # runs/ itself may live elsewhere (a bigger disk); links inside it still may not leave it
    elsewhere = tmp_path / "disk" / "runs"
    shutil.copytree(runs / "3", elsewhere / "3")
    (elsewhere / "4").symlink_to(outside, target_is_directory=True)
    lab2 = tmp_path / "lab2"
    lab2.mkdir()
    write_results(lab2 / "results.tsv", HISTORY)
    (lab2 / "runs").symlink_to(elsewhere, target_is_directory=True)
    c2 = client(live.LiveData(lab2 / "results.tsv"))
    assert c2.get("/api/runs/3/diff").status_code == 200
    assert c2.get("/api/runs/4/diff").status_code == 403


def test_read_only_local_and_strict(tmp_path):
    lab = make_lab(tmp_path / "lab")
    before = {p: p.stat().st_mtime_ns for p in lab.rglob("*")}
    c = client(live.LiveData(lab / "results.tsv"), hosts=list(serve.LOOPBACK_HOSTS))
    for method in ("post", "put", "delete", "patch"):
        assert getattr(c, method)("/api/state").status_code == 405
        assert getattr(c, method)("/api/runs/3/diff").status_code == 405
    r = c.get("/api/state")
    assert r.headers["cache-control"] == "no-store"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    # a page on another site that resolves its own name to 127.0.0.1 (DNS rebinding) is turned away
    assert c.get("/api/state", headers={"host": "evil.example:8765"}).status_code == 400
    assert c.get("/api/state", headers={"host": "localhost:8765"}).status_code == 200
    state(c)
    c.get("/api/runs/3/log")
    assert {p: p.stat().st_mtime_ns for p in lab.rglob("*")} == before  # nothing written
    assert sorted(p.name for p in lab.iterdir()) == ["results.tsv", "runs"]


def test_page_is_self_contained():
    """Everything the page loads is shipped in reporting/static (no CDN); the chart library's license is recorded."""
    html = (serve.STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(ref.startswith("static/") and (serve.STATIC / ref[len("static/"):]).is_file() for ref in refs)
    js = (serve.STATIC / "live.js").read_text()
    css = (serve.STATIC / "live.css").read_text()
    assert "http" not in js and "http" not in css and "@import" not in css
    vendored = (serve.STATIC / "vendor" / "chart.umd.min.js").read_text()
    assert vendored.startswith("/*!\n * Chart.js v4.6.1") and "Released under the MIT License" in vendored[:300]
    notice = (serve.STATIC / "vendor" / "NOTICE.md").read_text()
    assert "Chart.js 4.6.1" in notice and "MIT" in notice and "Permission is hereby granted" in notice


def test_compare_view_with_other_machines(tmp_path):
    a = make_lab(tmp_path / "h100")
    mac = [dataclasses.replace(r, device="Apple M3", backend="mps", hyperparams={"MATRIX_LR": 0.04, "DEPTH": 2},
                               val_bpb=r.val_bpb + 0.1 if r.val_bpb else 0.0) for r in HISTORY]
    b = write_results(tmp_path / "mac.tsv", mac)
    c = client(live.LiveData(a / "results.tsv", [b]))
    cmp = state(c)["compare"]
    assert cmp["refused"] is None and [s["device"] for s in cmp["sources"]] == ["fake cpu", "Apple M3"]
    assert [s["best_bpb"] for s in cmp["sources"]] == pytest.approx([1.9, 2.0])
    hp = {h["name"]: h for h in cmp["hyperparams"]}
    assert hp["DEPTH"]["differs"] and hp["DEPTH"]["values"] == ["4", "2"] and not hp["MATRIX_LR"]["differs"]
    # another protocol: refused, as `loop.py compare` refuses it
    write_results(b, [dataclasses.replace(r, protocol="standard") for r in mac])
    cmp = state(c)["compare"]
    assert "Refusing to compare" in cmp["refused"] and cmp["sources"] == []
    # a missing other file: said, the rest of the page works
    c = client(live.LiveData(a / "results.tsv", [tmp_path / "gone.tsv"]))
    s = state(c)
    assert "does not exist" in s["compare"]["errors"][0] and len(s["rows"]) == 5


def _start_serve(cwd: Path, *args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`loop.py serve ARGS` in `cwd`; returns the process, the URL it printed and its collected output."""
    proc = subprocess.Popen([sys.executable, str(PROJECT / "loop.py"), "serve", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines: list[str] = []
    found = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"serving on http://\S+/", line):  # (the warning for --host says "serving on" too)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(60):
        proc.kill()
        raise AssertionError("loop.py serve printed no address:\n" + "".join(lines))
    url = re.search(r"serving on (http://\S+/)", "".join(lines))[1]
    return proc, url, lines


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_serve_command_binds_locally_and_warns_for_other_addresses(tmp_path):
    lab = make_lab(tmp_path / "lab")
    proc, url, _ = _start_serve(lab, "--port", "0")  # ./results.tsv by default
    try:
        assert url.startswith("http://127.0.0.1:")
        s = _get_json(url + "api/state")
        assert len(s["rows"]) == 5 and s["server"]["results"] == str(lab / "results.tsv")
    finally:
        assert _stop(proc) == 0
    proc, url, lines = _start_serve(lab, "results.tsv", "--host", "0.0.0.0", "--port", "0")
    try:
        assert any(line.startswith("warning: serving on 0.0.0.0") for line in lines), lines
        assert len(_get_json(url.replace("0.0.0.0", "127.0.0.1") + "api/state")["rows"]) == 5
    finally:
        _stop(proc)
    assert serve.host_warning("127.0.0.1", 8765) is None and serve.host_warning("localhost", 8765) is None


# ------------------------------------------------------------------------------------------------
# a real loop and a real browser
# ------------------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in (os.environ.get("AUTORESEARCH_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _playwright_missing() -> str | None:
    try:
        importlib.import_module("playwright.sync_api")
    except ImportError as e:
        return f"Playwright is not installed ({e}); `uv sync` installs it (dev group)"
    if _chromium() is None:
        return ("no Chromium found (chromium, chromium-browser or $AUTORESEARCH_CHROMIUM); on Debian/Ubuntu: "
                "apt-get install chromium (.ci/run does)")
    return None


# The stand-in trainer, printing the trainers' step lines as it "trains" (so runs have loss curves).
def _step_trainer() -> str:
    from test_loop import FAKE_TRAINER

    printing = ('    for k in range(1, 11):\n'
                '        print(f"\\rstep {k:05d} ({10.0 * k:.1f}%) | loss: {VAL_BPB + 3.0 / k:.6f} | lrm: 1.00 | dt: 50ms | "\n'
                '              f"tok/sec: {20000 + 137 * k:,} | mfu: n/a | epoch: 1 | remaining: {10 - k}s    ", end="",\n'
                '              flush=True)\n'
                '        time.sleep(0.12)\n'
                '    print()\n')
    anchor = "    time.sleep(SLEEP)\n"
    assert FAKE_TRAINER.count(anchor) == 1
    return FAKE_TRAINER.replace(anchor, anchor + printing)


@pytest.fixture(scope="module")
def looped(tmp_path_factory, tiny_cache_root):
    """A repository after a real `loop.py run --serve`: one baseline, a kept change and a discarded one.

    While the loop runs, its own page (`--serve`) is polled; what it saw is returned with the repo."""
    from test_loop import edit, loop_env, make_repo, write_script

    tmp = tmp_path_factory.mktemp("live-loop")
    repo = make_repo(tmp, trainer=_step_trainer())
    script = write_script(tmp, [edit("VAL_BPB = 2.0", "VAL_BPB = 1.5", "lower the fake loss",
                                     usage={"tokens_in": 1200, "tokens_out": 80, "cost_usd": 0.004}),
                                edit("VAL_BPB = 1.5", "VAL_BPB = 1.7", "a change that makes it worse")])
    env = loop_env(tiny_cache_root, budget=3.0)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "loop.py", "run", "--agent", "scripted", "--script", script, "--tag", "live",
                             "--max-experiments", "2", "--baseline-runs", "1", "--no-confirm", "--remeasure-every", "0",
                             "--serve", "--serve-port", "0"],
                            cwd=repo, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True).start()
    seen: list[dict] = []
    url = None
    while proc.poll() is None and time.monotonic() - t0 < 480:
        if url is None:
            m = re.search(r"live page: (http://\S+/)", "".join(out))
            url = m[1] if m else None
        if url:
            try:
                seen.append(_get_json(url + "api/state"))
            except OSError:
                pass
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    time.sleep(0.2)
    log = "".join(out)
    assert proc.returncode == 0, log
    print(f"\nthe loop ran for {time.monotonic() - t0:.1f} s")
    return {"repo": repo, "url": url, "seen": seen, "log": log}


def test_run_serve_shows_the_loop_as_it_runs(looped):
    """`loop.py run --serve`: the loop's own page answered while it ran, showing runs in progress with their
    loss curves and the rows as they were written."""
    assert looped["url"] and looped["url"].startswith("http://127.0.0.1:"), looped["log"]
    seen = looped["seen"]
    assert len(seen) >= 5
    assert any(s["loop"]["running"] for s in seen)
    running = [s["current"] for s in seen if s["current"]]
    assert running, "the page never showed a run in progress"
    assert any(c["points"] for c in running), "the page never showed a loss curve"
    described = {c["description"] for c in running if not c["unchanged"]}
    assert described <= {"lower the fake loss", "a change that makes it worse", "(no diff.patch yet)",
                         "(the description is recorded when the run ends; the diff shows the change)"}, described
    assert described & {"lower the fake loss", "a change that makes it worse"}, described
    assert any(c["unchanged"] for c in running)  # the baseline run
    assert max(len(s["rows"]) for s in seen) >= 2
    rows = read_results(looped["repo"] / "results.tsv")
    assert [r.status for r in rows] == ["keep", "keep", "discard"], looped["log"]
    assert (looped["repo"] / "runs" / "2" / "loss.json").is_file() or (looped["repo"] / "runs" / "2" / "log.txt").is_file()


@pytest.fixture(scope="module")
def browser_page(looped):
    why = _playwright_missing()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    proc, url, _ = _start_serve(looped["repo"], "--port", "0")
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True)
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        page.wait_for_selector("#results tbody tr.row")
        yield {"page": page, "url": url, "errors": errors, "requests": requests, "repo": looped["repo"]}
        browser.close()
    _stop(proc)


def expect(locator):
    """Playwright's auto-waiting assertion (the page's CSP forbids the eval that wait_for_function(str) needs)."""
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def _table(page) -> list[str]:
    return page.locator("#results tbody tr.row td:nth-child(3)").all_inner_texts()


def test_browser_table_has_the_rows(browser_page):
    page = browser_page["page"]
    assert _table(page) == ["a change that makes it worse", "lower the fake loss", "baseline"]  # newest first
    statuses = page.locator("#results tbody tr.row td:nth-child(2)").all_inner_texts()
    assert statuses == ["discard", "keep", "baseline"]
    rows = read_results(browser_page["repo"] / "results.tsv")
    assert page.locator("#c-best").inner_text() == f"{rows[1].val_bpb:.6f}"
    assert page.locator("#c-cost").inner_text() == "$0.00" and "1,200 in" in page.locator("#c-cost-more").inner_text()
    assert page.evaluate("document.querySelector('#progress-chart').width") > 0  # drawn with the table


def test_browser_new_row_appears_without_reload(browser_page):
    page, repo = browser_page["page"], browser_page["repo"]
    page.evaluate("window.__same_page = 42")
    last = read_results(repo / "results.tsv")[-1]
    append_row(repo / "results.tsv", dataclasses.replace(last, description="appended while the page is open",
                                                         status="discard", run=last.run + 1, val_bpb=last.val_bpb + 0.01))
    page.wait_for_selector("#results tbody tr.row >> text=appended while the page is open", timeout=20_000)
    assert _table(page)[0] == "appended while the page is open"
    assert page.evaluate("window.__same_page") == 42  # no reload happened


def test_browser_click_shows_the_diff(browser_page):
    page = browser_page["page"]
    page.locator("#results tbody tr.row", has_text="lower the fake loss").click()
    page.wait_for_selector("#detail-diff .add")
    assert "+VAL_BPB = 1.5" in page.locator("#detail-diff").inner_text()
    assert "-VAL_BPB = 2.0" in page.locator("#detail-diff").inner_text()
    expect(page.locator("#detail-log")).to_contain_text("handed over")
    # a row whose run folder is gone says so
    page.locator("#results tbody tr.row", has_text="appended while the page is open").click()
    expect(page.locator("#detail-diff")).to_contain_text("does not exist")


def test_browser_run_in_progress_and_screenshot(browser_page, tmp_path_factory):
    page, repo = browser_page["page"], browser_page["repo"]
    rows = read_results(repo / "results.tsv")
    n = max(r.run for r in rows if r.run) + 1
    d = repo / "runs" / str(n)
    d.mkdir()
    (d / "diff.patch").write_text("--- a/train_cuda.py\n+++ b/train_cuda.py\n@@ -1 +1 @@\n-VAL_BPB = 1.5\n+VAL_BPB = 1.6\n")
    (d / "log.txt").write_text("fake trainer starting\n" + "".join(
        f"\rstep {k:05d} ({10.0 * k:.1f}%) | loss: {1.6 + 3.0 / k:.6f} | lrm: 1.00 | dt: 50ms | tok/sec: 21,000 | "
        f"mfu: n/a | epoch: 1 | remaining: {10 - k}s    " for k in range(1, 7)))
    page.locator("#results tbody tr.row", has_text="lower the fake loss").click()  # open a diff for the picture
    page.wait_for_selector("#cur:not([hidden])", timeout=20_000)
    expect(page.locator("#cur-facts")).to_contain_text("21,000", timeout=20_000)
    facts = page.locator("#cur-facts").inner_text()
    assert "60.0% · step 6" in facts and "0:04 of training" in facts
    page.wait_for_selector("#detail-diff .add")
    page.wait_for_timeout(300)
    shot = tmp_path_factory.mktemp("live-screenshot") / "live-page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"\nscreenshot of the live page: {shot}")
    assert shot.stat().st_size > 20_000
    # the page loaded nothing from anywhere but its own server, and logged no error (a CSP violation would)
    origin = browser_page["url"].rstrip("/")
    assert all(u.startswith(origin) for u in browser_page["requests"]), browser_page["requests"]
    assert not [e for e in browser_page["errors"] if "404" not in e], browser_page["errors"]


def test_a_run_left_by_a_stopped_loop_reads_as_interrupted(tmp_path):
    """After Ctrl-C the newest run has no row; with no loop holding the repository and its log still for a
    while, the page says it was interrupted instead of training forever. While a loop holds it, it trains."""
    lab = make_lab(tmp_path / "lab")
    run6 = lab / "runs" / "6"
    run6.mkdir()
    (run6 / "diff.patch").write_text("-LR = 1\n+LR = 6\n")
    log = run6 / "log.txt"
    log.write_text("trainer starting\n" + step_lines(6, upto=4))
    old = time.time() - 2 * live.STALE_RUN_S
    os.utime(log, (old, old))
    assert state(client(live.LiveData(lab / "results.tsv")))["current"]["phase"] == "interrupted"
    (lab / ".autoresearch.lock").write_text(f"{os.getpid()}\n")  # a live loop holds the repository
    assert state(client(live.LiveData(lab / "results.tsv")))["current"]["phase"] == "training"


def test_with_several_workers_the_other_runs_in_flight_are_listed(tmp_path):
    """In parallel mode several runs have no row yet; the page follows the newest and names the others
    (their logs come back from the workers when they end). Runs left by an earlier loop are not listed."""
    lab = make_lab(tmp_path / "lab")
    orphan = lab / "runs" / "6"  # left by an earlier, interrupted loop
    orphan.mkdir()
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    lock = lab / ".autoresearch.lock"
    lock.write_text(f"{os.getpid()}\n")  # this loop started a minute ago
    os.utime(lock, (time.time() - 60, time.time() - 60))
    for n in (7, 8, 9):
        (lab / "runs" / str(n)).mkdir()
        (lab / "runs" / str(n) / "diff.patch").write_text(f"-LR = 1\n+LR = {n}\n")
    s = state(client(live.LiveData(lab / "results.tsv")))
    assert s["current"]["run"] == 9 and s["in_flight"] == [7, 8]
    lock.unlink()  # no loop: nothing is in flight
    assert state(client(live.LiveData(lab / "results.tsv")))["in_flight"] == []
