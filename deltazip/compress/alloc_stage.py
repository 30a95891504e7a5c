"""Allocation mode of `deltazip compress` (`--target-ratio`): every option of every block linear is
compressed on the same calibration inputs as the uniform pipeline would, packed and priced; once all layers
are done, `alloc.allocate` picks one per tensor under the byte budget and only the chosen ones are written.

Calibration inputs of later layers flow through the cheapest packed option of earlier layers (2-bit when
offered), so every 2-bit candidate is exactly what the uniform 2-bit run writes; an allocated artifact is
that artifact with some tensors raised to 4 bits and some dropped.
"""

from dataclasses import dataclass, replace

import structlog
import torch

from deltazip.artifact.writer import ArtifactWriter
from deltazip.compress.alloc import (
    DROP, HEADER_BYTES_PER_KEY, Candidate, allocate, allocation_record, option_name, stored_bytes,
    weighted_output_loss, zstd_shard_factor, zstd_stream_bytes,
)  # fmt: skip
from deltazip.compress.config import CompressConfig
from deltazip.compress.methods import compress_stage, output_rel_error
from deltazip.compress.packer import pack_matrix
from deltazip.compress.sensitivity import Sensitivity

log = structlog.get_logger(__name__)
_SLACK_BYTES = 4096  # safetensors metadata and alignment of the shards, not priced per tensor
_ZSTD_RETRIES = 4


@dataclass(slots=True)
class _Packed:
    """One packed option of one tensor, ready for ArtifactWriter.add."""

    parts: dict[str, torch.Tensor]
    entry: dict  # kind, shape, dtype, bits, group_size, sym, rel_error, out_rel_error
    candidate: Candidate


class AllocationRun:
    """Candidates of every block linear, collected stage by stage; `write` chooses and stores them."""

    def __init__(self, cfg: CompressConfig, sensitivity: Sensitivity | None) -> None:
        assert cfg.target_ratio is not None
        self.cfg, self.sens = cfg, sensitivity
        self.packed: dict[str, dict[str, _Packed]] = {}  # tensor name -> option -> packed
        self.drop: dict[str, Candidate] = {}

    def add_stage(self, names: list[str], dtypes: list[str], deltas: list[torch.Tensor],
                  ft_weights: list[torch.Tensor], hessian: torch.Tensor) -> list[torch.Tensor]:
        """Compress matrices sharing `hessian` with every option; returns the deltas [N_i, K] the next
        layers' calibration inputs flow through (the cheapest packed option)."""
        by_bits = {b: compress_stage(replace(self.cfg, bits=b, target_ratio=None), deltas, ft_weights, hessian)
                   for b in self.cfg.alloc_bits}  # fmt: skip
        for i, (name, dtype, delta) in enumerate(zip(names, dtypes, deltas)):
            self.drop[name] = Candidate(DROP, 0, self._loss(name, -delta, hessian))
            self.packed[name] = {}
            for bits, results in by_bits.items():
                res = results[i]
                kind, parts = pack_matrix(res.result, res.spec, res.sparsity)
                error = res.result.dequantized - delta
                norm = float(delta.norm())
                entry = {"kind": kind, "shape": tuple(delta.shape), "dtype": dtype, "bits": bits,
                         "group_size": res.spec.group_size, "sym": res.spec.sym,
                         "rel_error": float(error.norm()) / norm if norm else 0.0,
                         "out_rel_error": output_rel_error(error, delta, hessian)}  # fmt: skip
                loss = self._loss(name, error, hessian)
                cand = Candidate(option_name(bits), stored_bytes(parts, self.cfg.lossless), loss)
                self.packed[name][cand.option] = _Packed(parts, entry, cand)
        low = min(self.cfg.alloc_bits)
        return [r.result.dequantized for r in by_bits[low]]

    def _choose(self, options: dict[str, list[Candidate]], budget: float) -> dict[str, Candidate]:
        """allocate(); with zstd the prices are estimates, so the choice is compressed as one stream (as
        its shard will be) and re-made under a proportionally smaller budget until it fits."""
        chosen = allocate(options, budget)
        limit = budget
        for _ in range(_ZSTD_RETRIES if self.cfg.lossless == "zstd" else 0):
            kept = [self.packed[n][c.option].parts for n, c in sorted(chosen.items()) if c.option != DROP]
            actual = zstd_stream_bytes(kept) + HEADER_BYTES_PER_KEY * sum(len(p) for p in kept)
            if actual <= budget:
                break
            limit *= budget / actual
            chosen = allocate(options, limit)
        return chosen

    def _shard_factor(self) -> float:
        """How much better a zstd shard compresses than its tensors alone, measured on the cheapest options."""
        if self.cfg.lossless != "zstd":
            return 1.0
        option = option_name(min(self.cfg.alloc_bits))
        return zstd_shard_factor([self.packed[n][option].parts for n in sorted(self.packed)])

    def _loss(self, name: str, error: torch.Tensor, hessian: torch.Tensor) -> float:
        """Estimated loss increase of adding `error` [N, K] to the fine-tuned weight."""
        if self.sens is None:
            return weighted_output_loss(error, hessian, None)
        return weighted_output_loss(error, hessian, self.sens.fisher.get(name)) + self.sens.first_order(name, error)

    def write(self, writer: ArtifactWriter, errors: dict[str, tuple[float, float]]) -> dict:
        """Choose under the budget left after the tensors already in `writer`, add the chosen parts, record
        the choice in the manifest's compression section; returns that record."""
        total = writer.ft_bytes_fp16 / self.cfg.target_ratio
        fixed = writer.num_bytes_added + HEADER_BYTES_PER_KEY * writer.num_keys_added + _SLACK_BYTES
        if fixed >= total:
            raise ValueError(
                f"target ratio {self.cfg.target_ratio:g}x is out of reach: the deltas that are not block linears "
                f"(norms, embeddings, lm_head) already take {fixed:,} of the {total:,.0f} bytes it allows; lower "
                f"--target-ratio or pass --embeddings compress"
            )
        factor = self._shard_factor()
        options = {n: [self.drop[n], *(_scaled(p.candidate, factor) for p in opts.values())]
                   for n, opts in self.packed.items()}  # fmt: skip
        chosen = self._choose(options, total - fixed)
        for name in sorted(chosen):
            cand = chosen[name]
            if cand.option == DROP:
                errors[name] = (1.0, 1.0)
                continue
            packed = self.packed[name][cand.option]
            writer.add(name, packed.parts, **packed.entry)
            errors[name] = (packed.entry["rel_error"], packed.entry["out_rel_error"])
        record = {"target_ratio": self.cfg.target_ratio, "sensitivity": self.cfg.alloc_sensitivity,
                  "options": [option_name(b) for b in self.cfg.alloc_bits] + [DROP],
                  "zstd_shard_factor": factor if self.cfg.lossless == "zstd" else None,
                  **allocation_record(chosen, total - fixed, fixed)}  # fmt: skip
        writer.compression["allocation"] = record
        log.info("allocation_done", counts=record["counts"], bytes=record["bytes"], budget=record["budget_bytes"])
        return record


def _scaled(c: Candidate, factor: float) -> Candidate:
    return c if factor == 1.0 else Candidate(c.option, int(c.num_bytes * factor), c.loss)
