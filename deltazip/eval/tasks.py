"""Task metrics for fine-tunes: exact-match arithmetic, assistant-token perplexity, next-line accuracy.

All metrics run on `LlamaForCausalLM.forward_dense` (no KV cache) so they work for any weights
(base, fine-tuned, merged or restored from a compressed delta).
"""

import math
import re

import torch

from deltazip.model.tokenizer import Tokenizer

_ANSWER = re.compile(r"The answer is (-?\d+)")


def encode_chat_example(tok: Tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of a user/assistant pair and labels (-100 on the prompt, ids on the answer + EOS)."""
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    prompt_ids = tok.encode(prompt)
    answer_ids = tok.encode(messages[-1]["content"], add_special_tokens=False) + [tok.eos_token_ids[0]]
    ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_len]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ids with pad_id and labels with -100: ids [B, L], labels [B, L]."""
    length = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(batch):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over labelled positions. logits: [B, L, V], labels: [B, L]."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
    )


@torch.no_grad()
def assistant_perplexity(model, tok: Tokenizer, rows: list[dict], max_len: int = 512, batch_size: int = 8) -> float:
    """exp(mean NLL) of the assistant tokens given the prompt."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    examples = [encode_chat_example(tok, r["messages"], max_len) for r in rows]
    for start in range(0, len(examples), batch_size):
        ids, labels = collate(examples[start : start + batch_size], tok.eos_token_ids[0])
        ids, labels = ids.to(device), labels.to(device)
        logits = model.forward_dense(ids)
        count = int((labels[:, 1:] != -100).sum())
        total_nll += float(lm_loss(logits, labels)) * count
        total_tokens += count
    return math.exp(total_nll / max(total_tokens, 1))


@torch.no_grad()
def greedy_complete(model, tok: Tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy answer to a chat prompt (full recompute each step; fine for short evaluation answers)."""
    device = next(model.parameters()).device
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward_dense(torch.tensor([ids + out], device=device))
        nxt = int(logits[0, -1].argmax())
        if nxt in tok.eos_token_ids:
            break
        out.append(nxt)
    return tok.decode(out)


@torch.no_grad()
def greedy_batch(model, tok: Tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers to chat prompts; prompts of equal token length share one batch (no padding needed)."""
    device = next(model.parameters()).device
    encoded = [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True)) for m in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    answers = [""] * len(prompts)
    eos = set(tok.eos_token_ids)
    for indices in by_len.values():
        ids = torch.tensor([encoded[i] for i in indices], device=device)  # [B, L]
        done = [False] * len(indices)
        outs: list[list[int]] = [[] for _ in indices]
        for _ in range(max_new_tokens):
            nxt = model.forward_dense(ids)[:, -1].argmax(-1)  # [B]
            for row, token in enumerate(nxt.tolist()):
                if not done[row]:
                    if token in eos:
                        done[row] = True
                    else:
                        outs[row].append(token)
            if all(done):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for row, i in enumerate(indices):
            answers[i] = tok.decode(outs[row])
    return answers


def arith_accuracy(model, tok: Tokenizer, rows: list[dict], max_new_tokens: int = 40) -> float:
    """Share of held-out word problems whose generated 'The answer is N' matches the reference."""
    answers = greedy_batch(model, tok, [r["messages"][:-1] for r in rows], max_new_tokens)
    correct = 0
    for r, answer in zip(rows, answers):
        want = _ANSWER.search(r["messages"][-1]["content"])
        got = _ANSWER.search(answer)
        correct += int(bool(want and got and want.group(1) == got.group(1)))
    return correct / max(len(rows), 1)


@torch.no_grad()
def next_line_accuracy(model, tok: Tokenizer, rows: list[dict], max_lines: int = 400) -> float:
    """Share of code lines (after the first) that greedy decoding reproduces exactly from the lines before."""
    hits = total = 0
    for r in rows:
        code = r["messages"][-1]["content"]
        lines = code.split("\n")
        prompt_msgs = r["messages"][:-1]
        for i in range(2, len(lines) - 1):
            if total >= max_lines:
                return hits / total
            target = lines[i]
            if not target.strip():
                continue
            prefix = "\n".join(lines[:i]) + "\n"
            got = _continue_line(model, tok, prompt_msgs, prefix, max_new_tokens=len(tok.encode(target)) + 4)
            hits += int(got == target)
            total += 1
    return hits / max(total, 1)


@torch.no_grad()
def forced_next_line_accuracy(model, tok: Tokenizer, rows: list[dict], max_len: int = 512, batch_size: int = 8) -> float:
    """Share of code lines (after the second) whose every token, newline included, is the top-1 prediction
    given the true text before it: greedy's exact next line under teacher forcing, one forward per batch."""
    device = next(model.parameters()).device
    hits = total = 0
    for start in range(0, len(rows), batch_size):
        batch, spans = [], []
        for r in rows[start : start + batch_size]:
            prompt_ids = tok.encode(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True))
            enc = tok.tok.encode(r["messages"][-1]["content"], add_special_tokens=False)
            ids = (prompt_ids + enc.ids)[:max_len]
            batch.append((ids, ids))
            spans.append((len(prompt_ids), enc.offsets, r["messages"][-1]["content"]))
        ids, _ = collate(batch, tok.eos_token_ids[0])
        ids = ids.to(device)
        right = (model.forward_dense(ids)[:, :-1].argmax(-1) == ids[:, 1:]).cpu()  # [B, L-1]: token t+1 predicted
        for row, (offset, offsets, code) in enumerate(spans):
            for first, last in _line_token_ranges(code, offsets):
                if offset + last >= min(len(batch[row][0]), max_len):
                    break
                hits += int(bool(right[row, offset + first - 1 : offset + last].all()))
                total += 1
    return hits / max(total, 1)


def _line_token_ranges(code: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last] token indices touching each scored line (index >= 2, not blank, not last) and its newline."""
    out, pos = [], 0
    lines = code.split("\n")
    for i, line in enumerate(lines):
        begin, end = pos, pos + len(line) + 1  # chars of the line and its newline
        pos = end
        if i < 2 or i == len(lines) - 1 or not line.strip():
            continue
        touching = [t for t, (a, b) in enumerate(offsets) if a < end and b > begin]
        if touching:
            out.append((touching[0], touching[-1]))
    return out


def _continue_line(model, tok: Tokenizer, messages: list[dict], prefix: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True) + prefix)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model.forward_dense(torch.tensor([ids + out], device=device))
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        text = tok.decode(out)
        if "\n" in text or nxt in tok.eos_token_ids:
            break
    return tok.decode(out).split("\n")[0]


def evaluate_task(model, tok: Tokenizer, task: str, rows: list[dict], with_next_line: bool = False) -> dict:
    """Held-out metrics for one task; `quality` is the higher-is-better headline number."""
    model.eval()
    ppl = assistant_perplexity(model, tok, rows)
    if task == "arith":
        return {"quality": arith_accuracy(model, tok, rows), "metric": "exact_match", "perplexity": ppl}
    result = {"quality": -ppl, "metric": "neg_perplexity", "perplexity": ppl}
    if task == "python" and with_next_line:
        result["next_line_accuracy"] = forced_next_line_accuracy(model, tok, rows)
    return result
