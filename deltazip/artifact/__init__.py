"""Delta artifact: `manifest.json` + `delta-XXXXX.safetensors` shards (see docs/formats.md).

Manifest reading, verification and base identity are torch-free (the delta store uses them);
writing, loading and restoring import torch on first use.
"""

from deltazip.artifact.errors import ArtifactError, BaseMismatchError, CorruptArtifactError
from deltazip.artifact.identity import base_identity
from deltazip.artifact.manifest import FORMAT_NAME, FORMAT_VERSION, Manifest, ShardEntry, TensorEntry, read_manifest
from deltazip.artifact.verify import check_base, verify

_LAZY = {
    "write_dense_delta": "deltazip.artifact.dense",
    "load_delta": "deltazip.artifact.reader",
    "DeltaTensor": "deltazip.artifact.delta_tensor",
    "ArtifactWriter": "deltazip.artifact.writer",
    "Checkpoint": "deltazip.artifact.checkpoint",
    "restore": "deltazip.artifact.restorer",
}

__all__ = [
    "ArtifactError", "BaseMismatchError", "CorruptArtifactError", "FORMAT_NAME", "FORMAT_VERSION", "Manifest",
    "ShardEntry", "TensorEntry", "base_identity", "check_base", "read_manifest", "verify", *_LAZY,
]  # fmt: skip


def __getattr__(name: str):
    """Torch-bound parts are imported only when used."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltazip.artifact' has no attribute {name!r}")
