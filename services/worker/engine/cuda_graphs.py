"""DecodeGraphs: decode-only forwards replayed from captured CUDA graphs, batch padded to a captured size.

Why: a decode step of a small batch is bound by kernel launches, not math; a graph replays the whole
forward with one launch. Shapes are fixed per captured size: the batch is padded with rows that write
one spare KV block (allocated past the block manager's blocks) and block tables are padded to the
longest context. On CUDA, attention reads the paged cache directly up to each sequence's context length
(kernels/paged_attention.py), so one graph per batch size serves every context; with that kernel off, attention
gathers a context bucket (a power of two times the block size, at least the longest context of the step), one
graph per (batch size, bucket), so short contexts stay cheap.
Steps with delta rows are captured too when every delta stack is packed for the SBMM kernel
(services/worker/graph_deltas.py): the kernel reads segment tensors at fixed addresses that each replay
refills, so one graph per (batch size, bucket, stack layout, largest-segment class) serves any mix of up to
`max_segments` segments. Dense-delta stacks run eager. Eager stays the reference.
"""

from __future__ import annotations

import torch

from deltazip.model import attention
from deltazip.model.context import AttentionMetadata, ForwardContext
from services.worker.device_slots import DeviceSlots
from services.worker.graph_deltas import GraphDeltaOps, graph_supported


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (the last one at least max_num_seqs)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted({*sizes, max_num_seqs})


class DecodeGraphs:
    """Captured forwards per padded batch size, captured lazily on first use."""

    def __init__(self, model, block_size: int, spare_block: int, max_num_seqs: int, max_model_len: int,
                 max_segments: int = 0) -> None:
        self.model = model
        self.max_segments = max_segments  # segments a delta graph holds (0 = base-only graphs)
        self.graph_deltas: GraphDeltaOps | None = None
        self._supported: tuple[tuple[int, int], bool] | None = None  # graph_supported per stack layout
        self._retired: list[GraphDeltaOps | None] = []
        self.block_size = block_size
        self.spare_block = spare_block  # KV block that padded rows write; no sequence owns it
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        dev = self.device = model.model.embed_tokens.weight.device
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.long, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.long, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int, int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def padded_size(self, batch: int) -> int | None:
        return next((b for b in self.sizes if b >= batch), None)

    def context_bucket(self, max_context_len: int) -> int:
        """Tokens attention gathers: block_size * 2^i >= max_context_len, capped at the longest context. With the
        paged decode kernel nothing is gathered: one bucket (the longest context) serves every step."""
        if attention.decode_kernel_applies(self.device):
            return self.max_blocks * self.block_size
        bucket = self.block_size
        while bucket < max_context_len:
            bucket *= 2
        return min(bucket, self.max_blocks * self.block_size)

    def takes_deltas(self, deltas) -> bool:
        """Whether this step's DeltaOps (a StepDeltaOps) can replay a graph: packed stacks, few segments."""
        slots = getattr(deltas, "device_slots", None)
        if self.max_segments <= 0 or slots is None:
            return False
        if len(deltas.slot_segments()) + 1 > self.max_segments:  # + 1: the padded rows' segment
            return False
        key = (id(slots), slots.layout_version)
        if self._supported is None or self._supported[0] != key:
            self._supported = (key, graph_supported(slots))
        return self._supported[1]

    def _delta_ops(self, slots: DeviceSlots) -> GraphDeltaOps:
        """The static delta tensors for the current stack layout (a new layout gets new ones)."""
        current = self.graph_deltas
        if current is None or current.slots is not slots or current.layout_version != slots.layout_version:
            # Graphs of older layouts stay (never replayed again: versions only grow). Destroying graphs that
            # share one memory pool while others capture is what the caching allocator asserts on.
            if current is not None:
                self._retired.append(current)  # their captured kernels read its index tensors
            self.graph_deltas = GraphDeltaOps(slots, self.sizes[-1], self.max_segments)
        return self.graph_deltas

    def _ctx(self, b: int, ctx_len: int, deltas: GraphDeltaOps | None, rows_hint: int | None = None,
             segments_hint: int | None = None) -> ForwardContext:
        attn = AttentionMetadata(
            positions=self.positions[:b], slot_mapping=self.slot_mapping[:b], block_tables=self.block_tables[:b],
            context_lens=self.context_lens[:b], query_start_loc=self.query_start_loc[:b + 1],
            max_query_len=1, max_context_len=ctx_len)
        return ForwardContext(attn=attn, deltas=None if deltas is None else deltas.for_rows(b, rows_hint, segments_hint))

    def _capture(self, b: int, ctx_len: int, layout: int, rows_hint: int = 0, segments_hint: int = 0) -> None:
        deltas = self.graph_deltas if layout else None
        hint, seg_hint = rows_hint or None, segments_hint or None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up allocator, kernel compiles and lazy inits outside the graph
                self.model(self.input_ids[:b], self._ctx(b, ctx_len, deltas, hint, seg_hint))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the residency threads may pin host memory or copy on their own streams meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self.model(self.input_ids[:b], self._ctx(b, ctx_len, deltas, hint, seg_hint))
        self.pool = graph.pool()
        self.graphs[(b, ctx_len, layout, rows_hint, segments_hint)] = (graph, out)

    def _fill_padding(self, start: int, end: int) -> None:
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = self.spare_block * self.block_size
        self.block_tables[start:end] = self.spare_block
        self.context_lens[start:end] = 1

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attn: AttentionMetadata, deltas=None) -> torch.Tensor:
        """Decode forward of len(input_ids) sequences (one new token each) -> hidden [B, H].
        deltas: the step's StepDeltaOps (checked with `takes_deltas`) or None for base-only rows."""
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
        layout, rows_hint, segments_hint = 0, 0, 0
        if deltas is not None:
            graph_deltas = self._delta_ops(deltas.device_slots)
            segments = deltas.slot_segments()
            graph_deltas.fill(segments, b)
            layout = graph_deltas.layout_version + 1  # 0 is reserved for base-only graphs
            rows_hint = graph_deltas.rows_hint_for(segments)
            segments_hint = graph_deltas.segments_hint_for(segments)
        key = (b, self.context_bucket(attn.max_context_len or int(attn.context_lens.max())), layout, rows_hint,
               segments_hint)
        if key not in self.graphs:
            self._capture(*key)  # warm-up runs write only this step's own slots again (same values)
        graph, out = self.graphs[key]
        graph.replay()
        return out[:batch]
