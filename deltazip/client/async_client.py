"""asyncio SDK client: the same methods as `Client`, awaited."""

from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from deltazip.client.addresses import scheduler_address, store_address
from deltazip.client.credentials import call_metadata, client_tls, client_token
from deltazip.client.errors import error_from_rpc
from deltazip.client.fetch import RESUMABLE, Download
from deltazip.client.push import push_requests, scan_artifact
from deltazip.client.requests import generate_request
from deltazip.client.sync_client import TIERS
from deltazip.client.types import ArtifactFile, Completion, CompletionBuilder, ModelInfo, Token, file_from_proto, model_from_proto, token_from_proto
from deltazip.rpc.channels import aio_channel
from deltazip.security.tls import TlsSettings
from deltazip.v1 import delta_store_pb2, delta_store_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


class AsyncClient:
    """`await AsyncClient("host:port").generate("my-ft", "Hello")`; use `async with` to close channels.

    `token` and `tls` as for `Client`; scheduler calls also take a per-call `token` (the gateway forwards each
    HTTP request's own).
    """

    def __init__(self, address: str | None = None, *, store: str | None = None, timeout_s: float | None = None,
                 token: str | None = None, tls: TlsSettings | bool | None = None):
        self.address = scheduler_address(address)
        self.store = store_address(store)
        self.timeout_s = timeout_s
        self.token = client_token(token)
        self.tls = client_tls(tls)
        self._channel: grpc.aio.Channel | None = None
        self._store_channels: dict[str, grpc.aio.Channel] = {}

    async def stream(self, model: str, prompt: str | None = None, *, messages=None, request_id: str | None = None,
                     timeout_s: float | None = None, token: str | None = None, **sampling) -> AsyncIterator[Token]:
        """Tokens as they are generated, in chunks (see `Token`); leaving the loop early cancels the request."""
        request = generate_request(model, prompt, messages, request_id, sampling)
        call = self._scheduler().Generate(request, timeout=timeout_s or self.timeout_s,
                                          metadata=self._metadata(self.address, token))
        try:
            async for chunk in call:
                yield token_from_proto(chunk)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def generate(self, model: str, prompt: str, *, request_id: str | None = None,
                       timeout_s: float | None = None, token: str | None = None, **sampling) -> Completion:
        """The whole completion for `prompt`."""
        tokens = self.stream(model, prompt, request_id=request_id, timeout_s=timeout_s, token=token, **sampling)
        return await self._collect(model, tokens)

    async def chat(self, model: str, messages, *, request_id: str | None = None, timeout_s: float | None = None,
                   token: str | None = None, **sampling) -> Completion:
        """The assistant's reply to `messages`."""
        return await self._collect(
            model, self.stream(model, messages=messages, request_id=request_id, timeout_s=timeout_s, token=token,
                               **sampling)
        )

    async def models(self, *, token: str | None = None) -> list[ModelInfo]:
        reply = await self._unary(self._scheduler().ListModels, scheduler_pb2.ListModelsRequest(), self.address, token)
        return [model_from_proto(m) for m in reply.models]

    async def get_model(self, name: str, *, token: str | None = None) -> ModelInfo:
        request = scheduler_pb2.GetModelRequest(name=name)
        return model_from_proto(await self._unary(self._scheduler().GetModel, request, self.address, token))

    async def prefetch(self, model: str, tier: str = "device", num_workers: int = 1) -> list[str]:
        request = scheduler_pb2.PrefetchRequest(model=model, tier=TIERS[tier], num_workers=num_workers)
        return list((await self._unary(self._scheduler().Prefetch, request, self.address)).worker_ids)

    async def push(self, path: str | Path, name: str, *, overwrite: bool = False, progress: bool = True,
                   store: str | None = None, shared: bool = False) -> ModelInfo:
        """Upload an artifact folder under `name` (owned by the token's tenant; `shared` needs admin)."""
        from tqdm import tqdm

        files = scan_artifact(path)
        with tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc=f"push {name}", disable=not progress) as bar:
            requests = push_requests(name, files, overwrite, bar.update, shared)
            reply = await self._unary(self._store_stub(store).PushDelta, requests, store or self.store)
        return model_from_proto(reply.model)

    async def fetch(self, name: str, dest: str | Path, *, store: str | None = None, max_attempts: int = 3) -> Path:
        """Download a stored model to folder `dest` (must not exist); resumes a broken stream, checks sha256."""
        download = Download(name, dest)
        stub = self._store_stub(store)
        try:
            for attempt in range(1, max_attempts + 1):
                try:
                    async for chunk in stub.FetchDelta(download.request(), timeout=self.timeout_s,
                                                       metadata=self._metadata(store or self.store)):
                        download.add(chunk)
                    break
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in RESUMABLE or attempt == max_attempts:
                        raise error_from_rpc(exc) from None
            return download.commit()
        finally:
            download.cleanup()

    async def delete(self, name: str, *, store: str | None = None) -> bool:
        reply = await self._unary(self._store_stub(store).DeleteDelta, delta_store_pb2.DeleteDeltaRequest(name=name),
                                  store or self.store)
        return reply.deleted

    async def stat(self, name: str, *, store: str | None = None) -> tuple[ModelInfo, list[ArtifactFile]]:
        reply = await self._unary(self._store_stub(store).StatDelta, delta_store_pb2.StatDeltaRequest(name=name),
                                  store or self.store)
        return model_from_proto(reply.model), [file_from_proto(f) for f in reply.files]

    async def stored_models(self, *, store: str | None = None) -> list[ModelInfo]:
        reply = await self._unary(self._store_stub(store).ListDeltas, delta_store_pb2.ListDeltasRequest(), store or self.store)
        return [model_from_proto(m) for m in reply.models]

    async def close(self) -> None:
        channels = [c for c in (self._channel, *self._store_channels.values()) if c is not None]
        self._channel, self._store_channels = None, {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerStub:
        if self._channel is None:
            self._channel = aio_channel(self.address, self.tls)
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    def _store_stub(self, store: str | None) -> delta_store_pb2_grpc.DeltaStoreStub:
        address = store or self.store
        if address not in self._store_channels:
            self._store_channels[address] = aio_channel(address, self.tls)
        return delta_store_pb2_grpc.DeltaStoreStub(self._store_channels[address])

    def _metadata(self, address: str, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return call_metadata(address, self.tls, self.token if token is None else token)

    async def _unary(self, method, request, address: str, token: str | None = None):
        try:
            return await method(request, timeout=self.timeout_s, metadata=self._metadata(address, token))
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    @staticmethod
    async def _collect(model: str, tokens: AsyncIterator[Token]) -> Completion:
        builder = CompletionBuilder(model=model)
        async for token in tokens:
            builder.add(token)
        return builder.completion()
