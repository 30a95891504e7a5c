"""Shard a loaded LlamaForCausalLM in place for one tensor-parallel rank.

Load the full model on the host (CPU), shard, then move to the rank's GPU: each GPU then holds only its
shard. After sharding, `model.config` describes the rank-local attention (heads, KV heads, intermediate)
so `allocate_kv_cache` sizes each rank's cache for its own KV heads (padded ones included); the full
config stays in `model.full_config`.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from deltazip.model.layers import NamedLinear
from deltazip.model.llama import LlamaForCausalLM
from deltazip.parallel.gather import take
from deltazip.parallel.group import TPGroup
from deltazip.parallel.layers import ColumnParallelLinear, RowParallelLinear
from deltazip.parallel.plan import COLUMN_PARALLEL, ROW_PARALLEL, ShardPlan


def shard_model(model: LlamaForCausalLM, tp: TPGroup) -> ShardPlan:
    """Replace q/k/v/gate/up with column- and o/down with row-parallel shards; returns the plan used."""
    full = getattr(model, "full_config", model.config)
    if model.kv_cache is not None:
        raise ValueError("shard the model before allocate_kv_cache (the cache shape depends on the shard)")
    if getattr(model, "shard_plan", None) is not None:
        raise ValueError("model is already sharded")
    plan = ShardPlan(full, tp.size, tp.rank)
    for layer in model.model.layers:
        for path in COLUMN_PARALLEL + ROW_PARALLEL:
            parent_name, child_name = path.split(".")
            parent = getattr(layer, parent_name)
            old = getattr(parent, child_name)
            setattr(parent, child_name, _shard_linear(old, plan, tp, path in ROW_PARALLEL))
        layer.self_attn.num_heads = plan.heads_per_rank
        layer.self_attn.num_kv_heads = plan.kv_heads_per_rank
    model.full_config = full
    model.config = dataclasses.replace(
        full,
        num_attention_heads=plan.heads_per_rank,
        num_key_value_heads=plan.kv_heads_per_rank,
        head_dim=full.head_dim,
        intermediate_size=plan.intermediate_per_rank,
    )
    model.shard_plan = plan
    model.tp = tp
    return plan


def _shard_linear(old: nn.Module, plan: ShardPlan, tp: TPGroup, row: bool) -> NamedLinear:
    assert isinstance(old, NamedLinear) and old.hf_name, f"expected a named linear, got {type(old).__name__}"
    split = plan.split(old.hf_name + ".weight")
    assert split is not None
    weight = take(old.weight.detach(), split)
    bias = old.bias.detach() if old.bias is not None else None
    if row:
        return RowParallelLinear.from_shard(old.hf_name, weight, bias, tp)
    if bias is not None:
        bias = take(bias, split)
    return ColumnParallelLinear.from_shard(old.hf_name, weight, bias)
