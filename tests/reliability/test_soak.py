"""Short soak of the CPU stack (bench/soak.py's long form runs thousands of requests; this one a few hundred).

Promise: under a steady stream of requests (gRPC and HTTP) every request succeeds; after warm-up the memory of
every service stays within 10%, no file descriptors leak, Redis holds no key outside the documented schema,
every request record carries its expiry (REQUEST_TTL_S) and no other key count grows; p99 is reported.
"""

import json

import pytest

from bench.soak import SoakConfig, SoakTarget, run_soak
from deltazip.cluster import keys

pytestmark = pytest.mark.timeout(120)


def test_short_soak_is_flat(shared_stack):
    procs = (shared_stack.store, shared_stack.worker, shared_stack.scheduler, shared_stack.gateway, shared_stack.redis)
    target = SoakTarget(shared_stack.scheduler.address, shared_stack.gateway.address, shared_stack.launcher.redis_url,
                        {p.name: p.popen.pid for p in procs}, ("ft-a", "ft-b", "tiny-base"))
    result = run_soak(target, SoakConfig(num_requests=1200, concurrency=4, max_tokens=4, num_samples=20))
    s = result["summary"]
    print("\nshort soak:", json.dumps({k: s[k] for k in ("wall_s", "throughput_rps", "e2e_p50_ms", "e2e_p99_ms",
                                                        "rss_growth_after_warmup", "fd_growth_after_warmup")}))
    assert s["num_failed"] == 0, s["failures"]
    assert s["rss_flat"], s["rss_growth_after_warmup"]  # every DeltaZip service (Redis holds the request records)
    assert s["fds_flat"], s["fd_growth_after_warmup"]
    assert s["undocumented_keys"] == 0
    assert s["request_keys_without_ttl"] == 0 and 0 < s["request_key_ttl_max_s"] <= keys.REQUEST_TTL_S
    assert s["other_keys_flat"], (s["other_keys_warmup"], s["other_keys_end"])
    assert s["e2e_p99_ms"] > 0
