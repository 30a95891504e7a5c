"""Load-time word orders of the sparse tensor-core SBMM kernels (kernels/sbmm_spmma.py, kernels/sbmm_spmma2.py).

sp4: 4-bit symmetric 2:4 deltas (`sp4_format_ok`). The same words and meta as the canonical format
(kernels/packing.py), re-ordered so a lane's loads are its `mma.sp` A and metadata registers (`pack_sp4`,
`unpack_sp4`; the two halves `sp4_words` / `sp4_meta`). CUDA slots write it with `copy_sp4_part`; x goes to the kernel
in the matching B order (`sp4_x`). `sp4_words_gather` is a one-pass Triton version of `sp4_words` that CUDA slot
writes use (`SP4_WORDS_KERNEL`, on: checked and timed on an H100, see docs/kernels.md).

sp2: the same for 2-bit symmetric 2:4 deltas (`pack_sp2` / `unpack_sp2`, `sp2_format_ok`), K steps of `SP2_STEP`
columns; opt-in (`sbmm(..., sp2=True)`). CUDA slots write it with `copy_sp2_part` only when asked
(`DeviceSlots(sp2=True)`, the worker's `--sparse-mma-2bit`). `sp2_words_gather` / `sp2_meta_gather` are one-pass
Triton versions of `sp2_words` / `sp2_meta` that those writes use (`SP2_KERNELS`, on; checked on CPU under
TRITON_INTERPRET=1, not yet run on a GPU).

Tile geometry (`TILE_ROWS`, `TILE_COLS`, `tiles`, `check_tiles`) is kernels/layout.py's.
"""

import os

import torch
import triton
import triton.language as tl

from kernels import layout
from kernels.layout import TILE_COLS, TILE_ROWS, TILE_WORDS, check_tiles, tiles

_ROWS, _WORDS = tl.constexpr(TILE_ROWS), tl.constexpr(TILE_WORDS)  # the tile geometry, for the kernel below

def _sp4_codes(qweight: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Canonical 4-bit words [..., N, K/16] -> uint8 codes (one per byte) viewed [..., N/64, 4, 2, 8, K/128, 4, 2,
    4, 2]: row 64b + 16rb + 8h + g, kept code 2 * (32s + 8j + 4hi + t) + i (group 32s + 8j + 4hi + t, slot i)."""
    *lead, n, w = qweight.shape
    check_tiles(n, w)
    return _nibbles(qweight).reshape(*lead, n // 64, 4, 2, 8, w // 8, 4, 2, 4, 2), lead


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> uint8 [..., 8]: nibble i (bits 4i..4i+3) of each word (a byte per code keeps the re-order
    8x lighter than int64 codes)."""
    b = words.contiguous().view(torch.uint8).reshape(*words.shape, 4)  # little-endian: byte j = nibbles 2j, 2j+1
    return torch.stack((b & 0xF, b >> 4), -1).reshape(*words.shape, 8)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 8] 4-bit values (uint8) -> int32 [...], value i at bit 4i."""
    pairs = codes.reshape(*codes.shape[:-1], 4, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return b.view(torch.int32).reshape(codes.shape[:-1])


def pack_sp4(qweight: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical 4-bit 2:4 qweight [..., N, K/16] and meta [..., N, K/32] -> the "sp4" order of the sparse-MMA
    kernel (kernels/sbmm_spmma.py), same shapes and bytes, tile-major like tiled4: memory [N/64, K/128, 4 rb,
    32 lanes, 4 j] words and [N/64, K/128, 4 rb, 32 lanes, 2 slots] meta words (rb: 16-row block of the 64-row
    block b; a K step s is 128 columns), so a lane's words are one 16-byte load and its meta one 8-byte load.
    Lane 4g + t, word j: the two kept codes of groups 8j + t + 4hi of rows g + 8h, pair p = h + 2hi at bits 4p
    (first kept) and 4p + 16 (second): one shift and one lop3 give the half2 A register a_p of mma.sp number j.
    Meta word (lane 4g + 2sel + c, slot): the 16 canonical meta bits of columns 32j + 16c .. + 15,
    j = sel + 2 * slot, of row g (low half) and row g + 8 (high half): the metadata register of thread 2sel + c
    of the quad for mma.sp j with selector sel."""
    return sp4_words(qweight), sp4_meta(meta)


def sp4_words(qweight: torch.Tensor) -> torch.Tensor:
    """The qweight half of `pack_sp4` (the two parts re-order independently)."""
    codes, lead = _sp4_codes(qweight)
    nd = len(lead)
    order = [*range(nd), nd, nd + 4, nd + 1, nd + 3, nd + 7, nd + 5, nd + 8, nd + 6, nd + 2]
    return _pack_nibbles(codes.permute(order).reshape(*codes.shape[:nd], -1, 8)).reshape(qweight.shape)


def sp4_meta(meta: torch.Tensor) -> torch.Tensor:
    """The meta half of `pack_sp4`: canonical meta [..., N, K/32] -> sp4 meta words, same shape."""
    halves = meta.contiguous().view(torch.int16)
    *lead, n, h = halves.shape
    nd = len(lead)
    halves = halves.reshape(*lead, n // 64, 4, 2, 8, h // 8, 2, 2, 2)  # [b, rb, h, g, s, slot, sel, c]
    order = [*range(nd), nd, nd + 4, nd + 1, nd + 3, nd + 6, nd + 7, nd + 5, nd + 2]
    return halves.permute(order).contiguous().view(torch.int32).reshape(meta.shape)


SP4_PARTS = {"qweight": sp4_words, "meta": sp4_meta}  # the parts sp4 re-orders (scales stay canonical)
CHUNK_CODES = 1 << 25  # codes per row chunk of copy_sp4_part / copy_sp2_part: ~32 MB of transient uint8 codes
# The one-pass qweight kernel for CUDA slot writes (7B 4-bit load on an H100: 57 ms with it, 90 ms with the torch
# re-order); `bench/worker.py --parts load --sp4-words-torch` turns it off for its own process (the baseline).
SP4_WORDS_KERNEL = True


@triton.jit
def _sp4_words_kernel(q_ptr, out_ptr, tiles_per_row_block, stride_row, stride_word):
    """One [64 rows, 8 words] tile (b, s) of canonical words -> its 512 sp4 words, contiguous at tile index
    b * tiles_per_row_block + s. Output word (rb, g, t, j) gathers byte t (codes 2t, 2t + 1) of the canonical
    words (row 64b + 16rb + 8h + g, word 8s + 2j + hi) for h, hi in {0, 1}: low nibble to nibble 2hi + h, high
    nibble to nibble 4 + 2hi + h (q strides in words: row slices of a bigger tensor are read in place)."""
    tile = tl.program_id(0)
    b, s = tile // tiles_per_row_block, tile % tiles_per_row_block
    o = tl.arange(0, _ROWS * _WORDS)  # [512]: (rb 4, g 8, t 4, j 4) in output order
    j, t, g, rb = o % 4, (o // 4) % 4, (o // 16) % 8, o // 128
    row, word = b * _ROWS + 16 * rb + g, s * _WORDS + 2 * j
    shift = (8 * t).to(tl.uint32)
    out = tl.zeros([_ROWS * _WORDS], tl.uint32)
    for h in tl.static_range(2):
        for hi in tl.static_range(2):
            src = tl.load(q_ptr + (row + 8 * h) * stride_row + (word + hi) * stride_word).to(tl.uint32, bitcast=True)
            byte = (src >> shift) & 0xFF  # logical shift: the words are uint32 here
            out = out | (((byte & 0xF) | ((byte >> 4) << 16)) << (4 * (2 * hi + h)))
    tl.store(out_ptr + tile * (_ROWS * _WORDS) + o, out.to(tl.int32, bitcast=True))


def sp4_words_gather(qweight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`sp4_words` in one launch: canonical int32 words [N, K/16] (any strides) -> sp4 words of the same shape,
    written into `out` (contiguous) when given. Runs on CUDA or under TRITON_INTERPRET=1."""
    return _gather(_sp4_words_kernel, "qweight", qweight, out, check_tiles)


def _gather(kernel, part: str, src: torch.Tensor, out: torch.Tensor | None, check) -> torch.Tensor:
    """Launches a one-pass re-order `kernel` (one program per [64 rows, 8 words] tile) from int32 `src` [N, W]
    (any strides; `check(N, W)` raises ValueError unless it tiles) into `out` (contiguous, allocated if None)."""
    if src.dtype != torch.int32 or src.dim() != 2:
        raise ValueError(f"{part} {src.dtype} {tuple(src.shape)}: need a 2-D int32 tensor")
    n, w = src.shape
    check(n, w)
    if out is None:
        out = torch.empty(n, w, dtype=torch.int32, device=src.device)
    if out.shape != src.shape or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"out {out.dtype} {tuple(out.shape)} must be a contiguous {tuple(src.shape)} int32 tensor")
    if src.numel():
        num_tiles = (n // TILE_ROWS) * (w // TILE_WORDS)
        kernel[(num_tiles,)](src, out, w // TILE_WORDS, src.stride(0), src.stride(1))
    return out


def _gather_kernels_on(switch: bool, device: torch.device) -> bool:
    """Whether a slot write re-orders with its one-pass kernels: `switch` (SP4_WORDS_KERNEL, SP2_KERNELS) on and
    on CUDA (or under TRITON_INTERPRET=1, so CPU tests run them)."""
    return switch and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1")


def copy_sp4_part(part: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """One canonical 4-bit 2:4 part (`qweight` or `meta`, [N, W]) into `out` (e.g. a device slot) in the sp4
    order: copied to out's device, then re-ordered there (qweight in one kernel launch when SP4_WORDS_KERNEL is
    on, else in chunks of 64-row blocks: each block's sp4 words are its own rows), all on the current stream
    without waiting."""
    src = src.to(out.device, non_blocking=True)
    n, w = src.shape
    check_tiles(n, w if part == "qweight" else 2 * w)
    if part == "qweight" and _gather_kernels_on(SP4_WORDS_KERNEL, out.device):
        sp4_words_gather(src, out=out)
        return
    _reorder_in_row_chunks(SP4_PARTS[part], src, out, 8)


def _reorder_in_row_chunks(reorder, src: torch.Tensor, out: torch.Tensor, codes_per_word: int) -> None:
    """out = reorder(src), a row chunk of whole 64-row blocks at a time (each block's re-ordered words are its own
    rows), so the transient codes stay near CHUNK_CODES; on the current stream without waiting."""
    n, w = src.shape
    rows = max(TILE_ROWS, CHUNK_CODES // (codes_per_word * w) // TILE_ROWS * TILE_ROWS)
    for r in range(0, n, rows):
        out[r:r + rows].copy_(reorder(src[r:r + rows]), non_blocking=True)


def sp4_format_ok(kind: str, bits: int | None, sym: bool | None, shape: tuple[int, ...],
                  group_size: int | None) -> bool:
    """Whether a delta tensor can be held in the sp4 order the sparse-MMA kernel reads (kernels/sbmm_spmma.py):
    4-bit symmetric 2:4, N and K whole tiles, scales per row or in groups of a multiple of 128 columns."""
    if kind != "sparse24" or bits != 4 or not sym or len(shape) != 2 or not tiles(*shape):
        return False
    return scale_groups_ok(shape[1], group_size)


def scale_groups_ok(k: int, group_size: int | None) -> bool:
    """The scales both sparse-MMA kernels take: one per row (group_size None or >= K), or groups of a multiple of
    128 columns that divide K."""
    return group_size is None or group_size >= k or (k % group_size == 0 and group_size % TILE_COLS == 0)


def unpack_sp4(qweight: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sp4 qweight and meta -> the canonical row order of kernels/packing.py (inverse of pack_sp4)."""
    *lead, n, w = qweight.shape
    check_tiles(n, w)
    nd = len(lead)
    codes = _nibbles(qweight).reshape(*lead, n // 64, w // 8, 4, 8, 4, 4, 2, 2, 2)  # [b, s, rb, g, t, j, i, hi, h]
    order = [*range(nd), nd, nd + 2, nd + 8, nd + 3, nd + 1, nd + 5, nd + 7, nd + 4, nd + 6]
    words = _pack_nibbles(codes.permute(order).reshape(*lead, n, w, 8))
    halves = meta.contiguous().view(torch.int16).reshape(*lead, n // 64, w // 8, 4, 8, 2, 2, 2, 2)
    order = [*range(nd), nd, nd + 2, nd + 7, nd + 3, nd + 1, nd + 6, nd + 4, nd + 5]  # [b, rb, h, g, s, slot, sel, c]
    return words, halves.permute(order).contiguous().view(torch.int32).reshape(meta.shape)


def sp4_x(x: torch.Tensor) -> torch.Tensor:
    """Activations [T, K] -> the sp4 kernel's B order: in every 128-column step, the column pair (16j + 4m + t)
    (mma.sp number j, B register m, quad position t) moves to pair 16t + 4j + m, so each lane's 16 B registers
    of a step are 64 contiguous bytes (four 16-byte loads instead of sixteen 4-byte ones). A copy, [T, K]."""
    t, k = x.shape
    if k % 128:
        raise ValueError(f"sp4 activations need K % 128 == 0, got K={k}")
    return x.reshape(t, k // 128, 4, 4, 4, 2).permute(0, 1, 4, 2, 3, 5).reshape(t, k)


SP2_STEP = 256  # dense columns of one sp2 K step: 8 mma.sp m16n8k32, a lane's 4 words and 4 meta words
# [b, rb, h, g, s, u, e, hi, t, i] (canonical codes) -> [b, s, rb, g, t, u, i, e, hi, h] (sp2 words)
_SP2_WORDS_ORDER = (0, 4, 1, 3, 8, 5, 9, 6, 7, 2)
_SP2_META_ORDER = (0, 4, 1, 3, 6, 5, 2)  # [b, rb, h, g, s, v, t] (canonical meta halves) -> [b, s, rb, g, t, v, h]


def _crumbs(words: torch.Tensor) -> torch.Tensor:
    """int32 [...] -> uint8 [..., 16]: 2-bit field i (bits 2i, 2i + 1) of each word."""
    b = words.contiguous().view(torch.uint8).reshape(*words.shape, 4)  # little-endian: byte j = fields 4j..4j+3
    return torch.stack([(b >> s) & 0x3 for s in (0, 2, 4, 6)], -1).reshape(*words.shape, 16)


def _pack_crumbs(codes: torch.Tensor) -> torch.Tensor:
    """[..., 16] 2-bit values (uint8) -> int32 [...], value i at bit 2i."""
    q = codes.reshape(*codes.shape[:-1], 4, 4)
    b = (q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)).contiguous()
    return b.view(torch.int32).reshape(codes.shape[:-1])


def _permute_dims(x: torch.Tensor, lead: list[int], dims: list[int], order: tuple[int, ...],
                  inverse: bool = False) -> torch.Tensor:
    """x viewed [*lead, *dims] with dims permuted by `order`; inverse: x holds the permuted dims, put them back."""
    nd = len(lead)
    if inverse:
        dims, order = [dims[o] for o in order], [order.index(d) for d in range(len(order))]
    return x.reshape(*lead, *dims).permute(*range(nd), *(nd + o for o in order))


def _check_sp2(n: int, words_per_row: int) -> None:
    """words_per_row: canonical 2-bit 2:4 words (32 dense columns each) per row, K / 32."""
    if n % TILE_ROWS or words_per_row % (SP2_STEP // 32):
        raise ValueError(f"sp2 words are stored in [{TILE_ROWS}, {SP2_STEP} columns] tiles: N={n} must be a "
                         f"multiple of {TILE_ROWS} and K={32 * words_per_row} of {SP2_STEP}")


def pack_sp2(qweight: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical 2-bit 2:4 qweight and meta [..., N, K/32] -> the "sp2" order of the sparse-MMA kernel
    (kernels/sbmm_spmma2.py), same shapes and bytes. Tile-major: memory [N/64, K/256, 4 rb, 32 lanes, 4] for both
    (rb: 16-row block of the 64-row block b; a K step s is 256 columns = 8 mma.sp j), so a lane's step is one
    16-byte load of words and one of meta.
    Word u of lane 4g + t: the kept codes of groups t + 4hi of mma.sp j = 2u + e (columns 32j .. 32j + 31 of
    the step) of rows g + 8h, pair p = 4e + 2hi + h: first kept at bits 2p, second at 2p + 16, so
    `lop3(word >> 2p, 0x00030003, magic)` is the half2 A register a_(2hi+h) of mma.sp j, e = p // 4.
    Meta word v of lane 4g + t (t = 2sel + c): canonical meta half 4v + t of the step (columns 32(2v + sel) +
    16c .. + 15) of row g (low half) and row g + 8 (high half): the metadata register of mma.sp 2v + sel with
    selector sel, as in sp4, so every stored meta word is used once."""
    return sp2_words(qweight), sp2_meta(meta)


def sp2_words(qweight: torch.Tensor) -> torch.Tensor:
    """The qweight half of `pack_sp2`."""
    *lead, n, w = qweight.shape
    _check_sp2(n, w)
    dims = [n // 64, 4, 2, 8, w // 8, 4, 2, 2, 4, 2]
    codes = _permute_dims(_crumbs(qweight), lead, dims, _SP2_WORDS_ORDER)
    return _pack_crumbs(codes.reshape(*lead, n, w, 16))


def sp2_meta(meta: torch.Tensor) -> torch.Tensor:
    """The meta half of `pack_sp2`: canonical meta [..., N, K/32] -> sp2 meta words, same shape."""
    *lead, n, w = meta.shape
    _check_sp2(n, w)
    halves = _permute_dims(meta.contiguous().view(torch.int16), lead, [n // 64, 4, 2, 8, w // 8, 4, 4],
                           _SP2_META_ORDER)
    return halves.contiguous().view(torch.int32).reshape(meta.shape)


def unpack_sp2(qweight: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sp2 qweight and meta -> the canonical row order of kernels/packing.py (inverse of pack_sp2)."""
    *lead, n, w = qweight.shape
    _check_sp2(n, w)
    dims = [n // 64, 4, 2, 8, w // 8, 4, 2, 2, 4, 2]
    codes = _permute_dims(_crumbs(qweight), lead, dims, _SP2_WORDS_ORDER, inverse=True)
    halves = _permute_dims(meta.contiguous().view(torch.int16), lead, [n // 64, 4, 2, 8, w // 8, 4, 4],
                           _SP2_META_ORDER, inverse=True)
    return _pack_crumbs(codes.reshape(*lead, n, w, 16)), halves.contiguous().view(torch.int32).reshape(meta.shape)


SP2_PARTS = {"qweight": sp2_words, "meta": sp2_meta}  # the parts sp2 re-orders (scales stay canonical)
# The one-pass qweight and meta kernels for CUDA slot writes (not yet run on a GPU; the torch re-order took a 7B
# 2-bit load to 82.6 ms on an H100, dense2 38 ms); `bench/worker.py --sp2-torch` turns them off (the baseline).
SP2_KERNELS = True


@triton.jit
def _sp2_words_kernel(q_ptr, out_ptr, tiles_per_row_block, stride_row, stride_word):
    """One [64 rows, 8 words] tile (b, s) of canonical 2-bit words (one 256-column step) -> its 512 sp2 words,
    contiguous at tile index b * tiles_per_row_block + s. Output word (rb, g, t, u), field 8i + 4e + 2hi + h, is
    field 8hi + 2t + i of the canonical word (row 64b + 16rb + 8h + g, word 8s + 2u + e): nibbles t and 4 + t of
    4 words (q strides in words: row slices of a bigger tensor are read in place)."""
    tile = tl.program_id(0)
    b, s = tile // tiles_per_row_block, tile % tiles_per_row_block
    o = tl.arange(0, _ROWS * _WORDS)  # [512]: (rb 4, g 8, t 4, u 4) in output order
    u, t, g, rb = o % 4, (o // 4) % 4, (o // 16) % 8, o // 128
    row, word = b * _ROWS + 16 * rb + g, s * _WORDS + 2 * u
    shift = (4 * t).to(tl.uint32)
    out = tl.zeros([_ROWS * _WORDS], tl.uint32)
    for h in tl.static_range(2):
        for e in tl.static_range(2):
            src = tl.load(q_ptr + (row + 8 * h) * stride_row + (word + e) * stride_word).to(tl.uint32, bitcast=True)
            fields = src >> shift  # logical shift: fields 2t + i at bits 2i, fields 8 + 2t + i at bits 16 + 2i
            for hi in tl.static_range(2):
                for i in tl.static_range(2):
                    out = out | (((fields >> (16 * hi + 2 * i)) & 0x3) << (2 * (8 * i + 4 * e + 2 * hi + h)))
    tl.store(out_ptr + tile * (_ROWS * _WORDS) + o, out.to(tl.int32, bitcast=True))


@triton.jit
def _sp2_meta_kernel(m_ptr, out_ptr, tiles_per_row_block, stride_row, stride_word):
    """One [64 rows, 8 words] tile (b, s) of canonical meta (one 256-column step, 16 int16 halves a row) -> its
    512 sp2 meta words, contiguous at tile index b * tiles_per_row_block + s. Output word (rb, g, t, v): half
    4v + t (half t % 2 of word 8s + 2v + t // 2) of row 64b + 16rb + g in its low half, of row + 8 in its high."""
    tile = tl.program_id(0)
    b, s = tile // tiles_per_row_block, tile % tiles_per_row_block
    o = tl.arange(0, _ROWS * _WORDS)  # [512]: (rb 4, g 8, t 4, v 4) in output order
    v, t, g, rb = o % 4, (o // 4) % 4, (o // 16) % 8, o // 128
    row, word = b * _ROWS + 16 * rb + g, s * _WORDS + 2 * v + t // 2
    shift = (16 * (t % 2)).to(tl.uint32)
    out = tl.zeros([_ROWS * _WORDS], tl.uint32)
    for h in tl.static_range(2):
        src = tl.load(m_ptr + (row + 8 * h) * stride_row + word * stride_word).to(tl.uint32, bitcast=True)
        out = out | (((src >> shift) & 0xFFFF) << (16 * h))
    tl.store(out_ptr + tile * (_ROWS * _WORDS) + o, out.to(tl.int32, bitcast=True))


def sp2_words_gather(qweight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`sp2_words` in one launch: canonical 2-bit words int32 [N, K/32] (any strides) -> sp2 words of the same
    shape, written into `out` (contiguous) when given. Runs on CUDA or under TRITON_INTERPRET=1."""
    return _gather(_sp2_words_kernel, "qweight", qweight, out, _check_sp2)


def sp2_meta_gather(meta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`sp2_meta` in one launch: canonical meta int32 [N, K/32] (any strides) -> sp2 meta words, same shape."""
    return _gather(_sp2_meta_kernel, "meta", meta, out, _check_sp2)


def copy_sp2_part(part: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """One canonical 2-bit 2:4 part (`qweight` or `meta`, [N, K/32]) into `out` (e.g. a device slot) in the sp2
    order: copied to out's device, then re-ordered there (one kernel launch when SP2_KERNELS is on, else in chunks
    of 64-row blocks: each block's sp2 words are its own rows), all on the current stream without waiting."""
    src = src.to(out.device, non_blocking=True)
    n, w = src.shape
    _check_sp2(n, w)
    if _gather_kernels_on(SP2_KERNELS, out.device):
        {"qweight": sp2_words_gather, "meta": sp2_meta_gather}[part](src, out=out)
        return
    _reorder_in_row_chunks(SP2_PARTS[part], src, out, 16)


def sp2_format_ok(kind: str, bits: int | None, sym: bool | None, shape: tuple[int, ...],
                  group_size: int | None) -> bool:
    """Whether a delta tensor can be held in the sp2 order (kernels/sbmm_spmma2.py): 2-bit symmetric 2:4, N a
    multiple of 64, K of 256, scales per row or in groups of a multiple of 128 columns."""
    if kind != "sparse24" or bits != 2 or not sym or len(shape) != 2:
        return False
    n, k = shape
    if n % TILE_ROWS or k % SP2_STEP:
        return False
    return scale_groups_ok(k, group_size)


STORED_PARTS = {"tiled4": (layout.TILED4_WIDTHS, layout.copy_tiled4_part), "sp4": (SP4_PARTS, copy_sp4_part),
                "sp2": (SP2_PARTS, copy_sp2_part)}  # order -> (the parts it re-orders, their slot write)


def copy_stored_part(order: str, part: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """One canonical part of a packed delta into `out` (a slot) in a stored order (canonical, tiled4, sp4, sp2):
    re-ordered there if the order re-orders that part, else copied as is; on the current stream without waiting."""
    parts, write = STORED_PARTS.get(order, ((), None))
    if part in parts:
        write(part, src, out)
    else:
        out.copy_(src, non_blocking=True)
