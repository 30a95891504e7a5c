"""`python -m deltazip.convert [--gguf FILE -o OUT]`: GGUF -> Hugging Face folder.

Without arguments, converts the bundled SmolLM2-135M-Instruct into the cache and prints its path.
"""

from __future__ import annotations

import argparse
import sys

import torch

from deltazip.convert.base import default_base_dir
from deltazip.convert.gguf import convert_gguf

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deltazip.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="GGUF file to convert (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("-o", "--out", help="output folder (must not exist); required with --gguf")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float16", help="safetensors dtype")
    args = parser.parse_args(argv)
    if args.gguf is None and args.out is None:
        print(default_base_dir())
        return 0
    if args.gguf is None or args.out is None:
        from deltazip.convert.base import bundled_gguf_path

        args.gguf = args.gguf or str(bundled_gguf_path())
        if args.out is None:
            parser.error("--out is required when --gguf is given")
    print(convert_gguf(args.gguf, args.out, dtype=_DTYPES[args.dtype]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
