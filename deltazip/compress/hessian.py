"""Hessian of a linear layer's reconstruction loss: H = 2/n * sum over calibration tokens of x x^T."""

import torch


class HessianAccumulator:
    """Running average of 2 x x^T over the tokens seen so far, fp32 on the inputs' device."""

    def __init__(self, in_features: int, device: str | torch.device) -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add inputs x: [..., in_features]."""
        x = x.reshape(-1, x.shape[-1]).float()  # x: [tokens, K]
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_tokens + n
        self.hessian.mul_(self.num_tokens / total)
        self.hessian.addmm_(x.T, x, alpha=2.0 / total)
        self.num_tokens = total
