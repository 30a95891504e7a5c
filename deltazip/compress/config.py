"""CompressConfig: every knob of `deltazip compress`, validated once."""

from dataclasses import asdict, dataclass

import torch

from deltazip.compress.quantizer import QuantSpec
from deltazip.compress.sparsity import Sparsity

METHODS = ("obs", "magnitude_rtn", "bitdelta", "sparsegpt_full")
LOSSLESS = ("none", "zstd")
EMBEDDINGS = ("fp16", "compress")


@dataclass(frozen=True, slots=True)
class CompressConfig:
    """Method, quantization, sparsity, calibration and runtime settings."""

    method: str = "obs"  # obs | magnitude_rtn | bitdelta | sparsegpt_full
    bits: int = 4
    sparsity: str = "2:4"  # "2:4", "N:M", an unstructured ratio like "0.5", or "0"
    group_size: int | None = 128  # None = one scale per row
    sym: bool = True
    damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    nsamples: int = 128
    seq_len: int = 512
    calib: str | None = None  # text / jsonl file; None = the shipped default set
    lossless: str = "none"
    embeddings: str = "fp16"  # fp16 | compress: how the embedding and lm_head deltas are stored
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int = 128  # OBS lazy-update block (columns)
    clip_search: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; valid methods: {METHODS}")
        if self.lossless not in LOSSLESS:
            raise ValueError(f"unknown lossless stage {self.lossless!r}; valid: {LOSSLESS}")
        if self.embeddings not in EMBEDDINGS:
            raise ValueError(f"unknown embeddings mode {self.embeddings!r}; valid: {EMBEDDINGS}")
        if not 0.0 < self.damp < 10.0:
            raise ValueError(f"damp must be in (0, 10), got {self.damp}")
        if self.nsamples <= 0 or self.seq_len <= 1:
            raise ValueError(f"need nsamples > 0 and seq_len > 1, got {self.nsamples}, {self.seq_len}")
        self.quant_spec()
        self.sparsity_spec()

    def quant_spec(self) -> QuantSpec:
        """Quantizer settings (BitDelta uses its own fixed container)."""
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, clip_search=self.clip_search)

    def sparsity_spec(self) -> Sparsity:
        return Sparsity.parse(self.sparsity)

    def resolved_device(self) -> torch.device:
        """CUDA when present (auto), else CPU."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_manifest(self) -> dict:
        """The `compression` section of the manifest."""
        d = asdict(self)
        d.pop("device")
        d["sparsity"] = str(self.sparsity_spec())
        return d
