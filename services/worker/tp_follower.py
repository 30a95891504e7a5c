"""A follower rank of a tensor-parallel worker: holds its shard of the base and of every resident delta,
and runs each engine step's forward when rank 0 says so (no scheduler, no sampling, no gRPC).

Loop: receive a command from rank 0's pipe -> Step: join the step's broadcast and run the forward (the
row-parallel all-reduces pair with rank 0's) | LoadDelta: hand to the loader thread, which shards the
artifact from the host's disk cache into this rank's DeviceSlots and acks | DropDelta | Stop. The pipe
closing (rank 0 gone) ends the process. While no command waits, a CUDA follower compiles the SBMM kernels of
its new delta stacks ahead, in slices (`warm_up`, as rank 0's engine does): a follower compiling inside a step
would hold every rank at that step's all-reduce.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

import torch

from deltazip.logs import configure_logging, get_logger
from services.worker.config import WorkerConfig
from services.worker.tp_protocol import (
    Ack,
    AllocateKV,
    DropDelta,
    LoadDelta,
    Ready,
    Step,
    Stop,
    rank_device,
    recv_step_tensors,
)

log = get_logger("services.worker.tp_follower")
IDLE_POLL_S = 0.05  # how often an idle follower looks for new delta stacks to warm up


def follower_main(rank: int, size: int, init_method: str, config: WorkerConfig, device: str,
                  conn: Connection) -> None:
    """Entry of follower process `rank` (spawned by rank 0 before it touches CUDA)."""
    configure_logging(config.log_level, service="worker")
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    follower = Follower(rank, size, init_method, config, rank_device(device, rank), conn)
    try:
        follower.run()
    except (EOFError, OSError):
        log.warning("tp_rank0_gone", rank=rank)  # rank 0 exited: nothing left to serve
    finally:
        follower.close()


class Follower:
    def __init__(self, rank: int, size: int, init_method: str, config: WorkerConfig, device: torch.device,
                 conn: Connection) -> None:
        from deltazip.parallel import init_tp_group
        from deltazip.parallel.load import load_sharded_model
        from services.worker.device_slots import slots_for_model
        from services.worker.engine_adapter import kv_blocks_from_memory
        from services.worker.modes import host_transform, select_mode

        self.rank, self.device, self.conn = rank, device, conn
        config.apply_kernel_flags()  # the leader's switches: every rank runs the same kernels
        self.tp = init_tp_group(rank, size, init_method, device)
        dtype = getattr(torch, config.dtype)
        self.model = load_sharded_model(config.base_dir, self.tp, device, dtype)
        self.slots = slots_for_model(self.model, config.num_device_slots, device, dtype, config.sparse_mma_2bit,
                                     config.fused_projections)
        self.transform = host_transform(select_mode(config.mode), None, device)
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tp{rank}-loader")
        self.send_lock = threading.Lock()
        self.max_tokens, self.max_segments = config.max_num_batched_tokens, config.max_deltas_per_batch + 2
        self.warmed_version, self.warm_seen, self.warm_failed = 0, set(), False  # kernels/sbmm_warmup.py
        num_blocks = config.num_kv_blocks or kv_blocks_from_memory(self.model, config)
        self.send(Ready(rank, num_blocks))
        log.info("tp_follower_ready", rank=rank, device=str(device), num_kv_blocks=num_blocks)

    def send(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    def run(self) -> None:
        """Serve commands until Stop (or rank 0's pipe closes: EOFError); warm kernels up while none waits."""
        while True:
            if not self.conn.poll(0 if self.warm_pending() else IDLE_POLL_S):
                self.warm_up()
                continue
            msg = self.conn.recv()
            if isinstance(msg, Step):
                self.forward(msg)
            elif isinstance(msg, LoadDelta):
                self.settle()
                self.loader.submit(self.load, msg)
            elif isinstance(msg, DropDelta):
                self.settle()
                self.slots.drop(msg.slot)
            elif isinstance(msg, AllocateKV):
                self.model.allocate_kv_cache(msg.num_blocks, msg.block_size)
            elif isinstance(msg, Stop):
                return
            else:
                raise AssertionError(f"unknown TP command {msg!r}")

    def warm_pending(self) -> bool:
        """Whether delta stacks appeared since the last finished warm-up (CUDA; never after a failed one)."""
        return (self.device.type == "cuda" and not self.warm_failed
                and self.warmed_version != self.slots.layout_version)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One slice (model_runner.WARMUP_SLICE_S) of compiling the SBMM variants this rank's forwards can launch on
        its stacks: eager forwards of up to max_num_batched_tokens rows in up to max_deltas_per_batch + 2
        segments (followers run no CUDA graphs). A failure is logged and ends warm-ups: kernels then compile on
        first use, as before."""
        from kernels import sbmm_warmup
        from services.worker.engine.model_runner import WARMUP_SLICE_S

        if not self.warm_pending():
            return
        version, start = self.slots.layout_version, time.perf_counter()
        try:
            launched, finished = sbmm_warmup.warm_up_stacks(
                self.slots.stacks(), self.slots.dtype,
                self.max_tokens, self.max_segments, seen=self.warm_seen, deadline=start + WARMUP_SLICE_S)
        except Exception:  # an optimization: never a reason to stop serving
            log.exception("tp_warm_up_failed", rank=self.rank)
            self.warm_failed = True
            return
        if finished:
            self.warmed_version = version
        if launched or finished:  # a last slice may finish with nothing left to launch: it still says so
            log.info("sbmm_warmed_up", rank=self.rank, launches=launched, layout_version=version, finished=finished,
                     seconds=round(time.perf_counter() - start, 3))

    @torch.inference_mode()
    def forward(self, step: Step) -> None:
        from deltazip.model.context import ForwardContext
        from services.worker.delta_ops import StepDeltaOps

        ids, attn = recv_step_tensors(step, self.device)
        deltas = StepDeltaOps(self.slots, step.rows) if step.rows else None
        self.model(ids, ForwardContext(attn=attn, deltas=deltas))  # hidden states are rank 0's business

    def settle(self) -> None:
        """Steps already issued finish before a slot changes (they may still read it on the device)."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def load(self, cmd: LoadDelta) -> None:
        from deltazip.artifact import load_delta
        from deltazip.parallel import shard_delta

        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            tensors = load_delta(cmd.path, "cpu", trust_stamp=cmd.trust_stamp)
            tensors = self.transform(shard_delta(tensors, self.model.shard_plan, "dense"))
            num_bytes = self.slots.write(cmd.slot, cmd.name, tensors)
        except Exception as exc:  # reported to rank 0, which fails the delta for its requests
            log.exception("tp_delta_load_failed", rank=self.rank, model=cmd.name)
            self.send(Ack(cmd.load_id, self.rank, error=f"rank {self.rank}: {exc!r}"))
            return
        self.send(Ack(cmd.load_id, self.rank, num_bytes))

    def close(self) -> None:
        from deltazip.parallel.group import destroy_tp_group

        self.loader.shutdown(wait=True, cancel_futures=True)
        destroy_tp_group(self.tp)
