"""SBMM entry point: check shapes, pick a kernel and a tuned config, launch once for all segments.

Kernels: kernels/sbmm_gluon.py (CUDA, expanded words feed the MMA in registers; K a multiple of its K tile)
and kernels/sbmm_triton.py (portable: the CPU tests under TRITON_INTERPRET=1 and the GPU fallback). Tuned
configs live in kernels/sbmm_configs.json, keyed by torch.cuda.get_device_name() ("default" otherwise),
chosen by the mean rows per segment (T / S: no device sync) and, where an entry says so, the output width N;
bench/sbmm.py --sweep produced them (the sparse-MMA kernels have their own tables, "spmma" and "spmma2").
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton

from kernels import layout, sbmm_asm, sbmm_triton, spmma_layout

try:  # Gluon ships with Triton >= 3.5; without it every launch takes the portable kernel
    from kernels import sbmm_gluon, sbmm_spmma, sbmm_spmma2
except ImportError:  # pragma: no cover - depends on the installed triton
    sbmm_gluon = sbmm_spmma = sbmm_spmma2 = None

CONFIG_FILE = Path(__file__).with_name("sbmm_configs.json")
DENSE2_GEOMETRY_BITS = 4  # dense2 words hold 16 dense columns, like 4-bit 2:4 words: same tiles and layouts
KERNELS = ("gluon", "triton")


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests): no inline PTX, fp32 dots."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _configs() -> dict:
    return json.loads(CONFIG_FILE.read_text())


def pick_config(kernel: str, device_name: str, rows_per_segment: float, bits: int | str | None = None,
                n: int | None = None, segments: int | None = None, table: dict | None = None) -> dict:
    """Tuned launch config: the first entry whose max_rows (null: any) covers the mean rows per segment, whose
    optional `bits` list holds the launch's code width (2, 4, or "dense2" for dense2 words), whose optional
    `min_n` the output width `n` reaches, and whose optional `min_programs` (`max_programs`) the launch's (n-block,
    tile) programs before any K split reach (do not pass) with the entry's own tiles: ceil(n / BLOCK_N) x segments
    x ceil(rows / BLOCK_M) (an entry with min_n or a program bound never matches when n or segments is not
    given). Tables: "gluon", "triton", and the sparse-MMA kernels' own "spmma" (sp4 words) and "spmma2" (sp2
    words), whose entries may also set `x_dense` and `pdl` (kernels/sbmm_spmma.py). table: another table of
    kernels/sbmm_configs.json's form instead of it (benchmarks time an older table against it)."""
    table = table if table is not None else _configs()
    entries = table.get(device_name, {}).get(kernel) or table["default"][kernel]
    for entry in entries:
        if "bits" in entry and bits not in entry["bits"]:
            continue
        if "min_n" in entry and (n is None or n < entry["min_n"]):
            continue
        if "min_programs" in entry and (n is None or segments is None or _programs(
                entry, n, segments, rows_per_segment) < entry["min_programs"]):
            continue
        if "max_programs" in entry and (n is None or segments is None or _programs(
                entry, n, segments, rows_per_segment) > entry["max_programs"]):
            continue
        if entry["max_rows"] is None or rows_per_segment <= entry["max_rows"]:
            return {key: value for key, value in entry.items()
                    if key not in ("max_rows", "bits", "min_n", "min_programs", "max_programs")}
    raise AssertionError(f"{CONFIG_FILE}: {kernel} has no catch-all entry")


def _programs(entry: dict, n: int, segments: int, rows_per_segment: float) -> int:
    """(n-block, tile) programs of a launch with this entry's tiles, before any K split."""
    return triton.cdiv(n, entry["BLOCK_N"]) * segments * max(1, math.ceil(rows_per_segment / entry["BLOCK_M"]))


def rows_bucket(device: torch.device, rows: float) -> int:
    """A row count that picks the same launch configs as `rows` on this device (the smallest max_rows bound of
    its config tables that covers `rows`, else one past the largest): callers that capture a launch per config,
    like the worker's CUDA graphs, key and hint by it."""
    table, name = _configs(), _device_name(device)
    kernels = set(table["default"]) | set(table.get(name, {}))
    entries = [e for kernel in kernels for e in (table.get(name, {}).get(kernel) or table["default"][kernel])]
    limits = sorted({e["max_rows"] for e in entries if e["max_rows"] is not None})
    return next((m for m in limits if rows <= m), limits[-1] + 1 if limits else 1)


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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


def gluon_supported(x: torch.Tensor, k: int, bits: int, group_size: int, num_groups: int) -> bool:
    """Whether kernels/sbmm_gluon.py takes this launch (CUDA sm_80+, K a multiple of its K tile)."""
    if sbmm_gluon is None or interpreting() or not x.is_cuda:
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    block_k = sbmm_gluon.WORDS_PER_TILE * 64 // bits
    dpw = 64 // bits
    return k % block_k == 0 and (num_groups == 1 or group_size % dpw == 0)


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
    sparse_mma = sp4 or sp2
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
    if workspace is not None and workspace.device != x.device:
        raise ValueError(f"workspace on {workspace.device}, x on {x.device}: one workspace per device")
    if sparse_mma:
        _launch_sparse_mma(x, y, qweight, meta, scales, seg_starts, seg_slots, bits, group_size, num_groups, launch,
                           workspace)
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


class Launch(NamedTuple):
    """What one sbmm call launches, decided by `plan`: the kernel ("gluon", "triton", "spmma" on sp4 words,
    "spmma2" on sp2 words), its tuned config (overrides applied), tile sizes, the segments that hold a delta
    (grid and K split), the K split and the MAX_SEGS bound of the segment search."""

    kernel: str
    config: dict
    block_m: int
    block_n: int
    num_warps: int
    live_segments: int
    splits: int
    max_segs: int


def plan(x: torch.Tensor, n: int, k: int, bits: int, num_groups: int, group_size: int, asym: bool,
         num_segments: int, kernel: str | None = None, config: dict | None = None, rows_hint: float | None = None,
         segments_hint: int | None = None, dense2: bool = False, sp4: bool = False, sp2: bool = False) -> Launch:
    """The launch of an sbmm call with these shapes (x [T, K] gives T, device and dtype; nothing is read):
    sbmm launches exactly this, and `compile_key` names the compiled variant it needs."""
    t = x.shape[0]
    rows = rows_hint if rows_hint is not None else t / num_segments
    live = num_segments if segments_hint is None else max(1, min(num_segments, segments_hint))
    max_segs = max(MIN_MAX_SEGS, triton.next_power_of_2(num_segments))  # the segment search's bound
    if sp4 or sp2:
        if config is None:
            config = pick_config("spmma2" if sp2 else "spmma", _device_name(x.device), rows, bits, n, live)
        if int(config.get("prefetch", True)) not in (0, 1, 2):
            raise ValueError(f"sparse-MMA prefetch is 0, 1 or 2 K steps in flight, not {config['prefetch']!r}")
        if config.get("x_dense") and x.storage_offset() % 2:  # x cannot be read in place as pairs: copy it
            config = dict(config, x_dense=False)
        if config.get("pdl") and not pdl_ok(x.device):
            raise ValueError("config pdl (programmatic dependent launch, griddepcontrol) needs a CUDA GPU of compute "
                             "capability 9.0 or newer (Hopper); drop the key for this device")
        # x pairs take 16 (sp2: 32) registers per 8 tokens: BLOCK_M 64 (sp2: 32) spills
        block_m = min(config["BLOCK_M"], 16 if sp2 else 32)
        block_n, warps = config["BLOCK_N"], config["num_warps"]
        if n % block_n or block_n % (16 * warps):  # sp4 reads whole 16-row blocks: no row masks
            block_n, warps = layout.TILE_ROWS, min(warps, 4)
        splits = split_k(dict(config, BLOCK_M=block_m, BLOCK_N=block_n), n, k, bits, t, live)
        return Launch("spmma2" if sp2 else "spmma", config, block_m, block_n, warps, live, splits, max_segs)
    geometry_bits = DENSE2_GEOMETRY_BITS if dense2 else bits  # dense2 words tile like 4-bit 2:4 words
    if kernel is None:
        kernel = "gluon" if gluon_supported(x, k, geometry_bits, group_size, num_groups) else "triton"
    if kernel not in KERNELS:
        raise ValueError(f"unknown sbmm kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    if kernel == "gluon" and not gluon_supported(x, k, geometry_bits, group_size, num_groups):
        raise ValueError(f"the gluon kernel does not take K={k}, bits={bits}, group_size={group_size} here")
    if dense2 and kernel != "gluon":
        raise ValueError("dense2 words (meta None) run on the Gluon kernel only (CUDA, K a multiple of 128)")
    if config is None:
        config = pick_config(kernel, _device_name(x.device), rows, "dense2" if dense2 else bits)
    splits = split_k(config, n, k, geometry_bits, t, live) if kernel == "gluon" else 1
    return Launch(kernel, config, config["BLOCK_M"], config["BLOCK_N"], config.get("num_warps", 4), live, splits,
                  max_segs)


def compile_key(launch: Launch, n: int) -> tuple:
    """The parts of a launch that pick a compiled variant for one stack (its N, K, bits, groups and dtype fixed):
    the constexprs `plan` decides. The segment arguments are not specialized (sbmm_triton.SEGMENT_ARGS), the
    other integer arguments are fixed by the stack. Two calls with equal keys on the same stack run the same
    binary (kernels/sbmm_warmup.py relies on it)."""
    config = tuple(sorted((key, value) for key, value in launch.config.items() if key not in ("min_ctas",)))
    return (launch.kernel, config, launch.block_m, launch.block_n, launch.num_warps, launch.splits,
            launch.max_segs, n % launch.block_n == 0)


MAX_SPLIT_K = 8
MIN_MAX_SEGS = 32  # the segment search covers 32 segments at least: one variant up to 30 deltas a batch


def split_k(config: dict, n: int, k: int, bits: int, t: int, num_segments: int) -> int:
    """K splits of a Gluon launch: the smallest power of two (<= MAX_SPLIT_K) giving the config's `min_ctas`
    programs, assuming one tile per segment or per BLOCK_M rows; never more splits than K tiles, and none
    empty. Decode with few deltas has too few (n-block, segment) programs to keep the SMs' memory pipes busy."""
    min_ctas = config.get("min_ctas", 0)
    steps = k // (sbmm_gluon.WORDS_PER_TILE * 64 // bits)
    ctas = triton.cdiv(n, config["BLOCK_N"]) * max(num_segments, t // config["BLOCK_M"])
    split = 1
    while split < MAX_SPLIT_K and ctas * split < min_ctas and 2 * split <= steps:
        split *= 2
    while split > 1 and (split - 1) * triton.cdiv(steps, split) >= steps:
        split -= 1
    return split


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
    grid = (triton.cdiv(n, launch.block_n), t // launch.block_m + launch.live_segments, splits)
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
    grid = (triton.cdiv(n, block_n), x.shape[0] // block_m + launch.live_segments)
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
                      prefetch=True, bits=4, pdl=False, x_dense=False) -> dict:
    """Compile-time arguments of one sparse-MMA launch (kernels/sbmm_spmma.py on sp4 words, symmetric 4-bit;
    bits 2: kernels/sbmm_spmma2.py on sp2 words)."""
    name = "f16" if dtype == torch.float16 else "bf16"
    module = sbmm_spmma2 if bits == 2 else sbmm_spmma
    expand, cons_e = module.expand_ptx(name)
    mma0, cons_m = sbmm_spmma.mma_ptx(name, 0)
    mma1, _ = sbmm_spmma.mma_ptx(name, 1)
    scale_mode = sbmm_triton.SCALE_ROW if num_groups == 1 else sbmm_triton.SCALE_TILE
    return dict(K=k, GROUP_SIZE=k if num_groups == 1 else group_size, SCALE_MODE=scale_mode, BLOCK_M=block_m,
                BLOCK_N=block_n, EXPAND=expand, MMA0=mma0, MMA1=mma1, CONSTRAINTS_E=cons_e, CONSTRAINTS_M=cons_m,
                L_SEG=sbmm_gluon.seg_layout(num_warps), SPLIT_K=splits, PREFETCH=prefetch, PDL=pdl,
                X_DENSE=x_dense,
                **module.layouts(block_n, block_m, num_warps))


def spmma_device_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether kernels/sbmm_spmma.py runs on `device` with `dtype` activations (CUDA sm_80+, fp16/bf16): what
    the worker's CUDA slots check before storing 4-bit deltas in the sp4 order."""
    if sbmm_spmma is None or interpreting() or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def pdl_ok(device: torch.device) -> bool:
    """Whether a sparse-MMA launch on `device` may take the `pdl` config key (griddepcontrol: sm_90+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def spmma_supported(x: torch.Tensor, n: int, k: int, bits: int, num_groups: int, asym: bool) -> bool:
    """Whether kernels/sbmm_spmma.py takes this launch: CUDA sm_80+, fp16/bf16, 4-bit symmetric, N and K in whole
    sp4 tiles, scales per row or per group of a multiple of 128 columns, x rows at an even stride."""
    if not spmma_device_ok(x.device, x.dtype):
        return False
    group_ok = k % num_groups == 0 and spmma_layout.scale_groups_ok(k, k // num_groups)
    return bits == 4 and not asym and layout.tiles(n, k) and group_ok and x.stride(0) % 2 == 0


def spmma2_supported(x: torch.Tensor, n: int, k: int, bits: int, num_groups: int, asym: bool) -> bool:
    """Whether kernels/sbmm_spmma2.py takes this launch: CUDA sm_80+, fp16/bf16, 2-bit symmetric, N a multiple of
    64 and K of 256 (its K step), scales per row or per group of a multiple of 128 columns, x rows at an even
    stride."""
    if not spmma_device_ok(x.device, x.dtype):
        return False
    group_ok = k % num_groups == 0 and spmma_layout.scale_groups_ok(k, k // num_groups)
    return (bits == 2 and not asym and n % layout.TILE_ROWS == 0 and k % spmma_layout.SP2_STEP == 0 and group_ok
            and x.stride(0) % 2 == 0)


def _check_sparse_mma(x, n, k, bits, num_groups, group_size, asym, sp2: bool) -> None:
    """Raise ValueError unless the sparse-MMA kernel of the order (sp4, or sp2) takes this launch."""
    if sp2 and not spmma2_supported(x, n, k, bits, num_groups, asym):
        raise ValueError(f"sp2 words run on CUDA fp16/bf16 only, 2-bit symmetric, N % 64 == 0, K % 256 == 0, scale "
                         f"groups per row or a multiple of 128; got bits={bits}, N={n}, K={k}, group {group_size}")
    if not sp2 and not spmma_supported(x, n, k, bits, num_groups, asym):
        raise ValueError(f"sp4 words run on CUDA fp16/bf16 only, 4-bit symmetric, N % 64 == 0, K % 128 == 0, scale "
                         f"groups per row or a multiple of 128; got bits={bits}, N={n}, K={k}, group {group_size}")


def _launch_sparse_mma(x, y, qweight, meta, scales, seg_starts, seg_slots, bits, group_size, num_groups,
                       launch: Launch, workspace: Workspace | None = None) -> None:
    """One launch of kernels/sbmm_spmma.py (sp4 words) or kernels/sbmm_spmma2.py (sp2 words)."""
    t, k = x.shape
    n = y.shape[1]
    splits, sp2 = launch.splits, launch.kernel == "spmma2"
    grid = (n // launch.block_n, t // launch.block_m + launch.live_segments, splits)
    ws, counters = _split_workspace(splits, t, n, grid, x.device, workspace)
    pdl = bool(launch.config.get("pdl", False))
    # x_dense: the kernel reads x as given, 4-byte loads (no copy; `plan` turns it off for an odd storage offset);
    # else x in the B order (sp2 too): 16-byte loads, a copy per call or per workspace x (T x K x 2 bytes)
    x_dense = bool(launch.config.get("x_dense", False))
    const = _spmma_constexprs(k, group_size, num_groups, x.dtype, launch.block_m, launch.block_n, launch.num_warps,
                              splits, int(launch.config.get("prefetch", True)), bits, pdl, x_dense)
    xs = x if x_dense else workspace.sp_x(x) if workspace is not None else spmma_layout.sp4_x(x)
    kernel = sbmm_spmma2._sbmm_spmma2_kernel if sp2 else sbmm_spmma._sbmm_spmma_kernel
    kernel[grid](
        xs.view(torch.int32), y, xs.stride(0) // 2, y.stride(0), qweight, meta, scales,
        qweight.stride(0), meta.stride(0), scales.stride(0), scales.stride(1),
        seg_starts, seg_slots, seg_slots.shape[0], qweight.shape[0], ws, counters, t * n, n,
        MAX_SEGS=launch.max_segs, num_warps=launch.num_warps, launch_pdl=pdl, **const)
