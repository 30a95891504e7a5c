"""The Redis key schema: every DeltaZip key is built here, under one prefix.

Key                               Type    Writer               Readers              TTL
dz:base                           hash    worker (on start)    scheduler            none
    name, identity, updated_ms: the base model every worker serves (one base per cluster).
dz:models                         set     delta_store          scheduler, worker    none
    names of registered fine-tunes (index of dz:model:*).
dz:model:<name>                   hash    delta_store          scheduler, worker    none
    ModelRecord: name, base, base_identity, artifact_bytes, compression_ratio, compression,
    created_unix_ms, store_id, tenant.
dz:stores                         set     delta_store          worker, scheduler    none (stale ids pruned by readers)
dz:store:<id>                     hash    delta_store          worker, scheduler    heartbeat TTL
    address, root, started_ms, heartbeat_ms. Present = store alive.
dz:workers                        set     worker               scheduler            none (stale ids pruned by readers)
dz:worker:<id>                    hash    worker               scheduler            heartbeat TTL
    address, base, base_identity, device, mode, num_running, num_waiting, queued_tokens,
    free_kv_blocks, total_kv_blocks, started_ms, heartbeat_ms. Present = worker alive.
dz:worker:<id>:resident:<tier>    zset    worker               scheduler            heartbeat TTL
    member = model, score = last use (unix ms); ascending score = LRU order. tier in device|host|disk.
dz:worker:<id>:inflight           string  scheduler            scheduler            INFLIGHT_TTL_S
    requests the schedulers are currently relaying to the worker (INCR on route, DECR at end).
dz:queue:<model>                  hash    scheduler            scheduler            QUEUE_TTL_S
    pending, running, rate_count, rate_updated_ms (decayed arrival count → arrivals/s).
dz:request:<id>                   hash    scheduler            scheduler, clients   REQUEST_TTL_S
    state (RequestState value), model, worker_id, attempts, created_ms, updated_ms, error.
"""

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


def request(request_id: str) -> str:
    return f"{PREFIX}request:{request_id}"
