"""Quality vs compression of real fine-tunes: every setting compresses the task's fine-tune, the artifact's
bytes on disk give the ratio, the restored model is scored on held-out rows.

    python bench/quality.py --base BASE --ft FT_DIR --data data/arith --out results/quality-arith.json \
        [--settings dz-2b-24-g96,...] [--deadline UNIX_S]

Rows are appended to the JSON (rewritten atomically) as each setting finishes, so a kill keeps the finished
ones; a setting is not started when its expected time would pass --deadline. `--merge A.json B.json -o OUT`
joins per-task files into one bench/results file.
"""

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from deltazip.artifact.manifest import read_manifest
from deltazip.artifact.reader import read_shard
from deltazip.artifact.summary import summarize
from deltazip.compress.config import CompressConfig
from deltazip.compress.driver import compress_checkpoint
from deltazip.eval.tasks import evaluate_task
from deltazip.logs import configure_logging
from deltazip.model.config import LlamaConfig
from deltazip.model.loader import load_state_dict_from_dir, model_from_state_dict
from deltazip.model.tokenizer import Tokenizer

_ZSTD_LEVEL = 10  # what `--lossless zstd` writes (deltazip/artifact/writer.py)


@dataclass(frozen=True, slots=True)
class Setting:
    """One compression setting; `remedy` names what it tries when the main settings fall short."""

    name: str
    method: str
    bits: int
    sparsity: str
    group_size: int | None
    calib_factor: int = 1  # times the run's --nsamples calibration windows
    remedy: str = ""
    target_ratio: float | None = None  # allocation mode: per-tensor 4-bit / 2-bit / dropped under this ratio
    lossless: str = "none"  # zstd: the target counts the zstd shard bytes on disk
    sensitivity: str = "fisher"  # allocation loss: fisher-weighted or plain ("output") output error

    def config(self, calib: str, nsamples: int, seq_len: int, device: str) -> CompressConfig:
        return CompressConfig(
            method=self.method, bits=self.bits, sparsity=self.sparsity, group_size=self.group_size,
            nsamples=nsamples * self.calib_factor, seq_len=seq_len, calib=calib, device=device,
            target_ratio=self.target_ratio, lossless=self.lossless, alloc_sensitivity=self.sensitivity,
        )  # fmt: skip


_ALLOC = "per-tensor allocation: 4-bit 2:4, 2-bit 2:4 or dropped by Fisher-weighted output error under the byte budget"


# Ordered by importance: a run that hits its deadline has the open goals (allocation) and the headline
# comparisons first.
SETTINGS = [
    Setting("dz-alloc-12x-zstd", "obs", 2, "2:4", 96, remedy=_ALLOC, target_ratio=12, lossless="zstd"),
    Setting("dz-alloc-16x-zstd", "obs", 2, "2:4", 96, remedy=_ALLOC, target_ratio=16, lossless="zstd"),
    Setting("dz-alloc-12x", "obs", 2, "2:4", 96, remedy=_ALLOC, target_ratio=12),
    Setting("dz-alloc-16x", "obs", 2, "2:4", 96, remedy=_ALLOC, target_ratio=16),
    # The bytes of dz-2b-24-g96 (9.31x), spent by the allocation: does it beat uniform 2-bit at equal ratio?
    Setting("dz-alloc-9.3x", "obs", 2, "2:4", 96, remedy=_ALLOC, target_ratio=9.31),
    Setting("dz-2b-24-g96", "obs", 2, "2:4", 96),
    Setting("dz-4b-24-g96", "obs", 4, "2:4", 96),
    Setting("magrtn-2b-24-g96", "magnitude_rtn", 2, "2:4", 96),
    Setting("magrtn-4b-24-g96", "magnitude_rtn", 4, "2:4", 96),
    Setting("bitdelta-1b", "bitdelta", 2, "0", None),
    Setting("sparsegpt-ft-4b-24-g96", "sparsegpt_full", 4, "2:4", 96),
    Setting("dz-3b-24-g96", "obs", 3, "2:4", 96),
    Setting("dz-2b-dense-g96", "obs", 2, "0", 96),
    Setting("dz-2b-24-row", "obs", 2, "2:4", None, remedy="group size: one scale per row"),
    Setting("dz-2b-1of4-g96", "obs", 2, "1:4", 96, remedy="1:4 sparsity (for >=16x with zstd)"),
    Setting("dz-2b-24-g96-calib512", "obs", 2, "2:4", 96, calib_factor=4, remedy="4x calibration samples"),
    Setting("dz-4b-dense-g96", "obs", 4, "0", 96),
    Setting("dz-3b-dense-g96", "obs", 3, "0", 96),
    Setting("dz-2b-dense-row", "obs", 2, "0", None, remedy="dense 2-bit, one scale per row"),
    Setting("dz-2b-24-g64", "obs", 2, "2:4", 64, remedy="group size 64"),
    Setting("dz-alloc-12x-zstd-output", "obs", 2, "2:4", 96, remedy=_ALLOC.replace("Fisher-weighted", "plain"),
            target_ratio=12, lossless="zstd", sensitivity="output"),  # ablation: is the loss gradient needed?
    Setting("dz-alloc-12x-zstd-taylor", "obs", 2, "2:4", 96, remedy=_ALLOC + ", plus the first-order term",
            target_ratio=12, lossless="zstd", sensitivity="taylor"),
]
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def kept_gain(q: float, q_base: float, q_ft: float) -> float | None:
    """(q - q_base) / (q_ft - q_base); also right for perplexity (both signs flip); None without a gain."""
    return None if q_ft == q_base else (q - q_base) / (q_ft - q_base)


def ratios(ft_bytes_fp16: int, shard_bytes: int, zstd_bytes: int | None, linear_ratio: float) -> dict:
    """Whole-artifact ratios as docs/formats.md defines them: fine-tuned fp16 bytes / shard bytes on disk."""
    ratio_zstd = ft_bytes_fp16 / zstd_bytes if zstd_bytes else None
    return {"ratio": ft_bytes_fp16 / shard_bytes, "ratio_zstd": ratio_zstd, "linear_ratio": linear_ratio,
            "ft_bytes_fp16": ft_bytes_fp16, "shard_bytes": shard_bytes, "zstd_bytes": zstd_bytes}  # fmt: skip


def zstd_bytes(artifact_dir: Path) -> int | None:
    """Shard bytes `--lossless zstd` would store (same level), without recompressing; None without zstandard."""
    manifest = read_manifest(artifact_dir)
    if all(s.codec == "zstd" for s in manifest.shards.values()):
        return sum(s.size for s in manifest.shards.values())  # written with --lossless zstd already
    try:
        import zstandard
    except ImportError:
        return None
    cctx = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=-1)
    return sum(len(cctx.compress(p.read_bytes())) for p in sorted(artifact_dir.glob("delta-*.safetensors")))


def plain_shard_bytes(artifact_dir: Path) -> int:
    """Shard bytes without the lossless stage (zstd shards: their safetensors size before zstd)."""
    shards = read_manifest(artifact_dir).shards.values()
    return sum(s.raw_size if s.codec != "none" and s.raw_size else s.size for s in shards)


def allocation_fields(alloc: dict, lossless: str) -> dict:
    """Row fields of an allocation-mode setting: the target, which bytes it counted, the chosen mix."""
    counts = alloc["counts"]
    return {"bits": "/".join(o.split("b-")[0] for o in alloc["options"] if o != "drop") + "+drop",
            "target_ratio": alloc["target_ratio"], "target_counts": "zstd" if lossless == "zstd" else "plain",
            "alloc_counts": counts, "alloc_bytes": alloc["bytes"], "alloc_budget_bytes": alloc["budget_bytes"],
            "alloc_dropped": alloc["dropped"], "sensitivity": alloc["sensitivity"]}  # fmt: skip


def restored_state(base: dict[str, torch.Tensor], artifact_dir: Path) -> dict[str, torch.Tensor]:
    """Base + dequantized delta for every tensor the artifact holds (absolute entries replace the weight)."""
    manifest = read_manifest(artifact_dir)
    state = dict(base)
    for shard, entry_shard in manifest.shards.items():
        tensors = read_shard(artifact_dir, shard, entry_shard)
        for name, e in manifest.tensors.items():
            if e.shard != shard:
                continue
            parts = {role: tensors[key].to(base[name].device) for role, key in e.keys.items()}
            delta = DeltaTensor(name, e.kind, tuple(e.shape), e.bits, e.group_size, e.sym, **parts)
            dense = delta.dequantize(torch.float32)
            state[name] = dense if e.absolute else base[name] + dense
    return state


class Evaluator:
    """One model on the device whose weights are swapped per setting; scores held-out rows of one task."""

    def __init__(self, base_dir: Path, task: str, rows: list[dict], device: str) -> None:
        self.config = LlamaConfig.from_dir(base_dir)
        self.base = load_state_dict_from_dir(base_dir, device=device, dtype=torch.float32)
        self.model = model_from_state_dict(self.config, {k: v.clone() for k, v in self.base.items()})
        self.tok, self.task, self.rows = Tokenizer.from_dir(base_dir), task, rows

    @torch.no_grad()
    def score(self, state: dict[str, torch.Tensor]) -> dict:
        for name, p in self.model.state_dict().items():
            p.copy_(state[name] if name in state else state["model.embed_tokens.weight"])  # tied lm_head
        return evaluate_task(self.model, self.tok, self.task, self.rows, with_next_line=True)


def layer_errors(errors: dict[str, tuple[float, float | None]], worst: int = 5) -> dict:
    """Which layers lose the most: mean output error per layer index and the worst tensors."""
    by_layer: dict[int, list[float]] = {}
    for name, (_, out) in errors.items():
        if out is not None and ".layers." in name:
            by_layer.setdefault(int(name.split(".layers.")[1].split(".")[0]), []).append(out)
    ranked = sorted(((out, name) for name, (_, out) in errors.items() if out is not None), reverse=True)
    return {"layer_out_rel_error": [round(statistics.mean(by_layer[i]), 4) for i in sorted(by_layer)],
            "worst_tensors": [[n, round(o, 4)] for o, n in ranked[:worst]],
            "mean_out_rel_error": round(statistics.mean(o for o, _ in ranked), 4) if ranked else None}  # fmt: skip


def with_gains(metrics: dict, ref: dict) -> dict:
    """A row's quality fields plus kept gain (headline metric), in perplexity and next-line accuracy."""
    row = {"quality": metrics["quality"], "quality_base": ref["base"]["quality"],
           "quality_finetune": ref["ft"]["quality"], "metric": metrics["metric"], "perplexity": metrics["perplexity"]}
    row["kept_gain"] = kept_gain(metrics["quality"], row["quality_base"], row["quality_finetune"])
    row["kept_gain_ppl"] = kept_gain(metrics["perplexity"], ref["base"]["perplexity"], ref["ft"]["perplexity"])
    if "next_line_accuracy" in metrics:
        row["next_line_accuracy"] = metrics["next_line_accuracy"]
        row["kept_gain_next_line"] = kept_gain(
            metrics["next_line_accuracy"], ref["base"]["next_line_accuracy"], ref["ft"]["next_line_accuracy"]
        )
    return row


def run_setting(s: Setting, args: argparse.Namespace, ev: Evaluator, ref: dict) -> dict:
    """Compress, measure bytes, restore, score: one result row."""
    art = args.work / f"art-{args.task}-{s.name}"
    t0 = time.perf_counter()
    cfg = s.config(str(args.calib), args.nsamples, args.seq_len, args.device)
    report = compress_checkpoint(args.base, args.ft, art, cfg, overwrite=True, progress=False)
    compress_s = time.perf_counter() - t0
    summary = summarize(art)
    row = {"task": args.task, "setting": s.name, "method": s.method, "bits": 1 if s.method == "bitdelta" else s.bits,
           "sparsity": s.sparsity, "group_size": s.group_size, "nsamples": cfg.nsamples, "remedy": s.remedy or None,
           **ratios(summary["ft_bytes_fp16"], plain_shard_bytes(art), zstd_bytes(art), summary["linear_ratio"]),
           "linear_bits_per_weight": summary["linear_bits_per_weight"]}  # fmt: skip
    if report.allocation is not None:
        row.update(allocation_fields(report.allocation, s.lossless))
    t1 = time.perf_counter()
    row.update(with_gains(ev.score(restored_state(ev.base, art)), ref))
    row.update(layer_errors(report.errors))
    row.update({"compress_s": round(compress_s, 2), "eval_s": round(time.perf_counter() - t1, 2)})
    shutil.rmtree(art, ignore_errors=True)
    return row


def write_result(path: Path, rows: list[dict], config: dict) -> None:
    """{bench, device, commit, date, config, rows}, written to a temp file and renamed."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    doc = {"bench": "quality", "device": device, "commit": _git_commit(), "date": datetime.date.today().isoformat(),
           "config": config, "rows": rows}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> list[dict]:
    """Base and fine-tune first, then the settings in order until done or the deadline is near."""
    rows_all = [json.loads(x) for x in (args.data / "eval.jsonl").read_text().splitlines() if x.strip()]
    ev = Evaluator(args.base, args.task, rows_all[: args.rows], args.device)
    config = {"task": args.task, "eval_rows": len(ev.rows), "calib": f"{args.task}/train.jsonl",
              "nsamples": args.nsamples, "seq_len": args.seq_len, "base": str(args.base), "ft": str(args.ft),
              "ratio": "whole artifact: fine-tuned fp16 bytes (all parameters) / delta shard bytes on disk; "
                       "ratio_zstd: the same shards under --lossless zstd; sparsegpt_full stores the compressed "
                       "fine-tuned linears themselves, same numerator"}  # fmt: skip
    t0 = time.perf_counter()
    ref = {"base": ev.score(ev.base), "ft": ev.score(load_state_dict_from_dir(args.ft, args.device, torch.float32))}
    rows = [{"task": args.task, "setting": name, "method": name, "ratio": 1.0 if name == "finetune" else None,
             **with_gains(ref[key], ref)} for key, name in (("base", "base"), ("ft", "finetune"))]  # fmt: skip
    _progress(args.task, "reference", time.perf_counter() - t0, rows[-1])
    write_result(args.out, rows, config)
    durations: list[float] = []
    for s in [SETTINGS_BY_NAME[n] for n in args.settings]:
        expected = max(durations) if durations else args.first_setting_s
        if args.deadline and time.time() + expected > args.deadline:
            _progress(args.task, s.name, 0.0, {"skipped": f"deadline: expected {expected:.0f} s"})
            config.setdefault("skipped", []).append(s.name)
            continue
        t0 = time.perf_counter()
        try:
            rows.append(run_setting(s, args, ev, ref))
        except (RuntimeError, ValueError, AssertionError) as e:  # one failing setting must not cost the others
            traceback.print_exc()
            config.setdefault("failed", {})[s.name] = f"{type(e).__name__}: {e}"[:400]
            shutil.rmtree(args.work / f"art-{args.task}-{s.name}", ignore_errors=True)
            _progress(args.task, s.name, time.perf_counter() - t0, {"failed": config["failed"][s.name][:120]})
            continue
        durations.append(time.perf_counter() - t0)
        _progress(args.task, s.name, durations[-1], rows[-1])
        write_result(args.out, rows, config)
    write_result(args.out, rows, config)
    return rows


def merge(paths: list[Path], out: Path) -> Path:
    """One bench/results file from per-task files (configs kept per task); a folder `out` gets the standard name."""
    docs = [json.loads(p.read_text()) for p in paths if p.exists()]
    assert docs, f"none of {paths} exists"
    if out.is_dir():
        slug = docs[0]["device"].lower().replace("nvidia ", "").replace(" ", "-")
        out = out / f"quality-{slug}-{docs[0]['date']}.json"
    config = {"tasks": {d["config"]["task"]: d["config"] for d in docs}}
    write_result(out, [r for d in docs for r in d["rows"]], config)
    print(f"wrote {out}")
    return out


def _progress(task: str, name: str, seconds: float, row: dict) -> None:
    keys = ("ratio", "ratio_zstd", "quality", "perplexity", "kept_gain", "kept_gain_ppl", "next_line_accuracy",
            "alloc_counts", "skipped", "failed")
    short = {k: round(row[k], 4) if isinstance(row[k], float) else row[k] for k in keys if row.get(k) is not None}
    if row.get("metric") == "neg_perplexity":  # quality and the ppl gain repeat perplexity and kept_gain
        short.pop("quality", None)
        short.pop("kept_gain_ppl", None)
    print(json.dumps({"task": task, "setting": name, "seconds": round(seconds, 1), **short}), flush=True)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--merge", nargs="+", type=Path, help="per-task result files to join into --out")
    p.add_argument("--base", type=Path)
    p.add_argument("--ft", type=Path)
    p.add_argument("--data", type=Path, help="task folder with eval.jsonl and train.jsonl (calibration)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", default=",".join(SETTINGS_BY_NAME), help="comma-separated names, in run order")
    p.add_argument("--rows", type=int, default=100, help="held-out rows scored per setting")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (remedy settings may use more)")
    p.add_argument("--seq-len", type=int, default=256, help="calibration window length")
    p.add_argument("--deadline", type=float, default=0.0, help="unix time; no setting starts that would pass it")
    p.add_argument("--first-setting-s", type=float, default=30.0, help="expected seconds before one was timed")
    p.add_argument("--work", type=Path, default=Path("/tmp/dz-quality"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if not args.merge:
        if not (args.base and args.ft and args.data):
            p.error("--base, --ft and --data are required (unless --merge)")
        args.task, args.calib = args.data.name, args.data / "train.jsonl"
        args.settings = [n for n in args.settings.split(",") if n]
        unknown = [n for n in args.settings if n not in SETTINGS_BY_NAME]
        if unknown:
            p.error(f"unknown settings {unknown}; valid: {list(SETTINGS_BY_NAME)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("warning")  # compress_done lines would bury the progress lines
    if args.merge:
        merge(args.merge, args.out)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    run(args)


if __name__ == "__main__":
    main()
