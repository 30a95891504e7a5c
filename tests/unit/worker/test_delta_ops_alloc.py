"""An allocation-mode delta (4-bit, 2-bit and dropped tensors) served in one batch with a uniform 4-bit delta
and the base: StepDeltaOps greedy tokens equal each merged model's own greedy decoding."""

import pytest
import torch

from deltazip.artifact import load_delta
from deltazip.artifact.names import is_block_linear
from deltazip.compress.config import CompressConfig
from deltazip.compress.driver import compress_checkpoint
from deltazip.model.layers import NamedLinear
from deltazip.model.loader import model_from_state_dict, save_model_dir
from deltazip.model.synthetic import random_state_dict, tiny_config
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots

CONFIG = tiny_config(hidden_size=128, intermediate_size=256, tie_word_embeddings=True)
STEPS = 6


def _finetune(base_state: dict, seed: int) -> dict:
    """Base + a change of a different size per layer (embedding frozen, as our fine-tunes)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base_state.items():
        scale = 0.0 if "embed" in k else (0.03 if ".layers.0." in k else 0.01)
        out[k] = v + scale * torch.randn(v.shape, generator=g)
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("alloc-serve")
    base_state = random_state_dict(CONFIG, seed=0)
    dirs = {name: root / name for name in ("base", "ft-mixed", "ft-uniform")}
    states = {"base": base_state, "ft-mixed": _finetune(base_state, 1), "ft-uniform": _finetune(base_state, 2)}
    calib = root / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog; hello world. " * 40)
    for name, d in dirs.items():
        d.mkdir()
        save_model_dir(d, CONFIG, states[name])
    common = dict(group_size=32, nsamples=8, seq_len=32, calib=str(calib), device="cpu")
    configs = {"ft-mixed": CompressConfig(target_ratio=9.0, **common), "ft-uniform": CompressConfig(bits=4, **common)}
    deltas = {}
    for name, cfg in configs.items():
        compress_checkpoint(dirs["base"], dirs[name], root / f"{name}.delta", cfg, progress=False)
        deltas[name] = load_delta(root / f"{name}.delta", "cpu")
    merged = {"base": model_from_state_dict(CONFIG, base_state)}
    for name, d in deltas.items():
        state = {k: v + d[k].dequantize(torch.float32) if k in d else v for k, v in base_state.items()}
        merged[name] = model_from_state_dict(CONFIG, state)
    return deltas, merged


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    ids = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model.forward_dense(torch.tensor([ids]))[0, -1].argmax()))
    return ids[-steps:]


def test_mixed_delta_has_every_option(served):
    deltas, _ = served
    mixed = deltas["ft-mixed"]
    linears = [n for n in deltas["ft-uniform"] if is_block_linear(n, deltas["ft-uniform"][n].shape)]
    assert {mixed[n].bits for n in linears if n in mixed} == {2, 4}
    assert any(n not in mixed for n in linears)  # dropped


def test_batch_of_base_mixed_and_uniform_equals_merged_models(served):
    deltas, merged = served
    base = merged["base"]
    linear_names = {m.hf_name + ".weight" for m in base.modules() if isinstance(m, NamedLinear)}
    slots = DeviceSlots(2, "cpu", torch.float32, linear_names, tie_word_embeddings=True)
    slots.write(0, "ft-mixed", deltas["ft-mixed"])
    slots.write(1, "ft-uniform", deltas["ft-uniform"])
    # One tensor, two stacks in the same batch: 2-bit for the mixed delta, 4-bit for the uniform one.
    by_name = slots.stacks_by_name()
    assert any({s.bits for s in stacks} == {2, 4} for stacks in by_name.values())
    dropped = [n for n in deltas["ft-uniform"] if n in linear_names and n not in deltas["ft-mixed"]]
    assert dropped and all(slots.stack(0, n) is None for n in dropped)

    prompt = [ord(c) for c in "hello world"]
    seqs = {"base": list(prompt), "ft-mixed": list(prompt), "ft-uniform": list(prompt)}
    order = [("base", None), ("ft-mixed", 0), ("ft-uniform", 1)]
    with torch.no_grad():
        for _ in range(STEPS):
            ids = torch.tensor([seqs[name] for name, _ in order])  # [3, L]: equal lengths, one batch
            ops = StepDeltaOps(slots, [(slot, ids.shape[1]) for _, slot in order])
            logits = base.forward_dense(ids, deltas=ops)  # [3, L, V]
            for row, (name, _) in enumerate(order):
                want = merged[name].forward_dense(ids[row : row + 1])[0, -1]
                torch.testing.assert_close(logits[row, -1], want, rtol=1e-4, atol=1e-4)
                seqs[name].append(int(logits[row, -1].argmax()))
    for name, _ in order:
        assert seqs[name][len(prompt) :] == _greedy(merged[name], prompt, STEPS), name
    assert seqs["ft-mixed"] != seqs["base"] or seqs["ft-uniform"] != seqs["base"]
