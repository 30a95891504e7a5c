"""Bit layout of compressed delta tensors: pack, unpack and reference dequantization.

This file is the contract between `deltazip compress` (writer) and the SBMM kernels (reader);
docs/formats.md describes the same layout in prose. Torch only.

A linear delta D: [N, K] (y = x @ D.T; N = out features, K = in features).
2:4 structured sparsity runs along K: in every group of 4 consecutive columns 2 values are kept.
- qweight: int32 [N, ceil(n_kept / per_word)], per_word = 32 // bits. The kept values of a row,
  in column order, as unsigned `bits`-bit codes; code j sits in word j // per_word at bit
  (j % per_word) * bits. n_kept = K // 2 for 2:4, K for dense quantization.
- meta: int32 [N, K // 32] (2:4 only). Group g (columns 4g..4g+3) keeps columns i0 < i1;
  its nibble i0 | (i1 << 2) sits in word g // 8 at bit (g % 8) * 4.
- scales: fp16 [N, K // group_size] (group_size in dense columns; per-row: [N, 1]).
- zeros: fp16 [N, K // group_size] for asymmetric quantization; symmetric uses z = 2**(bits-1).
Dequantized value of a kept code q in group g: (q - z[n, g]) * s[n, g]; pruned positions are 0.
"""

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def codes_per_word(bits: int) -> int:
    """Number of `bits`-bit codes in one int32 word."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes [N, L] (values < 2**bits) into int32 words [N, ceil(L / per_word)]."""
    per = codes_per_word(bits)
    n, length = codes.shape
    num_words = -(-length // per)
    padded = torch.zeros(n, num_words * per, dtype=torch.int64, device=codes.device)
    padded[:, :length] = codes.to(torch.int64)
    if padded.numel():
        assert int(padded.max()) < (1 << bits) and int(padded.min()) >= 0, "code out of range"
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (padded.view(n, num_words, per) << shifts).sum(dim=-1)
    return _to_int32(words)


def unpack_codes(qweight: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of pack_codes: int32 [N, W] -> int64 codes [N, length]."""
    per = codes_per_word(bits)
    shifts = torch.arange(per, device=qweight.device, dtype=torch.int64) * bits
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(qweight.shape[0], -1)[:, :length]


def pack_meta(mask: torch.Tensor) -> torch.Tensor:
    """2:4 keep-mask bool [N, K] (exactly 2 True per group of 4) -> int32 meta [N, K // 32]."""
    n, k = mask.shape
    if k % 32:
        raise ValueError(f"2:4 packing needs in_features % 32 == 0, got {k}")
    groups = mask.view(n, k // 4, 4)
    if not bool((groups.sum(-1) == 2).all()):
        raise ValueError("mask is not 2:4: every group of 4 columns must keep exactly 2")
    idx = torch.nonzero(groups.reshape(-1, 4))[:, 1].view(n, k // 4, 2)  # sorted within a group
    nibbles = idx[..., 0] | (idx[..., 1] << 2)  # [N, K/4]
    shifts = torch.arange(8, device=mask.device, dtype=torch.int64) * 4
    words = (nibbles.view(n, k // 32, 8).to(torch.int64) << shifts).sum(-1)
    return _to_int32(words)


def unpack_meta(meta: torch.Tensor, k: int) -> torch.Tensor:
    """int32 meta [N, K // 32] -> column index of each kept value, int64 [N, K // 2]."""
    n = meta.shape[0]
    shifts = torch.arange(8, device=meta.device, dtype=torch.int64) * 4
    nibbles = ((meta.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & 0xF  # [N, K/32, 8]
    nibbles = nibbles.reshape(n, k // 4)
    i0, i1 = nibbles & 0x3, (nibbles >> 2) & 0x3
    base = torch.arange(k // 4, device=meta.device, dtype=torch.int64) * 4
    return torch.stack([base + i0, base + i1], dim=-1).reshape(n, k // 2)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    meta: torch.Tensor | None,
    bits: int,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference dequantizer: packed tensors -> dense [N, K] in `dtype` (computed in fp32)."""
    n, k = shape
    n_kept = k // 2 if meta is not None else k
    codes = unpack_codes(qweight, bits, n_kept).to(torch.float32)  # [N, n_kept]
    cols = unpack_meta(meta, k) if meta is not None else torch.arange(k, device=qweight.device).expand(n, k)
    group_size = k // scales.shape[1]
    groups = cols // group_size  # [N, n_kept]
    s = torch.gather(scales.to(torch.float32), 1, groups)
    z = torch.gather(zeros.to(torch.float32), 1, groups) if zeros is not None else float(1 << (bits - 1))
    values = (codes - z) * s
    dense = torch.zeros(n, k, dtype=torch.float32, device=qweight.device)
    dense.scatter_(1, cols, values)
    return dense.to(dtype)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret uint32 values held in int64 as int32 (two's complement)."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
