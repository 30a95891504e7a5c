"""A tiny Llama with a byte tokenizer, fine-tunes of it as delta artifacts, and merged reference models.

Shared by the integration tests that serve real deltas (worker alone, the whole stack).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltazip.model.loader import load_state_dict_from_dir, model_from_state_dict, save_model_dir
from deltazip.model.synthetic import random_state_dict, tiny_config

CONFIG = tiny_config(max_position_embeddings=128)
MAX_TOKENS = 8
PROMPTS = ["hello world", "the quick brown fox", "DeltaZip", "a"]


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable char map, which the ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no merges: token id = byte value, 256 ids (the tiny model's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={ch: b for b, ch in byte_chars().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))


def write_tiny_base(root: Path, config=CONFIG) -> tuple[Path, dict]:
    """root/tiny-base: random weights (seed 0) and the byte tokenizer; returns (folder, state dict)."""
    base_dir = root / "tiny-base"
    base_dir.mkdir(parents=True)
    base_state = random_state_dict(config, seed=0)
    save_model_dir(base_dir, config, base_state)
    write_byte_tokenizer(base_dir)
    return base_dir, base_state


def merged_reference(base_dir: Path, artifact: Path, config=CONFIG):
    """The model base + the artifact's dequantized delta: what serving that delta must reproduce."""
    from deltazip.artifact import load_delta

    state = load_state_dict_from_dir(base_dir)
    for tensor_name, delta in load_delta(artifact, "cpu").items():
        state[tensor_name] = state[tensor_name] + delta.dequantize(torch.float32)
    return model_from_state_dict(config, state)


def write_finetune(base_state: dict, folder: Path, seed: int, config=CONFIG) -> Path:
    """Base + a small random change to every tensor (linears, norms, embeddings, lm_head)."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base_state.items()}
    folder.mkdir(parents=True)
    save_model_dir(folder, config, state)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Base dir + two dense delta artifacts + their merged reference models."""
    from deltazip.artifact import write_dense_delta

    root = tmp_path_factory.mktemp("models")
    base_dir, base_state = write_tiny_base(root)
    artifacts, merged = {}, {"tiny-base": model_from_state_dict(CONFIG, base_state)}
    other_base = root / "other-base"  # a different base: its deltas must be refused
    other_base.mkdir()
    other_state = random_state_dict(CONFIG, seed=99)
    save_model_dir(other_base, CONFIG, other_state)
    write_dense_delta(other_base, write_finetune(other_state, root / "ft-other-hf", seed=7), root / "ft-other-delta")
    artifacts["ft-other"] = root / "ft-other-delta"
    for i, name in enumerate(("ft-a", "ft-b")):
        ft_dir = write_finetune(base_state, root / f"{name}-hf", seed=10 + i)
        out = root / f"{name}-delta"
        write_dense_delta(base_dir, ft_dir, out)
        artifacts[name] = out
        merged[name] = merged_reference(base_dir, out)
    packed = compress_packed(base_dir, root / "ft-a-hf", root / "ft-packed-delta")  # 4-bit 2:4 sparse
    artifacts["ft-packed"] = packed
    merged["ft-packed"] = merged_reference(base_dir, packed)
    return base_dir, artifacts, merged


def compress_packed(base_dir: Path, ft_dir: Path, out: Path, flags: list[str] | None = None) -> Path:
    """`deltazip compress` (OBS, 4-bit, 2:4; `flags` added last) on the tiny model with a small calibration text."""
    calib = out.parent / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog; hello world. " * 40)
    cmd = [sys.executable, "-m", "deltazip", "compress", str(base_dir), str(ft_dir), "-o", str(out), "--bits", "4",
           "--group-size", "32", "--calib", str(calib), "--nsamples", "4", "--seq-len", "32", "--no-progress",
           *(flags or [])]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def greedy_reference(model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with the merged model alone (dense path, no KV cache)."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model.forward_dense(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


