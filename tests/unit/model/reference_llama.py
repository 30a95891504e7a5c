"""An independent, deliberately plain Llama forward over an HF-named state dict (test oracle)."""

from __future__ import annotations

import math

import torch

from deltazip.model.config import LlamaConfig


def _inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    d = cfg.head_dim
    freqs = [1.0 / (cfg.rope_theta ** (2 * i / d)) for i in range(d // 2)]
    s = cfg.rope_scaling
    out = []
    for f in freqs:
        if s is None or s.rope_type == "default":
            out.append(f)
        elif s.rope_type == "linear":
            out.append(f / s.factor)
        else:  # llama3, written from the paper's description
            wavelen = 2 * math.pi / f
            low_wl = s.original_max_position_embeddings / s.low_freq_factor
            high_wl = s.original_max_position_embeddings / s.high_freq_factor
            if wavelen < high_wl:
                out.append(f)
            elif wavelen > low_wl:
                out.append(f / s.factor)
            else:
                t = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                    s.high_freq_factor - s.low_freq_factor
                )
                out.append((1 - t) * f / s.factor + t * f)
    return torch.tensor(out, dtype=torch.float64)


def _rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    # x: [L, heads, d]; rotate pair (i, i + d/2) by angle pos * inv_freq[i]
    ang = pos[:, None].double() * inv_freq[None, :]  # [L, d/2]
    cos, sin = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def reference_logits(cfg: LlamaConfig, sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Logits [L, V] for one sequence, computed in float64 with explicit loops over heads."""
    sd = {k: v.double() for k, v in sd.items()}
    n_h, n_kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    seq = len(ids)
    pos = torch.arange(seq)
    inv_freq = _inv_freq(cfg)
    h = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = _rms(h, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(seq, n_h, d)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(seq, n_kv, d)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(seq, n_kv, d)
        q, k = _rotate(q, pos, inv_freq), _rotate(k, pos, inv_freq)
        heads = []
        for hh in range(n_h):
            kv = hh // (n_h // n_kv)
            scores = q[:, hh] @ k[:, kv].T / math.sqrt(d)
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        h = h + torch.cat(heads, dim=-1) @ sd[p + "self_attn.o_proj.weight"].T
        x = _rms(h, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = x @ sd[p + "mlp.gate_proj.weight"].T
        up = x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    h = _rms(h, sd["model.norm.weight"], cfg.rms_norm_eps)
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return h @ head.T
