"""Load Hugging Face Llama checkpoints (safetensors, single file or sharded) into LlamaForCausalLM."""

from __future__ import annotations

import json
from pathlib import Path

import structlog
import torch
from safetensors import safe_open

from deltazip.model.config import LlamaConfig
from deltazip.model.llama import LlamaForCausalLM

log = structlog.get_logger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Keys some checkpoints carry that are derived, not learned.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a model folder: from the shard index, model.safetensors, or all *.safetensors."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}: convert the checkpoint to safetensors first")
    return files


def load_state_dict_from_dir(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a model folder by HF name; floating tensors cast to `dtype` when given."""
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.endswith(_IGNORED_SUFFIXES):
                    continue
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[key] = t.to(device)
    return state


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """Build LlamaForCausalLM from `<path>/config.json` + safetensors weights, in eval mode."""
    config = LlamaConfig.from_dir(path)
    state = load_state_dict_from_dir(path, device=device, dtype=dtype)
    model = model_from_state_dict(config, state)
    log.info("model_loaded", path=str(path), device=str(device), dtype=str(dtype), layers=config.num_hidden_layers)
    return model


def model_from_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """Assign HF-named tensors to a fresh model without a random init; checks names and shapes."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = dict(state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: lm_head shares model.embed_tokens.weight
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the Llama config: missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def save_model_dir(
    path: str | Path,
    config: LlamaConfig,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Write config.json + model.safetensors (+ extra text files) into an existing folder, HF layout.

    Tied checkpoints are written without lm_head.weight, as Hugging Face does.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for key, t in state.items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    config_dict = config.to_dict()
    if dtype is not None:
        config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
