"""DecodeGraphs: decode-only forwards replayed from captured CUDA graphs, batch padded to a captured size.

Why: a decode step of a small batch is bound by kernel launches, not math; a graph replays the whole
forward with one launch. Shapes are fixed per captured size: the batch is padded with rows that write
one spare KV block (allocated past the block manager's blocks) and block tables are padded to the
longest context; attention gathers a context bucket (a power of two times the block size, at least the
longest context of the step), one graph per (batch size, bucket), so short contexts stay cheap.
Only steps whose rows are all base (or merged weights in swap mode) are captured: delta rows pass host
segment tensors to the delta kernel each call, so they run eager. Eager stays the reference.
"""

from __future__ import annotations

import torch

from deltazip.model.context import AttentionMetadata, ForwardContext


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (the last one at least max_num_seqs)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    """Captured forwards per padded batch size, captured lazily on first use."""

    def __init__(self, model, block_size: int, spare_block: int, max_num_seqs: int, max_model_len: int) -> None:
        self.model = model
        self.block_size = block_size
        self.spare_block = spare_block  # KV block that padded rows write; no sequence owns it
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        dev = model.model.embed_tokens.weight.device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def padded_size(self, batch: int) -> int | None:
        return next((b for b in self.sizes if b >= batch), None)

    def context_bucket(self, max_context_len: int) -> int:
        """Tokens attention gathers: block_size * 2^i >= max_context_len, capped at the longest context."""
        bucket = self.block_size
        while bucket < max_context_len:
            bucket *= 2
        return min(bucket, self.max_blocks * self.block_size)

    def _ctx(self, b: int, ctx_len: int) -> ForwardContext:
        attn = AttentionMetadata(
            positions=self.positions[:b], slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], query_start_loc=self.query_start_loc[:b + 1],
            max_query_len=1, max_context_len=ctx_len)
        return ForwardContext(attn=attn, deltas=None)

    def _capture(self, b: int, ctx_len: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up allocator and lazy inits outside the graph
                self.model(self.input_ids[:b], self._ctx(b, ctx_len))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(self.input_ids[:b], self._ctx(b, ctx_len))
        self.pool = graph.pool()
        self.graphs[(b, ctx_len)] = (graph, out)

    def _fill_padding(self, start: int, end: int) -> None:
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = self.spare_block * self.block_size
        self.block_tables[start:end] = self.spare_block
        self.context_lens[start:end] = 1

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Decode forward of len(input_ids) sequences (one new token each) -> hidden [B, H]."""
        batch = input_ids.shape[0]
        b = self.padded_size(batch)
        assert b is not None, f"batch {batch} exceeds the largest captured size {self.sizes[-1]}"
        tables = attn.block_tables
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(attn.positions)
        self.slot_mapping[:batch].copy_(attn.slot_mapping)
        self.block_tables[:batch].fill_(self.spare_block)
        self.block_tables[:batch, :tables.shape[1]].copy_(tables.clamp(min=0))  # -1 padding: any page, masked
        self.context_lens[:batch].copy_(attn.context_lens)
        self._fill_padding(batch, b)
        key = (b, self.context_bucket(attn.max_context_len or int(attn.context_lens.max())))
        if key not in self.graphs:
            self._capture(*key)  # warm-up runs write only this step's own slots again (same values)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:batch]
