"""DeltaStore servicer: translates protos to storage calls and keeps the Redis registry in step."""

import asyncio
import errno
from collections.abc import Callable

from redis.exceptions import RedisError

from deltazip.cluster.models import ModelRecord, ModelRegistry
from deltazip import metrics
from deltazip.logs import bind_request, get_logger, new_request_id
from deltazip.rpc.auth import Authenticator
from deltazip.rpc.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable, rpc_method
from deltazip.rpc.options import CHUNK_BYTES
from deltazip.v1 import common_pb2, delta_store_pb2, delta_store_pb2_grpc
from deltazip.security.principal import Ownership, Principal, Scope, can_see
from services.delta_store import fetch
from services.delta_store.access import check_delete, check_push, check_visible, not_in_store
from services.delta_store.catalog import describe
from services.delta_store.manifest import check_listed_files, read_summary
from services.delta_store.push import PushSession
from services.delta_store.storage import MANIFEST, DeltaStorage, StoredFile

log = get_logger("delta_store")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no room left, quota, file size limit


def model_info(record: ModelRecord) -> common_pb2.ModelInfo:
    """Registry record → proto."""
    return common_pb2.ModelInfo(
        name=record.name, is_base=False, base=record.base, base_identity=record.base_identity,
        artifact_bytes=record.artifact_bytes, compression_ratio=record.compression_ratio,
        compression=record.compression, created_unix_ms=record.created_unix_ms, tenant=record.tenant,
        shared=record.shared,
    )


async def in_thread(fn: Callable, *args):
    """Run blocking file I/O off the loop; on cancellation wait for the thread so cleanup never races it."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


class DeltaStoreServicer(delta_store_pb2_grpc.DeltaStoreServicer):
    def __init__(self, storage: DeltaStorage, registry: ModelRegistry, store_id: str, max_artifact_bytes: int,
                 auth: Authenticator | None = None):
        self.storage = storage
        self.registry = registry
        self.store_id = store_id
        self.max_artifact_bytes = max_artifact_bytes
        self.auth = auth or Authenticator(None)

    def _owner(self, name: str) -> Ownership | None:
        """Who owns a stored model, None if it is not stored."""
        try:
            return self.storage.ownership(name)
        except NotFound:
            return None

    def _visible(self, principal: Principal, name: str) -> None:
        owner = self._owner(name)
        if owner is None:
            raise not_in_store(name)
        check_visible(principal, name, owner)

    @rpc_method
    async def PushDelta(self, request_iterator, context):
        principal = self.auth.require(context, Scope.WRITE, "pushing a model")
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty push: the first message must be the header listing the files") from None
        if first.WhichOneof("msg") != "header":
            raise InvalidArgument("the first message of a push must be the header listing the files")
        header = first.header
        with bind_request(new_request_id(), model=header.name, tenant=principal.tenant):
            owner = check_push(principal, header.name, self._owner(header.name), header.overwrite, header.shared)
            files = [StoredFile(f.path, f.size, f.sha256.lower()) for f in header.files]
            try:
                session = PushSession(self.storage, header.name, files, self.max_artifact_bytes)
                log.info("push_started", num_files=len(files), num_bytes=sum(f.size for f in files),
                         shared=owner.shared)
                record = await self._receive_and_commit(session, requests, header.overwrite, principal, header.shared)
            except OSError as exc:
                if exc.errno not in DISK_FULL:
                    raise
                raise ResourceExhausted(
                    f"the store ran out of disk space ({exc.strerror}) while writing {header.name!r}; nothing was "
                    "stored: free space under its --root or push to another store") from None
            await self._register(record)
            log.info("push_committed", num_bytes=session.num_bytes)
            metrics.STORE_BYTES.labels("push").inc(session.num_bytes)
            return delta_store_pb2.PushDeltaResponse(model=model_info(record), bytes_received=session.num_bytes)

    async def _receive_and_commit(self, session: PushSession, requests, overwrite: bool, principal: Principal,
                                  shared: bool) -> ModelRecord:
        committed = False
        try:
            async for request in requests:
                if request.WhichOneof("msg") != "chunk":
                    raise InvalidArgument("only the first message of a push may be a header")
                chunk = request.chunk
                await in_thread(session.write, chunk.path, chunk.offset, chunk.data)
            await in_thread(session.finish)
            read_summary(session.staging / MANIFEST)  # reject an unreadable manifest before it becomes visible
            check_listed_files(session.staging / MANIFEST, {f.path: (f.size, f.sha256) for f in session.files})
            # checked again right before the rename: another tenant may have taken the name meanwhile
            owner = check_push(principal, session.name, self._owner(session.name), overwrite, shared)
            await in_thread(self.storage.commit, session.staging, session.name, session.files, overwrite, owner)
            committed = True
        finally:
            if not committed:
                session.abort()
                log.info("push_aborted", num_bytes=session.num_bytes)
        return describe(self.storage, session.name, self.store_id, session.files)

    async def _register(self, record: ModelRecord) -> None:
        try:
            await self.registry.register(record)
        except RedisError as exc:  # keep push all-or-nothing: not registered means not stored
            self.storage.delete(record.name)
            raise Unavailable(f"the store cannot reach Redis ({exc}); the push was rolled back, retry when Redis is up") from exc

    @rpc_method
    async def FetchDelta(self, request, context):
        self._visible(self.auth.require(context, Scope.READ, "fetching a model"), request.name)
        files = self.storage.files(request.name)
        planned = fetch.plan(files, request.start_path, request.start_offset)
        chunk_bytes = min(request.chunk_bytes or CHUNK_BYTES, CHUNK_BYTES)
        handles = fetch.open_all(self.storage, request.name, planned)
        try:
            async for chunk in fetch.stream_chunks(planned, handles, chunk_bytes):
                metrics.STORE_BYTES.labels("fetch").inc(len(chunk.data))
                yield delta_store_pb2.FetchDeltaChunk(
                    path=chunk.path, offset=chunk.offset, data=chunk.data, file_size=chunk.file_size,
                    file_sha256=chunk.file_sha256, last_in_file=chunk.last_in_file,
                )
        finally:
            for handle in handles:
                handle.close()

    @rpc_method
    async def StatDelta(self, request, context):
        self._visible(self.auth.require(context, Scope.READ, "reading a model's files"), request.name)
        files = self.storage.files(request.name)
        record = describe(self.storage, request.name, self.store_id, files)
        return delta_store_pb2.StatDeltaResponse(
            model=model_info(record), files=[delta_store_pb2.FileEntry(path=f.path, size=f.size, sha256=f.sha256) for f in files]
        )

    @rpc_method
    async def ListDeltas(self, request, context):
        principal = self.auth.require(context, Scope.READ, "listing models")
        models = []
        for name in self.storage.names():
            try:
                record = describe(self.storage, name, self.store_id)
            except (NotFound, FileNotFoundError):  # deleted by another replica meanwhile
                continue
            if can_see(principal, record.ownership()):
                models.append(model_info(record))
        return delta_store_pb2.ListDeltasResponse(models=models)

    @rpc_method
    async def DeleteDelta(self, request, context):
        principal = self.auth.require(context, Scope.WRITE, "deleting a model")
        owner = self._owner(request.name)
        if owner is None:  # only in Redis (e.g. another replica's disk): the registry says who owns it
            record = await self.registry.get(request.name)
            owner = record.ownership() if record is not None else None
        if owner is None:
            raise not_in_store(request.name)
        check_delete(principal, request.name, owner)
        on_disk = await in_thread(self.storage.delete, request.name)
        try:
            registered = await self.registry.unregister(request.name)
        except RedisError as exc:
            raise Unavailable(f"deleted from disk but the store cannot reach Redis ({exc}); retry the delete") from exc
        if not (on_disk or registered):
            raise not_in_store(request.name)
        log.info("delta_deleted", model=request.name)
        return delta_store_pb2.DeleteDeltaResponse(deleted=True)


async def sync_registry(storage: DeltaStorage, registry: ModelRegistry, store_id: str) -> int:
    """Register models on disk that Redis lacks (after a Redis restart or a replica joining); returns how many."""
    num_added = 0
    for name in storage.names():
        if await registry.get(name) is None:
            await registry.register(describe(storage, name, store_id))
            num_added += 1
    return num_added
