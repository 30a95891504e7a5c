"""Loss sensitivity of every block linear on the fine-tune's calibration loss (mean next-token cross-entropy):
the output Fisher F (mean squared gradient per output feature), which turns a layer's output error into the
second-order estimate of the loss increase (alloc.weighted_output_loss), and optionally the weight gradient
G = dL/dW for the first-order term <G, E>. They make errors of different layers comparable for the allocation."""

import os
from dataclasses import dataclass

import torch
from tqdm import tqdm

from deltazip.artifact.names import is_block_linear
from deltazip.model.loader import load_model

_TOKENS_PER_BATCH = 4096


@dataclass(slots=True)
class Sensitivity:
    """Per block linear (HF name): output Fisher [N] and, when asked for, the weight gradient [N, K] (fp32)."""

    fisher: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor] | None = None

    def first_order(self, name: str, error: torch.Tensor) -> float:
        """<dL/dW, E>: the loss change to first order when E is added to the weight (0 without gradients)."""
        if self.grad is None:
            return 0.0
        return float((self.grad[name].to(error.device) * error).sum())


class _GradientTap:
    """DeltaOps that changes nothing: it makes the embedding output a graph leaf and records, per linear, the
    sum over tokens of the squared gradient of the loss with respect to the linear's output (and of g^T x)."""

    def __init__(self, names: set[str], with_grad: bool) -> None:
        self.names, self.with_grad = names, with_grad
        self.sums: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        key = name + ".weight"
        if key in self.names and y.requires_grad:
            y.register_hook(lambda g, key=key, x=x: self._add(key, g, x))

    def _add(self, key: str, grad: torch.Tensor, x: torch.Tensor) -> None:
        g = grad.float()  # [T, N]
        sq = g.pow(2).sum(dim=0)  # [N]
        self.sums[key] = sq if key not in self.sums else self.sums[key] + sq
        if self.with_grad:
            gw = g.T @ x.detach().float()  # [N, K]
            self.grads[key] = gw if key not in self.grads else self.grads[key] + gw

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> None:
        return None

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        h.requires_grad_(True)  # weights stay frozen: gradients flow to activations only


def loss_sensitivity(
    ft_dir: str | os.PathLike, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype,
    with_grad: bool = False, progress: bool = False,
) -> Sensitivity:
    """Output Fisher (and weight gradients) of every block linear, from the fine-tuned model's next-token
    cross-entropy on the calibration windows tokens [S, L]; both per token (the loss is a mean)."""
    model = load_model(ft_dir, device=device, dtype=dtype)
    model.requires_grad_(False)
    names = {n for n, p in model.named_parameters() if is_block_linear(n, tuple(p.shape))}
    tap = _GradientTap(names, with_grad)
    batch = max(1, _TOKENS_PER_BATCH // tokens.shape[1])
    num_tokens = 0
    with torch.enable_grad():  # callers (a worker, a test) may have turned autograd off
        for start in tqdm(range(0, tokens.shape[0], batch), desc="sensitivity", unit="batch", disable=not progress):
            ids = tokens[start : start + batch].to(device)  # [B, L]
            logits = model.forward_dense(ids[:, :-1], deltas=tap)  # [B, L-1, V] fp32
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            loss.backward()
            num_tokens += ids.shape[0] * (ids.shape[1] - 1)  # predicted tokens
            del logits, loss
    del model
    grad = {name: g / num_tokens for name, g in tap.grads.items()} if with_grad else None
    return Sensitivity({name: s / num_tokens for name, s in tap.sums.items()}, grad)
