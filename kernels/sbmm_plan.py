"""What an sbmm call launches, decided before anything runs: the kernel, its tuned config, tiles and K split.

Tuned configs live in kernels/sbmm_configs.json, keyed by torch.cuda.get_device_name() ("default" otherwise; a
device whose entry is another device's name shares that device's tables, e.g. the H200 the H100's),
chosen by the mean rows per segment (T / S: no device sync) and, where an entry says so, the output width N and
the launch's program count; bench/sbmm.py --sweep produced them (the sparse-MMA kernels have their own tables,
"spmma" and "spmma2"). `plan` reads no tensor data, so warm-ups (kernels/sbmm_warmup.py) and CUDA-graph keys
(`rows_bucket`, `compile_key`) name exactly what kernels/sbmm.py launches.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from kernels import layout, spmma_layout

try:  # Gluon ships with Triton >= 3.5; without it every launch takes the portable kernel
    from kernels import sbmm_gluon, sbmm_spmma
except ImportError:  # pragma: no cover - depends on the installed triton
    sbmm_gluon = sbmm_spmma = None

CONFIG_FILE = Path(__file__).with_name("sbmm_configs.json")
DENSE2_GEOMETRY_BITS = 4  # dense2 words hold 16 dense columns, like 4-bit 2:4 words: same tiles and layouts
KERNELS = ("gluon", "triton")
CONFIG_TABLES = ("gluon", "triton", "spmma", "spmma2")  # a device's launch-config lists (beside `dense_rows`)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (CPU tests): no inline PTX, fp32 dots."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (asked once: split choices run in every eager layer)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _configs() -> dict:
    return resolve_aliases(json.loads(CONFIG_FILE.read_text()), CONFIG_FILE)


def resolve_aliases(table: dict, source: object = "config table") -> dict:
    """The table with every alias (a device whose entry is another device's name, e.g. "NVIDIA H200": "NVIDIA H100
    80GB HBM3": measured to pick as well there) replaced by the tables it names; an alias of an alias or of a
    missing device is a ValueError naming `source`."""
    out = {}
    for name, entry in table.items():
        if isinstance(entry, str):
            if not isinstance(table.get(entry), dict):
                raise ValueError(f"{source}: {name!r} names {entry!r}, which is not a device with its own tables")
            entry = table[entry]
        out[name] = entry
    return out


def pick_config(kernel: str, device_name: str, rows_per_segment: float, bits: int | str | None = None,
                n: int | None = None, segments: int | None = None, table: dict | None = None) -> dict:
    """Tuned launch config: the first entry whose max_rows (null: any) covers the mean rows per segment, whose
    optional `bits` list holds the launch's code width (2, 4, or "dense2" for dense2 words), whose optional
    `min_n` the output width `n` reaches, and whose optional `min_programs` (`max_programs`) the launch's (n-block,
    tile) programs before any K split reach (do not pass) with the entry's own tiles: ceil(n / BLOCK_N) x segments
    x ceil(rows / BLOCK_M) (an entry with min_n or a program bound never matches when n or segments is not
    given). Tables: "gluon", "triton", and the sparse-MMA kernels' own "spmma" (sp4 words) and "spmma2" (sp2
    words), whose entries may also set `x_dense`, `pdl` and `expand` (kernels/sbmm_spmma.py). table: another table of
    kernels/sbmm_configs.json's form instead of it (benchmarks time an older table against it)."""
    table = resolve_aliases(table) if table is not None else _configs()
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


def tuned_for(device: torch.device) -> bool:
    """Whether kernels/sbmm_configs.json has tables for this CUDA device (its own or an alias); False: its launches
    take "default" (the worker logs that at start)."""
    return device.type == "cuda" and _device_name(device) in _configs()


# The worker's override of the tables' `dense_rows` (--dense-rows): None = the table's; 0 = never; N = from N rows at
# every code width
DENSE_ROWS_OVERRIDE: int | None = None


def dense_rows(device: torch.device, bits: int) -> int | None:
    """Rows per segment from which a segment of sp4 (bits 4) / sp2 (bits 2) words runs as dense Δ + cuBLAS
    (kernels/delta_linear.py) instead of SBMM: the `dense_rows` entry of the device's table ("default" where it has
    none) for the code width, or `DENSE_ROWS_OVERRIDE` where set; None: never."""
    if DENSE_ROWS_OVERRIDE is not None:
        return DENSE_ROWS_OVERRIDE or None
    table = _configs()
    entry = table.get(_device_name(device), {}).get("dense_rows", table["default"].get("dense_rows", {}))
    return entry.get(str(bits))


def _programs(entry: dict, n: int, segments: int, rows_per_segment: float) -> int:
    """(n-block, tile) programs of a launch with this entry's tiles, before any K split."""
    return cdiv(n, entry["BLOCK_N"]) * segments * max(1, math.ceil(rows_per_segment / entry["BLOCK_M"]))


def rows_bucket(device: torch.device, rows: float) -> int:
    """A row count that picks the same launch configs as `rows` on this device (the smallest max_rows bound of
    its config tables that covers `rows`, else one past the largest): callers that capture a launch per config,
    like the worker's CUDA graphs, key and hint by it."""
    table, name = _configs(), _device_name(device)
    kernels = (set(table["default"]) | set(table.get(name, {}))) & set(CONFIG_TABLES)
    entries = [e for kernel in kernels for e in (table.get(name, {}).get(kernel) or table["default"][kernel])]
    limits = sorted({e["max_rows"] for e in entries if e["max_rows"] is not None})
    return next((m for m in limits if rows <= m), limits[-1] + 1 if limits else 1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints (triton.cdiv is a constexpr function: ~5 µs a call from host code)."""
    return -(-a // b)


def _device_name(device: torch.device) -> str:
    return _cuda_facts(device.index)[0] if device.type == "cuda" else "cpu"


def capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (read once per device: every eager launch asks)."""
    return _cuda_facts(device.index)[1]


def _cuda_facts(index: int | None) -> tuple[str, tuple[int, int]]:
    return _cuda_facts_of(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def _cuda_facts_of(index: int) -> tuple[str, tuple[int, int]]:
    """(name, compute capability) of CUDA device `index`: fixed for the life of the process."""
    return torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)


def gluon_supported(x: torch.Tensor, k: int, bits: int, group_size: int, num_groups: int) -> bool:
    """Whether kernels/sbmm_gluon.py takes this launch (CUDA sm_80+, K a multiple of its K tile)."""
    if sbmm_gluon is None or interpreting() or not x.is_cuda:
        return False
    if capability(x.device) < (8, 0):
        return False
    block_k = sbmm_gluon.WORDS_PER_TILE * 64 // bits
    dpw = 64 // bits
    return k % block_k == 0 and (num_groups == 1 or group_size % dpw == 0)


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
    max_segs = max(MIN_MAX_SEGS, 1 << max(num_segments - 1, 0).bit_length())  # the segment search's bound: a power of 2
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
    ctas = cdiv(n, config["BLOCK_N"]) * max(num_segments, t // config["BLOCK_M"])
    split = 1
    while split < MAX_SPLIT_K and ctas * split < min_ctas and 2 * split <= steps:
        split *= 2
    while split > 1 and (split - 1) * cdiv(steps, split) >= steps:
        split -= 1
    return split


def spmma_device_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether kernels/sbmm_spmma.py runs on `device` with `dtype` activations (CUDA sm_80+, fp16/bf16): what
    the worker's CUDA slots check before storing 4-bit deltas in the sp4 order."""
    if sbmm_spmma is None or interpreting() or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return capability(device) >= (8, 0)


def pdl_ok(device: torch.device) -> bool:
    """Whether a sparse-MMA launch on `device` may take the `pdl` config key (griddepcontrol: sm_90+)."""
    return device.type == "cuda" and capability(device) >= (9, 0)


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
