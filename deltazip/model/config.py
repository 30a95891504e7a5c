"""Llama architecture config, read from a Hugging Face `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Rotary position scaling (`rope_scaling` in HF configs)."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: frequency band edges and the context length the model was pretrained with.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; use one of {ROPE_TYPES}")
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("rope_scaling: high_freq_factor must be greater than low_freq_factor")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling | None:
        """Parse the HF `rope_scaling` dict (key `rope_type`, or the older `type`)."""
        if not d:
            return None
        rope_type = d.get("rope_type", d.get("type", "default"))
        kwargs: dict[str, Any] = {"rope_type": rope_type, "factor": float(d.get("factor", 1.0))}
        for key in ("low_freq_factor", "high_freq_factor"):
            if key in d:
                kwargs[key] = float(d[key])
        if "original_max_position_embeddings" in d:
            kwargs["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF `rope_scaling` dict."""
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return d


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None = same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in (informational)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config.{name} must be > 0, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a parsed HF config.json dict (unknown keys are ignored)."""
        arch = d.get("model_type", "llama")
        if arch != "llama":
            raise ValueError(f"model_type {arch!r} is not a Llama-family model; expected 'llama'")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(d.get("rope_scaling")),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> LlamaConfig:
        """Read `<path>/config.json`."""
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: pass a Hugging Face model folder with config.json")
        return cls.from_dict(json.loads(config_path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        """HF-style config.json dict (round-trips through `from_dict`)."""
        d = asdict(self)
        d.pop("eos_token_ids")
        d["rope_scaling"] = self.rope_scaling.to_hf() if self.rope_scaling else None
        eos = list(self.eos_token_ids)
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        d["model_type"] = "llama"
        d["architectures"] = ["LlamaForCausalLM"]
        d["hidden_act"] = "silu"
        return d
