"""load_delta: verified artifact folder -> {HF tensor name: DeltaTensor} on a device."""

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.artifact.errors import ArtifactError, CorruptArtifactError
from deltazip.artifact.manifest import Manifest, ShardEntry, read_manifest
from deltazip.artifact.verify import check_base, verify


def load_delta(
    artifact_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    base_dir: str | os.PathLike | None = None,
    names: set[str] | None = None,
    check: bool = True,
) -> dict[str, DeltaTensor]:
    """Load (a subset of) the artifact's tensors; every shard read is checked against its sha256."""
    artifact_dir = Path(artifact_dir)
    # Shards are checked as they are read (one pass over their bytes); files and the tensor index here.
    manifest = verify(artifact_dir, shards=False) if check else read_manifest(artifact_dir)
    if base_dir is not None:
        check_base(manifest, base_dir)
    wanted = {n: e for n, e in manifest.tensors.items() if names is None or n in names}
    if any(e.absolute for e in wanted.values()):
        raise ArtifactError(
            f"{artifact_dir} stores compressed fine-tuned weights (a baseline), not a delta; "
            "use `deltazip restore` to evaluate it, it cannot be served as a delta"
        )
    by_shard: dict[str, list[str]] = {}
    for name, entry in wanted.items():
        by_shard.setdefault(entry.shard, []).append(name)
    out: dict[str, DeltaTensor] = {}
    for shard, shard_names in sorted(by_shard.items()):
        tensors = read_shard(artifact_dir, shard, manifest.shards[shard], check)
        for name in shard_names:
            out[name] = _delta_tensor(name, manifest, tensors).to(device)
    return out


def read_shard(artifact_dir: Path, shard: str, entry: ShardEntry, check: bool = True) -> dict[str, torch.Tensor]:
    """Read one shard into CPU tensors, refusing bytes that do not match the manifest."""
    data = (artifact_dir / shard).read_bytes()
    if check and (len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256):
        raise CorruptArtifactError(
            f"shard {artifact_dir / shard} does not match its size/sha256 in the manifest; re-fetch it"
        )
    if entry.codec == "zstd":
        import zstandard

        data = zstandard.ZstdDecompressor().decompress(data, max_output_size=entry.raw_size or 0)
    return load_safetensors(data)


def _delta_tensor(name: str, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> DeltaTensor:
    entry = manifest.tensors[name]
    parts = {}
    for role, key in entry.keys.items():
        if key not in tensors:
            raise CorruptArtifactError(f"shard {entry.shard} lacks tensor {key} listed in the manifest")
        parts[role] = tensors[key]
    return DeltaTensor(
        name=name,
        kind=entry.kind,
        shape=tuple(entry.shape),
        bits=entry.bits,
        group_size=entry.group_size,
        sym=entry.sym,
        **parts,
    )
