"""Sequential compression of a fine-tune's delta: layer by layer, each on inputs through compressed layers."""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from tqdm import tqdm

from deltazip.artifact.checkpoint import Checkpoint
from deltazip.artifact.dense import add_dense, check_pair, copy_extra_files, tensor_delta
from deltazip.artifact.identity import base_identity
from deltazip.artifact.names import is_block_linear
from deltazip.artifact.writer import ArtifactWriter
from deltazip.compress.alloc_stage import AllocationRun
from deltazip.compress.block import STAGES, build_layer, collect_hessian, layer_prefix, run_layer
from deltazip.compress.calib import load_calibration
from deltazip.compress.config import CompressConfig
from deltazip.compress.head import EMBED, FINAL_NORM, LM_HEAD, compress_outer, final_norm_hessian
from deltazip.compress.methods import MatrixResult, compress_stage, output_rel_error
from deltazip.compress.packer import pack_matrix
from deltazip.compress.sensitivity import loss_sensitivity
from deltazip.model.config import LlamaConfig
from deltazip.model.layers import RotaryEmbedding

log = structlog.get_logger(__name__)
_TOKENS_PER_BATCH = 16384


@dataclass(slots=True)
class CompressReport:
    """What a run did: per-layer seconds and per-tensor errors."""

    out_dir: Path
    seconds: float = 0.0
    calib_seconds: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # load, hessian, obs, store, forward
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (rel, output rel)
    allocation: dict | None = None  # allocation mode: the manifest's compression.allocation record


@dataclass(slots=True)
class _Run:
    """State shared by the per-layer steps of one compression run."""

    cfg: CompressConfig
    model_cfg: LlamaConfig
    base: Checkpoint
    ft: Checkpoint
    writer: ArtifactWriter
    device: torch.device
    act_dtype: torch.dtype
    report: CompressReport
    alloc: AllocationRun | None = None  # allocation mode (--target-ratio): linears are written at the end


def compress_checkpoint(
    base_dir: str | os.PathLike,
    ft_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: CompressConfig,
    overwrite: bool = False,
    progress: bool = True,
) -> CompressReport:
    """Write the compressed delta artifact of `ft_dir` against `base_dir` into `out_dir` (atomically)."""
    start = time.perf_counter()
    base, ft = Checkpoint(base_dir), Checkpoint(ft_dir)
    check_pair(base, ft)
    model_cfg = LlamaConfig.from_dir(ft_dir)
    device = cfg.resolved_device()
    act_dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = load_calibration(ft_dir, model_cfg.vocab_size, cfg.nsamples, cfg.seq_len, cfg.calib, cfg.seed)
    report = CompressReport(out_dir=Path(out_dir))
    with ArtifactWriter(out_dir, base_identity(base_dir), cfg.to_manifest(), cfg.lossless, overwrite=overwrite) as w:
        run = _Run(cfg, model_cfg, base, ft, w, device, act_dtype, report)
        _count_sizes(run)
        if cfg.target_ratio is not None:
            t0 = time.perf_counter()
            sens = None
            if cfg.alloc_sensitivity != "output":
                sens = loss_sensitivity(ft_dir, tokens, device, act_dtype, cfg.alloc_sensitivity == "taylor", progress)
            run.alloc = AllocationRun(cfg, sens)
            report.phase_seconds["sensitivity"] = time.perf_counter() - t0
        hidden = ft.get("model.embed_tokens.weight")[tokens].to(device, act_dtype)  # [S, L, hidden]
        rope = RotaryEmbedding(model_cfg.head_dim, model_cfg.rope_theta, model_cfg.rope_scaling)(
            torch.arange(cfg.seq_len, device=device)
        )
        report.calib_seconds = time.perf_counter() - start
        bar = tqdm(range(model_cfg.num_hidden_layers), desc="compress", unit="layer", disable=not progress)
        for index in bar:
            t0 = time.perf_counter()
            _compress_layer(run, index, hidden, rope, bar)
            _sync(device)
            report.layer_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        _write_outside_layers(run, hidden)
        copy_extra_files(w, ft, base_dir)
        report.phase_seconds["outside_layers"] = time.perf_counter() - t0
        if run.alloc is not None:
            t0 = time.perf_counter()
            report.allocation = run.alloc.write(w, report.errors)
            report.phase_seconds["allocate"] = time.perf_counter() - t0
    report.seconds = time.perf_counter() - start
    log.info("compress_done", out=str(out_dir), seconds=round(report.seconds, 2), method=cfg.method)
    return report


def _compress_layer(run: _Run, index: int, hidden: torch.Tensor, rope, bar) -> None:
    """Compress one decoder layer's linears stage by stage, store its other deltas, advance `hidden`."""
    prefix = layer_prefix(index)
    clock = _PhaseClock(run.report.phase_seconds, run.device)
    names = [n for n in run.ft.names() if n.startswith(prefix)]
    ft_t = {n[len(prefix) :]: run.ft.get(n).to(run.device, torch.float32) for n in names}
    layer = build_layer(run.model_cfg, index, {k: v.to(run.act_dtype) for k, v in ft_t.items()})
    batch = max(1, _TOKENS_PER_BATCH // hidden.shape[1])
    clock.lap("load")
    for stage in STAGES:
        bar.set_postfix_str(f"layer {index} {stage[0].split('.')[-1]}")
        hessian = collect_hessian(layer, prefix + stage[0], hidden, rope, batch).hessian
        local = [m + ".weight" for m in stage]
        base_w = [run.base.get(prefix + n).to(run.device, torch.float32) for n in local]
        deltas = [ft_t[n] - b for n, b in zip(local, base_w)]
        clock.lap("hessian")
        if run.alloc is not None:
            names_hf = [prefix + n for n in local]
            dtypes = [run.ft.dtype_name(n) for n in names_hf]
            kept = run.alloc.add_stage(names_hf, dtypes, deltas, [ft_t[n] for n in local], hessian)
            for n, b, d_hat in zip(local, base_w, kept):
                layer.get_parameter(n).data.copy_((b + d_hat).to(run.act_dtype))
            del hessian, base_w, deltas, kept
            clock.lap("obs")
            continue
        results = compress_stage(run.cfg, deltas, [ft_t[n] for n in local], hessian)
        clock.lap("obs")
        for n, b, d, res in zip(local, base_w, deltas, results):
            new_weight = res.result.dequantized if res.absolute else b + res.result.dequantized
            layer.get_parameter(n).data.copy_(new_weight.to(run.act_dtype))
            _store_linear(run, prefix + n, res, new_weight - b, d, hessian)
        del hessian, base_w, deltas, results
        clock.lap("store")
    for n in names:
        if not is_block_linear(n, run.ft.shape(n)):
            _store_dense_if_changed(run, n, ft_t[n[len(prefix) :]].cpu())
    run_layer(layer, hidden, rope, batch)
    clock.lap("forward")


class _PhaseClock:
    """Adds the seconds since the last lap to a named phase (synchronizing CUDA first)."""

    def __init__(self, totals: dict[str, float], device: torch.device) -> None:
        self.totals, self.device = totals, device
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


def _store_linear(run: _Run, name: str, res: MatrixResult, delta_hat, delta, hessian) -> None:
    """Pack one compressed linear into the artifact with its weight- and output-space errors."""
    kind, parts = pack_matrix(res.result, res.spec, res.sparsity)
    norm = float(delta.norm())
    rel = float((delta_hat - delta).norm()) / norm if norm else 0.0
    out_rel = output_rel_error(delta_hat - delta, delta, hessian) if hessian is not None else None
    run.report.errors[name] = (rel, out_rel)
    run.writer.add(
        name, parts, kind=kind, shape=tuple(delta.shape), dtype=run.ft.dtype_name(name), bits=res.spec.bits,
        group_size=res.spec.group_size, sym=res.spec.sym, rel_error=rel, out_rel_error=out_rel, absolute=True if res.absolute else None,
    )  # fmt: skip


def _store_dense_if_changed(run: _Run, name: str, ft_tensor: torch.Tensor) -> None:
    delta = ft_tensor.float() - run.base.get(name).float()
    if bool((delta != 0).any()):
        add_dense(run.writer, name, delta, run.ft.dtype_name(name))


def _write_outside_layers(run: _Run, hidden: torch.Tensor) -> None:
    """Embeddings, final norm and lm_head: fp16 deltas (or packed, see head.py), omitted when exactly zero."""
    for name in run.ft.names():
        if ".layers." in name:
            continue
        delta = tensor_delta(run.base, run.ft, name, run.device)
        if not bool((delta != 0).any()):
            continue
        if run.cfg.embeddings == "compress" and name in (EMBED, LM_HEAD):
            norm = run.ft.get(FINAL_NORM)
            hessian = final_norm_hessian(hidden, norm, run.model_cfg.rms_norm_eps) if name == LM_HEAD else None
            ft_weight = run.ft.get(name).to(run.device, torch.float32)
            res = compress_outer(run.cfg, name, delta, ft_weight, hessian)
            base_weight = ft_weight - delta
            delta_hat = res.result.dequantized - base_weight if res.absolute else res.result.dequantized
            _store_linear(run, name, res, delta_hat, delta, hessian)
        else:
            add_dense(run.writer, name, delta.cpu(), run.ft.dtype_name(name))


def _count_sizes(run: _Run) -> None:
    for name in run.ft.names():
        numel = 1
        for s in run.ft.shape(name):
            numel *= s
        run.writer.ft_bytes_fp16 += 2 * numel
        run.writer.ft_linear_bytes_fp16 += 2 * numel if is_block_linear(name, run.ft.shape(name)) else 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
