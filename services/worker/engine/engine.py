"""LLMEngine: one step = receive -> schedule -> run -> process results."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import structlog

from deltazip.model.llama import LlamaForCausalLM
from deltazip.model.sampling import Sampler, SamplingParams
from deltazip.model.tokenizer import StopChecker, Tokenizer
from kernels import compile_watch
from services.worker.engine.batch_scheduler import BatchScheduler, ScheduledBatch, SchedulerConfig
from services.worker.engine.block_manager import BlockManager
from services.worker.engine.model_runner import WARMUP_SLICE_S, DeltaOpsProvider, ModelRunner
from services.worker.engine.sequence import FinishReason, Sequence, SequenceStatus
from services.worker.engine.step_profile import SegmentStats, StepProfile
from services.worker.engine.swap import HostWeights, WeightSwapper

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    num_kv_blocks: int = 512
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_deltas_per_batch: int = 8
    max_delta_wait_s: float = 2.0
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    cuda_graphs: bool = False  # decode-only steps replay captured CUDA graphs (CUDA only; eager is the reference)
    prefill_first: bool = False  # prompt work and decodes in alternate steps (batch_scheduler.py policy 3)

    def __post_init__(self) -> None:
        if self.num_kv_blocks < 1 or self.block_size < 1:
            raise ValueError("num_kv_blocks and block_size must be >= 1")

    def scheduler_config(self, swap: bool = False) -> SchedulerConfig:
        """swap: one model (the base included) at a time."""
        return SchedulerConfig(self.max_num_seqs, self.max_num_batched_tokens,
                               1 if swap else self.max_deltas_per_batch, self.max_delta_wait_s, base_is_model=swap,
                               prefill_first=self.prefill_first)


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request. token_ids include EOS when generated; text never
    includes special tokens nor any part of a stop sequence."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    free_kv_blocks: int
    total_kv_blocks: int
    num_preemptions: int
    waiting_deltas: list[str]
    running_deltas: list[str]


@dataclass(slots=True)
class _TextState:
    decoder: object  # IncrementalDecoder
    stops: StopChecker


class LLMEngine:
    """Continuous-batching generation over one model and many deltas. Thread-safe entry points."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: EngineConfig = EngineConfig(),
        tokenizer: Tokenizer | None = None,
        eos_token_ids: Seq[int] | None = None,
        deltas_provider: DeltaOpsProvider | None = None,
        is_delta_ready: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        swap_weights: HostWeights | None = None,
        swap_base_host: dict | None = None,
        kernel_slots=None,
    ) -> None:
        """swap_weights: the `swap` baseline — merged host weights per delta; the engine swaps them into the
        model one model at a time (deltas_provider and is_delta_ready are then unused). swap_base_host: the base's
        host weights when the caller holds them already (else the swapper copies them). kernel_slots: the
        DeviceSlots deltas_provider reads, so `warm_up` can compile their kernels before a step needs them."""
        self.config = config
        self.swapper = (WeightSwapper(model, swap_weights, swap_base_host) if swap_weights is not None else None)
        self.profile = StepProfile()  # where the steps' time goes (the Worker Status RPC reports it)
        self.segments = SegmentStats()  # how the steps' delta rows split into SBMM segments (Status too)
        if self.swapper is not None:
            deltas_provider, is_delta_ready = None, self.swapper.is_active
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            eos_token_ids = tokenizer.eos_token_ids if tokenizer else model.config.eos_token_ids
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = min(config.max_model_len or model.config.max_position_embeddings,
                                 config.num_kv_blocks * config.block_size)
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = BatchScheduler(config.scheduler_config(swap=self.swapper is not None), self.blocks,
                                        is_delta_ready, clock,
                                        self.swapper.can_swap_in if self.swapper is not None else None)
        self.runner = ModelRunner(model, config.num_kv_blocks, config.block_size,
                                  Sampler(sorted(self.eos_token_ids)), deltas_provider, cuda_graphs=config.cuda_graphs,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  max_segments=config.max_deltas_per_batch + 2,
                                  max_num_batched_tokens=config.max_num_batched_tokens, kernel_slots=kernel_slots)
        self._watch_compiles = self.runner.device.type == "cuda"  # compiles inside a step are stalls: counted
        self.clock = clock
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._lock = threading.Lock()  # engine state: held for a whole step, by abort and stats
        self._ids_lock = threading.Lock()  # only the id set, so add_request never waits for a step
        self._request_ids: set[str] = set()

    # ---- requests -------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: Seq[int], params: SamplingParams, delta: str | None = None
    ) -> None:
        """Queue a request; it joins the next step. Raises ValueError for a request that cannot run."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty: send at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; this worker allows at most {self.max_model_len - 1}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop sequences need a tokenizer; this engine has none")
        with self._ids_lock:
            if request_id in self._request_ids:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._request_ids.add(request_id)
        seq = Sequence(request_id, list(prompt_token_ids), params, delta, arrival_s=self.clock())
        if self.tokenizer is not None:
            seq.text_state = _TextState(self.tokenizer.incremental_decoder(seq.prompt_token_ids),
                                        StopChecker(params.stop))
        self._inbox.put(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already finished."""
        with self._lock:
            self._receive()
            seq = self.scheduler.find(request_id)
            if seq is None:
                return False
            self.scheduler.finish(seq, FinishReason.ABORT)
            self._release_id(request_id)
            log.info("request_aborted", request_id=request_id, model=seq.delta)
            return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or not self._inbox.empty()

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks

    def stats(self) -> EngineStats:
        """Queue and KV occupancy (for the worker's Status and heartbeats)."""
        with self._lock:
            self._receive()
            return EngineStats(
                num_running=len(self.scheduler.running),
                num_waiting=len(self.scheduler.waiting),
                free_kv_blocks=self.blocks.num_free_blocks,
                total_kv_blocks=self.blocks.num_blocks,
                num_preemptions=self.scheduler.num_preemptions,
                waiting_deltas=sorted(self.scheduler.waiting_deltas()),
                running_deltas=sorted({s.delta for s in self.scheduler.running if s.delta is not None}),
            )

    # ---- the step -------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Run one batch; returns an output for every request that produced a token or finished."""
        with self._lock:
            self._receive()
            if self.swapper is not None:
                swaps, start = self.swapper.num_swaps, time.perf_counter()
                self.swapper.before_schedule(self.scheduler)
                if self.swapper.num_swaps > swaps:
                    self.profile.add("swap", time.perf_counter() - start)
            with self.profile.timed("schedule"):
                batch = self.scheduler.schedule()
            compiled = compile_watch.compiled_variants() if self._watch_compiles else 0
            start = time.perf_counter()
            tokens = self.runner.run(batch.items)
            if batch.items:
                warmup = self.runner.last_warmup_s
                if warmup:
                    self.profile.add("warmup", warmup)
                seconds = time.perf_counter() - start - warmup
                self.profile.add(self.runner.last_kind, seconds)
                if self.runner.deltas_provider is not None:  # delta rows run as segments (not swap's merged weights)
                    self.segments.add("prefill" if self.runner.last_kind == "prefill" else "decode",
                                      self.runner.last_segments)
                if self.runner.last_dense_route:
                    self.profile.add("dense_route", seconds)
                if self._watch_compiles:
                    in_step = compile_watch.compiled_variants() - compiled - self.runner.last_warmup_variants
                    self._count_compiles(in_step, seconds)
            with self.profile.timed("results"):
                return self._process_results(batch, tokens)

    def warm_up(self) -> bool:
        """Plan the bucketed eager steps' GEMMs (once: `ModelRunner.warm_up_row_buckets`), then compile the SBMM
        kernels of delta stacks that appeared since the last finished warm-up, one slice of
        model_runner.WARMUP_SLICE_S at a time (CUDA; the engine loop calls this when idle, again while it
        returns True, and looks for requests in between); True if it did any work."""
        with self._lock:
            start = time.perf_counter()
            if self.runner.warm_up_row_buckets(start + WARMUP_SLICE_S):
                self.profile.add("warmup", time.perf_counter() - start)
                return True
            seconds = self.runner.warm_up_if_stale()
            if seconds:
                self.profile.add("warmup", seconds)
            return seconds > 0

    def kernels_warming(self) -> bool:
        """Whether `warm_up` has work left (ModelRunner.warm_pending)."""
        return self.runner.warm_pending()

    def _count_compiles(self, num: int, step_s: float) -> None:
        """Kernel variants compiled inside this step's forward (not its warm-up): the profile's `compile` phase
        counts them, with the step's forward seconds (the stall is at most that)."""
        if num > 0:
            self.profile.add("compile", step_s, count=num)
            log.info("kernels_compiled_in_step", variants=num, step_ms=round(1e3 * step_s, 1),
                     kind=self.runner.last_kind)

    def _receive(self) -> None:
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get())

    def _process_results(self, batch: ScheduledBatch, tokens: list[int | None]) -> list[StepOutput]:
        outputs = [self._ended_output(seq) for seq in batch.ended]
        for (seq, num_new), token in zip(batch.items, tokens):
            seq.num_computed_tokens += num_new
            if token is None:
                continue
            seq.append_token(token)
            text, reason = self._check_stop(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self._release_id(seq.request_id)
            outputs.append(StepOutput(seq.request_id, [token], text, reason, seq.num_prompt_tokens,
                                      seq.num_output_tokens))
        return outputs

    def _release_id(self, request_id: str) -> None:
        with self._ids_lock:
            self._request_ids.discard(request_id)

    def _ended_output(self, seq: Sequence) -> StepOutput:
        self._release_id(seq.request_id)
        log.warning("request_out_of_kv", request_id=seq.request_id, model=seq.delta, tokens=seq.num_tokens)
        return StepOutput(seq.request_id, [], self._flush_text(seq), seq.finish_reason,
                          seq.num_prompt_tokens, seq.num_output_tokens)

    def _check_stop(self, seq: Sequence, token: int) -> tuple[str, FinishReason | None]:
        """New text for `token` and the finish reason, if this token ends the request."""
        params, num_out = seq.params, seq.num_output_tokens
        may_stop = num_out > params.min_tokens  # the first min_tokens tokens never end the request
        text, reason = "", None
        state: _TextState | None = seq.text_state
        if state is not None:
            new_text = state.decoder.push(token)
            text = state.stops.push(new_text) if may_stop else new_text
            if state.stops.stopped:
                reason = FinishReason.STOP
        if reason is None and token in self.eos_token_ids and not params.ignore_eos and may_stop:
            reason = FinishReason.STOP
        if reason is None and (num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None and not (state is not None and state.stops.stopped):
            text += self._flush_text(seq)
        return text, reason

    def _flush_text(self, seq: Sequence) -> str:
        state: _TextState | None = seq.text_state
        if state is None:
            return ""
        text = state.stops.push(state.decoder.flush())
        return text + state.stops.flush()

    # ---- convenience ------------------------------------------------------------------------------

    def run_until_done(self, max_steps: int = 100_000) -> dict[str, tuple[list[int], str, FinishReason]]:
        """Step until every request finished; request id -> (token ids, text, finish reason)."""
        results: dict[str, tuple[list[int], str, FinishReason | None]] = {}
        for _ in range(max_steps):
            if not self.has_unfinished_requests():
                break
            for out in self.step():
                ids, text, _ = results.get(out.request_id, ([], "", None))
                results[out.request_id] = (ids + out.token_ids, text + out.text, out.finish_reason)
        assert not self.has_unfinished_requests(), f"not done after {max_steps} steps"
        return results


__all__ = ["EngineConfig", "EngineStats", "FinishReason", "LLMEngine", "StepOutput", "SequenceStatus"]
