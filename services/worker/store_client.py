"""GrpcStoreSource: the fetcher's view of one delta store over gRPC (DeltaStore.StatDelta / FetchDelta)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from deltazip.client.credentials import call_metadata
from deltazip.rpc.channels import sync_channel
from deltazip.security.tls import PLAINTEXT, TlsSettings
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc
from services.worker.errors import DeltaNotFoundError, StoreUnavailableError
from services.worker.fetcher import Chunk, RemoteArtifact, RemoteFile

class GrpcStoreSource:
    """One store address; a channel per instance (TLS when `tls` has a CA), reused across fetches."""

    def __init__(self, address: str, stat_timeout_s: float = 10.0, idle_timeout_s: float = 30.0,
                 tls: TlsSettings = PLAINTEXT, token: str = "") -> None:
        self.address = address
        self._channel = sync_channel(address, tls)
        self._refusal = ""  # why calls must not go out: the token would cross the network in plaintext
        self._metadata: tuple[tuple[str, str], ...] = ()
        try:
            self._metadata = call_metadata(address, tls, token)
        except ValueError as exc:
            self._refusal = f"{exc}; give the worker --tls-ca"
        self._stub = delta_store_pb2_grpc.DeltaStoreStub(self._channel)
        self._stat_timeout_s = stat_timeout_s
        self._idle_timeout_s = idle_timeout_s

    def stat(self, name: str) -> RemoteArtifact:
        if self._refusal:
            raise StoreUnavailableError(f"store {self.address}: {self._refusal}")
        try:
            resp = self._stub.StatDelta(delta_store_pb2.StatDeltaRequest(name=name), timeout=self._stat_timeout_s,
                                        metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, name) from exc
        files = tuple(RemoteFile(f.path, f.size, f.sha256) for f in resp.files)
        return RemoteArtifact(name, resp.model.base_identity, files)

    def fetch(self, name: str, start_path: str, start_offset: int, chunk_bytes: int) -> Iterator[Chunk]:
        request = delta_store_pb2.FetchDeltaRequest(name=name, start_path=start_path, start_offset=start_offset,
                                                    chunk_bytes=min(chunk_bytes, 1 << 20))
        if self._refusal:
            raise StoreUnavailableError(f"store {self.address}: {self._refusal}")
        try:
            for msg in self._stub.FetchDelta(request, wait_for_ready=False, metadata=self._metadata):
                yield Chunk(msg.path, msg.offset, msg.data, msg.last_in_file)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, name) from exc

    def close(self) -> None:
        self._channel.close()


def _translate(exc: grpc.RpcError, address: str, name: str) -> Exception:
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.NOT_FOUND:
        return DeltaNotFoundError(f"model {name!r} not found in store {address}")
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        details += "; give the worker an admin token for the stores with --store-token-file (DELTAZIP_STORE_TOKEN_FILE)"
    return StoreUnavailableError(f"store {address} failed for {name!r}: {code} {details}")


class StoreDirectory:
    """Live store sources: the configured addresses, else those Redis lists; channels cached by address."""

    def __init__(self, fixed: tuple[str, ...], live_addresses=None, tls: TlsSettings = PLAINTEXT, token: str = "") -> None:
        self._fixed = fixed
        self._tls = tls
        self._token = token
        self._live = live_addresses or (lambda: [])
        self._sources: dict[str, GrpcStoreSource] = {}
        self._lock = threading.Lock()

    def addresses(self) -> list[str]:
        """The store addresses to use now: the configured ones, else the live ones."""
        return list(self._fixed) or list(self._live())

    @property
    def tls(self) -> TlsSettings:
        return self._tls

    @property
    def token(self) -> str:
        return self._token

    def sources(self) -> list[GrpcStoreSource]:
        addresses = self.addresses()
        with self._lock:
            for address in addresses:
                if address not in self._sources:
                    self._sources[address] = GrpcStoreSource(address, tls=self._tls, token=self._token)
            return [self._sources[a] for a in addresses]

    def close(self) -> None:
        for source in self._sources.values():
            source.close()
