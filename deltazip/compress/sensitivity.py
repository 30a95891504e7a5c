"""Output Fisher of every block linear: the mean squared gradient of the fine-tune's calibration loss with
respect to each output feature. It turns a layer's output error into an estimated loss increase
(alloc.weighted_output_loss), which makes errors of different layers comparable for the allocation."""

import os

import torch
from tqdm import tqdm

from deltazip.artifact.names import is_block_linear
from deltazip.model.loader import load_model

_TOKENS_PER_BATCH = 4096


class _GradientTap:
    """DeltaOps that changes nothing: it makes the embedding output a graph leaf and records, per linear,
    the sum over tokens of the squared gradient of the loss with respect to the linear's output."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.sums: dict[str, torch.Tensor] = {}

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        key = name + ".weight"
        if key in self.names and y.requires_grad:
            y.register_hook(lambda g, key=key: self._add(key, g))

    def _add(self, key: str, grad: torch.Tensor) -> None:
        sq = grad.float().pow(2).sum(dim=0)  # grad: [T, N] -> [N]
        self.sums[key] = sq if key not in self.sums else self.sums[key] + sq

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> None:
        return None

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        h.requires_grad_(True)  # weights stay frozen: gradients flow to activations only


def output_fisher(
    ft_dir: str | os.PathLike, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype, progress: bool = False
) -> dict[str, torch.Tensor]:
    """HF linear name -> F [out_features] fp32 on `device`, from next-token cross-entropy (summed over
    tokens) of the fine-tuned model on the calibration windows tokens [S, L]."""
    model = load_model(ft_dir, device=device, dtype=dtype)
    model.requires_grad_(False)
    names = {n for n, p in model.named_parameters() if is_block_linear(n, tuple(p.shape))}
    tap = _GradientTap(names)
    batch = max(1, _TOKENS_PER_BATCH // tokens.shape[1])
    num_tokens = 0
    for start in tqdm(range(0, tokens.shape[0], batch), desc="sensitivity", unit="batch", disable=not progress):
        ids = tokens[start : start + batch].to(device)  # [B, L]
        logits = model.forward_dense(ids[:, :-1], deltas=tap)  # [B, L-1, V] fp32
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()
        num_tokens += ids.shape[0] * ids.shape[1]
        del logits, loss
    del model
    return {name: s / num_tokens for name, s in tap.sums.items()}
