"""Worker benchmark (GPU): delta load rate, decode step time with many deltas, tokens/s per serving mode.

  python bench/worker.py --out bench/results [--commit SHA] [--parts load,step,step-profile,prefill,prefill-deltas,prefill-host,row-bucket-ab,plan-memo-ab,host-path-ab,long-prefill-ab,prefill-route-ab,fused-ab,attn-cache-ab,rms-norm-ab,decode-attn-ab,rope-kv-ab,prefill-attn-ab,sp2-prefill-ab,modes] [--tiny]

Rows (DESIGN.md names), all measured in the same run:
- part=h2d_limit: pinned host→device copy rate of one large buffer (the physical limit of a delta load).
- part=load: a 7B-shaped (Llama-2-7B linears) 2-bit 2:4 delta, then a 4-bit one, from pinned host into a device
  slot via DeviceSlots.write (separate CUDA stream; on CUDA the 2-bit words are re-encoded to dense2, or re-ordered
  to sp2 (dense2 with --no-sp2), and the 4-bit words and meta re-ordered on the way in: sp4 where the sparse-MMA
  kernel takes them, else tile-major, kernels/layout.py); `bits`, `ms`, `bytes`, `bytes_per_s`,
  `h2d_fraction` = rate / h2d_limit (each load has its own h2d_limit row, for its size).
  Goals: h2d_fraction >= 0.8 and ms <= 40. Physical limit: the 2-bit 2:4 delta is ~1.7 GB (qweight 2 bit +
  meta 1 bit per weight, scales), so at ~53 GB/s pinned H2D the floor is ~32 ms; 40 ms needs >= 80%.
- part=step: one engine decode step (32 sequences, ctx ~128) on a 7B-shaped fp16 model with random weights,
  rows split evenly over `num_deltas` in {0 (base only), 1, 8, 32} deltas; `us` and `step_vs_base`
  (= step time / base-only eager step time). Goal: step_vs_base <= 1.3 at 8 deltas. base-only with CUDA
  graphs is one more row (graph=1). Limit: a decode step reads the base weights once (~13.5 GB at
  ~3 TB/s = ~4.5 ms) plus each delta's packed bytes (~1.7 GB each at 2 bits), so 8 distinct deltas read
  2x the base's bytes: ~1.3x needs the delta kernel near the HBM limit.
- part=step-profile: where a CUDA-graph decode step's time goes, base only and with 16 deltas: median wall time
  per engine step, kernel time per step under torch.profiler and the top kernels (tables to --profile-dir).
- part=prefill: the mean time of a serving-like prefill step (1-4 new prompts of fresh lengths mixed into 16
  decoding sequences; a decode step between) with PyTorch's own SDPA backend choice (`sdpa=torch_default`) and
  with the paged path's backend list (`paged_backends`, no cuDNN attention: it plans per shape), same run;
  `vs_torch_default` is the ratio. `--step-layers` cuts the depth here too. Limit: ~500 new tokens through a
  4-layer 7B shape are ~1 ms of H100 math; the serving profile measured ~95 ms per such step.
- part=fused-ab: fused projections (one base GEMM and one SBMM launch per q/k/v and gate/up group, the worker's
  default) against separate ones, same weights and deltas, alternating in one process (`--fused-rounds`): decode
  steps as CUDA graphs (`us`, N in {0, 1, 8, 16}) and eager fresh-shape prefill steps (`ms`, N in {0, 1, 4}).
  Limit: the same bytes either way; fusing removes launches (their ramp, tail and host time), not bytes.
- part=attn-cache-ab: paged attention's per-step index tensors made once per forward (default) against once per
  layer, alternating in one process: graph decode steps (N in {0, 8}) and eager base prefill steps; `on` says
  which arm. part=rms-norm-ab: the same for torch's fused rms_norm against the op-by-op norm; part=decode-attn-ab
  for decode attention read from the paged cache (kernels/paged_attention.py) against gather + SDPA; part rope-kv-ab
  for the q/k rotation and KV-cache write in one launch (kernels/rope_kv.py) against op by op; part prefill-attn-ab
  for prefill steps' attention by the varlen paged kernel against gather + SDPA. part=sp2-prefill-ab: prefill steps
  on 2-bit deltas with segments of --sp2-prefill-rows+ rows on kernels/sp2_wgmma.py (Hopper, fp16) against SBMM
  for all.
- part=prefill-host: where a delta prefill step's host time goes (cProfile of part=prefill-deltas' steps on the
  fused model, N in {0, 4, 16}): host ms against the time waited for the GPU, per layer of a delta linear.
- part=row-bucket-ab: those prefill steps with each step's token count rounded up to a bucket (the worker's
  default; cuBLAS plans each new GEMM shape on the host) against each on its own count, new prompt lengths for
  every measurement, alternating in one process; part=plan-memo-ab the same for the SBMM calls' plan memo
  (kernels/sbmm.py PLAN_MEMO), part=host-path-ab for the delta linears' stack groups (delta_ops.FAST_GROUPS;
  session 31 ran it with a second flag since removed).
- part=long-prefill-ab: one prompt of 256-2040 tokens prefilled alone (what its time to first token waits for), on
  a delta and on the base model, with the dense route for long delta segments (kernels/delta_linear.py, from
  `sbmm.dense_rows` rows) against SBMM for all segments, alternating in one process; `vs_base` is the ratio to
  the base model's prefill of the same length. Limit: the dense route adds one expansion of the delta (its fp16
  bytes written at the copy rate) and one GEMM of the base GEMM's size to the base prefill.
- part=prefill-route-ab: serving-like prefill steps (2-8 prompts of 64-256 tokens on 8 deltas drawn Zipf 1.5, at
  most 4 a batch, beside 16 decoding sequences; the same steps for every arm) under each arm's routing of delta
  segments (--route-arms: the sp2 prefill kernels' thresholds, the dense route's rows, a merged-weight cache),
  alternating in one process;
  `vs_base` against the base model's steps of the same round. Limits: SBMM and the prefill kernels against the
  mma.sp rate (bench/mma_peak.py); the merged route costs one expansion of W + Δ (W's fp16 bytes read and written
  at the copy rate) per merged segment and linear, in place of that segment's SBMM launch.
- part=modes: tokens/s of one engine under a mixed 16-model load (Zipf popularity, all requests queued at
  once) in each mode on a 1.1B-shaped model: `mode`, `num_models`, `tokens_per_s`, `throughput_vs_swap`.
--tiny: the same code on a tiny model (CPU works), to smoke-test the script; its numbers mean nothing.
Writes OUT/worker-<device>-<date>.json as {bench, device, commit, date, config, rows}.
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltazip.artifact.delta_tensor import DeltaTensor  # noqa: E402
from deltazip.model.config import LlamaConfig  # noqa: E402
from deltazip.model.llama import LlamaForCausalLM  # noqa: E402
from deltazip.model.loader import model_from_state_dict  # noqa: E402
from deltazip.model.sampling import SamplingParams  # noqa: E402
from kernels import compile_watch, spmma_layout  # noqa: E402
from services.worker.delta_ops import StepDeltaOps  # noqa: E402
from services.worker.device_slots import DeviceSlots  # noqa: E402
from services.worker.engine.engine import EngineConfig, LLMEngine  # noqa: E402

LLAMA_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
LLAMA_1B = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TINY = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
LINEAR_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, int]]:
    """HF tensor name -> (N, K) of every decoder linear."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if any(s in k for s in LINEAR_SUFFIXES) and k.endswith(".weight")}


def random_model(cfg: LlamaConfig, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights generated on the device (a 7B model in seconds, without host memory)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    state = {k: (torch.randn(s, device=device, dtype=dtype, generator=g) * 0.02) for k, s in shapes.items()}
    for k in state:
        if "norm" in k:
            state[k].fill_(1.0)
    return model_from_state_dict(cfg, state)


def random_packed_delta(shapes: dict, bits: int, group: int, device: str, pin: bool, seed: int) -> dict:
    """{name: DeltaTensor} 2:4 sparse `bits`-bit, symmetric, random codes (any int32 is valid), on host."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, (n, k) in shapes.items():
        qweight = torch.randint(-2**31, 2**31 - 1, (n, k * bits // 64), dtype=torch.int32, device=device, generator=g)
        # meta: every nibble 0b0100 = kept pair (0, 1); a valid 2:4 pattern
        meta = torch.full((n, k // 32), 0x44444444, dtype=torch.int32, device=device)
        scales = (torch.rand(n, k // group, device=device, generator=g) * 1e-3 + 1e-4).half()
        parts = {"qweight": qweight, "meta": meta, "scales": scales}
        parts = {p: (t.cpu().pin_memory() if pin else t.cpu()) for p, t in parts.items()}
        out[name] = DeltaTensor(name, "sparse24", (n, k), bits, group, True, **parts)
    return out


def filled_slots(shapes: dict, num_slots: int, device: str, bits: int, sp4: bool | None, sp2: bool,
                 fused: dict | None = None) -> DeviceSlots:
    """DeviceSlots (fp16, `fused` groups if given) with the same random packed delta in every slot: the timings do
    not depend on the values, and one delta is generated instead of num_slots."""
    slots = DeviceSlots(num_slots, device, torch.float16, set(shapes), False, sp4=sp4, sp2=sp2, fused=fused)
    one = random_packed_delta(shapes, bits, 128, device, pin=device.startswith("cuda"), seed=2)
    for s in range(num_slots):
        slots.write(s, str(s), one)
    return slots


def fused_model_and_slots(cfg: LlamaConfig, device: str, num_slots: int, bits: int, sp4: bool | None,
                          sp2: bool) -> tuple[LlamaForCausalLM, DeviceSlots]:
    """The worker's serving model (fp16 random weights, q/k/v and gate/up fused) and `filled_slots` stacked to
    match its fused groups."""
    model = random_model(cfg, device, torch.float16)
    slots = filled_slots(linear_shapes(cfg), num_slots, device, bits, sp4, sp2, model.fused_tensor_names())
    model.fuse_projections()
    return model, slots


def random_dense_delta(shapes: dict, device: str, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    return {name: DeltaTensor(name, "dense", s, delta=(torch.randn(s, device=device, generator=g) * 1e-3).half())
            for name, s in shapes.items()}


# ---- part 1: delta load rate ------------------------------------------------------------------------

def pinned_h2d_bytes_per_s(device: str, num_bytes: int) -> float:
    host = torch.empty(num_bytes, dtype=torch.uint8).pin_memory() if device.startswith("cuda") else \
        torch.empty(num_bytes, dtype=torch.uint8)
    dev = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return num_bytes / min(times)


def bench_load(cfg: LlamaConfig, device: str, rows: list, bits: int = 2, group: int = 128,
               sp4: bool | None = None, sp2: bool = False) -> None:
    shapes = linear_shapes(cfg)
    cuda = device.startswith("cuda")
    delta = random_packed_delta(shapes, bits, group, device, pin=cuda, seed=1)
    num_bytes = sum(d.nbytes for d in delta.values())
    limit = pinned_h2d_bytes_per_s(device, num_bytes)
    rows.append({"part": "h2d_limit", "bytes": num_bytes, "bytes_per_s": limit})
    slots = DeviceSlots(2, device, torch.float16, set(shapes), False, sp4=sp4, sp2=sp2)
    slots.write(1, "warm", delta)  # allocates the stacks; timed writes reuse them
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        slots.write(0, "d", delta)
        times.append(time.perf_counter() - t)
    best = min(times)
    rows.append({"part": "load", "bits": bits, "bytes": num_bytes, "ms": best * 1e3, "bytes_per_s": num_bytes / best,
                 "h2d_fraction": num_bytes / best / limit, "goal_ms": 40, "goal_h2d_fraction": 0.8})
    print(json.dumps(rows[-2:]), flush=True)


WARMUP_LIMIT_S = 600.0  # a decode engine's SBMM warm-up must finish within this before its steps are timed


def finish_warm_up(engine) -> dict:
    """Run the engine's sliced SBMM warm-up to its end, as the worker's idle loop does (LLMEngine.warm_up), so no
    timed step carries a slice of it; returns the profile snapshot the timed steps start from."""
    deadline = time.perf_counter() + WARMUP_LIMIT_S
    while engine.warm_up():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"SBMM warm-up not finished after {WARMUP_LIMIT_S} s")
    return engine.profile.snapshot()


def warmup_seconds(snapshot: dict) -> float:
    """Seconds of SBMM warm-up in a profile snapshot."""
    return snapshot.get("warmup", (0, 0.0))[1]

# ---- part 2: decode step time with many deltas -----------------------------------------------------

def decode_engine(model, max_deltas: int, slots: DeviceSlots | None, cuda_graphs: bool, max_num_seqs: int):
    def provider(segments):
        if all(name is None for name, _ in segments):
            return None
        return StepDeltaOps(slots, [(None if name is None else int(name), n) for name, n in segments])

    cfg = EngineConfig(num_kv_blocks=max_num_seqs * 16 + 8, block_size=16, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=8192, max_deltas_per_batch=max(1, max_deltas), cuda_graphs=cuda_graphs)
    return LLMEngine(model, cfg, eos_token_ids=[], deltas_provider=provider, kernel_slots=slots)


def start_decoding(engine, num_seqs: int, num_deltas: int, prompt_len: int, max_tokens: int) -> tuple[list, dict]:
    """`num_seqs` greedy requests (rows over `num_deltas` deltas, 0: base) prefilled, three decode steps taken (graph
    capture, caches) and the SBMM warm-up finished; returns (request ids, the profile snapshot after the warm-up)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(num_deltas)
    ids = [f"r{num_deltas}-{i}" for i in range(num_seqs)]
    for i, request_id in enumerate(ids):
        prompt = torch.randint(3, 200, (prompt_len,), generator=g).tolist()
        engine.add_request(request_id, prompt, params, delta=str(i % num_deltas) if num_deltas else None)
    engine.step()  # prefill all
    for _ in range(3):
        engine.step()  # warm-up decodes (graph capture, caches)
    # The runner warms SBMM variants up in 0.2 s slices inside its steps until it has launched every variant its
    # steps can launch (model_runner.WARMUP_SLICE_S); the worker's engine loop finishes that while idle
    # (LLMEngine.warm_up). Finish it here too, or the timed steps carry the rest of it: each engine here is a new
    # runner, and those slices were the 50-1270 ms outlier steps of runs 17-18 and session 15's first run.
    return ids, finish_warm_up(engine)


def time_decode_steps(engine, num_seqs: int, num_deltas: int, device: str, prompt_len: int, steps: int,
                      per_step: list | None = None, compiles: list | None = None,
                      warmup_s: list | None = None) -> float:
    """Mean seconds per decode step over `steps` timed steps; per_step: gets each step's own seconds (a step
    returns only once its sampled tokens are on the host, so the host clock around it times the step);
    compiles: gets the SBMM kernel variants compiled during each timed step (kernels/compile_watch.py);
    warmup_s: gets the seconds of SBMM warm-up inside the timed steps (0.0 once the warm-up before them finished)."""
    ids, before = start_decoding(engine, num_seqs, num_deltas, prompt_len, steps + 8)
    # earlier engines (their CUDA graphs, KV caches) are freed now, not by a garbage collection inside the timed
    # steps. That was a guess at the single 45-446 ms means (against 12-25 ms) that about one run in four shows;
    # they stayed with it (docs/kernels.md run 17), so compare step runs by their median over several processes
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        sync(device)
        t = time.perf_counter()
        marks, variants = [t], [compile_watch.compiled_variants()]
        for _ in range(steps):
            engine.step()
            marks.append(time.perf_counter())
            variants.append(compile_watch.compiled_variants())
        sync(device)
        elapsed = (time.perf_counter() - t) / steps
        if per_step is not None:
            per_step.extend(b - a for a, b in zip(marks, marks[1:]))
        if compiles is not None:
            compiles.extend(b - a for a, b in zip(variants, variants[1:]))
        if warmup_s is not None:
            warmup_s.append(warmup_seconds(engine.profile.snapshot()) - warmup_seconds(before))
    finally:
        if was_enabled:
            gc.enable()
    for request_id in ids:
        engine.abort(request_id)
    return elapsed


def bench_step(cfg: LlamaConfig, device: str, rows: list, deltas=(1, 8, 32), num_seqs: int = 32,
               prompt_len: int = 128, steps: int = 20, bits: int = 2, sp4: bool | None = None,
               sp2: bool = False) -> None:
    model = random_model(cfg, device, torch.float16)
    shapes = linear_shapes(cfg)
    num_slots = max(deltas)
    slots = filled_slots(shapes, num_slots, device, bits, sp4, sp2)
    # Untimed pass over the same step shapes first: whatever is built per new shape (attention plans, allocator
    # blocks) is then built for every config alike, not charged to the first one measured (part=prefill times it).
    time_decode_steps(decode_engine(model, num_slots, slots, False, num_seqs), num_seqs, 0, device, prompt_len, steps)
    base_us = time_decode_steps(decode_engine(model, num_slots, slots, False, num_seqs), num_seqs, 0, device,
                                prompt_len, steps) * 1e6
    rows.append({"part": "step", "num_deltas": 0, "rows_per_delta": 0, "graph": 0, "us": base_us, "step_vs_base": 1.0})
    if device.startswith("cuda"):
        us = time_decode_steps(decode_engine(model, num_slots, slots, True, num_seqs), num_seqs, 0, device,
                               prompt_len, steps) * 1e6
        rows.append({"part": "step", "num_deltas": 0, "rows_per_delta": 0, "graph": 1, "us": us,
                     "step_vs_base": us / base_us})
    print(json.dumps(rows[-1]), flush=True)
    graph_base_us = rows[-1]["us"] if device.startswith("cuda") else base_us
    for n in deltas:
        for graph in ((0, 1) if device.startswith("cuda") else (0,)):
            # untimed first: kernel variants this delta count launches are compiled or loaded from Triton's disk
            # cache (tens of ms each) here, not inside the timed steps
            time_decode_steps(decode_engine(model, num_slots, slots, bool(graph), num_seqs), num_seqs, n, device,
                              prompt_len, 2)
            per_step: list[float] = []
            compiles: list[int] = []
            warmup_s: list[float] = []
            us = time_decode_steps(decode_engine(model, num_slots, slots, bool(graph), num_seqs), num_seqs, n,
                                   device, prompt_len, steps, per_step, compiles, warmup_s) * 1e6
            median_us = statistics.median(per_step) * 1e6
            slowest = max(range(len(per_step)), key=per_step.__getitem__)
            # the mean is what the goal reads; the median and the slowest step say whether one step (about one
            # run in four has a 50-770 ms mean against 12-25 ms, docs/kernels.md runs 17-18) or all of them moved
            rows.append({"part": "step", "num_deltas": n, "rows_per_delta": num_seqs / n, "bits": bits,
                         "graph": graph, "us": us, "median_step_us": median_us, "max_step_us": max(per_step) * 1e6,
                         "num_steps_over_2x_median": sum(t > 2 * median_us / 1e6 for t in per_step),
                         # which step was slowest (0 = the first timed one) and whether SBMM variants compiled
                         # inside the timed steps: a stall from a missed warm-up shows here, an outside one not
                         "slowest_step_index": slowest, "sbmm_compiles_in_timed_steps": sum(compiles),
                         "sbmm_warmup_s_in_timed_steps": sum(warmup_s),
                         "step_vs_base": us / base_us,
                         "step_vs_same_mode_base": us / (graph_base_us if graph else base_us),
                         "goal_step_vs_base_at_8": 1.3})
            print(json.dumps(rows[-1]), flush=True)


def bench_step_profile(cfg: LlamaConfig, device: str, rows: list, deltas=(0, 16), num_seqs: int = 32,
                       prompt_len: int = 160, steps: int = 20, bits: int = 2, sp4: bool | None = None,
                       sp2: bool = False, profile_dir: Path | None = None) -> None:
    """part=step-profile: where a served decode step's time goes. For N in `deltas` (0: base only), the CUDA-graph
    decode step of `num_seqs` sequences (rows over N deltas): `wall_ms` (median engine.step(), host clock, as the
    worker's decode_graph phase), then the same steps under torch.profiler: `device_ms` (kernel time per step, all
    kernels, graph replays included) and the top kernels' share; tables to profile_dir. Limit: a decode step reads
    the base weights once plus each distinct delta's packed bytes, plus every sequence's K/V once per layer."""
    model = random_model(cfg, device, torch.float16)
    shapes = linear_shapes(cfg)
    num_slots = max(max(deltas), 1)
    slots = filled_slots(shapes, num_slots, device, bits, sp4, sp2)
    for n in deltas:
        engine = decode_engine(model, num_slots, slots, device.startswith("cuda"), num_seqs)
        ids, _ = start_decoding(engine, num_seqs, n, prompt_len, 3 * steps + 16)
        sync(device)
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t)
        prof = torch_profiler(device)
        with prof:
            for _ in range(steps):
                engine.step()
            sync(device)
        averages = prof.key_averages()
        kernels = [e for e in averages if getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0]
        device_us = sum(e.self_device_time_total for e in kernels) / steps
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
        rows.append({"part": "step-profile", "num_deltas": n, "bits": bits, "num_seqs": num_seqs,
                     "layers": cfg.num_hidden_layers, "prompt_len": prompt_len, "steps": steps,
                     "wall_ms": 1e3 * statistics.median(walls), "device_ms": device_us / 1e3,
                     "top_kernels": [{"name": e.key[:90], "us_per_step": e.self_device_time_total / steps,
                                      "calls_per_step": e.count / steps} for e in top]})
        print(json.dumps(rows[-1]), flush=True)
        if profile_dir is not None:
            write_profile(prof, profile_dir / f"step-profile-{bits}bit-d{n}-L{cfg.num_hidden_layers}-s{num_seqs}.txt",
                          f"{steps} graph decode steps, {num_seqs} sequences, {n} deltas, median wall "
                          f"{rows[-1]['wall_ms']:.2f} ms, kernels {rows[-1]['device_ms']:.2f} ms per step")
        for request_id in ids:
            engine.abort(request_id)
        del engine
        gc.collect()


def bench_fused_ab(cfg: LlamaConfig, device: str, rows: list, deltas=(1, 8, 16), rounds: int = 2, bits: int = 4,
                   num_seqs: int = 32, prompt_len: int = 128, steps: int = 20, sp4: bool | None = None,
                   sp2: bool = False, prefill_deltas=(0, 1, 4), num_running: int = 16, num_prefills: int = 12) -> None:
    """part=fused-ab: fused projections (one base GEMM and one SBMM launch per q/k/v and gate/up group, the
    worker's default) against separate ones, in one process: two models with the same weights (one fused) and two
    DeviceSlots with the same deltas (one with fused stacks), alternating arms each round. Decode steps as CUDA
    graphs (what the worker replays), then the eager fresh-shape prefill steps of part=prefill-deltas."""
    shapes = linear_shapes(cfg)
    num_slots = max(max(deltas), max(prefill_deltas), 1)
    arms = {}
    for fused in (False, True):
        model = random_model(cfg, device, torch.float16)
        slots = filled_slots(shapes, num_slots, device, bits, sp4, sp2, model.fused_tensor_names() if fused else None)
        if fused:
            assert model.fuse_projections() == 2 * cfg.num_hidden_layers
        arms[fused] = (model, slots)
    graph = device.startswith("cuda")
    for fused in (False, True):  # untimed: per-shape set-up and kernel variants of both arms
        model, slots = arms[fused]
        time_decode_steps(decode_engine(model, num_slots, slots, graph, num_seqs), num_seqs, 0, device, prompt_len, 2)
        for n in deltas:
            time_decode_steps(decode_engine(model, num_slots, slots, graph, num_seqs), num_seqs, n, device,
                              prompt_len, 2)
        time_fresh_prefills(model, device, num_running, 2, 0)
    for r in range(rounds):
        for n in (0, *deltas):
            for fused in ((False, True) if r % 2 == 0 else (True, False)):
                model, slots = arms[fused]
                per_step: list[float] = []
                us = time_decode_steps(decode_engine(model, num_slots, slots, graph, num_seqs), num_seqs, n, device,
                                       prompt_len, steps, per_step) * 1e6
                rows.append({"part": "fused-ab", "phase": "decode", "round": r, "fused": fused, "num_deltas": n,
                             "bits": bits, "graph": int(graph), "layers": cfg.num_hidden_layers, "num_seqs": num_seqs,
                             "us": us, "median_step_us": statistics.median(per_step) * 1e6})
                print(json.dumps(rows[-1]), flush=True)
        for n in prefill_deltas:
            for fused in ((False, True) if r % 2 == 0 else (True, False)):
                model, slots = arms[fused]
                ms, count = time_fresh_prefills(model, device, num_running, num_prefills, 0, slots if n else None, n)
                rows.append({"part": "fused-ab", "phase": "prefill", "round": r, "fused": fused, "num_deltas": n,
                             "bits": bits, "layers": cfg.num_hidden_layers, "num_running": num_running,
                             "prefill_steps": count, "ms": ms})
                print(json.dumps(rows[-1]), flush=True)


# parts that switch one module flag on and off in one process (bench_flag_ab): part -> (module, attribute)
FLAG_PARTS = {"attn-cache-ab": ("deltazip.model.attention", "CACHE_STEP_INDICES"),
              "rms-norm-ab": ("deltazip.model.layers", "FUSED_RMS_NORM"),
              "decode-attn-ab": ("deltazip.model.attention", "DECODE_KERNEL"),
              "rope-kv-ab": ("deltazip.model.layers", "FUSED_ROPE_KV"),
              "prefill-attn-ab": ("deltazip.model.attention", "PREFILL_KERNEL")}


def bench_flag_ab(part: str, cfg: LlamaConfig, device: str, rows: list, deltas=(0, 8), rounds: int = 2,
                  bits: int = 4, num_seqs: int = 32, prompt_len: int = 128, steps: int = 20, sp4: bool | None = None,
                  sp2: bool = False, num_running: int = 16, num_prefills: int = 12) -> None:
    """parts attn-cache-ab, rms-norm-ab and decode-attn-ab (FLAG_PARTS): a module flag on (the default) against off,
    alternating in one process: decode steps as CUDA graphs (a new engine per measurement, so each captures its own
    graphs) and eager fresh-shape prefill steps (base). attn-cache-ab: paged attention's per-step index tensors made
    once per forward against once per layer; rms-norm-ab: torch's fused rms_norm against the op-by-op norm;
    decode-attn-ab: decode steps' attention read from the paged cache by kernels/paged_attention.py against the
    gather + SDPA path (prefill steps do not use the kernel: their rows show the noise between arms); rope-kv-ab:
    q/k rotation and the KV-cache write in one launch (kernels/rope_kv.py) against op by op; prefill-attn-ab: prefill
    steps' attention read from the pages by the varlen kernel (kernels/paged_attention.py) against gather + SDPA
    (decode rows show the noise). The flag is put back to its value from before the part."""
    import importlib

    module, attr = FLAG_PARTS[part]
    flags = importlib.import_module(module)
    was = getattr(flags, attr)

    num_slots = max(max(deltas), 1)
    model, slots = fused_model_and_slots(cfg, device, num_slots, bits, sp4, sp2)
    graph = device.startswith("cuda")
    for n in deltas:  # untimed: per-shape set-up and kernel variants
        time_decode_steps(decode_engine(model, num_slots, slots, graph, num_seqs), num_seqs, n, device, prompt_len, 2)
    time_fresh_prefills(model, device, num_running, 2, 0)
    try:
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                setattr(flags, attr, on)
                for n in deltas:
                    per_step: list[float] = []
                    us = time_decode_steps(decode_engine(model, num_slots, slots, graph, num_seqs), num_seqs, n,
                                           device, prompt_len, steps, per_step) * 1e6
                    rows.append({"part": part, "phase": "decode", "round": r, "flag": attr, "on": on,
                                 "num_deltas": n, "bits": bits, "graph": int(graph), "layers": cfg.num_hidden_layers,
                                 "num_seqs": num_seqs, "us": us, "median_step_us": statistics.median(per_step) * 1e6})
                    print(json.dumps(rows[-1]), flush=True)
                ms, count = time_fresh_prefills(model, device, num_running, num_prefills, 0)
                rows.append({"part": part, "phase": "prefill", "round": r, "flag": attr, "on": on, "num_deltas": 0,
                             "layers": cfg.num_hidden_layers, "num_running": num_running, "prefill_steps": count,
                             "ms": ms})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        setattr(flags, attr, was)


def bench_sp2_prefill_ab(cfg: LlamaConfig, device: str, rows: list, deltas=(1, 4), rounds: int = 2,
                         sp4: bool | None = None, sp2: bool = True, num_running: int = 16, num_steps: int = 12,
                         min_rows: int = 128, left_rows: int | None = None) -> None:
    """part=sp2-prefill-ab: the eager fresh-shape prefill steps of part=prefill-deltas (2-bit deltas, every request
    on one of N deltas in turn) with segments of `min_rows`+ rows on the prefill kernel delta_linear routes them to
    (`delta_linear.SP2_PREFILL_ROWS`: kernels/sp2_wgmma.py, Hopper with fp16; elsewhere both arms are SBMM)
    against SBMM for all, the arms' order reversed every other round, in one process; the base model's steps each
    round for scale. left_rows: a third arm, "left", routing only where SBMM is left no segment of that many rows
    (`delta_linear.SP2_PREFILL_LEFT_ROWS`). The flags are put back to their values from before the part."""
    from kernels import delta_linear

    was = delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS
    arms = {"on": (min_rows, None), "off": (None, None)}
    if left_rows is not None:
        arms["left"] = (min_rows, left_rows)
    model, slots = fused_model_and_slots(cfg, device, max(deltas), 2, sp4, sp2)
    try:
        for arm in arms:  # untimed: compiles and per-shape set-up of every arm
            delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS = arms[arm]
            for n in deltas:
                time_fresh_prefills(model, device, num_running, 2, 0, slots, n)
        for r in range(rounds):
            base_ms, _ = time_fresh_prefills(model, device, num_running, num_steps, 0)
            for n in deltas:
                for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                    delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS = arms[arm]
                    ms, count = time_fresh_prefills(model, device, num_running, num_steps, 0, slots, n)
                    rows.append({"part": "sp2-prefill-ab", "round": r, "arm": arm, "on": arm != "off",
                                 "min_rows": min_rows, "left_rows": arms[arm][1], "num_deltas": n, "bits": 2,
                                 "layers": cfg.num_hidden_layers, "num_running": num_running,
                                 "prefill_steps": count, "ms": ms, "base_ms": base_ms, "vs_base": ms / base_ms})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        delta_linear.SP2_PREFILL_ROWS, delta_linear.SP2_PREFILL_LEFT_ROWS = was


# serving-like prefill steps (bench_prefill_route_ab): prompts a step, their lengths (uniform, tokens) and the Zipf
# exponent of the fine-tune each request goes to. Serving's cell (scripts/bench_gpu.sh: prompts of mean 128 tokens,
# Zipf 1.5 over 32 fine-tunes, at most 4 a batch) put 41% of its prefill steps' delta rows in segments of 256+ rows
# (docs/serving.md, session 28): the head fine-tune's prompts of one step form one segment.
SERVING_PROMPTS = (2, 8)
SERVING_LENGTHS = (64, 256)
SERVING_ZIPF = 1.5


# part prefill-route-ab's arm keys: key -> (module, attribute, value from the arm's string)
ROUTE_KEYS = {
    "rows": ("kernels.delta_linear", "SP2_PREFILL_ROWS", lambda v: int(v) or None),
    "left": ("kernels.delta_linear", "SP2_PREFILL_LEFT_ROWS", lambda v: int(v) or None),
    "fill": ("kernels.delta_linear", "SP2_BLOCK_FILL", float),
    "dense": ("kernels.sbmm_plan", "DENSE_ROWS_OVERRIDE", int),
    "chunk": ("kernels.delta_linear", "DENSE_CHUNK_BYTES", lambda v: int(v) << 20),
    "window": ("services.worker.delta_ops", "MERGED_ROW_BUCKETS", lambda v: bool(int(v))),
    "join": ("services.worker.delta_ops", "BASE_JOIN_ROWS", int),
}
# arm keys of the merged-weight cache (services/worker/merged_cache.py; the worker's --merged-cache-bytes and
# --merged-cache-admit-rows): key -> (arm entry, value)
CACHE_KEYS = {"cache": ("merged_cache_gib", float), "admit": ("merged_cache_admit_rows", int)}


def route_arm(spec: str) -> dict:
    """An arm of part prefill-route-ab: 'default' or comma-separated key=value of ROUTE_KEYS (rows: the sp2 prefill
    kernel's SP2_PREFILL_ROWS, left: SP2_PREFILL_LEFT_ROWS, fill: SP2_BLOCK_FILL, dense: the dense route's
    threshold, a row count of 0 = off; chunk: the dense route's expansion buffer, MiB; window: 0 = the merged
    route's GEMMs on each segment's own rows; join: BASE_JOIN_ROWS; CACHE_KEYS cache: the merged-weight cache's
    budget, GiB, admit: its admit_rows) -> {attribute or CACHE_KEYS entry: value}."""
    arm = {}
    for item in ([] if spec == "default" else spec.split(",")):
        key, _, value = item.partition("=")
        if key in CACHE_KEYS:
            arm[CACHE_KEYS[key][0]] = CACHE_KEYS[key][1](value)
            continue
        if key not in ROUTE_KEYS:
            raise ValueError(f"--route-arms: unknown key {key!r} in {spec!r}; keys: "
                             f"{', '.join([*ROUTE_KEYS, *CACHE_KEYS])}")
        arm[ROUTE_KEYS[key][1]] = ROUTE_KEYS[key][2](value)
    return arm


def bench_prefill_route_ab(cfg: LlamaConfig, device: str, rows: list, arms=("default", "dense=512"),
                           num_deltas: int = 8, max_deltas: int = 4, bits: int = 2, rounds: int = 2,
                           sp4: bool | None = None, sp2: bool = True, num_running: int = 16, num_steps: int = 12,
                           prompts: tuple[int, int] = SERVING_PROMPTS,
                           lengths: tuple[int, int] = SERVING_LENGTHS, fresh: bool = False) -> None:
    """part=prefill-route-ab: serving-like eager prefill steps (`prompts` prompts of `lengths` tokens, each on one
    of `num_deltas` deltas drawn with Zipf weights, at most `max_deltas` a batch as the worker's default, beside
    `num_running` decoding sequences) under each arm's routing of delta segments (`route_arm`: the sp2 prefill
    kernels' thresholds in kernels/delta_linear.py, the dense route's `sbmm.dense_rows`), the arms' order reversed
    every other round, in one process; the base model's steps each round for scale. Same seed for every arm: the
    same steps, whose GEMM shapes the first arm to run them has planned for the rest (cuBLAS). fresh: each arm its
    own seed and its `base_ms` the base model's steps of that seed, so every arm meets row counts new to the
    process, as serving does. The routing attributes are put back afterwards."""
    from services.worker.merged_cache import MergedCache

    modules = {attr: importlib.import_module(name) for name, attr, _ in ROUTE_KEYS.values()}
    was = {attr: getattr(module, attr) for attr, module in modules.items()}
    parsed = {spec: route_arm(spec) for spec in arms}
    model, slots = fused_model_and_slots(cfg, device, num_deltas, bits, sp4, sp2)
    steps = dict(prompts=prompts, lengths=lengths, zipf=SERVING_ZIPF, max_deltas=max_deltas)
    # each cache arm keeps its own cache over the rounds (warmed by the untimed pass), as a worker keeps one
    caches = {spec: MergedCache(int(arm["merged_cache_gib"] * (1 << 30)), arm.get("merged_cache_admit_rows", 256))
              for spec, arm in parsed.items() if arm.get("merged_cache_gib")}

    def use(spec: str) -> None:
        for attr, module in modules.items():
            setattr(module, attr, parsed[spec].get(attr, was[attr]))
        slots.merged_cache = caches.get(spec)

    try:
        for spec in arms:  # untimed: compiles and per-shape set-up of every arm
            use(spec)
            time_fresh_prefills(model, device, num_running, 2, 1, slots, num_deltas, **steps)
        for r in range(rounds):
            if not fresh:  # fresh: each arm's own base steps, below
                use("default")
                base_ms, _ = time_fresh_prefills(model, device, num_running, num_steps, 0, **steps)
            for spec in (arms if r % 2 == 0 else arms[::-1]):
                seed = 1000 + r * len(arms) + arms.index(spec) if fresh else 0
                if fresh:
                    use("default")
                    base_ms, _ = time_fresh_prefills(model, device, num_running, num_steps, seed, **steps)
                use(spec)
                ms, count = time_fresh_prefills(model, device, num_running, num_steps, seed, slots, num_deltas,
                                                **steps)
                rows.append({"part": "prefill-route-ab", "round": r, "arm": spec, "seed": seed,
                             "route": {attr: getattr(module, attr) for attr, module in modules.items()},
                             "merged_cache": caches[spec].stats() if spec in caches else None,
                             "num_deltas": num_deltas, "max_deltas": max_deltas, "zipf": SERVING_ZIPF,
                             "prompts": list(prompts), "prompt_tokens": list(lengths), "bits": bits,
                             "layers": cfg.num_hidden_layers, "num_running": num_running, "prefill_steps": count,
                             "ms": ms, "base_ms": base_ms, "vs_base": ms / base_ms})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        for attr, module in modules.items():
            setattr(module, attr, was[attr])
        slots.merged_cache = None


# ---- part 2b: prefill steps of fresh shapes, per SDPA backend choice -------------------------------

def time_fresh_prefills(model, device: str, num_running: int, num_steps: int, seed: int,
                        slots: DeviceSlots | None = None, num_deltas: int = 0,
                        profile: Path | None = None, py_profile=None, prompts: tuple[int, int] = (1, 4),
                        lengths: tuple[int, int] = (64, 192), zipf: float | None = None,
                        max_deltas: int | None = None) -> tuple[float, int]:
    """Mean ms of a prefill step that mixes `prompts` new prompts (1-4; `lengths` tokens: 64-192, fresh lengths
    every step) into `num_running` decoding sequences, as serving does; read off the engine's own step profile.
    num_deltas: every request on one of that many deltas of `slots` in turn, or drawn with Zipf weights of exponent
    `zipf`, at most `max_deltas` (default: all) in a batch (0: the base model); their SBMM warm-up is finished
    first, so no timed step carries it. profile: run the timed steps under torch.profiler and write its tables to
    that file, without the decode step between prefills (so every profiled op belongs to a prefill step).
    py_profile: a cProfile.Profile enabled around each prefill step only (the decode steps between stay out)."""
    engine = decode_engine(model, num_deltas if max_deltas is None else min(max_deltas, num_deltas), slots, True,
                           max_num_seqs=num_running + prompts[1] * num_steps + 8)
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=4 * num_steps + 16, ignore_eos=True)
    counter = itertools.count()
    weights = torch.tensor([1.0 / (i + 1) ** zipf for i in range(num_deltas)]) if zipf and num_deltas else None

    def delta() -> str | None:
        if weights is not None:
            return str(int(torch.multinomial(weights, 1, generator=g)))
        return str(next(counter) % num_deltas) if num_deltas else None

    for i in range(num_running):
        engine.add_request(f"run{seed}-{i}", torch.randint(3, 200, (int(torch.randint(64, 192, (1,), generator=g)),),
                                                           generator=g).tolist(), params, delta=delta())
    engine.step()
    for _ in range(3):
        engine.step()
    before = finish_warm_up(engine)
    profiler = torch_profiler(device) if profile else contextlib.nullcontext()
    with profiler:
        for step in range(num_steps):
            for j in range(int(torch.randint(prompts[0], prompts[1] + 1, (1,), generator=g))):
                n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
                engine.add_request(f"new{seed}-{step}-{j}", torch.randint(3, 200, (n,), generator=g).tolist(),
                                   params, delta=delta())
            if py_profile is not None:
                py_profile.enable()
            engine.step()  # the prefill step (new prompts + every running sequence)
            if py_profile is not None:
                py_profile.disable()
            if not profile:
                engine.step()  # a decode step between, as arrivals are spread out
        sync(device)
    after = engine.profile.snapshot()
    if warmup_seconds(after) != warmup_seconds(before):
        raise RuntimeError("SBMM warm-up ran inside the timed prefill steps")
    count, seconds = (a - b for a, b in zip(after["prefill"], before["prefill"]))
    if profile:
        write_profile(profiler, profile, f"{count} prefill steps, {1e3 * seconds / max(count, 1):.1f} ms each "
                                         f"(under the profiler), {num_deltas} deltas, {num_running} running")
    return 1e3 * seconds / max(count, 1), count


def torch_profiler(device: str):
    """torch.profiler over CPU ops and (on CUDA) kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def write_profile(prof, path: Path, title: str, rows: int = 40) -> None:
    """The profile's ops by self device time and by self CPU time, as text tables."""
    averages = prof.key_averages()
    tables = [title]
    for key in ("self_device_time_total", "self_cpu_time_total"):
        try:
            tables.append(f"== by {key}\n" + averages.table(sort_by=key, row_limit=rows, max_name_column_width=70))
        except (AttributeError, KeyError, ValueError) as e:  # an older torch names the device column otherwise
            tables.append(f"== by {key}: not available ({e})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(tables) + "\n")
    print(f"profile -> {path}", flush=True)


def bench_prefill(cfg: LlamaConfig, device: str, rows: list, num_running: int = 16, num_steps: int = 12) -> None:
    """part=prefill: the same fresh-shape prefill steps with PyTorch's own SDPA backend choice, then with the
    paged path's list (deltazip/model/attention.py PAGED_BACKENDS); each with its own random lengths."""
    from deltazip.model import attention

    model = random_model(cfg, device, torch.float16)
    ours = attention.PAGED_BACKENDS
    results = {}
    for seed, (name, backends) in enumerate((("torch_default", None), ("paged_backends", ours))):
        attention.PAGED_BACKENDS = backends
        try:
            results[name] = time_fresh_prefills(model, device, num_running, num_steps, seed)
        finally:
            attention.PAGED_BACKENDS = ours
        ms, count = results[name]
        rows.append({"part": "prefill", "sdpa": name, "layers": cfg.num_hidden_layers, "num_running": num_running,
                     "prefill_steps": count, "ms": ms,
                     "vs_torch_default": ms / results["torch_default"][0]})
        print(json.dumps(rows[-1]), flush=True)


def bench_prefill_deltas(cfg: LlamaConfig, device: str, rows: list, deltas=(0, 1, 4), bits: int = 4,
                         num_running: int = 16, num_steps: int = 12, sp4: bool | None = None, sp2: bool = False,
                         profile_dir: Path | None = None, launch_ab: int = 0) -> None:
    """part=prefill-deltas: the fresh-shape prefill steps of part=prefill (same seed, so the same prompt lengths)
    with every request on one of N resident deltas in turn, N in `deltas` (0: the base model, the baseline).
    launch_ab > 0: instead, that many rounds of (base, then each N with sbmm.FAST_LAUNCH on, then off) in this one
    process, so the launch cache's A/B is not read across processes (whose eager steps differ by up to 1.5x)."""
    model = random_model(cfg, device, torch.float16)
    shapes = linear_shapes(cfg)
    num_slots = max(max(deltas), 1)
    slots = filled_slots(shapes, num_slots, device, bits, sp4, sp2)
    time_fresh_prefills(model, device, num_running, 2, 0)  # untimed: per-shape set-up, as in part=prefill
    if launch_ab:
        _prefill_launch_ab(model, device, rows, slots, deltas, bits, cfg.num_hidden_layers, num_running, num_steps,
                           launch_ab)
        return
    base_ms = None
    for n in deltas:
        profile = profile_dir / f"prefill-profile-{bits}bit-d{n}.txt" if profile_dir else None
        ms, count = time_fresh_prefills(model, device, num_running, num_steps, 0, slots if n else None, n, profile)
        base_ms = ms if n == 0 else base_ms
        rows.append({"part": "prefill-deltas", "num_deltas": n, "bits": bits, "layers": cfg.num_hidden_layers,
                     "num_running": num_running, "prefill_steps": count, "ms": ms,
                     "vs_base": ms / base_ms if base_ms else None, "profiled": bool(profile)})
        print(json.dumps(rows[-1]), flush=True)


# functions whose own time in a profiled step is the host waiting for the GPU (the sampled tokens' copy)
SYNC_FUNCTIONS = ("tolist", "item", "synchronize", "cpu", "_local_scalar_dense")
# the host's layers of one delta linear, outermost first (function name, file suffix): cumulative ms per step
HOST_LAYERS = (("fused_linear", "delta_ops.py"), ("linear", "delta_ops.py"), ("_apply", "delta_ops.py"),
               ("_stacks_of", "delta_ops.py"), ("apply_linear", "linear_backend.py"),
               ("apply_deltas", "delta_linear.py"), ("_sp2_prefill_segments", "delta_linear.py"),
               ("_dense_segments", "delta_linear.py"), ("sbmm", "sbmm.py"), ("_check", "sbmm.py"),
               ("plan", "sbmm_plan.py"), ("_launch_sparse_mma", "sbmm.py"), ("launch", "sbmm.py"),
               ("sp_x", "sbmm.py"), ("run", "model_runner.py"), ("step", "engine.py"))


def bench_prefill_host(cfg: LlamaConfig, device: str, rows: list, deltas=(0, 4, 16), bits: int = 2,
                       sp4: bool | None = None, sp2: bool = False, num_running: int = 16, num_steps: int = 12,
                       profile_dir: Path | None = None) -> None:
    """part=prefill-host: where a prefill step's host time goes, on the worker's fused model (part=prefill-deltas'
    steps: 1-4 new prompts of 64-192 tokens mixed into `num_running` decoding sequences, every request on one of N
    deltas in turn). Per N: the mean step unprofiled (`ms`), then the same steps under cProfile: the time the host
    waited for the GPU inside them (`sync_wait_ms`: the own time of SYNC_FUNCTIONS, the sampled tokens' copy), the
    host's own time (`host_ms` = profiled step - wait; cProfile inflates Python, so this over-states it) and the
    cumulative ms per step of each layer of a delta linear (`layers_ms`, HOST_LAYERS). A step whose host_ms is near
    its unprofiled ms is host-bound: its GPU idles between launches. `gpu_kernel_ms`: the kernels' own time per
    step under torch.profiler (the same steps, without their decode steps): a step near it is GPU-bound. The top
    40 functions by own and cumulative time go to --profile-dir (prefill-host-<bits>bit-d<N>.txt), and the kernel
    tables too (prefill-host-gpu-<bits>bit-d<N>.txt)."""
    import cProfile
    import io
    import pstats
    import re
    import tempfile

    model, slots = fused_model_and_slots(cfg, device, max(max(deltas), 1), bits, sp4, sp2)
    time_fresh_prefills(model, device, num_running, 2, 0)  # untimed: per-shape set-up
    for n in deltas:
        ms, count = time_fresh_prefills(model, device, num_running, num_steps, 0, slots if n else None, n)
        prof = cProfile.Profile()
        pms, pcount = time_fresh_prefills(model, device, num_running, num_steps, 1, slots if n else None, n,
                                          py_profile=prof)
        gpu_ms = None
        if device.startswith("cuda"):  # the same steps again under torch.profiler: the GPU's kernel time per step
            with tempfile.TemporaryDirectory() as tmp:  # the kernel tables go to --profile-dir when given
                table = (profile_dir or Path(tmp)) / f"prefill-host-gpu-{bits}bit-d{n}.txt"
                table.parent.mkdir(parents=True, exist_ok=True)
                _, gcount = time_fresh_prefills(model, device, num_running, num_steps, 0, slots if n else None, n,
                                                table)
                total = re.search(r"Self CUDA time total: ([0-9.]+)(ms|us|s)", table.read_text())
            if total:
                gpu_ms = float(total[1]) * {"ms": 1.0, "us": 1e-3, "s": 1e3}[total[2]] / max(gcount, 1)
        stats = pstats.Stats(prof)
        per = 1e3 / max(pcount, 1)
        wait = sum(tt for (_, _, fn), (_, _, tt, _, _) in stats.stats.items()
                   if any(f"'{name}'" in fn or fn == name for name in SYNC_FUNCTIONS)) * per
        layers = {}
        for name, suffix in HOST_LAYERS:
            cum = [(nc, ct) for (file, _, fn), (_, nc, _, ct, _) in stats.stats.items()
                   if fn == name and file.endswith(suffix)]
            if cum:
                layers[f"{suffix[:-3]}.{name}"] = {"calls_per_step": sum(c for c, _ in cum) / max(pcount, 1),
                                                   "ms_per_step": sum(t for _, t in cum) * per}
        rows.append({"part": "prefill-host", "num_deltas": n, "bits": bits, "layers": cfg.num_hidden_layers,
                     "num_running": num_running, "prefill_steps": count, "ms": ms, "profiled_ms": pms,
                     "sync_wait_ms": wait, "host_ms": pms - wait, "gpu_kernel_ms": gpu_ms, "layers_ms": layers})
        print(json.dumps(rows[-1]), flush=True)
        if profile_dir is not None:
            buf = io.StringIO()
            buf.write(f"{pcount} prefill steps under cProfile, {pms:.1f} ms each ({ms:.1f} unprofiled), {n} deltas, "
                      f"{num_running} running, {bits}-bit\n")
            for key in ("tottime", "cumulative"):
                pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(40)
            profile_dir.mkdir(parents=True, exist_ok=True)
            (profile_dir / f"prefill-host-{bits}bit-d{n}.txt").write_text(buf.getvalue())


# parts that switch one module flag of the eager prefill path on and off (bench_prefill_flag_ab): part -> flag
# (several flags: all on against all off)
PREFILL_FLAG_PARTS = {"row-bucket-ab": ("services.worker.engine.model_runner", "ROW_BUCKETS"),
                      "plan-memo-ab": ("kernels.sbmm", "PLAN_MEMO"),
                      "host-path-ab": ("services.worker.delta_ops", "FAST_GROUPS")}


def bench_prefill_flag_ab(part: str, cfg: LlamaConfig, device: str, rows: list, deltas=(0, 4, 16), bits: int = 2,
                          sp4: bool | None = None, sp2: bool = False, rounds: int = 2, num_running: int = 16,
                          num_steps: int = 12) -> None:
    """parts row-bucket-ab, plan-memo-ab and host-path-ab (PREFILL_FLAG_PARTS): part=prefill-deltas' steps on the
    worker's fused model with a module flag on (the default) against off, alternating by round in one process.
    row-bucket-ab: each eager prefill step's token count rounded up to a bucket (services/worker/engine/
    model_runner.py ROW_BUCKETS) against each step on its own count; plan-memo-ab: repeated SBMM calls skipping
    checks, plan and argument specialization (kernels/sbmm.py PLAN_MEMO) against every call doing them;
    host-path-ab: the delta linears' stack groups from one lookup per slot (services/worker/delta_ops.py
    FAST_GROUPS) against the per-segment grouping. Every measurement
    draws new prompt lengths (a seed per pair of arms, the same for both), so an unbucketed step's GEMMs meet row
    counts cuBLAS has not planned, as serving's do (the bucketed arm's buckets are planned by its warm-up, so
    whichever arm runs first, the other's row counts are new to cuBLAS too). The flags are put back afterwards."""
    import importlib

    spec = PREFILL_FLAG_PARTS[part]
    flags = [(importlib.import_module(m), a) for m, a in ((spec,) if isinstance(spec[0], str) else spec)]
    was = [getattr(mod, a) for mod, a in flags]
    attr = ",".join(a for _, a in flags)

    def set_flags(on: bool) -> None:
        for mod, a in flags:
            setattr(mod, a, on)
    model, slots = fused_model_and_slots(cfg, device, max(max(deltas), 1), bits, sp4, sp2)
    seeds = itertools.count(1000)
    try:
        for on in (True, False):  # untimed: kernel compiles and per-shape set-up of both arms
            set_flags(on)
            for n in deltas:
                time_fresh_prefills(model, device, num_running, 2, next(seeds), slots if n else None, n)
        for r in range(rounds):
            for n in deltas:
                seed = next(seeds)  # both arms of a pair run the same steps
                for on in ((True, False) if r % 2 == 0 else (False, True)):
                    set_flags(on)
                    ms, count = time_fresh_prefills(model, device, num_running, num_steps, seed,
                                                    slots if n else None, n)
                    rows.append({"part": part, "round": r, "flag": attr, "on": on, "num_deltas": n, "bits": bits,
                                 "layers": cfg.num_hidden_layers, "num_running": num_running,
                                 "prefill_steps": count, "ms": ms})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        for (mod, a), value in zip(flags, was):
            setattr(mod, a, value)


def _prefill_launch_ab(model, device, rows, slots, deltas, bits, layers, num_running, num_steps, rounds) -> None:
    """bench_prefill_deltas' launch-cache A/B: per round the base, then every delta count with the cache on and
    off (the order flips every round); one row per (round, N, cache)."""
    from kernels import sbmm

    was = sbmm.FAST_LAUNCH
    for r in range(rounds):
        base_ms, _ = time_fresh_prefills(model, device, num_running, num_steps, 0)
        for n in [d for d in deltas if d]:
            for fast in ((True, False) if r % 2 == 0 else (False, True)):
                sbmm.FAST_LAUNCH = fast
                ms, count = time_fresh_prefills(model, device, num_running, num_steps, 0, slots, n)
                rows.append({"part": "prefill-deltas-launch-ab", "round": r, "num_deltas": n, "bits": bits,
                             "layers": layers, "num_running": num_running, "prefill_steps": count,
                             "fast_launch": fast, "ms": ms, "base_ms": base_ms, "vs_base": ms / base_ms})
                print(json.dumps(rows[-1]), flush=True)
    sbmm.FAST_LAUNCH = was


def bench_long_prefill_ab(cfg: LlamaConfig, device: str, rows: list, lengths=(256, 512, 1024, 2040),
                          bits: int = 4, sp4: bool | None = None, sp2: bool = False, rounds: int = 2,
                          repeats: int = 5) -> None:
    """part=long-prefill-ab: one prompt of L tokens prefilled on its own (the step its time to first token waits
    for), on a delta and on the base model, with the dense route for long delta segments (kernels/delta_linear.py:
    the delta expanded once + cuBLAS, from `sbmm.dense_rows` rows, the worker's default) against SBMM for every
    segment, alternating by round in one process; the median of `repeats` steps per point."""
    from kernels import sbmm

    model, slots = fused_model_and_slots(cfg, device, 1, bits, sp4, sp2)
    engine = decode_engine(model, 1, slots, device.startswith("cuda"), max_num_seqs=8)
    table = sbmm.dense_rows
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    ids = itertools.count()

    def prefill_ms(length: int, delta: str | None) -> float:
        engine.add_request(f"long{next(ids)}", torch.randint(3, 200, (length,), generator=g).tolist(), params,
                           delta=delta)
        t0 = time.perf_counter()
        engine.step()  # the prefill (and its one sampled token: the step returns once it is on the host)
        ms = (time.perf_counter() - t0) * 1e3
        engine.run_until_done()
        return ms

    finish_warm_up(engine)
    try:
        for dense in (True, False):  # untimed: compiles and per-shape set-up of both arms
            sbmm.dense_rows = table if dense else (lambda device, bits: None)
            for length in lengths:
                prefill_ms(length, "0")
                prefill_ms(length, None)
        for r in range(rounds):
            for length in lengths:
                base = statistics.median(prefill_ms(length, None) for _ in range(repeats))
                for dense in ((True, False) if r % 2 == 0 else (False, True)):
                    sbmm.dense_rows = table if dense else (lambda device, bits: None)
                    ms = statistics.median(prefill_ms(length, "0") for _ in range(repeats))
                    rows.append({"part": "long-prefill-ab", "round": r, "prompt_tokens": length, "bits": bits,
                                 "dense_route": dense, "dense_rows": table(torch.device(device), bits),
                                 "layers": cfg.num_hidden_layers, "ms": ms, "base_ms": base, "vs_base": ms / base})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        sbmm.dense_rows = table


# ---- part 3: tokens/s per mode under a mixed 16-model load -----------------------------------------

def zipf_models(num_requests: int, num_models: int, seed: int = 0) -> list[int]:
    weights = torch.tensor([1.0 / (i + 1) for i in range(num_models)])
    return torch.multinomial(weights, num_requests, replacement=True,
                             generator=torch.Generator().manual_seed(seed)).tolist()


def mode_engine(mode: str, cfg: LlamaConfig, device: str, num_models: int, max_num_seqs: int, max_deltas: int):
    """An engine serving `num_models` fine-tunes in `mode`; deltas (or merged weights) already loaded."""
    model = random_model(cfg, device, torch.float16)
    shapes = linear_shapes(cfg)
    cuda = device.startswith("cuda")
    common = dict(num_kv_blocks=max_num_seqs * 16 + 8, block_size=16, max_num_seqs=max_num_seqs,
                  max_num_batched_tokens=4096, max_deltas_per_batch=max_deltas)
    if mode == "swap":
        # merged weights per model in pinned host memory; two distinct sets alternate (a swap copies
        # every parameter whatever its values, and 16 full 1B models would not fit the host's memory)
        sets = [{k: (p.detach().cpu() + 0.001 * i).pin_memory() if cuda else p.detach().cpu() + 0.001 * i
                 for k, p in model.named_parameters()} for i in range(2)]
        return LLMEngine(model, EngineConfig(**common), eos_token_ids=[],
                         swap_weights=lambda name: sets[int(name) % 2])
    slots = DeviceSlots(num_models, device, torch.float16, set(shapes), False)
    for s in range(num_models):
        delta = random_dense_delta(shapes, device, s) if mode == "dense-delta" else \
            random_packed_delta(shapes, 2, 128, device, pin=cuda, seed=s)
        slots.write(s, str(s), delta)
    return decode_engine(model, max_deltas, slots, False, max_num_seqs)


def bench_modes(cfg: LlamaConfig, device: str, rows: list, num_models: int = 16, num_requests: int = 256,
                prompt_len: int = 64, max_tokens: int = 64, max_num_seqs: int = 64, max_deltas: int = 8) -> None:
    which = zipf_models(num_requests, num_models)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (prompt_len,), generator=g).tolist() for _ in range(num_requests)]
    results = {}
    for mode in ("swap", "dense-delta", "delta"):
        engine = mode_engine(mode, cfg, device, num_models, max_num_seqs, max_deltas)
        for i, (p, m) in enumerate(zip(prompts, which)):
            engine.add_request(f"{mode}-{i}", p, params, delta=str(m))
        sync(device)
        t = time.perf_counter()
        out = engine.run_until_done()
        sync(device)
        elapsed = time.perf_counter() - t
        tokens = sum(len(v[0]) for v in out.values())
        results[mode] = tokens / elapsed
        row = {"part": "modes", "mode": mode, "num_models": num_models, "num_requests": num_requests,
               "tokens": tokens, "s": elapsed, "tokens_per_s": tokens / elapsed}
        if engine.swapper is not None:
            row["num_swaps"] = engine.swapper.num_swaps
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for row in rows:
        if row.get("part") == "modes":
            row["throughput_vs_swap"] = row["tokens_per_s"] / results["swap"]
            row["throughput_vs_dense"] = row["tokens_per_s"] / results["dense-delta"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the process's grad mode is put back afterwards (tests call this in-process)."""
    grad = torch.is_grad_enabled()
    try:
        return _main(argv)
    finally:
        torch.set_grad_enabled(grad)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--commit", default="")
    ap.add_argument("--parts", default="load,step,prefill,modes")
    ap.add_argument("--tiny", action="store_true", help="tiny model, any device: smoke test only")
    ap.add_argument("--step-layers", type=int, default=0,
                    help="cut the step model's depth (0 = 32): e.g. 4, the serving benchmark's shape")
    ap.add_argument("--step-seqs", type=int, default=32, help="sequences in the timed decode step")
    ap.add_argument("--label", default="", help="added to the result file name")
    ap.add_argument("--launch-ab", type=int, default=0, help="part prefill-deltas: this many rounds of the launch "
                    "cache on / off in one process instead of the plain rows")
    ap.add_argument("--no-fast-launch", action="store_true",
                    help="every SBMM launch through Triton's JITFunction.run (sbmm.FAST_LAUNCH off): the baseline of "
                         "the launch cache")
    ap.add_argument("--profile-dir", default="", help="parts prefill-deltas and step-profile: profile their timed "
                    "steps (torch.profiler, "
                    "no decode step between prefills) and write one table file per delta count there")
    ap.add_argument("--step-bits", type=int, default=2, choices=(2, 4), help="code width of the step's deltas")
    ap.add_argument("--sp2-prefill-rows", type=int, default=128,
                    help="part sp2-prefill-ab: delta_linear.SP2_PREFILL_ROWS of the 'on' arm")
    ap.add_argument("--sp2-prefill-left-rows", type=int, default=None,
                    help="part sp2-prefill-ab: a third arm, 'left', with delta_linear.SP2_PREFILL_LEFT_ROWS this")
    ap.add_argument("--sp4-words-torch", action="store_true",
                    help="sp4 slot writes re-order qweight in torch row chunks instead of the one-pass Triton kernel "
                         "(spmma_layout.SP4_WORDS_KERNEL off): the load baseline")
    ap.add_argument("--no-sp4", action="store_true",
                    help="4-bit slots in tiled4 instead of sp4 (the sparse-MMA kernel's order): the in-run baseline")
    ap.add_argument("--no-sp2", action="store_true",
                    help="2-bit slots in dense2 instead of sp2 (the 2-bit sparse-MMA kernel's order, the worker's "
                         "default on CUDA): the in-run baseline")
    ap.add_argument("--sp2-torch", action="store_true",
                    help="sp2 slot writes re-order qweight and meta in torch row chunks instead of the one-pass Triton "
                         "kernels (spmma_layout.SP2_KERNELS off): the sp2 load baseline")
    ap.add_argument("--no-sbmm-workspace", action="store_true",
                    help="delta launches without an sbmm.Workspace (a counter memset per split-K launch, a copy of x "
                         "per sparse-MMA launch), as before the worker shared one per step and per graph set: the "
                         "in-run baseline of the step part")
    ap.add_argument("--fused-rounds", type=int, default=2, help="parts fused-ab and attn-cache-ab: rounds of both "
                    "arms, the order alternating by round")
    ap.add_argument("--long-lengths", default="256,512,1024,2040",
                    help="part long-prefill-ab: the prompt lengths (tokens), comma-separated")
    ap.add_argument("--route-arms", default="default;dense=512",
                    help="part prefill-route-ab: the arms, ';'-separated, each 'default' or comma-separated key=value "
                         "(rows: SP2_PREFILL_ROWS, left: SP2_PREFILL_LEFT_ROWS, fill: SP2_BLOCK_FILL, dense: the "
                         "dense route's rows; 0 = off; chunk: its buffer, MiB; window: 0 = its GEMMs on each "
                         "segment's rows; join: base runs this many merged rows apart take one GEMM; cache: a "
                         "merged-weight cache of that many GiB, admit: its admit rows), "
                         "e.g. 'default;dense=512;cache=16,admit=256'")
    ap.add_argument("--route-deltas", type=int, default=8,
                    help="part prefill-route-ab: fine-tunes the steps' prompts are drawn from (Zipf; --tiny: 2)")
    ap.add_argument("--route-max-deltas", type=int, default=4,
                    help="part prefill-route-ab: at most this many fine-tunes a step (the worker's default; the "
                         "serving bench's delta mode runs 16, scripts/bench_gpu_matrix.sh; --tiny: all)")
    ap.add_argument("--fresh-shapes", action="store_true",
                    help="part prefill-route-ab: each arm its own steps (seed), against the base model's on them")
    ap.add_argument("--sbmm-configs", default="",
                    help="a tuned SBMM table file (the form of kernels/sbmm_configs.json, e.g. an earlier commit's) "
                         "in place of the current one: the in-run baseline of a table change")
    args = ap.parse_args(argv)
    if args.sbmm_configs:
        from kernels import sbmm_plan

        sbmm_plan.CONFIG_FILE = Path(args.sbmm_configs)  # where the tables are read (not sbmm's re-export)
        sbmm_plan._configs.cache_clear()
    if args.no_sbmm_workspace:
        from services.worker import linear_backend

        linear_backend.kernel_workspace = lambda device: None
    if args.no_fast_launch:
        from kernels import sbmm

        sbmm.FAST_LAUNCH = False
    spmma_layout.SP4_WORDS_KERNEL = not args.sp4_words_torch
    spmma_layout.SP2_KERNELS = not args.sp2_torch
    torch.set_grad_enabled(False)
    from deltazip.logs import configure_logging

    configure_logging("warning", service="bench")  # no per-request log lines in the timings' output
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name().replace(" ", "-") if device == "cuda" else "cpu"
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    big, mid = (TINY, TINY) if args.tiny else (LLAMA_7B, LLAMA_1B)
    rows: list[dict] = []
    parts = args.parts.split(",")
    sp2 = not args.no_sp2 and device == "cuda"  # 2-bit slots as the worker keeps them (sp2 on CUDA)
    if "load" in parts:
        for bits in (2, 4):
            bench_load(big, device, rows, bits, sp4=False if args.no_sp4 else None, sp2=sp2)
    # the step and prefill parts' model: the 7B shape, cut to --step-layers
    step_cfg = dataclasses.replace(big, num_hidden_layers=args.step_layers) if args.step_layers else big
    if "step" in parts:
        bench_step(step_cfg, device, rows, **({"num_seqs": 8, "steps": 3, "prompt_len": 16} if args.tiny
                                              else {"num_seqs": args.step_seqs}),
                   bits=args.step_bits, sp4=False if args.no_sp4 else None, sp2=sp2)
    if "step-profile" in parts:
        bench_step_profile(step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None, sp2=sp2,
                           profile_dir=Path(args.profile_dir) if args.profile_dir else None,
                           **({"deltas": (0, 2), "num_seqs": 4, "prompt_len": 16, "steps": 2} if args.tiny
                              else {"num_seqs": args.step_seqs}))
    if "prefill" in parts:
        bench_prefill(step_cfg, device, rows, **({"num_running": 4, "num_steps": 2} if args.tiny else {}))
    if "prefill-deltas" in parts:
        bench_prefill_deltas(step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None,
                             sp2=sp2, profile_dir=Path(args.profile_dir) if args.profile_dir else None,
                             launch_ab=args.launch_ab,
                             **({"num_running": 4, "num_steps": 2} if args.tiny else {}))
    if "prefill-host" in parts:
        bench_prefill_host(step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None, sp2=sp2,
                           profile_dir=Path(args.profile_dir) if args.profile_dir else None,
                           **({"deltas": (0, 2), "num_running": 4, "num_steps": 2} if args.tiny else {}))
    for part in (p for p in parts if p in PREFILL_FLAG_PARTS):
        bench_prefill_flag_ab(part, step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None,
                              sp2=sp2, rounds=args.fused_rounds,
                              **({"deltas": (0, 2), "num_running": 4, "num_steps": 2} if args.tiny else {}))
    if "fused-ab" in parts:
        bench_fused_ab(step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None, sp2=sp2,
                       rounds=args.fused_rounds,
                       **({"deltas": (1, 2), "num_seqs": 4, "prompt_len": 16, "steps": 2, "prefill_deltas": (0, 1),
                           "num_running": 4, "num_prefills": 2} if args.tiny else {"num_seqs": args.step_seqs}))
    if "long-prefill-ab" in parts:
        bench_long_prefill_ab(step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None,
                              sp2=sp2, rounds=args.fused_rounds,
                              **({"lengths": (16, 32), "repeats": 1} if args.tiny
                                 else {"lengths": tuple(int(v) for v in args.long_lengths.split(","))}))
    if "prefill-route-ab" in parts:
        bench_prefill_route_ab(step_cfg, device, rows, arms=tuple(args.route_arms.split(";")), bits=args.step_bits,
                               sp4=False if args.no_sp4 else None, sp2=sp2, rounds=args.fused_rounds,
                               fresh=args.fresh_shapes,
                               **({"num_deltas": 2, "num_running": 4, "num_steps": 2, "prompts": (1, 3),
                                   "lengths": (8, 16)} if args.tiny
                                 else {"num_deltas": args.route_deltas, "max_deltas": args.route_max_deltas}))
    if "sp2-prefill-ab" in parts:
        bench_sp2_prefill_ab(step_cfg, device, rows, sp4=False if args.no_sp4 else None, sp2=sp2,
                             rounds=args.fused_rounds, min_rows=args.sp2_prefill_rows,
                             left_rows=args.sp2_prefill_left_rows,
                             **({"deltas": (1,), "num_running": 4, "num_steps": 2} if args.tiny else {}))
    for part in (p for p in parts if p in FLAG_PARTS):
        bench_flag_ab(part, step_cfg, device, rows, bits=args.step_bits, sp4=False if args.no_sp4 else None, sp2=sp2,
                      rounds=args.fused_rounds,
                      **({"deltas": (0, 2), "num_seqs": 4, "prompt_len": 16, "steps": 2, "num_running": 4,
                          "num_prefills": 2} if args.tiny else {"num_seqs": args.step_seqs}))
    if "modes" in parts:
        bench_modes(mid, device, rows, **({"num_requests": 24, "max_tokens": 6, "prompt_len": 8}
                                          if args.tiny else {}))
    date = datetime.date.today().isoformat()
    result = {"bench": "worker", "device": name, "commit": commit, "date": date,
              "config": {"tiny": args.tiny, "parts": parts, "load_model": "llama-7b-shape" if not args.tiny else "tiny",
                         "modes_model": "llama-1.1b-shape" if not args.tiny else "tiny", "dtype": "float16",
                         "step_layers": args.step_layers or big.num_hidden_layers, "step_seqs": args.step_seqs,
                         "step_bits": args.step_bits, "four_bit_slots": "tiled4" if args.no_sp4 else "sp4 where it applies",
                         "sp4_words_kernel": not args.sp4_words_torch, "sparse_mma_2bit": not args.no_sp2,
                         "sp2_kernels": not args.sp2_torch, "sbmm_workspace": not args.no_sbmm_workspace,
                         "sbmm_fast_launch": not args.no_fast_launch,
                         "sbmm_configs": args.sbmm_configs or "kernels/sbmm_configs.json"},
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = Path(args.out) / f"worker-{name}-{date}{'-tiny' if args.tiny else ''}{'-' + args.label if args.label else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
