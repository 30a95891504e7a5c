"""Continuous batching: which sequences run this step, and how many of their tokens.

Policy, in order:
1. Running sequences, oldest first; decodes before prefill chunks so long prompts don't stall streams.
   Under KV pressure the newest running sequence is preempted (blocks freed, recomputed later).
2. Waiting sequences in arrival order, with chunked prefill under the token budget:
   - a sequence whose delta is not ready (`is_delta_ready`) is skipped and blocks nobody;
   - at most `max_deltas_per_batch` distinct deltas are running (the base model is not a delta);
     a sequence of another delta waits while later ones of running deltas go ahead, until it has
     waited `max_delta_wait_s`: then one running delta (the one with the fewest running sequences)
     takes no new sequences until its last one ends, and the aged sequence gets its place (aging: no
     model starves). The other running deltas keep filling the batch meanwhile: with hundreds of
     requests queued over many fine-tunes some sequence is always aged, and holding every delta back
     (as this did before) shrank the batch to a few sequences.
   With `base_is_model` (swap mode) the base counts as a model too (key `BASE_MODEL`), so one
   model at a time means base rows never share a batch with fine-tuned rows.
3. `prefill_first` (off by default): while sequences decode, a step with prompt work left (prefill chunks of
   running sequences, or waiting sequences that 2. admits) runs those alone, without the decodes, and the next
   step runs the decodes alone; then prompt work again. A new prompt waits for at most one decode step (on CUDA a
   graph replay) and its own step no longer carries every running sequence's rows: with deltas those rows are
   one SBMM segment per running fine-tune, eager (the hypothesis: a third of a mixed step's SBMM). Decodes skip at
   most every other step. A prompt-only turn that admits nothing (deltas not ready, no KV room) falls back to a
   mixed step, so decodes never wait for nothing. Measured on an H200 (docs/serving.md, session 27): prompt steps
   did not get shorter (prompts pile up during the decode turns) and TTFT p90 rose for base and delta alike, so
   it stays off.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.sequence import FinishReason, Sequence, SequenceStatus

BASE_MODEL = ""  # the base model's key where it counts as a model (swap mode)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_deltas_per_batch: int = 8
    max_delta_wait_s: float = 2.0
    base_is_model: bool = False  # swap mode: the base is one more model (needs readiness, takes a place)
    prefill_first: bool = False  # prompt work and decodes in alternate steps (policy 3 above)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_deltas_per_batch < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_deltas_per_batch must be >= 1")
        if self.max_delta_wait_s < 0:
            raise ValueError(f"max_delta_wait_s must be >= 0, got {self.max_delta_wait_s}")


@dataclass(slots=True)
class ScheduledBatch:
    items: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    preempted: list[Sequence] = field(default_factory=list)
    ended: list[Sequence] = field(default_factory=list)  # finished by the scheduler (no KV room at all)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)


class BatchScheduler:
    """Owns the waiting and running queues."""

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        is_delta_ready: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        can_swap_in: Callable[[str], bool] | None = None,
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.is_delta_ready = is_delta_ready or (lambda name: True)
        self.can_swap_in = can_swap_in or (lambda key: True)  # swap mode: the model's weights are on the host
        self.clock = clock
        self.waiting: list[Sequence] = []  # sorted by (arrival_s, admission counter)
        self.running: list[Sequence] = []  # in admission order
        self._order: dict[int, tuple[float, int]] = {}
        self._counter = 0
        self.num_preemptions = 0  # total, for stats
        self._draining: str | None = None  # running delta taking no new sequences, so an aged one gets its place
        self._decode_turn = False  # prefill_first: the last step left the decodes out, so this one runs them

    # ---- queue maintenance ----------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self._order[id(seq)] = (seq.arrival_s, self._counter)
        self._counter += 1
        self._enqueue_waiting(seq)

    def _enqueue_waiting(self, seq: Sequence) -> None:
        keys = [self._order[id(s)] for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, self._order[id(seq)]), seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Mark seq finished and release its blocks and queue place."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        self._order.pop(id(seq), None)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.request_id == request_id), None)

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    def waiting_deltas(self) -> set[str]:
        """Deltas that queued sequences need (for the worker to load)."""
        return {s.delta for s in self.waiting if s.delta is not None}

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SequenceStatus.PREEMPTED
        self._enqueue_waiting(seq)

    # ---- one step -------------------------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        if self.config.prefill_first and any(s.num_uncomputed_tokens == 1 for s in self.running):
            if self._decode_turn:
                self._decode_turn = False
                self._schedule_running(batch, budget, only_decodes=True)
                return batch
            if self.waiting or any(s.num_uncomputed_tokens > 1 for s in self.running):
                self._admit_waiting(batch, self._schedule_running(batch, budget, only_decodes=False))
                if batch.items:
                    self._decode_turn = True
                    return batch  # else nothing to prefill could run: a mixed step below, decodes not held back
        self._decode_turn = False
        budget = self._schedule_running(batch, budget)
        self._admit_waiting(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int, only_decodes: bool | None = None) -> int:
        """Schedule running sequences: decodes first, then prefill chunks; each group oldest first. Victims: newest
        unscheduled. only_decodes: True schedules the decodes alone, False the prefill chunks alone (None: both)."""
        pending = sorted((s for s in self.running if only_decodes is None
                          or (s.num_uncomputed_tokens == 1) == only_decodes),
                         key=lambda s: (s.num_uncomputed_tokens > 1, self._order[id(s)]))
        while pending and budget > 0:
            seq = pending.pop(0)
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.blocks.can_allocate(seq, num_new) and pending:
                victim = max(pending, key=lambda s: self._order[id(s)])
                pending.remove(victim)
                self._preempt(victim)
                batch.preempted.append(victim)
            if not self.blocks.can_allocate(seq, num_new):
                if self._holders_elsewhere(seq):
                    self._preempt(seq)  # others hold the room; retry once they finish
                    batch.preempted.append(seq)
                else:
                    self.finish(seq, FinishReason.LENGTH)  # alone and still no room: cache is too small
                    batch.ended.append(seq)
                continue
            self.blocks.allocate(seq, num_new)
            batch.items.append((seq, num_new))
            budget -= num_new
        return budget

    def _holders_elsewhere(self, seq: Sequence) -> bool:
        return any(s is not seq and s.block_table for s in self.running)

    def _model_key(self, seq: Sequence) -> str | None:
        """What counts against max_deltas_per_batch (None: nothing, the shared base)."""
        if seq.delta is None and self.config.base_is_model:
            return BASE_MODEL
        return seq.delta

    def _drain_one(self, counts: dict[str, int]) -> None:
        """An aged sequence waits for a delta place: pick the running delta that frees one soonest (fewest running
        sequences; the oldest admitted on a tie) to take no new sequences. One at a time, kept until it leaves or
        a whole pass over the waiting queue finds no aged sequence waiting for a place any more."""
        if self._draining is None and counts:
            self._draining = min(counts, key=lambda k: counts[k])

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        counts: dict[str, int] = {}  # running sequences per model key, in admission order
        for key in map(self._model_key, self.running):
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
        deltas = set(counts)
        if self._draining not in deltas:
            self._draining = None  # it has left: its place goes to the oldest waiting sequence of another delta
        now = self.clock()
        wanted, scanned_all = False, True  # an aged sequence still waits for a place / every waiting one was seen
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                scanned_all = False
                break
            key = self._model_key(seq)
            aged = now - seq.arrival_s >= self.config.max_delta_wait_s
            if seq in batch.preempted or (key is not None and not self.is_delta_ready(key)):
                # swap: an aged model (not the running one) whose weights could be swapped in drains the active one
                if (self.config.base_is_model and key is not None and key not in deltas and aged
                        and self.can_swap_in(key)):
                    wanted = True
                    self._drain_one(counts)
                continue
            if key is not None and key not in deltas:
                if len(deltas) >= self.config.max_deltas_per_batch:
                    if aged:
                        wanted = True
                        self._drain_one(counts)
                    continue
            elif key is not None and key == self._draining:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq, num_new):
                scanned_all = False
                break  # FCFS under KV pressure: don't let later sequences jump ahead
            self.waiting.remove(seq)
            self.blocks.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if key is not None:
                deltas.add(key)
            batch.items.append((seq, num_new))
            budget -= num_new
        if scanned_all and not wanted:
            self._draining = None  # whoever asked for the place got in (or went away): stop draining
