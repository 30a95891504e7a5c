"""Which HF tensors a rank holds a slice of, along which dim, and where that slice starts.

Megatron layout: q/k/v/gate/up are column-parallel (out features split: heads, KV heads, intermediate);
o/down are row-parallel (in features split) and followed by an all-reduce; embeddings, norms and
lm_head are replicated. KV heads are split when num_kv_heads % tp == 0, and replicated (each rank keeps
the one KV head its query heads read) when tp % num_kv_heads == 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltazip.model.config import LlamaConfig

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True, slots=True)
class TensorSplit:
    """A rank's slice [start, end) of a tensor along `dim` (0 = out features / rows, 1 = in features)."""

    dim: int
    start: int
    end: int


def tp_problems(config: LlamaConfig, tp: int) -> list[str]:
    """Why `config` cannot be split `tp` ways (empty when it can)."""
    heads, kv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if tp < 1:
        return ["tp must be >= 1"]
    problems = []
    if heads % tp:
        problems.append(f"num_attention_heads={heads} is not divisible by tp")
    if kv % tp and tp % kv:
        problems.append(f"num_key_value_heads={kv} neither divides nor is divisible by tp")
    if inter % tp:
        problems.append(f"intermediate_size={inter} is not divisible by tp")
    return problems


def valid_tp_sizes(config: LlamaConfig, max_size: int = 64) -> list[int]:
    """TP sizes up to max_size that this model's heads and intermediate size allow."""
    return [tp for tp in range(1, max_size + 1) if not tp_problems(config, tp)]


def check_tp_size(config: LlamaConfig, tp: int) -> None:
    """Raise ValueError explaining why `config` cannot be split `tp` ways."""
    problems = tp_problems(config, tp)
    if problems:
        raise ValueError(
            f"cannot shard this model with tensor_parallel_size={tp}: " + "; ".join(problems)
            + f". TP sizes this model supports: {valid_tp_sizes(config)}"
        )


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Per-rank slicing of one model's tensors."""

    config: LlamaConfig
    tp: int
    rank: int

    def __post_init__(self) -> None:
        check_tp_size(self.config, self.tp)
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} is outside 0..{self.tp - 1}")

    @property
    def heads_per_rank(self) -> int:
        return self.config.num_attention_heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        kv = self.config.num_key_value_heads
        return kv // self.tp if kv % self.tp == 0 else 1

    @property
    def kv_head_start(self) -> int:
        kv = self.config.num_key_value_heads
        if kv % self.tp == 0:
            return self.rank * self.kv_heads_per_rank
        return self.rank // (self.tp // kv)  # replicated: the KV head of this rank's query heads

    @property
    def kv_replicated(self) -> bool:
        return self.config.num_key_value_heads % self.tp != 0

    def split(self, tensor_name: str) -> TensorSplit | None:
        """The slice of HF tensor `tensor_name` (…weight / …bias) this rank holds; None = replicated."""
        module, _, param = tensor_name.rpartition(".")
        if not module.startswith("model.layers."):
            return None
        kind = module.split(".", 3)[-1]  # e.g. self_attn.q_proj
        cfg, r, d = self.config, self.rank, self.config.head_dim
        if kind == "self_attn.q_proj":
            n = self.heads_per_rank * d
            return TensorSplit(0, r * n, (r + 1) * n)
        if kind in ("self_attn.k_proj", "self_attn.v_proj"):
            a = self.kv_head_start * d
            return TensorSplit(0, a, a + self.kv_heads_per_rank * d)
        if kind in ("mlp.gate_proj", "mlp.up_proj"):
            n = cfg.intermediate_size // self.tp
            return TensorSplit(0, r * n, (r + 1) * n)
        if kind in ROW_PARALLEL:
            if param == "bias":
                return None  # added once, after the all-reduce
            k = (cfg.num_attention_heads * d if kind == "self_attn.o_proj" else cfg.intermediate_size) // self.tp
            return TensorSplit(1, r * k, (r + 1) * k)
        return None

    def is_row_parallel_bias(self, tensor_name: str) -> bool:
        """Biases of o/down: base bias is added after the all-reduce, so a delta's bias only on rank 0."""
        module, _, param = tensor_name.rpartition(".")
        return param == "bias" and module.startswith("model.layers.") and module.split(".", 3)[-1] in ROW_PARALLEL
