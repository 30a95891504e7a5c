"""Per-rank bodies of the multi-process TP tests: each rank shards a tiny Llama and compares its
outputs with the unsharded model (built in the same process) on dense and paged forwards."""

from __future__ import annotations

import dataclasses
import os

import torch

from deltazip.model.context import ForwardContext
from deltazip.model.loader import model_from_state_dict
from deltazip.model.synthetic import random_state_dict, tiny_config
from deltazip.parallel import TPGroup, init_tp_group, shard_delta, shard_model
from deltazip.parallel.group import destroy_tp_group, quiesce
from services.worker.engine.dense_deltas import DenseDeltaOps
from tp_fixtures import dense_model_delta, dequantized, packed_model_delta, paged_metadata

GQA = tiny_config(intermediate_size=128)
KV_REPLICATED = tiny_config(num_key_value_heads=1, intermediate_size=128, attention_bias=True, mlp_bias=True)
SMOLLM2_SHAPED = tiny_config(hidden_size=72, num_attention_heads=9, num_key_value_heads=3, intermediate_size=192,
                             tie_word_embeddings=True)  # fmt: skip
H3_KV1_BIAS = tiny_config(hidden_size=64, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                          intermediate_size=96, attention_bias=True, mlp_bias=True)  # padded heads at tp 2 and 4
CASES = {  # name -> (config, delta kind)
    "gqa_base": (GQA, None),
    "gqa_dense": (GQA, "dense"),
    "gqa_packed": (GQA, "packed"),
    "kv_replicated_bias_dense": (KV_REPLICATED, "dense"),
    "smollm2_shaped_dense": (SMOLLM2_SHAPED, "dense"),
    "h3kv1_bias_packed": (H3_KV1_BIAS, "packed"),
    "h3kv1_odd_intermediate_dense": (dataclasses.replace(H3_KV1_BIAS, intermediate_size=99), "dense"),
}
ATOL = RTOL = 1e-4


def run_rank(rank: int, world: int, init_method: str, case_names: list[str]) -> None:
    """Entry of one spawned rank."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    tp = init_tp_group(rank, world, init_method, "cpu", timeout_s=60)
    try:
        for name in case_names:
            config, kind = CASES[name]
            check_case(tp, config, kind, name)
        quiesce(tp)  # nobody tears the group down while a peer still reads a collective
    finally:
        destroy_tp_group(tp)


class Pair:
    """The unsharded reference and this rank's shard of the same model, with their DeltaOps factories."""

    def __init__(self, tp: TPGroup, config, kind: str | None) -> None:
        state = random_state_dict(config, seed=0)
        self.ref = model_from_state_dict(config, state)
        self.tp = model_from_state_dict(config, state)
        self.plan = shard_model(self.tp, tp)
        self.tied = config.tie_word_embeddings
        full = None if kind is None else (dense_model_delta if kind == "dense" else packed_model_delta)(state, 7)
        self.full = None if full is None else dequantized(full, torch.float32)
        self.shard = None if full is None else dequantized(shard_delta(full, self.plan, "dense"), torch.float32)

    def ops(self, segments, sharded: bool):
        deltas = self.shard if sharded else self.full
        if deltas is None:
            return None
        return DenseDeltaOps({"ft": deltas}, segments, self.tied)

    def segments(self, counts: list[int]):
        return [(None, counts[0])] + [("ft", n) for n in counts[1:]] if self.full is not None else [(None, sum(counts))]


@torch.inference_mode()
def check_case(tp: TPGroup, config, kind: str | None, name: str) -> None:
    pair = Pair(tp, config, kind)
    g = torch.Generator().manual_seed(3)
    # Dense path: batch of 2 sequences, the first base, the second with the delta.
    ids = torch.randint(3, config.vocab_size, (2, 6), generator=g)
    segs = pair.segments([6, 6])
    want = pair.ref.forward_dense(ids, pair.ops(segs, False))
    got = pair.tp.forward_dense(ids, pair.ops(segs, True))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} dense rank {tp.rank}: {m}")
    check_paged(pair, config, name, tp.rank, g)


def check_paged(pair: Pair, config, name: str, rank: int, g: torch.Generator, num_decode: int = 3) -> None:
    """Prefill two prompts, then greedy decode steps; logits close and tokens equal at every step."""
    block_size, blocks_per_seq = 4, 4
    for m in (pair.ref, pair.tp):
        m.allocate_kv_cache(2 * blocks_per_seq, block_size)
    assert pair.tp.kv_cache.shape[4] == pair.plan.kv_heads_per_rank, "rank's KV cache must hold only its KV heads"
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 7)]
    cached, new_ids = [0, 0], prompts
    for step in range(num_decode + 1):
        attn = paged_metadata(cached, [len(t) for t in new_ids], block_size, blocks_per_seq)
        ids = torch.tensor([t for seq in new_ids for t in seq])
        segs = pair.segments([len(t) for t in new_ids])
        last = attn.query_start_loc[1:] - 1
        out = []
        for model, sharded in ((pair.ref, False), (pair.tp, True)):
            hidden = model(ids, ForwardContext(attn=attn, deltas=pair.ops(segs, sharded)))
            logits = model.compute_logits(hidden[last], ForwardContext(deltas=pair.ops(pair.segments([1, 1]), sharded)))
            out.append((hidden, logits))
        where = f"{name} paged step {step} rank {rank}"
        torch.testing.assert_close(out[1][0], out[0][0], atol=ATOL, rtol=RTOL, msg=lambda m: f"{where}: {m}")
        torch.testing.assert_close(out[1][1], out[0][1], atol=ATOL, rtol=RTOL, msg=lambda m: f"{where}: {m}")
        tokens_ref, tokens_tp = out[0][1].argmax(-1).tolist(), out[1][1].argmax(-1).tolist()
        assert tokens_tp == tokens_ref, f"{where}: greedy tokens {tokens_tp} != unsharded {tokens_ref}"
        cached = [c + len(t) for c, t in zip(cached, new_ids)]
        new_ids = [[t] for t in tokens_ref]
