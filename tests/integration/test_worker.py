"""Worker as a real process (with redis-server and a delta store): batched base + delta requests equal
merged weights, residency in Status, LoadDelta/EvictDelta, and request validation."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis
import torch

from deltazip.client import Client
from deltazip.model.loader import load_state_dict_from_dir, model_from_state_dict, save_model_dir
from deltazip.model.synthetic import random_state_dict, tiny_config
from deltazip.rpc.channels import aio_channel, sync_channel
from deltazip.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)
from deltazip.artifact import read_manifest
from tests.integration.tiny_models import CONFIG, MAX_TOKENS, PROMPTS, greedy_reference, models  # noqa: F401
from tests.integration.tiny_models import compress_packed, merged_reference

pytestmark = pytest.mark.timeout(180)

@pytest.fixture
def cluster(launcher, models, tmp_path):
    base_dir, artifacts, merged = models
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    with Client("127.0.0.1:1", store=store.address) as client:
        for name, path in artifacts.items():
            client.push(path, name, progress=False)
    worker = launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2",
                            "--max-deltas-per-batch", "2", "--num-kv-blocks", "64", "--kv-block-size", "8",
                            "--disk-cache-dir", str(tmp_path / "cache"), "--heartbeat-s", "0.5")
    return worker, merged


def generate_request(model, prompt, max_tokens=MAX_TOKENS, rid=""):
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return worker_pb2.WorkerGenerateRequest(request_id=rid, model=model, prompt=prompt, sampling=sampling)


async def run_generate(address, model, prompt, rid):
    async with aio_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        chunks = [c async for c in stub.Generate(generate_request(model, prompt, rid=rid), timeout=120)]
    return chunks


def test_concurrent_base_and_deltas_match_merged_weights(cluster):
    worker, merged = cluster
    jobs = [(m, p) for m in ("tiny-base", "ft-a", "ft-b") for p in PROMPTS[:3]]

    async def all_requests():
        return await asyncio.gather(*(run_generate(worker.address, m, p, f"r{i}") for i, (m, p) in enumerate(jobs)))

    stub = worker_pb2_grpc.WorkerStub(sync_channel(worker.address))
    before = _segment_rows(stub.Status(worker_pb2.StatusRequest()))
    results = asyncio.run(all_requests())
    for (model, prompt), chunks in zip(jobs, results):
        tokens = [t for c in chunks for t in c.token_ids]
        final = chunks[-1]
        assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert final.usage.completion_tokens == MAX_TOKENS and final.usage.prompt_tokens == len(prompt.encode())
        assert final.worker_id and final.usage.ttft_ms > 0
        expected = greedy_reference(merged[model], list(prompt.encode()), MAX_TOKENS)
        assert tokens == expected, (model, prompt)

    status = stub.Status(worker_pb2.StatusRequest())
    tiers = {d.model: d.tier for d in status.deltas}
    assert tiers == {"ft-a": common_pb2.RESIDENCY_TIER_DEVICE, "ft-b": common_pb2.RESIDENCY_TIER_DEVICE}
    assert status.base == "tiny-base" and status.mode == "delta" and status.total_kv_blocks == 64
    assert not status.kernels_warming  # a CPU worker builds no kernels ahead
    assert not status.HasField("merged_cache")  # no --merged-cache-bytes (and CPU workers keep none)
    # every delta token row the forwards ran, as segments: the prompts, then each output token but the last
    delta_rows = sum(len(p.encode()) + MAX_TOKENS - 1 for m, p in jobs if m != "tiny-base")
    assert sum(_segment_rows(status).values()) - sum(before.values()) == delta_rows
    bins = {(b.step, b.min_rows) for b in status.delta_segments}
    assert {step for step, _ in bins} <= {"prefill", "decode"} and any(step == "prefill" for step, _ in bins)
    assert all(low & (low - 1) == 0 for _, low in bins)  # powers of two


def _segment_rows(status) -> dict:
    return {(b.step, b.min_rows): b.rows for b in status.delta_segments}


def test_load_evict_and_invalid_requests(cluster, redis_url):
    worker, _ = cluster
    stub = worker_pb2_grpc.WorkerStub(sync_channel(worker.address))
    loaded = stub.LoadDelta(worker_pb2.LoadDeltaRequest(model="ft-a", tier=common_pb2.RESIDENCY_TIER_HOST))
    assert loaded.tier == common_pb2.RESIDENCY_TIER_HOST and loaded.bytes > 0
    loaded = stub.LoadDelta(worker_pb2.LoadDeltaRequest(model="ft-a"))
    assert loaded.tier == common_pb2.RESIDENCY_TIER_DEVICE
    evicted = stub.EvictDelta(worker_pb2.EvictDeltaRequest(model="ft-a", tier=common_pb2.RESIDENCY_TIER_DEVICE))
    assert evicted.evicted
    tiers = {d.model: d.tier for d in stub.Status(worker_pb2.StatusRequest()).deltas}
    assert tiers["ft-a"] == common_pb2.RESIDENCY_TIER_HOST

    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(generate_request("tiny-base", "x" * 200)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "128" in err.value.details()
    bad = worker_pb2.WorkerGenerateRequest(model="tiny-base", prompt="hi",
                                           sampling=common_pb2.SamplingParams(top_p=1.5))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(generate_request("no-such-model", "hi")))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(generate_request("ft-other", "hi")))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "base" in err.value.details()

    # Redis mirrors the worker: heartbeat hash with its address, residency per tier.
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    worker_id = stub.Status(worker_pb2.StatusRequest()).worker_id
    assert r.hget(f"dz:worker:{worker_id}", "address") == worker.address
    assert wait_for(lambda: "ft-a" in r.zrange(f"dz:worker:{worker_id}:resident:host", 0, -1))
    assert "ft-a" not in r.zrange(f"dz:worker:{worker_id}:resident:device", 0, -1)


def test_deadline_aborts_sequence_and_frees_blocks(cluster):
    worker, _ = cluster
    stub = worker_pb2_grpc.WorkerStub(sync_channel(worker.address))
    stub.LoadDelta(worker_pb2.LoadDeltaRequest(model="ft-b"))
    received = []
    with pytest.raises(grpc.RpcError) as err:
        for chunk in stub.Generate(generate_request("ft-b", "long", max_tokens=120), timeout=0.08):
            received.append(chunk)
    assert not any(c.finish_reason for c in received)  # cut off mid-stream (or while queued)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def idle():
        s = stub.Status(worker_pb2.StatusRequest())
        return s.num_running == 0 and s.num_waiting == 0 and s.free_kv_blocks == s.total_kv_blocks

    assert wait_for(idle)
    chunks = list(stub.Generate(generate_request("ft-b", "after", max_tokens=3)))
    assert chunks[-1].usage.completion_tokens == 3


def wait_for(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_more_hot_deltas_than_slots_take_turns(launcher, models, tmp_path):
    """One device slot, three deltas (two dense, one 4-bit 2:4 from `deltazip compress`) with concurrent
    requests: the slot is drained and handed over, and every stream equals its merged model."""
    base_dir, artifacts, merged = models
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    with Client("127.0.0.1:1", store=store.address) as client:
        for name in ("ft-a", "ft-b", "ft-packed"):
            client.push(artifacts[name], name, progress=False)
    worker = launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "1",
                            "--max-deltas-per-batch", "1", "--num-kv-blocks", "64", "--kv-block-size", "8")
    jobs = [(m, p) for p in PROMPTS for m in ("ft-a", "ft-b", "ft-packed", "tiny-base")]

    async def all_requests():
        return await asyncio.gather(*(run_generate(worker.address, m, p, f"t{i}") for i, (m, p) in enumerate(jobs)))

    stub = worker_pb2_grpc.WorkerStub(sync_channel(worker.address))
    before = _segment_rows(stub.Status(worker_pb2.StatusRequest()))
    results = asyncio.run(all_requests())
    for (model, prompt), chunks in zip(jobs, results):
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == greedy_reference(merged[model], list(prompt.encode()), MAX_TOKENS), (model, prompt)


def test_allocated_delta_batches_with_a_uniform_one(launcher, models, tmp_path):
    """A `--target-ratio` delta (4-bit, 2-bit and dropped linears) and a uniform 4-bit delta run in the same
    batches; every stream equals greedy decoding of its own merged model."""
    base_dir, artifacts, merged = models
    alloc = compress_packed(base_dir, base_dir.parent / "ft-b-hf", tmp_path / "ft-alloc-delta",
                            ["--bits", "2", "--target-ratio", "2.3"])  # fmt: skip
    counts = read_manifest(alloc).compression["allocation"]["counts"]
    assert set(counts) == {"2b-24", "4b-24", "drop"}, counts
    reference = merged_reference(base_dir, alloc)
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"))
    with Client("127.0.0.1:1", store=store.address) as client:
        client.push(artifacts["ft-packed"], "ft-packed", progress=False)
        client.push(alloc, "ft-alloc", progress=False)
    worker = launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2",
                            "--max-deltas-per-batch", "2", "--num-kv-blocks", "64", "--kv-block-size", "8")
    jobs = [(m, p) for p in PROMPTS for m in ("ft-alloc", "ft-packed", "tiny-base")]

    async def all_requests():
        return await asyncio.gather(*(run_generate(worker.address, m, p, f"a{i}") for i, (m, p) in enumerate(jobs)))

    results = asyncio.run(all_requests())
    refs = {**merged, "ft-alloc": reference}
    for (model, prompt), chunks in zip(jobs, results):
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == greedy_reference(refs[model], list(prompt.encode()), MAX_TOKENS), (model, prompt)


def test_chunked_stream_through_scheduler_delivers_every_token_once_in_order(cluster, launcher):
    """The worker's default chunking (first token alone, then up to 8 per chunk) as a client sees it via a scheduler."""
    worker, merged = cluster
    scheduler = launcher.start("scheduler")
    prompt, num_tokens = PROMPTS[0], 40
    with Client(scheduler.address, timeout_s=120) as client:
        tokens = list(client.stream("ft-a", prompt, max_tokens=num_tokens, temperature=0.0, ignore_eos=True))
        again = client.generate("ft-a", prompt, max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    ids = [t for token in tokens for t in token.token_ids]
    assert ids == greedy_reference(merged["ft-a"], list(prompt.encode()), num_tokens) == again.token_ids
    assert len(tokens[0].token_ids) == 1 and all(len(t.token_ids) <= 8 for t in tokens)
    assert len(tokens) < num_tokens  # chunked: fewer messages than tokens
    assert tokens[-1].finish_reason == "length" and tokens[-1].usage.completion_tokens == num_tokens
    assert "".join(t.text for t in tokens) == again.text
