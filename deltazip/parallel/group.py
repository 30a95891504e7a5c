"""Process group of one tensor-parallel worker: nccl on CUDA, gloo on CPU.

NVLink-multicast / NCCL env vars are left exactly as the caller's environment sets them.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This process's place in the tensor-parallel group; size 1 means no communication at all."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup, None = default (WORLD)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (no-op for size 1); returns t."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In-place broadcast from `src` (rank 0 decides sampled tokens so all ranks agree)."""
        if self.size > 1:
            dist.broadcast(t, src=src, group=self.group)
        return t


def default_backend(device: str | torch.device) -> str:
    """nccl for CUDA devices, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_tp_group(
    rank: int,
    size: int,
    init_method: str,
    device: str | torch.device = "cpu",
    backend: str | None = None,
    timeout_s: float = 120.0,
) -> TPGroup:
    """Join the default process group (one per worker process) and return its TP handle.

    init_method: e.g. "tcp://127.0.0.1:29500" (the worker's launcher picks a free port).
    On CUDA, rank r uses cuda:r unless `device` names another index.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside 0..{size - 1}")
    backend = backend or default_backend(device)
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend {backend!r} is not supported; use 'nccl' (CUDA) or 'gloo' (CPU)")
    if size == 1:
        return TPGroup()
    kwargs = {}
    if backend == "nccl":
        dev = torch.device(device)
        dev = torch.device("cuda", rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev  # binds the communicator eagerly, so the first all-reduce is not a setup
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s), **kwargs,
    )  # fmt: skip
    return TPGroup(rank=rank, size=size, group=None)


def destroy_tp_group(tp: TPGroup) -> None:
    """Leave the process group (safe for size 1). Call it after a barrier on the success path: a rank that
    tears gloo down while a peer is still mid-collective can abort the peer."""
    if tp.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def quiesce(tp: TPGroup, timeout_s: float = 60.0) -> None:
    """Barrier, then wait through the rendezvous store (not the group) until every rank has left it.

    After this no rank still reads a collective, so tearing the group down cannot abort a peer: a gloo
    rank that leaves a barrier first and closes its sockets can otherwise kill one still finishing it.
    """
    if tp.size == 1:
        return
    dist.barrier(group=tp.group)
    store = dist.distributed_c10d._get_default_store()
    store.add("dz_tp_quiesced", 1)
    deadline = time.monotonic() + timeout_s
    while store.add("dz_tp_quiesced", 0) < tp.size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every TP rank quiesced within {timeout_s}s")
        time.sleep(0.005)
