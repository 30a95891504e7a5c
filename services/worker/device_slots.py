"""DeviceSlots: the tensors of the deltas in device slots, stacked by slot the way the SBMM kernel reads them.

Each HF tensor name has one `SlotStack` per storage format (dense fp16, or packed with given bits /
group size / symmetry): part tensors [num_slots, ...] allocated on first use, slot i = delta in slot i.
Linear deltas stay packed (the kernel dequantizes on the fly); norm and embedding deltas are stored
dense (fp16) because they are applied per row by indexing. A tied lm_head uses the embedding's stack.
On CUDA, 2-bit symmetric linear deltas (2:4 or dense) are re-encoded on the way in to dense2 words
(kernels/layout.py: same bytes, a much cheaper kernel expansion): their stacks (layout "dense2") hold qweight
[S, N, K/16] (tile-major words, kernels/layout.py) and scales, no meta. 4-bit symmetric 2:4 deltas that the
sparse-MMA kernel takes (N and K whole tiles, scales per row or in groups of a multiple of 128; GPU sm_80+, fp16 /
bf16 activations) keep their bits in its order (layout "sp4": qweight and meta re-ordered on the way in,
kernels/spmma_layout.py `pack_sp4`; sbmm's `sp4` path). Other 4-bit 2:4 deltas whose N and K fit whole tiles (asymmetric,
other scale groups, older GPUs) are stored tile-major (layout "tiled4": so a kernel K step reads contiguous
blocks); other shapes keep the canonical row order. CPU slots keep the canonical order unless forced.
With `sp2=True` (the worker's `--sparse-mma-2bit`, on by default for CUDA workers since its H100 run): 2-bit
symmetric 2:4 deltas that kernels/sbmm_spmma2.py takes (N % 64 == 0, K % 256 == 0) keep their bits in its order
instead of dense2 (layout "sp2": kernels/spmma_layout.py `pack_sp2`; sbmm's `sp2` path); dense-quantized 2-bit
deltas stay dense2.
The ResidencyManager decides which delta goes to which slot; this only holds the bytes.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch

from kernels import layout, sbmm, spmma_layout

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
PACKED_PARTS = ("qweight", "meta", "scales", "zeros")


@dataclass(frozen=True, slots=True)
class StackFormat:
    """What must match for two deltas of one tensor to share a stack."""

    kind: str  # dense | sparse24 | quant
    shape: tuple[int, ...]
    bits: int | None
    group_size: int | None
    sym: bool | None
    part_shapes: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    # canonical (kernels/packing.py) | dense2 (kernels/layout.py: qweight + scales) | tiled4 (canonical parts,
    # qweight and meta tile-major: kernels/layout.py tile_packed) | sp4 (the same, in spmma_layout.pack_sp4's order)
    # | sp2 (2-bit canonical parts, qweight and meta in spmma_layout.pack_sp2's order)
    layout: str = "canonical"


@dataclass(slots=True)
class SlotStack:
    """Part tensors stacked by slot: dense `delta` [S, *shape] or packed qweight/meta/scales/zeros [S, ...]."""

    format: StackFormat
    parts: dict[str, torch.Tensor]
    occupied: set[int] = field(default_factory=set)
    version: int = 0  # bumped on each write, so reference-path caches know when to refresh
    cache: dict = field(default_factory=dict)  # backend-owned: dequantized slots (CPU), kernel stack object
    # A fused stack (q/k/v or gate/up stacked by rows): each member's rows [a, b) and its view of them. A member
    # view (those rows of every part; a slot's rows are contiguous, the view across slots is not): its fused stack.
    member_rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    members: dict[str, SlotStack] = field(default_factory=dict)
    fused_in: SlotStack | None = None

    @property
    def kind(self) -> str:
        return self.format.kind

    @property
    def bits(self) -> int | None:
        return self.format.bits

    @property
    def shape(self) -> tuple[int, ...]:
        return self.format.shape

    @property
    def layout(self) -> str:
        return self.format.layout

    @property
    def tiled(self) -> bool:
        """Whether qweight and meta are tile-major 4-bit words (what sbmm's `tiled` flag says)."""
        return self.layout == "tiled4"

    @property
    def sp4(self) -> bool:
        """Whether qweight and meta are in the sparse-MMA kernel's order (what sbmm's `sp4` flag says)."""
        return self.layout == "sp4"

    @property
    def sp2(self) -> bool:
        """Whether 2-bit qweight and meta are in the sparse-MMA kernel's sp2 order (what sbmm's `sp2` flag says)."""
        return self.layout == "sp2"

    @property
    def sbmm_readable(self) -> bool:
        """Whether the SBMM kernel reads this stack as stored: 2:4 packed 2- or 4-bit, or dense2 words."""
        return self.layout == "dense2" or (self.kind == "sparse24" and self.bits in (2, 4))


class DeviceSlots:
    """`num_slots` slots on `device`; written by the residency loader, read by each step's DeltaOps."""

    def __init__(self, num_slots: int, device: torch.device | str, dtype: torch.dtype, linear_names: set[str],
                 tie_word_embeddings: bool, dense2: bool | None = None, tiled4: bool | None = None,
                 sp4: bool | None = None, sp2: bool = False,
                 fused: dict[str, tuple[str, ...]] | None = None) -> None:
        """fused: {group tensor name: member tensor names} (`LlamaForCausalLM.fused_tensor_names`): a delta whose
        members share one stored format goes into one stack under the group's name, members as row ranges."""
        self.num_slots = num_slots
        self._fused = dict(fused or {})
        self.device = torch.device(device)
        self.dtype = dtype  # activation dtype of the model
        self._linear_names = set(linear_names) | set(self._fused)  # HF names of the linear weights, fused groups too
        self._tied = tie_word_embeddings
        # dense2 stacks for 2-bit symmetric linears: None = on CUDA (what the kernel reads best), True/False = force
        self._dense2 = self.device.type == "cuda" if dense2 is None else dense2
        # tile-major stacks for 4-bit 2:4 linears that tile: None = on CUDA, True/False = force
        self._tiled4 = self.device.type == "cuda" if tiled4 is None else tiled4
        # sp4 stacks for 4-bit symmetric 2:4 linears the sparse-MMA kernel takes: None = where that kernel runs
        # (CUDA sm_80+, fp16/bf16), True/False = force (ahead of tiled4 where both apply)
        self._sp4 = sbmm.spmma_device_ok(self.device, dtype) if sp4 is None else sp4
        # sp2 stacks for 2-bit symmetric 2:4 linears (ahead of dense2): only when asked, and only where the
        # sparse-MMA kernel runs (CPU slots take it too, so tests can check the bytes and the reference path)
        self._sp2 = sp2 and (self.device.type == "cpu" or sbmm.spmma_device_ok(self.device, dtype))
        self._stacks: dict[str, dict[StackFormat, SlotStack]] = {}
        self._where: list[dict[str, SlotStack]] = [{} for _ in range(num_slots)]  # slot -> tensor name -> stack
        self._lock = threading.Lock()
        self.layout_version = 0  # bumped when a stack is created: captured CUDA graphs name the stacks they read
        self._generation = [0] * num_slots  # per slot, bumped by every write and drop (`generation`)
        # base + Δ weights kept between steps for the slots with the most prompt work (services/worker/merged_cache.py;
        # set by the worker with --merged-cache-bytes, None: off)
        self.merged_cache = None
        # Loads copy on their own CUDA stream so they overlap the engine's compute on the default stream.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def write(self, slot: int, name: str, tensors: dict) -> int:
        """Copy one delta ({HF tensor name: DeltaTensor}, any device) into `slot`; returns device bytes used."""
        left = self._release(slot)
        with _on_stream(self._copy_stream):
            _zero_slot(slot, left)  # then overwritten where the new delta uses the same stack
            where, num_bytes = self._copy_in(slot, tensors)
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # copies done before the slot is marked ready
        with self._lock:
            for stack in where.values():
                stack.occupied.add(slot)
                stack.version += 1
            self._where[slot] = where
            self._generation[slot] += 1
        return num_bytes

    def generation(self, slot: int) -> int:
        """How many times `slot` was written or dropped: what caches of one slot's delta (services/worker/
        merged_cache.py) compare, so a slot written again never serves a stale copy."""
        return self._generation[slot]

    def _copy_in(self, slot: int, tensors: dict) -> tuple[dict[str, SlotStack], int]:
        where, num_bytes = {}, 0
        for group, members in self._fused.items():
            fused = self._fused_stack(group, members, tensors)
            if fused is None:
                continue
            where[group] = fused
            for name in members:
                view = fused.members[name]
                self._write_part(slot, tensors[name], view)
                where[name] = view
                num_bytes += sum(t[slot].numel() * t.element_size() for t in view.parts.values())
        for tensor_name, delta in tensors.items():
            if tensor_name in where:
                continue  # written as part of a fused stack
            if tensor_name not in self._linear_names:
                delta = _dense_fp16(delta)
            layout_name, shapes = self._stored_format(delta)
            stack = self._stack_for(tensor_name, delta, shapes, layout_name)
            self._write_part(slot, delta, stack)
            where[tensor_name] = stack
            num_bytes += sum(t[slot].numel() * t.element_size() for t in stack.parts.values())
        if self._tied and EMBED in where and LM_HEAD not in where:
            where[LM_HEAD] = where[EMBED]  # tied: lm_head delta = embedding delta, same storage
        return where, num_bytes

    def _packed_order(self, delta) -> str:
        """The packed layout of a delta: sp2, sp4, tiled4 or canonical (dense2 comes after sp2 only; see the
        module docstring)."""
        kind, bits, shape = delta.kind, getattr(delta, "bits", None), tuple(delta.shape)
        sym, group_size = getattr(delta, "sym", None), getattr(delta, "group_size", None)
        has_meta = getattr(delta, "meta", None) is not None
        if self._sp2 and has_meta and spmma_layout.sp2_format_ok(kind, bits, sym, shape, group_size):
            return "sp2"
        if self._sp4 and has_meta and spmma_layout.sp4_format_ok(kind, bits, sym, shape, group_size):
            return "sp4"
        return "tiled4" if self._tiled4 and layout.tiled4_format_ok(kind, bits, shape) else "canonical"

    def _stored_format(self, delta) -> tuple[str, dict]:
        """(layout, {part: (shape of one slot, dtype)}) a linear or dense delta is stored in."""
        parts = _parts(delta)
        order = self._packed_order(delta)
        if order != "sp2" and self._dense2 and _dense2_able(delta):
            n, k = delta.shape
            return "dense2", {"qweight": ((n, k // 16), torch.int32),
                              "scales": (tuple(parts["scales"].shape), parts["scales"].dtype)}
        return order, {k: (tuple(v.shape), v.dtype) for k, v in parts.items()}

    def _write_part(self, slot: int, delta, stack: SlotStack) -> None:
        """Copy `delta` into `slot` of `stack` (a member view: its rows of the fused stack) in the stack's layout;
        on the current stream (the copy stream in `write`), re-orders after their copies."""
        def out(part: str) -> torch.Tensor:
            return stack.parts[part][slot]

        parts = _parts(delta)
        if stack.layout == "dense2":  # 2-bit symmetric, re-encoded into dense2 words (kernels/layout.py)
            qweight = parts["qweight"].to(self.device, non_blocking=True)
            if delta.kind == "sparse24":
                layout.to_dense2(qweight, parts["meta"].to(self.device, non_blocking=True), out=out("qweight"))
            else:
                layout.dense_to_dense2(qweight, out=out("qweight"))
            out("scales").copy_(parts["scales"], non_blocking=True)
            return
        for part, tensor in parts.items():
            spmma_layout.copy_stored_part(stack.layout, part, tensor, out(part))

    def _fused_stack(self, group: str, members: tuple[str, ...], tensors: dict) -> SlotStack | None:
        """The fused stack for this delta's members, or None when they cannot share one: a member missing, a
        format or part that differs between them (beyond the rows), or rows that do not split whole tiles."""
        if not all(name in tensors and name in self._linear_names for name in members):
            return None
        formats = [(tensors[name], *self._stored_format(tensors[name])) for name in members]
        if len({_format_beyond_rows(*f) for f in formats}) > 1:
            return None
        first, layout_name, shapes = formats[0]
        row_unit = 1 if layout_name == "canonical" else layout.TILE_ROWS  # tile-major layouts: whole row blocks
        spans, row = {}, 0
        for name, (delta, _, part_shapes) in zip(members, formats):
            n = delta.shape[0]
            if n % row_unit or any(s[0] != n for s, _ in part_shapes.values()):
                return None
            spans[name], row = (row, row + n), row + n
        fused_shapes = {p: ((row, *s[1:]), dt) for p, (s, dt) in shapes.items()}
        stack = self._stack_for(group, _Shaped(first, (row, *first.shape[1:])), fused_shapes, layout_name, spans)
        return stack if stack.member_rows == spans else None

    def drop(self, slot: int) -> None:
        """Empty `slot`. Invariant kept here: a slot is zero in every stack that does not hold its delta
        (scales 0 = a zero packed delta), so a kernel may run a stack over rows of any slot."""
        left = self._release(slot)
        if left:
            with _on_stream(self._copy_stream):
                _zero_slot(slot, left)
            if self._copy_stream is not None:
                self._copy_stream.synchronize()

    def _release(self, slot: int) -> list[SlotStack]:
        """Forget which stacks hold `slot` (their bytes stay until zeroed); returns those stacks."""
        with self._lock:
            left = list({id(s): s for s in self._where[slot].values()}.values())
            for stack in left:
                stack.occupied.discard(slot)
                stack.cache.pop(slot, None)
            self._where[slot] = {}
            self._generation[slot] += 1
        return left

    def stacks_by_name(self) -> dict[str, list[SlotStack]]:
        """Every stack that exists, by HF tensor name (a snapshot)."""
        with self._lock:
            return {name: list(by_format.values()) for name, by_format in self._stacks.items()}

    def stacks(self) -> list[SlotStack]:
        """Every stack that exists, in one list (a snapshot)."""
        with self._lock:
            return [stack for by_format in self._stacks.values() for stack in by_format.values()]

    def is_linear(self, tensor_name: str) -> bool:
        return tensor_name in self._linear_names

    def tensor_stacks(self, slot: int) -> dict[str, SlotStack]:
        """`slot`'s tensor name -> stack map (the live dict: `stack` reads it; a writer replaces it, see `_release`)."""
        return self._where[slot]

    def stack(self, slot: int, tensor_name: str) -> SlotStack | None:
        """The stack holding `tensor_name`'s delta for `slot`, or None when that delta leaves it unchanged."""
        return self._where[slot].get(tensor_name)

    def dense(self, slot: int, tensor_name: str) -> torch.Tensor | None:
        """A dense (norm / embedding) delta of one slot, fp16 [H] or [V, H]."""
        stack = self._where[slot].get(tensor_name)
        return None if stack is None else stack.parts["delta"][slot]

    def _stack_for(self, tensor_name: str, delta, part_shapes: dict, layout_name: str = "canonical",
                   member_rows: dict[str, tuple[int, int]] | None = None) -> SlotStack:
        """The stack for this delta's format; part_shapes: {part: (shape of one slot, dtype)} as stored;
        member_rows: a fused stack's members, {tensor name: rows [a, b)}, given their views when it is made."""
        fmt = StackFormat(delta.kind, tuple(delta.shape), getattr(delta, "bits", None),
                          getattr(delta, "group_size", None), getattr(delta, "sym", None),
                          tuple((k, shape, dt) for k, (shape, dt) in part_shapes.items()), layout_name)
        with self._lock:
            by_format = self._stacks.setdefault(tensor_name, {})
            stack = by_format.get(fmt)
            if stack is None:
                tensors = {k: torch.zeros((self.num_slots, *shape), dtype=dt, device=self.device)
                           for k, shape, dt in fmt.part_shapes}
                if layout_name in ("sp4", "sp2"):  # never-written slots: valid mma.sp meta (keep columns 0, 1 of 4)
                    tensors["meta"].fill_(0x44444444)
                stack = by_format[fmt] = SlotStack(fmt, tensors)
                if member_rows:
                    stack.member_rows = dict(member_rows)
                    stack.members = {name: _member_view(stack, a, b) for name, (a, b) in member_rows.items()}
                self.layout_version += 1
        return stack


def _format_beyond_rows(delta, layout_name: str, part_shapes: dict) -> tuple:
    """What must match for deltas of different row counts to share a fused stack."""
    return (delta.kind, getattr(delta, "bits", None), getattr(delta, "group_size", None), getattr(delta, "sym", None),
            tuple(delta.shape[1:]), layout_name, tuple((p, s[1:], dt) for p, (s, dt) in part_shapes.items()))


def _member_view(fused: SlotStack, a: int, b: int) -> SlotStack:
    """Rows [a, b) of every part of a fused stack, as a stack of the member's own format."""
    f = fused.format
    fmt = StackFormat(f.kind, (b - a, *f.shape[1:]), f.bits, f.group_size, f.sym,
                      tuple((p, (b - a, *shape[1:]), dt) for p, shape, dt in f.part_shapes), f.layout)
    return SlotStack(fmt, {p: t[:, a:b] for p, t in fused.parts.items()}, fused_in=fused)


@dataclass(slots=True)
class _Shaped:
    """A delta seen with another shape (a fused stack's format: the members' rows summed)."""

    delta: object
    shape: tuple[int, ...]

    def __getattr__(self, name: str):
        return getattr(self.delta, name)


def slots_for_model(model, num_slots: int, device: torch.device | str, dtype: torch.dtype, sp2: bool,
                    fused: bool) -> DeviceSlots:
    """A worker's DeviceSlots for `model` (a LlamaForCausalLM, or a rank's shard of one): its linear names and
    tied embeddings; with `fused`, the model's projections fused (one base GEMM per q/k/v and gate/up group) and
    the slots stacking each group's deltas as one."""
    from deltazip.model.layers import NamedLinear

    linear_names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    if fused:
        model.fuse_projections()
    return DeviceSlots(num_slots, device, dtype, linear_names, model.config.tie_word_embeddings,
                       sp2=sp2 and torch.device(device).type == "cuda",
                       fused=model.fused_tensor_names() if fused else None)


def _zero_slot(slot: int, stacks: list[SlotStack]) -> None:
    for stack in stacks:
        stack.parts["scales" if "scales" in stack.parts else "delta"][slot].zero_()


def _dense2_able(delta) -> bool:
    """Whether this delta can go into a dense2 stack (kernels/layout.py): 2-bit symmetric, 2:4 with its meta or
    dense, with a K the Gluon kernel tiles."""
    if delta.kind == "sparse24" and getattr(delta, "meta", None) is None:
        return False
    return layout.dense2_format_ok(delta.kind, getattr(delta, "bits", None), getattr(delta, "sym", None),
                                   tuple(delta.shape), getattr(delta, "group_size", None))


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _parts(delta) -> dict[str, torch.Tensor]:
    if delta.kind == "dense":
        return {"delta": delta.delta}
    return {k: getattr(delta, k) for k in PACKED_PARTS if getattr(delta, k) is not None}


@dataclass(slots=True)
class _Dense:
    """A dense fp16 delta in the DeltaTensor shape (for norm/embedding deltas stored packed)."""

    delta: torch.Tensor
    kind: str = "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta.shape)


def _dense_fp16(delta):
    if delta.kind == "dense" and delta.delta.dtype == torch.float16:
        return delta
    return _Dense(delta.dequantize(torch.float16))
