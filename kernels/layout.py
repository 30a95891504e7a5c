"""Load-time re-encodings into the layouts the SBMM kernel reads best: tile-major words, and for 2-bit "dense2".

At 2 bits a 2:4 delta costs 2 bits per dense column (1 bit of kept code + 1 bit of meta), exactly what dense
2-bit codes cost. Dense codes are far cheaper to expand (no per-group placement by meta), so a GPU slot holds
the dense form: the kernel's expander then does one `lop3` + `sub` + `mul` per two values (kernels/sbmm_asm.py
`build_dense2_program`) instead of ~3.7 instructions per value. Exact for symmetric quantization: a pruned
position gets code z = 2, which dequantizes to (2 - 2) * s = 0.

dense2 layout: int32 words [N, K / 16]; word w holds dense columns 16w .. 16w + 15; column c of the word
(0..15) sits at bit (c & ~1) + 16 * (c & 1), i.e. the even column of each adjacent pair in the low half-word
and the odd one in the high half-word, so `(word >> 2j) & 0x00030003` yields the pair (2j, 2j + 1) as the
two 16-bit lanes the MMA wants in one register.

Word order: tile-major. The words of rows 64b .. 64b + 63 and columns 128t .. 128t + 127 (8 words a row) are
one contiguous [64, 8] block, blocks in (b, t) order: memory [N / 64, K / 128, 64, 8], exposed as an [N, K / 16]
tensor of the same size (`tile_words` / `untile_words` convert from / to row order). That is exactly one K step
of one SBMM program (64 rows, 128 columns), so the kernel streams each program's words as one 2 KB read per
step; in row order the same step is 64 reads of 32 bytes at the row stride, which caps a read of the words at
~0.6 of the copy limit (bench/sbmm_pattern.py: 0.57-0.67 vs 0.82-1.05 tile-major, H200). N must be a
multiple of 64.

Dense (unpruned) 2-bit deltas (`quant`, no meta) are the same format in another bit order; `dense_to_dense2`
moves their fields, so they run on the same kernel path.

4-bit 2:4 deltas ("tiled4"): the canonical words keep their bits (kernels/packing.py) and only change order. A
4-bit word holds 8 kept codes = 16 dense columns, like a dense2 word, so qweight [N, K / 16] is stored in the same
[N / 64, K / 128, 64, 8] blocks. The kernel reads meta as int16 halves, one per qweight word (4 groups of 4
columns); its int32 words [N, K / 32] are stored in [N / 64, K / 128, 64, 4] blocks, which is the same
[64, 8]-block order for the int16 view. One K step of a 64-row program (128 columns) is then one contiguous 2 KB
read of words and one 1 KB read of meta. The artifact on disk stays canonical; `tile_packed` re-orders at load.

The sparse-MMA kernels' orders (sp4 for 4-bit, sp2 for 2-bit symmetric 2:4) are in kernels/spmma_layout.py; CUDA
slots keep tiled4 for the 4-bit deltas sp4 does not take.
"""

import torch
import triton
import triton.language as tl

from kernels import packing

TILE_ROWS, TILE_WORDS = 64, 8  # one tile-major block: 64 rows x 8 words of 16 dense columns (dense2, 4-bit qweight)
TILE_COLS = 16 * TILE_WORDS  # dense columns of one block: one K step of the Gluon kernel at 4-bit geometry
META_TILE_WORDS = TILE_COLS // 32  # int32 meta words (32 columns each) per block row: the 8 int16 halves read
_ROWS, _WORDS = tl.constexpr(TILE_ROWS), tl.constexpr(TILE_WORDS)  # the same, for the kernels below
ZERO_WORD = tl.constexpr(0xAAAAAAAA)  # code 2 (binary 10) in all 16 fields: the symmetric 2-bit zero point everywhere


def dense2_format_ok(kind: str, bits: int | None, sym: bool | None, shape: tuple[int, ...],
                     group_size: int | None) -> bool:
    """Whether a delta tensor can be held as dense2 words: a 2-bit symmetric linear delta, 2:4 (`sparse24`) or
    dense (`quant`), whose shape the Gluon kernel tiles (N % 64 == 0, K % 128 == 0; scale groups a multiple of 16
    or per row). Only CUDA slots use the layout (services/worker/device_slots.py); CPU slots keep the canonical
    one."""
    if kind not in ("sparse24", "quant") or bits != 2 or not sym or len(shape) != 2:
        return False
    n, k = shape
    return tiles(n, k) and (group_size is None or group_size >= k or group_size % 16 == 0)


def tiles(n: int, k: int) -> bool:
    """Whether an [N, K] delta's words fit whole tile-major blocks (N a multiple of 64, K of 128)."""
    return n % TILE_ROWS == 0 and k % TILE_COLS == 0


def tiled4_format_ok(kind: str, bits: int | None, shape: tuple[int, ...]) -> bool:
    """Whether a delta tensor can be held as tile-major 4-bit 2:4 words and meta (symmetric or not)."""
    return kind == "sparse24" and bits == 4 and len(shape) == 2 and tiles(*shape)


def tile_words(words: torch.Tensor, width: int = TILE_WORDS, out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-order words [..., N, W] -> the same words tile-major in [TILE_ROWS, width] blocks (the stored order),
    same shape; written into `out` (contiguous, e.g. a device slot) when given."""
    *lead, n, w = words.shape
    check_tiles(n, w * TILE_WORDS // width)
    blocks = words.reshape(*lead, n // TILE_ROWS, TILE_ROWS, w // width, width).transpose(-3, -2)
    if out is None:
        return blocks.reshape(words.shape)
    out.view(blocks.shape).copy_(blocks, non_blocking=True)
    return out


def untile_words(words: torch.Tensor, width: int = TILE_WORDS) -> torch.Tensor:
    """Stored (tile-major) words [..., N, W] -> row order: words[..., n, j] is row n's j-th word."""
    *lead, n, w = words.shape
    check_tiles(n, w * TILE_WORDS // width)
    blocks = words.reshape(*lead, n // TILE_ROWS, w // width, TILE_ROWS, width).transpose(-3, -2)
    return blocks.reshape(words.shape)


TILED4_WIDTHS = {"qweight": TILE_WORDS, "meta": META_TILE_WORDS}  # int32 words per block row of each tiled4 part


def copy_tiled4_part(part: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """One canonical tiled4 part (`qweight` or `meta`, [N, W]) into `out` (e.g. a device slot) tile-major: copied
    to out's device, then re-ordered there (all on the current stream, without waiting)."""
    tile_words(src.to(out.device, non_blocking=True), TILED4_WIDTHS[part], out=out)


def tile_packed(qweight: torch.Tensor, meta: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical 4-bit 2:4 qweight [..., N, K/16] and meta [..., N, K/32] -> both tile-major ("tiled4"), written
    into `out` = (qweight, meta) when given. On the tensors' device (a permuted copy each)."""
    if qweight.shape[-1] != 2 * meta.shape[-1]:
        raise ValueError(f"qweight {tuple(qweight.shape)} / meta {tuple(meta.shape)}: tiled4 is 4-bit 2:4 only")
    out_q, out_m = out if out is not None else (None, None)
    return tile_words(qweight, TILED4_WIDTHS["qweight"], out_q), tile_words(meta, TILED4_WIDTHS["meta"], out_m)


def untile_packed(qweight: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-major 4-bit 2:4 qweight and meta -> the canonical row order of kernels/packing.py."""
    return untile_words(qweight, TILED4_WIDTHS["qweight"]), untile_words(meta, TILED4_WIDTHS["meta"])



@triton.jit
def tiled_index(row, word, words_per_row):
    """Flat index of row-order word (row, word) in the tile-major order ([64, 8] blocks of words, or of the
    int16 meta halves of 4-bit deltas)."""
    block = (row // _ROWS) * (words_per_row // _WORDS) + word // _WORDS
    return block * (_ROWS * _WORDS) + (row % _ROWS) * _WORDS + word % _WORDS


def bit_position(col: int) -> int:
    """Bit of column `col` (0..15) inside a dense2 word."""
    return (col & ~1) + 16 * (col & 1)


def _positions(device: torch.device) -> torch.Tensor:
    """int64 [16]: bit_position of each column of a dense2 word."""
    return torch.tensor([bit_position(c) for c in range(16)], dtype=torch.int64, device=device)


def to_dense2_reference(qweight: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Torch reference of the re-encoding: canonical 2-bit 2:4 qweight/meta [N, K/32] -> dense2 [N, K/16]
    (tile-major)."""
    n = qweight.shape[0]
    codes = packing.unpack_codes(qweight, 2, k // 2)  # [N, K/2] kept codes in column order
    cols = packing.unpack_meta(meta, k)  # [N, K/2] their dense columns
    dense = torch.full((n, k), 2, dtype=torch.int64, device=qweight.device)
    dense.scatter_(1, cols, codes)
    shifts = _positions(qweight.device)
    words = (dense.view(n, k // 16, 16) << shifts).sum(-1)
    return tile_words(packing._to_int32(words))


def unpack_dense2(words: torch.Tensor, k: int) -> torch.Tensor:
    """dense2 int32 [N, K/16] (tile-major) -> int64 codes [N, K]."""
    shifts = _positions(words.device)
    w = untile_words(words).to(torch.int64) & 0xFFFFFFFF
    return ((w.unsqueeze(-1) >> shifts) & 0x3).reshape(words.shape[0], k)


def dequantize_dense2(words: torch.Tensor, scales: torch.Tensor, shape: tuple[int, int],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] of a symmetric dense2 delta: (code - 2) * scale of the column's group."""
    n, k = shape
    codes = unpack_dense2(words, k).to(torch.float32)
    group = k // scales.shape[1]
    s = scales.to(torch.float32).repeat_interleave(group, dim=1)
    return ((codes - 2.0) * s).to(dtype)


@triton.jit
def _to_dense2_kernel(q_ptr, m_ptr, out_ptr, num_words, words_per_row, BLOCK: tl.constexpr):
    """One canonical word pair (16 kept codes + 8 meta nibbles = 32 dense columns) -> two dense2 words, stored
    tile-major (words_per_row: canonical words per row)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < num_words
    q = tl.load(q_ptr + offs, mask=live, other=0).to(tl.uint32, bitcast=True)
    m = tl.load(m_ptr + offs, mask=live, other=0).to(tl.uint32, bitcast=True)
    lo = tl.full([BLOCK], ZERO_WORD, tl.uint32)
    hi = tl.full([BLOCK], ZERO_WORD, tl.uint32)
    for g in tl.static_range(8):
        nib = (m >> (4 * g)) & 0xF
        for slot in tl.static_range(2):
            col = 4 * (g % 4) + ((nib >> (2 * slot)) & 0x3)  # column inside its dense2 word
            pos = (col & 0xE) + 16 * (col & 1)
            code = (q >> (4 * g + 2 * slot)) & 0x3
            flip = (code ^ 2) << pos  # the field holds 2 (each kept column is written once): 2 ^ (code ^ 2)
            if g < 4:
                lo = lo ^ flip
            else:
                hi = hi ^ flip
    row, word = offs // words_per_row, 2 * (offs % words_per_row)
    tl.store(out_ptr + tiled_index(row, word, 2 * words_per_row), lo.to(tl.int32, bitcast=True), mask=live)
    tl.store(out_ptr + tiled_index(row, word + 1, 2 * words_per_row), hi.to(tl.int32, bitcast=True), mask=live)


def dense_to_dense2_reference(qweight: torch.Tensor, k: int) -> torch.Tensor:
    """Torch reference: canonical dense 2-bit codes int32 [N, K/16] (column c at bit 2c of its word) -> dense2
    (tile-major)."""
    codes = packing.unpack_codes(qweight, 2, k)
    shifts = _positions(qweight.device)
    return tile_words(packing._to_int32((codes.view(qweight.shape[0], k // 16, 16) << shifts).sum(-1)))


@triton.jit
def _dense_to_dense2_kernel(q_ptr, out_ptr, num_words, words_per_row, BLOCK: tl.constexpr):
    """Move each of a word's 16 two-bit fields from bit 2c to dense2's bit for column c; store tile-major."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < num_words
    q = tl.load(q_ptr + offs, mask=live, other=0).to(tl.uint32, bitcast=True)
    out = tl.zeros([BLOCK], tl.uint32)
    for c in tl.static_range(16):
        out = out | (((q >> (2 * c)) & 0x3) << ((c & 14) + 16 * (c & 1)))
    tl.store(out_ptr + tiled_index(offs // words_per_row, offs % words_per_row, words_per_row),
             out.to(tl.int32, bitcast=True), mask=live)


def dense_to_dense2(qweight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical dense 2-bit codes int32 [N, K/16] (kernels/packing.py, no meta) -> dense2 words of the same
    shape (tile-major), written into `out` when given. One launch; CUDA or TRITON_INTERPRET=1."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight {qweight.dtype} {tuple(qweight.shape)}: need a 2-D int32 tensor")
    check_tiles(qweight.shape[0], qweight.shape[1])
    if out is None:
        out = torch.empty_like(qweight)
    if out.shape != qweight.shape or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} must be a contiguous {tuple(qweight.shape)} int32 tensor")
    if qweight.numel():
        block = 256
        _dense_to_dense2_kernel[(triton.cdiv(qweight.numel(), block),)](qweight.contiguous(), out, qweight.numel(),
                                                                        qweight.shape[1], BLOCK=block)
    return out


def to_dense2(qweight: torch.Tensor, meta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Canonical 2-bit 2:4 qweight/meta int32 [N, K/32] (contiguous, same device) -> dense2 int32 [N, K/16],
    tile-major, written into `out` when given (e.g. a device slot). One launch; runs on CUDA or under
    TRITON_INTERPRET=1."""
    if qweight.shape != meta.shape or qweight.dtype != torch.int32 or meta.dtype != torch.int32:
        raise ValueError(f"qweight {tuple(qweight.shape)} and meta {tuple(meta.shape)}: need equal int32 shapes")
    n, words = qweight.shape
    check_tiles(n, 2 * words)
    if out is None:
        out = torch.empty(n, 2 * words, dtype=torch.int32, device=qweight.device)
    if out.shape != (n, 2 * words) or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} must be a contiguous [{n}, {2 * words}] int32 tensor")
    total = n * words
    if total:
        block = 256
        _to_dense2_kernel[(triton.cdiv(total, block),)](qweight.contiguous(), meta.contiguous(), out, total, words,
                                                        BLOCK=block)
    return out


def check_tiles(n: int, words_per_row: int) -> None:
    """words_per_row: 16-column words per row (K / 16)."""
    if n % TILE_ROWS or words_per_row % TILE_WORDS:
        raise ValueError(f"tile-major words are stored in [{TILE_ROWS}, {TILE_COLS} columns] tiles: N={n} must be a "
                         f"multiple of {TILE_ROWS} and K={16 * words_per_row} of {TILE_COLS}")
