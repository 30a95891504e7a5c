"""How much swap mode's host merges slow the worker's engine loop, and whether the GIL is why.

A stand-in for the engine runs in one thread: each step replays one decode step's weight reads (a CUDA graph of the
block linears of `--num-layers` 7B-shaped layers on `--rows` rows), then does the host work of a step (`--host-ops`
small torch ops, ending in a copy of a result to the host, as sampling does), and its wall time is recorded.
Meanwhile another thread builds merged models one after another exactly as a swap worker's host tier does
(`services.worker.modes.merged_weights` through `DeviceMath`: base + dequantized 2-bit 2:4 delta on the GPU, copied
into pinned host memory). Per Python switch interval (`sys.setswitchinterval`; CPython's default is 5 ms) it reports
the step's median and p90 idle and while merging, and each merge's seconds. The limit it is measured against is the
idle step of the same run (ratio 1.0 = no interference). If the ratio falls towards 1 with a shorter switch
interval, the merging thread's hold on the GIL is what delays the steps; if not, the GPU or the copies are.

    python -m bench.merge_gil --num-layers 8 --switch-ms 5,0.5
Writes bench/results/merge-gil-<device>-<date>.json. `--device cpu --shape tiny` checks the pipeline without a GPU
(eager steps, merges on the CPU).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from bench.fetch_gil import stats
from bench.results_io import device_name, git_commit, write_results


def linear_shapes(shape: str, num_layers: int) -> dict[str, tuple[int, int]]:
    """HF name -> (out, in) of every block linear of the model."""
    from bench.synthetic import shape_config

    c = shape_config(shape, num_layers)
    h, i = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * (c.head_dim or h // c.num_attention_heads)
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{n}.{name}.weight": s for n in range(c.num_hidden_layers) for name, s in per_layer.items()}


def make_weights(shapes: dict, device: torch.device, bits: int, group_size: int) -> tuple[dict, dict, dict]:
    """(base weights on the device, their pinned host copies, one random 2:4 delta as load_delta returns it)."""
    from bench.synthetic import random_sparse24
    from deltazip.artifact.delta_tensor import DeltaTensor

    g = torch.Generator(device=device).manual_seed(0)
    on_device, host, delta = {}, {}, {}
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, generator=g, device=device) * 0.02).half()
        on_device[name] = w
        host[name] = w.cpu().pin_memory() if device.type == "cuda" else w.clone()
        parts = random_sparse24(n, k, bits, min(group_size, k), g, str(device))
        delta[name] = DeltaTensor(name, "sparse24", (n, k), bits=bits, group_size=min(group_size, k), sym=True,
                                  **parts)
    return on_device, host, delta


def step_fn(weights: dict, rows: int, host_ops: int, device: torch.device):
    """One engine step: the linears' reads (a CUDA graph on a GPU), then `host_ops` small ops and a host copy."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in weights.values()}
    small = torch.zeros(rows, device=device)

    def reads() -> None:
        for w in weights.values():
            inputs[w.shape[1]] @ w.T  # every weight read once, as a decode step's GEMMs do

    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            reads()  # warm-up before capture (cuBLAS workspaces)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            reads()
        replay = graph.replay
    else:
        replay = reads

    def step() -> float:
        t = time.perf_counter()
        replay()
        s = small
        for _ in range(host_ops):
            s = s + 1
        s.cpu()  # the step's tokens to the host: waits for the GPU
        return time.perf_counter() - t

    return step


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m bench.merge_gil", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="7b", choices=("tiny", "7b"))
    p.add_argument("--num-layers", type=int, default=8, help="layers of the model that is merged and read")
    p.add_argument("--rows", type=int, default=16, help="rows (running sequences) of the stand-in decode step")
    p.add_argument("--host-ops", type=int, default=200, help="small torch ops of host work per step")
    p.add_argument("--bits", type=int, default=2, choices=(2, 4))
    p.add_argument("--merges", type=int, default=2, help="merged models built back to back per measurement")
    p.add_argument("--switch-ms", default="5,0.5", help="comma list of Python switch intervals to measure")
    p.add_argument("--idle-s", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--label", default="")
    args = p.parse_args(argv)
    intervals = [float(x) for x in args.switch_ms.split(",")]
    if any(x <= 0 for x in intervals) or args.merges < 1 or args.rows < 1 or args.host_ops < 0:
        p.error("--switch-ms values must be > 0, --merges and --rows >= 1, --host-ops >= 0")
    from services.worker.modes import DeviceMath, merged_weights

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --shape tiny to check the pipeline")
    shapes = linear_shapes(args.shape, args.num_layers)
    weights, base_host, delta = make_weights(shapes, device, args.bits, 128)
    math = DeviceMath(device) if device.type == "cuda" else None
    step = step_fn(weights, args.rows, args.host_ops, device)
    merged_bytes = sum(t.numel() * t.element_size() for t in base_host.values())
    print(f"{len(shapes)} linears, {merged_bytes / 1e9:.2f} GB per merged model, device {device_name(args.device)}",
          flush=True)
    for _ in range(5):
        step()
    t = time.perf_counter()
    merged_weights(base_host, delta, math)  # warm the merge's kernels and the pinned pool (its blocks are reused)
    cold_s = time.perf_counter() - t
    print(f"first (cold) merge {cold_s:.2f} s", flush=True)
    default = sys.getswitchinterval()
    rows = []
    try:
        for ms in intervals:
            sys.setswitchinterval(ms / 1e3)
            end = time.monotonic() + args.idle_s
            idle = []
            while time.monotonic() < end:
                idle.append(step())
            idle_ms = statistics.median(idle) * 1e3
            seconds: list[float] = []

            def merge_all() -> None:
                for _ in range(args.merges):
                    t = time.perf_counter()
                    merged_weights(base_host, delta, math)
                    seconds.append(time.perf_counter() - t)

            worker = threading.Thread(target=merge_all)
            worker.start()
            busy = []
            while worker.is_alive():
                busy.append(step())
            worker.join()
            row = {"switch_ms": ms, "idle": stats(idle, idle_ms), "merging": stats(busy, idle_ms),
                   "merge_s": seconds}
            rows.append(row)
            m = row["merging"]
            print(f"switch {ms} ms: idle step {idle_ms:.2f} ms; while merging median {m['median_ms'] or 0:.2f} ms "
                  f"({m['median_over_idle'] or 0:.2f}x), p90 {m['p90_ms'] or 0:.2f} ms over {m['n']} steps; "
                  f"merges {', '.join(f'{s:.2f}' for s in seconds)} s", flush=True)
    finally:
        sys.setswitchinterval(default)
    payload = {"bench": "merge_gil", "device": device_name(args.device), "commit": git_commit(),
               "date": datetime.date.today().isoformat(), "shape": args.shape, "num_layers": args.num_layers,
               "rows_per_step": args.rows, "host_ops": args.host_ops, "bits": args.bits,
               "merged_model_bytes": merged_bytes, "cold_merge_s": cold_s, "limit": "the idle step of the same run",
               "rows": rows}
    path = write_results(args.out, "merge-gil", args.label or device_name(args.device), payload)
    print(f"wrote {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
