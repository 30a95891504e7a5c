"""ProcessFetcher against a real delta store: downloads in a child process land verified in the disk cache, and
errors come back as the same typed exceptions as an in-process DeltaFetcher's."""

import os
import signal

import pytest

from bench.synthetic import write_suite
from deltazip.artifact.identity import base_identity
from deltazip.client import Client
from services.worker.errors import BaseMismatchError, DeltaNotFoundError, StoreUnavailableError
from services.worker.fetch_process import FetchSettings, ProcessFetcher
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)


def test_child_process_download_and_typed_errors(launcher, tmp_path):
    base_dir, arts = write_suite(tmp_path / "models", "tiny", 1)
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    with Client("127.0.0.1:1", store=store.address, timeout_s=60) as client:
        client.push(arts["ft-000"], "ft-a", progress=False)
    cache = tmp_path / "cache"
    fetcher = ProcessFetcher(FetchSettings(str(cache), base_identity(base_dir), 3, 1 << 20), lambda: [store.address])
    try:
        path, num_bytes = fetcher.fetch("ft-a")
        assert path == str(cache / "ft-a") and (cache / "ft-a" / "manifest.json").is_file()
        assert num_bytes == sum(f.stat().st_size for f in arts["ft-000"].rglob("*") if f.is_file())
        assert [(n, p) for n, p, _ in fetcher.cached()] == [("ft-a", path)]
        with pytest.raises(DeltaNotFoundError, match="ft-missing"):
            fetcher.fetch("ft-missing")
        for proc in list(fetcher._pool._processes.values()):  # a download process dies (OOM killer, kill -9)
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        with pytest.raises(StoreUnavailableError, match="can be retried"):
            fetcher.fetch("ft-a")
        assert fetcher.fetch("ft-a")[0] == path  # the retry gets a fresh process
    finally:
        fetcher.close()
    with pytest.raises(StoreUnavailableError, match="shutting down"):
        fetcher.fetch("ft-a")
    other_base = ProcessFetcher(FetchSettings(str(tmp_path / "cache2"), "another-base", 3, 1 << 20),
                                lambda: [store.address])
    no_store = ProcessFetcher(FetchSettings(str(tmp_path / "cache3"), "x", 3, 1 << 20), lambda: [])
    try:
        with pytest.raises(BaseMismatchError):
            other_base.fetch("ft-a")
        with pytest.raises(StoreUnavailableError, match="no delta store is alive"):
            no_store.fetch("ft-a")
    finally:
        other_base.close()
        no_store.close()
