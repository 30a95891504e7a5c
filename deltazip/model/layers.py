"""Llama building blocks. Every weight-bearing module knows its Hugging Face name (`hf_name`) and
offers it to the per-step delta hook; modules work on flattened rows [N, features]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltazip.model.attention import causal_attention, paged_attention, store_kv
from deltazip.model.config import LlamaConfig, RopeScaling
from deltazip.model.context import DeltaOps, ForwardContext
from kernels import rope_kv


class NamedLinear(nn.Linear):
    """nn.Linear that adds the row's fine-tune delta: y = x @ W.T (+ b) + x @ Δ.T."""

    hf_name: str = ""

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, in] -> y: [N, out]
        merged = getattr(deltas, "merged_linear", None)
        if merged is not None:
            y = merged(self.hf_name, x, self.weight, self.bias)
            if y is not None:
                return y
        y = F.linear(x, self.weight, self.bias)
        if deltas is not None:
            deltas.linear(self.hf_name, x, y)
        return y


class LinearGroup:
    """Sibling linears that read one input (q/k/v, gate/up), run as one: a single base GEMM over their stacked
    weights once `fuse` made the members' parameters row views of one tensor, and a single delta call
    (`DeltaOps.fused_linear`, where the DeltaOps has it) over the stacked output columns. Members are read from
    `owner` on every call, so modules swapped in later (tensor-parallel shards) are seen; anything that replaces a
    member's tensors (`load_state_dict(assign=True)`, `.to()`) just turns the fused GEMM off again."""

    def __init__(self, owner: nn.Module, attrs: tuple[str, ...], suffix: str) -> None:
        self._owner, self._attrs, self._suffix = owner, attrs, suffix
        self._fused: tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]] | None = None  # weight, bias, ptrs

    def members(self) -> list[NamedLinear]:
        return [getattr(self._owner, a) for a in self._attrs]

    @property
    def hf_name(self) -> str:
        """The group's name in the delta hook: the first member's module path with `suffix` as its last part."""
        return getattr(self._owner, self._attrs[0]).hf_name.rsplit(".", 1)[0] + "." + self._suffix

    def fuse(self) -> bool:
        """Make the members' weights (and biases) row views of one tensor; False where they cannot share one."""
        members = self.members()
        if any(type(m).forward is not NamedLinear.forward for m in members):
            return False  # a member with its own forward (communication, hooks) runs alone
        weights, biases = [m.weight for m in members], [m.bias for m in members]
        first = weights[0]
        if any(w.device != first.device or w.dtype != first.dtype or w.shape[1:] != first.shape[1:] for w in weights):
            return False
        if any((b is None) != (biases[0] is None) for b in biases):
            return False
        with torch.no_grad():
            weight = torch.cat([w.detach() for w in weights])  # [sum out, in]
            bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        row = 0
        for m in members:
            n = m.weight.shape[0]
            m.weight.data = weight[row:row + n]
            if bias is not None:
                m.bias.data = bias[row:row + n]
            row += n
        self._fused = (weight, bias, self._pointers(members))
        return True

    @staticmethod
    def _pointers(members: list[NamedLinear]) -> tuple[int, ...]:
        return tuple(t.data_ptr() for m in members for t in (m.weight, m.bias) if t is not None)

    def __call__(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> list[torch.Tensor]:
        """x: [N, in] -> each member's output, [N, out_i] column views of one [N, sum out] tensor."""
        members = self.members()
        fused_ops = getattr(deltas, "fused_linear", None)
        fused = self._fused
        if fused is not None and fused[2] != self._pointers(members):
            fused = self._fused = None  # a member's tensor was replaced: release the stale stacked copy
        if fused is None and fused_ops is None:
            return [m(x, deltas) for m in members]
        sizes = [m.weight.shape[0] for m in members]
        merged = getattr(deltas, "merged_linear", None) if fused is not None else None
        if merged is not None:
            y = merged(self.hf_name, x, fused[0], fused[1], [m.hf_name for m in members], sizes)
            if y is not None:
                return list(y.split(sizes, dim=1))
        if fused is not None:
            y = F.linear(x, fused[0], fused[1])
        else:
            y = torch.cat([F.linear(x, m.weight, m.bias) for m in members], dim=1)
        if fused_ops is not None:
            fused_ops(self.hf_name, [m.hf_name for m in members], x, y, sizes)
        elif deltas is not None:
            for m, part in zip(members, y.split(sizes, dim=1)):
                deltas.linear(m.hf_name, x, part)
        return list(y.split(sizes, dim=1))


class NamedEmbedding(nn.Embedding):
    """Token embedding with the delta hook."""

    hf_name: str = ""

    def forward(self, input_ids: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # input_ids: [N] -> h: [N, hidden]
        h = F.embedding(input_ids, self.weight)
        if deltas is not None:
            deltas.embedding(self.hf_name, input_ids, h)
        return h


# RMSNorm without a per-row weight runs torch's rms_norm (one fused kernel on CUDA) instead of ~8 elementwise ops;
# it rounds once where the op-by-op form rounds the normed value and then its product with the weight (<= 1 ulp
# apart). False: the op-by-op form everywhere (bench/worker.py --parts rms-norm-ab times both).
FUSED_RMS_NORM = True


# On CUDA the serving path rotates q and k and writes k and v to the cache in one launch (kernels/rope_kv.py) instead
# of ~16 op-by-op kernels; it rounds once where those round after each op. On an H200 (session 23) the 16-layer
# 32-sequence decode step took 3.73-3.77 ms against 4.30-4.71 ms op by op (bench/worker.py --parts rope-kv-ab; its GPU
# tests: tests/kernels/test_rope_kv.py, tests/gpu). False: op by op.
FUSED_ROPE_KV = True


def fused_rope_kv_applies(device: torch.device) -> bool:
    return FUSED_ROPE_KV and device.type == "cuda"


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as Hugging Face Llama does."""

    hf_name: str = ""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, hidden]
        weight = self.weight
        if deltas is not None:
            per_row = deltas.norm_weight(self.hf_name, weight, x)
            if per_row is not None:
                weight = per_row  # [N, hidden]
        if FUSED_RMS_NORM and weight.dim() == 1 and weight.dtype == x.dtype:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return weight * normed


@dataclass(slots=True)
class Rope:
    """cos/sin tables for a set of positions, fp32: [N, head_dim] each."""

    cos: torch.Tensor
    sin: torch.Tensor


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], fp32, with linear or llama3 scaling applied."""
    # Explicit CPU: models are often built under `torch.device("meta")`.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """Computes cos/sin for given positions. Holds no module state, so it never enters a state dict."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [head_dim // 2] fp32, CPU
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor) -> Rope:
        """positions: [N] int -> Rope with [N, head_dim] tables."""
        device = positions.device
        inv_freq = self._inv_freq_by_device.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_by_device.setdefault(device, self.inv_freq.to(device))
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, head_dim // 2]
        emb = torch.cat([freqs, freqs], dim=-1)
        return Rope(emb.cos(), emb.sin())


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate x: [..., N, heads, head_dim] by the tables of rope ([N, head_dim]); half-split layout."""
    cos = rope.cos[:, None, :].to(x.dtype)
    sin = rope.sin[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = NamedLinear(hidden, inter, bias=bias)
        self.up_proj = NamedLinear(hidden, inter, bias=bias)
        self.down_proj = NamedLinear(inter, hidden, bias=bias)
        self.gate_up = LinearGroup(self, ("gate_proj", "up_proj"), "gate_up_proj")

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        gate, up = self.gate_up(x, deltas)  # [N, inter] each
        return self.down_proj(F.silu(gate) * up, deltas)


class LlamaAttention(nn.Module):
    """Grouped-query self-attention; K/V pages live in `k_cache`/`v_cache` once allocated."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = NamedLinear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = NamedLinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = NamedLinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = NamedLinear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.qkv = LinearGroup(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")
        # Views into the model's KV cache, [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _qkv(self, x: torch.Tensor, deltas: DeltaOps | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [N, hidden] -> q: [N, heads, head_dim], k/v: [N, kv_heads, head_dim]
        n = x.shape[0]
        q, k, v = self.qkv(x, deltas)  # [N, heads * head_dim], [N, kv_heads * head_dim] x 2
        return (q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim), v.view(n, -1, self.head_dim))

    def forward(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        """Serving path. x: [T, hidden] flattened tokens of all sequences -> [T, hidden]."""
        assert ctx.attn is not None, "serving forward needs ctx.attn (AttentionMetadata)"
        assert self.k_cache is not None, "call model.allocate_kv_cache(num_blocks, block_size) first"
        q, k, v = self._qkv(x, ctx.deltas)
        num_tokens = ctx.attn.slot_mapping.shape[0]
        pad = x.shape[0] - num_tokens  # rows past the tokens (ForwardContext.padded_rows): never attended
        if pad:
            q, k, v = q[:num_tokens], k[:num_tokens], v[:num_tokens]
        if fused_rope_kv_applies(q.device):
            rope_kv.rope_store_kv(q, k, v, rope.cos, rope.sin, self.k_cache, self.v_cache, ctx.attn.slot_mapping)
        else:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            store_kv(k, v, self.k_cache, self.v_cache, ctx.attn.slot_mapping)
        o = paged_attention(q, self.k_cache, self.v_cache, ctx.attn, self.scale)  # [T, heads, head_dim]
        o = o.reshape(num_tokens, -1)
        if pad:
            o = F.pad(o, (0, 0, 0, pad))
        return self.o_proj(o, ctx.deltas)

    def forward_dense(
        self, x: torch.Tensor, batch: int, rope: Rope, deltas: DeltaOps | None = None
    ) -> torch.Tensor:
        """Dense path. x: [B*L, hidden] row-major over [B, L]; rope has L positions -> [B*L, hidden]."""
        q, k, v = self._qkv(x, deltas)
        seq_len = x.shape[0] // batch
        q = apply_rotary(q.view(batch, seq_len, self.num_heads, self.head_dim), rope)
        k = apply_rotary(k.view(batch, seq_len, self.num_kv_heads, self.head_dim), rope)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        o = causal_attention(q, k, v, self.scale)  # [B, L, heads, head_dim]
        return self.o_proj(o.reshape(x.shape[0], -1), deltas)
