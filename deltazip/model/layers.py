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


class NamedLinear(nn.Linear):
    """nn.Linear that adds the row's fine-tune delta: y = x @ W.T (+ b) + x @ Δ.T."""

    hf_name: str = ""

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, in] -> y: [N, out]
        y = F.linear(x, self.weight, self.bias)
        if deltas is not None:
            deltas.linear(self.hf_name, x, y)
        return y


class NamedEmbedding(nn.Embedding):
    """Token embedding with the delta hook."""

    hf_name: str = ""

    def forward(self, input_ids: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # input_ids: [N] -> h: [N, hidden]
        h = F.embedding(input_ids, self.weight)
        if deltas is not None:
            deltas.embedding(self.hf_name, input_ids, h)
        return h


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as Hugging Face Llama does."""

    hf_name: str = ""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, hidden]
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        weight = self.weight
        if deltas is not None:
            per_row = deltas.norm_weight(self.hf_name, weight, x)
            if per_row is not None:
                weight = per_row  # [N, hidden]
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

    def forward(self, x: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        # x: [N, hidden] -> [N, hidden]
        return self.down_proj(F.silu(self.gate_proj(x, deltas)) * self.up_proj(x, deltas), deltas)


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
        # Views into the model's KV cache, [num_blocks, block_size, num_kv_heads, head_dim].
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _qkv(self, x: torch.Tensor, deltas: DeltaOps | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x: [N, hidden] -> q: [N, heads, head_dim], k/v: [N, kv_heads, head_dim]
        n = x.shape[0]
        q = self.q_proj(x, deltas).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x, deltas).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, deltas).view(n, self.num_kv_heads, self.head_dim)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        """Serving path. x: [T, hidden] flattened tokens of all sequences -> [T, hidden]."""
        assert ctx.attn is not None, "serving forward needs ctx.attn (AttentionMetadata)"
        assert self.k_cache is not None, "call model.allocate_kv_cache(num_blocks, block_size) first"
        q, k, v = self._qkv(x, ctx.deltas)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        store_kv(k, v, self.k_cache, self.v_cache, ctx.attn.slot_mapping)
        o = paged_attention(q, self.k_cache, self.v_cache, ctx.attn, self.scale)  # [T, heads, head_dim]
        return self.o_proj(o.reshape(x.shape[0], -1), ctx.deltas)

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
