"""Lazy, mmapped access to the tensors of an HF safetensors checkpoint folder."""

import os
from pathlib import Path

import torch
from safetensors import safe_open

from deltazip.artifact.safetensors_header import checkpoint_shards, read_header

_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# Non-weight files of a checkpoint worth carrying (config, tokenizer, chat template), up to this size.
_MAX_EXTRA_FILE_BYTES = 64 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")


class Checkpoint:
    """Tensor names, shapes and dtypes from headers; tensors read one at a time through mmap."""

    def __init__(self, ckpt_dir: str | os.PathLike) -> None:
        self.dir = Path(ckpt_dir)
        self._shard_of = checkpoint_shards(self.dir)
        self._info: dict[str, dict] = {}
        for path in sorted(set(self._shard_of.values())):
            header, _ = read_header(path)
            self._info.update({name: header[name] for name in header if self._shard_of.get(name) == path})
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        """Tensor names in sorted order."""
        return sorted(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def dtype_name(self, name: str) -> str:
        """Storage dtype as a torch dtype name ('bfloat16', ...)."""
        raw = self._info[name]["dtype"]
        return _DTYPE_NAMES.get(raw, raw.lower())

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored (CPU, backed by the mmapped file until modified)."""
        path = self._shard_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path].get_tensor(name)  # type: ignore[attr-defined]

    def extra_files(self) -> list[Path]:
        """Small non-weight files (config, tokenizer, generation config, chat template), relative paths."""
        out = []
        for path in sorted(self.dir.rglob("*")):
            rel = path.relative_to(self.dir)
            if not path.is_file() or path.name.endswith(_WEIGHT_SUFFIXES) or any(p.startswith(".") for p in rel.parts):
                continue
            if path.name.endswith(".index.json") or path.stat().st_size > _MAX_EXTRA_FILE_BYTES:
                continue
            out.append(rel)
        return out


def torch_dtype(name: str) -> torch.dtype:
    """'bfloat16' -> torch.bfloat16."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype
