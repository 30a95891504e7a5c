"""One generation request as the engine sees it: tokens, KV blocks and an explicit state."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from deltazip.model.sampling import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # admitted, holds KV blocks, scheduled every step while the token budget allows
    PREEMPTED = "preempted"  # blocks taken back under KV pressure; waits to be recomputed from scratch
    FINISHED = "finished"


class FinishReason(Enum):
    STOP = "stop"  # EOS or a stop sequence
    LENGTH = "length"  # max_tokens, or the context / KV capacity limit
    ABORT = "abort"  # cancelled by the caller


@dataclass(eq=False)
class Sequence:
    """Prompt + generated tokens of one request; `num_computed_tokens` of them are in the KV cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    delta: str | None = None  # fine-tune name; None = the base model
    arrival_s: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt followed by outputs
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    text_state: Any = None  # the engine's detokenizer + stop checker for this request

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V still have to be computed (whole prompt when new or preempted, 1 when decoding)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
