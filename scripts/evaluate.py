"""Evaluate a model folder (HF layout) on a task's held-out set; prints one JSON line.

    python scripts/evaluate.py MODEL_DIR --data data/arith [--rows 200]
"""

import argparse
import json
from pathlib import Path

import torch

from deltazip.eval.tasks import evaluate_task
from deltazip.model.loader import load_model
from deltazip.model.tokenizer import Tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--out", type=Path, help="append the JSON line to this file too")
    p.add_argument("--tag", default="", help="free-form label stored in the JSON line")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    rows = [json.loads(line) for line in (args.data / "eval.jsonl").read_text().splitlines() if line.strip()]
    model = load_model(args.model, device=args.device, dtype=torch.float32)
    metrics = evaluate_task(model, Tokenizer.from_dir(args.model), args.data.name, rows[: args.rows])
    line = json.dumps({"model": str(args.model), "tag": args.tag, "task": args.data.name, "rows": len(rows[: args.rows]), **metrics})
    print(line)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
