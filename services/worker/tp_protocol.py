"""What rank 0 of a tensor-parallel worker tells its followers, and how one engine step travels.

Commands go over one pipe per follower, in one order (steps, delta loads and drops interleave exactly
as rank 0 issued them). A step's tensors then follow as one flat int64 broadcast over the TP group
(NCCL device-to-device on CUDA), so rank 0 never copies its metadata back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from deltazip.model.context import AttentionMetadata

Rows = tuple[tuple[int | None, int], ...]  # (delta slot or None for base, number of rows), in row order


@dataclass(frozen=True, slots=True)
class Ready:
    """Follower -> rank 0, once its shard is loaded: the KV blocks that fit on its device."""

    rank: int
    num_kv_blocks: int


@dataclass(frozen=True, slots=True)
class AllocateKV:
    num_blocks: int
    block_size: int


@dataclass(frozen=True, slots=True)
class Step:
    """Header of one forward; the tensors follow as a broadcast of `num_ints` int64 values."""

    num_tokens: int
    num_seqs: int
    max_blocks: int
    max_query_len: int
    max_context_len: int
    rows: Rows

    @property
    def num_ints(self) -> int:
        return 3 * self.num_tokens + self.num_seqs * self.max_blocks + 2 * self.num_seqs + 1


@dataclass(frozen=True, slots=True)
class LoadDelta:
    """Write the rank's shard of the artifact at `path` into `slot`; answered by an Ack with the same id."""

    load_id: int
    name: str
    path: str
    slot: int
    trust_stamp: bool = False  # skip the sha256 of shards the folder's verified stamp vouches for (load_delta)


@dataclass(frozen=True, slots=True)
class DropDelta:
    slot: int


@dataclass(frozen=True, slots=True)
class Ack:
    load_id: int
    rank: int
    num_bytes: int = 0
    error: str = ""  # non-empty: the load failed on this rank


@dataclass(frozen=True, slots=True)
class Stop:
    pass


def step_header(input_ids: torch.Tensor, attn: AttentionMetadata, rows: Rows) -> Step:
    num_seqs, max_blocks = attn.block_tables.shape
    return Step(input_ids.shape[0], num_seqs, max_blocks, attn.max_query_len, attn.max_context_len, rows)


def send_step_tensors(input_ids: torch.Tensor, attn: AttentionMetadata) -> None:
    """Rank 0: broadcast the step's tensors as one flat int64 tensor."""
    flat = torch.cat([input_ids.long(), attn.positions.long(), attn.slot_mapping.long(),
                      attn.block_tables.long().reshape(-1), attn.context_lens.long(), attn.query_start_loc.long()])
    dist.broadcast(flat, src=0)


def recv_step_tensors(step: Step, device: torch.device) -> tuple[torch.Tensor, AttentionMetadata]:
    """Followers: the step's input ids and attention metadata, from rank 0's broadcast."""
    flat = torch.empty(step.num_ints, dtype=torch.long, device=device)
    dist.broadcast(flat, src=0)
    t, s = step.num_tokens, step.num_seqs
    ids, positions, slot_mapping, tables, ctx_lens, qsl = flat.split([t, t, t, s * step.max_blocks, s, s + 1])
    attn = AttentionMetadata(positions=positions, slot_mapping=slot_mapping,
                             block_tables=tables.view(s, step.max_blocks), context_lens=ctx_lens,
                             query_start_loc=qsl, max_query_len=step.max_query_len,
                             max_context_len=step.max_context_len)  # fmt: skip
    return ids, attn


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: cpu for every rank, or cuda:(first + r) where `device` is cuda or cuda:first."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    return torch.device("cuda", (dev.index or 0) + rank)
