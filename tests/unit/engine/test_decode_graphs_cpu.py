"""DecodeGraphs' padding on CPU (the capture replaced by an eager replay over the same static buffers):
padded rows write only the spare block, and replayed decode steps give the eager engine's tokens."""

import torch
from engine_fixtures import Fixture, one_torch_thread, prompts  # noqa: F401 (autouse fixture)

from deltazip.model import attention
from deltazip.model.sampling import SamplingParams
from services.worker.engine.cuda_graphs import DecodeGraphs, graph_batch_sizes


class EagerReplay(DecodeGraphs):
    """'Captures' a forward that rereads the static buffers at each replay, like a CUDA graph does."""

    def _capture(self, b: int, ctx_len: int, layout: int, rows_hint: int = 0, segments_hint: int = 0) -> None:
        deltas = self.graph_deltas if layout else None
        hints = (rows_hint or None, segments_hint or None)
        ctx = self._ctx(b, ctx_len, deltas, *hints)
        graphs, out = self, self.model(self.input_ids[:b], ctx)  # the static output

        class Replay:
            def replay(self):
                out.copy_(graphs.model(graphs.input_ids[:b], graphs._ctx(b, ctx_len, deltas, *hints)))

        self.graphs[(b, ctx_len, layout, rows_hint, segments_hint)] = (Replay(), out)

    def run(self, input_ids, attn, deltas=None):
        self.num_runs = getattr(self, "num_runs", 0) + 1
        return super().run(input_ids, attn, deltas)


def test_context_buckets(monkeypatch):
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.block_size, graphs.max_blocks, graphs.device = 4, 10, torch.device("cpu")
    assert [graphs.context_bucket(n) for n in (1, 4, 5, 17, 33, 40)] == [4, 4, 8, 32, 40, 40]
    # on CUDA the paged decode kernel reads each context to its length: one graph per batch size serves them all
    graphs.device = torch.device("cuda")
    assert {graphs.context_bucket(n) for n in (1, 4, 5, 17, 33, 40)} == {40}
    monkeypatch.setattr(attention, "DECODE_KERNEL", False)
    assert [graphs.context_bucket(n) for n in (1, 5, 40)] == [4, 8, 40]


def test_graph_batch_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(64)[-3:] == [32, 48, 64]


def test_padded_decode_steps_equal_eager():
    fx = Fixture(num_deltas=1)
    ps = prompts(6, seed=9, max_len=20)  # 5 base rows: padded to 8
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for graphs in (False, True):
        engine = fx.engine(num_kv_blocks=60, max_num_seqs=8)
        if graphs:
            runner = engine.runner
            runner.model.allocate_kv_cache(61, runner.block_size)  # + the spare block
            runner.graphs = EagerReplay(runner.model, runner.block_size, 60, 8, engine.max_model_len)
        for i, p in enumerate(ps):  # steps with delta rows stay eager; base-only decode steps replay
            short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            engine.add_request(f"r{i}", p, short if i == 0 else params, delta="ft0" if i == 0 else None)
        results.append({k: v[0] for k, v in engine.run_until_done().items()})
        if graphs:
            assert runner.graphs.num_runs > 0 and {k[0] for k in runner.graphs.graphs} <= {1, 2, 4, 8}
            assert len({k[1] for k in runner.graphs.graphs}) > 1  # contexts grew across buckets
            spare = runner.model.kv_cache[:, :, 60]
            assert spare.abs().sum() > 0  # padded rows wrote there, and nowhere else (tokens equal below)
    assert results[0] == results[1]


def test_decode_steps_with_packed_deltas_replay_and_equal_eager():
    """Delta rows too: replayed decode steps (GraphDeltaOps over static segment tensors) == eager tokens."""
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the SBMM kernel runs on CPU only under TRITON_INTERPRET=1")
    from deltazip.model.layers import NamedLinear
    from deltazip.model.synthetic import random_model, tiny_config
    from services.worker.delta_ops import StepDeltaOps
    from services.worker.device_slots import DeviceSlots
    from services.worker.engine.engine import EngineConfig, LLMEngine
    from tests.unit.worker.test_graph_deltas import make_delta

    cfg = tiny_config(tie_word_embeddings=True)
    ps = prompts(3, seed=4, max_len=8)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    results = []
    for graphs in (False, True):
        model = random_model(cfg, seed=0)
        names = {m.hf_name + ".weight" for m in model.modules() if isinstance(m, NamedLinear)}
        slots = DeviceSlots(3, "cpu", torch.float32, names, tie_word_embeddings=True)
        slots.write(0, "a", make_delta(model, 4, 1, with_dense=True))
        slots.write(1, "b", make_delta(model, 2, 2, with_dense=False))

        def provider(segments, slots=slots):
            if all(name is None for name, _ in segments):
                return None
            return StepDeltaOps(slots, [(None if n is None else int(n), rows) for n, rows in segments])

        engine = LLMEngine(model, EngineConfig(num_kv_blocks=40, block_size=16, max_num_seqs=8,
                                               max_deltas_per_batch=2), eos_token_ids=[], deltas_provider=provider)
        if graphs:
            runner = engine.runner
            runner.model.allocate_kv_cache(41, runner.block_size)
            runner.graphs = EagerReplay(runner.model, runner.block_size, 40, 8, engine.max_model_len, max_segments=4)
        for i, p in enumerate(ps):
            engine.add_request(f"r{i}", p, params, delta=[None, "0", "1"][i % 3])
        results.append({k: v[0] for k, v in engine.run_until_done().items()})
        if graphs:
            assert any(k[2] for k in runner.graphs.graphs), "no delta step replayed"
            assert all(k[4] in (1, 2) for k in runner.graphs.graphs if k[2])  # <= 2 delta segments per step
    assert results[0] == results[1]
