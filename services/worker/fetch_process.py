"""ProcessFetcher: the worker's delta downloads in child processes, off the engine's GIL.

A download is gRPC messages parsed, written and hashed in Python. Run in a thread of the worker process it holds
the GIL often enough to slow the engine loop: on a 2-core box a Python loop beside one download ran at 1.77x its
idle time with the download in a thread and 1.01x with it in a child process (4 downloads: 4.09x vs 1.94x;
`bench/fetch_gil.py`, bench/results/fetch-gil-cpu2-2026-11-27.json). On the 4-GPU scale-out run, workers that were
downloading took 70-87 ms a step against ~30 ms for one that was not.

Each child keeps a `DeltaFetcher` and one channel per store address between jobs; the parent passes the store
addresses it would use at call time (the configured ones, else the live ones from Redis), so store discovery
stays in the parent. Resuming, integrity checks and the atomic rename into the cache are DeltaFetcher's, as
before; errors come back as the same typed exceptions.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from deltazip.artifact.errors import ArtifactError
from deltazip.child_process import die_with_parent
from deltazip.rpc.errors import ServiceError
from deltazip.security.tls import PLAINTEXT, TlsSettings
from services.worker.errors import StoreUnavailableError
from services.worker.fetcher import NO_STORE, DeltaFetcher


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
        self._processes = processes
        self._local = DeltaFetcher(settings.cache_dir, lambda: [], settings.base_identity)  # cached() only
        self._lock = threading.Lock()
        self._closed = False
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # spawn: a fork of a process holding CUDA contexts and threads is not safe
        return ProcessPoolExecutor(self._processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_child_init, initargs=(os.getpid(),))

    def cached(self) -> list[tuple[str, str, int]]:
        return self._local.cached()

    def fetch(self, name: str) -> tuple[str, int]:
        addresses = list(self._addresses())
        if not addresses:
            raise StoreUnavailableError(NO_STORE)
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"the worker is shutting down; {name!r} was not fetched")
            pool = self._pool
        try:
            return pool.submit(_fetch_in_child, self.settings, tuple(addresses), name).result()
        except (BrokenProcessPool, CancelledError, RuntimeError) as exc:  # a child died (killed, out of memory), we
            # closed, or another thread replaced the pool as we submitted (RuntimeError: it was shut down)
            with self._lock:
                if self._pool is pool and not self._closed:
                    self._pool = self._new_pool()
                    pool.shutdown(wait=False, cancel_futures=True)
            raise StoreUnavailableError(f"the download process for {name!r} stopped ({exc}); the request can be "
                                        "retried") from None

    def close(self) -> None:
        """Stop the children now, downloads in flight included (their partial files stay and are resumed by the
        next fetch of that delta); a fetch waiting on one raises StoreUnavailableError."""
        with self._lock:
            self._closed = True
            pool = self._pool
        for proc in list((pool._processes or {}).values()):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


# ---- child side ---------------------------------------------------------------------------------------------
def _child_init(parent_pid: int) -> None:
    """Ctrl-C goes to the worker, which stops us; and we exit when the worker dies, even by SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid, lambda: os._exit(0))


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
    except (ServiceError, ArtifactError, OSError) as exc:
        try:  # the parent raises the same typed error, if it survives pickling (an error that does not would
            pickle.loads(pickle.dumps(exc))  # break the pool, failing every download in flight)
        except Exception:
            raise StoreUnavailableError(f"fetching {name!r} failed: {type(exc).__name__}: {exc}") from None
        raise
    except Exception as exc:  # anything else might not cross the process boundary with its meaning
        raise StoreUnavailableError(f"fetching {name!r} failed: {type(exc).__name__}: {exc}") from None
