"""Full-parameter fine-tune of a base model (HF layout) on one chat dataset from scripts/make_datasets.py.

Every transformer-block parameter (attention, MLP, norms) and the final norm is trained; the
tied token embedding stays frozen by default (`--train-embeddings` trains it too) so the delta's
only fp16 part stays small. Writes OUT as an HF checkpoint (fp32 safetensors, so the delta
W_ft - W_base is exact) plus `finetune.json` with the loss curve and the task metrics of base
and fine-tune on held-out data.

    python scripts/finetune.py --base BASE --data data/arith -o ft/arith --steps 300
"""

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltazip.eval.tasks import collate, encode_chat_example, evaluate_task, lm_loss
from deltazip.model.loader import load_model
from deltazip.model.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="folder with train.jsonl and eval.jsonl")
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=384)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--train-embeddings", action="store_true")
    p.add_argument("--eval-rows", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train(model, tok: Tokenizer, rows: list[dict], args: argparse.Namespace) -> list[float]:
    """AdamW with warmup + cosine decay; loss on assistant tokens only. Returns the loss curve."""
    params = [p for n, p in model.named_parameters() if args.train_embeddings or "embed_tokens" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_(args.train_embeddings or "embed_tokens" not in n)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    rng = random.Random(args.seed)
    examples = [encode_chat_example(tok, r["messages"], args.seq_len) for r in rows]
    losses: list[float] = []
    use_amp = args.device.startswith("cuda")
    model.train()
    start = time.time()
    for step in range(args.steps):
        ids, labels = collate(rng.sample(examples, args.batch_size), tok.eos_token_ids[0])
        ids, labels = ids.to(args.device), labels.to(args.device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss = lm_loss(model.forward_dense(ids), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 20 == 0 or step == args.steps - 1:
            print(json.dumps({"step": step, "loss": round(losses[-1], 4), "elapsed_s": round(time.time() - start, 1)}), flush=True)
    return losses


def save_checkpoint(model, base: Path, out: Path) -> None:
    """HF layout: base's config/tokenizer files + fp32 weights; written to a temp dir, then renamed."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, tmp / f.name)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    task = args.data.name
    tok = Tokenizer.from_dir(args.base)
    train_rows, eval_rows = read_jsonl(args.data / "train.jsonl"), read_jsonl(args.data / "eval.jsonl")[: args.eval_rows]
    model = load_model(args.base, device=args.device, dtype=torch.float32)
    report = {"task": task, "base": str(args.base), "args": {k: str(v) for k, v in vars(args).items()}}
    if eval_rows:
        report["base_metrics"] = evaluate_task(model, tok, task, eval_rows)
        print(json.dumps({"base": report["base_metrics"]}), flush=True)
    report["losses"] = train(model, tok, train_rows, args)
    if eval_rows:
        report["finetune_metrics"] = evaluate_task(model, tok, task, eval_rows)
        print(json.dumps({"finetune": report["finetune_metrics"]}), flush=True)
    save_checkpoint(model, args.base, args.out)
    (args.out / "finetune.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
