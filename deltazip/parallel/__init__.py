"""Tensor parallelism for one worker spanning several GPUs of a host (Megatron-style).

- `group`: process-group setup (nccl on CUDA, gloo on CPU) and the TP handle the layers use.
- `plan`: which HF tensors are split, along which dim, and each rank's range; shape checks.
- `layers`: column/row-parallel linears that keep HF names and the delta hook.
- `shard_model`: shard a loaded `LlamaForCausalLM` in place (weights, head counts, KV cache shape).
- `shard_delta`: a rank's shard of one delta artifact (dense and packed kinds), cut at load time.
- `load`: read only a rank's slices of a safetensors checkpoint into a sharded model.
"""

from deltazip.parallel.group import TPGroup, init_tp_group
from deltazip.parallel.load import load_sharded_model
from deltazip.parallel.plan import ShardPlan, TensorSplit, check_tp_size
from deltazip.parallel.shard_delta import shard_delta, shard_delta_tensor
from deltazip.parallel.shard_model import shard_model

__all__ = [
    "ShardPlan", "TPGroup", "TensorSplit", "check_tp_size", "init_tp_group", "load_sharded_model", "shard_delta",
    "shard_delta_tensor", "shard_model",
]  # fmt: skip
