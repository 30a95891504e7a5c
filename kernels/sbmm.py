"""SBMM entry point: check shapes, pick a kernel and a tuned config, launch once for all segments.

Kernels: kernels/sbmm_gluon.py (CUDA, expanded words feed the MMA in registers; K a multiple of its K tile),
kernels/sbmm_spmma.py / sbmm_spmma2.py (sparse MMA on sp4 / sp2 words) and kernels/sbmm_triton.py (portable: the
CPU tests under TRITON_INTERPRET=1 and the GPU fallback). Which one, with which tuned config, tiles and K split,
is `plan`'s decision (kernels/sbmm_plan.py, re-exported here); this file checks the tensors and launches.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton import knobs

from kernels import layout, sbmm_asm, sbmm_triton, spmma_layout
from kernels.sbmm_plan import (  # noqa: F401  (re-exported: callers name them sbmm.*)
    CONFIG_FILE, CONFIG_TABLES, DENSE2_GEOMETRY_BITS, KERNELS, cdiv, dense_rows, MAX_SPLIT_K, MIN_MAX_SEGS, Launch,
    _configs, _device_name, compile_key, gluon_supported, interpreting, pdl_ok, pick_config, plan, rows_bucket,
    split_k, spmma2_supported, spmma_device_ok, spmma_supported,
)

try:  # Gluon ships with Triton >= 3.5; without it every launch takes the portable kernel
    from kernels import sbmm_dequant, sbmm_gluon, sbmm_spmma, sbmm_spmma2
except ImportError:  # pragma: no cover - depends on the installed triton
    sbmm_dequant = sbmm_gluon = sbmm_spmma = sbmm_spmma2 = None


@functools.lru_cache(maxsize=64)
def _half2_const(value: float, dtype: torch.dtype) -> int:
    """int32 with `value` in `dtype` in both 16-bit lanes (a Python int for a constexpr)."""
    h = int(torch.tensor(value, dtype=dtype).view(torch.int16).item()) & 0xFFFF
    v = h | (h << 16)
    return v - (1 << 32) if v >= 1 << 31 else v


@functools.cache
def _dense2_program(dtype: torch.dtype) -> tuple[str, str]:
    """(PTX, constraints) of the dense2 word expander (kernels/layout.py)."""
    ops, dense = sbmm_asm.build_dense2_program()
    return sbmm_asm.render_ptx(ops, dense, "f16" if dtype == torch.float16 else "bf16", False)


@functools.cache
def _dense2_raw_program(dtype: torch.dtype) -> tuple[str, str]:
    """(PTX, constraints) of the unscaled dense2 expander (the kernel scales the accumulator)."""
    name = "f16" if dtype == torch.float16 else "bf16"
    ops, dense = sbmm_asm.build_dense2_raw_program(name)
    return sbmm_asm.render_ptx(ops, dense, name, False)


@functools.cache
def _program(bits: int, asym: bool, dtype: torch.dtype) -> tuple[str, str]:
    """(PTX, constraints) of the word expander, built once per (bits, asym, dtype)."""
    ops, dense = sbmm_asm.build_program(bits, asym)
    return sbmm_asm.render_ptx(ops, dense, "f16" if dtype == torch.float16 else "bf16", asym)


def _check(x, y, qweight, meta, scales, zeros, bits, tiled) -> tuple[int, int]:
    """Raise ValueError unless the tensors fit the layout sbmm expects; returns (N, group_size)."""
    num_slots, n, num_words = qweight.shape
    t, k = x.shape
    if bits not in (2, 4):
        raise ValueError(f"sbmm supports bits 2 and 4, got {bits}")
    if meta is None:  # dense2 words (kernels/layout.py): 2-bit, 16 dense columns per word, tile-major
        if bits != 2 or zeros is not None or num_words * 16 != k or not layout.tiles(n, k):
            raise ValueError(f"dense2 words {tuple(qweight.shape)} (meta None) need bits=2, symmetric codes, "
                             f"K / 16 words per row, K a multiple of {layout.TILE_COLS} and N of {layout.TILE_ROWS}; "
                             f"K={k}, bits={bits}")
    elif k % 32 or num_words * 64 // bits != k or meta.shape != (num_slots, n, k // 32):
        raise ValueError(f"packed shapes {tuple(qweight.shape)} / {tuple(meta.shape)} do not match K={k}")
    elif tiled and (bits != 4 or not layout.tiles(n, k)):
        raise ValueError(f"tile-major 2:4 words (tiled) are 4-bit with N a multiple of {layout.TILE_ROWS} and K of "
                         f"{layout.TILE_COLS}; got bits={bits}, N={n}, K={k}: keep such stacks in row order")
    if y.shape != (t, n) or y.dtype != x.dtype or x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and y {tuple(y.shape)} {y.dtype}: need [T, K] -> [T, N], "
                         "same dtype, unit stride in the last dim")
    if x.is_cuda and x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"sbmm on CUDA takes fp16 or bf16 activations, got {x.dtype}")
    if not (qweight.is_contiguous() and (meta is None or meta.is_contiguous()) and scales.is_contiguous()):
        raise ValueError("packed tensors must be contiguous")
    num_groups = scales.shape[-1]
    group_size = k // max(num_groups, 1)
    if scales.shape != (num_slots, n, num_groups) or k % num_groups or (num_groups > 1 and group_size % 32):
        raise ValueError(f"scales {tuple(scales.shape)}: need [slots, N, G] with K / G a multiple of 32")
    if zeros is not None and (zeros.shape != scales.shape or not zeros.is_contiguous()):
        raise ValueError(f"zeros {tuple(zeros.shape)} must match scales {tuple(scales.shape)}")
    return n, group_size


def sbmm(
    x: torch.Tensor,
    y: torch.Tensor,
    qweight: torch.Tensor,
    meta: torch.Tensor | None,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    seg_starts: torch.Tensor,
    seg_slots: torch.Tensor,
    bits: int,
    kernel: str | None = None,
    config: dict | None = None,
    rows_hint: float | None = None,
    segments_hint: int | None = None,
    tiled: bool = False,
    sp4: bool = False,
    sp2: bool = False,
    workspace: Workspace | None = None,
) -> None:
    """In place y[seg] += x[seg] @ dequant(Δ[seg_slots[s]]).T for all segments in one launch.

    x: [T, K] fp16/bf16 (fp32 too under the interpreter), y: [T, N] same dtype, both unit-stride in the
    last dim. Packed deltas stacked by slot in the canonical layout of kernels/packing.py:
    qweight int32 [num_slots, N, K*bits/64], meta int32 [num_slots, N, K/32], scales fp16 [num_slots, N, G]
    (meta None: 2-bit symmetric dense2 words [num_slots, N, K/16] of kernels/layout.py, Gluon kernel only)
    (G = 1: per row), zeros like scales or None (symmetric: z = 2**(bits-1)). seg_starts int64 [S+1] and
    seg_slots int64 [S] on x's device; rows seg_starts[s]:seg_starts[s+1] use slot seg_slots[s]; slots
    outside [0, num_slots) are skipped (kernels.delta_linear.apply_deltas rejects them first).
    kernel: "gluon" | "triton" | None (best available); config: launch-config override (benchmarks).
    rows_hint: rows per segment the config is picked for (default T / S; a CUDA-graph capture with padded
    segments passes the step's real largest segment).
    segments_hint: an upper bound on the segments that hold a delta (default S). A CUDA graph's segment
    tensors have a fixed, padded length S; the hint sizes the grid and the K split for the real ones.
    tiled: 4-bit qweight and meta are stored tile-major (kernels/layout.py `tile_packed`, what CUDA slots hold
    where N and K tile); dense2 words are always tile-major. Both kernels read either order.
    sp4: qweight and meta are in the sp4 order (kernels/spmma_layout.py `pack_sp4`; 4-bit symmetric, per-row scales or
    groups a multiple of 128) and run on the sparse-MMA kernel (kernels/sbmm_spmma.py, CUDA sm_80+ only); what CUDA
    slots hold for such deltas (services/worker/device_slots.py).
    sp2: qweight and meta are in the sp2 order (kernels/spmma_layout.py `pack_sp2`; 2-bit symmetric, N % 64 == 0,
    K % 256 == 0, per-row scales or groups a multiple of 128) and run on kernels/sbmm_spmma2.py (CUDA sm_80+ only);
    what CUDA slots hold for such deltas unless the worker runs with --sparse-mma-2bit 0.
    workspace: scratch shared by launches one stream runs in order (`Workspace`): split-K counters without a
    memset per launch, and one sparse-MMA copy of x for consecutive launches on the same x (q, k, v). None: a
    fresh zeroed counter buffer and a fresh copy of x per call.
    """
    if sp4 and sp2:
        raise ValueError("sp4 and sp2 name two word orders: pass the one the stack holds")
    if workspace is not None and workspace.device != x.device:
        raise ValueError(f"workspace on {workspace.device}, x on {x.device}: one workspace per device")
    sparse_mma = sp4 or sp2
    memo = None
    if (sparse_mma and FAST_LAUNCH and PLAN_MEMO and kernel is None and config is None and rows_hint is None
            and segments_hint is None):
        memo = _plan_key(x, y, qweight, meta, scales, zeros, bits, sp2, seg_slots.shape[0])
        hit = _PLANS.get(memo)
        if hit is not None:  # checked and planned before: the same shapes, strides, dtypes, device and contiguity
            launch, group_size, num_groups = hit
            _launch_sparse_mma(x, y, qweight, meta, scales, seg_starts, seg_slots, bits, group_size, num_groups,
                               launch, workspace, memo)
            return
    n, group_size = _check(x, y, qweight, meta, scales, zeros, bits, tiled or sp4)
    t, k = x.shape
    num_groups = scales.shape[-1]
    asym = zeros is not None
    if sparse_mma:
        _check_sparse_mma(x, n, k, bits, num_groups, group_size, asym, sp2)
    num_segments = seg_slots.shape[0]
    if t == 0 or num_segments == 0 or n == 0:
        return
    dense2 = meta is None
    launch = plan(x, n, k, bits, num_groups, group_size, asym, num_segments, kernel=kernel, config=config,
                  rows_hint=rows_hint, segments_hint=segments_hint, dense2=dense2, sp4=sp4, sp2=sp2)
    if sparse_mma:
        if memo is not None:
            if len(_PLANS) >= PLAN_MEMO_SIZE:
                _PLANS.clear()
            _PLANS[memo] = (launch, group_size, num_groups)
        _launch_sparse_mma(x, y, qweight, meta, scales, seg_starts, seg_slots, bits, group_size, num_groups, launch,
                           workspace, memo)
        return
    if dense2:
        meta_words = qweight  # never read (HAS_META false)
    else:
        meta_words = meta.view(torch.int16) if bits == 4 else meta  # one meta element per qweight word
    common = (
        x, y, x.stride(0), y.stride(0),
        qweight, meta_words, scales, zeros if asym else scales,
        qweight.stride(0), qweight.stride(1), meta_words.stride(0), meta_words.stride(1),
        scales.stride(0), scales.stride(1),
        seg_starts, seg_slots, num_segments, qweight.shape[0],
    )
    if launch.kernel == "gluon":
        _launch_gluon(common, x, n, k, group_size, num_groups, DENSE2_GEOMETRY_BITS if dense2 else bits, asym,
                      launch, dense2, tiled or dense2, workspace)
    else:
        _launch_triton(common, x, n, k, group_size, num_groups, bits, asym, launch, tiled)


# Eager sparse-MMA calls repeat a few shapes (every layer of a prefill step calls each linear's shape again): their
# checks and plan are kept per `_plan_key`, and their launcher per key and alignment (`_launch_sparse_mma`), so a
# repeat skips `_check`, `plan` and Triton's argument specialization. Cleared when full; only with FAST_LAUNCH.
# PLAN_MEMO False: every call checks and plans (bench/worker.py --parts plan-memo-ab times both).
PLAN_MEMO = True
PLAN_MEMO_SIZE = 4096
_PLANS: dict[tuple, tuple] = {}
_LAUNCHERS: dict[tuple, tuple] = {}


def _plan_key(x, y, qweight, meta, scales, zeros, bits: int, sp2: bool, num_segments: int) -> tuple:
    """Everything `_check`, `_check_sparse_mma` and `plan` read of a sparse-MMA call (shapes, strides, dtypes,
    device, contiguity, x's storage parity), and what fixes the launch's integer arguments."""
    return (x.shape, x.stride(), x.dtype, x.device, x.storage_offset() & 1, y.shape, y.stride(), y.dtype,
            qweight.shape, qweight.stride(), meta.shape, meta.stride(), scales.shape, scales.stride(),
            zeros is None, qweight.is_contiguous() and meta.is_contiguous() and scales.is_contiguous(), bits, sp2,
            num_segments)


@functools.lru_cache(maxsize=16)
def _no_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Placeholders for the split-K arguments of an unsplit launch (never read)."""
    return torch.empty(1, dtype=torch.float32, device=device), torch.empty(1, dtype=torch.int32, device=device)


class Workspace:
    """Scratch for sbmm launches that one stream runs in order: the linears of one forward, eager or captured in
    one CUDA graph.

    - Split-K arrival counters, zeroed once: every split launch sets the counters it used back to zero (the
      last split of a tile does), so launches need no memset of their own (a kernel node fewer per launch).
    - The sparse-MMA order of x (`spmma_layout.sp4_x`), kept for the last x: q, k and v (and gate and up) read
      the same tensor, so one copy serves all of them. The same tensor object counts as the same activations
      (inference tensors have no version counter to say otherwise): do not write x in place between launches
      that share a workspace. The kept copy is never reused across the start or end of a CUDA-graph capture
      (the capture must record its own copy); a caller that captures two graphs over the same x object one
      after the other calls `forget_x` in between (the worker's DeltaOps call it at the embedding and at every
      norm, so a forward keeps no activations alive past the linears that share them).

    Launches that can run at the same time (two streams, two graphs replayed at once) need a workspace each. The
    worker keeps one per DeltaOps object: per forward (and per logits pass), and per set of decode graphs."""

    # a split launch has T // BM + S < 2 max(S, T // BM) row tiles, so fewer than 2 x min_ctas tiles (tables:
    # min_ctas <= 2048); a larger explicit min_ctas grows the buffer (never during a capture: `counters`)
    COUNTERS = 1 << 14

    def __init__(self, device: torch.device | str, counters: int = COUNTERS) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._size = counters
        self._counters: torch.Tensor | None = None  # made (zeroed) by the first split launch
        self._retired: list[torch.Tensor] = []  # outgrown buffers that captured graphs may still point at
        self._x: torch.Tensor | None = None
        self._x_key: tuple[int, bool] = (-1, False)  # (version, capturing) of the kept copy
        self._xs: torch.Tensor | None = None

    def counters(self, tiles: int) -> torch.Tensor:
        """Zeroed int32 counters for a launch of `tiles` output tiles (grown, never shrunk, when too few)."""
        if self._counters is not None and tiles <= self._counters.numel():
            return self._counters
        if _capturing(self.device):  # a buffer made here would stay unzeroed until the graph first replays
            raise RuntimeError(f"sbmm.Workspace: a launch of {tiles} split-K tiles needs a counter buffer made "
                               "outside CUDA-graph capture: run the same launch once before capturing")
        if self._counters is not None:
            self._retired.append(self._counters)
        self._counters = torch.zeros(max(self._size, triton.next_power_of_2(tiles)), dtype=torch.int32,
                                     device=self.device)
        return self._counters

    def sp_x(self, x: torch.Tensor) -> torch.Tensor:
        """x in the sparse-MMA B order; the last result again while x is the same tensor (and, where it has one,
        at the same version)."""
        key = (-1 if x.is_inference() else x._version, _capturing(x.device))
        if x is not self._x or key != self._x_key:
            self._xs, self._x, self._x_key = spmma_layout.sp4_x(x), x, key
        return self._xs

    def forget_x(self) -> None:
        """Drop the kept copy of x: the next sparse-MMA launch makes (and, capturing, records) its own."""
        self._x = self._xs = None


def _capturing(device: torch.device) -> bool:
    """Whether `device`'s current stream is capturing a CUDA graph (never off CUDA)."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()  # no device switch (a context costs ~5 µs per launch)
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _split_workspace(splits: int, t: int, n: int, grid: tuple, device: torch.device,
                     workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A split-K launch's fp32 partial sums [splits, T, N] and per-tile arrival counters: the workspace's
    counters, else fresh zeroed ones (safe under CUDA-graph capture and concurrent streams); placeholders for
    an unsplit launch."""
    if splits == 1:
        return _no_workspace(device)
    tiles = grid[0] * grid[1]
    counters = (workspace.counters(tiles) if workspace is not None
                else torch.zeros(tiles, dtype=torch.int32, device=device))
    return torch.empty(splits, t, n, dtype=torch.float32, device=device), counters


def _launch_gluon(common, x, n, k, group_size, num_groups, bits, asym, launch: Launch, dense2: bool,
                  tiled: bool, workspace: Workspace | None = None) -> None:
    t, config, splits = x.shape[0], launch.config, launch.splits
    const = _gluon_constexprs(n, k, group_size, num_groups, bits, asym, x.dtype, launch.block_m, launch.block_n,
                              launch.num_warps, bool(config.get("prefetch", True)), splits, dense2,
                              bool(config.get("scale_after", True)), tiled)
    grid = (cdiv(n, launch.block_n), t // launch.block_m + launch.live_segments, splits)
    ws, counters = _split_workspace(splits, t, n, grid, x.device, workspace)
    opts = {"maxnreg": config["maxnreg"]} if config.get("maxnreg") else {}  # register cap: more CTAs per SM
    sbmm_gluon._sbmm_gluon_kernel[grid](*common, ws, counters, t * n, n, MAX_SEGS=launch.max_segs,
                                        num_warps=launch.num_warps, **opts, **const)


@functools.lru_cache(maxsize=256)
def _gluon_constexprs(n, k, group_size, num_groups, bits, asym, dtype, block_m, block_n, num_warps, prefetch,
                      splits=1, dense2=False, scale_after=True, tiled=False) -> dict:
    """Compile-time arguments of one Gluon launch shape (cached: building layouts costs ~40 µs of host time);
    `bits` is the tile geometry (4 for dense2 words). dense2 words with one scale per row or per K tile are
    expanded unscaled and the accumulator takes the scale (`scale_after`, the default; False: scale each
    value). tiled: words (and meta) in tile-major order; dense2 words always are."""
    block_k = sbmm_gluon.WORDS_PER_TILE * 64 // bits
    if num_groups == 1:
        scale_mode, group_size = sbmm_triton.SCALE_ROW, k
    elif group_size % block_k == 0:
        scale_mode = sbmm_triton.SCALE_TILE
    else:
        scale_mode = sbmm_triton.SCALE_SPLIT
    raw = dense2 and scale_after and scale_mode in (sbmm_triton.SCALE_ROW, sbmm_triton.SCALE_TILE)
    if raw:
        asm, constraints = _dense2_raw_program(dtype)
    elif dense2:
        asm, constraints = _dense2_program(dtype)
    else:
        asm, constraints = _program(bits, asym, dtype)
    magic = 1024.0 if dtype == torch.float16 else 128.0
    zero_point = 2 if dense2 else 1 << (bits - 1)
    return dict(
        K=k, GROUP_SIZE=group_size, EVEN_N=n % block_n == 0, BITS=bits, ASYM=asym, SCALE_MODE=scale_mode,
        BLOCK_M=block_m, BLOCK_N=block_n, ASM=asm, CONSTRAINTS=constraints, HAS_META=not dense2,
        Z2=_half2_const(magic if asym else magic + zero_point, dtype),
        L_WORDS=sbmm_gluon.word_layout(block_n, num_warps), L_X=sbmm_gluon.x_layout(bits, block_m, num_warps),
        L_SEG=sbmm_gluon.seg_layout(num_warps), PREFETCH=prefetch, SPLIT_K=splits, RAW=raw, TILED=tiled or dense2,
    )


def _launch_triton(common, x, n, k, group_size, num_groups, bits, asym, launch: Launch, tiled: bool) -> None:
    config = launch.config
    block_m, block_n, block_k = launch.block_m, launch.block_n, config["BLOCK_K"]
    block_k = min(block_k, triton.next_power_of_2(k))
    if num_groups == 1:
        scale_mode = sbmm_triton.SCALE_ROW
    elif group_size % block_k == 0:
        scale_mode = sbmm_triton.SCALE_TILE
    else:
        scale_mode = sbmm_triton.SCALE_SPLIT
    interp = interpreting()
    use_asm = bool(config.get("use_asm", False)) and not interp and x.is_cuda
    asm, constraints = _program(bits, asym, x.dtype) if use_asm else ("", "")
    magic = 1024.0 if x.dtype == torch.float16 else 128.0
    z2 = _half2_const(magic if asym else magic + (1 << (bits - 1)), x.dtype) if use_asm else 0
    grid = (cdiv(n, block_n), x.shape[0] // block_m + launch.live_segments)
    sbmm_triton._sbmm_kernel[grid](
        *common, n, k, group_size,
        BITS=bits, ASYM=asym, SCALE_MODE=scale_mode,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, MAX_SEGS=launch.max_segs,
        EVEN_K=k % block_k == 0, USE_ASM=use_asm, ASM=asm, CONSTRAINTS=constraints, Z2=z2,
        DOT_FP32=interp, TILED=tiled,
        num_warps=launch.num_warps, num_stages=config.get("num_stages", 3),
    )


@functools.lru_cache(maxsize=256)
def _spmma_constexprs(k, group_size, num_groups, dtype, block_m, block_n, num_warps, splits=1,
                      prefetch=True, bits=4, pdl=False, x_dense=False, expand="shift") -> dict:
    """Compile-time arguments of one sparse-MMA launch (kernels/sbmm_spmma.py on sp4 words, symmetric 4-bit;
    bits 2: kernels/sbmm_spmma2.py on sp2 words); `expand` picks the word expander (sbmm_spmma.FMA_SHIFTS)."""
    name = "f16" if dtype == torch.float16 else "bf16"
    module = sbmm_spmma2 if bits == 2 else sbmm_spmma
    expand_asm, cons_e = module.expand_ptx(name, expand)
    mma0, cons_m = sbmm_spmma.mma_ptx(name, 0)
    mma1, _ = sbmm_spmma.mma_ptx(name, 1)
    scale_mode = sbmm_triton.SCALE_ROW if num_groups == 1 else sbmm_triton.SCALE_TILE
    return dict(K=k, GROUP_SIZE=k if num_groups == 1 else group_size, SCALE_MODE=scale_mode, BLOCK_M=block_m,
                BLOCK_N=block_n, EXPAND=expand_asm, MMA0=mma0, MMA1=mma1, CONSTRAINTS_E=cons_e, CONSTRAINTS_M=cons_m,
                L_SEG=sbmm_gluon.seg_layout(num_warps), SPLIT_K=splits, PREFETCH=prefetch, PDL=pdl,
                X_DENSE=x_dense,
                **module.layouts(block_n, block_m, num_warps))


def _check_sparse_mma(x, n, k, bits, num_groups, group_size, asym, sp2: bool) -> None:
    """Raise ValueError unless the sparse-MMA kernel of the order (sp4, or sp2) takes this launch."""
    if sp2 and not spmma2_supported(x, n, k, bits, num_groups, asym):
        raise ValueError(f"sp2 words run on CUDA fp16/bf16 only, 2-bit symmetric, N % 64 == 0, K % 256 == 0, scale "
                         f"groups per row or a multiple of 128; got bits={bits}, N={n}, K={k}, group {group_size}")
    if not sp2 and not spmma_supported(x, n, k, bits, num_groups, asym):
        raise ValueError(f"sp4 words run on CUDA fp16/bf16 only, 4-bit symmetric, N % 64 == 0, K % 128 == 0, scale "
                         f"groups per row or a multiple of 128; got bits={bits}, N={n}, K={k}, group {group_size}")


def _launch_sparse_mma(x, y, qweight, meta, scales, seg_starts, seg_slots, bits, group_size, num_groups,
                       launch: Launch, workspace: Workspace | None = None, memo: tuple | None = None) -> None:
    """One launch of kernels/sbmm_spmma.py (sp4 words) or kernels/sbmm_spmma2.py (sp2 words). memo: the call's
    `_plan_key`: a repeat with the same tensors' 16-byte alignment calls the compiled launcher directly."""
    t, k = x.shape
    n = y.shape[1]
    splits, sp2 = launch.splits, launch.kernel == "spmma2"
    grid = (n // launch.block_n, t // launch.block_m + launch.live_segments, splits)
    ws, counters = _split_workspace(splits, t, n, grid, x.device, workspace)
    # x_dense: the kernel reads x as given, 4-byte loads (no copy; `plan` turns it off for an odd storage offset);
    # else x in the B order (sp2 too): 16-byte loads, a copy per call or per workspace x (T x K x 2 bytes)
    x_dense = bool(launch.config.get("x_dense", False))
    xs = x if x_dense else workspace.sp_x(x) if workspace is not None else spmma_layout.sp4_x(x)
    args = (xs.view(torch.int32), y, xs.stride(0) // 2, y.stride(0), qweight, meta, scales,
            qweight.stride(0), meta.stride(0), scales.stride(0), scales.stride(1),
            seg_starts, seg_slots, seg_slots.shape[0], qweight.shape[0], ws, counters, t * n, n)
    key = None
    if memo is not None:  # the integer arguments are fixed by the memo key; the tensors' alignment is not
        tensors = (xs, y, qweight, meta, scales, seg_starts, seg_slots, ws, counters)
        key = (memo, tuple(not a.data_ptr() & 15 for a in tensors), seg_starts.dtype, seg_slots.dtype,
               x.device.index)
        entry = _LAUNCHERS.get(key)
        if entry is not None:
            _run_compiled(entry, grid, args, x.device.index)
            return
    pdl = bool(launch.config.get("pdl", False))
    # expand: "shift" or "fma", the word expander (kernels/sbmm_spmma.py FMA_SHIFTS)
    expand = launch.config.get("expand", "shift")
    const_key = (k, group_size, num_groups, x.dtype, launch.block_m, launch.block_n, launch.num_warps, splits,
                 int(launch.config.get("prefetch", True)), bits, pdl, x_dense, expand)
    kernel = sbmm_spmma2._sbmm_spmma2_kernel if sp2 else sbmm_spmma._sbmm_spmma_kernel
    entry = _LAUNCHES.launch(kernel, grid, args, (*const_key, launch.max_segs), launch.num_warps, pdl, x.device,
                             lambda: dict(_spmma_constexprs(*const_key), MAX_SEGS=launch.max_segs))
    if key is not None and entry is not None:
        if len(_LAUNCHERS) >= PLAN_MEMO_SIZE:
            _LAUNCHERS.clear()
        _LAUNCHERS[key] = entry


DEQUANT_BLOCK_N = 64  # rows per program of the dense expansion (one sp4 / sp2 row tile)


def dequantize_rows(qweight: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, bits: int, k: int,
                    out: torch.Tensor, row0: int = 0, base: torch.Tensor | None = None) -> torch.Tensor:
    """Dense Δ rows row0 .. row0 + out.shape[0] of one slot's sp4 (bits 4) or sp2 (bits 2) words into out
    (fp16 / bf16 [rows, K], unit stride in K), expanded on the sparse tensor cores (kernels/sbmm_dequant.py):
    values as the SBMM kernels use them, code times scale rounded once to out's dtype. base: the base weight
    [N, K] in out's dtype (unit stride in K): out = base + Δ instead, the sum rounded once. qweight, meta, scales:
    the slot's parts (qweight[slot], ...: [N, ...]); row0 and the row count are multiples of 64. CUDA sm_80+ only
    (`spmma_device_ok`)."""
    rows = out.shape[0]
    n, num_groups = scales.shape[0], scales.shape[-1]
    step = spmma_layout.SP2_STEP if bits == 2 else layout.TILE_COLS
    if bits not in (2, 4) or out.dim() != 2 or out.shape[1] != k or out.stride(1) != 1:
        raise ValueError(f"dequantize_rows: bits 2 or 4 and out [rows, K={k}] unit-stride in K, got bits={bits}, out "
                         f"{tuple(out.shape)} strides {out.stride()}")
    if not spmma_device_ok(out.device, out.dtype) or sbmm_dequant is None:
        raise ValueError("dequantize_rows runs on CUDA sm_80+ with fp16/bf16 out (the sparse tensor cores)")
    if row0 % DEQUANT_BLOCK_N or rows % DEQUANT_BLOCK_N or row0 + rows > n or k % step:
        raise ValueError(f"dequantize_rows: rows {row0}..{row0 + rows} of N={n} must be whole 64-row tiles and K={k} "
                         f"a multiple of {step}")
    if base is not None and (base.dtype != out.dtype or tuple(base.shape) != (n, k) or base.stride(1) != 1
                             or base.stride(0) % 8 or base.data_ptr() % 16):
        raise ValueError(f"dequantize_rows: base must be [N={n}, K={k}] {out.dtype}, unit stride in K and 16-byte "
                         f"aligned rows; got {base.dtype} {tuple(base.shape)} strides {base.stride()}")
    if rows == 0:
        return out
    steps = k // step
    per_program = next(s for s in (4, 2, 1) if steps % s == 0)  # a few K steps per program: loads amortized
    block_n = _dequant_block_n(bits, base is not None)
    grid = (rows // block_n, steps // per_program, 1)
    base_words = out if base is None else base  # a placeholder when there is no base (never read)
    args = (qweight, meta, scales, scales.stride(0), out.view(torch.int32), out.stride(0) // 2, row0,
            base_words.view(torch.int32), base_words.stride(0) // 2)
    const_key = (k, k // num_groups, num_groups, out.dtype, bits, per_program, base is not None)
    # eager prefill steps are host-bound: skip Triton's per-call binding, as the SBMM launches do
    _LAUNCHES.launch(sbmm_dequant._dequant_kernel, grid, args, const_key, 2, False, out.device,
                     lambda: _dequant_constexprs(*const_key))
    return out


def _dequant_block_n(bits: int, add_base: bool) -> int:
    """Rows per program: 64, or 32 for sp2 with a base (one 16-row block per warp: 64 rows need ~270 registers)."""
    return DEQUANT_BLOCK_N // 2 if bits == 2 and add_base else DEQUANT_BLOCK_N


@functools.lru_cache(maxsize=64)
def _dequant_constexprs(k, group_size, num_groups, dtype, bits, steps, add_base=False) -> dict:
    name = "f16" if dtype == torch.float16 else "bf16"
    module = sbmm_spmma2 if bits == 2 else sbmm_spmma
    expand, cons_e = module.expand_ptx(name)
    mma0, cons_m = sbmm_spmma.mma_ptx(name, 0)
    mma1, _ = sbmm_spmma.mma_ptx(name, 1)
    cvt, cons_c = sbmm_dequant.cvt_ptx(name)
    unpack, cons_u = sbmm_dequant.unpack_ptx(name)
    block_n = _dequant_block_n(bits, add_base)
    lays = module.layouts(block_n, 8, 2)
    return dict(K=k, GROUP_SIZE=k if num_groups == 1 else group_size,
                SCALE_MODE=sbmm_triton.SCALE_ROW if num_groups == 1 else sbmm_triton.SCALE_TILE, SP2=bits == 2,
                BLOCK_N=block_n, STEPS=steps, ONE_BITS=sbmm_dequant.ONE[name], ADD_BASE=add_base,
                EXPAND=expand, MMA0=mma0, MMA1=mma1, CVT=cvt, UNPACK=unpack, CONSTRAINTS_E=cons_e,
                CONSTRAINTS_M=cons_m, CONSTRAINTS_C=cons_c, CONSTRAINTS_U=cons_u,
                L_S=lays["L_S"], L_W=lays["L_W"], L_META=lays.get("L_META", lays["L_W"]))


# Repeated sparse-MMA launches skip Triton's per-call binding (`LaunchCache`); False: every launch goes through
# JITFunction.run (bench/sbmm_host.py and bench/worker.py --no-fast-launch time both).
FAST_LAUNCH = True


def _spec(arg) -> tuple:
    """What Triton specializes a runtime argument on, or finer: a tensor's dtype and 16-byte alignment; an int's
    width class, whether it is 1 and whether it is a multiple of 16."""
    if type(arg) is int:
        return -0x80000000 <= arg < 0x80000000, arg == 1, not arg & 15
    return arg.dtype, not arg.data_ptr() & 15


class LaunchCache:
    """Launches of a Triton/Gluon JIT kernel that reuse the compiled kernel of an earlier launch with the same
    constexprs, options and argument specialization, calling its launcher directly.

    Triton's `JITFunction.run` binds every argument, builds the specialization key (hashing the Gluon layouts
    among the constexprs) and looks the kernel up on every call: ~40 µs of host time per SBMM launch on an H100
    host, against ~10 µs for the launcher itself (bench/sbmm_host.py). Eager launches (prefill steps) pay that per
    linear. The first launch of a key goes through `JITFunction.run` (compiling if needed, so the compile watch
    and Triton's caches see it); later ones call the compiled kernel's `run` with the same argument list. The key
    holds every constexpr (`const_key`), the options and `_spec` of each runtime argument, which is at least as
    fine as Triton's own specialization, so a launch never reuses a kernel compiled for other alignments."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def launch(self, fn, grid: tuple[int, int, int], args: tuple, const_key: tuple, num_warps: int, pdl: bool,
               device: torch.device, make_const, maxnreg: int | None = None) -> tuple | None:
        """fn[grid](*args, **make_const(), num_warps=num_warps, launch_pdl=pdl[, maxnreg=maxnreg]); args are fn's
        leading runtime parameters in order, make_const() its constexprs (a function: only a key's first launch
        needs them). Returns the key's entry (compiled kernel, constexprs in signature order), which a caller may
        keep to launch the same key again. With FAST_LAUNCH off every launch goes through JITFunction.run, the
        cache is not used and None is returned."""
        options = {} if maxnreg is None else {"maxnreg": maxnreg}
        if not FAST_LAUNCH:
            fn[grid](*args, **make_const(), num_warps=num_warps, launch_pdl=pdl, **options)
            return
        key = (fn, const_key, num_warps, pdl, maxnreg, device.index, tuple(_spec(a) for a in args))
        entry = self._entries.get(key)
        if entry is None:
            const = make_const()
            names = fn.arg_names
            if any(name in const for name in names[:len(args)]):
                raise ValueError(f"{fn.__name__}: a constexpr among the first {len(args)} (runtime) parameters")
            tail = tuple(const[name] for name in names[len(args):])  # the constexprs in signature order
            compiled = fn[grid](*args, **const, num_warps=num_warps, launch_pdl=pdl, **options)
            if hasattr(compiled, "result"):  # an asynchronous compile's future
                compiled = compiled.result()
            entry = self._entries[key] = (compiled, tail)
            return entry
        _run_compiled(entry, grid, args, device.index)
        return entry


def _run_compiled(entry: tuple, grid: tuple[int, int, int], args: tuple, device_index: int) -> None:
    """Launch a LaunchCache entry (compiled kernel, constexprs in signature order) with these runtime args on the
    device's current stream, as Triton's launcher would, without its per-call binding."""
    compiled, tail = entry
    full = (*args, *tail)
    stream = _current_stream(device_index)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full), knobs.runtime.launch_enter_hook,
                 knobs.runtime.launch_exit_hook, *full)


def _current_stream(index: int) -> int:
    """The raw handle of device `index`'s current CUDA stream: what Triton's driver reads (get_current_stream)."""
    return torch._C._cuda_getCurrentRawStream(index)


_LAUNCHES = LaunchCache()
