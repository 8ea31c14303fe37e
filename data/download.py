"""Downloads from the Hugging Face hub, through huggingface_hub.

Each file comes from `hf_hub_download(dataset, name, repo_type="dataset", local_dir=<dest>.part)`, which
brings the hub client's own machinery: the endpoint from HF_ENDPOINT (a mirror, or a local server in
tests), the token from HF_TOKEN or `hf auth login` (gated datasets), retried metadata requests, a dropped
connection resumed with a Range request, Xet storage where the hub uses it, and a copy from the hub cache
(HF_HUB_CACHE) instead of a download when the file is already there.

Files land in <dest>.part/, never under a name the data layer reads; only when every text value of the
parquet file decodes is it renamed to `dest`, so a half or corrupt download never appears there. The
bytes are kept once, in the protocol's data directory, and not also in the hub cache: the standard
protocol's shards run to hundreds of GB, a sandbox can show a plain file by its path (a link into the hub
cache would need the cache shown too), a cache clean-up cannot remove our data, and a file the integrity
check finds damaged is fetched again instead of re-linked to a shared, equally damaged blob. A download
interrupted by Ctrl-C starts over next time; files that landed before stay.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from data import PrepareError
from data.files import check_parquet

if TYPE_CHECKING:
    from data.protocols import Protocol

DEFAULT_ENDPOINT = "https://huggingface.co"
DOWNLOAD_RETRIES = 5  # attempts per file, around huggingface_hub's own retries
DOWNLOAD_BACKOFF_S = 1.0  # waits 1, 2, 4, 8 s between attempts
DEFAULT_DOWNLOAD_WORKERS = 8

_STOP_DOWNLOADS = threading.Event()  # set on Ctrl-C: running downloads stop at their next chunk


def hub_endpoint() -> str:
    """The hub to download from: HF_ENDPOINT (a mirror, or a local server), else https://huggingface.co.

    Read on every call (huggingface_hub itself reads it once, when imported) and passed to it explicitly.
    """
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _progress_class(on_bytes: Callable[[int], None]) -> type:
    """A tqdm class for huggingface_hub's per-file progress: draws nothing, hands its bytes to `on_bytes`,
    and stops the download with KeyboardInterrupt once _STOP_DOWNLOADS is set."""
    from tqdm import tqdm

    class Progress(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})

        def update(self, n: float | None = 1) -> None:
            if _STOP_DOWNLOADS.is_set():
                raise KeyboardInterrupt  # the partial file is removed; the next run starts this file over
            on_bytes(int(n or 0))

        def update_transfer(self, n: float | None = 1) -> None:
            pass  # Xet also reports network bytes: counted once, through update

    return Progress


def _failure(error: BaseException) -> tuple[str, str]:
    """(kind, detail) of a failed hf_hub_download: kind is missing, denied, not-a-hub, unreachable or retry."""
    from huggingface_hub.errors import (EntryNotFoundError, FileMetadataError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, RepositoryNotFoundError) or status in (401, 403):
            return "denied", f"HTTP {status}"
        if status == 404 or (isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError)):
            return "missing", "HTTP 404"
        if status is not None:
            return "retry", f"HTTP {status}"
    root = chain[-1]
    detail = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:200]}"
    if any(isinstance(e, FileMetadataError) for e in chain):
        return "not-a-hub", detail
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain):
        return "unreachable", detail  # no answer to the metadata request, after huggingface_hub's retries
    return "retry", detail


def download_file(
    p: Protocol,
    filename: str,
    dest: Path,
    *,
    retries: int | None = None,
    backoff_s: float | None = None,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Download `filename` of the protocol's hub dataset to `dest`, checked, then renamed into place.

    Server errors, broken connections and corrupt files are retried (`retries` attempts, waits doubling
    from `backoff_s`; a corrupt file is fetched again bypassing the hub cache). A missing file, a refused
    dataset, an unreachable hub and HF_HUB_OFFLINE end at once in a PrepareError that says what to do.
    """
    from huggingface_hub import hf_hub_download

    retries = DOWNLOAD_RETRIES if retries is None else retries
    backoff_s = DOWNLOAD_BACKOFF_S if backoff_s is None else backoff_s
    endpoint, offline_fix = hub_endpoint(), "or work offline with: uv run prepare.py --protocol tiny"
    if _offline():
        raise PrepareError(f"HF_HUB_OFFLINE is set, so {filename} cannot be downloaded from {p.dataset}; "
                           f"unset it, {offline_fix}")
    staging = dest.with_name(dest.name + ".part")
    last, corrupt = "", False
    try:
        for attempt in range(retries):
            if attempt:
                time.sleep(backoff_s * 2 ** (attempt - 1))
            shutil.rmtree(staging, ignore_errors=True)
            try:
                path = Path(hf_hub_download(p.dataset, filename, repo_type="dataset", local_dir=staging,
                                            endpoint=endpoint, force_download=corrupt, library_name="autoresearch",
                                            tqdm_class=_progress_class(on_bytes)))
            except Exception as e:  # noqa: BLE001 - sorted into what the user can do about it
                kind, last = _failure(e)
                if kind == "missing":
                    raise PrepareError(
                        f"The hub at {endpoint} answered HTTP 404 for {filename} of {p.dataset}; check the dataset name "
                        f"and that the shard exists (a smaller --num-shards), then rerun: uv run prepare.py --protocol {p.name}"
                    ) from None
                if kind == "denied":
                    raise PrepareError(
                        f"The hub at {endpoint} refused {p.dataset} ({last}: gated, private or a wrong token); accept its "
                        f"terms on the dataset's page, set HF_TOKEN or run: hf auth login, then rerun: "
                        f"uv run prepare.py --protocol {p.name}"
                    ) from None
                if kind == "not-a-hub":
                    raise PrepareError(f"The server at {endpoint} does not answer as a Hugging Face hub does ({last}); "
                                       f"check HF_ENDPOINT, {offline_fix}") from None
                if kind == "unreachable":
                    raise PrepareError(f"Cannot reach the Hugging Face hub at {endpoint} ({last}); check your connection, "
                                       f"{offline_fix}") from None
                continue
            try:
                check_parquet(path, p, deep=True)
            except PrepareError:
                last, corrupt = "downloaded file is not valid parquet", True
                continue
            os.replace(path, dest)
            return
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    raise PrepareError(f"Downloading {filename} failed {retries} times ({last}); rerun: uv run prepare.py --protocol "
                       f"{p.name} to resume, {offline_fix}")


def download_files(p: Protocol, jobs: list[tuple[str, Path]], workers: int, **kwargs: Any) -> None:
    """Download (file name in the protocol's dataset, destination) pairs in parallel threads with one
    progress bar; the first failure is raised once the downloads already running have landed."""
    from tqdm import tqdm

    if not jobs:
        return
    bar = tqdm(total=None, unit="B", unit_scale=True, desc=f"{p.name}: downloading {len(jobs)} file(s)")
    lock = threading.Lock()

    def on_bytes(n: int) -> None:
        with lock:
            bar.update(n)

    _STOP_DOWNLOADS.clear()
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))))
    try:
        futures = [pool.submit(download_file, p, name, dest, on_bytes=on_bytes, **kwargs) for name, dest in jobs]
        wait(futures, return_when=FIRST_EXCEPTION)  # then the running downloads finish and land; queued ones are dropped
    except KeyboardInterrupt:
        _STOP_DOWNLOADS.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()
