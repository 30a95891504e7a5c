"""Tensor parallelism on GPUs (NCCL, one process per GPU); skips without enough GPUs.

- TP=2 greedy == TP=1 through the worker's LLMEngine on a random fp16 Llama with SmolLM2's hidden and
  intermediate sizes but 8 query / 2 KV heads, with random 4-bit 2:4 packed deltas (group 96, like the
  demo artifacts) applied by the SBMM kernel from each rank's load-time shard.
- TP=2 greedy == unsharded on the real SmolLM2-135M (9 query / 3 KV heads: padded to 12 / 4) with both
  demo fine-tunes, fp32; TP=3 (exact split) likewise on 3 GPUs.
- The worker itself at --tensor-parallel-size 2 on cuda (rank 0 on cuda:0, its follower on cuda:1):
  in-process through build_worker (SBMM on packed delta slots), and as real processes (behind a scheduler
  when redis-server is there, else called directly), both against a TP=1 worker; killing the follower ends
  the worker.
- A TP=2 fp16 worker with packed 4- and 2-bit deltas: follower rank 1 warms its shards' SBMM kernels up while
  idle to a finished warm-up, then the worker serves TP=1's greedy tokens (random weights, no SmolLM2 needed).
The SmolLM2 base: $DELTAZIP_BASE_DIR, else the deltazip cache (`make demo`); tests skip without it.
Run: DELTAZIP_BASE_DIR=/tmp/dz/base PYTHONPATH=. python -m pytest -q tests/gpu/test_tp_gpu.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "parallel"))
from test_tp_model import smollm2_base_dir, spawn_ranks  # noqa: E402

from deltazip.stack import REDIS_SERVER  # noqa: E402

NUM_GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
ROOT = Path(__file__).resolve().parents[2]
DEMO_DELTAS = ROOT / "demo" / "deltas"
SMOLLM2_8_HEADS = dict(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
needs_2_gpus = pytest.mark.skipif(NUM_GPUS < 2, reason="needs 2 CUDA GPUs")
needs_smollm2 = pytest.mark.skipif(smollm2_base_dir() is None or not (DEMO_DELTAS / "smollm2-arith").is_dir(),
                                   reason="SmolLM2 base not converted (set DELTAZIP_BASE_DIR or run `make demo`)")


def run_packed_rank(
    rank: int, world: int, init_method: str, max_tokens: int, device_type: str = "cuda"
) -> None:
    """Rank body: shard model + packed deltas, generate through the engine, rank 0 compares with TP=1."""
    import torch.distributed as dist

    import tp_real
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.synthetic import random_state_dict, tiny_config
    from deltazip.parallel import init_tp_group, shard_delta, shard_model
    from deltazip.parallel.group import destroy_tp_group, quiesce
    from tp_fixtures import packed_model_delta
    from tp_gpu_ops import PackedDeltaProvider

    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")  # cpu: a dry run
    dtype = torch.float16 if device_type == "cuda" else torch.float32
    tp = init_tp_group(rank, world, init_method, device, timeout_s=120)
    try:
        with torch.inference_mode():
            cfg = tiny_config(**SMOLLM2_8_HEADS)
            state = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed=0, std=0.05).items()}
            names = ["ft-a", "ft-b"]
            full = {n: packed_model_delta(state, seed=11 * (i + 1), group_size=96) for i, n in enumerate(names)}
            g = torch.Generator().manual_seed(5)
            prompts = [(d, torch.randint(3, cfg.vocab_size, (9 + 4 * i,), generator=g).tolist())
                       for i, d in enumerate([None, "ft-a", "ft-b", "ft-a"])]  # fmt: skip
            model = model_from_state_dict(cfg, state)
            plan = shard_model(model, tp)
            model.to(device)
            shards = {n: shard_delta(d, plan) for n, d in full.items()}
            got = tp_real.greedy(model, None, True, prompts, max_tokens, PackedDeltaProvider(shards, True, device))
            every = [None] * world
            dist.all_gather_object(every, got)
            assert all(e == got for e in every), f"ranks disagree: {every}"
            if rank == 0:
                ref = model_from_state_dict(cfg, state).to(device)
                want = tp_real.greedy(ref, None, True, prompts, max_tokens, PackedDeltaProvider(full, True, device))
                assert got == want, f"TP={world} greedy {got} != TP=1 {want}"
            quiesce(tp)  # nobody tears the group down while a peer still reads a collective
    finally:
        destroy_tp_group(tp)


@needs_2_gpus
def test_tp2_packed_deltas_sbmm_greedy_equals_tp1():
    spawn_ranks(2, None, target=run_packed_rank, args=(16,), timeout_s=300)


@needs_2_gpus
@needs_smollm2
def test_tp2_padded_real_smollm2_demo_deltas_greedy_equals_unsharded_on_gpu():
    import tp_real

    spawn_ranks(2, None, target=tp_real.run_real_rank, args=(smollm2_base_dir(), "cuda", 16), timeout_s=300)


@pytest.mark.skipif(NUM_GPUS < 3, reason="TP=3 (SmolLM2's exact split) needs 3 GPUs")
@needs_smollm2
def test_tp3_real_smollm2_demo_deltas_greedy_equals_unsharded_on_gpu():
    import tp_real

    spawn_ranks(3, None, target=tp_real.run_real_rank, args=(smollm2_base_dir(), "cuda", 16), timeout_s=300)


@needs_2_gpus
@needs_smollm2
def test_tp2_worker_in_process_equals_tp1_on_cuda(tmp_path):
    from tests.unit.worker.test_worker_modes import serve_all

    base_dir = Path(smollm2_base_dir())
    cache = DEMO_DELTAS  # serve_all copies it: each worker's disk cache starts with both artifacts
    models = [base_dir.resolve().name, "smollm2-arith", "smollm2-python"]
    prompts = ["What is 17 + 25?", "Write a Python function that reverses a string."]
    kw = dict(models=models, prompts=prompts, max_tokens=16, device="cuda", dtype="float32", num_kv_blocks=256,
              kv_block_size=16)
    want = serve_all(base_dir, cache, tmp_path / "tp1", "delta", tensor_parallel_size=1, **kw)
    got = serve_all(base_dir, cache, tmp_path / "tp2", "delta", tensor_parallel_size=2, **kw)
    assert got == want
    assert want[(models[1], prompts[0])] != want[(models[0], prompts[0])]  # the delta changed something


@needs_2_gpus
@needs_smollm2
def test_tp2_worker_processes_on_cuda(tmp_path):
    """Behind a scheduler with redis-server; without one, Worker.Generate called directly."""
    from deltazip.stack import Launcher, start_redis, stop
    from tests.integration.test_tp_worker import check_tp2_worker, check_tp2_worker_direct

    if not Path(REDIS_SERVER).is_file():
        check_tp2_worker_direct(tmp_path, "cuda", 12)
        return
    redis_proc = start_redis(tmp_path / "redis")
    launcher = Launcher(f"redis://{redis_proc.address}/0", tmp_path / "logs")
    try:
        check_tp2_worker(launcher, f"redis://{redis_proc.address}/0", tmp_path, "cuda", 12)
    finally:
        launcher.stop_all()
        stop(redis_proc)


TILING = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)  # every linear shard tiles for sp4 / sp2 (N % 64, K % 128 or 256) but o_proj's


def serve_after_warm_up(base_dir, cache, disk, tp: int, models, prompts, capfd, log_lines: list[str],
                        device: str = "cuda", dtype: str = "float16") -> dict:
    """One in-process fp16 worker at --tensor-parallel-size tp: every delta to the GPU slots first, then (tp > 1)
    wait until follower rank 1 logs a finished SBMM warm-up, then every (model, prompt) pair; greedy token ids.
    The followers' stderr is captured (capfd) into log_lines."""
    import asyncio
    import json
    import os
    import time

    from deltazip.model.sampling import SamplingParams
    from services.worker.app import GenerateInput
    from services.worker.bootstrap import build_worker
    from services.worker.config import WorkerConfig
    from services.worker.residency_state import Tier

    shutil.copytree(cache, disk)
    cfg = WorkerConfig(base_dir=str(base_dir), mode="delta", disk_cache_dir=str(disk), worker_id=f"w-tp{tp}",
                       device=device, dtype=dtype, num_device_slots=4, max_deltas_per_batch=2, num_kv_blocks=128,
                       kv_block_size=16, tensor_parallel_size=tp)
    parts = build_worker(cfg)
    parts.loop.start()
    try:
        for name in models[1:]:
            parts.residency.ensure(name, Tier.DEVICE).result(timeout=120)
        deadline = time.monotonic() + float(os.environ.get("DZ_TP_WARMUP_WAIT_S", "240"))
        while tp > 1:
            log_lines += capfd.readouterr().err.splitlines()
            events = [json.loads(line) for line in log_lines if line.startswith("{") and "sbmm_warmed_up" in line]
            if any(e.get("rank") == 1 and e.get("finished") for e in events):
                assert sum(e["launches"] for e in events if e.get("rank") == 1) > 0  # rank 1 compiled something
                break
            if time.monotonic() > deadline:  # (signalling a follower would end the worker, this test with it)
                pytest.fail("follower rank 1 never finished its SBMM warm-up:\n" + "\n".join(log_lines[-80:]))
            assert not any("tp_warm_up_failed" in line for line in log_lines), "\n".join(log_lines[-20:])
            time.sleep(0.2)

        async def one(model: str, prompt: str, i: int) -> list[int]:
            inp = GenerateInput(request_id=f"r{i}", model=model, prompt=prompt,
                                sampling=SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            return [t for e in [e async for e in parts.app.generate(inp)] for t in e.token_ids]

        async def everything():
            pairs = [(m, p) for m in models for p in prompts]
            return dict(zip(pairs, await asyncio.gather(*(one(m, p, i) for i, (m, p) in enumerate(pairs)))))

        return asyncio.run(asyncio.wait_for(everything(), 120))
    finally:
        parts.close()
        log_lines += capfd.readouterr().err.splitlines()


@needs_2_gpus
@pytest.mark.parametrize("bits", [4, 2])
def test_tp2_followers_warm_up_sbmm_kernels_then_serve_like_tp1_gpu(tmp_path, capfd, bits):
    """fp16 packed deltas on a TP=2 worker: follower rank 1 compiles its shards' SBMM variants while idle (sp4 /
    sp2 stacks and o_proj's fallback layout) to a finished warm-up with no failure, and then serves the same greedy
    tokens as TP=1 (random fp16 weights, as test_tp2_packed_deltas_sbmm_greedy_equals_tp1)."""
    from bench.synthetic import write_base, write_delta
    from deltazip.model.synthetic import tiny_config

    cfg = tiny_config(**TILING)
    base_dir = write_base(tmp_path / "tiling-base", cfg)
    cache = tmp_path / "cache"
    for i, name in enumerate(["ft-a", "ft-b"]):
        write_delta(base_dir, cache / name, cfg, bits=bits, seed=21 + i)
    models, prompts = [base_dir.name, "ft-a", "ft-b"], ["abc def ghi", "hello world, hello again"]
    lines: list[str] = []
    want = serve_after_warm_up(base_dir, cache, tmp_path / "tp1", 1, models, prompts, capfd, lines)
    got = serve_after_warm_up(base_dir, cache, tmp_path / "tp2", 2, models, prompts, capfd, lines)
    assert got == want
    # the deltas change something (random deltas need not flip every greedy token: one pair is enough)
    assert any(want[(m, p)] != want[(models[0], p)] for m in models[1:] for p in prompts)
    assert not any("tp_warm_up_failed" in line for line in lines)
