"""GraphDeltaOps: a decode step's delta ops in a form a CUDA graph can capture once and replay every step.

StepDeltaOps works out on the host, per linear, which stacks a step touches and hands the kernel fresh
segment tensors; a captured graph cannot redo that host work. GraphDeltaOps instead reads three index
tensors at fixed device addresses — segment row starts [S+1], segment slots [S] and row slots [R]
(-1 = no delta) — and, for every linear, launches the SBMM kernel on *every* packed stack of that tensor.
This relies on DeviceSlots' invariant that a slot is all-zero in every stack that does not hold its delta
(`DeviceSlots.drop` clears it), so a stack adds exactly zero for rows whose delta lives elsewhere. Norm and
embedding deltas become per-row gathers through the row slots. `fill` rewrites the index tensors for a
step's rows with one host->device copy; the graph itself depends only on which stacks exist
(`DeviceSlots.layout_version`), so loading deltas into slots needs no re-capture.

Supported when every linear stack is one the kernel reads (2:4 packed 2- or 4-bit, or dense2 words) and
every other stack is dense; otherwise (e.g. the dense-delta baseline) steps with delta rows run eager.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from services.worker import linear_backend
from services.worker.device_slots import LM_HEAD, DeviceSlots, SlotStack


def graph_supported(slots: DeviceSlots) -> bool:
    """Whether every stack of `slots` has a capturable kernel path."""
    if slots.device.type == "cuda" and slots.dtype not in (torch.float16, torch.bfloat16):
        return False  # SBMM on CUDA takes fp16/bf16 activations
    for name, stacks in slots.stacks_by_name().items():
        if name == LM_HEAD:
            continue  # compute_logits runs outside the graph, eager with StepDeltaOps
        for stack in stacks:
            if slots.is_linear(name):
                if not stack.sbmm_readable:
                    return False
            elif stack.kind != "dense":
                return False
    return True


class GraphDeltaOps:
    """DeltaOps over static index tensors for up to `max_rows` rows in up to `max_segments` segments."""

    def __init__(self, slots: DeviceSlots, max_rows: int, max_segments: int) -> None:
        self.slots = slots
        self.max_rows, self.max_segments = max_rows, max_segments
        self.layout_version = slots.layout_version
        self._stacks = slots.stacks_by_name()  # fixed for this object's life: graphs are keyed by the version
        s, r = max_segments, max_rows
        self._dev = torch.full((2 * s + 1 + r,), -1, dtype=torch.int64, device=slots.device)
        self._rows = r  # rows of the forward being captured or replayed (a padded batch size)
        # one sbmm.Workspace for every graph captured over these tensors: their replays run one at a time
        self._workspace = linear_backend.kernel_workspace(slots.device)
        self.rows_hint: int | None = None
        self.segments_hint: int | None = None

    def for_rows(self, num_rows: int, rows_hint: int | None = None, segments_hint: int | None = None) -> GraphDeltaOps:
        """The same static tensors, seen by a forward of `num_rows` rows (one captured batch size);
        rows_hint: the largest delta segment the kernel configuration is chosen for; segments_hint: at least
        the number of segments holding a delta (sizes the kernel's grid and K split, see sbmm.sbmm)."""
        if num_rows > self.max_rows:
            raise ValueError(f"{num_rows} rows exceed the {self.max_rows} these tensors hold")
        view = copy.copy(self)  # shares _dev and the stacks
        view._rows, view.rows_hint, view.segments_hint = num_rows, rows_hint, segments_hint
        return view

    @property
    def seg_starts(self) -> torch.Tensor:
        return self._dev[: self.max_segments + 1]

    @property
    def seg_slots(self) -> torch.Tensor:
        return self._dev[self.max_segments + 1 : 2 * self.max_segments + 1]

    @property
    def row_slots(self) -> torch.Tensor:
        start = 2 * self.max_segments + 1
        return self._dev[start : start + self._rows]

    def rows_hint_for(self, segments: Sequence[tuple[int | None, int]]) -> int:
        """The SBMM config bucket of the step's largest delta segment (kernels.sbmm.rows_bucket)."""
        from kernels import sbmm

        return sbmm.rows_bucket(self.slots.device, max((n for slot, n in segments if slot is not None), default=1))

    @staticmethod
    def segments_hint_for(segments: Sequence[tuple[int | None, int]]) -> int:
        """Power-of-two bucket (>= 1) of the step's segments that hold a delta: a graph captured for bucket B
        replays any step with at most B of them."""
        live = sum(1 for slot, n in segments if slot is not None and n)
        return 1 << max(0, live - 1).bit_length()

    def fill(self, segments: Sequence[tuple[int | None, int]], num_rows: int) -> None:
        """Point the tensors at this step: segments (slot or None, rows) in row order; rows past them up to
        `num_rows` (batch padding) are base. Raises ValueError when the step needs more segments."""
        segs = [(-1 if slot is None else slot, n) for slot, n in segments if n]
        used = sum(n for _, n in segs)
        if used > num_rows:
            raise ValueError(f"segments cover {used} rows, the forward has {num_rows}")
        if used < num_rows:
            segs.append((-1, num_rows - used))
        s = self.max_segments
        if len(segs) > s:
            raise ValueError(f"{len(segs)} segments exceed the {s} captured")
        starts = [0]
        for _, n in segs:
            starts.append(starts[-1] + n)
        starts += [num_rows] * (s + 1 - len(starts))
        seg_slots = [slot for slot, _ in segs] + [-1] * (s - len(segs))
        row_slots = [slot for slot, n in segs for _ in range(n)] + [-1] * (self.max_rows - num_rows)
        self._dev.copy_(torch.tensor(starts + seg_slots + row_slots, dtype=torch.int64))

    # ---- DeltaOps ---------------------------------------------------------------------------------

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += x @ Δ(row).T, one SBMM launch per packed stack of this tensor."""
        from kernels import sbmm

        for stack in self._stacks.get(name + ".weight", ()):
            p = stack.parts
            sbmm.sbmm(x, y, p["qweight"], p.get("meta"), p["scales"], p.get("zeros"), self.seg_starts, self.seg_slots,
                      stack.bits, rows_hint=self.rows_hint, segments_hint=self.segments_hint, tiled=stack.tiled,
                      sp4=stack.sp4, sp2=stack.sp2, workspace=self._workspace)

    def fused_linear(self, group: str, names: Sequence[str], x: torch.Tensor, y: torch.Tensor,
                     sizes: Sequence[int]) -> None:
        """Every fused stack of the group on all of y's columns, then every unfused stack of each member on its
        own columns (a slot is zero in the stacks that do not hold it, so each adds only its own slots)."""
        self.linear(group, x, y)
        for name, part in zip(names, y.split(list(sizes), dim=1)):
            self.linear(name, x, part)

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self._workspace is not None:  # a norm ends the linears that share one input: drop its kept copy
            self._workspace.forget_x()
        stacks = self._stacks.get(name + ".weight")
        if not stacks:
            return None
        per_row = weight.to(x.dtype).expand(x.shape[0], -1)
        for stack in stacks:
            per_row = per_row + _gather_rows(stack, self.row_slots).to(x.dtype)
        return per_row

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        if self._workspace is not None:  # a forward starts: its first linear copies (and records) x anew
            self._workspace.forget_x()
        for stack in self._stacks.get(name + ".weight", ()):
            slots = self.row_slots
            live = (slots >= 0).unsqueeze(1)
            h += (stack.parts["delta"][slots.clamp(min=0), input_ids] * live).to(h.dtype)


def _gather_rows(stack: SlotStack, row_slots: torch.Tensor) -> torch.Tensor:
    """[R, H]: slot row_slots[i]'s dense delta, zero where the slot is -1."""
    return stack.parts["delta"][row_slots.clamp(min=0)] * (row_slots >= 0).unsqueeze(1)
