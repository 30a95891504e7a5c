"""StepDeltaOps: the DeltaOps of one forward — rows in segments, each segment one delta slot (or base).

Linears: one `apply_linear` call per stack (storage format) that holds a delta of this step, with the
step's segments and slot -1 for rows whose delta is not in that stack. Norm and embedding deltas are
dense and applied per row; lm_head of a tied-embedding model uses the embedding delta.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.worker.device_slots import DeviceSlots, SlotStack
from services.worker import linear_backend


# `_stacks_of` answers with one lookup per slot when a single stack holds the tensor's delta for every slot of the
# step (deltas of one format: the common case); False: the per-segment grouping always (bench/worker.py --parts
# host-path-ab times both)
FAST_GROUPS = True


class StepDeltaOps:
    """DeltaOps for one row layout (tokens of a forward, or sampled rows of compute_logits)."""

    def __init__(self, slots: DeviceSlots, rows: Sequence[tuple[int | None, int]]) -> None:
        self._slots = slots
        rows = [(slot, n) for slot, n in rows if n]
        self.starts = [0]
        for _, n in rows:
            self.starts.append(self.starts[-1] + n)
        self.seg_slot = [-1 if slot is None else slot for slot, _ in rows]  # per segment
        self.num_rows = self.starts[-1]
        self._delta_segments = [(i, s) for i, s in enumerate(self.seg_slot) if s >= 0]
        self._delta_slots = {s for _, s in self._delta_segments}
        # each delta slot's tensor -> stack map, once a forward (`_stacks_of` reads one per slot per linear)
        self._wheres = [slots.tensor_stacks(s) for s in sorted(self._delta_slots)]
        self._all_slots: tuple[int, ...] = tuple(self.seg_slot)  # the slots of a stack that holds every delta slot
        self._seg_starts: torch.Tensor | None = None
        self._seg_slots: dict[tuple[int, ...], torch.Tensor] = {}
        self._on_device: dict[tuple, torch.Tensor] = {}
        self._workspace = linear_backend.kernel_workspace(slots.device)  # this forward's SBMM launches share it
        self._skip: frozenset[int] = frozenset()  # segments `merged_linear` computes itself (no delta launch)
        self.dense_route_used = False  # whether some linear ran a segment on the dense route (the step profile)
        # segments long enough for the dense route somewhere (merged_linear checks each stack's own threshold), or
        # that the merged-weight cache takes (services/worker/merged_cache.py)
        shortest = linear_backend.min_dense_rows(slots.device)
        self._cache = getattr(slots, "merged_cache", None)
        # segment -> its slot's write generation, for the segments the cache takes (decided once a forward)
        self._cached = {} if self._cache is None else {
            i: slots.generation(s) for i, s in self._delta_segments
            if self._cache.wants(s, slots.generation(s), self.starts[i + 1] - self.starts[i])}
        self._long = [(i, s) for i, s in self._delta_segments
                      if (shortest is not None and self.starts[i + 1] - self.starts[i] >= shortest)
                      or i in self._cached]

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += x @ Δ(row).T per delta segment. x: [N, in], y: [N, out]."""
        assert x.shape[0] == self.num_rows, f"{name}: {x.shape[0]} rows, layout has {self.num_rows}"
        self._apply(self._stacks_of(name + ".weight"), x, y)

    def fused_linear(self, group: str, names: Sequence[str], x: torch.Tensor, y: torch.Tensor,
                     sizes: Sequence[int]) -> None:
        """The deltas of sibling linears on their stacked outputs: y [N, sum(sizes)], member i on its columns.
        Slots whose members share a fused stack (DeviceSlots) take one launch over all columns; the members of
        other slots (a member missing, formats that differ) run on their own columns."""
        assert x.shape[0] == self.num_rows, f"{group}: {x.shape[0]} rows, layout has {self.num_rows}"
        group_tensor = group + ".weight"
        groups = self._stacks_of(group_tensor)
        self._apply(groups, x, y)
        if sum(len(members) for _, members in groups) == len(self._delta_slots):
            return  # every slot of the step has the fused stack: no member runs alone (the common case)
        for name, part in zip(names, y.split(list(sizes), dim=1)):
            self._apply(self._stacks_of(name + ".weight", skip=group_tensor), x, part)

    def merged_linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      members: Sequence[str] | None = None, sizes: Sequence[int] | None = None
                      ) -> torch.Tensor | None:
        """The whole linear when some segment takes the dense route (a long prompt on a delta,
        kernels/delta_linear.py) or the merged-weight cache's (services/worker/merged_cache.py): those rows as one
        GEMM on base + Δ each (expanded for this call, `merged_linear`, or kept between steps), in place of the base
        GEMM and the delta's; the other rows as the base GEMM on their runs plus `linear` (`fused_linear` for a
        group: `members`, `sizes`) for their deltas. None when no segment qualifies (the caller runs base +
        delta). name: the linear's (or group's) HF name; weight [out, in], bias: its (stacked) parameters."""
        if not self._long or not self._merges_on(x):  # the common case: one check per linear
            return None
        tensor_name = name + ".weight"
        merged = []  # (segment, kernel stack to expand from, slot, kept weight)
        for i, slot in self._long:
            stack = self._slots.stack(slot, tensor_name)
            if stack is None:
                continue
            kept = self._kept_weight(i, slot, tensor_name, stack, x, weight)
            if kept is not None:
                merged.append((i, None, slot, kept))
                continue
            kernel_stack = linear_backend.merge_stack(stack, x, weight, self.starts[i + 1] - self.starts[i])
            if kernel_stack is not None:
                merged.append((i, kernel_stack, slot, None))
        if not merged:
            return None
        from kernels.delta_linear import merged_linear

        self.dense_route_used = True
        total = x.shape[0]
        y = torch.empty(total, weight.shape[0], dtype=x.dtype, device=x.device)
        skip = frozenset(i for i, _, _, _ in merged)
        # the base GEMM on each run of rows between merged segments (runs a few merged rows apart: one GEMM)
        for a, b in base_runs(self.starts, skip):
            # on a planned row count: the extra rows are other runs' (the same products), merged segments' (written
            # below) or padding
            a, b = gemm_window(a, b, total)
            if bias is None:
                torch.mm(x[a:b], weight.T, out=y[a:b])
            else:
                torch.addmm(bias, x[a:b], weight.T, out=y[a:b])
        self._skip = skip
        try:
            if members is None:
                self.linear(name, x, y)
            else:
                self.fused_linear(name, members, x, y, sizes)
        finally:
            self._skip = frozenset()
        for i, kernel_stack, slot, kept in merged:
            a, b = self.starts[i], self.starts[i + 1]
            wa, wb = gemm_window(a, b, total)
            # a planned row count; into scratch where it spans other segments' rows, this one's then copied
            out = y[a:b] if (wa, wb) == (a, b) else torch.empty(wb - wa, weight.shape[0], dtype=x.dtype,
                                                                  device=x.device)
            if kept is None:
                merged_linear(x[wa:wb], out, weight, bias, kernel_stack, slot)
            elif bias is None:
                torch.mm(x[wa:wb], kept.T, out=out)
            else:
                torch.addmm(bias, x[wa:wb], kept.T, out=out)
            if (wa, wb) != (a, b):
                y[a:b] = out[a - wa:b - wa]
        return y

    @staticmethod
    def _merges_on(x: torch.Tensor) -> bool:
        """Whether x's device runs the merged route (CUDA: the expansion runs on the sparse tensor cores)."""
        return x.is_cuda

    def _kept_weight(self, i: int, slot: int, tensor_name: str, stack: SlotStack, x: torch.Tensor,
                     weight: torch.Tensor) -> torch.Tensor | None:
        """base + Δ of this linear for segment i (on `slot`) from the merged-weight cache, expanded into it first
        where the cache has room; None: a segment the cache does not take (or no cache), or deltas that cannot
        expand."""
        generation = self._cached.get(i)
        if generation is None:
            return None
        cache = self._cache
        kept = cache.lookup(slot, generation, tensor_name)
        if kept is not None:
            return kept
        kernel_stack = linear_backend.merge_stack(stack, x, weight, None)
        if kernel_stack is None or not cache.reserve(slot, generation, weight.numel() * weight.element_size(),
                                                     frozenset(self._delta_slots)):
            return None
        from kernels.delta_linear import merged_weight

        try:
            kept = merged_weight(kernel_stack, slot, weight)
        except torch.cuda.OutOfMemoryError:  # the budget was more than the GPU has left: keep what fits
            cache.shrink_to_used()
            return None
        cache.put(slot, generation, tensor_name, kept)
        return kept

    def _stacks_of(self, tensor_name: str, skip: str | None = None) -> list[tuple[SlotStack, set[int]]]:
        """The stacks holding this tensor's delta for the step's slots, each with its slots; slots that hold a
        `skip` stack are left out (their rows ran in the fused launch)."""
        if skip is None and FAST_GROUPS and self._wheres:  # the common case: one stack holds every slot's delta
            first = self._wheres[0].get(tensor_name)
            if first is not None and all(where.get(tensor_name) is first for where in self._wheres):
                return [(first, self._delta_slots)]
        groups: dict[int, tuple[SlotStack, set[int]]] = {}
        for _, slot in self._delta_segments:
            if skip is not None and self._slots.stack(slot, skip) is not None:
                continue
            stack = self._slots.stack(slot, tensor_name)
            if stack is not None:
                groups.setdefault(id(stack), (stack, set()))[1].add(slot)
        return list(groups.values())

    def _apply(self, groups: list[tuple[SlotStack, set[int]]], x: torch.Tensor, y: torch.Tensor) -> None:
        for stack, members in groups:
            if members is self._delta_slots and not self._skip:
                slots = self._all_slots  # every segment's own slot (`_stacks_of`'s common case)
            else:
                slots = tuple(s if s in members and i not in self._skip else -1 for i, s in enumerate(self.seg_slot))
                if all(s < 0 for s in slots):
                    continue  # every segment of this stack is merged_linear's
            on_device = (self._device_tensor(("starts",), self.starts, x.device),
                         self._device_tensor(slots, slots, x.device)) if x.is_cuda and stack.kind != "dense" else None
            if linear_backend.apply_linear(x, y, stack, self._starts_tensor(), self._slots_tensor(slots),
                                           self.starts, list(slots), on_device, self._workspace):
                self.dense_route_used = True

    @property
    def device_slots(self) -> DeviceSlots:
        return self._slots

    def slot_segments(self) -> list[tuple[int | None, int]]:
        """(slot or None for base, rows) per segment, in row order."""
        return [(None if s < 0 else s, self.starts[i + 1] - self.starts[i]) for i, s in enumerate(self.seg_slot)]

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """Per-row weight [N, H] = base + Δ for delta rows, or None when no row's delta touches it."""
        if self._workspace is not None:  # a norm ends the linears that share one input: drop its kept copy
            self._workspace.forget_x()
        tensor_name = name + ".weight"
        changed = [(i, self._slots.dense(s, tensor_name)) for i, s in self._delta_segments]
        changed = [(i, d) for i, d in changed if d is not None]
        if not changed:
            return None
        per_row = weight.to(x.dtype).expand(x.shape[0], -1).clone()  # [N, H]
        for i, delta in changed:
            per_row[self.starts[i]:self.starts[i + 1]] += delta.to(x.dtype)
        return per_row

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        """h[i] += Δ_embed(row i)[input_ids[i]]. input_ids: [N], h: [N, H]."""
        if self._workspace is not None:  # a forward starts: its first linear copies x anew
            self._workspace.forget_x()
        tensor_name = name + ".weight"
        for i, slot in self._delta_segments:
            delta = self._slots.dense(slot, tensor_name)  # [V, H]
            if delta is not None:
                a, b = self.starts[i], self.starts[i + 1]
                h[a:b] += delta[input_ids[a:b]].to(h.dtype)

    def _starts_tensor(self) -> torch.Tensor:
        """Segment row offsets [S+1], int32 on the host (the kernel copies them once per call)."""
        if self._seg_starts is None:
            self._seg_starts = torch.tensor(self.starts, dtype=torch.int32)
        return self._seg_starts

    def _device_tensor(self, key: tuple, values, device: torch.device) -> torch.Tensor:
        """int64 copy of `values` on the device, made once per step: one copy instead of one per linear
        (a pageable host->device copy blocks the host until the GPU has caught up)."""
        t = self._on_device.get(key)
        if t is None:
            t = self._on_device[key] = torch.tensor(list(values), dtype=torch.int64, device=device)
        return t

    def _slots_tensor(self, slots: tuple[int, ...]) -> torch.Tensor:
        t = self._seg_slots.get(slots)
        if t is None:
            t = self._seg_slots[slots] = torch.tensor(slots, dtype=torch.int32)
        return t


# Whether the merged route's GEMMs run on row buckets (`gemm_window`); False: on each segment's own rows (the A/B
# baseline of bench/worker.py part prefill-route-ab)
MERGED_ROW_BUCKETS = True


def gemm_window(a: int, b: int, total: int) -> tuple[int, int]:
    """The rows [a', b') of a step's `total` on which the merged route runs its GEMM for rows [a, b): with the
    worker's row buckets on (engine/model_runner.py ROW_BUCKETS), `row_bucket(b - a)` rows from a, or ending at
    `total` where those pass it, so the GEMM has a row count planned ahead (`warm_up_row_buckets`: cuBLAS plans a
    new shape on the host, 0.2-2 ms a linear, and a merged segment's rows are new on most steps); [a, b) itself
    where the bucket does not fit or buckets are off."""
    from services.worker.engine import model_runner

    if not (model_runner.ROW_BUCKETS and MERGED_ROW_BUCKETS):
        return a, b
    rows = model_runner.row_bucket(b - a)
    if a + rows <= total:
        return a, a + rows
    if rows <= total:
        return total - rows, total
    return a, b


# Runs of base rows (`base_runs`) with at most this many merged rows between them take one base GEMM over the
# whole span: every GEMM reads the whole weight, and a weight read costs about what ~140-220 rows of compute do
# (H200: 4.8 TB/s against ~660-990 TFLOPS fp16), so a merged segment of a few rows between two runs costs less as
# wasted products (written over by its merged GEMM) than as a second read. 0: a GEMM per run.
BASE_JOIN_ROWS = 128


def base_runs(starts: Sequence[int], skip: frozenset[int], join_rows: int | None = None) -> list[tuple[int, int]]:
    """The non-empty row ranges [a, b) outside the segments in `skip` (segment i: rows starts[i]:starts[i + 1]),
    two ranges joined into one where at most `join_rows` (default `BASE_JOIN_ROWS`) rows of `skip` lie between."""
    join = BASE_JOIN_ROWS if join_rows is None else join_rows
    runs, row = [], 0
    for i in sorted(skip) + [len(starts) - 1]:
        if starts[i] > row:
            if runs and row - runs[-1][1] <= join:
                runs[-1] = (runs[-1][0], starts[i])
            else:
                runs.append((row, starts[i]))
        row = starts[min(i + 1, len(starts) - 1)]
    return runs
