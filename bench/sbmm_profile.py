"""One SBMM launch per case, for Nsight Compute (GPU): the decode points the issue's goal is about.

  ncu --clock-control none -k regex:sbmm --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section Occupancy --section WarpStateStats --section LaunchStats python3 bench/sbmm_profile.py \
      [--variants 4sp,2sp] [--cases qkvo:8:16,...] [--configs '[{...}, ...]']

Each case warms up (compiles) first, then launches once more; profile the second launch of each case
(`--launch-skip`/`--launch-count`, or read the report's last entry per case). Default cases: qkvo 4096x4096 with
8 deltas x 4 rows, 32 deltas x 1 row and 8 deltas x 16 rows, in the worker's CUDA layouts (sp4, sp2), with the
tuned configs; --configs runs every case once per config instead (the wrapper's kernel for the layout).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sbmm import SHAPES  # noqa: E402
from bench.sbmm_stacks import VARIANTS, layout_name, variant_stack  # noqa: E402
from kernels import sbmm  # noqa: E402

CASES = "qkvo:8:4,qkvo:32:1,qkvo:8:16"


def launch_once(n: int, k: int, num: int, rows: int, variant: str, config: dict | None) -> None:
    bits = VARIANTS[variant][0]
    stack = variant_stack(variant, num, n, k, "cuda")
    t = num * rows
    x = torch.randn(t, k, device="cuda", dtype=torch.float16)
    y = torch.randn(t, n, device="cuda", dtype=torch.float16)
    starts = torch.arange(num + 1, device="cuda", dtype=torch.int64) * rows
    slots = torch.arange(num, device="cuda", dtype=torch.int64)
    for _ in range(2):  # warm-up (compile), then the launch to read
        sbmm.sbmm(x, y, stack["qweight"], stack["meta"], stack["scales"], None, starts, slots, bits, config=config,
                  tiled=stack.get("tiled", False), sp4=stack.get("sp4", False), sp2=stack.get("sp2", False))
    torch.cuda.synchronize()
    launch = sbmm.plan(x, n, k, bits, stack["scales"].shape[-1], 128, False, num, config=config,
                       dense2=stack["meta"] is None, sp4=stack.get("sp4", False), sp2=stack.get("sp2", False))
    print(f"case n={n} k={k} deltas={num} rows={rows} bits={bits} layout={layout_name(stack)} "
          f"kernel={launch.kernel} config={launch.config} split={launch.splits}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="4sp,2sp", help=f"word layouts: {', '.join(VARIANTS)}")
    p.add_argument("--cases", default=CASES, help="shape:deltas:rows,... (shapes: qkvo, gate_up, down)")
    p.add_argument("--configs", default="", help="JSON list of launch configs (default: the tuned one)")
    a = p.parse_args()
    configs = json.loads(a.configs) if a.configs else [None]
    for case in a.cases.split(","):
        name, num, rows = case.split(":")
        n, k = SHAPES[name]
        for variant in a.variants.split(","):
            for config in configs:
                launch_once(n, k, int(num), int(rows), variant, config)


if __name__ == "__main__":
    main()
