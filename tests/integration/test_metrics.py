"""Every service's /metrics after a real run: the counters and histograms a dashboard needs have moved.

Stack: redis + store + worker + scheduler + gateway, each with --metrics-port; a few requests (one
streamed through the gateway, one through the SDK) for a fine-tune the worker has to fetch and load.
"""


import openai
import pytest

from deltazip.client import Client
from deltazip.metrics import scrape, total
from deltazip.rpc.ports import free_port
from deltazip.stack import stop
from tests.integration.gateway_proc import start_gateway
from tests.integration.procs import launcher, redis_proc, redis_url  # noqa: F401  (fixtures)
from tests.integration.tiny_models import MAX_TOKENS, models  # noqa: F401

pytestmark = pytest.mark.timeout(240)


def test_metrics_move_after_a_real_run(launcher, models, tmp_path):
    base_dir, artifacts, _ = models
    ports = {name: free_port() for name in ("store", "worker", "scheduler", "gateway")}
    store = launcher.start("delta_store", "--root", str(tmp_path / "store"), "--metrics-port", str(ports["store"]))
    with Client("127.0.0.1:1", store=store.address) as client:
        client.push(artifacts["ft-a"], "ft-a", progress=False)
    launcher.start("worker", "--base-dir", str(base_dir), "--device", "cpu", "--num-device-slots", "2",
                   "--max-deltas-per-batch", "2", "--num-kv-blocks", "64", "--kv-block-size", "8",
                   "--disk-cache-dir", str(tmp_path / "cache"), "--metrics-port", str(ports["worker"]))
    scheduler = launcher.start("scheduler", "--metrics-port", str(ports["scheduler"]))
    gateway = start_gateway(scheduler.address, tmp_path / "logs", "--metrics-port", str(ports["gateway"]))
    try:
        api = openai.OpenAI(base_url=f"http://{gateway.address}/v1", api_key="unused", max_retries=0, timeout=120)
        list(api.completions.create(model="ft-a", prompt="hello", max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                                    extra_body={"ignore_eos": True}))
        with Client(scheduler.address, timeout_s=120) as sdk:
            sdk.generate("tiny-base", "hello", max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            with pytest.raises(Exception):
                sdk.generate("no-such-model", "hello")
        gw, sched, worker, st = (scrape(ports[n]) for n in ("gateway", "scheduler", "worker", "store"))
        gw_inline = scrape(int(gateway.address.rsplit(":", 1)[1]))  # /metrics on the HTTP port too
    finally:
        stop(gateway)

    assert total(gw, "deltazip_requests_total", service="gateway", code="200") >= 1
    assert total(gw_inline, "deltazip_requests_total", service="gateway", code="200") >= 1
    assert total(gw, "deltazip_ttft_seconds_count", service="gateway") == 1
    assert total(sched, "deltazip_requests_total", service="scheduler", method="Generate", code="OK") == 2
    assert total(sched, "deltazip_requests_total", service="scheduler", method="Generate", code="NOT_FOUND") == 1
    assert total(sched, "deltazip_ttft_seconds_count", service="scheduler") == 2
    assert total(sched, "deltazip_token_latency_seconds_count", service="scheduler") == 2
    assert total(sched, "deltazip_generated_tokens_total", service="scheduler") == 2 * MAX_TOKENS
    assert total(sched, "deltazip_queue_depth", model="ft-a") == 0  # back to zero once finished
    assert ("deltazip_queue_depth", (("model", "ft-a"), ("service", "scheduler"))) in sched
    assert total(worker, "deltazip_requests_total", service="worker", method="Generate", code="OK") == 2
    assert total(worker, "deltazip_generated_tokens_total", service="worker") == 2 * MAX_TOKENS
    assert total(worker, "deltazip_batch_sequences_count") >= MAX_TOKENS
    assert total(worker, "deltazip_batch_distinct_deltas_sum") >= 1
    assert total(worker, "deltazip_residency_lookups_total", tier="device", result="miss") >= 1
    assert total(worker, "deltazip_delta_bytes_total", stage="fetch") > 0
    assert total(worker, "deltazip_delta_seconds_count", stage="device_load") >= 1
    assert ("deltazip_worker_kernels_warming", ()) in worker  # a CPU worker builds no kernels ahead
    assert total(worker, "deltazip_worker_kernels_warming") == 0
    assert total(st, "deltazip_store_bytes_total", direction="push") > 0
    assert total(st, "deltazip_store_bytes_total", direction="fetch") == total(worker, "deltazip_delta_bytes_total", stage="fetch")
