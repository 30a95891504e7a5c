"""Model registry: registered fine-tunes (written by the delta store) and the cluster's base model."""

import re
from dataclasses import dataclass

import redis.asyncio as aioredis

from deltazip.cluster import keys
from deltazip.cluster.connection import now_ms
from deltazip.cluster.records import from_hash, to_hash
from deltazip.security.principal import Ownership

# What a fine-tune may be called (the delta store refuses other names): never a path, never hidden.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MODEL_NAME_RULE = "1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One registered fine-tune as stored in `dz:model:<name>`."""

    name: str
    base_identity: str = ""
    base: str = ""
    artifact_bytes: int = 0
    compression_ratio: float = 0.0
    compression: str = ""
    created_unix_ms: int = 0
    store_id: str = ""
    tenant: str = ""  # owner ('' = pushed with auth off, or before tenants existed)
    shared: bool = False  # visible to every tenant (still changed only by its owner or an admin)

    def ownership(self) -> Ownership:
        return Ownership(self.tenant, self.shared)


@dataclass(frozen=True, slots=True)
class BaseRecord:
    """The base model all workers serve (`dz:base`)."""

    name: str
    identity: str = ""
    updated_ms: int = 0


class ModelRegistry:
    """Reads and writes `dz:models`, `dz:model:<name>` and `dz:base`."""

    def __init__(self, redis: aioredis.Redis):
        self.redis = redis

    async def register(self, record: ModelRecord) -> None:
        """Add or replace a model's entry atomically."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.model(record.name))
            pipe.hset(keys.model(record.name), mapping=to_hash(record))
            pipe.sadd(keys.models(), record.name)
            await pipe.execute()

    async def unregister(self, name: str) -> bool:
        """Remove a model's entry; True if it was registered."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.model(name))
            pipe.srem(keys.models(), name)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def get(self, name: str) -> ModelRecord | None:
        """The entry for `name`, or None."""
        data = await self.redis.hgetall(keys.model(name))
        return from_hash(ModelRecord, data) if data else None

    async def get_with_base(self, name: str) -> tuple[ModelRecord | None, "BaseRecord | None"]:
        """`get(name)` and `base()` in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.model(name))
            pipe.hgetall(keys.base())
            model, base = await pipe.execute()
        return (from_hash(ModelRecord, model) if model else None), (from_hash(BaseRecord, base) if base else None)

    async def list(self) -> list[ModelRecord]:
        """Every registered model, sorted by name."""
        names = sorted(await self.redis.smembers(keys.models()))
        if not names:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(keys.model(name))
            rows = await pipe.execute()
        return [from_hash(ModelRecord, row) for row in rows if row]

    async def set_base(self, name: str, identity: str = "") -> None:
        """Publish the base model (workers call this at start)."""
        await self.redis.hset(keys.base(), mapping={"name": name, "identity": identity, "updated_ms": now_ms()})

    async def base(self) -> BaseRecord | None:
        """The published base model, or None before any worker started."""
        data = await self.redis.hgetall(keys.base())
        if not data:
            return None
        return from_hash(BaseRecord, data)
