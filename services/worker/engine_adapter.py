"""EngineAdapter: the engine core (services/worker/engine.LLMEngine) behind the EngineLoop's small interface."""

from __future__ import annotations

from collections.abc import Callable

from services.worker.config import WorkerConfig
from services.worker.engine_loop import EngineStats, StepOutput


class EngineAdapter:
    """add_request / abort / step / has_unfinished_requests / stats over LLMEngine."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.max_model_len = engine.max_model_len

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling, delta: str | None) -> None:
        """Thread-safe; raises ValueError for a request the engine cannot run."""
        self._engine.add_request(request_id, prompt_token_ids, sampling, delta)

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self._engine.has_unfinished_requests()

    def warm_up(self) -> bool:
        return self._engine.warm_up()

    def kernels_warming(self) -> bool:
        return self._engine.kernels_warming()

    def step(self) -> list[StepOutput]:
        return [StepOutput(o.request_id, list(o.token_ids), o.text, o.finish_reason is not None,
                           o.finish_reason.value if o.finish_reason is not None else None)
                for o in self._engine.step()]

    def step_phases(self) -> dict[str, tuple[int, float]]:
        return self._engine.profile.snapshot()

    def delta_segments(self) -> dict[tuple[str, int], tuple[int, int]]:
        return self._engine.segments.snapshot()

    def stats(self) -> EngineStats:
        """Called on the loop thread between steps (queued tokens read the scheduler's waiting list)."""
        s = self._engine.stats()
        queued = sum(seq.num_uncomputed_tokens for seq in list(self._engine.scheduler.waiting))
        return EngineStats(num_running=s.num_running, num_waiting=s.num_waiting, queued_tokens=queued,
                           free_kv_blocks=s.free_kv_blocks, total_kv_blocks=s.total_kv_blocks,
                           running_deltas=frozenset(s.running_deltas))


def build_engine(model, tokenizer, config: WorkerConfig, max_model_len: int | None,
                 delta_ops: Callable[[list[tuple[str | None, int]]], object],
                 is_delta_ready: Callable[[str], bool],
                 swap_weights: Callable[[str], dict | None] | None = None,
                 swap_base_host: dict | None = None, kernel_slots=None) -> EngineAdapter:
    """LLMEngine sized from the config; KV blocks from --num-kv-blocks or the free-memory fraction."""
    from services.worker.engine.engine import EngineConfig, LLMEngine

    num_blocks = config.num_kv_blocks or kv_blocks_from_memory(model, config)
    engine_config = EngineConfig(num_kv_blocks=num_blocks, block_size=config.kv_block_size,
                                 max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                                 max_deltas_per_batch=config.max_deltas_per_batch, max_model_len=max_model_len,
                                 cuda_graphs=config.use_cuda_graphs, prefill_first=config.prefill_first)
    engine = LLMEngine(model, engine_config, tokenizer=tokenizer, deltas_provider=delta_ops,
                       is_delta_ready=is_delta_ready, swap_weights=swap_weights, swap_base_host=swap_base_host,
                       kernel_slots=kernel_slots)
    return EngineAdapter(engine)


def kv_blocks_from_memory(model, config: WorkerConfig) -> int:
    """Blocks that fit in `kv_memory_fraction` of free device memory (CPU: of a 4 GiB budget)."""
    import torch

    cfg = model.config
    weight = model.model.embed_tokens.weight
    bytes_per_block = (2 * cfg.num_hidden_layers * config.kv_block_size * cfg.num_key_value_heads * cfg.head_dim
                       * weight.element_size())
    if weight.device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(weight.device)
    else:
        free_bytes = 4 << 30
    return max(1, int(free_bytes * config.kv_memory_fraction) // bytes_per_block)
