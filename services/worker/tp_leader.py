"""Rank 0 of a tensor-parallel worker: starts the followers, and mirrors onto them every engine step and
every delta slot write/drop, so all ranks run the same SPMD forward over the same slots.

Rank 0 keeps everything that decides (gRPC, engine loop, batch scheduler, KV block manager, residency,
Redis heartbeats; the worker registers once). Followers (tp_follower.py) only hold shards. Commands travel
in one order over a pipe per follower; step tensors follow as a broadcast over the TP group. A follower
that dies ends the worker process (exit 1): its collectives would hang, and the lapsing heartbeat makes
the schedulers route elsewhere.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection, wait

import torch
import torch.multiprocessing as mp

from deltazip.logs import get_logger
from services.worker.config import WorkerConfig
from services.worker.tier_io import ArtifactTierIO
from services.worker.tp_protocol import (
    Ack,
    AllocateKV,
    DropDelta,
    LoadDelta,
    Ready,
    Rows,
    Stop,
    rank_device,
    send_step_tensors,
    step_header,
)

log = get_logger("services.worker.tp")
FOLLOWER_DIED_EXIT_CODE = 1


class TPLeader:
    """The TP group seen from rank 0: followers, their pipes, and the rank-0 end of every command."""

    def __init__(self, config: WorkerConfig, device: str, start_timeout_s: float = 600.0) -> None:
        from deltazip.parallel import init_tp_group

        self.size, self.device = config.tensor_parallel_size, rank_device(device, 0)
        last = rank_device(device, self.size - 1)
        if last.type == "cuda" and last.index >= torch.cuda.device_count():
            raise ValueError(f"--tensor-parallel-size {self.size} on {device} needs {last} but only "
                             f"{torch.cuda.device_count()} CUDA device(s) are visible")
        self._store_dir = tempfile.mkdtemp(prefix=f"dz-tp-{config.worker_id}-")
        init_method = "file://" + os.path.join(self._store_dir, "store")
        ctx = mp.get_context("spawn")  # followers start with no CUDA state of ours
        self._conns: list[Connection] = []
        self._procs = []
        from services.worker.tp_follower import follower_main

        for rank in range(1, self.size):
            ours, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=follower_main, args=(rank, self.size, init_method, config, device, theirs),
                               name=f"dz-worker-tp{rank}", daemon=True)  # fmt: skip
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
        self._closing = False
        self._send_lock = threading.Lock()
        self._ready: dict[int, Future] = {rank: Future() for rank in range(1, self.size)}
        self._pending: dict[int, tuple[Future, list[Ack]]] = {}
        self._pending_lock = threading.Lock()
        self._load_ids = itertools.count()
        for conn in self._conns:
            threading.Thread(target=self._receive, args=(conn,), name="tp-acks", daemon=True).start()
        threading.Thread(target=self._monitor, name="tp-monitor", daemon=True).start()
        self.tp = init_tp_group(0, self.size, init_method, self.device, timeout_s=start_timeout_s)
        self._start_timeout_s = start_timeout_s
        log.info("tp_group_started", size=self.size, device=str(self.device))

    # ---- startup -------------------------------------------------------------------------------
    def load_model(self, base_dir: str, dtype: torch.dtype):
        """Rank 0's shard of the base (followers load theirs at the same time)."""
        from deltazip.parallel.load import load_sharded_model

        return load_sharded_model(base_dir, self.tp, self.device, dtype)

    def follower_kv_blocks(self) -> int:
        """The fewest KV blocks any follower fits (waits until every follower has loaded its shard)."""
        return min(f.result(self._start_timeout_s).num_kv_blocks for f in self._ready.values())

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        self._broadcast(AllocateKV(num_blocks, block_size))

    # ---- per step and per delta ----------------------------------------------------------------
    def step(self, input_ids: torch.Tensor, attn, rows: Rows) -> None:
        """Engine thread, right before rank 0's forward: the followers run the same one."""
        self._broadcast(step_header(input_ids, attn, rows))
        send_step_tensors(input_ids, attn)

    def start_load(self, name: str, path: str, slot: int, trust_stamp: bool = False) -> Future:
        """Every follower writes its shard of `name` into `slot`; the Future resolves once all acked."""
        load_id, future = next(self._load_ids), Future()
        with self._pending_lock:
            self._pending[load_id] = (future, [])
        self._broadcast(LoadDelta(load_id, name, path, slot, trust_stamp))
        return future

    def drop(self, slot: int) -> None:
        self._broadcast(DropDelta(slot))

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the followers (after the engine loop stopped) and leave the group."""
        from deltazip.parallel.group import destroy_tp_group

        self._closing = True
        try:
            self._broadcast(Stop())
        except OSError:
            pass  # a follower is already gone
        for proc in self._procs:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
        destroy_tp_group(self.tp)
        shutil.rmtree(self._store_dir, ignore_errors=True)

    # ---- internals -----------------------------------------------------------------------------
    def _broadcast(self, msg) -> None:
        with self._send_lock:  # one order for every follower: engine steps and residency loads interleave
            for conn in self._conns:
                conn.send(msg)

    def _receive(self, conn: Connection) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # the monitor reports the dead follower
            if isinstance(msg, Ready):
                self._ready[msg.rank].set_result(msg)
            elif isinstance(msg, Ack):
                self._on_ack(msg)

    def _on_ack(self, ack: Ack) -> None:
        with self._pending_lock:
            future, acks = self._pending[ack.load_id]
            acks.append(ack)
            if len(acks) < self.size - 1:
                return
            del self._pending[ack.load_id]
        errors = [a.error for a in acks if a.error]
        if errors:
            future.set_exception(RuntimeError("delta load failed on a tensor-parallel rank: " + "; ".join(errors)))
        else:
            future.set_result(sum(a.num_bytes for a in acks))

    def _monitor(self) -> None:
        wait([p.sentinel for p in self._procs])
        if self._closing:
            return
        dead = [(i + 1, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive()]
        log.error("tp_follower_died", ranks=dead, action="worker exits")
        os._exit(FOLLOWER_DIED_EXIT_CODE)  # the engine thread may be blocked in a collective forever


class LeaderModel:
    """Rank 0's sharded model as the engine sees it: each forward is first announced to the followers."""

    def __init__(self, model, leader: TPLeader) -> None:
        self._model = model
        self._leader = leader

    def __call__(self, input_ids: torch.Tensor, ctx):
        deltas = ctx.deltas  # StepDeltaOps: segment row offsets and slots, the layout every rank uses
        rows = () if deltas is None else tuple(
            (None if s < 0 else s, b - a) for s, a, b in zip(deltas.seg_slot, deltas.starts, deltas.starts[1:]))
        self._leader.step(input_ids, ctx.attn, rows)
        return self._model(input_ids, ctx)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, *args, **kwargs):
        self._leader.allocate_kv(num_blocks, block_size)
        return self._model.allocate_kv_cache(num_blocks, block_size, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class TPTierIO(ArtifactTierIO):
    """ArtifactTierIO whose device writes and drops happen on every rank (each shards the one artifact)."""

    def __init__(self, leader: TPLeader, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._leader = leader
        self._paths: dict[str, str] = {}

    def load_host(self, name: str, path: str) -> tuple[dict, int]:
        self._paths[name] = path  # followers read the artifact from the same disk cache
        return super().load_host(name, path)

    def to_device(self, name: str, host: dict, slot: int) -> int:
        followers = self._leader.start_load(name, self._paths[name], slot, self._trust_stamps)
        num_bytes = super().to_device(name, host, slot)
        followers.result()  # the slot is ready only when every rank holds its shard
        return num_bytes

    def drop_device(self, name: str, slot: int) -> None:
        self._leader.drop(slot)
        super().drop_device(name, slot)


def leader_engine_setup(leader: TPLeader, model, config: WorkerConfig) -> tuple[LeaderModel, WorkerConfig]:
    """The model the engine drives, and the config with the KV blocks every rank fits (min over ranks)."""
    import dataclasses

    from services.worker.engine_adapter import kv_blocks_from_memory

    num_blocks = config.num_kv_blocks or min(kv_blocks_from_memory(model, config), leader.follower_kv_blocks())
    leader.follower_kv_blocks()  # every follower is ready before the first command that needs its shard
    return LeaderModel(model, leader), dataclasses.replace(config, num_kv_blocks=num_blocks)
