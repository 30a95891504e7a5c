"""Host time of one eager SBMM call, and where it goes (device; the worker's prefill steps are host-bound).

Eager launches (prefill, and any step the worker does not capture) pay the Python side of every call:
`apply_deltas` checks, `sbmm.plan` (tuned-table pick and K split), the constexpr dictionary, and Triton's
launcher (argument binding and the specialization key) before the driver call. This times N calls of a shape
small enough that the GPU never holds the host back, per layer of the call stack (with one small torch kernel
for scale), with and without `sbmm.LaunchCache` (`sbmm.FAST_LAUNCH`) and its plan memo (`sbmm.PLAN_MEMO`), and profiles the full calls (cache on)
with cProfile. Prints and writes JSON: bench/results/sbmm-host-<gpu>-<date>[-label].json.

  python bench/sbmm_host.py [--calls 2000] [--label x]
"""

import argparse
import cProfile
import datetime
import io
import json
import pstats
import time
from pathlib import Path

import torch

from kernels import sbmm
from kernels.delta_linear import PackedDeltaStack, apply_deltas


def per_call_us(fn, calls: int) -> float:
    """Mean host µs per call of fn over `calls` calls (after 20 warm-up calls), GPU synchronized at both ends."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * host / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rows", type=int, default=64, help="rows per segment")
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--bits", type=int, default=4, choices=(2, 4))
    p.add_argument("--out", default="bench/results")
    p.add_argument("--label", default="")
    p.add_argument("--commit", default="unknown")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    dev = torch.device("cuda")
    sp4, sp2 = a.bits == 4, a.bits == 2
    stack = PackedDeltaStack.empty(a.segments, (a.n, a.k), a.bits, 128, True, dev, sp4=sp4, sp2=sp2)
    t = a.rows * a.segments
    x = torch.randn(t, a.k, dtype=torch.float16, device=dev)
    y = torch.zeros(t, a.n, dtype=torch.float16, device=dev)
    starts = torch.arange(0, t + 1, a.rows, dtype=torch.int64)
    slots = torch.arange(a.segments, dtype=torch.int64)
    starts_d, slots_d = starts.to(dev), slots.to(dev)
    ws = sbmm.Workspace(dev)

    def full():  # what the worker's DeltaOps calls per linear (segments already on the device)
        apply_deltas(x, y, stack, starts_d, slots_d, check=False, workspace=ws)

    def direct():
        sbmm.sbmm(x, y, stack.qweight, stack.meta, stack.scales, None, starts_d, slots_d, a.bits, sp4=sp4, sp2=sp2,
                  workspace=ws)

    def plan_only():
        sbmm.plan(x, a.n, a.k, a.bits, stack.scales.shape[-1], 128, False, a.segments, sp4=sp4, sp2=sp2)

    rows = {}
    # sbmm.FAST_LAUNCH: Triton's JITFunction.run per call, or sbmm.LaunchCache; sbmm.PLAN_MEMO: repeats skip the
    # checks, the plan and the argument specialization
    for fast, memo, tag in ((False, False, "JITFunction.run"), (True, False, "launch cache"),
                            (True, True, "launch cache + plan memo")):
        sbmm.FAST_LAUNCH, sbmm.PLAN_MEMO = fast, memo
        rows[f"apply_deltas ({tag})"] = per_call_us(full, a.calls)
        rows[f"sbmm.sbmm ({tag})"] = per_call_us(direct, a.calls)
    rows["sbmm.plan"] = per_call_us(plan_only, a.calls)
    empty = torch.empty(0, device=dev)
    rows["torch.add (one small kernel, for scale)"] = per_call_us(lambda: torch.add(empty, 1), a.calls)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.calls):
        full()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    for name, us in rows.items():
        print(f"{name:45s} {us:8.1f} us per call", flush=True)
    print(buf.getvalue())
    device = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    path = Path(a.out) / f"sbmm-host-{device.replace(' ', '-')}-{date}{'-' + a.label if a.label else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": "sbmm_host", "device": device, "commit": a.commit, "date": date,
                                "config": vars(a), "host_us_per_call": rows,
                                "cprofile_tottime_top30": buf.getvalue()}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
