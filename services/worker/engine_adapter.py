"""build_engine: the engine core (services/worker/engine) behind the EngineLoop's small interface."""

from __future__ import annotations

from collections.abc import Callable

from services.worker.config import WorkerConfig
from services.worker.engine_loop import EngineStats, StepOutput


def build_engine(model, tokenizer, config: WorkerConfig, max_model_len: int,
                 delta_ops: Callable[[list[tuple[str | None, int]]], object],
                 is_delta_ready: Callable[[str], bool]):
    """An object with add_request / abort / step / has_unfinished / stats over LLMEngine."""
    raise NotImplementedError("engine core (services/worker/engine) not merged yet")


__all__ = ["build_engine", "EngineStats", "StepOutput"]
