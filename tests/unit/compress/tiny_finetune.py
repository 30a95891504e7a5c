"""A tiny Llama pretrained for a few steps on text, then fine-tuned on a task: its delta comes from real
optimizer steps. Byte-level tokens (vocab 256), so no tokenizer file is needed."""

import random
from pathlib import Path

import torch

from deltazip.compress.calib import DEFAULT_CALIB_FILE
from deltazip.model.loader import save_model_dir
from deltazip.model.synthetic import random_model, tiny_config

# hidden 256 so per-row fp16 scales cost what they do on real models (16 bits per 256+ weights, not per 64).
CONFIG = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
SEQ_LEN = 64


def task_text(seed: int, n: int) -> str:
    """The fine-tuning task: two-digit additions written out."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        lines.append(f"Q: what is {a} plus {b}? A: {a} + {b} = {a + b}.")
    return "\n".join(lines) + "\n"


def byte_windows(text: str, num: int, seed: int) -> torch.Tensor:
    data = torch.tensor(list(text.encode()), dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - SEQ_LEN - 1, (num,), generator=g)
    return torch.stack([data[s : s + SEQ_LEN + 1] for s in starts.tolist()])


def train(model, text: str, steps: int, lr: float, seed: int) -> None:
    """Next-token cross-entropy with Adam, batches of 8 windows."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        batch = byte_windows(text, 8, seed * 1000 + step)
        logits = model.forward_dense(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def held_out_ids() -> torch.Tensor:
    """Evaluation windows of the task text (a seed the fine-tune never saw)."""
    return byte_windows(task_text(99, 200), 8, 12345)[:, :-1]


def make_models(root: Path) -> dict[str, Path]:
    """base (pretrained on generic text), ft (base fine-tuned on the task), other_base, all bf16 HF folders."""
    torch.manual_seed(0)
    model = random_model(CONFIG, seed=0)
    train(model, DEFAULT_CALIB_FILE.read_text(), steps=30, lr=3e-3, seed=1)
    base_state = {k: v.detach().to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(base_state[k])
    train(model, task_text(0, 2000), steps=25, lr=1e-3, seed=2)
    paths = {name: root / name for name in ("base", "ft", "other_base")}
    for p in paths.values():
        p.mkdir()
    save_model_dir(paths["base"], CONFIG, base_state, dtype=torch.bfloat16)
    save_model_dir(paths["ft"], CONFIG, model.state_dict(), dtype=torch.bfloat16)
    save_model_dir(paths["other_base"], CONFIG, random_model(CONFIG, seed=5).state_dict(), dtype=torch.bfloat16)
    return paths
