"""kernels/rope_kv.py: q/k rotation and the KV-cache write in one launch.

Under the CPU interpreter (make test), else on the GPU when there is one: the kernel against the op-by-op torch
form, on q/k/v views of one q/k/v GEMM output as the model makes them (strided rows), grouped-query and
non-power-of-two head counts, shuffled slots; the cache rows no token writes stay as they were; the serving forward
of a small model gives the op-by-op forward's hidden states with the kernel on.
"""

import pytest
import torch

from deltazip.model import layers
from deltazip.model.context import AttentionMetadata, ForwardContext
from deltazip.model.loader import model_from_state_dict
from deltazip.model.synthetic import random_state_dict, tiny_config
from kernels.rope_kv import rope_store_kv, rope_store_kv_reference
from kernels.sbmm_plan import interpreting

DEVICE = "cpu" if interpreting() else ("cuda" if torch.cuda.is_available() else None)
pytestmark = pytest.mark.skipif(DEVICE is None, reason="needs TRITON_INTERPRET=1 or CUDA")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def case(tokens, heads, kv_heads, dim, dtype, seed=0, num_blocks=6, block_size=4):
    """q, k, v as column views of one [T, (heads + 2 kv_heads) * dim] tensor, rope tables of random positions,
    caches of random values, distinct random slots."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    q, k, v = (t.view(tokens, -1, dim) for t in (q, k, v))
    positions = torch.randint(0, 300, (tokens,), generator=g)
    rope = layers.RotaryEmbedding(dim, 10000.0, None)(positions.to(DEVICE))
    caches = [torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(DEVICE, dtype) for _ in range(2)]
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens].to(DEVICE)
    return q, k, v, rope, caches, slots


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 32), (6, 2, 16), (3, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 7])
def test_kernel_matches_the_op_by_op_form(heads, kv_heads, dim, dtype, tokens):
    q, k, v, rope, (kc, vc), slots = case(tokens, heads, kv_heads, dim, dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    want_q = rope_store_kv_reference(q.clone(), k, v, rope.cos, rope.sin, kc_ref, vc_ref, slots)
    k_before, v_before = k.clone(), v.clone()
    out = rope_store_kv(q, k, v, rope.cos, rope.sin, kc, vc, slots)
    assert out is q
    tol = TOL[dtype]
    torch.testing.assert_close(q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(kc, kc_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(vc, vc_ref, atol=0, rtol=0)  # v is copied, not computed
    assert torch.equal(k, k_before) and torch.equal(v, v_before)  # k and v are read only


def test_only_the_tokens_slots_are_written():
    q, k, v, rope, (kc, vc), slots = case(5, 4, 2, 32, torch.float32, seed=3)
    before = kc.clone(), vc.clone()
    rope_store_kv(q, k, v, rope.cos, rope.sin, kc, vc, slots)
    untouched = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    untouched[slots.cpu()] = False
    for new, old in zip((kc, vc), before):
        assert torch.equal(new.view(-1, 2, 32)[untouched.to(DEVICE)], old.view(-1, 2, 32)[untouched.to(DEVICE)])


def test_bad_shapes_raise():
    q, k, v, rope, (kc, vc), slots = case(3, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="one slot per token"):
        rope_store_kv(q, k, v, rope.cos, rope.sin, kc, vc, slots[:2])
    with pytest.raises(ValueError, match="cos"):
        rope_store_kv(q, k, v, rope.cos[:2], rope.sin, kc, vc, slots)
    with pytest.raises(ValueError, match="must be"):
        rope_store_kv(q, k[:, :1], v, rope.cos, rope.sin, kc, vc, slots)


def test_serving_forward_with_the_kernel_matches_op_by_op(monkeypatch):
    """A two-layer model's prefill of two prompts (its paged path end to end) with the fused rotation + cache write
    gives the op-by-op forward's hidden states and KV cache."""
    cfg = tiny_config()
    model = model_from_state_dict(cfg, {k: v.to(DEVICE) for k, v in random_state_dict(cfg, seed=5).items()})
    lens, block_size = [5, 3], 4
    tables = torch.tensor([[0, 1], [2, -1]], device=DEVICE)
    slots = [tables[s, p // block_size].item() * block_size + p % block_size for s, n in enumerate(lens)
             for p in range(n)]
    meta = dict(positions=torch.tensor([p for n in lens for p in range(n)], device=DEVICE),
                slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=tables,
                context_lens=torch.tensor(lens, device=DEVICE), query_start_loc=torch.tensor([0, 5, 8], device=DEVICE),
                max_query_len=5, max_context_len=5)
    ids = torch.randint(3, 200, (8,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = []
    for fused in (False, True):
        monkeypatch.setattr(layers, "fused_rope_kv_applies", lambda device, on=fused: on)
        model.allocate_kv_cache(4, block_size)
        with torch.inference_mode():
            hidden = model(ids, ForwardContext(attn=AttentionMetadata(**meta)))
        results.append((hidden, model.kv_cache.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-5)
