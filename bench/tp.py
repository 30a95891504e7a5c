"""Tensor-parallel decode benchmark: a 13B-shaped base at TP=2 against a 7B-shaped base at TP=1 (GPU).

  python bench/tp.py --out bench/results [--num-deltas 16] [--rows-per-delta 2] [--context-len 256] [--quick]
  python bench/tp.py --cpu-smoke --out /tmp/tp   # the same code path on CPU (gloo, tiny shapes): no timings

Each configuration runs in its own set of processes (one per rank, NCCL over torch.distributed), on a
random-weight fp16 Llama sharded by deltazip.parallel, with num_deltas random 4-bit 2:4 packed deltas
(group 128) in every linear of every layer, cut to the rank's shard shape, applied through
kernels.apply_deltas (SBMM). One decode step = the serving forward of one token for each of
num_deltas * rows_per_delta sequences at context_len, plus compute_logits. Times are eager (no CUDA
graph), median over steps, measured on rank 0 after a barrier; every rank runs the same step. Rows also
hold the base-only step (deltas=None) of the same model, so step_vs_base is in the same run.
Writes DIR/tp-<device>-<date>.json. Needs 2 GPUs for the TP=2 rows (they are skipped with fewer).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltazip.model.config import LlamaConfig  # noqa: E402
from deltazip.model.context import ForwardContext  # noqa: E402
from deltazip.model.llama import LlamaForCausalLM  # noqa: E402
from deltazip.parallel import TPGroup, init_tp_group, shard_model  # noqa: E402
from deltazip.parallel.group import destroy_tp_group  # noqa: E402
from bench import sbmm_stacks  # noqa: E402
from kernels import layout  # noqa: E402
from kernels.delta_linear import PackedDeltaStack, apply_deltas  # noqa: E402

SHAPES = {  # Llama-2 shapes (MHA), vocab 32000
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
SMOKE_SHAPES = {  # --cpu-smoke: the bench's code path in seconds
    "7b": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "13b": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8),
}


def config_of(shape: str, num_layers: int | None, smoke: bool = False) -> LlamaConfig:
    kw = dict((SMOKE_SHAPES if smoke else SHAPES)[shape])
    if num_layers:
        kw["num_hidden_layers"] = num_layers
    return LlamaConfig(vocab_size=32000, num_key_value_heads=kw["num_attention_heads"], **kw)


def random_sharded_model(config: LlamaConfig, tp: TPGroup, device: torch.device,
                         dtype: torch.dtype = torch.float16) -> LlamaForCausalLM:
    """Build on meta, shard, then materialize only this rank's shard on the GPU with random values."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shard_model(model, tp)
    model = model.to(dtype).to_empty(device=device)  # fp16 on meta first: no fp32 copy on the GPU
    g = torch.Generator(device=device).manual_seed(tp.rank)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, 0.02, generator=g)
    return model


def random_stack(num_slots: int, n: int, k: int, bits: int, group: int, device: torch.device) -> PackedDeltaStack:
    """Valid random packed 2:4 deltas [num_slots, n, k] generated on the device; on CUDA marked tile-major where
    the worker keeps them so (4-bit, N and K whole tiles: random words are random in any order)."""
    p = sbmm_stacks.random_stack(num_slots, n, k, bits, group, device)
    tiled = device.type == "cuda" and layout.tiled4_format_ok("sparse24", bits, (n, k))
    return PackedDeltaStack(p["qweight"], p["meta"], p["scales"], None, bits, group, True, (n, k), tiled)


class StackDeltaOps:
    """DeltaOps over one PackedDeltaStack per linear; rows in equal segments, one per delta slot."""

    def __init__(self, stacks: dict[str, PackedDeltaStack], num_deltas: int, rows_per_delta: int) -> None:
        self.stacks = stacks
        self.starts = torch.arange(0, (num_deltas + 1) * rows_per_delta, rows_per_delta, dtype=torch.int32)
        self.slots = torch.arange(num_deltas, dtype=torch.int32)

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        stack = self.stacks.get(name)
        if stack is not None:
            apply_deltas(x, y, stack, self.starts, self.slots, check=False)

    def norm_weight(self, name, weight, x):
        return None

    def embedding(self, name, input_ids, h) -> None:
        return None


def delta_stacks(model: LlamaForCausalLM, num_deltas: int, bits: int, group: int) -> dict[str, PackedDeltaStack]:
    """One stack per layer linear, shaped like this rank's shard of it."""
    stacks = {}
    for layer in model.model.layers:
        for mod in (*[getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
                    *[getattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")]):  # fmt: skip
            n, k = mod.weight.shape
            stacks[mod.hf_name] = random_stack(num_deltas, n, k, bits, group, mod.weight.device)
    return stacks


def decode_step_fn(model: LlamaForCausalLM, num_seqs: int, context_len: int, block_size: int, device, ops):
    """A closure running one decode step (forward + logits) of num_seqs sequences at context_len."""
    from deltazip.model.context import AttentionMetadata

    blocks_per_seq = -(-context_len // block_size)
    pos = context_len - 1
    tables = torch.arange(num_seqs * blocks_per_seq, device=device).view(num_seqs, blocks_per_seq)
    attn = AttentionMetadata(
        positions=torch.full((num_seqs,), pos, device=device),
        slot_mapping=tables[:, pos // block_size] * block_size + pos % block_size,
        block_tables=tables,
        context_lens=torch.full((num_seqs,), context_len, device=device),
        query_start_loc=torch.arange(num_seqs + 1, device=device),
        max_query_len=1, max_context_len=context_len,
    )  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (num_seqs,), device=device)

    def step() -> torch.Tensor:
        hidden = model(ids, ForwardContext(attn=attn, deltas=ops))
        return model.compute_logits(hidden, ForwardContext(deltas=ops)).argmax(-1)

    return step, blocks_per_seq * num_seqs


def time_steps(step, tp: TPGroup, num_steps: int, cuda: bool = True) -> float:
    """Median µs of one step on this rank (all ranks step together: each row-parallel layer all-reduces)."""
    for _ in range(3):
        step()
    if not cuda:  # --cpu-smoke: wall clock, only to exercise the path
        start = time.perf_counter()
        for _ in range(num_steps):
            step()
        return (time.perf_counter() - start) / num_steps * 1e6
    torch.cuda.synchronize()
    times = []
    for _ in range(num_steps):
        if tp.size > 1:
            torch.distributed.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def run_rank(rank: int, size: int, init_method: str, job: dict, out_path: str) -> None:
    """One rank of one configuration; rank 0 writes its row to out_path."""
    cuda = not job.get("smoke")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    tp = init_tp_group(rank, size, init_method, device) if size > 1 else TPGroup()
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            config = config_of(job["shape"], job["num_layers"], smoke=not cuda)
            model = random_sharded_model(config, tp, device, torch.float16 if cuda else torch.float32)
            num_seqs = job["num_deltas"] * job["rows_per_delta"]
            blocks = -(-job["context_len"] // job["block_size"]) * num_seqs
            model.allocate_kv_cache(blocks, job["block_size"])
            ops = StackDeltaOps(delta_stacks(model, job["num_deltas"], job["bits"], job["group_size"]),
                                job["num_deltas"], job["rows_per_delta"])  # fmt: skip
            step_delta, _ = decode_step_fn(model, num_seqs, job["context_len"], job["block_size"], device, ops)
            step_base, _ = decode_step_fn(model, num_seqs, job["context_len"], job["block_size"], device, None)
            us = time_steps(step_delta, tp, job["num_steps"], cuda)
            base_us = time_steps(step_base, tp, job["num_steps"], cuda)
            mem = torch.cuda.max_memory_allocated(device) if cuda else 0
        if rank == 0:
            row = {"model_shape": job["shape"], "tp": size, "num_deltas": job["num_deltas"],
                   "rows_per_delta": job["rows_per_delta"], "batch": num_seqs, "context_len": job["context_len"],
                   "bits": job["bits"], "num_layers": config.num_hidden_layers, "us": us,
                   "step_ms": us / 1e3, "tokens_per_s": num_seqs / (us / 1e6), "base_us": base_us,
                   "step_vs_base": us / base_us, "max_mem_gib_rank0": mem / 2**30}  # fmt: skip
            Path(out_path).write_text(json.dumps(row))
    finally:
        destroy_tp_group(tp)


def run_job(size: int, job: dict) -> dict:
    """Spawn `size` ranks for one configuration and return rank 0's row."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        store = "file://" + os.path.join(tmp, "store")  # rendezvous through a file: no port to pick
        mp.start_processes(run_rank, args=(size, store, job, out), nprocs=size, start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--num-deltas", type=int, default=16)
    p.add_argument("--rows-per-delta", type=int, default=2)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--num-steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="4 layers per model: a smoke run of the code path")
    p.add_argument("--with-13b-tp1", action="store_true",
                   help="also 13B at TP=1 (~110 GiB with 16 deltas: an H200 only)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU (gloo ranks, torch reference for SBMM): checks the code path, no timings")
    p.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
    a = p.parse_args()
    num_gpus = 2 if a.cpu_smoke else torch.cuda.device_count()
    if num_gpus < 1:
        sys.exit("bench/tp.py needs CUDA GPUs (2 for the TP=2 rows)")
    base_job = dict(num_deltas=a.num_deltas, rows_per_delta=a.rows_per_delta, context_len=a.context_len,
                    block_size=16, bits=4, group_size=128, num_steps=a.num_steps,
                    num_layers=4 if a.quick else None, smoke=a.cpu_smoke)  # fmt: skip
    plan = [("7b", 1), ("13b", 2), ("7b", 2)] + ([("13b", 1)] if a.with_13b_tp1 else [])
    rows = []
    for shape, size in plan:
        if size > num_gpus:
            print(f"skip {shape} TP={size}: {num_gpus} GPU(s)", flush=True)
            continue
        row = run_job(size, {**base_job, "shape": shape})
        print(json.dumps(row), flush=True)
        rows.append(row)
    ref = next((r for r in rows if r["model_shape"] == "7b" and r["tp"] == 1), None)
    for r in rows:
        if ref is not None:
            r["speedup_vs_7b_tp1"] = r["tokens_per_s"] / ref["tokens_per_s"]
    device_name = "cpu-smoke" if a.cpu_smoke else torch.cuda.get_device_name()
    device = f"{num_gpus}x {device_name}"
    date = datetime.date.today().isoformat()
    path = Path(a.out) / f"tp-{device_name.replace(' ', '-')}-x{num_gpus}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"bench": "tp", "device": device, "commit": a.commit, "date": date,
              "config": {**{k: v for k, v in base_job.items()}, "dtype": "float16", "sym": True, "sparsity": "2:4",
                         "shapes": SHAPES, "timing": "eager decode step, median over steps on rank 0",
                         "torch": torch.__version__, "quick": a.quick},
              "rows": rows}  # fmt: skip
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
