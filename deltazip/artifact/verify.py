"""Verification of an artifact on disk: every shard and file against its size and sha256 (torch-free)."""

import hashlib
import os
from pathlib import Path

from deltazip.artifact.errors import BaseMismatchError, CorruptArtifactError
from deltazip.artifact.identity import base_identity
from deltazip.artifact.manifest import FILES_DIR, Manifest, read_manifest

_CHUNK_BYTES = 4 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify(
    artifact_dir: str | os.PathLike, base_dir: str | os.PathLike | None = None, shards: bool = True
) -> Manifest:
    """Check every shard (unless `shards=False`) and file against the manifest, and the base if given."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    for name, shard in manifest.shards.items() if shards else ():
        _check_file(artifact_dir / name, shard.size, shard.sha256, "shard")
    for name, entry in manifest.files.items():
        _check_file(artifact_dir / FILES_DIR / name, entry.size, entry.sha256, "file")
    for name, entry in manifest.tensors.items():
        if entry.shard not in manifest.shards:
            raise CorruptArtifactError(f"{artifact_dir}: tensor {name} points to unlisted shard {entry.shard}")
    if base_dir is not None:
        check_base(manifest, base_dir)
    return manifest


def check_base(manifest: Manifest, base_dir: str | os.PathLike) -> None:
    """Raise BaseMismatchError unless `base_dir` is the base the delta was made against."""
    identity = base_identity(base_dir)
    if identity != manifest.base_identity:
        raise BaseMismatchError(manifest.base_identity, identity, str(base_dir))


def _check_file(path: Path, size: int, sha256: str, what: str) -> None:
    if not path.exists():
        raise CorruptArtifactError(f"{what} {path} listed in the manifest is missing; re-fetch or recompress the delta")
    actual_size = path.stat().st_size
    if actual_size != size:
        raise CorruptArtifactError(
            f"{what} {path} is {actual_size} bytes, manifest says {size}; it is truncated or corrupted, re-fetch it"
        )
    actual = sha256_file(path)
    if actual != sha256:
        raise CorruptArtifactError(
            f"{what} {path} has sha256 {actual}, manifest says {sha256}; it is corrupted, re-fetch it"
        )
