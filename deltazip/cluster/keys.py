"""The Redis key schema: every DeltaZip key is built here, under one prefix.

Key                               Type    Writer               Readers              TTL
dz:base                           hash    worker (on start)    scheduler            none
    name, identity, updated_ms: the base model every worker serves (one base per cluster).
dz:models                         set     delta_store          scheduler, worker    none
    names of registered fine-tunes (index of dz:model:*).
dz:model:<name>                   hash    delta_store          scheduler, worker    none
    ModelRecord: name, base, base_identity, artifact_bytes, compression_ratio, compression,
    created_unix_ms, store_id, tenant (owner), shared (1 = visible to every tenant). Ownership is also
    kept in the store's file index on disk, so a registry rebuilt after Redis loss keeps it.
dz:stores                         set     delta_store          worker, scheduler    none (stale ids pruned by readers)
    ids of delta-store replicas (index of dz:store:*).
dz:store:<id>                     hash    delta_store          worker, scheduler    heartbeat TTL
    address, root, started_ms, heartbeat_ms. Present = store alive.
dz:workers                        set     worker               scheduler            none (stale ids pruned by readers)
    ids of workers (index of dz:worker:*).
dz:worker:<id>                    hash    worker               scheduler            heartbeat TTL
    address, base, base_identity, device, mode, num_device_slots, num_running, num_waiting, queued_tokens,
    free_kv_blocks, total_kv_blocks, started_ms, heartbeat_ms. Present = worker alive.
dz:worker:<id>:resident:<tier>    zset    worker               scheduler            heartbeat TTL
    member = model, score = last use (unix ms); ascending score = LRU order. tier in device|host|disk.
dz:worker:<id>:inflight           zset    scheduler            scheduler            INFLIGHT_TTL_S
    member = request id the schedulers are relaying to the worker, score = lease expiry (unix ms, renewed
    while relaying); admission (Lua) drops expired leases and refuses past --max-queue-per-worker.
dz:queues                         set     scheduler            scheduler            none (stale names pruned by readers)
    models with a dz:queue:<model> hash (index read by the burst detector).
dz:queue:<model>                  hash    scheduler            scheduler            QUEUE_TTL_S
    rate_count, rate_updated_ms: decayed arrival count (rate_count / --rate-tau-s = arrivals/s).
dz:queue:<model>:pending          zset    scheduler            scheduler            QUEUE_TTL_S
    member = request id accepted but without a token yet, score = lease expiry (unix ms, renewed while relayed).
dz:queue:<model>:running          zset    scheduler            scheduler            QUEUE_TTL_S
    member = request id streaming tokens, score = lease expiry; live counts = ZCOUNT now..+inf.
dz:prefetch:<model>               string  scheduler            scheduler            --prefetch-window-s
    id of the scheduler that holds this model's prefetch lease (SET NX PX): one prefetch per model per window.
dz:request:<request_id>           hash    scheduler            scheduler, clients   REQUEST_TTL_S
    request_id, state (RequestState value), model, worker_id, tier (where the delta was when routed:
    device|host|disk|remote), attempts, created_ms, updated_ms, error.
"""

import re
from dataclasses import dataclass

PREFIX = "dz:"

QUEUE_TTL_S = 24 * 3600
REQUEST_TTL_S = 3600
INFLIGHT_TTL_S = 3600
TIERS = ("device", "host", "disk")


def base() -> str:
    return f"{PREFIX}base"


def models() -> str:
    return f"{PREFIX}models"


def model(name: str) -> str:
    return f"{PREFIX}model:{name}"


def stores() -> str:
    return f"{PREFIX}stores"


def store(store_id: str) -> str:
    return f"{PREFIX}store:{store_id}"


def workers() -> str:
    return f"{PREFIX}workers"


def worker(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def worker_resident(worker_id: str, tier: str) -> str:
    assert tier in TIERS, tier
    return f"{PREFIX}worker:{worker_id}:resident:{tier}"


def worker_inflight(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}:inflight"


def queue(model_name: str) -> str:
    return f"{PREFIX}queue:{model_name}"


def queue_pending(model_name: str) -> str:
    return f"{PREFIX}queue:{model_name}:pending"


def queue_running(model_name: str) -> str:
    return f"{PREFIX}queue:{model_name}:running"


def queues() -> str:
    return f"{PREFIX}queues"


def prefetch_lease(model_name: str) -> str:
    return f"{PREFIX}prefetch:{model_name}"


def request(request_id: str) -> str:
    return f"{PREFIX}request:{request_id}"


_PLACEHOLDERS = {"<tier>": "(device|host|disk)", "<request_id>": ".+"}


@dataclass(frozen=True, slots=True)
class KeySpec:
    """One documented key pattern (a row of this module's table)."""

    pattern: str  # e.g. dz:worker:<id>:resident:<tier>
    type: str  # Redis type as TYPE reports it
    writer: str
    readers: str
    ttl: str
    description: str

    def regex(self) -> re.Pattern:
        """Matches concrete keys: a <placeholder> is a name without ':' (request ids may hold ':')."""
        parts = re.split(r"(<[a-z_]+>)", self.pattern)
        body = "".join(_PLACEHOLDERS.get(p, "[^:]+") if p.startswith("<") else re.escape(p) for p in parts)
        return re.compile(f"^{body}$")


def schema() -> list[KeySpec]:
    """The key table of this module's docstring, parsed: the single source for docs and schema checks."""
    rows: list[KeySpec] = []
    for line in __doc__.split("\n"):
        if line.startswith(PREFIX):
            cols = re.split(r"\s{2,}", line.strip(), maxsplit=4)
            rows.append(KeySpec(*cols, description=""))
        elif line.startswith("    ") and rows:
            last = rows[-1]
            rows[-1] = KeySpec(last.pattern, last.type, last.writer, last.readers, last.ttl,
                               (last.description + " " + line.strip()).strip())
    return rows


def match(key: str) -> KeySpec | None:
    """The documented pattern `key` belongs to (most specific first), or None."""
    for spec in sorted(schema(), key=lambda s: -len(s.pattern)):
        if spec.regex().match(key):
            return spec
    return None


def markdown() -> str:
    """docs/redis-keys.md: the key table as Markdown."""
    lines = ["# Redis keys", "",
             "Generated from `deltazip/cluster/keys.py` (`python -m deltazip.cluster.keys > docs/redis-keys.md`);",
             "`tests/unit/cluster/test_keys_schema.py` checks that this file, the code and a live run agree.", "",
             "| Key | Type | Writer | Readers | TTL | Contents |", "|---|---|---|---|---|---|"]
    for s in schema():
        lines.append(f"| `{s.pattern}` | {s.type} | {s.writer} | {s.readers} | {s.ttl} | {s.description} |")
    lines += ["", "TTL constants: " + ", ".join(f"`{n}` = {v} s" for n, v in
              (("QUEUE_TTL_S", QUEUE_TTL_S), ("REQUEST_TTL_S", REQUEST_TTL_S), ("INFLIGHT_TTL_S", INFLIGHT_TTL_S))) + ".",
              "Heartbeat TTLs are the services' `--heartbeat-ttl-s` flags. Multi-key updates use MULTI or Lua.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
