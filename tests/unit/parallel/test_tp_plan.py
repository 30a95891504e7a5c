"""Which TP sizes a model allows, and the error for one that does not divide its heads."""

from __future__ import annotations

import pytest

from deltazip.model.synthetic import tiny_config
from deltazip.parallel import ShardPlan, check_tp_size
from deltazip.parallel.plan import valid_tp_sizes

SMOLLM2_135M = tiny_config(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536)
LLAMA_13B = tiny_config(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40, intermediate_size=13824)


def test_smollm2_heads_allow_tp3_but_not_tp2():
    check_tp_size(SMOLLM2_135M, 3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*num_attention_heads=9.*supports: \[1, 3\]"):
        check_tp_size(SMOLLM2_135M, 2)


def test_kv_heads_split_or_replicated():
    gqa = tiny_config(num_attention_heads=8, num_key_value_heads=2, hidden_size=64, intermediate_size=64)
    split = ShardPlan(gqa, 2, 1)
    assert (split.kv_heads_per_rank, split.kv_head_start, split.kv_replicated) == (1, 1, False)
    # tp=4 > 2 KV heads: ranks 0,1 read KV head 0 and ranks 2,3 KV head 1 (their query heads' group).
    assert [ShardPlan(gqa, 4, r).kv_head_start for r in range(4)] == [0, 0, 1, 1]
    assert ShardPlan(gqa, 4, 0).kv_replicated
    with pytest.raises(ValueError, match="num_key_value_heads=2 neither divides"):
        check_tp_size(tiny_config(num_attention_heads=6, num_key_value_heads=2, hidden_size=48), 3)


def test_13b_shape_supports_tp2_and_tp8():
    assert {1, 2, 4, 8} <= set(valid_tp_sizes(LLAMA_13B))


def test_bad_rank_raises():
    with pytest.raises(ValueError, match="rank 2"):
        ShardPlan(SMOLLM2_135M, 1, 2)


def test_shard_model_refuses_smollm2_heads_at_tp2():
    from deltazip.model.synthetic import random_model
    from deltazip.parallel import TPGroup, shard_model

    model = random_model(tiny_config(hidden_size=72, num_attention_heads=9, num_key_value_heads=3))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: num_attention_heads=9 is not divisible"):
        shard_model(model, TPGroup(rank=0, size=2))
