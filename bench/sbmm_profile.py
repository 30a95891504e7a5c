"""One SBMM launch per case, for Nsight Compute (GPU): the decode points the issue's goal is about.

  ncu --clock-control none -k regex:sbmm --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats python3 bench/sbmm_profile.py

Each case warms up (compiles) first, then launches once more; profile the second launch of each case
(`--launch-skip`/`--launch-count`, or read the report's last entry per case). Cases: qkvo 4096x4096 with
8 deltas x 4 rows at 4 and 2 bits, 32 deltas x 1 row and 8 deltas x 16 rows at 4 bits, with the tuned configs, in the word layouts
the worker keeps on CUDA (4-bit tile-major, 2-bit dense2 words).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm_stacks import layout_name, variant_stack  # noqa: E402
from kernels import sbmm  # noqa: E402

CASES = ((4096, 4096, 8, 4, 4), (4096, 4096, 8, 4, 2), (4096, 4096, 32, 1, 4), (4096, 4096, 8, 16, 4))


def main() -> None:
    for n, k, num, rows, bits in CASES:
        stack = variant_stack("4t" if bits == 4 else "2d2", num, n, k, "cuda")
        t = num * rows
        x = torch.randn(t, k, device="cuda", dtype=torch.float16)
        y = torch.randn(t, n, device="cuda", dtype=torch.float16)
        starts = torch.arange(num + 1, device="cuda", dtype=torch.int64) * rows
        slots = torch.arange(num, device="cuda", dtype=torch.int64)
        for _ in range(2):  # warm-up (compile), then the launch to read
            sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits,
                      tiled=stack.get("tiled", False))
        torch.cuda.synchronize()
        dense2 = stack["meta"] is None
        cfg = sbmm.pick_config("gluon", torch.cuda.get_device_name(), rows, "dense2" if dense2 else bits)
        geometry = sbmm.DENSE2_GEOMETRY_BITS if dense2 else bits
        print(f"case n={n} k={k} deltas={num} rows={rows} bits={bits} layout={layout_name(stack)} config={cfg} "
              f"split={sbmm.split_k(cfg, n, k, geometry, t, num)}", flush=True)


if __name__ == "__main__":
    main()
