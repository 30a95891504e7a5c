"""Our Llama against a plain reference: dense and paged paths, GQA, tied embeddings, rope scaling."""

import dataclasses

import pytest
import torch
from reference_llama import reference_logits

from deltazip.model.config import LlamaConfig, RopeScaling
from deltazip.model.context import AttentionMetadata, ForwardContext
from deltazip.model.loader import load_model, load_state_dict_from_dir, save_model_dir
from deltazip.model.synthetic import random_model, random_state_dict, tiny_config

CONFIGS = {
    "gqa_untied": tiny_config(),
    "mha_tied": tiny_config(num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": tiny_config(
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
    ),
    "linear_rope": tiny_config(rope_scaling=RopeScaling("linear", factor=4.0), head_dim=32, num_key_value_heads=1),
}


def paged_forward_in_steps(model, ids: list[list[int]], chunks: list[list[int]], block_size: int = 4):
    """Run several sequences through the paged path; chunks[s] lists each step's new-token count per seq.

    Blocks are handed out in a scrambled order so the test also checks the page gather.
    Returns per-sequence logits [L, V] of every token.
    """
    num_seqs = len(ids)
    max_blocks = max(len(x) for x in ids) // block_size + 1
    model.allocate_kv_cache(num_seqs * max_blocks + 3, block_size)
    perm = torch.randperm(num_seqs * max_blocks, generator=torch.Generator().manual_seed(0)) + 3
    tables = perm.view(num_seqs, max_blocks)
    done = [0] * num_seqs
    out = [[] for _ in range(num_seqs)]
    for step in range(len(chunks[0])):
        rows = [(s, chunks[s][step]) for s in range(num_seqs) if chunks[s][step] > 0]
        tok, pos, slots, qsl, ctx_lens = [], [], [], [0], []
        for s, n in rows:
            for p in range(done[s], done[s] + n):
                tok.append(ids[s][p])
                pos.append(p)
                slots.append(int(tables[s, p // block_size]) * block_size + p % block_size)
            qsl.append(qsl[-1] + n)
            ctx_lens.append(done[s] + n)
        meta = AttentionMetadata(
            positions=torch.tensor(pos),
            slot_mapping=torch.tensor(slots),
            block_tables=tables[[s for s, _ in rows]],
            context_lens=torch.tensor(ctx_lens),
            query_start_loc=torch.tensor(qsl),
        )
        hidden = model(torch.tensor(tok), ForwardContext(attn=meta))
        logits = model.compute_logits(hidden)
        for i, (s, n) in enumerate(rows):
            out[s].append(logits[qsl[i]:qsl[i + 1]])
            done[s] += n
    return [torch.cat(x) for x in out]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_and_paged_match_reference(name):
    cfg = CONFIGS[name]
    sd = random_state_dict(cfg, seed=1)
    model = random_model(cfg, seed=1)
    g = torch.Generator().manual_seed(2)
    ids = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (13, 7, 10)]
    refs = [reference_logits(cfg, sd, x).float() for x in ids]

    dense = model.forward_dense(torch.tensor([ids[0]]))
    torch.testing.assert_close(dense[0], refs[0], atol=2e-4, rtol=1e-4)
    batch = model.forward_dense(torch.tensor([ids[0][:7], ids[1]]))  # batch of two, same length
    torch.testing.assert_close(batch[1], refs[1], atol=2e-4, rtol=1e-4)

    # Chunked prefill mixed with decode steps of other sequences, then decode to the end.
    chunks = [
        [5, 4, 1, 1, 1, 1, 0],
        [0, 3, 3, 1, 0, 0, 0],
        [2, 2, 2, 1, 1, 1, 1],
    ]
    got = paged_forward_in_steps(model, ids, chunks)
    for g_logits, ref in zip(got, refs):
        torch.testing.assert_close(g_logits, ref, atol=2e-4, rtol=1e-4)


def test_layers_one_at_a_time_match_full_dense():
    cfg = CONFIGS["gqa_untied"]
    model = random_model(cfg, seed=3)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    h = model.model.embed_tokens(ids.reshape(-1)).view(2, 9, -1)
    rope = model.dense_rope(9)
    for i, layer in enumerate(model.layers):
        h = layer.forward_dense(h, rope if i % 2 == 0 else None)  # rope=None: the layer computes it
    logits = model.lm_head(model.model.norm(h.view(18, -1))).view(2, 9, -1)
    torch.testing.assert_close(logits, model.forward_dense(ids))


def test_module_names_and_forward_hooks():
    cfg = tiny_config()
    model = random_model(cfg)
    names = {m.hf_name for m in model.modules() if hasattr(m, "hf_name") and m.hf_name}
    assert "model.layers.1.self_attn.q_proj" in names and "lm_head" in names
    assert "model.layers.0.mlp.down_proj" in names and "model.embed_tokens" in names
    assert "model.layers.0.post_attention_layernorm" in names and "model.norm" in names
    seen = []
    model.get_submodule("model.layers.0.mlp.up_proj").register_forward_hook(
        lambda mod, args, out: seen.append(args[0].shape))
    model.forward_dense(torch.zeros(2, 5, dtype=torch.long))
    assert seen == [torch.Size([10, cfg.hidden_size])]


class RecordingDeltas:
    """Adds a fixed delta to every row for one linear; records which hooks were called."""

    def __init__(self, name, delta):
        self.name, self.delta, self.calls = name, delta, set()

    def linear(self, name, x, y):
        self.calls.add(name)
        if name == self.name:
            y += x @ self.delta.T

    def norm_weight(self, name, weight, x):
        self.calls.add(name)
        return None

    def embedding(self, name, input_ids, h):
        self.calls.add(name)


def test_delta_hook_equals_merged_weights():
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=5)
    name = "model.layers.1.self_attn.v_proj"
    delta = 0.05 * torch.randn(sd[name + ".weight"].shape, generator=torch.Generator().manual_seed(6))
    merged = dict(sd)
    merged[name + ".weight"] = sd[name + ".weight"] + delta
    from deltazip.model.loader import model_from_state_dict

    base, ft = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, merged)
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(7))
    hook = RecordingDeltas(name, delta)
    torch.testing.assert_close(base.forward_dense(ids, hook), ft.forward_dense(ids), atol=1e-5, rtol=1e-5)
    assert {"lm_head", "model.embed_tokens", "model.norm", "model.layers.0.mlp.gate_proj"} <= hook.calls


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_roundtrip(tmp_path, tied):
    cfg = tiny_config(tie_word_embeddings=tied)
    sd = random_state_dict(cfg, seed=8)
    save_model_dir(tmp_path, cfg, sd)
    assert LlamaConfig.from_dir(tmp_path) == cfg
    loaded = load_state_dict_from_dir(tmp_path)
    assert ("lm_head.weight" in loaded) is (not tied)
    model = load_model(tmp_path, dtype=torch.float64)
    assert model.lm_head.weight.dtype == torch.float64
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = reference_logits(cfg, sd, [1, 2, 3, 4])
    torch.testing.assert_close(model.forward_dense(torch.tensor([[1, 2, 3, 4]])).double()[0], ref,
                               atol=1e-6, rtol=1e-6)


def test_sharded_checkpoint_loads(tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=9)
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / file))
    weight_map = {k: f for f, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    model = load_model(tmp_path)
    torch.testing.assert_close(model.model.layers[1].mlp.up_proj.weight, sd["model.layers.1.mlp.up_proj.weight"])


def test_mismatched_checkpoint_is_rejected(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg)
    del sd["model.layers.0.mlp.up_proj.weight"]
    save_model_dir(tmp_path, cfg, sd)
    with pytest.raises(ValueError, match="missing .*up_proj"):
        load_model(tmp_path)


def test_config_reads_hf_fields():
    d = {
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 16,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": [2, 3],
    }
    cfg = LlamaConfig.from_dict(d)
    assert cfg.num_queries_per_kv == 4 and cfg.head_dim == 16 and cfg.eos_token_ids == (2, 3)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 8192
    assert LlamaConfig.from_dict(cfg.to_dict()) == cfg
    old_style = dataclasses.replace(cfg, rope_scaling=RopeScaling.from_hf({"type": "linear", "factor": 2.0}))
    assert old_style.rope_scaling.rope_type == "linear"
    with pytest.raises(ValueError, match="use one of"):
        RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="multiple of"):
        LlamaConfig.from_dict({**d, "num_key_value_heads": 3})


def test_a_mixed_prefill_decode_step_has_no_data_dependent_ops():
    """With the host-side maxima given (as the worker gives them), a step that mixes a prompt chunk with decode
    rows runs no op whose output size depends on device values (nonzero, item): on a GPU each would be a sync per
    layer. The result still matches the same step computed without the maxima."""
    from torch.profiler import ProfilerActivity, profile

    cfg = CONFIGS["gqa_untied"]
    model = random_model(cfg, seed=5)
    model.allocate_kv_cache(16, 4)
    q_lens, ctx_lens = [6, 1, 1], [6, 3, 5]  # one prompt chunk, two decode rows (earlier KV: cache zeros)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]])
    pos = [*range(6), 2, 4]
    slots = [int(tables[s, p // 4]) * 4 + p % 4 for s, p in zip([0] * 6 + [1, 2], pos)]
    ids = torch.randint(0, cfg.vocab_size, (8,), generator=torch.Generator().manual_seed(6))

    def step(maxima: bool) -> torch.Tensor:
        meta = AttentionMetadata(positions=torch.tensor(pos), slot_mapping=torch.tensor(slots), block_tables=tables,
                                 context_lens=torch.tensor(ctx_lens), query_start_loc=torch.tensor([0, 6, 7, 8]),
                                 max_query_len=6 if maxima else 0, max_context_len=6 if maxima else 0)
        return model(ids, ForwardContext(attn=meta))

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fast = step(maxima=True)
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense"}, ops
    torch.testing.assert_close(fast, step(maxima=False))


def test_attention_index_tensors_are_made_once_per_forward_and_change_nothing():
    """paged_attention's per-step index tensors (queries padded, cache slots, mask, output rows) come from the
    first layer and are reused by the others: a mixed prefill + decode step and a decode-only step give exactly
    what recomputing them in every layer gives, and a forward makes them once (one arange of the context, not one
    per layer)."""
    from torch.profiler import ProfilerActivity, profile

    from deltazip.model import attention

    cfg = CONFIGS["gqa_untied"]
    assert cfg.num_hidden_layers > 1
    model = random_model(cfg, seed=7)
    model.allocate_kv_cache(16, 4)
    tables = torch.tensor([[0, 1], [2, 3], [4, 5]])

    def step(q_lens, ctx_lens, cache: bool) -> tuple[torch.Tensor, int]:
        pos = [p for q, c in zip(q_lens, ctx_lens) for p in range(c - q, c)]
        seqs = [s for s, q in enumerate(q_lens) for _ in range(q)]
        slots = [int(tables[s, p // 4]) * 4 + p % 4 for s, p in zip(seqs, pos)]
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        meta = AttentionMetadata(positions=torch.tensor(pos), slot_mapping=torch.tensor(slots), block_tables=tables,
                                 context_lens=torch.tensor(ctx_lens), query_start_loc=torch.tensor(qsl),
                                 max_query_len=max(q_lens), max_context_len=max(ctx_lens))
        ids = torch.randint(0, cfg.vocab_size, (len(pos),), generator=torch.Generator().manual_seed(8))
        attention.CACHE_STEP_INDICES = cache
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                out = model(ids, ForwardContext(attn=meta))
        finally:
            attention.CACHE_STEP_INDICES = True
        aranges = sum(e.count for e in prof.key_averages() if e.key == "aten::arange")
        return out, aranges

    for q_lens, ctx_lens in (([6, 1, 1], [6, 3, 5]), ([1, 1, 1], [4, 3, 5])):
        cached, cached_aranges = step(q_lens, ctx_lens, True)
        fresh, fresh_aranges = step(q_lens, ctx_lens, False)
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
        assert cached_aranges < fresh_aranges  # the index tensors were made once, not per layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_the_op_by_op_norm(dtype):
    """torch's rms_norm (FUSED_RMS_NORM) against the HF-style norm (fp32 statistics, the normed value rounded to the
    activation dtype, then times the weight): equal in fp32, within one rounding in bf16; a per-row weight (norm
    deltas) always takes the op-by-op form."""
    from deltazip.model import layers

    norm = layers.RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5)
    x = (torch.randn(5, 64, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    try:
        layers.FUSED_RMS_NORM = False
        want = norm(x)
    finally:
        layers.FUSED_RMS_NORM = True
    got = norm(x)
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(got, want, **tol)

    class PerRow:  # a DeltaOps whose norm delta changes every row's weight
        def norm_weight(self, name, weight, x):
            return weight.expand(x.shape[0], -1) * 2

    torch.testing.assert_close(norm(x, PerRow()), want * 2, rtol=0, atol=0)
