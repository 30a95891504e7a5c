"""build_worker: load the base model and wire model, slots, residency, fetcher and engine into a WorkerApp."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltazip.logs import get_logger
from deltazip.rpc.flags import tls_settings
from deltazip.security.tokens import read_token_file
from services.worker.app import WorkerApp, WorkerInfo
from services.worker.config import WorkerConfig, resolve_device
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots, slots_for_model
from services.worker.engine_adapter import build_engine
from services.worker.engine_loop import EngineLoop
from services.worker.fetcher import DeltaFetcher, manifest_base_identity
from services.worker.fetch_process import FetchSettings, ProcessFetcher
from services.worker.engine.swap import host_copies
from services.worker.modes import host_estimate, host_transform, select_mode
from services.worker.residency import ResidencyLimits, ResidencyManager, ResidentDelta
from services.worker.store_client import StoreDirectory
from services.worker.tier_io import ArtifactTierIO
from services.worker.token_stream import StreamPolicy

log = get_logger("services.worker")


@dataclass(slots=True)
class Listeners:
    """Residency transitions fan out to whoever subscribed (engine wakeup, Redis publisher)."""

    callbacks: list[Callable[[ResidentDelta], None]] = field(default_factory=list)

    def __call__(self, snap: ResidentDelta) -> None:
        for callback in self.callbacks:
            callback(snap)


@dataclass(slots=True)
class WorkerParts:
    app: WorkerApp
    loop: EngineLoop
    residency: ResidencyManager
    stores: StoreDirectory
    listeners: Listeners
    live_store_addresses: list[str]  # refreshed by the publisher from Redis
    temp_cache_dir: str = ""  # removed at close: made here because no --disk-cache-dir was given
    tp_leader: object | None = None  # tp_leader.TPLeader when --tensor-parallel-size > 1
    fetcher: DeltaFetcher | ProcessFetcher | None = None  # closed first (a ProcessFetcher stops its children)

    def close(self) -> None:
        self.loop.stop()
        if self.fetcher is not None:
            self.fetcher.close()  # first: downloads in flight stop now (resumed later) instead of holding the close
        self.residency.close()
        self.stores.close()
        if self.tp_leader is not None:
            self.tp_leader.close()  # after the engine loop: no step is in flight
        if self.temp_cache_dir:
            shutil.rmtree(self.temp_cache_dir, ignore_errors=True)


def build_worker(config: WorkerConfig) -> WorkerParts:
    """Everything but the network: model on its device, residency tiers, the engine loop (not started)."""
    from deltazip.artifact import base_identity
    from deltazip.model.loader import load_model
    from deltazip.model.tokenizer import Tokenizer

    if not config.base_dir or not Path(config.base_dir, "config.json").is_file():
        raise ValueError(f"--base-dir {config.base_dir!r} is not a Hugging Face model folder (config.json + "
                         "*.safetensors + tokenizer.json); convert one with `deltazip convert` or pass --base-dir")
    device, dtype = resolve_device(config.device), getattr(torch, config.dtype)
    config.apply_kernel_flags()
    leader = None
    if config.tensor_parallel_size > 1:  # followers spawn before this process touches CUDA
        from services.worker.tp_leader import TPLeader

        leader = TPLeader(config, device)
        model, device = leader.load_model(config.base_dir, dtype), str(leader.device)
    else:
        model = load_model(config.base_dir, device=device, dtype=dtype)
    tokenizer = Tokenizer.from_dir(config.base_dir)
    identity = base_identity(config.base_dir)

    slots = slots_for_model(model, config.num_device_slots, device, dtype, config.sparse_mma_2bit,
                            config.fused_projections)
    if config.merged_cache_bytes and torch.device(device).type == "cuda":
        from services.worker.merged_cache import MergedCache

        slots.merged_cache = MergedCache(config.merged_cache_bytes, config.merged_cache_admit_rows)
    live_addresses: list[str] = []
    stores = StoreDirectory(config.store_addresses, live_addresses=lambda: list(live_addresses), tls=tls_settings(config),
                            token=read_token_file(config.store_token_file, "--store-token-file"))
    cache_dir = config.disk_cache_dir or tempfile.mkdtemp(prefix=f"dz-worker-{config.worker_id}-")
    if config.fetch_processes:  # downloads in child processes: their gRPC parsing does not hold our GIL
        fetcher = ProcessFetcher(FetchSettings(cache_dir, identity, config.fetch_max_attempts, config.fetch_chunk_bytes,
                                               stores.tls, stores.token), stores.addresses, config.fetch_processes)
    else:
        fetcher = DeltaFetcher(cache_dir, stores.sources, identity, max_attempts=config.fetch_max_attempts,
                               chunk_bytes=config.fetch_chunk_bytes)
    listeners = Listeners([_log_transition])
    limits = ResidencyLimits(config.num_device_slots, config.device_cache_bytes, config.host_cache_bytes,
                             config.disk_cache_bytes)
    mode = select_mode(config.mode)
    # Not the params: swaps overwrite those. One pinned copy (on a GPU) serves the merges, the swaps back to the
    # base, and each merged model's untouched tensors (embeddings, norms), which share it instead of pinned copies.
    base_host = host_copies(model) if mode.swaps_weights else None
    if leader is None:
        io = ArtifactTierIO(fetcher, slots, host_transform(mode, base_host, device),
                            device_slots_used=not mode.swaps_weights, host_estimate=host_estimate(mode, base_host),
                            trust_stamps=not config.reverify_disk_cache)
    else:
        io = _tp_tier_io(leader, model, fetcher, slots, host_transform(mode, base_host, device),
                         not config.reverify_disk_cache)
    residency = ResidencyManager(limits, io, on_change=listeners)
    _register_cached(fetcher, residency, identity)

    def delta_ops(rows: list[tuple[str | None, int]]) -> StepDeltaOps:
        """DeltaOps for rows grouped by delta name (None = base), in row order."""
        slotted = [(None if name is None else _slot(residency, name), n) for name, n in rows]
        return StepDeltaOps(slots, slotted)

    swap_weights = residency.host_tensors if mode.swaps_weights else None
    engine_model = model
    if leader is not None:
        from services.worker.tp_leader import leader_engine_setup

        engine_model, config = leader_engine_setup(leader, model, config)
    engine = build_engine(engine_model, tokenizer, config, config.max_model_len or None, delta_ops,
                          residency.is_ready, swap_weights, base_host,
                          kernel_slots=None if mode.swaps_weights else slots)
    info = WorkerInfo(
        worker_id=config.worker_id, base_name=config.base_name or Path(config.base_dir).resolve().name,
        base_identity=identity, device=device, mode=config.mode, max_model_len=engine.max_model_len)
    loop = EngineLoop(engine, on_step=residency.on_step)
    app = WorkerApp(info, tokenizer, loop, residency,
                    StreamPolicy(config.stream_chunk_tokens, config.stream_interval_ms), slots.merged_cache)
    listeners.callbacks.append(app.on_residency_change)
    log.info("worker_built", worker=config.worker_id, base=info.base_name, device=device, dtype=config.dtype,
             disk_cache=cache_dir, max_model_len=info.max_model_len)
    _warn_if_untuned(torch.device(device))
    return WorkerParts(app, loop, residency, stores, listeners, live_addresses,
                       temp_cache_dir="" if config.disk_cache_dir else cache_dir, tp_leader=leader, fetcher=fetcher)


def _warn_if_untuned(device: torch.device) -> None:
    """A GPU that kernels/sbmm_configs.json does not name runs its SBMM launches on the "default" tables, which can
    be slower (docs/kernels.md run 23: the H200 before it had an entry): say so once, at start."""
    if device.type != "cuda":
        return
    from kernels import sbmm_plan

    if not sbmm_plan.tuned_for(device):
        log.warning("sbmm_tables_untuned", gpu=torch.cuda.get_device_name(device),
                    fix="tune it (bench/sbmm.py --sweep) or name a like GPU's tables in kernels/sbmm_configs.json "
                        '(e.g. "NVIDIA H200": "NVIDIA H100 80GB HBM3")')


def _tp_tier_io(leader, model, fetcher: DeltaFetcher | ProcessFetcher, slots: DeviceSlots, transform,
                trust_stamps: bool) -> ArtifactTierIO:
    """Rank 0's host tier holds its own shard of each delta; device writes and drops reach every rank (each
    trusting the disk cache's verified stamps as rank 0 does)."""
    from deltazip.parallel import shard_delta
    from services.worker.tp_leader import TPTierIO

    plan = model.shard_plan
    return TPTierIO(leader, fetcher, slots, lambda tensors: transform(shard_delta(tensors, plan, "dense")),
                    trust_stamps=trust_stamps)


def _log_transition(snap: ResidentDelta) -> None:
    log.info("delta_state", model=snap.name, state=snap.state.value, tier=snap.tier.name.lower(), bytes=snap.bytes,
             slot=snap.slot)


def _slot(residency: ResidencyManager, name: str) -> int:
    slot = residency.slot_of(name)
    assert slot is not None, f"engine scheduled {name} but it is not in a device slot"
    return slot


def _register_cached(fetcher: DeltaFetcher, residency: ResidencyManager, identity: str) -> None:
    """Artifacts left in the disk cache by an earlier run count as ON_DISK (if made for this base)."""
    for name, path, num_bytes in fetcher.cached():
        try:
            ok = manifest_base_identity(path) == identity
        except ValueError:
            ok = False
        if ok:
            residency.register_on_disk(name, path, num_bytes)
        else:
            log.warning("cached_artifact_ignored", model=name, path=path)
