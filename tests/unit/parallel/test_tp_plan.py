"""Which TP sizes a model allows, and the error for one that does not divide its heads."""

from __future__ import annotations

import pytest

from deltazip.model.synthetic import tiny_config
from deltazip.parallel import ShardPlan, check_tp_size
from deltazip.parallel.plan import valid_tp_sizes

SMOLLM2_135M = tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
LLAMA_13B = tiny_config(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824)


def test_smollm2_heads_split_exactly_at_tp3_and_padded_at_tp2():
    assert valid_tp_sizes(SMOLLM2_135M) == [1, 3]
    assert ShardPlan(SMOLLM2_135M, 3, 0).layout is None
    assert ShardPlan(SMOLLM2_135M, 2, 0).padded  # see test_tp_padding
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be >= 1"):
        check_tp_size(SMOLLM2_135M, 0)


def test_kv_heads_split_or_replicated():
    gqa = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=64)
    split = ShardPlan(gqa, 2, 1)
    assert (split.kv_heads_per_rank, split.kv_head_start, split.kv_replicated) == (1, 1, False)
    # tp=4 > 2 KV heads: ranks 0,1 read KV head 0 and ranks 2,3 KV head 1 (their query heads' group).
    assert [ShardPlan(gqa, 4, r).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert ShardPlan(gqa, 4, 0).kv_replicated
    assert ShardPlan(tiny_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=48), 3, 0).padded


def test_13b_shape_supports_tp2_and_tp8():
    assert {1, 2, 4, 8} <= set(valid_tp_sizes(LLAMA_13B))


def test_bad_rank_raises():
    with pytest.raises(ValueError, match="rank 2"):
        ShardPlan(SMOLLM2_135M, 1, 2)


def test_shard_model_pads_smollm2_heads_at_tp2():
    from deltazip.model.synthetic import random_model
    from deltazip.parallel import TPGroup, shard_model

    model = random_model(tiny_config(hidden_size=72, num_attention_heads=9, num_key_value_heads=3))
    shard_model(model, TPGroup(rank=1, size=2))
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (6, 2)
    d = model.config.head_dim
    assert model.layers[0].self_attn.q_proj.weight.shape == (6 * d, 72)
    assert model.layers[0].self_attn.q_proj.weight[3 * d :].abs().sum() == 0  # rank 1's zero heads
