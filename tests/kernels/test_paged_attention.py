"""kernels/paged_attention.py: decode attention read straight from the paged KV cache.

CPU (TRITON_INTERPRET=1): the kernel against its torch reference and against the model's gather + SDPA path, on
small caches with shuffled pages, grouped-query heads, contexts of one token, of exact pages and of several pages.
GPU (skipped without CUDA): the same at the Llama-2-7B head shape and long contexts, and inside a captured CUDA graph
whose context lengths change between replays.
"""

import pytest
import torch

from deltazip.model import attention
from deltazip.model.context import AttentionMetadata
from kernels import paged_attention
from kernels.paged_attention import (paged_decode_attention, paged_decode_reference, paged_varlen_attention,
                                     paged_varlen_reference, split_count)
from kernels.sbmm_plan import interpreting

CUDA = torch.cuda.is_available()
# The small cases run under the CPU interpreter (make test), else on the GPU when there is one (the device runs)
SMALL = "cpu" if interpreting() else ("cuda" if CUDA else None)
small = pytest.mark.skipif(SMALL is None, reason="needs TRITON_INTERPRET=1 or CUDA")


def make_cache(num_seqs, heads, kv_heads, dim, block_size, lens, dtype, device=None, seed=0, extra_blocks=3):
    """(q, k_cache, v_cache, block_tables padded with -1, context_lens): each sequence's pages drawn at random
    from a shared pool, so neighbouring sequences' pages interleave."""
    device = device or SMALL
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages) + extra_blocks
    k = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(num_blocks, block_size, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(num_seqs, heads, dim, generator=g).to(device, dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((num_seqs, max(pages) + 1), -1, dtype=torch.long)
    used = 0
    for s, n in enumerate(pages):
        tables[s, :n] = order[used:used + n]
        used += n
    return q, k, v, tables.to(device), torch.tensor(lens, dtype=torch.long, device=device)


@small
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(4, 4, 32, 16), (8, 2, 64, 16), (4, 1, 16, 8),
                                                            (2, 2, 128, 32)])
@pytest.mark.parametrize("dtype,heads_per_program,splits", [
    (torch.float16, 1, 1), (torch.bfloat16, 1, 1), (torch.float32, 1, 1),  # every dtype, plain layout
    (torch.float16, 2, 1), (torch.float16, 1, 4), (torch.float32, 2, 2),  # the other layouts (interpreter time)
])
def test_kernel_matches_reference(heads, kv_heads, dim, block_size, dtype, heads_per_program, splits, monkeypatch):
    """Every launch layout: heads per program (a GQA group read whole or split), context splits (some empty for
    the short contexts, combined by the second kernel)."""
    monkeypatch.setattr(paged_attention, "HEADS_PER_PROGRAM", heads_per_program)
    monkeypatch.setattr(paged_attention, "BLOCK_N", 16)
    lens = [1, block_size - 1, block_size, 2 * block_size + 1, 70]
    q, k, v, tables, ctx = make_cache(len(lens), heads, kv_heads, dim, block_size, lens, dtype)
    out = paged_decode_attention(q, k, v, tables, ctx, dim ** -0.5, splits=splits)
    ref = paged_decode_reference(q, k, v, tables, ctx, dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@small
def test_one_token_context_returns_its_value():
    """With only its own key in the cache a token's attention output is that key's value, whatever q is."""
    q, k, v, tables, ctx = make_cache(3, 4, 2, 32, 16, [1, 1, 1], torch.float32, seed=4)
    out = paged_decode_attention(q * 100, k, v, tables, ctx, 1.0)
    for s in range(3):
        torch.testing.assert_close(out[s], v[tables[s, 0], 0].repeat_interleave(2, dim=0))


@small
def test_entries_past_the_context_are_not_read():
    """Garbage block ids past a sequence's pages (the -1 padding, or stale ids) change nothing."""
    q, k, v, tables, ctx = make_cache(2, 4, 4, 32, 16, [20, 5], torch.float32, seed=5)
    before = paged_decode_attention(q, k, v, tables, ctx, 0.2)
    tables[0, 2:] = 10**6
    tables[1, 1:] = -7
    torch.testing.assert_close(paged_decode_attention(q, k, v, tables, ctx, 0.2), before)


@small
def test_matches_the_gather_sdpa_path(monkeypatch):
    """paged_attention takes the kernel for a decode-only step when it applies, and gives what its gather + SDPA
    path gives for the same metadata."""
    lens = [3, 17, 40, 64]
    q, k, v, tables, ctx = make_cache(4, 8, 4, 32, 16, lens, torch.float32, seed=6)
    meta = dict(positions=ctx - 1, slot_mapping=torch.zeros(4, dtype=torch.long, device=SMALL), block_tables=tables,
                context_lens=ctx, query_start_loc=torch.arange(5, device=SMALL), max_query_len=1,
                max_context_len=max(lens))
    monkeypatch.setattr(attention, "decode_kernel_applies", lambda device: False)
    sdpa = attention.paged_attention(q, k, v, AttentionMetadata(**meta), 0.17)
    calls = []
    monkeypatch.setattr(attention, "decode_kernel_applies", lambda device: True)
    real = attention.paged_kernel.paged_decode_attention
    monkeypatch.setattr(attention.paged_kernel, "paged_decode_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = attention.paged_attention(q, k, v, AttentionMetadata(**meta), 0.17)
    assert calls == [1]
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


@small
def test_mixed_steps_keep_the_gather_path(monkeypatch):
    """A step with a prefill chunk (max_query_len > 1) never reaches the decode kernel."""
    monkeypatch.setattr(attention, "decode_kernel_applies", lambda device: True)
    monkeypatch.setattr(attention.paged_kernel, "paged_decode_attention",
                        lambda *a, **kw: pytest.fail("decode kernel called for a mixed step"))
    q, k, v, tables, ctx = make_cache(2, 4, 4, 32, 16, [5, 9], torch.float32, seed=7)
    tokens = torch.randn(4, 4, 32, device=SMALL)
    meta = AttentionMetadata(positions=torch.tensor([4, 6, 7, 8], device=SMALL),
                             slot_mapping=torch.zeros(4, dtype=torch.long, device=SMALL), block_tables=tables,
                             context_lens=ctx, query_start_loc=torch.tensor([0, 1, 4], device=SMALL),
                             max_query_len=3, max_context_len=9)
    assert attention.paged_attention(tokens, k, v, meta, 0.2).shape == (4, 4, 32)


def varlen_case(q_lens, ctx, heads, kv_heads, dim, block_size, dtype, device=None, seed=11):
    """(q [sum q_lens, heads, dim], k, v, tables, context_lens, query_start_loc) for sequences whose new tokens
    are the last q_lens[s] of ctx[s] cached ones."""
    _, k, v, tables, lens = make_cache(len(ctx), heads, kv_heads, dim, block_size, ctx, dtype, device=device,
                                       seed=seed)
    q = torch.randn(sum(q_lens), heads, dim, generator=torch.Generator().manual_seed(seed)).to(k.device, dtype)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), device=k.device)
    return q, k, v, tables, lens, qsl


@small
@pytest.mark.parametrize("heads,kv_heads,dim,block_size", [(4, 4, 32, 16), (8, 2, 16, 8), (2, 1, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_varlen_kernel_matches_reference(heads, kv_heads, dim, block_size, dtype):
    """Decode rows, a chunk continuing a prompt, a whole prompt, a run longer than one block of rows, and a
    sequence with no new tokens, in one step."""
    q_lens, ctx = [1, 5, 1, 70, 0, 3], [9, 20, 33, 70, 6, 40]
    q, k, v, tables, lens, qsl = varlen_case(q_lens, ctx, heads, kv_heads, dim, block_size, dtype)
    out = paged_varlen_attention(q, k, v, tables, lens, qsl, dim ** -0.5, max(q_lens))
    ref = paged_varlen_reference(q, k, v, tables, lens, qsl, dim ** -0.5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@small
def test_paged_attention_sends_mixed_steps_to_the_varlen_kernel_when_on(monkeypatch):
    """With PREFILL_KERNEL's check on, a mixed step runs the varlen kernel and gives the gather path's result."""
    q_lens, ctx = [1, 4, 1, 6], [9, 20, 33, 6]
    q, k, v, tables, lens, qsl = varlen_case(q_lens, ctx, 4, 2, 32, 16, torch.float32, seed=12)
    positions = torch.tensor([c - n + j for n, c in zip(q_lens, ctx) for j in range(n)], device=SMALL)
    meta = dict(positions=positions, slot_mapping=torch.zeros(len(positions), dtype=torch.long, device=SMALL),
                block_tables=tables, context_lens=lens, query_start_loc=qsl, max_query_len=6, max_context_len=33)
    monkeypatch.setattr(attention, "decode_kernel_applies", lambda device: False)
    gather = attention.paged_attention(q, k, v, AttentionMetadata(**meta), 0.2)
    calls = []
    real = attention.paged_kernel.paged_varlen_attention
    monkeypatch.setattr(attention.paged_kernel, "paged_varlen_attention",
                        lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    monkeypatch.setattr(attention, "prefill_kernel_applies", lambda device: True)
    torch.testing.assert_close(attention.paged_attention(q, k, v, AttentionMetadata(**meta), 0.2), gather,
                               atol=1e-5, rtol=1e-5)
    assert calls == [6]  # the host-known longest run, no device read


@small
def test_varlen_query_start_loc_must_fit():
    q, k, v, tables, lens, qsl = varlen_case([1, 2], [4, 5], 4, 4, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_varlen_attention(q, k, v, tables, lens, qsl[:2], 1.0, 2)


@small
@pytest.mark.parametrize("args,match", [
    ((4, 3, 32), "multiple"),
    ((4, 4, 24), "power of two"),
])
def test_bad_shapes_raise(args, match):
    heads, kv_heads, dim = args
    q, k, v, tables, ctx = make_cache(2, heads, kv_heads, dim, 16, [4, 5], torch.float32)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(q, k, v, tables, ctx, 1.0)


@small
def test_splits_must_be_a_power_of_two():
    q, k, v, tables, ctx = make_cache(2, 4, 4, 32, 16, [4, 5], torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(q, k, v, tables, ctx, 1.0, splits=3)


@small
def test_table_rows_must_match_sequences():
    q, k, v, tables, ctx = make_cache(3, 4, 4, 32, 16, [4, 5, 6], torch.float32)
    with pytest.raises(ValueError, match="one row per sequence"):
        paged_decode_attention(q, k, v, tables[:2], ctx, 1.0)


def test_split_count_fills_the_sms_of_small_batches_only(monkeypatch):
    monkeypatch.setattr(paged_attention, "sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    assert split_count(64, 64 * 32, 2048, cuda) == 1  # 2048 programs: enough
    assert split_count(1, 32, 2048, cuda) == paged_attention.MAX_SPLITS
    assert split_count(1, 32, 4 * paged_attention.BLOCK_N, cuda) == 2  # no split shorter than BLOCK_N
    assert split_count(8, 256, 2048, cuda) == 4  # 256 x 4 > 4 x 132
    assert split_count(1, 32, 2048, torch.device("cpu")) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads_per_program", [1, 4])
@pytest.mark.parametrize("num_seqs", [8, 1])
def test_kernel_matches_reference_on_cuda(heads, kv_heads, dtype, heads_per_program, num_seqs, monkeypatch):
    """Real head shapes and long contexts; one sequence gets context splits, eight mostly not."""
    monkeypatch.setattr(paged_attention, "HEADS_PER_PROGRAM", heads_per_program)
    lens = [1, 15, 16, 17, 130, 511, 2048, 1000][-num_seqs:]
    q, k, v, tables, ctx = make_cache(len(lens), heads, kv_heads, 128, 16, lens, dtype, device="cuda", seed=8)
    out = paged_decode_attention(q, k, v, tables.to(torch.int32), ctx.to(torch.int32), 128 ** -0.5)
    ref = paged_decode_reference(q, k, v, tables, ctx, 128 ** -0.5)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_in_a_cuda_graph_follows_new_context_lengths(splits):
    """Captured once, replayed with longer contexts and other pages: each replay reads the lengths then current."""
    lens = [40, 300, 7, 1024]
    q, k, v, tables, ctx = make_cache(4, 32, 32, 128, 16, [1100] * 4, torch.float16, device="cuda", seed=9)
    ctx.copy_(torch.tensor(lens, device="cuda"))
    paged_decode_attention(q, k, v, tables, ctx, 0.09, splits=splits)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k, v, tables, ctx, 0.09, splits=splits)
    for new_lens, seed in (([40, 300, 7, 1024], 0), ([1100, 1, 64, 65], 1)):
        ctx.copy_(torch.tensor(new_lens, device="cuda"))
        tables.copy_(tables[torch.randperm(4, generator=torch.Generator().manual_seed(seed))])
        graph.replay()
        torch.testing.assert_close(out, paged_decode_reference(q, k, v, tables, ctx, 0.09), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_kernel_matches_reference_on_cuda(heads, kv_heads, dtype):
    """Llama head shapes, a serving-like mixed step: decode rows beside prompts of 128-300 tokens and a chunk."""
    q_lens, ctx = [1, 128, 1, 300, 17, 1], [200, 128, 1500, 300, 517, 2048]
    q, k, v, tables, lens, qsl = varlen_case(q_lens, ctx, heads, kv_heads, 128, 16, dtype, device="cuda")
    out = paged_varlen_attention(q, k, v, tables, lens, qsl, 128 ** -0.5, max(q_lens))
    ref = paged_varlen_reference(q, k, v, tables, lens, qsl, 128 ** -0.5)
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
