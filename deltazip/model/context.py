"""Per-step forward metadata: paged attention layout and the delta hook, in one object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Where each sequence's tokens sit in the flattened batch and in the paged KV cache.

    Sequences are laid out back to back: sequence i owns tokens query_start_loc[i]:query_start_loc[i+1].
    Its new tokens are its *last* tokens, so chunked-prefill chunks and decode tokens mix freely.
    """

    positions: torch.Tensor  # [T] int64, absolute position of each token (for rotary)
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot (block * block_size + offset) each token writes
    block_tables: torch.Tensor  # [S, max_blocks] int32/int64, physical blocks of each sequence, padded with -1
    context_lens: torch.Tensor  # [S] int32/int64, tokens in the KV cache after this step (cached + new)
    query_start_loc: torch.Tensor  # [S + 1] int32/int64, prefix sums of new tokens per sequence
    # Host-side maxima, so attention needs no device sync; 0 means "compute from the tensors".
    max_query_len: int = 0
    max_context_len: int = 0
    # Index tensors every layer's attention would derive alike (attention.paged_attention): made by the first
    # layer of a forward, kept here for the others. Build a new metadata object per step; never refill its tensors.
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    def resolved_max_lens(self) -> tuple[int, int]:
        """(max_query_len, max_context_len), computed from the tensors when not given."""
        max_q = self.max_query_len or int((self.query_start_loc[1:] - self.query_start_loc[:-1]).max())
        max_ctx = self.max_context_len or int(self.context_lens.max())
        return max_q, max_ctx


class DeltaOps(Protocol):
    """Applies each row's fine-tune delta on top of the base model's output.

    Rows are sorted into contiguous segments by delta slot; base rows get nothing. The object is built
    per forward by the worker for a known row layout: for `LlamaForCausalLM.forward` rows are the T
    flattened tokens, for `compute_logits` they are the rows passed in (one per sampled sequence), for
    `forward_dense` they are the B*L tokens flattened in row-major order.
    """

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """In place y += x @ Δ(name, row).T. x: [N, in], y: [N, out]. `name` is the HF module name."""
        ...

    # Optional: fused_linear(group, names, x, y, sizes) applies the deltas of sibling linears that read one x
    # (q/k/v, gate/up) on their stacked outputs y [N, sum(sizes)], member i on columns of width sizes[i] in order.
    # `LinearGroup` calls it where a DeltaOps has it, else `linear` once per member on y's column views.
    # Optional: merged_linear(name, x, weight, bias, members=None, sizes=None) -> y or None computes the whole
    # linear (base and deltas) itself when it can do better than the base GEMM followed by `linear`: the worker
    # runs long segments as one GEMM on base + Δ (kernels/delta_linear.py). None: nothing done, the caller runs
    # base + delta. members / sizes: a `LinearGroup` on its stacked weight (the group's name, then as fused_linear).

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Per-row norm weight [N, H] (base + Δ) when some row's fine-tune changed this norm, else None."""
        ...

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        """In place h[i] += Δ_embed(row i)[input_ids[i]]. input_ids: [N], h: [N, H]."""
        ...


@dataclass(slots=True)
class ForwardContext:
    """Everything one forward needs besides the token ids."""

    attn: AttentionMetadata | None = None  # None for compute_logits / dense paths
    deltas: DeltaOps | None = None  # None = plain base (or merged) model
    # Serving forward: the rows its linears, norms and activations run on, past the T tokens (0: T). Rows T.. are
    # padding that attention never reads and the forward drops: a GEMM sees a few bucketed row counts instead of
    # every step's new T (cuBLAS plans each new shape on the host: services/worker/engine/model_runner.py
    # `row_bucket`). ctx.deltas, when given, lays out all of these rows (the padding as a base segment).
    padded_rows: int = 0
