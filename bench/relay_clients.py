"""bench/relay.py's client side: a closed burst from several client processes, and what each request saw."""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from dataclasses import dataclass

from bench.replay import percentile
from bench.scaleout_stack import cpu_seconds
from bench.workload import Request


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the client saw it; times in ms from the burst's start."""

    ok: bool
    ttft_ms: float
    e2e_ms: float
    num_tokens: int
    num_chunks: int
    error: str = ""


async def _stream_one(client, request: Request, start: float, timeout_s: float, request_id: str) -> Seen:
    loop = asyncio.get_running_loop()
    first, num_tokens, num_chunks, error = None, 0, 0, ""
    try:
        async for token in client.stream(request.model, request.prompt, request_id=request_id, timeout_s=timeout_s,
                                         max_tokens=request.max_tokens, min_tokens=request.min_tokens,
                                         temperature=0.0, ignore_eos=True):
            if token.token_ids and first is None:
                first = loop.time()
            num_tokens += len(token.token_ids)
            num_chunks += 1
    except Exception as exc:  # noqa: BLE001  (a failed request is a result, not a crash)
        error = f"{type(exc).__name__}: {exc}"[:300]
    end = loop.time()
    return Seen(not error and num_tokens == request.max_tokens, 1e3 * ((first or end) - start), 1e3 * (end - start),
                num_tokens, num_chunks, error)


async def _client_async(address: str, requests: list[Request], timeout_s: float, id_prefix: str,
                        start_at: float) -> list[Seen]:
    from deltazip.client import AsyncClient

    async with AsyncClient(address, timeout_s=timeout_s) as client:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        return list(await asyncio.gather(*(_stream_one(client, r, start_at, timeout_s, id_prefix + r.id)
                                           for r in requests)))


def _client(address: str, requests: list[Request], timeout_s: float, id_prefix: str, start_at: float) -> list[Seen]:
    return asyncio.run(_client_async(address, requests, timeout_s, id_prefix, start_at))


def send_burst(addresses: list[str], requests: list[Request], num_clients: int, timeout_s: float,
               id_prefix: str) -> tuple[list[Seen], float, float]:
    """The burst from `num_clients` processes, client i on scheduler i % len(addresses); outcomes, wall s and the
    client processes' CPU seconds."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_clients, mp_context=ctx) as pool:
        pool.submit(time.sleep, 0).result()  # processes up before the clock starts
        list(pool.map(time.sleep, [0.2] * num_clients))
        pids = list(pool._processes)  # noqa: SLF001  (their CPU time says whether the driver saturates)
        before = sum(cpu_seconds(pid) for pid in pids)
        start_at = time.monotonic() + 1.0
        parts = [pool.submit(_client, addresses[i % len(addresses)], requests[i::num_clients], timeout_s,
                             f"{id_prefix}c{i}-", start_at) for i in range(num_clients)]
        outcomes = [o for part in parts for o in part.result()]
        client_cpu_s = sum(cpu_seconds(pid) for pid in pids) - before
    return outcomes, time.monotonic() - start_at, client_cpu_s


def summarize(seen: list[Seen]) -> dict:
    done = [o for o in seen if o.ok]
    span_s = max([o.e2e_ms / 1e3 for o in seen] + [1e-9])
    ttft = [o.ttft_ms for o in done]
    num_tokens, num_chunks = sum(o.num_tokens for o in done), sum(o.num_chunks for o in done)
    return {"num_requests": len(seen), "num_failed": len(seen) - len(done),
            "throughput_rps": len(done) / span_s, "tokens_per_s": num_tokens / span_s,
            "tokens_per_chunk": num_tokens / max(num_chunks, 1), "span_s": span_s,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90),
            "tpot_p50_ms": percentile([(o.e2e_ms - o.ttft_ms) / (o.num_tokens - 1) for o in done if o.num_tokens > 1], 50),
            "errors": sorted({o.error for o in seen if o.error})[:3]}
