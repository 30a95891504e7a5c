"""CompressConfig: every knob of `deltazip compress`, validated once."""

from dataclasses import asdict, dataclass

import torch

from deltazip.compress.quantizer import QuantSpec
from deltazip.compress.sparsity import Sparsity

METHODS = ("obs", "magnitude_rtn", "bitdelta", "sparsegpt_full")
LOSSLESS = ("none", "zstd")
EMBEDDINGS = ("fp16", "compress")
# Allocation loss estimate: second-order with the output Fisher; that plus the first-order term <dL/dW, E>;
# or plain output error.
SENSITIVITIES = ("fisher", "taylor", "output")
ALLOC_BITS = (2, 4)  # what the SBMM kernel runs (2:4 only); an allocated tensor may also be dropped


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
    target_ratio: float | None = None  # allocation mode: per-tensor bits / drop so the artifact is this much smaller
    alloc_bits: tuple[int, ...] = (4, 2)  # packed options per block linear in allocation mode (plus "drop")
    alloc_sensitivity: str = "fisher"  # fisher | taylor | output

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
        if self.target_ratio is not None:
            self._check_allocation()

    def _check_allocation(self) -> None:
        if not self.target_ratio > 1.0:
            raise ValueError(f"target_ratio must be > 1, got {self.target_ratio}")
        if self.method != "obs" or not self.sparsity_spec().is_24:
            raise ValueError("--target-ratio allocates among 2:4 OBS options: needs --method obs and --sparsity 2:4")
        bad = [b for b in self.alloc_bits if b not in ALLOC_BITS]
        if not self.alloc_bits or bad or len(set(self.alloc_bits)) != len(self.alloc_bits):
            raise ValueError(f"alloc_bits must be distinct values of {ALLOC_BITS} (what the kernel runs), "
                             f"got {self.alloc_bits}")
        if self.alloc_sensitivity not in SENSITIVITIES:
            raise ValueError(f"unknown sensitivity {self.alloc_sensitivity!r}; valid: {SENSITIVITIES}")

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
        if self.target_ratio is None:
            for key in ("target_ratio", "alloc_bits", "alloc_sensitivity"):
                d.pop(key)  # uniform artifacts keep the manifest they always had
        else:
            d["bits"] = None  # per tensor: each entry's `bits`; the choices are in `allocation`
            d["alloc_bits"] = list(self.alloc_bits)
            g = f"-g{self.group_size}" if self.group_size else "-row"
            bits = "/".join(str(b) for b in self.alloc_bits)
            d["name"] = f"alloc-{self.target_ratio:g}x-{bits}bit-2:4{g}"  # the store's short label
        return d
