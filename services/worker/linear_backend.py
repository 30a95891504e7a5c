"""apply_linear: y[seg] += x[seg] @ Δ_slot(seg).T for one SlotStack — kernels.delta_linear on GPU, torch on CPU.

Semantics are those of kernels/reference.py: segments with slot -1 are untouched, products accumulate
in fp32 and y is rounded once. The CPU path caches each slot's dequantized delta (refreshed when the
stack is rewritten) because re-dequantizing every linear on every step dominates a CPU decode step.
"""

from __future__ import annotations

import torch

from services.worker.device_slots import SlotStack
from kernels import layout, packing
from kernels.delta_linear import (DenseDeltaStack, PackedDeltaStack, apply_deltas, can_expand, canonical_words,
                                  dense_route)


def kernel_workspace(device: torch.device):
    """The kernels.sbmm.Workspace a DeltaOps object shares across its SBMM launches on CUDA (split-K counters
    zeroed once, one copy of x for q / k / v); None elsewhere (the CPU path launches no kernel)."""
    if torch.device(device).type != "cuda":
        return None
    from kernels import sbmm

    return sbmm.Workspace(device)


def apply_linear(x: torch.Tensor, y: torch.Tensor, stack: SlotStack, seg_starts: torch.Tensor,
                 seg_slots: torch.Tensor, starts: list[int], slots: list[int],
                 on_device: tuple[torch.Tensor, torch.Tensor] | None = None, workspace=None) -> int:
    """x: [T, K], y: [T, N]; seg_starts [S+1] / seg_slots [S] int32 on the host, already validated;
    on_device: the same two as int64 on x's device, which the packed kernel reads without a host copy;
    workspace: the caller's `kernel_workspace` (CUDA). Returns how many segments took the dense route
    (kernels/delta_linear.py; CUDA only)."""
    kernel_stack = _kernel_stack(stack) if x.is_cuda else None
    if isinstance(kernel_stack, PackedDeltaStack) and x.dtype not in (torch.float16, torch.bfloat16):
        kernel_stack = None  # the SBMM kernel takes fp16/bf16 activations; fp32 runs the cached reference
    if kernel_stack is not None:
        if on_device is not None and isinstance(kernel_stack, PackedDeltaStack):
            seg_starts, seg_slots = on_device
        return apply_deltas(x, y, kernel_stack, seg_starts, seg_slots, check=False, workspace=workspace,
                            host_segments=(starts, slots))
    for i, slot in enumerate(slots):
        a, b = starts[i], starts[i + 1]
        if slot < 0 or b <= a:
            continue
        w = _dense_slot(stack, slot, x.dtype)  # [N, K] fp32
        y[a:b] = (y[a:b].float() + x[a:b].float() @ w.T).to(y.dtype)
    return 0


def min_dense_rows(device: torch.device | str) -> int | None:
    """The fewest rows a segment needs for the dense route on `device` at any code width (None: never there)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from kernels import sbmm

    rows = [r for r in (sbmm.dense_rows(device, bits) for bits in (2, 4)) if r is not None]
    return min(rows, default=None)


def merge_stack(stack: SlotStack, x: torch.Tensor, weight: torch.Tensor, rows: int | None):
    """The kernel stack (kernels.delta_linear.PackedDeltaStack) when a segment of `rows` rows of x on this slot
    stack runs as one GEMM on base + Δ (`kernels.delta_linear.merged_linear`): the dense route applies
    (`dense_route`; rows None: its deltas can expand whatever the row count, `can_expand`, for
    services/worker/merged_cache.py) and the base weight is x's dtype, [N, K] of the stack, unit stride in K. None
    otherwise."""
    if not x.is_cuda or weight.dtype != x.dtype or weight.stride(1) != 1:
        return None
    kernel_stack = _kernel_stack(stack)
    ok = can_expand(kernel_stack, x) if rows is None else dense_route(kernel_stack, x, rows)
    if not ok or tuple(weight.shape) != tuple(kernel_stack.shape):
        return None
    return kernel_stack


def _dense_slot(stack: SlotStack, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """Slot's delta as fp32 [N, K], rounded to the activation dtype as the kernel does; cached per write."""
    cached = stack.cache.get(slot)
    if cached is not None and cached[0] == stack.version and cached[1] == dtype:
        return cached[2]
    p = stack.parts
    if stack.kind == "dense":
        w = p["delta"][slot]
    elif stack.layout == "dense2":  # 2-bit words re-encoded at load (kernels/layout.py)
        w = layout.dequantize_dense2(p["qweight"][slot], p["scales"][slot], stack.shape, torch.float32)
    else:
        qweight, meta = p["qweight"][slot], p["meta"][slot] if "meta" in p else None
        qweight, meta = canonical_words(qweight, meta, stack.tiled, stack.sp4, stack.sp2)  # stored order -> canonical
        w = packing.dequantize(qweight, p["scales"][slot], p["zeros"][slot] if "zeros" in p else None, meta,
                               stack.bits, stack.shape, torch.float32)
    weight_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = w.to(weight_dtype).float()
    stack.cache[slot] = (stack.version, dtype, w)
    return w


def _kernel_stack(stack: SlotStack):
    """The kernel's stack object over this stack's tensors (built once), or None when the kernel cannot
    read this format (dense-quantized deltas not in dense2 words, and 3/8-bit ones, fall back to the cached
    reference)."""
    if "kernel_stack" not in stack.cache:
        p, fmt = stack.parts, stack.format
        if fmt.kind == "dense":
            stack.cache["kernel_stack"] = DenseDeltaStack(p["delta"])
        elif stack.sbmm_readable:
            n, k = fmt.shape
            stack.cache["kernel_stack"] = PackedDeltaStack(
                qweight=p["qweight"], meta=p.get("meta"), scales=p["scales"], zeros=p.get("zeros"), bits=fmt.bits,
                group_size=k // p["scales"].shape[-1], sym=p.get("zeros") is None, shape=(n, k), tiled=stack.tiled,
                sp4=stack.sp4, sp2=stack.sp2)
        else:
            stack.cache["kernel_stack"] = None
    return stack.cache["kernel_stack"]
