"""Llama decoder with two forward paths over the same layers:
serving (flattened varlen tokens + paged KV cache) and dense ([B, L], no cache)."""

from __future__ import annotations

import torch
from torch import nn

from deltazip.model.config import LlamaConfig
from deltazip.model.context import DeltaOps, ForwardContext
from deltazip.model.layers import (
    LlamaAttention,
    LlamaMLP,
    LinearGroup,
    NamedEmbedding,
    NamedLinear,
    RMSNorm,
    Rope,
    RotaryEmbedding,
)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._rotary: RotaryEmbedding | None = None  # set by LlamaModel, used when forward_dense gets no rope

    def forward(self, h: torch.Tensor, rope: Rope, ctx: ForwardContext) -> torch.Tensor:
        """Serving path. h: [T, hidden] -> [T, hidden]."""
        h = h + self.self_attn(self.input_layernorm(h, ctx.deltas), rope, ctx)
        return h + self.mlp(self.post_attention_layernorm(h, ctx.deltas), ctx.deltas)

    def forward_dense(self, h: torch.Tensor, rope: Rope | None = None, deltas: DeltaOps | None = None) -> torch.Tensor:
        """Dense path, usable one layer at a time. h: [B, L, hidden] -> [B, L, hidden].

        rope: tables for positions 0..L-1 (`LlamaForCausalLM.dense_rope`); computed here when None.
        """
        batch, seq_len, hidden = h.shape
        if rope is None:
            assert self._rotary is not None, "layer is not part of a LlamaModel; pass rope explicitly"
            rope = self._rotary(torch.arange(seq_len, device=h.device))
        x = h.reshape(batch * seq_len, hidden)
        x = x + self.self_attn.forward_dense(self.input_layernorm(x, deltas), batch, rope, deltas)
        x = x + self.mlp(self.post_attention_layernorm(x, deltas), deltas)
        return x.view(batch, seq_len, hidden)


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF prefix `model.`)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = NamedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        for layer in self.layers:
            layer._rotary = self.rotary


class LlamaForCausalLM(nn.Module):
    """Llama causal LM whose parameter names match Hugging Face checkpoints."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = NamedLinear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        for name, module in self.named_modules():
            if isinstance(module, (NamedLinear, NamedEmbedding, RMSNorm)):
                module.hf_name = name
        self.kv_cache: torch.Tensor | None = None  # [2, layers, num_blocks, block_size, kv_heads, head_dim]
        self.block_size = 0

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def linear_groups(self) -> list[LinearGroup]:
        """Each layer's q/k/v and gate/up groups (what `fuse_projections` fuses)."""
        return [g for layer in self.model.layers for g in (layer.self_attn.qkv, layer.mlp.gate_up)]

    def fuse_projections(self) -> int:
        """One base GEMM per group from now on: q/k/v and gate/up weights become row views of one tensor each
        (parameter names, shapes and values unchanged). Call after the weights are loaded and placed;
        returns the number of groups fused."""
        return sum(group.fuse() for group in self.linear_groups())

    def fused_tensor_names(self) -> dict[str, tuple[str, ...]]:
        """{group weight name: member weight names} in the delta hook's naming (what DeviceSlots stacks as one)."""
        return {g.hf_name + ".weight": tuple(m.hf_name + ".weight" for m in g.members()) for g in self.linear_groups()}

    # ---- serving path -------------------------------------------------------------------------

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """Allocate the paged KV cache (replacing any previous one) and hand each layer its views."""
        weight = self.model.embed_tokens.weight
        cfg = self.config
        shape = (2, cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=dtype or weight.dtype, device=device or weight.device)
        self.block_size = block_size
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.kv_cache[0, i]
            layer.self_attn.v_cache = self.kv_cache[1, i]
        return self.kv_cache

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """input_ids: [T] flattened tokens of all sequences -> final hidden states [T, hidden]. With
        ctx.padded_rows > T the layers run on that many rows, zero rows after the tokens' (attention reads only
        the first T), and the result is the first T rows."""
        assert ctx.attn is not None, "serving forward needs ctx.attn; use forward_dense for full sequences"
        rope = self.model.rotary(ctx.attn.positions)
        num_tokens = input_ids.shape[0]
        pad = ctx.padded_rows - num_tokens
        if ctx.padded_rows and pad < 0:
            raise ValueError(f"padded_rows {ctx.padded_rows} < the step's {num_tokens} tokens")
        h = self.model.embed_tokens(input_ids, ctx.deltas)  # [T, hidden] (the deltas' layout covers T + pad rows)
        if pad > 0:
            h = torch.nn.functional.pad(h, (0, 0, 0, pad))
        for layer in self.model.layers:
            h = layer(h, rope, ctx)
        return self.model.norm(h, ctx.deltas)[:num_tokens]

    def compute_logits(self, hidden: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        """hidden: [S, hidden] (one row per sampled sequence; ctx.deltas laid out for these rows) -> [S, V] fp32."""
        deltas = ctx.deltas if ctx is not None else None
        return self.lm_head(hidden, deltas).float()

    # ---- dense path ---------------------------------------------------------------------------

    def dense_rope(self, seq_len: int, device: torch.device | str | None = None) -> Rope:
        """Rotary tables for positions 0..seq_len-1, for `LlamaDecoderLayer.forward_dense`."""
        device = device if device is not None else self.model.embed_tokens.weight.device
        return self.model.rotary(torch.arange(seq_len, device=device))

    def hidden_dense(self, input_ids: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        """input_ids: [B, L] -> final normed hidden states [B, L, hidden]; rows for `deltas` are B*L."""
        batch, seq_len = input_ids.shape
        rope = self.dense_rope(seq_len, input_ids.device)
        h = self.model.embed_tokens(input_ids.reshape(-1), deltas).view(batch, seq_len, -1)
        for layer in self.model.layers:
            h = layer.forward_dense(h, rope, deltas)
        return self.model.norm(h.view(batch * seq_len, -1), deltas).view(batch, seq_len, -1)

    def forward_dense(self, input_ids: torch.Tensor, deltas: DeltaOps | None = None) -> torch.Tensor:
        """input_ids: [B, L] -> logits [B, L, V] fp32, full causal attention, no KV cache."""
        batch, seq_len = input_ids.shape
        h = self.hidden_dense(input_ids, deltas)
        return self.lm_head(h.view(batch * seq_len, -1), deltas).float().view(batch, seq_len, -1)
