"""GGUF -> HF conversion of the bundled SmolLM2-135M-Instruct: shapes, metadata, tokenizer, a sane answer."""

import json
import time

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from safetensors import safe_open

from deltazip.convert.base import bundled_gguf_path
from deltazip.convert.gguf import convert_gguf, hf_tensor_name, unpermute_rotary_rows
from deltazip.model.config import LlamaConfig
from deltazip.model.loader import load_model
from deltazip.model.tokenizer import Tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A shared 2-core box makes OpenMP threads stall; one thread is steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "smollm2"
    start = time.perf_counter()
    convert_gguf(bundled_gguf_path(), out)
    seconds = time.perf_counter() - start
    print(f"\nconversion took {seconds:.1f} s")
    return out, seconds


@pytest.fixture(scope="module")
def reader():
    return GGUFReader(str(bundled_gguf_path()))


def _field(reader, key):
    return reader.fields[key].contents()


def test_conversion_is_fast_and_complete(converted):
    out, seconds = converted
    assert seconds < 90, f"conversion took {seconds:.0f} s"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp folder left


def test_config_and_shapes_match_gguf_metadata(converted, reader):
    out, _ = converted
    cfg = LlamaConfig.from_dir(out)
    assert cfg.num_hidden_layers == _field(reader, "llama.block_count") == 30
    assert cfg.hidden_size == _field(reader, "llama.embedding_length")
    assert cfg.num_attention_heads == _field(reader, "llama.attention.head_count")
    assert cfg.num_key_value_heads == _field(reader, "llama.attention.head_count_kv")
    assert cfg.vocab_size == len(_field(reader, "tokenizer.ggml.tokens")) == 49152
    assert cfg.rope_theta == _field(reader, "llama.rope.freq_base")
    assert cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == _field(reader, "tokenizer.ggml.bos_token_id")
    assert cfg.eos_token_ids == (_field(reader, "tokenizer.ggml.eos_token_id"),)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    gguf_shapes = {hf_tensor_name(t.name): tuple(reversed(t.shape.tolist())) for t in reader.tensors}
    assert shapes == gguf_shapes
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)


def test_dequantized_values_match_gguf(converted, reader):
    out, _ = converted
    t = next(t for t in reader.tensors if t.name == "blk.2.ffn_norm.weight")  # F32, stored as is
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        ours = f.get_tensor("model.layers.2.post_attention_layernorm.weight").float().numpy()
    np.testing.assert_allclose(ours, np.asarray(t.data), rtol=1e-3)


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp: within a head, HF row (half, i) moves to position 2*i + half.
    gguf = np.empty_like(hf)
    for h in range(heads):
        for half in range(2):
            for i in range(head_dim // 2):
                gguf[h * head_dim + 2 * i + half] = hf[h * head_dim + half * head_dim // 2 + i]
    np.testing.assert_array_equal(unpermute_rotary_rows(gguf, heads), hf)


def test_tokenizer_matches_gguf_special_ids(converted, reader):
    out, _ = converted
    tok = Tokenizer.from_dir(out)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert tok.vocab_size == len(tokens)
    assert tok.token_to_id("<|im_start|>") == _field(reader, "tokenizer.ggml.bos_token_id") == 1
    assert tok.token_to_id("<|im_end|>") == _field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert tok.eos_token_ids == (2,)
    assert tok.chat_template == _field(reader, "tokenizer.chat_template")
    for text in ["Hello world!", "  spaces\tand\nnewlines ", "digits 2024 and 3.14", "ünïcödé — 日本語 🤖",
                 "def f(x):\n    return x ** 2"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" 2024") == [tok.token_to_id("Ġ")] + [tok.token_to_id(d) for d in "2024"]  # digits split
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1


def test_greedy_answer_through_chat_template_is_sane(converted):
    out, _ = converted
    tok = Tokenizer.from_dir(out)
    model = load_model(out, dtype=torch.float32)
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    x = torch.tensor([ids])
    generated = []
    with torch.inference_mode():
        for _ in range(12):
            nxt = int(model.forward_dense(x)[0, -1].argmax())
            if nxt in tok.eos_token_ids:
                break
            generated.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    assert "Paris" in tok.decode(generated)
