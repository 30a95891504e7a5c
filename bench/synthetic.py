"""Synthetic models for the serving benchmark: a random-weight Llama of a given shape plus N fine-tune deltas.

The deltas are written by a fast synthetic packer straight into the real artifact format (kernels/packing.py
layout, `sparse24` kind, symmetric group quantization): random 2:4 masks, random codes, small scales. They are
not compressions of a real fine-tune (no OBS), but they have exactly the bytes and kernels a compressed delta
has, so serving speed is representative. Writing one is bound by one core (hashing and writing its shards:
67 deltas of a 4-layer 7B shape took 92 s in one process on a 4-GPU box), so `--jobs N` writes N at a time in
child processes; a delta's bytes depend only on its index, not on the number of jobs.

    python -m bench.synthetic --shape tiny --num-deltas 3 --bits 4 --out /tmp/synth
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from deltazip.artifact.identity import base_identity
from deltazip.artifact.names import is_block_linear
from deltazip.artifact.writer import ArtifactWriter
from deltazip.model.config import LlamaConfig
from deltazip.model.synthetic import random_state_dict, tiny_config

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)  # fmt: skip
LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)  # fmt: skip
SHAPES = ("tiny", "7b", "13b")
DELTA_KINDS = ("sparse24", "dense")
# The 6 valid 2:4 nibbles i0 | (i1 << 2), i0 < i1 (kernels/packing.py).
_NIBBLES = (0 | 1 << 2, 0 | 2 << 2, 0 | 3 << 2, 1 | 2 << 2, 1 | 3 << 2, 2 | 3 << 2)
BASE_STD = 0.02
DELTA_STD = 1e-3


def shape_config(shape: str, num_layers: int = 0) -> LlamaConfig:
    """LlamaConfig of a named shape; `num_layers` > 0 keeps the layer shapes but cuts the depth (to fit a disk)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if shape == "tiny":
        config = tiny_config(max_position_embeddings=512)
    else:
        # head_dim=None: derived from the new hidden size and heads (128), not the tiny config's 16
        config = dataclasses.replace(tiny_config(), rms_norm_eps=1e-5, head_dim=None,
                                     **(LLAMA2_7B if shape == "7b" else LLAMA2_13B))
    return dataclasses.replace(config, num_hidden_layers=num_layers) if num_layers > 0 else config


def write_byte_tokenizer(folder: Path) -> None:
    """Byte-level BPE without merges: one byte = one token (ids 0..255), so prompt length = token count."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    chars = {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}
    tok = Tokenizer(models.BPE(vocab={ch: b for b, ch in chars.items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def write_base(folder: Path, config: LlamaConfig, device: str = "cpu", seed: int = 0) -> Path:
    """Random fp16 base (N(0, 0.02), norms ~1) + byte tokenizer in HF layout; tensors made one at a time on `device`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in random_state_dict(config).items()}
    g = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g, device=device) * BASE_STD
        tensors[name] = (w + 1.0 if name.endswith("norm.weight") else w).to(torch.float16).cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    import json

    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": "float16"}, indent=2) + "\n")
    write_byte_tokenizer(folder)
    return folder


def random_sparse24(n: int, k: int, bits: int, group_size: int, g: torch.Generator, device: str) -> dict:
    """Packed tensors of a random 2:4 delta [N, K]: every word of codes is random bits, meta uses valid nibbles."""
    assert k % 32 == 0 and k % group_size == 0 and 32 % bits == 0, (n, k, bits, group_size)
    num_words = (k // 2) * bits // 32
    qweight = torch.randint(-(1 << 31), 1 << 31, (n, num_words), generator=g, device=device, dtype=torch.int64)
    table = torch.tensor(_NIBBLES, dtype=torch.int64, device=device)
    nibbles = table[torch.randint(0, 6, (n, k // 32, 8), generator=g, device=device)]
    words = (nibbles << (torch.arange(8, device=device) * 4)).sum(-1)
    meta = torch.where(words >= 1 << 31, words - (1 << 32), words)
    step = DELTA_STD / (1 << (bits - 1))  # codes span about +-DELTA_STD around the symmetric zero point
    scales = torch.full((n, k // group_size), step, dtype=torch.float16, device=device)
    return {"qweight": qweight.to(torch.int32).cpu(), "meta": meta.to(torch.int32).cpu(), "scales": scales.cpu()}


def write_delta(base_dir: Path, out_dir: Path, config: LlamaConfig, kind: str = "sparse24", bits: int = 4,
                group_size: int = 128, seed: int = 1, device: str = "cpu") -> Path:
    """One synthetic fine-tune delta of every block linear, as a real artifact folder (published atomically)."""
    if kind not in DELTA_KINDS:
        raise ValueError(f"kind must be one of {DELTA_KINDS}, got {kind!r}")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in random_state_dict(config).items()}
    compression = ({"method": "synthetic", "bits": bits, "sparsity": "2:4", "group_size": group_size, "sym": True}
                   if kind == "sparse24" else {"method": "dense", "dtype": "float16"})
    g = torch.Generator(device=device).manual_seed(seed)
    with ArtifactWriter(out_dir, base_identity(base_dir), compression, shard_max_bytes=1 << 30) as writer:
        for name, shape in shapes.items():
            numel = shape[0] * (shape[1] if len(shape) > 1 else 1)
            writer.ft_bytes_fp16 += 2 * numel
            if not is_block_linear(name, shape):
                continue  # norms, embeddings and lm_head keep the base's values
            writer.ft_linear_bytes_fp16 += 2 * numel
            if kind == "dense":
                delta = (torch.randn(shape, generator=g, device=device) * DELTA_STD).to(torch.float16).cpu()
                writer.add(name, {"delta": delta}, kind="dense", shape=shape, dtype="float16")
            else:
                parts = random_sparse24(shape[0], shape[1], bits, min(group_size, shape[1]), g, device)
                writer.add(name, parts, kind="sparse24", shape=shape, dtype="float16", bits=bits,
                           group_size=min(group_size, shape[1]), sym=True)
    return out_dir


def write_suite(root: Path, shape: str, num_deltas: int, kind: str = "sparse24", bits: int = 4,
                group_size: int = 128, num_layers: int = 0, device: str = "cpu", jobs: int = 1,
                on_written: Callable[[str, Path], None] | None = None) -> tuple[Path, dict[str, Path]]:
    """Base + `num_deltas` deltas under `root` (reused if present); returns (base_dir, {name: artifact_dir}).

    `jobs` > 1 writes the missing deltas in that many child processes (spawned: safe with CUDA). `on_written(name,
    dir)` is called once per delta as soon as it is complete (reused ones first), in this process, so a caller can
    push a delta and drop its local copy while the others are still being written."""
    config = shape_config(shape, num_layers)
    base_dir = root / f"base-{shape}"
    if not (base_dir / "config.json").exists():
        write_base(base_dir, config, device)
    tag = f"{kind}-{bits}b" if kind == "sparse24" else kind
    artifacts = {f"ft-{i:03d}": root / f"ft-{i:03d}-{tag}" for i in range(num_deltas)}
    names = list(artifacts)
    written = on_written or (lambda name, out: None)
    todo = []
    for i, (name, out) in enumerate(artifacts.items()):
        if (out / "manifest.json").exists():
            written(name, out)  # reused
        else:
            todo.append((i, out))
    if jobs <= 1 or len(todo) <= 1:
        for i, out in todo:
            written(names[i], write_delta(base_dir, out, config, kind, bits, group_size, seed=1000 + i, device=device))
        return base_dir, artifacts
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(write_delta, base_dir, out, config, kind, bits, group_size, 1000 + i, device): i
                   for i, out in todo}
        for future in as_completed(futures):
            written(names[futures[future]], future.result())  # result() re-raises a child's error
    return base_dir, artifacts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.synthetic", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--num-layers", type=int, default=0, help="cut the depth (0 = the shape's own)")
    p.add_argument("--num-deltas", type=int, default=4)
    p.add_argument("--kind", choices=DELTA_KINDS, default="sparse24")
    p.add_argument("--bits", type=int, choices=(2, 4), default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--jobs", type=int, default=1,
                   help=f"deltas written at a time, in child processes (this host has {os.cpu_count()} CPUs)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    base_dir, artifacts = write_suite(args.out, args.shape, args.num_deltas, args.kind, args.bits, args.group_size,
                                      args.num_layers, args.device, args.jobs)
    print(base_dir, *artifacts.values(), sep="\n")


if __name__ == "__main__":
    main()
