"""The three serving modes (delta, dense-delta, swap) of one in-process worker give the same greedy tokens
on a tiny model, for a mix of base, dense-artifact and compressed-artifact requests served concurrently."""

import asyncio
import shutil

import pytest
import torch

from deltazip.model.sampling import SamplingParams
from services.worker.app import GenerateInput
from services.worker.bootstrap import build_worker
from services.worker.config import WorkerConfig
from tests.integration.tiny_models import compress_packed, write_finetune, write_tiny_base

PROMPTS = ["hello world", "the quick brown fox", "DeltaZip", "a"]
MODELS = ["tiny-base", "ft-dense", "ft-packed", "ft-dense2"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Base dir + two dense artifacts + one OBS 4-bit 2:4 artifact, copied into a worker's disk cache."""
    from deltazip.artifact import write_dense_delta

    root = tmp_path_factory.mktemp("modes")
    base_dir, base_state = write_tiny_base(root)
    cache = root / "cache"
    cache.mkdir()
    write_dense_delta(base_dir, write_finetune(base_state, root / "ft-dense-hf", seed=11), cache / "ft-dense")
    write_dense_delta(base_dir, write_finetune(base_state, root / "ft-dense2-hf", seed=12), cache / "ft-dense2")
    compress_packed(base_dir, root / "ft-dense-hf", cache / "ft-packed")
    return base_dir, cache


def serve_all(base_dir, cache, tmp_path, mode: str, models=MODELS, prompts=PROMPTS, max_tokens: int = 8,
              stats: dict | None = None, **overrides) -> dict[tuple[str, str], list[int]]:
    """Every (model, prompt) pair at once through one in-process worker in `mode`; greedy token ids.
    `stats` (if given) receives the engine's number of weight swaps."""
    disk = tmp_path / mode
    shutil.copytree(cache, disk)
    settings = dict(device="cpu", num_device_slots=2, max_deltas_per_batch=2, num_kv_blocks=64, kv_block_size=4)
    cfg = WorkerConfig(base_dir=str(base_dir), mode=mode, disk_cache_dir=str(disk), worker_id=f"w-{mode}",
                       **{**settings, **overrides})
    parts = build_worker(cfg)
    parts.loop.start()

    async def one(model: str, prompt: str, i: int) -> list[int]:
        inp = GenerateInput(request_id=f"r{i}", model=model, prompt=prompt,
                            sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return [t for e in [e async for e in parts.app.generate(inp)] for t in e.token_ids]

    async def everything():
        pairs = [(m, p) for m in models for p in prompts]
        outs = await asyncio.gather(*(one(m, p, i) for i, (m, p) in enumerate(pairs)))
        return dict(zip(pairs, outs))

    try:
        return asyncio.run(asyncio.wait_for(everything(), 300))
    finally:
        swapper = parts.loop._engine._engine.swapper
        if stats is not None:
            stats["num_swaps"] = swapper.num_swaps if swapper is not None else 0
        parts.close()


@pytest.fixture(scope="module")
def reference(artifacts, tmp_path_factory):
    base_dir, cache = artifacts
    torch.set_num_threads(1)
    return serve_all(base_dir, cache, tmp_path_factory.mktemp("ref"), "delta")


@pytest.mark.parametrize("mode", ["dense-delta", "swap"])
def test_mode_gives_the_delta_modes_greedy_tokens(artifacts, reference, tmp_path, mode):
    base_dir, cache = artifacts
    stats = {}
    got = serve_all(base_dir, cache, tmp_path, mode, stats=stats)
    assert all(len(v) == 8 for v in got.values())
    assert got == reference
    assert (stats["num_swaps"] >= 3) == (mode == "swap")  # swap mode really swapped the three fine-tunes in
    # the fine-tunes really differ from the base, so equality is not trivial
    assert reference[("ft-dense", "hello world")] != reference[("tiny-base", "hello world")]


def test_dense_delta_mode_holds_fp16_deltas_in_host_tier(artifacts, tmp_path):
    from services.worker.modes import DenseHostDelta, dense_fp16
    from deltazip.artifact import load_delta

    _, cache = artifacts
    packed = load_delta(cache / "ft-packed", "cpu")
    dense = dense_fp16(packed)
    kinds = {d.kind for d in packed.values()}
    assert "sparse24" in kinds or "quant" in kinds
    assert all(d.kind == "dense" and d.delta.dtype == torch.float16 for d in dense.values())
    name = next(n for n, d in packed.items() if d.kind != "dense")
    assert isinstance(dense[name], DenseHostDelta) and dense[name].nbytes > packed[name].nbytes
    torch.testing.assert_close(dense[name].delta.float(), packed[name].dequantize(torch.float16).float())


def test_host_tier_keeps_no_shard_alive_behind_the_tensors_it_counts(artifacts):
    """The reader hands out views of each shard it read. Delta mode keeps every one of them (the shard as read,
    no copy); dense-delta keeps the artifact's fp16 norms and expands the packed ones into new tensors, so its norms
    are copied out: the host budget counts what is held."""
    from services.worker.device_slots import DeviceSlots
    from services.worker.modes import dense_fp16
    from services.worker.tier_io import ArtifactTierIO, _parts

    from deltazip.artifact import read_manifest
    from deltazip.artifact.safetensors_header import read_header

    _, cache = artifacts
    (shard,) = read_manifest(cache / "ft-packed").shards
    header = read_header(cache / "ft-packed" / shard)[1]  # the bytes before the data
    slots = DeviceSlots.__new__(DeviceSlots)
    slots.device = torch.device("cpu")
    for transform, beyond in ((None, header), (dense_fp16, 0)):
        io = ArtifactTierIO(fetcher=None, slots=slots, host_transform=transform)
        tensors, counted = io.load_host("ft-packed", str(cache / "ft-packed"))
        held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for d in tensors.values() for t in _parts(d)}.values())
        assert held == counted + beyond, transform  # delta mode: the shard as read; dense-delta: what it counts
    packed, _ = ArtifactTierIO(fetcher=None, slots=slots).load_host("ft-packed", str(cache / "ft-packed"))
    assert len({t.untyped_storage().data_ptr() for d in packed.values() for t in _parts(d)}) == 1  # no copy


def test_a_pinning_host_tier_reads_into_reused_buffers_and_keeps_only_copies(artifacts, monkeypatch):
    """A CUDA worker's host tier copies every tensor into pinned memory, so it reads shards into buffers it reuses
    (deltazip/artifact/reader.py ReadBuffers): each load's tensors equal the artifact's and view none of them, and
    the second load reads into the first one's buffer. (Pinning needs CUDA: a clone stands in for it here.)"""
    from deltazip.artifact import load_delta
    from deltazip.artifact.delta_tensor import PARTS
    from deltazip.artifact.reader import ReadBuffers
    from services.worker import tier_io
    from services.worker.device_slots import DeviceSlots

    _, cache = artifacts
    path = str(cache / "ft-packed")
    want = load_delta(path, "cpu")
    def copied(delta):  # what _pinned does, without CUDA: every part copied
        for part in PARTS:
            if isinstance(getattr(delta, part, None), torch.Tensor):
                setattr(delta, part, getattr(delta, part).clone())
        return delta

    monkeypatch.setattr(tier_io, "_pinned", copied)
    slots = DeviceSlots.__new__(DeviceSlots)
    slots.device = torch.device("cpu")
    io = tier_io.ArtifactTierIO(fetcher=None, slots=slots)
    io._pin, io._buffers = True, ReadBuffers()  # what a CUDA worker's tier has
    idle = []
    for _ in range(2):
        got, _ = io.load_host("ft-packed", path)
        idle.append({b.untyped_storage().data_ptr() for b in io._buffers._idle})
        assert idle[-1] and not idle[-1] & {t.untyped_storage().data_ptr() for d in got.values()
                                            for t in tier_io._parts(d)}
        for name, d in want.items():
            for part in PARTS:
                a, b = getattr(d, part, None), getattr(got[name], part, None)
                assert (a is None and b is None) or torch.equal(a, b)
    assert idle[0] == idle[1]  # the same buffer, read into twice


@pytest.mark.parametrize("trust", [True, False])
def test_the_host_tier_passes_its_stamp_trust_to_every_load(artifacts, monkeypatch, trust):
    """ArtifactTierIO(trust_stamps=...) is what its loads ask load_delta for (the worker passes
    `not --reverify-disk-cache`), and a tensor-parallel tier sends the same to its followers' loads."""
    from deltazip.artifact import reader
    from services.worker.device_slots import DeviceSlots
    from services.worker.tier_io import ArtifactTierIO

    seen, real = [], reader.load_delta
    monkeypatch.setattr(reader, "load_delta", lambda *a, **kw: seen.append(kw.get("trust_stamp")) or real(*a, **kw))
    _, cache = artifacts
    slots = DeviceSlots.__new__(DeviceSlots)
    slots.device = torch.device("cpu")
    ArtifactTierIO(fetcher=None, slots=slots, trust_stamps=trust).load_host("ft-packed", str(cache / "ft-packed"))
    assert seen == [trust]

    from concurrent.futures import Future

    from services.worker.tp_leader import TPTierIO
    from services.worker.tp_protocol import LoadDelta

    class Leader:
        def start_load(self, name, path, slot, trust_stamp=False):
            self.sent = LoadDelta(0, name, path, slot, trust_stamp)
            done = Future()
            done.set_result(None)
            return done

    class Slots:
        device = torch.device("cpu")

        def write(self, slot, name, host):
            return 0

    leader = Leader()
    tp = TPTierIO(leader, None, Slots(), trust_stamps=trust)
    tp.load_host("ft-packed", str(cache / "ft-packed"))
    tp.to_device("ft-packed", {}, 3)
    assert leader.sent.trust_stamp is trust and leader.sent.slot == 3 and seen == [trust, trust]

    from types import SimpleNamespace

    from deltazip import parallel
    from services.worker.tp_follower import Follower

    monkeypatch.setattr(parallel, "shard_delta", lambda tensors, plan, kind: tensors)
    acks = []
    follower = SimpleNamespace(device=torch.device("cpu"), transform=lambda t: t, rank=1, send=acks.append,
                               model=SimpleNamespace(shard_plan=None), slots=Slots())
    Follower.load(follower, leader.sent)  # what a follower does with the command rank 0 sent
    assert seen == [trust] * 3 and acks and not acks[0].error


def test_host_estimate_is_what_each_mode_loads(artifacts):
    """The host budget admits a load by host_estimate, known before loading: it equals the bytes the mode's host
    form of the artifact holds (swap: a whole merged model; dense-delta: fp16 linear deltas; delta: as on disk)."""
    from safetensors.torch import load_file

    from deltazip.artifact import load_delta
    from services.worker.fetcher import dir_bytes
    from services.worker.modes import dense_fp16, host_estimate, merged_weights, select_mode

    base_dir, cache = artifacts
    path = cache / "ft-packed"
    packed = load_delta(path, "cpu")
    base_host = load_file(str(base_dir / "model.safetensors"))
    disk = dir_bytes(path)

    def nbytes(tensors: dict) -> int:
        return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes for t in tensors.values())

    assert host_estimate(select_mode("swap"), base_host)(str(path), disk) == nbytes(merged_weights(base_host, packed))
    assert host_estimate(select_mode("dense-delta"), None)(str(path), disk) == nbytes(dense_fp16(packed))
    assert host_estimate(select_mode("delta"), None)(str(path), disk) == disk


def test_swap_mode_with_host_room_for_one_merged_model(artifacts, reference, tmp_path):
    """A host budget of one merged model: every load waits for the room a finished fine-tune frees (none runs past
    the budget), and all requests, sent at once, still get the delta mode's tokens."""
    from safetensors.torch import load_file

    base_dir, cache = artifacts
    one_model = sum(t.numel() * t.element_size() for t in load_file(str(base_dir / "model.safetensors")).values())
    got = serve_all(base_dir, cache, tmp_path, "swap", host_cache_bytes=one_model)
    assert got == reference
