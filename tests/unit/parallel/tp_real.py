"""TP greedy generation on the real SmolLM2-135M base with the demo fine-tunes (demo/deltas), through the
worker's LLMEngine: every rank runs the same engine on its shard; rank 0 compares with the unsharded model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from deltazip.artifact import load_delta
from deltazip.model.loader import load_model
from deltazip.model.sampling import SamplingParams
from deltazip.model.tokenizer import Tokenizer
from deltazip.parallel import init_tp_group, shard_delta
from deltazip.parallel.load import load_sharded_model
from deltazip.parallel.group import destroy_tp_group, quiesce
from services.worker.engine.dense_deltas import DenseDeltaProvider
from services.worker.engine.engine import EngineConfig, LLMEngine
from tp_fixtures import dequantized

DEMO_DELTAS = Path(__file__).resolve().parents[3] / "demo" / "deltas"
PROMPTS = [  # (delta or None for base, prompt)
    (None, "The capital of France is"),
    ("smollm2-arith", "What is 17 + 25?"),
    ("smollm2-python", "Write a Python function that reverses a list."),
]


def greedy(model, deltas: dict | None, tied: bool, prompts: list[tuple[str | None, list[int]]], max_tokens: int,
           provider=None):
    """Greedy tokens per prompt through the worker's engine (paged KV, continuous batching)."""
    provider = provider or DenseDeltaProvider(deltas, tied)
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=32, block_size=16), eos_token_ids=[],
                       deltas_provider=provider)  # fmt: skip
    for i, (delta, ids) in enumerate(prompts):
        engine.add_request(f"r{i}", ids, SamplingParams(temperature=0, max_tokens=max_tokens), delta=delta)
    results = engine.run_until_done()
    return [results[f"r{i}"][0] for i in range(len(prompts))]


def run_real_rank(
    rank: int, world: int, init_method: str, base_dir: str, device_type: str, max_tokens: int
) -> None:
    """One rank: shard SmolLM2 and its demo deltas, generate; rank 0 checks against the unsharded model."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    tp = init_tp_group(rank, world, init_method, device, timeout_s=120)
    try:
        with torch.inference_mode():
            tok = Tokenizer.from_dir(base_dir)
            prompts = [(d, tok.encode(p)) for d, p in PROMPTS]
            model = load_sharded_model(base_dir, tp, device, torch.float32)  # only this rank's slices
            tied = model.config.tie_word_embeddings
            plan = model.shard_plan
            packed = {d: load_delta(DEMO_DELTAS / d) for d, _ in PROMPTS if d is not None}
            # TP=3: down_proj K/3 = 512 is not a multiple of the demo's group size 96 -> dense shard.
            shards = {d: dequantized(shard_delta(p, plan, misaligned="dense"), torch.float32)
                      for d, p in packed.items()}
            shards = {d: {k: v.to(device) for k, v in s.items()} for d, s in shards.items()}
            got = greedy(model, shards, tied, prompts, max_tokens)
            every = [None] * world
            dist.all_gather_object(every, got)
            assert all(g == got for g in every), f"ranks disagree on tokens: {every}"
            if rank == 0:
                del model, shards
                ref = load_model(base_dir, device, torch.float32)
                full = {d: {k: v.to(device) for k, v in dequantized(p, torch.float32).items()}
                        for d, p in packed.items()}
                want = greedy(ref, full, tied, prompts, max_tokens)
                assert got == want, f"TP={world} greedy tokens {got} != unsharded {want}"
            quiesce(tp)  # nobody tears the group down while a peer still reads a collective
    finally:
        destroy_tp_group(tp)
