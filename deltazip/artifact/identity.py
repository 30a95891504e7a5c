"""Base identity: a sha256 naming one exact base checkpoint, cheap to compute (no full weight hash)."""

import hashlib
import json
import mmap
import os
from pathlib import Path

from deltazip.artifact.safetensors_header import checkpoint_shards, read_header

# Config keys that differ between copies of the same weights (tool versions, paths, storage dtype).
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
# Per tensor, these many bytes at its start, middle and end go into the fingerprint.
_SAMPLE_BYTES = 4096


def base_identity(base_dir: str | os.PathLike) -> str:
    """'sha256:<hex>' over the canonical config.json, sorted tensor names + shapes, and sampled weight bytes."""
    base_dir = Path(base_dir)
    digest = hashlib.sha256(b"deltazip-base-identity-v1\n")
    config = json.loads((base_dir / "config.json").read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    shards = checkpoint_shards(base_dir)
    headers = {path: read_header(path) for path in set(shards.values())}
    for name in sorted(shards):
        header, data_start = headers[shards[name]]
        info = header[name]
        digest.update(f"\n{name}:{info['dtype']}:{list(info['shape'])}\n".encode())
        begin, end = info["data_offsets"]
        digest.update(_sample(shards[name], data_start + begin, data_start + end))
    return "sha256:" + digest.hexdigest()


def _sample(path: Path, begin: int, end: int) -> bytes:
    """Bytes at the start, middle and end of [begin, end) of a file: a content fingerprint of one tensor."""
    size = end - begin
    if size <= 3 * _SAMPLE_BYTES:
        starts = [begin]
        length = size
    else:
        mid = begin + (size // 2 // _SAMPLE_BYTES) * _SAMPLE_BYTES
        starts = [begin, mid, end - _SAMPLE_BYTES]
        length = _SAMPLE_BYTES
    if length == 0:
        return b""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return b"".join(mm[s : s + length] for s in starts)
