"""restore: base + decompressed delta -> a full HF checkpoint folder of the fine-tune."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from deltazip.artifact.atomic import make_temp_dir, publish_dir, write_file_synced
from deltazip.artifact.checkpoint import Checkpoint, torch_dtype
from deltazip.artifact.manifest import FILES_DIR
from deltazip.artifact.reader import read_shard
from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.artifact.verify import verify

_SHARD_MAX_BYTES = 2 << 30


def restore(
    base_dir: str | os.PathLike, artifact_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write base + dequantized delta for every tensor (each in the fine-tune's dtype); atomic."""
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    manifest = verify(artifact_dir, base_dir=base_dir, shards=False)
    base = Checkpoint(base_dir)
    # Walk base tensors grouped by the artifact shard holding their delta, so one shard is in memory at a time.
    order = sorted(base.names(), key=lambda n: (manifest.tensors[n].shard if n in manifest.tensors else "", n))
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; remove it or pass --overwrite")
    tmp = make_temp_dir(out_dir)
    try:
        loaded_shard, shard_tensors = None, {}
        pending: dict[str, torch.Tensor] = {}
        weight_map: dict[str, str] = {}
        for name in order:
            entry = manifest.tensors.get(name)
            weight = base.get(name)
            if entry is not None:
                if entry.shard != loaded_shard:
                    shard_tensors = read_shard(artifact_dir, entry.shard, manifest.shards[entry.shard])
                    loaded_shard = entry.shard
                parts = {role: shard_tensors[key] for role, key in entry.keys.items()}
                delta = DeltaTensor(name, entry.kind, entry.shape, entry.bits, entry.group_size, entry.sym, **parts)
                restored = delta.dequantize(torch.float32) + (0.0 if entry.absolute else weight.float())
                weight = restored.to(torch_dtype(entry.dtype))
            pending[name] = weight.contiguous()
            if sum(t.numel() * t.element_size() for t in pending.values()) >= _SHARD_MAX_BYTES:
                _write_shard(tmp, pending, weight_map)
        _write_shard(tmp, pending, weight_map)
        _write_index(tmp, weight_map)
        for rel in manifest.files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            write_file_synced(tmp / rel, (artifact_dir / FILES_DIR / rel).read_bytes())
        publish_dir(tmp, out_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _write_shard(tmp: Path, pending: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    if not pending:
        return
    name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    write_file_synced(tmp / name, save_safetensors(pending, metadata={"format": "pt"}))
    weight_map.update({k: name for k in pending})
    pending.clear()


def _write_index(tmp: Path, weight_map: dict[str, str]) -> None:
    shards = sorted(set(weight_map.values()))
    if len(shards) == 1:
        os.rename(tmp / shards[0], tmp / "model.safetensors")
        return
    total = sum((tmp / s).stat().st_size for s in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_file_synced(tmp / "model.safetensors.index.json", json.dumps(index, indent=1).encode())
