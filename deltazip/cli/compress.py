"""`deltazip compress | inspect | restore`: make, examine and undo a compressed delta artifact."""

import argparse
import json
import sys

from deltazip.artifact.errors import ArtifactError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the compress, inspect and restore subcommands."""
    p = subparsers.add_parser("compress", help="compress a fine-tune's delta against its base")
    p.add_argument("base", help="base model folder (HF layout: config.json + *.safetensors)")
    p.add_argument("ft", help="fine-tuned model folder of the same architecture")
    p.add_argument("-o", "--out", required=True, help="artifact folder to create")
    p.add_argument("--method", default="obs", choices=("obs", "magnitude_rtn", "bitdelta", "sparsegpt_full"),
                   help="obs (default); the others are baselines for quality comparisons")  # fmt: skip
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--sparsity", default="2:4", help="'2:4' (default), another N:M, a pruned fraction like 0.5, or 0")
    p.add_argument("--group-size", type=int, default=128, help="quantization group along K; 0 = one scale per row")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric quantization (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (stores integer zero points)")
    p.add_argument("--calib", default=None, help="calibration text (.txt) or .jsonl ('text' or 'messages'); "
                   "default: the small built-in set")  # fmt: skip
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal")
    p.add_argument("--lossless", default="none", choices=("none", "zstd"), help="extra lossless stage on shards")
    p.add_argument("--embeddings", default="fp16", choices=("fp16", "compress"),
                   help="store embedding and lm_head deltas as fp16 (default) or packed like the linears")  # fmt: skip
    p.add_argument("--target-ratio", type=float, default=None,
                   help="allocation mode: per block linear choose 4-bit 2:4, 2-bit 2:4 or no delta (by "
                        "calibration-loss sensitivity) so the artifact is this many times smaller than the fp16 "
                        "fine-tune on disk (after --lossless); --bits is then ignored")  # fmt: skip
    p.add_argument("--alloc-bits", default="4,2", help="packed options of the allocation mode (2 and/or 4)")
    p.add_argument("--alloc-sensitivity", default="fisher", choices=("fisher", "taylor", "output"),
                   help="allocation loss estimate: output error weighted by the output Fisher (fisher), that plus "
                        "the first-order term <dL/dW, error> (taylor), or plain output error (output)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_compress)

    p = subparsers.add_parser("inspect", help="compression ratio, bits per weight and per-layer error of an artifact")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser("restore", help="write the decompressed fine-tune as a full HF checkpoint")
    p.add_argument("base", help="the base model folder the delta was made against")
    p.add_argument("artifact")
    p.add_argument("-o", "--out", required=True, help="checkpoint folder to create")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run_restore)


def run_compress(args: argparse.Namespace) -> int:
    from deltazip.compress.config import CompressConfig
    from deltazip.compress.driver import compress_checkpoint

    try:
        cfg = CompressConfig(
            method=args.method, bits=args.bits, sparsity=args.sparsity, group_size=args.group_size or None,
            sym=args.sym, damp=args.damp, nsamples=args.nsamples, seq_len=args.seq_len, calib=args.calib,
            lossless=args.lossless, embeddings=args.embeddings, device=args.device, seed=args.seed,
            target_ratio=args.target_ratio, alloc_bits=_int_tuple(args.alloc_bits),
            alloc_sensitivity=args.alloc_sensitivity,
        )  # fmt: skip
        report = compress_checkpoint(
            args.base, args.ft, args.out, cfg, overwrite=args.overwrite, progress=not args.no_progress
        )
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"deltazip compress: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.out_dir} in {report.seconds:.1f} s")
    if report.allocation is not None:
        a = report.allocation
        print(f"allocation: {a['counts']} tensors, {a['bytes']} bytes (budget {a['budget_bytes']:,})")
    return 0


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def run_inspect(args: argparse.Namespace) -> int:
    from deltazip.artifact.summary import format_text, summarize
    from deltazip.artifact.verify import verify

    try:
        if args.verify:
            verify(args.artifact)
        summary = summarize(args.artifact)
    except ArtifactError as exc:
        print(f"deltazip inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1) if args.json else format_text(summary))
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from deltazip.artifact.restorer import restore

    try:
        out = restore(args.base, args.artifact, args.out, overwrite=args.overwrite)
    except (ArtifactError, FileExistsError, FileNotFoundError) as exc:
        print(f"deltazip restore: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
