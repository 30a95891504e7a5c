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

4-bit symmetric 2:4 deltas the sparse-MMA kernel takes ("sp4", `sp4_format_ok`): the same words and meta in that
kernel's register order (`pack_sp4`); CUDA slots write it with `copy_sp4_part` and keep tiled4 for the rest.
"""

import os

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
    _check_tiles(n, w * TILE_WORDS // width)
    blocks = words.reshape(*lead, n // TILE_ROWS, TILE_ROWS, w // width, width).transpose(-3, -2)
    if out is None:
        return blocks.reshape(words.shape)
    out.view(blocks.shape).copy_(blocks, non_blocking=True)
    return out


def untile_words(words: torch.Tensor, width: int = TILE_WORDS) -> torch.Tensor:
    """Stored (tile-major) words [..., N, W] -> row order: words[..., n, j] is row n's j-th word."""
    *lead, n, w = words.shape
    _check_tiles(n, w * TILE_WORDS // width)
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


def _sp4_codes(qweight: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Canonical 4-bit words [..., N, K/16] -> uint8 codes (one per byte) viewed [..., N/64, 4, 2, 8, K/128, 4, 2,
    4, 2]: row 64b + 16rb + 8h + g, kept code 2 * (32s + 8j + 4hi + t) + i (group 32s + 8j + 4hi + t, slot i)."""
    *lead, n, w = qweight.shape
    _check_tiles(n, w)
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
SP4_CHUNK_CODES = 1 << 25  # codes per row chunk of copy_sp4_part: ~32 MB of transient uint8 codes (a few copies)
# The one-pass qweight kernel for CUDA slot writes: off until a GPU run checks and times it (tests/gpu sp4 slot
# tests; `bench/worker.py --parts load --sp4-words-kernel` sets this for its own process).
SP4_WORDS_KERNEL = False


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
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight {qweight.dtype} {tuple(qweight.shape)}: need a 2-D int32 tensor")
    n, w = qweight.shape
    _check_tiles(n, w)
    if out is None:
        out = torch.empty(n, w, dtype=torch.int32, device=qweight.device)
    if out.shape != qweight.shape or out.dtype != torch.int32 or not out.is_contiguous():
        raise ValueError(f"out {out.dtype} {tuple(out.shape)} must be a contiguous {tuple(qweight.shape)} int32 tensor")
    if qweight.numel():
        num_tiles = (n // TILE_ROWS) * (w // TILE_WORDS)
        _sp4_words_kernel[(num_tiles,)](qweight, out, w // TILE_WORDS, qweight.stride(0), qweight.stride(1))
    return out


def _sp4_words_kernel_on(device: torch.device) -> bool:
    """Whether copy_sp4_part re-orders qweight with the one-pass kernel: switched on and on CUDA (or under
    TRITON_INTERPRET=1, so CPU tests run it)."""
    return SP4_WORDS_KERNEL and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1")


def copy_sp4_part(part: str, src: torch.Tensor, out: torch.Tensor) -> None:
    """One canonical 4-bit 2:4 part (`qweight` or `meta`, [N, W]) into `out` (e.g. a device slot) in the sp4
    order: copied to out's device, then re-ordered there (qweight in one kernel launch when SP4_WORDS_KERNEL is
    on, else in chunks of 64-row blocks: each block's sp4 words are its own rows), all on the current stream
    without waiting."""
    src = src.to(out.device, non_blocking=True)
    n, w = src.shape
    _check_tiles(n, w if part == "qweight" else 2 * w)
    if part == "qweight" and _sp4_words_kernel_on(out.device):
        sp4_words_gather(src, out=out)
        return
    rows = max(TILE_ROWS, SP4_CHUNK_CODES // (8 * w) // TILE_ROWS * TILE_ROWS)
    for r in range(0, n, rows):
        out[r:r + rows].copy_(SP4_PARTS[part](src[r:r + rows]), non_blocking=True)


def sp4_format_ok(kind: str, bits: int | None, sym: bool | None, shape: tuple[int, ...],
                  group_size: int | None) -> bool:
    """Whether a delta tensor can be held in the sp4 order the sparse-MMA kernel reads (kernels/sbmm_spmma.py):
    4-bit symmetric 2:4, N and K whole tiles, scales per row or in groups of a multiple of 128 columns."""
    if kind != "sparse24" or bits != 4 or not sym or len(shape) != 2 or not tiles(*shape):
        return False
    k = shape[1]
    return group_size is None or group_size >= k or (k % group_size == 0 and group_size % TILE_COLS == 0)


def unpack_sp4(qweight: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sp4 qweight and meta -> the canonical row order of kernels/packing.py (inverse of pack_sp4)."""
    *lead, n, w = qweight.shape
    _check_tiles(n, w)
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


def sp2_format_ok(kind: str, bits: int | None, sym: bool | None, shape: tuple[int, ...],
                  group_size: int | None) -> bool:
    """Whether a delta tensor can be held in the sp2 order (kernels/sbmm_spmma2.py): 2-bit symmetric 2:4, N a
    multiple of 64, K of 256, scales per row or in groups of a multiple of 128 columns."""
    if kind != "sparse24" or bits != 2 or not sym or len(shape) != 2:
        return False
    n, k = shape
    if n % TILE_ROWS or k % SP2_STEP:
        return False
    return group_size is None or group_size >= k or (k % group_size == 0 and group_size % TILE_COLS == 0)


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
    _check_tiles(qweight.shape[0], qweight.shape[1])
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
    _check_tiles(n, 2 * words)
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


def _check_tiles(n: int, words_per_row: int) -> None:
    """words_per_row: 16-column words per row (K / 16)."""
    if n % TILE_ROWS or words_per_row % TILE_WORDS:
        raise ValueError(f"tile-major words are stored in [{TILE_ROWS}, {TILE_COLS} columns] tiles: N={n} must be a "
                         f"multiple of {TILE_ROWS} and K={16 * words_per_row} of {TILE_COLS}")
