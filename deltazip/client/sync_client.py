"""Blocking SDK client: generate/stream/chat through a scheduler; push/delete/stat against a delta store."""

from collections.abc import Iterator
from pathlib import Path

import grpc

from deltazip.client.addresses import scheduler_address, store_address
from deltazip.client.credentials import call_metadata, client_tls, client_token
from deltazip.client.errors import error_from_rpc
from deltazip.client.fetch import RESUMABLE, Download
from deltazip.client.push import push_requests, scan_artifact
from deltazip.client.requests import generate_request
from deltazip.client.types import ArtifactFile, Completion, CompletionBuilder, ModelInfo, Token, file_from_proto, model_from_proto, token_from_proto
from deltazip.rpc.channels import sync_channel
from deltazip.security.tls import TlsSettings
from deltazip.v1 import common_pb2, delta_store_pb2, delta_store_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

TIERS = {"device": common_pb2.RESIDENCY_TIER_DEVICE, "host": common_pb2.RESIDENCY_TIER_HOST}


class Client:
    """`Client("host:port").generate("my-ft", "Hello")`; errors are DeltaZipError subclasses.

    `token` (default $DELTAZIP_TOKEN) is sent as `authorization: Bearer`; `tls` (default from $DELTAZIP_TLS_CA,
    see `deltazip.client.credentials.client_tls`) secures both the scheduler and the store channels.
    """

    def __init__(self, address: str | None = None, *, store: str | None = None, timeout_s: float | None = None,
                 token: str | None = None, tls: TlsSettings | bool | None = None):
        self.address = scheduler_address(address)
        self.store = store_address(store)
        self.timeout_s = timeout_s
        self.token = client_token(token)
        self.tls = client_tls(tls)
        self._channel: grpc.Channel | None = None
        self._store_channels: dict[str, grpc.Channel] = {}

    # -- scheduler ------------------------------------------------------------------------------------------
    def stream(self, model: str, prompt: str | None = None, *, messages=None, request_id: str | None = None,
               timeout_s: float | None = None, **sampling) -> Iterator[Token]:
        """Tokens as they are generated, in chunks (see `Token`); closing the iterator cancels the request."""
        request = generate_request(model, prompt, messages, request_id, sampling)
        call = self._scheduler().Generate(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata(self.address))
        try:
            for chunk in call:
                yield token_from_proto(chunk)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    def generate(self, model: str, prompt: str, *, request_id: str | None = None, timeout_s: float | None = None,
                 **sampling) -> Completion:
        """The whole completion for `prompt`."""
        return self._collect(model, self.stream(model, prompt, request_id=request_id, timeout_s=timeout_s, **sampling))

    def chat(self, model: str, messages, *, request_id: str | None = None, timeout_s: float | None = None,
             **sampling) -> Completion:
        """The assistant's reply to `messages` ([{"role", "content"}, ...]), rendered with the model's template."""
        tokens = self.stream(model, messages=messages, request_id=request_id, timeout_s=timeout_s, **sampling)
        return self._collect(model, tokens)

    def models(self) -> list[ModelInfo]:
        """The base model and every registered fine-tune."""
        reply = self._unary(self._scheduler().ListModels, scheduler_pb2.ListModelsRequest(), self.address)
        return [model_from_proto(m) for m in reply.models]

    def get_model(self, name: str) -> ModelInfo:
        return model_from_proto(self._unary(self._scheduler().GetModel, scheduler_pb2.GetModelRequest(name=name), self.address))

    def prefetch(self, model: str, tier: str = "device", num_workers: int = 1) -> list[str]:
        """Ask workers to load `model` ahead of traffic; returns their ids."""
        request = scheduler_pb2.PrefetchRequest(model=model, tier=TIERS[tier], num_workers=num_workers)
        return list(self._unary(self._scheduler().Prefetch, request, self.address).worker_ids)

    # -- delta store ----------------------------------------------------------------------------------------
    def push(self, path: str | Path, name: str, *, overwrite: bool = False, progress: bool = True,
             store: str | None = None, shared: bool = False) -> ModelInfo:
        """Upload an artifact folder (manifest.json + shards) under `name`; sha256 is checked by the store.

        The model belongs to the token's tenant; `shared` (admin tokens) makes it visible to every tenant.
        """
        from tqdm import tqdm

        files = scan_artifact(path)
        stub = self._store_stub(store)
        with tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc=f"push {name}", disable=not progress) as bar:
            requests = push_requests(name, files, overwrite, bar.update, shared)
            reply = self._unary(stub.PushDelta, requests, store or self.store)
        return model_from_proto(reply.model)

    def fetch(self, name: str, dest: str | Path, *, store: str | None = None, max_attempts: int = 3) -> Path:
        """Download a stored model to folder `dest` (must not exist); resumes a broken stream, checks sha256."""
        download = Download(name, dest)
        stub = self._store_stub(store)
        try:
            for attempt in range(1, max_attempts + 1):
                try:
                    for chunk in stub.FetchDelta(download.request(), timeout=self.timeout_s,
                                                 metadata=self._metadata(store or self.store)):
                        download.add(chunk)
                    break
                except grpc.RpcError as exc:
                    if exc.code() not in RESUMABLE or attempt == max_attempts:
                        raise error_from_rpc(exc) from None
            return download.commit()
        finally:
            download.cleanup()

    def delete(self, name: str, *, store: str | None = None) -> bool:
        """Remove a model from the store and the registry."""
        return self._unary(self._store_stub(store).DeleteDelta, delta_store_pb2.DeleteDeltaRequest(name=name),
                           store or self.store).deleted

    def stat(self, name: str, *, store: str | None = None) -> tuple[ModelInfo, list[ArtifactFile]]:
        """A stored model and its files."""
        reply = self._unary(self._store_stub(store).StatDelta, delta_store_pb2.StatDeltaRequest(name=name), store or self.store)
        return model_from_proto(reply.model), [file_from_proto(f) for f in reply.files]

    def stored_models(self, *, store: str | None = None) -> list[ModelInfo]:
        """Models on one store's disk."""
        reply = self._unary(self._store_stub(store).ListDeltas, delta_store_pb2.ListDeltasRequest(), store or self.store)
        return [model_from_proto(m) for m in reply.models]

    # -- plumbing -------------------------------------------------------------------------------------------
    def close(self) -> None:
        channels = [c for c in (self._channel, *self._store_channels.values()) if c is not None]
        self._channel, self._store_channels = None, {}
        for channel in channels:
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        if self._channel is None:
            self._channel = sync_channel(self.address, self.tls)
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _store_stub(self, store: str | None) -> delta_store_pb2_grpc.DeltaStoreStub:
        address = store or self.store
        if address not in self._store_channels:
            self._store_channels[address] = sync_channel(address, self.tls)
        return delta_store_pb2_grpc.DeltaStoreStub(self._store_channels[address])

    def _metadata(self, address: str) -> tuple[tuple[str, str], ...]:
        return call_metadata(address, self.tls, self.token)

    def _unary(self, method, request, address: str):
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata(address))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    @staticmethod
    def _collect(model: str, tokens: Iterator[Token]) -> Completion:
        builder = CompletionBuilder(model=model)
        for token in tokens:
            builder.add(token)
        return builder.completion()
