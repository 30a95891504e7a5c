"""Turns a scheduled batch into one model forward and one sampling call.

Rows are sorted into contiguous segments by delta (base rows first), so the delta kernel sees one
segment per delta; `deltas_provider(segments)` returns the DeltaOps for that row layout. It is called
twice per step: once for the token rows of the forward, once for the sampled rows of compute_logits.
On CUDA, every SBMM variant the steps can launch on new delta stacks is compiled ahead (`warm_up_kernels`,
kernels/sbmm_warmup.py): by the engine loop while idle (`LLMEngine.warm_up`), or else by the steps that see the
new stack layout, in slices of WARMUP_SLICE_S (a slice stops after the compile that passes it), so a cold
warm-up never holds requests for long, and once it has finished no step stalls on a compile.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltazip.model.context import AttentionMetadata, DeltaOps, ForwardContext
from deltazip.model.llama import LlamaForCausalLM
from deltazip.model.sampling import Sampler
from deltazip.logs import get_logger
from kernels import compile_watch
from services.worker.engine.sequence import Sequence

log = get_logger(__name__)

Segments = list[tuple[str | None, int]]  # (delta name or None for base, number of rows), in row order
DeltaOpsProvider = Callable[[Segments], DeltaOps | None]
WARMUP_SLICE_S = 0.2  # a warm-up slice launches no new kernel variant after this long (idle or in a step)

# Eager steps with prompt chunks run their linears on the step's token count T rounded up to `row_bucket(T)` rows
# (ForwardContext.padded_rows; CUDA, single-GPU models). cuBLAS plans every GEMM shape it has not seen on the host:
# on an H200 a 7B linear on a new row count took 190-290 us of host time (median; means 0.46-2.4 ms with first loads
# of its kernels) against 16-27 us on a repeated one (bench/gemm_shapes.py, gemm-shapes-*-s26.json), and prefill steps
# see a new T on most steps, ~65 linears each. Buckets keep the shapes to 56 row counts up to 8192 tokens, planned
# ahead by `warm_up_row_buckets`. False: every step runs on its own T.
ROW_BUCKETS = True


def row_bucket(rows: int) -> int:
    """The row count a step of `rows` tokens pads to: rows rounded up to a multiple of 1/16 of the next power of
    two, at least 16 (8 buckets per doubling; past 128 rows less than 1/8 more rows)."""
    step = max(16, (1 << max(rows - 1, 0).bit_length()) // 16)
    return -(-rows // step) * step


def row_buckets(max_rows: int) -> list[int]:
    """Every bucket `row_bucket` gives for 1..max_rows rows, ascending."""
    out, rows = [], 1
    while rows <= max_rows:
        out.append(row_bucket(rows))
        rows = out[-1] + 1
    return out


def delta_sort_key(delta: str | None) -> tuple[bool, str]:
    """Base rows first, then deltas by name."""
    return (delta is not None, delta or "")


def run_lengths(deltas: list[str | None], counts: list[int]) -> Segments:
    """Merge consecutive rows of the same delta into (delta, rows) segments."""
    segments: Segments = []
    for delta, n in zip(deltas, counts):
        if segments and segments[-1][0] == delta:
            segments[-1] = (delta, segments[-1][1] + n)
        else:
            segments.append((delta, n))
    return segments


@dataclass(slots=True)
class PreparedStep:
    input_ids: torch.Tensor  # [T]
    attn: AttentionMetadata
    token_segments: Segments
    order: list[int]  # row position -> index into the scheduled items
    sample_rows: list[int]  # row positions whose chunk ends at the sequence's last token


class ModelRunner:
    """Owns the model, its KV cache and the sampler."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        sampler: Sampler,
        deltas_provider: DeltaOpsProvider | None = None,
        cuda_graphs: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int = 0,
        max_segments: int = 0,
        max_num_batched_tokens: int = 2048,
        kernel_slots=None,
    ) -> None:
        """kernel_slots: the DeviceSlots the deltas provider reads, for warming kernels up between steps
        (`warm_up_if_stale`); steps warm up the slots they see either way."""
        self.model = model
        self.block_size = block_size
        self.sampler = sampler
        self.deltas_provider = deltas_provider
        self.device = model.model.embed_tokens.weight.device
        self.graphs = None
        self.last_kind = "prefill"  # the StepProfile phase of the last run: prefill | decode_graph | decode_eager
        self.last_warmup_s = 0.0  # seconds of the last run spent in warm_up_kernels (0: none)
        self.last_warmup_variants = 0  # kernel variants that warm-up compiled (kernels/compile_watch.py)
        self.last_dense_route = False  # whether the last run's forward put a segment on the dense route
        self.last_segments: Segments = []  # the last run's (delta or None, rows) token segments, padding left out
        self.max_segments = max_segments  # segments of a step's token rows: deltas per batch + base + spare
        self.max_num_batched_tokens = max_num_batched_tokens
        self.warmed: tuple[int, int] | None = None  # (id, layout_version) of the slots last warmed in full
        # bucketed eager steps (ROW_BUCKETS): a plain single-GPU model on CUDA (a tensor-parallel leader's ranks
        # must all run the same rows); the (bucket, linear shape) pairs still to plan, made at the first warm-up
        self.pads_rows = isinstance(model, LlamaForCausalLM) and self.device.type == "cuda"
        self._gemm_plans: list | None = None
        self._warm_seen: set = set()  # SBMM variants launched already (kernels/sbmm_warmup.py)
        self.kernel_slots = kernel_slots
        if cuda_graphs and self.device.type == "cuda" and torch.cuda.is_available():
            from services.worker.engine.cuda_graphs import DecodeGraphs

            model.allocate_kv_cache(num_blocks + 1, block_size)  # + the spare block padded rows write
            self.graphs = DecodeGraphs(model, block_size, num_blocks, max_num_seqs,
                                       max_model_len or num_blocks * block_size, max_segments)
        else:
            model.allocate_kv_cache(num_blocks, block_size)

    def prepare(self, items: list[tuple[Sequence, int]]) -> PreparedStep:
        """Flatten the scheduled chunks (sorted by delta) into the forward's tensors."""
        order = sorted(range(len(items)), key=lambda i: delta_sort_key(items[i][0].delta))
        ids, positions, slots, qsl, ctx_lens, tables, sample_rows = [], [], [], [0], [], [], []
        bs = self.block_size
        for row, i in enumerate(order):
            seq, n = items[i]
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n))
            qsl.append(qsl[-1] + n)
            ctx_lens.append(start + n)
            tables.append(seq.block_table)
            if start + n == seq.num_tokens:
                sample_rows.append(row)
        max_blocks = max(len(t) for t in tables)
        padded = [t + [-1] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        attn = AttentionMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.long, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.long, device=dev),
            max_query_len=max(n for _, n in items),
            max_context_len=max(ctx_lens),
        )
        segments = run_lengths([items[i][0].delta for i in order], [items[i][1] for i in order])
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        return PreparedStep(input_ids, attn, segments, order, sample_rows)

    def padded_rows(self, num_tokens: int, decode: bool) -> int:
        """The rows an eager forward of `num_tokens` tokens runs its linears on (ForwardContext.padded_rows; 0:
        its own count): the bucket, for steps with prompt chunks when ROW_BUCKETS is on and this runner pads."""
        if decode or not ROW_BUCKETS or not self.pads_rows:
            return 0
        return min(row_bucket(num_tokens), max(num_tokens, self.max_num_batched_tokens))  # within the warmed sizes

    def warm_pending(self) -> bool:
        """Whether warm-up work is left: bucket GEMMs not planned yet (`warm_up_row_buckets`), or SBMM variants of the
        kernel slots' current stack layout not all built (`warm_up_if_stale`; CUDA)."""
        if ROW_BUCKETS and self.pads_rows and (self._gemm_plans is None or self._gemm_plans):
            return True
        return self._stale(self.kernel_slots)

    def _stale(self, slots) -> bool:
        """Whether `slots` are CUDA slots whose stack layout changed since the last finished SBMM warm-up."""
        return slots is not None and slots.device.type == "cuda" and self.warmed != (id(slots), slots.layout_version)

    def warm_up_row_buckets(self, deadline: float | None = None) -> int:
        """Plan every (bucket, linear shape) GEMM the bucketed eager steps can run (one F.linear on zeros each, up
        to max_num_batched_tokens rows), so no step pays cuBLAS's host-side planning; stops after the call that
        passes `deadline` (time.perf_counter() seconds) and goes on at the next call. Returns the GEMMs run."""
        if not ROW_BUCKETS or not self.pads_rows:
            return 0
        if self._gemm_plans is None:
            sizes = sorted({min(r, self.max_num_batched_tokens) for r in row_buckets(self.max_num_batched_tokens)})
            self._gemm_plans = [(rows, w, b) for w, b in _linear_weights(self.model) for rows in sizes]
        done = 0
        with torch.inference_mode():
            while self._gemm_plans:
                rows, weight, bias = self._gemm_plans.pop()
                torch.nn.functional.linear(torch.zeros(rows, weight.shape[1], dtype=weight.dtype,
                                                       device=weight.device), weight, bias)
                done += 1
                if deadline is not None and time.perf_counter() > deadline:
                    break
        if done and not self._gemm_plans:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            log.info("row_buckets_warmed_up", gemms=done)
        return done

    def _deltas(self, segments: Segments) -> DeltaOps | None:
        return self.deltas_provider(segments) if self.deltas_provider is not None else None

    def _graph_ok(self, items: list[tuple[Sequence, int]], ctx: ForwardContext, decode: bool) -> bool:
        """Decode-only, a captured size fits, and no delta rows or deltas a graph can take: replay a graph."""
        if self.graphs is None or not decode or self.graphs.padded_size(len(items)) is None:
            return False
        return ctx.deltas is None or self.graphs.takes_deltas(ctx.deltas)

    def warm_up_if_stale(self, slots=None, budget_s: float | None = WARMUP_SLICE_S) -> float:
        """Run a slice of warm_up_kernels when `slots` (default: the kernel_slots given at construction) are CUDA
        slots whose stack layout changed since the last finished warm-up; returns its seconds (0.0: nothing to
        do). budget_s: launch no new variant after this many seconds (None: finish); a cut slice leaves the rest
        to the next call. Sets last_warmup_s and last_warmup_variants (kernel variants it compiled,
        kernels/compile_watch.py)."""
        self.last_warmup_s, self.last_warmup_variants = 0.0, 0
        slots = slots if slots is not None else self.kernel_slots
        if not self._stale(slots):
            return 0.0
        start, compiled = time.perf_counter(), compile_watch.compiled_variants()
        self.warm_up_kernels(slots, None if budget_s is None else start + budget_s)
        self.last_warmup_s = time.perf_counter() - start
        self.last_warmup_variants = compile_watch.compiled_variants() - compiled
        return self.last_warmup_s

    @torch.inference_mode()
    def warm_up_kernels(self, slots, deadline: float | None = None) -> int:
        """Launch (and so compile) every SBMM variant this runner's steps can launch on the packed stacks of
        `slots` (a DeviceSlots): eager forwards of up to max_num_batched_tokens rows in up to max_segments
        segments, and the CUDA-graph decode forwards. Stacks already warmed add nothing; returns the launches.
        deadline (time.perf_counter() seconds): stop after the launch that passes it; `warmed` then stays
        unset, and the next call goes on where this one stopped."""
        from kernels import sbmm_warmup

        version = slots.layout_version  # read first: a stack created meanwhile gets the next step's warm-up
        start = time.perf_counter()
        graphs = self.graphs
        launched, finished = sbmm_warmup.warm_up_stacks(
            slots.stacks(), slots.dtype,
            self.max_num_batched_tokens, self.max_segments,
            graph_rows=graphs.sizes if graphs is not None else (),
            graph_segments=graphs.max_segments if graphs is not None else 0, seen=self._warm_seen, deadline=deadline)
        if launched:
            torch.cuda.synchronize(slots.device)
        if launched or finished:  # a last slice may finish with nothing left to launch: it still says so
            log.info("sbmm_warmed_up", launches=launched, layout_version=version, finished=finished,
                     seconds=round(time.perf_counter() - start, 3))
        if finished:
            self.warmed = (id(slots), version)
        return launched

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]]) -> list[int | None]:
        """Forward the scheduled chunks; returns the sampled token per item (None: prefill not done yet)."""
        if not items:
            return []
        step = self.prepare(items)
        self.last_segments = step.token_segments
        decode = all(n == 1 and s.num_computed_tokens + 1 == s.num_tokens for s, n in items)
        padded = self.padded_rows(step.input_ids.shape[0], decode)
        pad = padded - step.input_ids.shape[0] if padded else 0
        segments = step.token_segments + [(None, pad)] if pad > 0 else step.token_segments
        ctx = ForwardContext(attn=step.attn, deltas=self._deltas(segments), padded_rows=padded)
        self.warm_up_if_stale(getattr(ctx.deltas, "device_slots", None))
        hidden = None
        self.last_kind = "decode_eager" if decode else "prefill"
        if self._graph_ok(items, ctx, decode):
            try:
                hidden = self.graphs.run(step.input_ids, step.attn, ctx.deltas)  # [T, hidden], T = sequences
                self.last_kind = "decode_graph"
            except RuntimeError as exc:  # a capture that fails must not stop serving: eager from now on
                log.error("cuda_graphs_disabled", error=str(exc)[:500])
                self.graphs = None
        if hidden is None:
            hidden = self.model(step.input_ids, ctx)  # [T, hidden]
        self.last_dense_route = getattr(ctx.deltas, "dense_route_used", False)
        out: list[int | None] = [None] * len(items)
        if not step.sample_rows:
            return out
        qsl = step.attn.query_start_loc
        last = qsl[torch.tensor(step.sample_rows, device=qsl.device) + 1] - 1
        seqs = [items[step.order[r]][0] for r in step.sample_rows]
        logit_segments = run_lengths([s.delta for s in seqs], [1] * len(seqs))
        logits = self.model.compute_logits(hidden[last], ForwardContext(deltas=self._deltas(logit_segments)))
        tokens = self.sampler(logits, [s.params for s in seqs], [s.num_output_tokens for s in seqs]).tolist()
        for r, token in zip(step.sample_rows, tokens):
            out[step.order[r]] = token
        return out


def _linear_weights(model) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) of one linear per distinct GEMM shape a serving forward runs: the fused q/k/v and gate/up
    weights where fused, every other linear of the layers (lm_head runs on the sampled rows, not the tokens)."""
    from deltazip.model.layers import NamedLinear

    seen, out, grouped = set(), [], set()

    def add(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        key = (tuple(weight.shape), weight.dtype, bias is not None)
        if key not in seen:
            seen.add(key)
            out.append((weight, bias))

    for group in model.linear_groups():
        if group._fused is not None:
            add(group._fused[0], group._fused[1])
            grouped.update(id(m) for m in group.members())
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, NamedLinear) and id(module) not in grouped:
                add(module.weight, module.bias)
    return out
