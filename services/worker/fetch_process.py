"""ProcessFetcher: the worker's delta downloads in child processes, off the engine's GIL.

A download is gRPC messages parsed, written and hashed in Python. Run in a thread of the worker process it holds
the GIL often enough to slow the engine loop: on a 2-core box one download doubled the median time of a Python
loop running beside it (1.9 -> 4.0 ms) and four made it 5x, while the same downloads in child processes left it
at 2.1 ms (`bench/fetch_gil.py`). On the 4-GPU scale-out run, workers that were downloading took ~80 ms a step
against ~30 ms for one that was not.

Each child keeps a `DeltaFetcher` and one channel per store address between jobs; the parent passes the store
addresses it would use at call time (the configured ones, else the live ones from Redis), so store discovery
stays in the parent. Resuming, integrity checks and the atomic rename into the cache are DeltaFetcher's, as
before; errors come back as the same typed exceptions.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from deltazip.artifact.errors import ArtifactError
from deltazip.rpc.errors import ServiceError
from deltazip.security.tls import PLAINTEXT, TlsSettings
from services.worker.errors import StoreUnavailableError
from services.worker.fetcher import DeltaFetcher


@dataclass(frozen=True)
class FetchSettings:
    """What a child needs to build its DeltaFetcher (picklable)."""

    cache_dir: str
    base_identity: str
    max_attempts: int
    chunk_bytes: int
    tls: TlsSettings = PLAINTEXT
    token: str = ""


class ProcessFetcher:
    """fetch(name) -> (local dir, bytes), like DeltaFetcher, done in one of `processes` child processes."""

    def __init__(self, settings: FetchSettings, addresses: Callable[[], list[str]], processes: int = 2) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self.settings = settings
        self.cache_dir = settings.cache_dir
        self._addresses = addresses
        self._local = DeltaFetcher(settings.cache_dir, lambda: [], settings.base_identity)  # cached() only
        # spawn: a fork of a process holding CUDA contexts and threads is not safe
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))

    def cached(self) -> list[tuple[str, str, int]]:
        return self._local.cached()

    def fetch(self, name: str) -> tuple[str, int]:
        addresses = list(self._addresses())
        if not addresses:
            raise StoreUnavailableError(
                "no delta store is alive (none in Redis, none configured with --store-addresses)")
        try:
            return self._pool.submit(_fetch_in_child, self.settings, tuple(addresses), name).result()
        except BrokenProcessPool as exc:  # a child died (killed, out of memory): the next fetch gets a new pool
            self._pool = ProcessPoolExecutor(self._pool._max_workers, mp_context=multiprocessing.get_context("spawn"))
            raise StoreUnavailableError(f"the download process for {name!r} died ({exc}); the request can be "
                                        "retried") from None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---- child side ---------------------------------------------------------------------------------------------
class _ChildState:
    """One per child process: a channel per store address and a DeltaFetcher per settings, kept between jobs."""

    def __init__(self) -> None:
        self.sources: dict[str, object] = {}  # address -> GrpcStoreSource
        self.current: list = []  # this job's sources, in the parent's order
        self.fetchers: dict[FetchSettings, DeltaFetcher] = {}


_child = _ChildState()


def _fetch_in_child(settings: FetchSettings, addresses: tuple[str, ...], name: str) -> tuple[str, int]:
    from services.worker.store_client import GrpcStoreSource

    for address in addresses:
        if address not in _child.sources:
            _child.sources[address] = GrpcStoreSource(address, tls=settings.tls, token=settings.token)
    _child.current = [_child.sources[a] for a in addresses]
    fetcher = _child.fetchers.get(settings)
    if fetcher is None:
        fetcher = _child.fetchers[settings] = DeltaFetcher(
            settings.cache_dir, lambda: _child.current, settings.base_identity, max_attempts=settings.max_attempts,
            chunk_bytes=settings.chunk_bytes)
    try:
        return fetcher.fetch(name)
    except (ServiceError, ArtifactError, OSError):
        raise  # typed and picklable: the parent raises the same error
    except Exception as exc:  # anything else might not cross the process boundary with its meaning
        raise StoreUnavailableError(f"fetching {name!r} failed: {type(exc).__name__}: {exc}") from None
