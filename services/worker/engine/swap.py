"""WeightSwapper: the `swap` baseline — one model's full weights active at a time, copied from host memory.

Between steps, when no sequence is running, the oldest waiting sequence whose weights are available
on the host picks the next active model (FCFS across models; the scheduler's aging stops admitting
the active model once another has waited `max_delta_wait_s`, so the running ones drain and it swaps).
Copies run on their own CUDA stream from pinned memory and are synchronized before the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from services.worker.engine.batch_scheduler import BASE_MODEL, BatchScheduler

HostWeights = Callable[[str], dict[str, torch.Tensor] | None]  # delta name -> merged host weights, None if absent


class WeightSwapper:
    """Owns which model's weights sit in the model's parameters."""

    def __init__(self, model: torch.nn.Module, host_weights: HostWeights,
                 base_host: dict[str, torch.Tensor] | None = None) -> None:
        """base_host: the base's weights on the host (`host_copies(model)`), when the caller already holds them."""
        self.params = dict(model.named_parameters())  # HF names; a tied lm_head appears once
        device = next(iter(self.params.values())).device
        self.base_host = base_host if base_host is not None else host_copies(model)
        self.host_weights = host_weights
        self.active: str = BASE_MODEL
        self.num_swaps = 0
        self.swap_bytes = 0
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def is_active(self, key: str) -> bool:
        """Scheduler readiness in swap mode: only the active model's sequences may start."""
        return key == self.active

    def can_swap_in(self, key: str) -> bool:
        """The model's merged weights are on the host (the base's always are)."""
        return key == BASE_MODEL or self.host_weights(key) is not None

    def before_schedule(self, scheduler: BatchScheduler) -> None:
        """Swap to the model of the oldest waiting sequence with host weights, once nothing runs."""
        if scheduler.running:
            return
        for seq in scheduler.waiting:  # arrival order
            key = seq.delta or BASE_MODEL
            if key == self.active:
                return
            weights = self.base_host if seq.delta is None else self.host_weights(seq.delta)
            if weights is not None:
                self._copy_in(weights)
                self.active = key
                return

    @torch.inference_mode()
    def _copy_in(self, weights: dict[str, torch.Tensor]) -> None:
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            for name, param in self.params.items():
                param.copy_(weights[name], non_blocking=True)
                self.swap_bytes += param.numel() * param.element_size()
        if self._stream is not None:
            self._stream.synchronize()
        self.num_swaps += 1


def host_copies(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A host copy of every parameter (HF names), pinned when the model is on CUDA (fast copies back in)."""
    copies = {}
    for name, param in model.named_parameters():
        t = param.detach().to("cpu", copy=True)
        copies[name] = t.pin_memory() if param.device.type == "cuda" else t
    return copies
