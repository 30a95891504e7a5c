"""write_dense_delta: uncompressed fp16 deltas of every changed tensor (the `dense` kind)."""

import os

import torch

from deltazip.artifact.checkpoint import Checkpoint
from deltazip.artifact.errors import ArtifactError
from deltazip.artifact.identity import base_identity
from deltazip.artifact.names import is_block_linear
from deltazip.artifact.writer import ArtifactWriter

FP16_MAX = 65504.0


def check_pair(base: Checkpoint, ft: Checkpoint) -> None:
    """Refuse a fine-tune whose tensor names or shapes differ from the base's."""
    base_names, ft_names = set(base.names()), set(ft.names())
    if base_names != ft_names:
        only_ft, only_base = sorted(ft_names - base_names)[:5], sorted(base_names - ft_names)[:5]
        raise ArtifactError(
            f"{ft.dir} and {base.dir} hold different tensors (only in fine-tune: {only_ft}, only in base: "
            f"{only_base}); a delta needs a fine-tune of exactly this base architecture"
        )
    for name in ft.names():
        if base.shape(name) != ft.shape(name):
            raise ArtifactError(f"{name}: fine-tune shape {ft.shape(name)} != base shape {base.shape(name)}")


def tensor_delta(base: Checkpoint, ft: Checkpoint, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """fp32 delta W_ft - W_base of one tensor on `device`."""
    return ft.get(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)


def to_fp16_delta(name: str, delta: torch.Tensor) -> torch.Tensor:
    """fp16 copy of a delta; refuses values fp16 cannot hold."""
    peak = float(delta.abs().max()) if delta.numel() else 0.0
    if peak > FP16_MAX:
        raise ArtifactError(f"{name}: delta magnitude {peak:.3g} exceeds fp16 range; is the base right?")
    return delta.to(torch.float16)


def add_dense(writer: ArtifactWriter, name: str, delta: torch.Tensor, dtype_name: str) -> None:
    """Store one fp16 dense delta with its fp16 rounding error."""
    half = to_fp16_delta(name, delta)
    norm = float(delta.norm())
    rel = float((half.float() - delta).norm()) / norm if norm else 0.0
    writer.add(name, {"delta": half}, kind="dense", shape=tuple(delta.shape), dtype=dtype_name, rel_error=rel)


def copy_extra_files(writer: ArtifactWriter, ft: Checkpoint) -> None:
    """Carry the fine-tune's config, tokenizer and chat template into files/."""
    for rel in ft.extra_files():
        writer.add_file(rel.as_posix(), ft.dir / rel)


def write_dense_delta(
    base_dir: str | os.PathLike, ft_dir: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False
) -> None:
    """Write an artifact of uncompressed fp16 deltas; tensors whose delta is exactly zero are omitted."""
    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    check_pair(base, ft)
    compression = {"method": "dense", "dtype": "float16"}
    with ArtifactWriter(out_dir, base_identity(base_dir), compression, overwrite=overwrite) as writer:
        for name in ft.names():
            numel = ft.get(name).numel()
            writer.ft_bytes_fp16 += 2 * numel
            writer.ft_linear_bytes_fp16 += 2 * numel if is_block_linear(name, ft.shape(name)) else 0
            delta = tensor_delta(base, ft, name)
            if bool((delta != 0).any()):
                add_dense(writer, name, delta, ft.dtype_name(name))
        copy_extra_files(writer, ft)
