"""Random packed 2:4 deltas in the canonical layout, for the kernel tests and the benchmark."""

import torch

from kernels import packing


def random_mask_24(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [N, K] keeping exactly 2 of every 4 consecutive columns, uniformly over the 6 patterns."""
    scores = torch.rand(n, k // 4, 4, generator=generator)
    keep = scores.argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    mask.scatter_(2, keep, True)
    return mask.view(n, k)


def random_packed(
    n: int,
    k: int,
    bits: int,
    group_size: int | None,
    sym: bool = True,
    scale: float = 0.01,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor | None]:
    """Random codes / meta / fp16 scales (and integer zeros when asymmetric); group_size None = per row."""
    mask = random_mask_24(n, k, generator)
    codes = torch.randint(0, 1 << bits, (n, k // 2), generator=generator)
    num_groups = 1 if group_size is None else k // group_size
    scales = (torch.rand(n, num_groups, generator=generator) * scale + scale / 10).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (n, num_groups), generator=generator).half()
    return {
        "qweight": packing.pack_codes(codes, bits),
        "meta": packing.pack_meta(mask),
        "scales": scales,
        "zeros": zeros,
    }


def stack_packed(slots: list[dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
    """Per-slot dicts -> tensors stacked along a leading slot dim."""
    out: dict[str, torch.Tensor | None] = {}
    for key in ("qweight", "meta", "scales", "zeros"):
        parts = [s[key] for s in slots]
        out[key] = None if parts[0] is None else torch.stack(parts).contiguous()
    return out
