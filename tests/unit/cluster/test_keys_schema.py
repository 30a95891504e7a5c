"""The documented key table (keys.py docstring) is the single source: docs, builders and patterns agree."""

from pathlib import Path

from deltazip.cluster import keys

DOC = Path(__file__).resolve().parents[3] / "docs" / "redis-keys.md"


def test_docs_page_is_generated_from_the_table():
    assert DOC.read_text() == keys.markdown(), "regenerate: python -m deltazip.cluster.keys > docs/redis-keys.md"


def test_every_key_builder_matches_its_documented_pattern():
    built = {
        keys.base(): "dz:base", keys.models(): "dz:models", keys.model("ft-a"): "dz:model:<name>",
        keys.stores(): "dz:stores", keys.store("s1"): "dz:store:<id>", keys.workers(): "dz:workers",
        keys.worker("h-1-ab"): "dz:worker:<id>", keys.worker_resident("h-1-ab", "host"): "dz:worker:<id>:resident:<tier>",
        keys.worker_inflight("h-1-ab"): "dz:worker:<id>:inflight", keys.queues(): "dz:queues",
        keys.queue("ft-a"): "dz:queue:<model>",
        keys.queue_pending("ft-a"): "dz:queue:<model>:pending", keys.queue_running("ft-a"): "dz:queue:<model>:running", keys.prefetch_lease("ft-a"): "dz:prefetch:<model>",
        keys.request("client:42"): "dz:request:<request_id>",
    }
    assert {keys.match(k).pattern for k in built} == {s.pattern for s in keys.schema()}
    for key, pattern in built.items():
        assert keys.match(key).pattern == pattern, key


def test_undocumented_keys_match_nothing():
    for key in ("dz:worker:w1:other", "dz:worker:w1:resident:gpu", "dz:unknown", "other:key"):
        assert keys.match(key) is None, key


def test_every_row_has_type_writer_readers_ttl_and_contents():
    for spec in keys.schema():
        assert spec.type in ("string", "hash", "set", "zset") and spec.writer and spec.readers and spec.ttl
        assert spec.description, spec.pattern
