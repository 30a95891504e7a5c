"""apply_deltas: the one entry point the worker calls per linear layer, for packed or dense delta slots.

A stack holds one tensor set per delta slot, stacked along a leading slot dim, so a single launch serves
every segment of a batch. Rows are sorted into segments: rows seg_starts[s]:seg_starts[s+1] use slot
seg_slots[s], -1 meaning "no delta". On CUDA packed stacks run the SBMM kernel (kernels/sbmm.py) and dense
stacks run cuBLAS (torch.bmm when all segments have one length, else one addmm per segment); on CPU both
run the torch reference (kernels/reference.py). Segment tensors may live on CPU (preferred: validated for
free, copied once) or on x's device (validated with a device sync unless check=False).

Long segments (the dense route): the SBMM kernel expands every delta word once per 16 rows, which past a few
hundred rows costs more GPU time than expanding the delta once and letting cuBLAS multiply (bench/sbmm_prefill.py).
A segment of sp4 / sp2 words with at least `sbmm.dense_rows` rows (kernels/sbmm_configs.json, per device; 1024 on
an H100, where the host cost of eager steps set it: docs/kernels.md run 22) runs either
- `merged_linear`: one GEMM on base + Δ, expanded together (`sbmm.dequantize_rows(..., base=W)`, at most
  `DENSE_CHUNK_BYTES` at a time), in place of the base GEMM and the delta's; the worker's model asks for it first
  (services/worker/delta_ops.py `StepDeltaOps.merged_linear`); or
- `dense_linear`: the delta alone expanded and added by a cuBLAS addmm after the base GEMM, what `apply_deltas`
  does when the caller passes the segments on the host (`host_segments`; tensor-parallel linears).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kernels import layout, reference, sbmm, sp2_prefill, sp2_wgmma, sp2_wgmma_ws, spmma_layout
from kernels.sbmm_plan import sm_count


def _field(packed, name: str):
    """packed[name] for a dict, packed.name for an object (e.g. deltazip's DeltaTensor); None if absent."""
    if isinstance(packed, Mapping):
        return packed.get(name)
    return getattr(packed, name, None)


@dataclass(frozen=True, slots=True)
class PackedDeltaStack:
    """Slot-stacked 2:4 low-bit deltas in the canonical layout of kernels/packing.py, for one linear; with
    `tiled`, 4-bit qweight and meta in tile-major order, with `sp4` in the sparse-MMA kernel's order, with `sp2`
    2-bit ones in the 2-bit sparse-MMA kernel's order (kernels/layout.py, kernels/spmma_layout.py; the orders CUDA
    slots keep)."""

    qweight: torch.Tensor  # int32 [num_slots, N, K * bits / 64]; dense2 (meta None): [num_slots, N, K / 16]
    meta: torch.Tensor | None  # int32 [num_slots, N, K / 32]; None: 2-bit dense2 words (kernels/layout.py)
    scales: torch.Tensor  # fp16 [num_slots, N, K / group_size]
    zeros: torch.Tensor | None  # fp16 like scales (asymmetric) or None (symmetric, z = 2**(bits-1))
    bits: int
    group_size: int  # dense columns per scale; K for per-row scales
    sym: bool
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    tiled: bool = False  # qweight / meta tile-major (4-bit, N and K whole tiles); set_slot writes that order
    sp4: bool = False  # qweight / meta in the sp4 order (spmma_layout.sp4_format_ok); set_slot writes that order
    sp2: bool = False  # qweight / meta in the sp2 order (spmma_layout.sp2_format_ok); set_slot writes that order

    def __post_init__(self) -> None:
        n, k = self.shape
        slots = self.qweight.shape[0]
        if self.bits not in (2, 4):
            raise ValueError(f"PackedDeltaStack supports bits 2 and 4, got {self.bits}")
        if k % 32 or k % self.group_size:
            raise ValueError(f"K={k} must be a multiple of 32 and of group_size={self.group_size}")
        if self.tiled and (self.meta is None or not layout.tiled4_format_ok("sparse24", self.bits, self.shape)):
            raise ValueError(f"tiled stacks hold 4-bit 2:4 words with N a multiple of {layout.TILE_ROWS} and K of "
                             f"{layout.TILE_COLS}; got bits={self.bits}, shape={self.shape}")
        if self.sp4 and (self.tiled or self.meta is None or not spmma_layout.sp4_format_ok(
                "sparse24", self.bits, self.sym, self.shape, self.group_size)):
            raise ValueError(f"sp4 stacks (not also tiled) hold 4-bit symmetric 2:4 words with N a multiple of "
                             f"{layout.TILE_ROWS}, K of {layout.TILE_COLS} and scale groups per row or a multiple of "
                             f"{layout.TILE_COLS}; got bits={self.bits}, sym={self.sym}, shape={self.shape}, "
                             f"group_size={self.group_size}")
        if self.sp2 and (self.tiled or self.sp4 or self.meta is None or not spmma_layout.sp2_format_ok(
                "sparse24", self.bits, self.sym, self.shape, self.group_size)):
            raise ValueError(f"sp2 stacks (not also tiled or sp4) hold 2-bit symmetric 2:4 words with N a multiple of "
                             f"{layout.TILE_ROWS}, K of {spmma_layout.SP2_STEP} and scale groups per row or a multiple "
                             f"of {layout.TILE_COLS}; got bits={self.bits}, sym={self.sym}, shape={self.shape}, "
                             f"group_size={self.group_size}")
        if self.meta is None:  # dense2 words: 2-bit symmetric, 16 dense columns per word
            if self.bits != 2 or not self.sym:
                raise ValueError("dense2 words (meta None) hold 2-bit symmetric codes only")
            expect = {"qweight": (self.qweight, (slots, n, k // 16), torch.int32)}
        else:
            expect = {
                "qweight": (self.qweight, (slots, n, k * self.bits // 64), torch.int32),
                "meta": (self.meta, (slots, n, k // 32), torch.int32),
            }
        expect["scales"] = (self.scales, (slots, n, k // self.group_size), torch.float16)
        if self.zeros is not None:
            expect["zeros"] = (self.zeros, (slots, n, k // self.group_size), torch.float16)
        for name, (t, shape, dtype) in expect.items():
            if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
                raise ValueError(f"{name}: expected contiguous {dtype} {shape}, got {t.dtype} {tuple(t.shape)}")
        if self.sym != (self.zeros is None):
            raise ValueError("sym=True needs zeros=None, sym=False needs zeros")

    @property
    def num_slots(self) -> int:
        return self.qweight.shape[0]

    @classmethod
    def empty(
        cls, num_slots: int, shape: tuple[int, int], bits: int, group_size: int | None = 128, sym: bool = True,
        device: torch.device | str = "cpu", tiled: bool = False, sp4: bool = False, sp2: bool = False,
    ) -> PackedDeltaStack:
        """Zero deltas in every slot (scales 0); group_size None means per-row scales."""
        n, k = shape
        group = k if group_size is None else group_size
        return cls(
            qweight=torch.zeros(num_slots, n, k * bits // 64, dtype=torch.int32, device=device),
            meta=torch.full((num_slots, n, k // 32), 0x44444444, dtype=torch.int32, device=device),  # keep cols 0, 1
            scales=torch.zeros(num_slots, n, k // group, dtype=torch.float16, device=device),
            zeros=None if sym else torch.zeros(num_slots, n, k // group, dtype=torch.float16, device=device),
            bits=bits, group_size=group, sym=sym, shape=(n, k), tiled=tiled, sp4=sp4, sp2=sp2,
        )

    @classmethod
    def from_packed(
        cls, packed: Sequence, bits: int | None = None, shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None, tiled: bool = False, sp4: bool = False, sp2: bool = False,
    ) -> PackedDeltaStack:
        """Stack per-slot packed deltas (dicts or DeltaTensor-like objects with qweight/meta/scales/zeros in the
        canonical layout, and bits/shape given here or on the first item) into slots 0..len-1; tiled: store
        4-bit words and meta tile-major; sp4 / sp2: in the sp4 / sp2 order."""
        if not packed:
            raise ValueError("from_packed needs at least one packed delta")
        first = packed[0]
        bits = bits if bits is not None else _field(first, "bits")
        shape = tuple(shape if shape is not None else _field(first, "shape"))
        scales = _field(first, "scales")
        if bits is None or len(shape) != 2 or scales is None or _field(first, "meta") is None:
            raise ValueError("from_packed needs bits, a 2-D shape and 2:4 parts (qweight, meta, scales)")
        group = shape[1] // scales.shape[-1]
        sym = _field(first, "zeros") is None
        dev = device if device is not None else scales.device
        stack = cls.empty(len(packed), shape, bits, group, sym, dev, tiled, sp4, sp2)
        for i, p in enumerate(packed):
            stack.set_slot(i, p)
        return stack

    @property
    def order(self) -> str:
        """The stored order of qweight / meta: tiled4, sp4, sp2 or canonical."""
        return "tiled4" if self.tiled else "sp4" if self.sp4 else "sp2" if self.sp2 else "canonical"

    def set_slot(self, i: int, packed) -> None:
        """Copy one packed delta (canonical layout) into slot i in place, in the stack's order (tiled4 / sp4 / sp2)."""
        if not 0 <= i < self.num_slots:
            raise ValueError(f"slot {i} out of range [0, {self.num_slots})")
        parts = {"qweight": self.qweight, "meta": self.meta, "scales": self.scales, "zeros": self.zeros}
        for name, dst in parts.items():
            src = _field(packed, name)
            if (src is None) != (dst is None):
                raise ValueError(f"slot {i}: {name} is {'missing' if src is None else 'unexpected'} for this stack")
            if dst is None:
                continue
            if tuple(src.shape) != tuple(dst.shape[1:]):
                raise ValueError(f"slot {i}: {name} shape {tuple(src.shape)}, stack wants {tuple(dst.shape[1:])}")
            spmma_layout.copy_stored_part(self.order, name, src, dst[i])

    def clear_slot(self, i: int) -> None:
        """Make slot i a zero delta (scales 0)."""
        self.scales[i].zero_()


@dataclass(frozen=True, slots=True)
class DenseDeltaStack:
    """Slot-stacked dense deltas [num_slots, N, K] (the worker's uncompressed `dense-delta` baseline)."""

    deltas: torch.Tensor  # [num_slots, N, K], fp16 / bf16 (fp32 on CPU is fine)

    @property
    def num_slots(self) -> int:
        return self.deltas.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.deltas.shape[1:])

    @classmethod
    def empty(cls, num_slots: int, shape: tuple[int, int], dtype: torch.dtype = torch.float16,
              device: torch.device | str = "cpu") -> DenseDeltaStack:
        return cls(torch.zeros(num_slots, *shape, dtype=dtype, device=device))

    def set_slot(self, i: int, delta: torch.Tensor) -> None:
        """Copy a dense delta [N, K] into slot i in place."""
        if tuple(delta.shape) != self.shape:
            raise ValueError(f"slot {i}: delta shape {tuple(delta.shape)}, stack wants {self.shape}")
        self.deltas[i].copy_(delta, non_blocking=True)


def validate_segments(seg_starts: torch.Tensor, seg_slots: torch.Tensor, num_rows: int, num_slots: int) -> None:
    """Raise ValueError unless seg_starts [S+1] is non-decreasing within [0, num_rows] and every slot is -1
    or in [0, num_slots). Reads the tensors on the host (a device sync if they live on a GPU)."""
    if seg_starts.dim() != 1 or seg_slots.dim() != 1 or seg_starts.shape[0] != seg_slots.shape[0] + 1:
        raise ValueError(f"need seg_starts [S+1] and seg_slots [S], got {tuple(seg_starts.shape)} and "
                         f"{tuple(seg_slots.shape)}")
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    if starts[0] < 0 or starts[-1] > num_rows or any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"seg_starts must be non-decreasing within [0, {num_rows}], got {starts}")
    bad = [s for s in slots if not -1 <= s < num_slots]
    if bad:
        raise ValueError(f"segment slots {bad} out of range: use -1 (no delta) or 0..{num_slots - 1}")


def apply_deltas(
    x: torch.Tensor,
    y: torch.Tensor,
    stack: PackedDeltaStack | DenseDeltaStack,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    check: bool = True,
    workspace: sbmm.Workspace | None = None,
    host_segments: tuple[Sequence[int], Sequence[int]] | None = None,
) -> int:
    """In place y[seg] += x[seg] @ Δ[slot(seg)].T for every segment. x: [T, K], y: [T, N]. Returns how many
    segments ran on the dense route (0 unless `host_segments` let long ones take it).

    Packed stacks: one SBMM launch on CUDA, the torch reference on CPU. Dense stacks: cuBLAS on CUDA,
    reference on CPU. check=False skips segment validation (the caller ran validate_segments once per step).
    workspace: the caller's `sbmm.Workspace` for launches its stream runs in order (CUDA packed stacks only).
    host_segments: (starts, slots) as host lists, the same segments as the tensors: lets long segments of sp4 /
    sp2 stacks take the dense path (module docstring) without a device sync.
    """
    n, k = stack.shape
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != k or y.shape != (x.shape[0], n):
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not fit a delta of shape (N={n}, K={k})")
    if check:
        validate_segments(seg_starts, seg_slots, x.shape[0], stack.num_slots)
    if seg_slots.numel() == 0 or x.shape[0] == 0:
        return 0
    dense = 0
    if isinstance(stack, DenseDeltaStack):
        _apply_dense(x, y, stack, seg_starts, seg_slots)
    elif x.is_cuda:
        if host_segments is not None and (stack.sp4 or stack.sp2):
            starts_h, slots_h = host_segments
            seg_slots, slots_h = _sp2_prefill_segments(x, y, stack, seg_slots, starts_h, slots_h)
            if seg_slots is None:
                return 0
            dense, seg_slots = _dense_segments(x, y, stack, seg_slots, starts_h, slots_h)
            if seg_slots is None:
                return dense
        starts = seg_starts.to(x.device, torch.int64, non_blocking=True)
        slots = seg_slots.to(x.device, torch.int64, non_blocking=True)
        sbmm.sbmm(x, y, stack.qweight, stack.meta, stack.scales, stack.zeros, starts, slots, stack.bits,
                  tiled=stack.tiled, sp4=stack.sp4, sp2=stack.sp2, workspace=workspace)
    elif stack.meta is None:
        raise ValueError("dense2 stacks (meta None) are a CUDA-only layout; CPU stacks keep the canonical one")
    else:
        qweight, meta = canonical_words(stack.qweight, stack.meta, stack.tiled, stack.sp4, stack.sp2)
        reference.sbmm_reference(x, y, qweight, meta, stack.scales, stack.zeros, stack.bits, stack.shape, seg_starts,
                                 seg_slots)
    return dense


# Segments of sp2 stacks with at least this many rows (and fewer than `sbmm.dense_rows`) run on the Hopper prefill
# kernels (fp16: Δ expanded once per 64-128 rows of x, warpgroup MMAs) instead of SBMM: 128-row blocks on
# kernels/sp2_wgmma_ws.py (warp-specialized; split along K where the launch has few tiles), 64-row blocks on
# kernels/sp2_wgmma.py (pipelined), when the launch has at least SP2_PREFILL_MIN_PROGRAMS programs: fewer leave most of
# the GPU idle, where SBMM's split-K is faster. Elsewhere SBMM runs them (the plain-Triton kernels/sp2_prefill.py is
# 3.5-7x slower than SBMM: docs/kernels.md run 26). A segment also has to fill its 128-row blocks to
# SP2_BLOCK_FILL: a block costs about what SBMM spends on 85 rows of the same shape at full occupancy (H200, s25b:
# qkv 35 us a block against 0.41 us a row, gate/up 62 / 0.72, down 29 / 0.35), so a 150-row segment (two blocks,
# 59% full) is cheaper on SBMM, a 200-row one (78%) here.
# On an H200 the warp-specialized kernel alone is 1.37-2.15x faster than SBMM on whole 128-row blocks
# (bench/results/sp2-prefill-s25b/d-*.json). In the worker's eager prefill steps (16 layers, 2-bit, 4 rounds,
# docs/kernels.md run 28) 96 (with the fill rule) made steps with one delta 8-14% faster in every round but steps with
# four deltas (one 64-192-row prompt each) slower in three of four (0.98-1.18x: one or two short segments leave
# the launch a wave of few programs while SBMM still runs the rest; worker-*-s25c.json); 256 made steps with one
# delta 4-15% faster in seven of eight rounds and routes nothing in those with four (worker-*-s25d/e.json).
# None: off (worker flag --sp2-prefill-rows).
SP2_PREFILL_ROWS: int | None = 256
SP2_PREFILL_MIN_PROGRAMS = 96
SP2_BLOCK_FILL = 0.68
# When set: route only where SBMM is left no segment of this many rows or more (the other fine-tunes' decoding rows
# are fewer), so one prefill launch takes all of a step's prompt work or none of it. The worker A/Bs (docs/kernels.md
# runs 28 and 31) found the route 7-15% faster on steps with one prompt and up to 18% slower on steps with four, where
# some prompts route and some stay on SBMM. Run 32 (left 32, route from 96): 0.87-0.97x no route on one-prompt
# steps, 0.83-1.06x on four-prompt ones, and the default's time on serving-like steps (2-8 prompts, Zipf over the
# deltas), which almost always leave a 32+-row segment. None: no such condition (worker flag
# --sp2-prefill-left-rows).
SP2_PREFILL_LEFT_ROWS: int | None = None


# The time of a 64-row block of sp2_wgmma's pipelined kernel against a 128-row one of sp2_wgmma_ws (H200, s25: the
# pipelined BLOCK_M 64 takes 1.20-1.30x the time per row at 512 rows a delta); a launch takes 64-row blocks where
# that is cheaper.
SP2_BLOCK64_COST = 0.62


def sp2_prefill_plan(n: int, rows: Sequence[int], block64_cost: float | None = None) -> tuple[int, int]:
    """(block_m, programs) of the sp2_wgmma launch over segments of these row counts (two 64-row blocks of Δ a
    program where N allows): 128 rows of x a block, or 64 where the half-empty last blocks of 128 cost more than
    64-row blocks' lower speed (a 130-row segment: three 64-row blocks, not two of 128)."""
    cost = SP2_BLOCK64_COST if block64_cost is None else block64_cost
    per_block = n // (128 if n % 128 == 0 else 64)
    b128 = sum(-(-r // 128) for r in rows)
    b64 = sum(-(-r // 64) for r in rows)
    return (64, per_block * b64) if cost * b64 < b128 else (128, per_block * b128)


def fills_blocks(rows: int, fill: float | None = None) -> bool:
    """Whether a segment of `rows` rows fills its 128-row blocks to SP2_BLOCK_FILL (or `fill`)."""
    return rows >= (SP2_BLOCK_FILL if fill is None else fill) * 128 * -(-rows // 128)


@functools.lru_cache(maxsize=16)
def _sp2_route(starts: tuple, slots: tuple, n: int, k: int, min_rows: int, top: int | None, min_programs: int,
               block64_cost: float, device: torch.device, left_rows: int | None = None,
               fill: float | None = None) -> tuple | None:
    """What `_sp2_prefill_segments` launches for these host segments: (block_m, K split (block_m 128: the
    warp-specialized kernel), the slots the kernel runs, its block table, the slots left for SBMM as a host list
    and on the device, or None when none is left), or None when it launches nothing. left_rows
    (`SP2_PREFILL_LEFT_ROWS`): nothing either when a segment of that many rows would be left to SBMM. fill:
    `fills_blocks`' (`SP2_BLOCK_FILL`; an argument, so the cache sees a changed value). Cached: every
    linear of a step has the same segments, so the two small tables are copied to the device once a step, not once
    a linear (eager prefill steps are host-bound)."""
    sizes = [starts[i + 1] - starts[i] for i in range(len(slots))]
    take = {i for i, slot in enumerate(slots) if slot >= 0 and sizes[i] >= min_rows
            and (top is None or sizes[i] < top) and fills_blocks(sizes[i], fill)}
    if not take:
        return None
    if left_rows is not None and any(slot >= 0 and i not in take and sizes[i] >= left_rows
                                     and (top is None or sizes[i] < top) for i, slot in enumerate(slots)):
        return None
    rows = [sizes[i] for i in take]
    block_m, programs = sp2_prefill_plan(n, rows, block64_cost)
    split = 1
    if n % 128 == 0:  # the warp-specialized kernel takes 128-row blocks, and splits K where tiles are few
        if block_m == 64 and programs < min_programs:
            block_m, programs = sp2_prefill_plan(n, rows, float("inf"))
        if block_m == 128:
            split = sp2_wgmma_ws.split_k(programs, k, sm_count(device))
    if programs * split < min_programs:
        return None
    picked = [slot if i in take else -1 for i, slot in enumerate(slots)]
    rest = [-1 if i in take else slot for i, slot in enumerate(slots)]
    rest_t = None if all(slot < 0 for slot in rest) else sp2_prefill.device_ints(rest, torch.int64, device)
    return block_m, split, picked, sp2_prefill.block_table(starts, picked, block_m, device), rest, rest_t


def _sp2_prefill_segments(x, y, stack: PackedDeltaStack, seg_slots: torch.Tensor, starts: Sequence[int],
                          slots: Sequence[int]) -> tuple[torch.Tensor | None, Sequence[int]]:
    """Run the sp2 segments of `SP2_PREFILL_ROWS` rows up to the dense route's threshold that fill their blocks on
    the Hopper prefill kernels (fp16; enough programs): (the slots tensor the SBMM launch still needs: those -1,
    the one passed when none qualified, None when none is left; the same slots as a host list)."""
    n, k = stack.shape
    # the cheap test first: this runs for every linear of every prefill step, most of which route nothing (steps
    # with four deltas of 64-192 rows, where nothing routes, were 2-5% slower than the off arm with the device
    # checks first, worker-*-s25d.json, and 0-9% after, worker-*-s25e.json: within the rounds' noise)
    if (SP2_PREFILL_ROWS is None or not stack.sp2
            or not any(starts[i + 1] - starts[i] >= SP2_PREFILL_ROWS for i in range(len(slots)))
            or not sp2_wgmma.supported(x, n, k, stack.group_size)
            or not sp2_prefill.supported(x, n, k, stack.bits, stack.group_size, stack.sym, stack.sp2)):
        return seg_slots, slots
    route = _sp2_route(tuple(starts), tuple(slots), n, k, SP2_PREFILL_ROWS, sbmm.dense_rows(x.device, stack.bits),
                       SP2_PREFILL_MIN_PROGRAMS, SP2_BLOCK64_COST, x.device, SP2_PREFILL_LEFT_ROWS, SP2_BLOCK_FILL)
    if route is None:
        return seg_slots, slots
    block_m, split, picked, blocks, rest, rest_t = route
    if block_m == 128 and n % 128 == 0:
        sp2_wgmma_ws.sp2_wgmma_ws(x, y, stack.qweight, stack.meta, stack.scales, starts, picked, blocks=blocks,
                                  split=split)
    else:
        sp2_wgmma.sp2_wgmma(x, y, stack.qweight, stack.meta, stack.scales, starts, picked, block_m, blocks=blocks)
    return rest_t, rest


# the dense path's scratch: Δ rows expanded at a time (fp16 / bf16). 192 MiB holds a 7B's largest linear whole (the
# fused gate/up, 22016 x 4096 fp16: 180 MB), so its merged GEMMs have the base GEMMs' shapes, which the worker
# plans ahead for its row buckets (a chunk's would be new to cuBLAS)
DENSE_CHUNK_BYTES = 192 << 20


def _dense_segments(x, y, stack: PackedDeltaStack, seg_slots: torch.Tensor, starts: Sequence[int],
                    slots: Sequence[int]) -> tuple[int, torch.Tensor | None]:
    """Run the segments of at least `sbmm.dense_rows` rows as dense Δ + cuBLAS; (how many did, the slots tensor
    the SBMM launch still needs: those segments -1, the one passed when none qualified, None when none is left)."""
    threshold = sbmm.dense_rows(x.device, stack.bits)
    if threshold is None:
        return 0, seg_slots
    dense = [i for i, slot in enumerate(slots) if slot >= 0 and starts[i + 1] - starts[i] >= threshold]
    if not dense:
        return 0, seg_slots
    for i in dense:
        dense_linear(x[starts[i]:starts[i + 1]], y[starts[i]:starts[i + 1]], stack, slots[i])
    rest = tuple(-1 if i in dense else slot for i, slot in enumerate(slots))
    if all(slot < 0 for slot in rest):
        return len(dense), None
    return len(dense), _slots_on(rest, x.device)


@functools.lru_cache(maxsize=16)
def _slots_on(slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The slots left to SBMM as int64 on `device`, once for all linears of a step (the same segments each): one
    copy from pinned memory, which, unlike a pageable one, does not wait for the GPU to finish its queue."""
    return sp2_prefill.device_ints(slots, torch.int64, device)


def dense_linear(x: torch.Tensor, y: torch.Tensor, stack: PackedDeltaStack, slot: int) -> None:
    """y += x @ Δ[slot].T for one segment of an sp4 / sp2 stack on CUDA: Δ expanded in chunks of 64-row
    multiples (`DENSE_CHUNK_BYTES`) into one buffer, each chunk one cuBLAS addmm on its columns of y."""
    for r0, delta in _dense_chunks(x, stack, slot, None):
        y[:, r0:r0 + delta.shape[0]].addmm_(x, delta.T)


def merged_linear(x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  stack: PackedDeltaStack, slot: int) -> None:
    """out = x @ (W + Δ[slot]).T (+ bias) for one segment of an sp4 / sp2 stack on CUDA: base + Δ expanded in
    chunks (one read of W and of the packed delta, one write of the sum) and one cuBLAS GEMM per chunk in place
    of the base GEMM and the delta's. out: [T, N], unit stride in N (written, not read); weight [N, K] in x's
    dtype."""
    for r0, merged in _dense_chunks(x, stack, slot, weight):
        part = out[:, r0:r0 + merged.shape[0]]
        part.addmm_(x, merged.T, beta=0)  # beta 0: out's old contents are not read
        if bias is not None:
            part += bias[r0:r0 + merged.shape[0]]


def _dense_chunks(x: torch.Tensor, stack: PackedDeltaStack, slot: int, base: torch.Tensor | None):
    """(first row, Δ rows [rows, K] (base + Δ with a base)) in chunks of 64-row multiples of at most
    `DENSE_CHUNK_BYTES`, each expanded into one buffer when its turn comes."""
    n, k = stack.shape
    chunk = min(n, max(layout.TILE_ROWS, DENSE_CHUNK_BYTES // (x.element_size() * k) // layout.TILE_ROWS
                       * layout.TILE_ROWS))
    buf = torch.empty(chunk, k, dtype=x.dtype, device=x.device)
    for r0 in range(0, n, chunk):
        rows = min(chunk, n - r0)
        yield r0, sbmm.dequantize_rows(stack.qweight[slot], stack.meta[slot], stack.scales[slot], stack.bits, k,
                                       buf[:rows], r0, base)


def dense_route(stack, x: torch.Tensor, rows: int) -> bool:
    """Whether a segment of `rows` rows of x on this stack takes the dense route: it can (`can_expand`), and has
    at least `sbmm.dense_rows` rows (the device's tuned table)."""
    if not can_expand(stack, x):
        return False
    threshold = sbmm.dense_rows(x.device, stack.bits)
    return threshold is not None and rows >= threshold


def can_expand(stack, x: torch.Tensor) -> bool:
    """Whether this stack's deltas expand on the sparse tensor cores for x: CUDA, fp16/bf16, sp4 / sp2 words."""
    return (isinstance(stack, PackedDeltaStack) and (stack.sp4 or stack.sp2) and x.is_cuda
            and x.dtype in (torch.float16, torch.bfloat16))


def merged_weight(stack: PackedDeltaStack, slot: int, weight: torch.Tensor) -> torch.Tensor:
    """base + Δ[slot] as a new [N, K] tensor in the weight's dtype (one expansion on the sparse tensor cores, the
    sum rounded once, as `merged_linear` multiplies by): what services/worker/merged_cache.py keeps."""
    n, k = stack.shape
    out = torch.empty(n, k, dtype=weight.dtype, device=weight.device)
    return sbmm.dequantize_rows(stack.qweight[slot], stack.meta[slot], stack.scales[slot], stack.bits, k, out, 0,
                                weight)


def canonical_words(qweight: torch.Tensor, meta: torch.Tensor, tiled: bool, sp4: bool, sp2: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored qweight / meta (row order, tiled4, sp4 or sp2) -> the canonical row order of kernels/packing.py."""
    if tiled:
        return layout.untile_packed(qweight, meta)
    if sp4:
        return spmma_layout.unpack_sp4(qweight, meta)
    if sp2:
        return spmma_layout.unpack_sp2(qweight, meta)
    return qweight, meta


def _apply_dense(x, y, stack: DenseDeltaStack, seg_starts, seg_slots) -> None:
    if not x.is_cuda:
        reference.dense_reference(x, y, stack.deltas, seg_starts, seg_slots)
        return
    starts, slots = seg_starts.tolist(), seg_slots.tolist()
    lengths = {b - a for a, b in zip(starts, starts[1:])}
    live = [s for s in slots if s >= 0]
    if len(lengths) == 1 and len(live) == len(slots) and starts[0] == 0 and starts[-1] == x.shape[0]:
        rows = lengths.pop()
        idx = torch.tensor(slots, device=x.device)
        w = stack.deltas.index_select(0, idx).to(x.dtype)  # [S, N, K]
        out = torch.bmm(x.view(len(slots), rows, -1), w.transpose(1, 2))  # [S, rows, N]
        y += out.view_as(y)
        return
    for s, slot in enumerate(slots):
        a, b = starts[s], starts[s + 1]
        if slot >= 0 and b > a:
            y[a:b].addmm_(x[a:b], stack.deltas[slot].to(x.dtype).T)
