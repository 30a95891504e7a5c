"""How fast can a program read packed words in the SBMM kernel's access pattern, with no compute? (GPU)

  python bench/sbmm_pattern.py --out DIR [--commit SHA]

The decode SBMM stays at 0.45-0.64 of the copy limit after fewer instructions, lower register use, an L2
prefetch and a cp.async ring each failed to move it (docs/kernels.md, run 6). This isolates the memory side:
a Triton kernel with the Gluon kernel's grid (one program per 64-row block x delta, optional K split) reads
every packed word of the deltas and folds them with xor, nothing else, in two word orders:
  - rows:  the canonical / dense2 order, [slot, N, K/16] int32: a program's K tile is 64 rows x 32 bytes at
           a row stride of K/16 words (what the kernel reads today);
  - tiles: the same words stored tile-contiguous, [slot, N/64, K/128, 64, 8]: one K tile is one 2 KB block.
Both read the same bytes; the fraction of the device-to-device copy limit of each says whether the word order
(DRAM access pattern) caps the kernel. Writes DIR/sbmm-pattern-<device>-<date>.json.
"""

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm import copy_limits_gbps, graph_us, rotations  # noqa: E402

BLOCK_N, NW = 64, 8  # the Gluon decode config: 64 rows per program, 8 words (128 dense columns) per K tile


@triton.jit
def _read_words(w_ptr, out_ptr, slots_ptr, stride_s, stride_n, num_tiles, TILED: tl.constexpr,
                STEPS: tl.constexpr, BLOCK_N: tl.constexpr, NW: tl.constexpr):
    """xor of every word one (row block, delta, K split) program of the SBMM grid would read."""
    nb, seg, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slots_ptr + seg).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)[:, None]
    cols = tl.arange(0, NW)[None, :]
    acc = tl.zeros([BLOCK_N, NW], dtype=tl.int32)
    for i in range(STEPS):
        step = split * STEPS + i
        if TILED:  # [slot, N/64, K/128, 64, 8]: the tile is one contiguous 2 KB block
            ptrs = w_ptr + slot * stride_s + ((nb * num_tiles + step) * BLOCK_N + rows) * NW + cols
        else:  # [slot, N, K/16]: 64 rows x 8 words at a row stride of K/16 words
            ptrs = w_ptr + slot * stride_s + (nb * BLOCK_N + rows) * stride_n + step * NW + cols
        acc ^= tl.load(ptrs)
    tl.store(out_ptr + (nb * tl.num_programs(1) + seg) * tl.num_programs(2) + split, tl.reduce(acc, None, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def one(n: int, k: int, num: int, splits: int, tiled: bool, words: torch.Tensor, limit: float) -> dict:
    """Time the read of `num` distinct deltas' words (rotating slots, graph of back-to-back calls)."""
    num_tiles = k // (16 * NW)
    steps = num_tiles // splits
    out = torch.empty(n // BLOCK_N * num * splits, dtype=torch.int32, device="cuda")
    slot_sets = [torch.arange(o, o + num, device="cuda") for o in rotations(num, words.shape[0])]
    grid = (n // BLOCK_N, num, splits)

    def call(slots):
        return lambda: _read_words[grid](words, out, slots, words.stride(0), k // 16, num_tiles, TILED=tiled,
                                         STEPS=steps, BLOCK_N=BLOCK_N, NW=NW, num_warps=2)

    us = graph_us([call(s) for s in slot_sets])
    nbytes = num * n * k // 16 * 4
    return {"n": n, "k": k, "num_deltas": num, "splits": splits, "order": "tiles" if tiled else "rows", "us": us,
            "bytes_read": nbytes, "gbps": nbytes / (us * 1e-6) / 1e9,
            "fraction_of_limit": nbytes / (us * 1e-6) / 1e9 / limit}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = p.parse_args()
    device = torch.cuda.get_device_name()
    limit = max(copy_limits_gbps().values())
    rows = []
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        words = torch.randint(-2**31, 2**31 - 1, (64, n, k // 16), dtype=torch.int32, device="cuda")
        for num, splits in ((8, 1), (8, 2), (16, 1), (32, 1), (64, 1)):
            for tiled in (False, True):
                r = one(n, k, num, splits, tiled, words, limit)
                rows.append(r)
                print(f"N={n:5d} K={k:5d} deltas={num:2d} split={splits} {r['order']:5s} {r['us']:8.1f} us "
                      f"{r['gbps']:6.0f} GB/s {r['fraction_of_limit']:.2f}", flush=True)
        del words
        torch.cuda.empty_cache()
    date = datetime.date.today().isoformat()
    path = Path(a.out) / f"sbmm-pattern-{device.replace(' ', '-')}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": "sbmm_pattern", "device": device, "commit": a.commit, "date": date,
                                "copy_limit_gbps": limit, "block_n": BLOCK_N, "words_per_tile": NW,
                                "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
