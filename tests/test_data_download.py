"""Tests for data/download.py and the hub protocols end to end, against a local hub on 127.0.0.1.

Run: uv run pytest tests/test_data_download.py      (CPU, no network, ~15 s)

The local hub answers the resolve URLs the way huggingface.co does for large files, so the real
huggingface_hub client runs unchanged against it (HF_ENDPOINT points at it): a HEAD or GET of
/datasets/<repo>/resolve/<revision>/<file> is a 302 carrying the file's metadata (X-Repo-Commit,
X-Linked-Etag, X-Linked-Size) with a Location on a second server, the "CDN", which serves the bytes with
Content-Length and honours Range. huggingface_hub reads HF_HOME once, when first imported (by the
first download here), so these tests give it an empty one: no stored token, no hub cache of the user's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import REPO, flip_middle, parquet_bytes, shakespeare_texts

import prepare
from data import download
from data.files import check_parquet

COMMIT = "4d1b0f3c2e5a6978b1c2d3e4f5a6b7c8d9e0f1a2"  # what the hub reports as the revision's commit


class FakeHub:
    """The local hub and its CDN, with knobs for the failures a real download meets."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()  # the next GET of these stops halfway and hangs up
        self.fail_get: dict[str, int] = {}  # this many GETs of a file answer 503 before it is served
        self.slow_s: float = 0.0  # each GET takes about this long, its body sent in 20 pieces
        self.token: str | None = None  # when set, the hub refuses requests without this token (a gated dataset)
        self.plain = False  # when set, the "hub" answers as a plain file server, without the hub's headers
        self.requests: list[tuple[str, str, str, str | None, str | None]] = []  # method, server, file, Range, auth
        self.active = self.max_active = 0  # GETs being served at once
        self.lock = threading.Lock()
        self.hub, self.cdn = _Server(self, "hub"), _Server(self, "cdn")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    def gets(self) -> list[tuple[str, str | None]]:
        """(file, Range) of every GET the CDN served."""
        return [(name, rng) for method, server, name, rng, _ in self.requests if (method, server) == ("GET", "cdn")]

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: FakeHub, role: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state, self.role = state, role
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _reply(self, code: int, headers: dict[str, str]) -> None:
        self.send_response(code)
        for key, value in {"Content-Length": "0", **headers}.items():
            self.send_header(key, value)
        self.end_headers()

    def _answer(self, body: bool) -> None:
        state: FakeHub = self.server.state  # type: ignore[attr-defined]
        path = urllib.parse.urlsplit(self.path).path
        name = path.rpartition("/")[2]
        state.requests.append((self.command, self.server.role, name, self.headers.get("Range"),  # type: ignore[attr-defined]
                               self.headers.get("Authorization")))
        if self.server.role == "hub":  # type: ignore[attr-defined]
            self._resolve(state, path, name)
        else:
            self._serve(state, name, body)

    def _resolve(self, state: FakeHub, path: str, name: str) -> None:
        if not re.fullmatch(r"/datasets/[^/]+/[^/]+/resolve/main/[^/]+", path):
            self._reply(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        elif state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
            self._reply(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this dataset is restricted"})
        elif state.plain and name in state.files:
            self._reply(200, {"Content-Length": str(len(state.files[name]))})
        elif name not in state.files:
            self._reply(404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": COMMIT})
        else:
            data = state.files[name]
            cdn = f"http://127.0.0.1:{state.cdn.server_address[1]}/blobs/{name}?signature=local"
            self._reply(302, {"Location": cdn, "X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                              "X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})

    def _serve(self, state: FakeHub, name: str, body: bool) -> None:
        data = state.files.get(name)
        if data is None:
            self._reply(404, {})
            return
        if body and state.fail_get.get(name, 0) > 0:
            state.fail_get[name] -= 1
            self._reply(503, {})
            return
        start = int(re.match(r"bytes=(\d+)-", self.headers.get("Range") or "bytes=0-").group(1))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if not body:
            return
        with state.lock:
            state.active += 1
            state.max_active = max(state.max_active, state.active)
        try:
            rest = data[start:]
            if name in state.drop_once:
                state.drop_once.discard(name)
                self.wfile.write(rest[: len(rest) // 2])
                self.close_connection = True
                return
            step = -(-len(rest) // 20)
            for i in range(0, len(rest), step):
                self.wfile.write(rest[i : i + step])
                time.sleep(state.slow_s / 20)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with state.lock:
                state.active -= 1

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module", autouse=True)
def private_hf_home(tmp_path_factory):
    """An empty HF_HOME, no token, no telemetry, for this module's tests and what they start."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
        for name in ("HF_HUB_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
            mp.delenv(name, raising=False)
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        yield


@pytest.fixture
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(download, "DOWNLOAD_BACKOFF_S", 0.01)
    yield server
    server.close()


STANDARD = prepare.PROTOCOLS["standard"]


def leftovers(folder: Path) -> list[str]:
    """Anything under `folder` that is not a finished file: staging folders, partial downloads."""
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.suffix in (".part", ".incomplete", ".tmp"))


# --- downloads ----------------------------------------------------------------------


def test_downloads_run_in_parallel_through_the_hub_redirect(hub, tmp_path):
    hub.files = {f"shard_0000{i}.parquet": parquet_bytes([f"text {i} " * 50] * 200) for i in range(3)}
    hub.slow_s = 0.3
    download.download_files(STANDARD, [(name, tmp_path / name) for name in hub.files], workers=3)
    for name, body in hub.files.items():
        assert (tmp_path / name).read_bytes() == body
    assert not leftovers(tmp_path) and sorted(f.name for f in tmp_path.iterdir()) == sorted(hub.files)
    assert hub.max_active >= 2  # served at the same time
    assert {(m, s, n) for m, s, n, _, _ in hub.requests} == {
        (m, s, n) for n in hub.files for m, s in (("HEAD", "hub"), ("GET", "cdn"))}


def test_dropped_connection_is_resumed_with_a_range_request(hub, tmp_path):
    # ~24 MB: huggingface_hub writes in 10 MB pieces and resumes after the last whole one
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"{i:09d} " + "of a long shard " * 6 for i in range(230_000)]}), buf,
                   compression="none", use_dictionary=False)
    body = buf.getvalue()
    hub.files = {"shard_00000.parquet": body}
    hub.drop_once = {"shard_00000.parquet"}
    dest = tmp_path / "shard_00000.parquet"
    download.download_file(STANDARD, dest.name, dest)
    assert dest.read_bytes() == body and not leftovers(tmp_path)
    (_, first), (_, second) = hub.gets()
    assert first is None and 0 < int(re.fullmatch(r"bytes=(\d+)-", second).group(1)) < len(body)  # resumed, not restarted


def test_server_errors_are_retried_then_named(hub, tmp_path):
    body = parquet_bytes(["a shard"] * 100)
    hub.files = {"shard_00000.parquet": body}
    dest = tmp_path / "shard_00000.parquet"
    hub.fail_get = {dest.name: 2}
    download.download_file(STANDARD, dest.name, dest, retries=3)
    assert dest.read_bytes() == body and len(hub.gets()) == 3
    dest.unlink()
    hub.fail_get = {dest.name: 5}
    with pytest.raises(prepare.PrepareError, match=r"Downloading shard_00000.parquet failed 2 times \(HTTP 503\); "
                                                   r"rerun: uv run prepare.py --protocol standard to resume"):
        download.download_file(STANDARD, dest.name, dest, retries=2)
    assert not list(tmp_path.iterdir())  # never a half file under the final name, nothing left behind


def test_missing_file_is_a_clear_error_without_retries(hub, tmp_path):
    with pytest.raises(prepare.PrepareError, match=r"HTTP 404 for shard_00007.parquet of karpathy/climbmix.*--num-shards"):
        download.download_file(STANDARD, "shard_00007.parquet", tmp_path / "shard_00007.parquet")
    assert len(hub.requests) == 1 and not list(tmp_path.iterdir())


def test_corrupt_download_never_lands(hub, tmp_path):
    hub.files = {"shard_00000.parquet": b"PAR1 this is not parquet at all"}
    with pytest.raises(prepare.PrepareError, match="failed 2 times .downloaded file is not valid parquet"):
        download.download_file(STANDARD, "shard_00000.parquet", tmp_path / "shard_00000.parquet", retries=2)
    assert not list(tmp_path.iterdir()) and len(hub.gets()) == 2  # fetched again, not taken from a cache


def test_a_gated_dataset_needs_a_token_which_never_leaves_the_hub(hub, tmp_path, monkeypatch):
    hub.files = {"shard_00000.parquet": parquet_bytes(["gated text"] * 10)}
    hub.token = "hf_local_test_token"
    dest = tmp_path / "shard_00000.parquet"
    with pytest.raises(prepare.PrepareError, match=r"refused karpathy/climbmix-400b-shuffle \(HTTP 401.*HF_TOKEN"):
        download.download_file(STANDARD, dest.name, dest)
    assert len(hub.requests) == 1 and not list(tmp_path.iterdir())
    monkeypatch.setenv("HF_TOKEN", hub.token)
    download.download_file(STANDARD, dest.name, dest)
    assert dest.read_bytes() == hub.files[dest.name]
    sent = {(server, auth) for _, server, _, _, auth in hub.requests[1:]}
    assert sent == {("hub", f"Bearer {hub.token}"), ("cdn", None)}


def test_a_server_that_is_not_a_hub_is_named(hub, tmp_path):
    hub.files = {"shard_00000.parquet": parquet_bytes(["text"])}
    hub.plain = True
    with pytest.raises(prepare.PrepareError, match=rf"The server at {hub.url} does not answer as a Hugging Face hub "
                                                   r"does .*X-Repo-Commit.*check HF_ENDPOINT"):
        download.download_file(STANDARD, "shard_00000.parquet", tmp_path / "shard_00000.parquet")
    assert len(hub.requests) == 1 and not list(tmp_path.iterdir())


def test_unreachable_hub_points_to_the_offline_protocol(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's own backoff, ~20 s
    with pytest.raises(prepare.PrepareError) as err:
        prepare.prepare(STANDARD, num_shards=1)
    message = str(err.value)
    assert message.startswith(f"Cannot reach the Hugging Face hub at http://127.0.0.1:{port}")
    assert message.endswith("or work offline with: uv run prepare.py --protocol tiny")
    assert not list(tmp_path.rglob("*.parquet")) and not leftovers(tmp_path)


def test_offline_mode_is_named_and_sends_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(prepare.PrepareError, match=r"HF_HUB_OFFLINE is set.*--protocol tiny"):
        prepare.prepare(STANDARD, num_shards=1)
    assert hub.requests == []


def test_interrupted_download_exits_cleanly_and_leaves_no_partial_shard(hub, tmp_path):
    hub.files = {name: parquet_bytes([f"{name} row {i}" for i in range(30000)])
                 for name in ("shard_00000.parquet", "shard_06541.parquet", "shard_06542.parquet")}
    hub.slow_s = 3.0
    env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), "--protocol", "standard", "--num-shards", "1"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not hub.gets() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().endswith("prepare.py: interrupted; run the same command again to resume.")
    assert not list(tmp_path.rglob("*.parquet")) and not leftovers(tmp_path)


# --- the hub protocols end to end ---------------------------------------------------


def test_standard_prepare_end_to_end_against_a_local_hub(hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    texts = shakespeare_texts(6)  # ~800 rows, ~0.7M characters
    hub.files = {"shard_00000.parquet": parquet_bytes(texts[:-200]),
                 "shard_06541.parquet": parquet_bytes(texts[-200:-100]),
                 "shard_06542.parquet": parquet_bytes(texts[-100:])}
    hub.drop_once = {"shard_06542.parquet"}
    prepare.prepare(STANDARD, num_shards=1, download_workers=2)
    p = STANDARD
    assert prepare.is_prepared(p) and [s.name for s in prepare.split_shards(p, "train")] == ["shard_00000.parquet"]
    assert prepare.Tokenizer.load(p).vocab_size == 8192 and not leftovers(tmp_path)
    capsys.readouterr()
    n_requests = len(hub.requests)
    prepare.prepare(p, num_shards=1)
    assert "nothing to do" in capsys.readouterr().out and len(hub.requests) == n_requests
    x, y, _ = next(prepare.make_dataloader(p, 2, None, "val"))
    assert x.shape == (2, 2048)
    prepare.verify_prepared(p)
    # A damaged evaluation shard, whole but for bytes in its middle, is fetched again by the same command
    shard = tmp_path / "standard" / "data" / "shard_06541.parquet"
    shard.write_bytes(flip_middle(shard.read_bytes()))
    check_parquet(shard, p)  # the footer still reads
    with pytest.raises(prepare.PrepareError, match=r"shard_06541.parquet does not match the content hash"):
        prepare.verify_prepared(p)
    prepare.prepare(p, num_shards=1)
    assert shard.read_bytes() == hub.files["shard_06541.parquet"] and hub.gets()[-1][0] == "shard_06541.parquet"
    prepare.verify_prepared(p)
    shard.write_bytes(b"garbage")  # cut short: its footer names it first
    with pytest.raises(prepare.PrepareError, match="shard_06541.parquet is corrupt"):
        prepare.verify_prepared(p)
    prepare.prepare(p, num_shards=1)
    prepare.verify_prepared(p)


def test_compact_reshards_a_single_file_hub_dataset(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    p = dataclasses.replace(prepare.PROTOCOLS["compact"], val_rows=50, holdout_rows=40, rows_per_shard=300)
    texts = shakespeare_texts(6)
    hub.files = {p.hub_files[0]: parquet_bytes(texts)}
    prepare.prepare(p)
    val, holdout, train = (prepare.split_shards(p, s) for s in ("val", "holdout", "train"))
    assert pq.read_table(val[0])["text"].to_pylist() == texts[:50]
    assert pq.read_table(holdout[0])["text"].to_pylist() == texts[50:90]
    assert [t for s in train for t in pq.read_table(s)["text"].to_pylist()] == texts[90:]
    assert prepare.is_prepared(p) and prepare.Tokenizer.load(p).vocab_size == 4096
