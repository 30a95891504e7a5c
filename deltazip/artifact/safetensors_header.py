"""Torch-free reading of safetensors headers and checkpoint indexes (delta store and scheduler use it)."""

import json
import os
import struct
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """Header of a safetensors file -> ({name: {dtype, shape, data_offsets}}, byte offset of the data)."""
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: safetensors header of {header_len} bytes is implausible")
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def checkpoint_shards(ckpt_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name of an HF checkpoint folder to the safetensors file holding it."""
    ckpt_dir = Path(ckpt_dir)
    index_path = ckpt_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return {name: ckpt_dir / shard for name, shard in weight_map.items()}
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors weights (expected an HF checkpoint folder)")
    mapping: dict[str, Path] = {}
    for path in files:
        for name in read_header(path)[0]:
            mapping[name] = path
    return mapping
