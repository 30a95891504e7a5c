"""Compress-time benchmark: a Llama-2-7B-shaped layer stack (random base + small delta), per-layer seconds,
extrapolated to the 32 layers of a 7B model.

    python bench/compress.py --layers 4 --out bench/results      # CUDA when present
Writes bench/results/compress-<device>-<date>.json ({bench, device, commit, date, config, rows}).
"""

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from deltazip.compress.config import CompressConfig
from deltazip.compress.driver import compress_checkpoint
from deltazip.model.config import LlamaConfig
from deltazip.model.loader import save_model_dir
from deltazip.model.synthetic import random_state_dict

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)  # fmt: skip
LLAMA2_7B_LAYERS = 32


def write_pair(root: Path, layers: int, device: torch.device) -> tuple[Path, Path, LlamaConfig]:
    """Base (N(0, 0.02) weights) and fine-tune (base + N(0, 1e-3) delta), fp16, Llama-2-7B shapes."""
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA2_7B)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in random_state_dict(config).items()}
    g = torch.Generator(device=device).manual_seed(0)
    base, ft = {}, {}
    for name, shape in shapes.items():
        w = torch.randn(shape, generator=g, device=device) * 0.02
        if name.endswith("norm.weight"):
            w = w + 1.0
        base[name] = w.half().cpu()
        ft[name] = (w + torch.randn(shape, generator=g, device=device) * 1e-3).half().cpu()
    paths = (root / "base", root / "ft")
    for path, state in zip(paths, (base, ft)):
        path.mkdir()
        save_model_dir(path, config, state, dtype=torch.float16)
    return paths[0], paths[1], config


def measure(base: Path, ft: Path, out: Path, cfg: CompressConfig, layers: int) -> dict:
    """One compress run -> a result row with per-layer time and the 7B extrapolation."""
    shutil.rmtree(out, ignore_errors=True)
    report = compress_checkpoint(base, ft, out, cfg, progress=False)
    steady = report.layer_seconds[1:] or report.layer_seconds  # the first layer includes warm-up
    per_layer = statistics.median(steady)
    fixed = report.seconds - sum(report.layer_seconds)  # calibration, embeddings/lm_head, files, shard writes
    est_7b = fixed + LLAMA2_7B_LAYERS * per_layer
    shard_bytes = sum(p.stat().st_size for p in out.glob("delta-*"))
    zstd_bytes = sum(len(_zstd(p.read_bytes())) for p in out.glob("delta-*"))
    return {
        "method": cfg.method, "bits": cfg.bits, "sparsity": cfg.sparsity, "group_size": cfg.group_size,
        "nsamples": cfg.nsamples, "seq_len": cfg.seq_len, "layers_measured": layers,
        "layer_seconds": [round(s, 3) for s in report.layer_seconds], "per_layer_s": round(per_layer, 3),
        "phase_seconds": {k: round(v, 3) for k, v in report.phase_seconds.items()},
        "fixed_s": round(fixed, 3), "total_s": round(report.seconds, 3), "est_7b_s": round(est_7b, 1),
        "goal_7b_s": 600, "meets_goal": est_7b <= 600, "shard_bytes": shard_bytes,
        "zstd_ratio": round(shard_bytes / zstd_bytes, 3),
        "mean_out_rel_error": round(statistics.mean(e[1] for e in report.errors.values() if e[1] is not None), 4),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default: a temp dir)")
    parser.add_argument("--configs", default="4:128:512,2:128:512,4:128:2048", help="bits:group:seq_len,...")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dz-bench-compress-"))
    base, ft, _ = write_pair(root, args.layers, device)
    rows = []
    for spec in args.configs.split(","):
        bits, group, seq_len = (int(x) for x in spec.split(":"))
        cfg = CompressConfig(bits=bits, group_size=group or None, nsamples=128, seq_len=seq_len, device=str(device))
        rows.append(measure(base, ft, root / f"out-{bits}-{group}-{seq_len}", cfg, args.layers))
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    commit = args.commit or _git_commit()
    date = datetime.date.today().isoformat()
    slug = name.lower().replace("nvidia ", "").replace(" ", "-")
    result = {"bench": "compress", "device": name, "commit": commit, "date": date,
              "config": {"model": "llama-2-7b shapes", "layers_measured": args.layers, "delta_std": 1e-3,
                         "base_std": 0.02, "dtype": "float16", "calib": "built-in default set"},
              "rows": rows}  # fmt: skip
    out = Path(args.out) / f"compress-{slug}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def _zstd(data: bytes) -> bytes:
    """What `--lossless zstd` would store (same level)."""
    import zstandard

    return zstandard.ZstdCompressor(level=10, threads=-1).compress(data)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
