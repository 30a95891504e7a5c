"""Random packed delta stacks for the SBMM benchmarks, in the word layouts the kernels read (kernels/layout.py).

Stacks are dicts {qweight, meta, scales, zeros} stacked by slot (kernels/sbmm.py's arguments) plus `tiled` for
tile-major 4-bit words; generated on the device, since a 64-slot 7B-layer stack is gigabytes.
"""

import torch

from kernels import layout, packing, spmma_layout

NIBBLE_OF_PATTERN = torch.tensor([i0 | (i1 << 2) for i0, i1 in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]])


def random_stack(num_slots: int, n: int, k: int, bits: int, group: int | None, device: str) -> dict:
    """Valid random packed deltas generated on the device (any int32 word is a valid set of codes)."""
    g = torch.Generator(device=device).manual_seed(num_slots * 7 + bits)
    qweight = torch.randint(-2**31, 2**31 - 1, (num_slots, n, k * bits // 64), dtype=torch.int32, device=device,
                            generator=g)
    meta = torch.empty(num_slots, n, k // 32, dtype=torch.int32, device=device)
    shifts = 4 * torch.arange(8, device=device)
    for s in range(num_slots):  # one slot at a time: the int64 nibble tensor of all slots would not fit
        pat = torch.randint(0, 6, (n, k // 32, 8), device=device, generator=g)
        meta[s] = packing._to_int32((NIBBLE_OF_PATTERN.to(device)[pat] << shifts).sum(-1))
    groups = 1 if group is None else k // group
    scales = (torch.rand(num_slots, n, groups, device=device, generator=g) * 1e-3 + 1e-4).half()
    return {"qweight": qweight, "meta": meta, "scales": scales, "zeros": None}


def as_dense2(stack: dict) -> dict:
    """The same 2-bit deltas as dense2 words (kernels/layout.py), the layout the worker keeps on CUDA."""
    words = torch.stack([layout.to_dense2(q, m) for q, m in zip(stack["qweight"], stack["meta"])])
    return {"qweight": words, "meta": None, "scales": stack["scales"], "zeros": None}


def as_tiled4(stack: dict) -> dict:
    """The same 4-bit deltas with words and meta tile-major (kernels/layout.py), the layout the worker keeps on
    CUDA; `tiled` marks it for sbmm."""
    for s in range(stack["qweight"].shape[0]):  # in place, a slot at a time: no second copy of all slots
        layout.tile_packed(stack["qweight"][s].clone(), stack["meta"][s].clone(),
                           out=(stack["qweight"][s], stack["meta"][s]))
    return {**stack, "tiled": True}


def as_sp4(stack: dict) -> dict:
    """The same 4-bit deltas in the sp4 order of the sparse-MMA kernel (kernels/spmma_layout.py pack_sp4; opt-in, not
    what the worker keeps); `sp4` marks it for sbmm."""
    for s in range(stack["qweight"].shape[0]):  # a slot at a time: pack_sp4 works on int64 codes
        q, m = spmma_layout.pack_sp4(stack["qweight"][s], stack["meta"][s])
        stack["qweight"][s].copy_(q)
        stack["meta"][s].copy_(m)
    return {**stack, "sp4": True}


def as_sp2(stack: dict) -> dict:
    """The same 2-bit deltas in the sp2 order of the 2-bit sparse-MMA kernel (kernels/spmma_layout.py pack_sp2;
    opt-in, not what the worker keeps); `sp2` marks it for sbmm."""
    for s in range(stack["qweight"].shape[0]):  # a slot at a time, like as_sp4
        q, m = spmma_layout.pack_sp2(stack["qweight"][s], stack["meta"][s])
        stack["qweight"][s].copy_(q)
        stack["meta"][s].copy_(m)
    return {**stack, "sp2": True}


VARIANTS = {"4t": (4, as_tiled4), "4sp": (4, as_sp4), "4": (4, None), "2d2": (2, as_dense2),
            "2sp": (2, as_sp2), "2": (2, None)}  # name -> (bits, layout)


def variant_stack(variant: str, num_slots: int, n: int, k: int, device: str) -> dict:
    """Random deltas (group 128) in a VARIANTS layout: 4t / 2d2 (the worker's CUDA layouts), 4sp / 2sp
    (sparse-MMA kernels, opt-in), 4 / 2 (row-order 2:4 words)."""
    bits, encode = VARIANTS[variant]
    stack = random_stack(num_slots, n, k, bits, 128, device)
    return encode(stack) if encode else stack


def layout_name(stack: dict) -> str:
    """The `layout` a benchmark row records: dense2, tiled4, sp4, sp2 or canonical (row-order 2:4 words)."""
    if stack["meta"] is None:
        return "dense2"
    if stack.get("tiled"):
        return "tiled4"
    return "sp4" if stack.get("sp4") else "sp2" if stack.get("sp2") else "canonical"


def variant_label(variant: str) -> str:
    """Fixed-width log label: 4bt (4-bit tile-major), 4bsp (sp4), 4b, 2bd2 (dense2), 2bsp (sp2), 2b."""
    return f"{variant[0]}b{variant[1:]:2s}"
