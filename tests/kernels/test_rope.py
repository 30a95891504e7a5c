"""kernels/rope.py against its fp32 torch reference and the model's op-by-op rotary: contiguous and strided inputs
(q / k as column views of the fused q/k/v output), odd head counts, Llama head sizes, fp32 / fp16 / bf16. On CPU
under TRITON_INTERPRET=1, on CUDA when there is one."""

import os

import pytest
import torch

from deltazip.model import layers
from kernels.rope import rope, rope_reference

CUDA = torch.cuda.is_available()
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if CUDA else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs TRITON_INTERPRET=1 (CPU) or CUDA")


def _tables(t: int, d: int, device: str) -> layers.Rope:
    rotary = layers.RotaryEmbedding(d, 10000.0, None)
    return rotary(torch.randint(0, 4096, (t,), generator=torch.Generator().manual_seed(1)).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("t,heads,kv_heads,d", [(1, 4, 2, 64), (7, 9, 3, 64), (33, 32, 8, 128), (5, 3, 1, 96)])
def test_rope_kernel_matches_reference_on_fused_qkv_views(device, dtype, t, heads, kv_heads, d):
    g = torch.Generator().manual_seed(t * heads)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * d, generator=g).to(device, dtype)
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=1)  # strided column views, as the model has
    tables = _tables(t, d, device)
    for x in (q.view(t, heads, d), k.view(t, kv_heads, d), q.contiguous().view(t, heads, d)):
        got = rope(x, tables.cos, tables.sin)
        assert got.is_contiguous() and got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got, rope_reference(x, tables.cos, tables.sin), rtol=1e-5 if dtype ==
                                   torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)
        layers.FUSED_ROPE = False
        try:  # the op-by-op form (rounds after each op): within a few of its ulps
            ops = layers.apply_rotary(x, tables)
        finally:
            layers.FUSED_ROPE = True
        tol = 1e-5 if dtype == torch.float32 else 2e-2 if dtype == torch.float16 else 1e-1
        torch.testing.assert_close(got, ops, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_refuses_what_it_cannot_read(device):
    tables = _tables(4, 64, device)
    with pytest.raises(ValueError, match="unit stride"):
        rope(torch.randn(4, 2, 128, device=device)[..., ::2], tables.cos, tables.sin)
    with pytest.raises(ValueError, match="fp32"):
        rope(torch.randn(4, 2, 64, device=device), tables.cos.half(), tables.sin.half())
    assert rope(torch.randn(0, 2, 64, device=device), tables.cos[:0], tables.sin[:0]).shape == (0, 2, 64)
