"""Bucketed eager steps (model_runner.ROW_BUCKETS): prefill steps run their linears on the token count rounded up to
a bucket, padding rows that attention never reads; outputs equal the unpadded engine's and the merged references.
On CPU the runner does not pad by itself (cuBLAS's per-shape planning is the reason), so these tests turn it on."""

import pytest
import torch
from engine_fixtures import Fixture, one_torch_thread, prompts  # noqa: F401 (autouse fixture)

from deltazip.model.sampling import SamplingParams
from services.worker.engine import model_runner
from services.worker.engine.model_runner import row_bucket, row_buckets

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def fx():
    return Fixture(num_deltas=3)


def test_row_bucket_bounds():
    for rows in range(1, 9000):
        b = row_bucket(rows)
        assert b >= rows and b % 16 == 0
        if rows > 128:
            assert b - rows < rows / 8  # at most 12.5% more rows past the first buckets
    buckets = row_buckets(8192)
    assert buckets == sorted(set(buckets)) and buckets[-1] == 8192
    assert {row_bucket(r) for r in range(1, 8193)} == set(buckets)
    assert len(buckets) < 64  # few shapes for cuBLAS to plan


class ForwardSpy:
    """Wraps a model: records (tokens, padded_rows) of every serving forward."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, input_ids, ctx):
        self.calls.append((input_ids.shape[0], ctx.padded_rows))
        out = self.model(input_ids, ctx)
        assert out.shape[0] == input_ids.shape[0]  # the padding never leaves the forward
        return out

    def __getattr__(self, name):
        return getattr(self.model, name)


def _run(fx, pad: bool, ps, deltas, **engine_args):
    engine = fx.engine(num_kv_blocks=200, **engine_args)
    engine.runner.pads_rows = pad
    spy = ForwardSpy(engine.runner.model)
    engine.runner.model = spy
    for i, (p, d) in enumerate(zip(ps, deltas)):
        engine.add_request(f"r{i}", p, GREEDY, delta=d)
    results = engine.run_until_done()
    return {k: v[0] for k, v in results.items()}, spy.calls


@pytest.mark.parametrize("budget", [2048, 40])  # 40: chunked prefill, chunks mixed with decode rows
def test_padded_prefill_matches_unpadded_and_references(fx, budget):
    ps = prompts(10, seed=3, max_len=37)
    deltas = [[None, "ft0", "ft1", "ft2"][i % 4] for i in range(10)]
    padded, calls = _run(fx, True, ps, deltas, max_num_batched_tokens=budget)
    plain, plain_calls = _run(fx, False, ps, deltas, max_num_batched_tokens=budget)
    assert padded == plain
    for i, (p, d) in enumerate(zip(ps, deltas)):
        assert padded[f"r{i}"] == fx.reference(d, p, GREEDY.max_tokens), f"request {i} (delta {d})"
    assert any(rows > tokens for tokens, rows in calls)  # some prefill step really ran padded rows
    # the bucket, never past the step budget the warm-up planned for
    assert all(rows in (0, min(row_bucket(tokens), max(tokens, budget))) for tokens, rows in calls)
    assert all(rows == 0 for _, rows in plain_calls)


def test_decode_steps_and_flag_off_do_not_pad(fx, monkeypatch):
    _, calls = _run(fx, True, prompts(3, seed=4), [None, "ft0", "ft1"])
    decode = [(t, r) for t, r in calls if t <= 3]
    assert decode and all(r == 0 for _, r in decode)
    monkeypatch.setattr(model_runner, "ROW_BUCKETS", False)
    _, calls = _run(fx, True, prompts(3, seed=4), [None, "ft0", "ft1"])
    assert all(r == 0 for _, r in calls)


def test_padded_forward_with_step_delta_ops():
    """The worker's StepDeltaOps (DeviceSlots, every weight's delta incl. norms and embedding) over a layout with
    the padding segment: the token rows equal the unpadded forward's, and the deltas change them."""
    from deltazip.artifact.delta_tensor import DeltaTensor
    from deltazip.model.context import ForwardContext
    from deltazip.model.layers import NamedLinear
    from deltazip.model.loader import model_from_state_dict
    from deltazip.model.synthetic import random_state_dict, tiny_config
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots

    config = tiny_config()
    base_state = random_state_dict(config, seed=0)
    model = model_from_state_dict(config, base_state)
    names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(2, "cpu", torch.float32, names, tie_word_embeddings=config.tie_word_embeddings)
    g = torch.Generator().manual_seed(1)
    for slot in range(2):
        slots.write(slot, f"ft{slot}", {k: DeltaTensor(name=k, kind="dense", shape=tuple(v.shape),
                                                       delta=(0.05 * torch.randn(v.shape, generator=g)).half())
                                        for k, v in base_state.items()})
    lengths = [6, 4, 7]
    ids = torch.randint(3, config.vocab_size, (sum(lengths),), generator=g)
    rows = [(None, 6), (0, 4), (1, 7)]
    out = {}
    with torch.inference_mode():
        for pad in (0, 15):
            model.allocate_kv_cache(64, 4)
            ops = StepDeltaOps(slots, rows + ([(None, pad)] if pad else []))
            out[pad] = model(ids, ForwardContext(attn=_attn(lengths, 4, 64), deltas=ops,
                                                 padded_rows=sum(lengths) + pad if pad else 0))
        model.allocate_kv_cache(64, 4)
        base = model(ids, ForwardContext(attn=_attn(lengths, 4, 64)))
    torch.testing.assert_close(out[15], out[0])
    torch.testing.assert_close(out[0][:6], base[:6])
    assert not torch.allclose(out[0][6:], base[6:])


def _attn(lengths, block_size, num_blocks):
    from deltazip.model.context import AttentionMetadata

    positions, slots, qsl, tables = [], [], [0], []
    for s, n in enumerate(lengths):
        positions += list(range(n))
        slots += [s * num_blocks * block_size // len(lengths) + p for p in range(n)]
        qsl.append(qsl[-1] + n)
    per_seq = num_blocks // len(lengths)
    tables = [[s * per_seq + b for b in range(per_seq)] for s in range(len(lengths))]
    return AttentionMetadata(positions=torch.tensor(positions), slot_mapping=torch.tensor(slots),
                             block_tables=torch.tensor(tables), context_lens=torch.tensor(lengths),
                             query_start_loc=torch.tensor(qsl), max_query_len=max(lengths),
                             max_context_len=max(lengths))


def test_padded_forward_equals_unpadded_with_dense_ops(fx):
    """LlamaForCausalLM.forward with padded_rows: the same hidden states as without, for base and delta rows."""
    from deltazip.model.context import ForwardContext

    engine = fx.engine(num_kv_blocks=64)
    model, provider = engine.runner.model, engine.runner.deltas_provider
    lengths = [5, 9, 3]
    ids = torch.randint(3, 100, (sum(lengths),), generator=torch.Generator().manual_seed(7))
    segments = [(None, 5), ("ft0", 9), ("ft2", 3)]
    with torch.inference_mode():
        model.allocate_kv_cache(64, 4)
        want = model(ids, ForwardContext(attn=_attn(lengths, 4, 64), deltas=provider(segments)))
        model.allocate_kv_cache(64, 4)
        got = model(ids, ForwardContext(attn=_attn(lengths, 4, 64), deltas=provider(segments + [(None, 15)]),
                                        padded_rows=32))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="padded_rows"):
        model(ids, ForwardContext(attn=_attn(lengths, 4, 64), deltas=None, padded_rows=8))


def test_warm_pending_until_the_buckets_are_planned(fx):
    """ModelRunner.warm_pending (what the worker's Status reports as kernels_warming): true while bucket GEMMs are
    left to plan, false once LLMEngine.warm_up has planned them all (in slices), and false on a runner that does
    not pad."""
    engine = fx.engine(num_kv_blocks=64, max_num_batched_tokens=256)
    runner = engine.runner
    assert not runner.warm_pending() and not engine.kernels_warming()  # CPU: no padding, no SBMM warm-up
    runner.pads_rows = True
    assert engine.kernels_warming()
    assert runner.warm_up_row_buckets(deadline=0.0) == 1  # a deadline already passed: one GEMM, then stop
    assert engine.kernels_warming()
    slices = 0
    while engine.warm_up():
        slices += 1
        assert slices < 1000
    assert not engine.kernels_warming() and slices >= 1
    # every (bucket, linear shape) pair was planned: the layers' 4 unfused shapes (q/o, k/v, gate/up, down)
    assert runner.warm_up_row_buckets() == 0
