"""Joint OBS pruning + quantization of one matrix (SparseGPT's mask selection with GPTQ's rounding).

Columns are processed left to right; each column is pruned (2:4 / N:M groups decided when the group's first
column is reached, unstructured per block) and quantized, and its error is spread over the columns not yet
processed through the inverse Hessian's Cholesky factor. Updates inside a block are applied eagerly, those to
later blocks lazily in one matmul per block (GPTQ's lazy batch update). Rows are independent given H, so
several matrices sharing one input (q/k/v, gate/up) are compressed as one stacked matrix.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from deltazip.compress.quantizer import QuantSpec, dequantize, find_params, quantize
from deltazip.compress.sparsity import Sparsity


@dataclass(slots=True)
class CompressedMatrix:
    """Result for W: [N, K]: dense reconstruction plus what packing needs."""

    dequantized: torch.Tensor  # fp32 [N, K]; pruned entries 0
    mask: torch.Tensor  # bool [N, K]; True = kept
    codes: torch.Tensor | None  # int16 [N, K]; pruned entries hold the zero code
    scales: torch.Tensor | None  # fp32 [N, G], exactly representable in fp16
    zeros: torch.Tensor | None  # fp32 [N, G] integers; None when symmetric

    def rows(self, start: int, stop: int) -> "CompressedMatrix":
        """The result for rows [start, stop) (to split a stacked q/k/v result)."""
        pick = lambda t: None if t is None else t[start:stop]  # noqa: E731
        return CompressedMatrix(*(pick(t) for t in (self.dequantized, self.mask, self.codes, self.scales, self.zeros)))


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; damping grows 10x if H is not positive definite."""
    k = hessian.shape[0]
    lam = damp * float(torch.diag(hessian).mean())
    eye = torch.eye(k, device=hessian.device, dtype=hessian.dtype)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
        lam = max(lam * 10, 1e-8)
    raise RuntimeError("Hessian is not positive definite even with strong damping; check the calibration inputs")


def obs_compress(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec | None,
    sparsity: Sparsity,
    block_size: int = 128,
    damp: float = 0.01,
    joint: bool = True,
) -> CompressedMatrix:
    """Prune and quantize weight [N, K] minimizing ||X (W - W_hat)^T|| with H = 2 X^T X / n."""
    with _single_thread(weight.device):
        return _obs_compress(weight, hessian, spec, sparsity, block_size, damp, joint)


def _obs_compress(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec | None,
    sparsity: Sparsity,
    block_size: int = 128,
    damp: float = 0.01,
    joint: bool = True,
) -> CompressedMatrix:
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_hessian_factor(h, damp)  # [K, K] upper
    gs = k if spec is None or spec.group_size is None else spec.group_size
    block_size = _block_size(block_size, gs, sparsity, k)
    state = _State.empty(n, k, spec, w.device)
    if spec is not None and spec.group_size is None:
        keep = _provisional_keep(w, torch.diag(hinv), sparsity)
        state.set_group(0, *find_params(w, spec, keep, torch.diag(h)))
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        err = _compress_block(w, hinv, torch.diag(h), i1, i2, gs, spec, sparsity, joint, state)
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # lazy update of the later blocks
    return state.result(spec)


@contextmanager
def _single_thread(device: torch.device):
    """On CPU, run on one thread: the column loop's many small ops lose more to thread hand-offs than they
    gain (10-25x slower on a busy 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _compress_block(w, hinv, hdiag, i1, i2, gs, spec, sparsity, joint, state) -> torch.Tensor:
    """Process columns [i1, i2) in place; returns the block's scaled errors [N, i2 - i1]."""
    w1 = w[:, i1:i2].clone()  # current values of the block's columns
    hinv1 = hinv[i1:i2, i1:i2]
    d = torch.diag(hinv1)
    err1 = torch.zeros_like(w1)
    keep1 = torch.ones_like(w1, dtype=torch.bool)
    codes1 = torch.zeros_like(w1)
    if sparsity.ratio:
        keep1 = _unstructured_keep(w1, d, sparsity.ratio)
    for i in range(i2 - i1):
        col = i1 + i
        if spec is not None and spec.group_size is not None and col % gs == 0:
            chunk = w1[:, i : i + gs]
            keep = keep1[:, i : i + gs] if sparsity.ratio else _provisional_keep(chunk, d[i : i + gs], sparsity)
            state.set_group(col // gs, *find_params(chunk, spec, keep, hdiag[col : col + gs]))
        if sparsity.structured and i % sparsity.group == 0:
            keep1[:, i : i + sparsity.group] = _nm_keep(
                w1[:, i : i + sparsity.group], d[i : i + sparsity.group], sparsity, state, col, gs, spec, joint
            )
        q = w1[:, i]
        if spec is not None:
            scale, zero = state.column_params(col, gs)
            codes = torch.where(keep1[:, i], quantize(q, scale, zero, spec.maxq), zero)
            codes1[:, i] = codes
            q = dequantize(codes, scale, zero)  # pruned entries hold the zero code, so they dequantize to 0
        else:
            q = torch.where(keep1[:, i], q, torch.zeros_like(q))
        state.dequantized[:, col] = q
        e = (w1[:, i] - q) / d[i]
        w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
        err1[:, i] = e
    state.mask[:, i1:i2] = keep1
    state.codes[:, i1:i2] = codes1.to(torch.int16)
    return err1


def _nm_keep(w4, d4, sparsity, state, col, gs, spec, joint) -> torch.Tensor:
    """Keep mask [N, M] for one N:M group: the entries whose loss from pruning is largest."""
    loss = w4.pow(2)
    if joint and spec is not None:
        # Keeping an entry still costs its rounding error; the choice weighs what keeping actually saves.
        if col // gs == (col + w4.shape[1] - 1) // gs:  # the usual case: the N:M group sits in one quant group
            scale, zero = (t.unsqueeze(1) for t in state.column_params(col, gs))
        else:
            scale, zero = state.group_params(col, w4.shape[1], gs)
        loss = loss - (dequantize(quantize(w4, scale, zero, spec.maxq), scale, zero) - w4).pow(2)
    loss = loss / d4.pow(2).unsqueeze(0)
    idx = torch.topk(loss, sparsity.keep, dim=1).indices
    return torch.zeros_like(w4, dtype=torch.bool).scatter_(1, idx, True)


def _provisional_keep(w: torch.Tensor, d: torch.Tensor, sparsity: Sparsity) -> torch.Tensor | None:
    """Guess of the kept entries of a chunk (before OBS updates), to fit quantization ranges to them."""
    if sparsity.structured:
        n, c = w.shape
        m = sparsity.group
        sal = (w.pow(2) / d.pow(2).unsqueeze(0)).view(n, c // m, m)
        idx = torch.topk(sal, sparsity.keep, dim=2).indices
        return torch.zeros_like(sal, dtype=torch.bool).scatter_(2, idx, True).view(n, c)
    if sparsity.ratio:
        return _unstructured_keep(w, d, sparsity.ratio)
    return None


def _unstructured_keep(w: torch.Tensor, d: torch.Tensor, ratio: float) -> torch.Tensor:
    """SparseGPT's per-block rule: prune the `ratio` fraction with the smallest w^2 / d^2 (over all rows)."""
    sal = w.pow(2) / d.pow(2).unsqueeze(0)
    num_pruned = int(sal.numel() * ratio)
    if num_pruned == 0:
        return torch.ones_like(w, dtype=torch.bool)
    thresh = torch.kthvalue(sal.flatten(), num_pruned).values
    return sal > thresh


def _block_size(block_size: int, gs: int, sparsity: Sparsity, k: int) -> int:
    """Block size that is a multiple of the quant group (groups never straddle blocks) and of M."""
    if sparsity.structured and k % sparsity.group:
        raise ValueError(f"in_features {k} is not a multiple of the sparsity group {sparsity.group}")
    if gs < k:
        bs = gs * max(1, block_size // gs)
    else:
        bs = block_size
    if sparsity.structured and bs % sparsity.group:
        raise ValueError(f"group size {gs} must be a multiple of the sparsity group {sparsity.group}")
    return bs


@dataclass(slots=True)
class _State:
    """Outputs being filled column by column."""

    dequantized: torch.Tensor
    mask: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @classmethod
    def empty(cls, n: int, k: int, spec: QuantSpec | None, device: torch.device) -> "_State":
        groups = spec.num_groups(k) if spec is not None else 1
        return cls(
            dequantized=torch.zeros(n, k, device=device),
            mask=torch.ones(n, k, dtype=torch.bool, device=device),
            codes=torch.zeros(n, k, dtype=torch.int16, device=device),
            scales=torch.ones(n, groups, device=device),
            zeros=torch.zeros(n, groups, device=device),
        )

    def set_group(self, g: int, scale: torch.Tensor, zero: torch.Tensor) -> None:
        self.scales[:, g] = scale.view(-1)
        self.zeros[:, g] = zero.view(-1)

    def column_params(self, col: int, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = min(col // gs, self.scales.shape[1] - 1)
        return self.scales[:, g], self.zeros[:, g]

    def group_params(self, col: int, width: int, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of columns [col, col + width): [N, width] each."""
        groups = torch.clamp(torch.arange(col, col + width, device=self.scales.device) // gs, max=self.scales.shape[1] - 1)
        return self.scales[:, groups], self.zeros[:, groups]

    def result(self, spec: QuantSpec | None) -> CompressedMatrix:
        if spec is None:
            return CompressedMatrix(self.dequantized, self.mask, None, None, None)
        return CompressedMatrix(self.dequantized, self.mask, self.codes, self.scales, None if spec.sym else self.zeros)
