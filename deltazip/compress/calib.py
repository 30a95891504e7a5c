"""Calibration token windows: from a text/jsonl file (or the shipped default set), tokenized, sampled."""

import json
from pathlib import Path

import torch

DEFAULT_CALIB_FILE = Path(__file__).resolve().parent.parent / "data" / "calib_default.txt"


def read_documents(path: str | Path) -> list[str]:
    """Documents of a calibration file: jsonl rows ('text', or the contents of 'messages'), else paragraphs."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for line in text.splitlines():
            if line.strip():
                row = json.loads(line)
                if "text" in row:
                    docs.append(str(row["text"]))
                else:
                    docs.append("\n".join(str(m.get("content", "")) for m in row.get("messages", [])))
        return [d for d in docs if d]
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def tokenize(docs: list[str], tokenizer_dir: str | Path, vocab_size: int) -> list[int]:
    """All documents as one token stream: the checkpoint's tokenizer.json, else bytes (models without one)."""
    tok_file = Path(tokenizer_dir) / "tokenizer.json"
    ids: list[int] = []
    if tok_file.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tok_file))
        for enc in tokenizer.encode_batch([d + "\n\n" for d in docs], add_special_tokens=False):
            ids.extend(enc.ids)
    else:
        for d in docs:
            ids.extend(b % vocab_size for b in (d + "\n\n").encode("utf-8"))
    return [i for i in ids if i < vocab_size]


def load_calibration(
    tokenizer_dir: str | Path,
    vocab_size: int,
    nsamples: int,
    seq_len: int,
    path: str | Path | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """[nsamples, seq_len] int64 windows at seeded random offsets of the tokenized calibration text."""
    docs = read_documents(path or DEFAULT_CALIB_FILE)
    ids = tokenize(docs, tokenizer_dir, vocab_size)
    if not ids:
        raise ValueError(f"calibration file {path or DEFAULT_CALIB_FILE} yields no tokens")
    stream = torch.tensor(ids, dtype=torch.int64)
    if stream.numel() < seq_len + 1:
        stream = stream.repeat(-(-(seq_len + 1) // stream.numel()))
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (nsamples,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
