"""Which HF tensors a rank holds a slice of, along which dim, and where that slice comes from.

Megatron layout: q/k/v/gate/up are column-parallel (out features split: heads, KV heads, intermediate);
o/down are row-parallel (in features split) and followed by an all-reduce; embeddings, norms and
lm_head are replicated. KV heads are split when num_kv_heads % tp == 0, and replicated (each rank keeps
the one KV head its query heads read) when tp % num_kv_heads == 0.

Any other TP size runs on an equivalent padded layout (`PaddedLayout`): each KV head is replicated c times,
its query heads spread over the replicas, and whole zero heads (zero q/k/v rows, zero o_proj columns) fill
the rest up to a multiple of tp; the intermediate size is padded with zero gate/up rows and zero down_proj
columns. Zero heads and zero channels add exactly 0, so outputs equal the unsharded model's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deltazip.model.config import LlamaConfig

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")

Runs = tuple[tuple[int, int], ...]  # (start in the original tensor, length); start -1 = that many zeros


@dataclass(frozen=True, slots=True)
class TensorSplit:
    """A rank's slice [start, end) of a tensor along `dim` (0 = out features / rows, 1 = in features).

    runs: set for padded layouts — the slice is the concatenation of these original ranges and zero blocks
    (start/end then span the whole rank's slice in the padded tensor)."""

    dim: int
    start: int
    end: int
    runs: Runs = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def contiguous(self) -> bool:
        return not self.runs


def tp_problems(config: LlamaConfig, tp: int) -> list[str]:
    """Why `config` cannot be split exactly `tp` ways without padding (empty when it can)."""
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
    """TP sizes up to max_size that split this model exactly (no padded heads)."""
    return [tp for tp in range(1, max_size + 1) if not tp_problems(config, tp)]


def check_tp_size(config: LlamaConfig, tp: int) -> None:
    """Raise ValueError for a TP size no layout supports (tp < 1); other sizes pad when they must."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")


@dataclass(frozen=True, slots=True)
class PaddedLayout:
    """Padded head / channel order: padded index -> original index, None = a zero head or channel."""

    q_heads: tuple[int | None, ...]
    kv_heads: tuple[int | None, ...]
    intermediate_size: int  # padded; channels >= the original size are zero

    @staticmethod
    def choose(config: LlamaConfig, tp: int) -> PaddedLayout:
        """The cheapest replication factor c of KV heads (cost: q/o heads + k/v heads, then fewer KV heads)."""
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        group = heads // kv
        best = None
        for c in range(1, group + 1):
            per = -(-group // c)  # query slots per (replicated) KV head
            num_kv = -(-(kv * c) // tp) * tp
            cost = (num_kv * per + num_kv, num_kv)
            if best is None or cost < best[0]:
                best = (cost, c, per, num_kv)
        _, c, per, num_kv = best
        q_heads: list[int | None] = []
        kv_heads: list[int | None] = []
        for v in range(num_kv):
            j, i = divmod(v, c)
            real = j < kv
            kv_heads.append(j if real else None)
            for s in range(per):
                local = i * per + s
                q_heads.append(j * group + local if real and local < group else None)
        inter = -(-config.intermediate_size // tp) * tp
        return PaddedLayout(tuple(q_heads), tuple(kv_heads), inter)

    def padded_config(self, config: LlamaConfig) -> LlamaConfig:
        return dataclasses.replace(config, num_attention_heads=len(self.q_heads),
                                   num_key_value_heads=len(self.kv_heads), head_dim=config.head_dim,
                                   intermediate_size=self.intermediate_size)  # fmt: skip


def unit_runs(units: list[int | None] | tuple[int | None, ...], width: int) -> Runs:
    """Original unit indices (None = zero unit) of `width` elements each -> merged (start, length) runs."""
    runs: list[list[int]] = []
    for u in units:
        start = -1 if u is None else u * width
        if runs and (
            (start == -1 and runs[-1][0] == -1) or (start >= 0 and runs[-1][0] >= 0 and sum(runs[-1]) == start)
        ):
            runs[-1][1] += width
        else:
            runs.append([start, width])
    return tuple((a, n) for a, n in runs)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Per-rank slicing of one model's tensors."""

    config: LlamaConfig
    tp: int
    rank: int
    layout: PaddedLayout | None = dataclasses.field(default=None, init=False)

    def __post_init__(self) -> None:
        check_tp_size(self.config, self.tp)
        if not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} is outside 0..{self.tp - 1}")
        if tp_problems(self.config, self.tp):
            object.__setattr__(self, "layout", PaddedLayout.choose(self.config, self.tp))

    @property
    def padded(self) -> bool:
        return self.layout is not None

    @property
    def sharded_config(self) -> LlamaConfig:
        """The full model's config in the layout that is split (the padded one when padding)."""
        return self.layout.padded_config(self.config) if self.layout is not None else self.config

    @property
    def heads_per_rank(self) -> int:
        return self.sharded_config.num_attention_heads // self.tp

    @property
    def intermediate_per_rank(self) -> int:
        return self.sharded_config.intermediate_size // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        kv = self.sharded_config.num_key_value_heads
        return kv // self.tp if kv % self.tp == 0 else 1

    @property
    def kv_head_start(self) -> int:
        kv = self.sharded_config.num_key_value_heads
        if kv % self.tp == 0:
            return self.rank * self.kv_heads_per_rank
        return self.rank // (self.tp // kv)  # replicated: the KV head of this rank's query heads

    @property
    def kv_replicated(self) -> bool:
        return self.sharded_config.num_key_value_heads % self.tp != 0

    def split(self, tensor_name: str) -> TensorSplit | None:
        """The slice of HF tensor `tensor_name` (…weight / …bias) this rank holds; None = replicated."""
        module, _, param = tensor_name.rpartition(".")
        if not module.startswith("model.layers."):
            return None
        kind = module.split(".", 3)[-1]  # e.g. self_attn.q_proj
        if kind in ROW_PARALLEL and param == "bias":
            return None  # added once, after the all-reduce
        dim = 1 if kind in ROW_PARALLEL else 0
        d, layout = self.config.head_dim, self.layout
        if kind in ("self_attn.q_proj", "self_attn.o_proj"):
            first, n = self.rank * self.heads_per_rank, self.heads_per_rank
            runs = None if layout is None else unit_runs(layout.q_heads[first : first + n], d)
            a, b = first * d, (first + n) * d
        elif kind in ("self_attn.k_proj", "self_attn.v_proj"):
            first, n = self.kv_head_start, self.kv_heads_per_rank
            runs = None if layout is None else unit_runs(layout.kv_heads[first : first + n], d)
            a, b = first * d, (first + n) * d
        elif kind in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            a, b = self.rank * self.intermediate_per_rank, (self.rank + 1) * self.intermediate_per_rank
            real = max(0, min(b, self.config.intermediate_size) - a)  # channels past the original size are zero
            runs = None if layout is None else tuple(r for r in ((a, real), (-1, b - a - real)) if r[1] > 0)
        else:
            return None
        if runs is None:
            return TensorSplit(dim, a, b)
        if len(runs) == 1 and runs[0][0] >= 0:
            return TensorSplit(dim, runs[0][0], runs[0][0] + runs[0][1])  # a plain slice of the original
        return TensorSplit(dim, a, b, runs)

    def is_row_parallel_bias(self, tensor_name: str) -> bool:
        """Biases of o/down: base bias is added after the all-reduce, so a delta's bias only on rank 0."""
        module, _, param = tensor_name.rpartition(".")
        return param == "bias" and module.startswith("model.layers.") and module.split(".", 3)[-1] in ROW_PARALLEL
