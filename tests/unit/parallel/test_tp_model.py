"""TP=2 and TP=3 on CPU (gloo, one process per rank): logits and greedy tokens equal the unsharded model."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch.multiprocessing as mp

import tp_cases

TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, case_names: list[str]) -> None:
    """Run tp_cases.run_rank in `world` spawned processes; fail (and kill them) past TIMEOUT_S."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(
        tp_cases.run_rank, args=(world, free_port(), case_names), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the rank's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"TP ranks did not finish {case_names} within {TIMEOUT_S}s")


def test_tp2_matches_unsharded_base_dense_and_packed_deltas_and_replicated_kv_heads():
    spawn_ranks(2, ["gqa_base", "gqa_dense", "gqa_packed", "kv_replicated_bias_dense"])


def test_tp3_on_smollm2_shaped_heads_matches_unsharded():
    # SmolLM2: 9 query heads, 3 KV heads -> TP=3 divides both (TP=2 does not; see test_tp_plan).
    spawn_ranks(3, ["smollm2_shaped_dense"])
