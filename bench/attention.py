"""Decode attention benchmark (GPU): the paged decode kernel against the gather + SDPA path it replaced.

  python bench/attention.py [--out bench/results] [--label L] [--quick]

Per point (sequences S, context length, Llama-2-7B heads: 32 query / 32 K/V heads of 128, fp16, 16-token pages
shuffled over the cache), in one run:
- `kernel_us`: kernels/paged_attention.py per layer, for each (BLOCK_N, heads per program, warps, split target)
  config tried (`configs`, with the context splits `split_count` gave), and the best one;
- `gather_sdpa_us`: deltazip/model/attention.py with the kernel off, as a decode CUDA graph ran it before: K/V
  pages gathered into a padded batch of the graph's context bucket (a power of two times the page size), then
  SDPA with a mask; its index tensors made once per forward (not counted, as in a 16-layer step);
- `speedup` = gather_sdpa_us / kernel_us (best config).
Every time is the mean per call of 16 calls, one per layer's own cache (so L2 does not hold them), captured in one
CUDA graph, median of 7 replays.
Physical limit: a decode attention reads each sequence's K and V once (`bytes` = S x context x 2 x 32 x 128 x 2 B,
plus q and the output); `hbm_fraction` = bytes / kernel time / the device-to-device copy rate measured in the same
run (bytes read + written per second).
--mixed: serving-like steps with prefill chunks instead (`MIXED_POINTS`: running decode rows beside new prompts),
the varlen kernel (kernels/paged_attention.py `paged_varlen_attention`) against the same gather + SDPA path, which
pads every sequence's rows to the longest prompt; `bytes` is then the K/V each sequence's new rows must read once
(their floor), and `tflops` the causal attention's useful math at the kernel's time.
--quick: three points, two configs (a smoke run; CUDA only).
Writes OUT/attention-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_io import device_name, git_commit, write_results  # noqa: E402
from bench.sbmm import copy_limits_gbps, graph_us  # noqa: E402
from deltazip.model import attention  # noqa: E402
from deltazip.model.context import AttentionMetadata  # noqa: E402
from kernels import paged_attention  # noqa: E402

HEADS, KV_HEADS, DIM, PAGE = 32, 32, 128, 16
LAYERS = 16
DEVICE, DTYPE = "cuda", torch.float16  # the CPU smoke test (tests/unit/bench/test_attention_bench.py) swaps them
# (BLOCK_N, heads per program, warps, TARGET_PROGRAMS_PER_SM): the context splits' target too, since at 32-64
# sequences (no splits at 4 programs per SM) the kernel read 0.50-0.62 of the copy rate (s22b). s22b also tried 4 / 8
# heads per program: slower everywhere for 32 / 32 heads.
CONFIGS = [(32, 1, 4, 4), (64, 1, 4, 4), (128, 1, 8, 4), (64, 1, 4, 8), (64, 1, 4, 16), (32, 1, 4, 16), (32, 2, 4, 4)]
POINTS = [(s, c) for s in (1, 8, 32, 64) for c in (192, 1024, 2048)]
# (running decode rows at context 192, new prompts, prompt length): the serving benchmark's mixed steps and longer ones
MIXED_POINTS = [(16, 1, 128), (16, 4, 128), (32, 4, 192), (32, 8, 128), (0, 1, 1024), (16, 1, 2048)]


def layer_caches(num_seqs: int, ctx: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LAYERS (k_cache, v_cache) pairs, one block table for all, context lengths, q."""
    pages = -(-ctx // PAGE)
    num_blocks = num_seqs * pages + 1
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    caches = [(torch.randn(num_blocks, PAGE, KV_HEADS, DIM, device=DEVICE, dtype=DTYPE, generator=g),
               torch.randn(num_blocks, PAGE, KV_HEADS, DIM, device=DEVICE, dtype=DTYPE, generator=g))
              for _ in range(LAYERS)]
    order = torch.randperm(num_seqs * pages, device=DEVICE, generator=g)
    tables = order.view(num_seqs, pages)
    lens = torch.full((num_seqs,), ctx, dtype=torch.long, device=DEVICE)
    q = torch.randn(num_seqs, HEADS, DIM, device=DEVICE, dtype=DTYPE, generator=g)
    return caches, tables, lens, q


def bucket(ctx: int) -> int:
    b = PAGE
    while b < ctx:
        b *= 2
    return b


def one_point(num_seqs: int, ctx: int, limit_gbps: float, configs: list) -> dict:
    caches, tables, lens, q = layer_caches(num_seqs, ctx, seed=num_seqs * 7919 + ctx)
    scale = DIM ** -0.5
    row: dict = {"num_seqs": num_seqs, "context": ctx, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM,
                 "page": PAGE, "configs": []}
    pa = paged_attention
    was = pa.BLOCK_N, pa.HEADS_PER_PROGRAM, pa.NUM_WARPS, pa.TARGET_PROGRAMS_PER_SM
    try:
        for block_n, heads, warps, target in configs:
            pa.BLOCK_N, pa.HEADS_PER_PROGRAM, pa.NUM_WARPS, pa.TARGET_PROGRAMS_PER_SM = block_n, heads, warps, target
            us = graph_us([lambda k=k, v=v: pa.paged_decode_attention(q, k, v, tables, lens, scale, max_context_len=ctx)
                           for k, v in caches])
            splits = pa.split_count(num_seqs, num_seqs * HEADS // heads, ctx, q.device)
            row["configs"].append({"block_n": block_n, "heads_per_program": heads, "warps": warps,
                                   "target_programs_per_sm": target, "splits": splits, "us": us})
    finally:
        pa.BLOCK_N, pa.HEADS_PER_PROGRAM, pa.NUM_WARPS, pa.TARGET_PROGRAMS_PER_SM = was
    best = min(row["configs"], key=lambda c: c["us"])
    # the replaced path, as the decode graphs ran it: bucket-padded gather, SDPA with a mask
    padded = torch.full((num_seqs, bucket(ctx) // PAGE), 0, dtype=torch.long, device=DEVICE)
    padded[:, :tables.shape[1]] = tables
    meta = AttentionMetadata(positions=lens - 1, slot_mapping=torch.zeros_like(lens), block_tables=padded,
                             context_lens=lens, query_start_loc=torch.arange(num_seqs + 1, device=DEVICE),
                             max_query_len=1, max_context_len=bucket(ctx))
    flag = attention.DECODE_KERNEL
    attention.DECODE_KERNEL = False
    try:
        base_us = graph_us([lambda k=k, v=v: attention.paged_attention(q, k, v, meta, scale) for k, v in caches])
    finally:
        attention.DECODE_KERNEL = flag
    elem = q.element_size()
    nbytes = num_seqs * ctx * 2 * KV_HEADS * DIM * elem + 2 * q.numel() * elem
    row.update({"best": {k: best[k] for k in ("block_n", "heads_per_program", "warps", "target_programs_per_sm",
                                              "splits")},
                "kernel_us": best["us"],
                "gather_sdpa_us": base_us, "speedup": base_us / best["us"], "bytes": nbytes,
                "kernel_gbps": nbytes / (best["us"] * 1e-6) / 1e9,
                "hbm_fraction": nbytes / (best["us"] * 1e-6) / 1e9 / limit_gbps})
    return row


def mixed_point(num_decode: int, num_prompts: int, prompt_len: int, limit_gbps: float) -> dict:
    """One mixed step per layer (LAYERS caches rotated in one graph): varlen kernel against gather + SDPA."""
    q_lens = [1] * num_decode + [prompt_len] * num_prompts
    ctx = [192] * num_decode + [prompt_len] * num_prompts
    num_seqs, widest = len(q_lens), max(ctx)
    caches, tables, _, _ = layer_caches(num_seqs, widest, seed=num_decode * 31 + num_prompts * 7 + prompt_len)
    lens = torch.tensor(ctx, device=DEVICE)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=DEVICE)
    q = torch.randn(sum(q_lens), HEADS, DIM, device=DEVICE, dtype=DTYPE)
    scale = DIM ** -0.5
    kernel_us = graph_us([lambda k=k, v=v: paged_attention.paged_varlen_attention(q, k, v, tables, lens, qsl, scale,
                                                                                  max(q_lens))
                          for k, v in caches])
    positions = torch.tensor([c - n + j for n, c in zip(q_lens, ctx) for j in range(n)], device=DEVICE)
    meta = AttentionMetadata(positions=positions, slot_mapping=torch.zeros_like(positions), block_tables=tables,
                             context_lens=lens, query_start_loc=qsl, max_query_len=max(q_lens),
                             max_context_len=widest)
    flags = attention.DECODE_KERNEL, attention.PREFILL_KERNEL
    attention.DECODE_KERNEL, attention.PREFILL_KERNEL = False, False
    try:
        base_us = graph_us([lambda k=k, v=v: attention.paged_attention(q, k, v, meta, scale) for k, v in caches])
    finally:
        attention.DECODE_KERNEL, attention.PREFILL_KERNEL = flags
    elem = q.element_size()
    nbytes = sum(ctx) * 2 * KV_HEADS * DIM * elem + 2 * q.numel() * elem
    # useful math: each new token against the keys it sees (causal), two matmuls
    flops = sum(4 * HEADS * DIM * sum(c - n + j + 1 for j in range(n)) for n, c in zip(q_lens, ctx))
    return {"num_decode": num_decode, "num_prompts": num_prompts, "prompt_len": prompt_len, "decode_context": 192,
            "kernel_us": kernel_us, "gather_sdpa_us": base_us, "speedup": base_us / kernel_us, "bytes": nbytes,
            "hbm_fraction": nbytes / (kernel_us * 1e-6) / 1e9 / limit_gbps, "tflops": flops / (kernel_us * 1e-6) / 1e12,
            "block_m": paged_attention.PREFILL_BLOCK_M, "block_n": paged_attention.PREFILL_BLOCK_N,
            "warps": paged_attention.PREFILL_NUM_WARPS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--label", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mixed", action="store_true", help="steps with prefill chunks: the varlen kernel")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py needs CUDA (the kernel's CPU tests are tests/kernels/test_paged_attention.py)")
        return 2
    torch.set_grad_enabled(False)
    points, configs = (([(1, 192), (32, 192), (32, 2048)], CONFIGS[:2]) if args.quick else (POINTS, CONFIGS))
    limits = copy_limits_gbps()
    limit = max(limits.values())
    name = device_name("cuda")
    print(f"{name}: device-to-device copy {limits} GB/s", flush=True)
    rows = []
    if args.mixed:
        mixed = MIXED_POINTS[:2] if args.quick else MIXED_POINTS
        for i, point in enumerate(mixed):
            rows.append(mixed_point(*point, limit))
            r = rows[-1]
            print(f"[{i + 1}/{len(mixed)}] decode {point[0]:2d} + {point[1]} x {point[2]:4d}: kernel "
                  f"{r['kernel_us']:8.1f} us ({r['tflops']:.0f} TFLOP/s)  gather+SDPA {r['gather_sdpa_us']:8.1f} us"
                  f"  -> {r['speedup']:.2f}x", flush=True)
        points = []
    for i, (s, c) in enumerate(points):
        rows.append(one_point(s, c, limit, configs))
        r = rows[-1]
        print(f"[{i + 1}/{len(points)}] S={s:3d} ctx={c:5d}: kernel {r['kernel_us']:8.1f} us "
              f"({r['best']}, {r['hbm_fraction']:.2f} of HBM)  "
              f"gather+SDPA {r['gather_sdpa_us']:8.1f} us  -> {r['speedup']:.2f}x", flush=True)
    payload = {"bench": "attention", "device": name, "commit": git_commit(), "date": datetime.date.today().isoformat(),
               "config": {"dtype": "float16", "layers_rotated": LAYERS, "copy_limit_gbps": limit,
                          "copy_gbps_by_timer": limits, "configs": configs, "quick": args.quick,
                          "mixed": args.mixed},
               "rows": rows}
    path = write_results(Path(args.out), "attention-mixed" if args.mixed else "attention", args.label or name, payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
