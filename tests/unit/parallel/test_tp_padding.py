"""Padded layouts for TP sizes that do not divide the heads: the chosen layout, the rank slices it cuts,
and packed delta shards that stay packed and dequantize to the padded slice exactly."""

from __future__ import annotations

import pytest
import torch

from deltazip.model.synthetic import tiny_config
from deltazip.parallel import ShardPlan, shard_delta_tensor
from deltazip.parallel.gather import take
from deltazip.parallel.plan import PaddedLayout
from tp_fixtures import random_packed_delta

SMOLLM2_135M = tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                           intermediate_size=1536)
H3_KV1 = tiny_config(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, head_dim=16, intermediate_size=50)


def test_smollm2_tp2_pads_one_whole_kv_group():
    layout = PaddedLayout.choose(SMOLLM2_135M, 2)
    assert layout.kv_heads == (0, 1, 2, None)  # 4 KV heads, 2 per rank; KV cache holds 2 heads per rank
    assert layout.q_heads == (0, 1, 2, 3, 4, 5, 6, 7, 8, None, None, None)
    plans = [ShardPlan(SMOLLM2_135M, 2, r) for r in range(2)]
    assert [p.heads_per_rank for p in plans] == [6, 6] and [p.kv_heads_per_rank for p in plans] == [2, 2]
    q0, q1 = (p.split("model.layers.0.self_attn.q_proj.weight") for p in plans)
    assert (q0.start, q0.end, q0.runs) == (0, 384, ())  # a plain slice of the original rows
    assert q1.runs == ((384, 192), (-1, 192))
    o1 = plans[1].split("model.layers.0.self_attn.o_proj.weight")
    assert o1.dim == 1 and o1.runs == ((384, 192), (-1, 192))
    down1 = plans[1].split("model.layers.0.mlp.down_proj.weight")
    assert (down1.dim, down1.start, down1.end, down1.runs) == (1, 768, 1536, ())
    assert plans[1].split("model.layers.0.mlp.up_proj.weight").runs == ()  # 1536 divides by 2: no padding


@pytest.mark.parametrize("tp, q_heads, kv_heads", [
    (2, (0, 1, 2, None), (0, 0)),  # each KV head twice (q 0,1 | q 2 + a zero head), MHA-like cost
    (4, (0, 1, 2, None), (0, 0, 0, None)),  # one query head per rank
])  # fmt: skip
def test_three_heads_one_kv_head(tp, q_heads, kv_heads):
    layout = PaddedLayout.choose(H3_KV1, tp)
    assert layout.q_heads == q_heads and layout.kv_heads == kv_heads
    assert layout.intermediate_size == 52 if tp == 4 else 50
    plan = ShardPlan(H3_KV1, tp, tp - 1)
    assert plan.padded and plan.split("model.layers.1.mlp.gate_proj.weight").size == layout.intermediate_size // tp


def test_exact_sizes_keep_the_unpadded_layout():
    assert ShardPlan(SMOLLM2_135M, 3, 1).layout is None
    assert ShardPlan(tiny_config(), 2, 0).layout is None


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("rank_of", ["first", "last"])
@pytest.mark.parametrize("module", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj",
                                    "mlp.up_proj"])  # fmt: skip
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse24", "quant"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_packed_padded_shards_dequantize_to_the_padded_slice(tp, rank_of, module, sparse, sym):
    cfg = tiny_config(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32,
                      intermediate_size=160)  # fmt: skip
    plan = ShardPlan(cfg, tp, 0 if rank_of == "first" else tp - 1)
    name = f"model.layers.0.{module}.weight"
    shape = {"self_attn.q_proj": (96, 96), "self_attn.k_proj": (32, 96), "self_attn.o_proj": (96, 96),
             "mlp.down_proj": (96, 160), "mlp.up_proj": (160, 96)}[module]  # fmt: skip
    t = random_packed_delta(name, *shape, bits=2 if sparse else 4, group_size=32, sym=sym, sparse=sparse, seed=4)
    split = plan.split(name)
    want = take(t.dequantize(torch.float32), split)
    part = shard_delta_tensor(t, split, misaligned="dense")
    torch.testing.assert_close(part.dequantize(torch.float32), want, atol=0, rtol=0)
    aligned = split.dim == 0 or all(n % 32 == 0 and (a < 0 or a % 32 == 0) for a, n in split.runs or [(0, 32)])
    if aligned and not (module == "mlp.down_proj" and split.size % 32):
        assert part.kind == t.kind, f"{name} {split} fell back to dense"


def test_misaligned_padded_in_features_refuse_or_go_dense():
    cfg = H3_KV1
    plan = ShardPlan(cfg, 2, 1)
    t = random_packed_delta("model.layers.0.self_attn.o_proj.weight", 48, 64, 4, 32, True, False)
    split = plan.split(t.name)  # rank 1: head 2 (16 columns) + a zero head: cuts a 32-column group
    with pytest.raises(ValueError, match="o_proj"):
        shard_delta_tensor(t, split)
    part = shard_delta_tensor(t, split, misaligned="dense")
    assert part.kind == "dense"
