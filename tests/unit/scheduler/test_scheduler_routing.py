"""Routing order and request validation, as plain functions."""

import pytest

from deltazip.cluster.workers import Tier, WorkerRecord
from deltazip.rpc.errors import InvalidArgument
from deltazip.v1 import common_pb2, scheduler_pb2
from services.scheduler.routing import Candidate, rank
from services.scheduler.validation import validate_generate


def cand(wid: str, tier: Tier | None, running: int = 0, inflight: int = 0, queued_tokens: int = 0) -> Candidate:
    return Candidate(WorkerRecord(wid, f"{wid}:1", num_running=running, queued_tokens=queued_tokens), tier, inflight)


def ids(ranked: list[Candidate]) -> list[str]:
    return [c.worker.worker_id for c in ranked]


def test_device_beats_host_beats_remote():
    assert ids(rank([cand("r", None), cand("h", Tier.HOST), cand("d", Tier.DEVICE), cand("k", Tier.DISK)], 4)) == ["d", "h", "k", "r"]


def test_least_loaded_among_equal_tiers():
    assert ids(rank([cand("a", None, running=3), cand("b", None, inflight=1), cand("c", None, running=2)], 4)) == ["b", "c", "a"]
    assert ids(rank([cand("a", None, queued_tokens=900), cand("b", None, queued_tokens=10)], 4)) == ["b", "a"]


def test_more_free_kv_breaks_load_ties():
    tight = Candidate(WorkerRecord("tight", "t:1", free_kv_blocks=2, total_kv_blocks=64), None)
    roomy = Candidate(WorkerRecord("roomy", "r:1", free_kv_blocks=60, total_kv_blocks=64), None)
    assert ids(rank([tight, roomy], 4)) == ["roomy", "tight"]


def test_affinity_yields_to_a_much_idler_worker():
    busy_holder, idle = cand("holder", Tier.DEVICE, running=10), cand("idle", None)
    assert ids(rank([busy_holder, idle], affinity_slack=4)) == ["idle", "holder"]
    assert ids(rank([busy_holder, idle], affinity_slack=10)) == ["holder", "idle"]


def test_exact_ties_spread_by_request():
    firsts = {ids(rank([cand("a", None), cand("b", None)], 4, salt=f"r{i}"))[0] for i in range(32)}
    assert firsts == {"a", "b"}


def request(**kw) -> scheduler_pb2.GenerateRequest:
    sampling = kw.pop("sampling", {})
    return scheduler_pb2.GenerateRequest(sampling=common_pb2.SamplingParams(**sampling), **kw)


def test_valid_request_gets_an_id():
    job = validate_generate(request(model="m", prompt="hi", sampling={"temperature": 0.0, "top_p": 1.0}), 100)
    assert job.model == "m" and len(job.request_id) == 32


@pytest.mark.parametrize("kw, fragment", [
    ({"model": "", "prompt": "x"}, "model is empty"),
    ({"model": "m", "prompt": ""}, "prompt is empty"),
    ({"model": "m", "messages": scheduler_pb2.GenerateRequest().messages}, "messages is empty"),
    ({"model": "m", "prompt": "x", "sampling": {"temperature": -0.1}}, "temperature"),
    ({"model": "m", "prompt": "x", "sampling": {"temperature": float("nan")}}, "temperature"),
    ({"model": "m", "prompt": "x", "sampling": {"top_p": 1.5}}, "top_p"),
    ({"model": "m", "prompt": "x", "sampling": {"max_tokens": 101}}, "limit 100"),
    ({"model": "m", "prompt": "x", "sampling": {"stop": [""]}}, "stop sequences"),
    ({"model": "m", "prompt": "x", "request_id": "has space"}, "request_id"),
])
def test_invalid_requests(kw, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        validate_generate(request(**kw), 100)


def test_chat_roles_checked():
    r = request(model="m")
    r.messages.messages.add(role="wizard", content="x")
    with pytest.raises(InvalidArgument, match="role"):
        validate_generate(r, 100)
