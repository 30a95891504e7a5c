"""SamplingParams validation and the batched Sampler."""

import pytest
import torch

from deltazip.model.sampling import Sampler, SamplingParams


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
    ],
)
def test_invalid_params_say_what_to_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_accepts_list_or_string():
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="\n").stop == ("\n",)


def _logits(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_argmax_and_mix_with_sampled_rows():
    logits = _logits()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1),
              SamplingParams(temperature=0), SamplingParams(temperature=0.7)]
    out = Sampler()(logits, params, [0] * 4)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert out.shape == (4,) and out.dtype == torch.int64


def test_same_seed_same_tokens_regardless_of_batch():
    logits = _logits(rows=3, vocab=1000)
    p = SamplingParams(temperature=1.0, seed=1234)
    sampler = Sampler()
    alone = [int(sampler(logits[1:2], [p], [step])[0]) for step in range(20)]
    batched = [int(sampler(logits, [SamplingParams(temperature=2.0), p, SamplingParams()], [0, step, 0])[1])
               for step in range(20)]
    assert alone == batched
    assert len(set(alone)) > 1  # different steps draw differently
    other = [int(sampler(logits[1:2], [SamplingParams(temperature=1.0, seed=99)], [s])[0]) for s in range(20)]
    assert other != alone


def test_top_k_one_is_greedy_and_top_k_limits_support():
    logits = _logits(rows=1, vocab=100)
    sampler = Sampler()
    assert int(sampler(logits, [SamplingParams(top_k=1, seed=0)], [0])[0]) == int(logits.argmax())
    allowed = set(logits[0].topk(5).indices.tolist())
    draws = {int(sampler(logits, [SamplingParams(top_k=5, seed=s, temperature=5.0)], [0])[0]) for s in range(200)}
    assert draws <= allowed and len(draws) > 2


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    sampler = Sampler()
    draws = {int(sampler(logits, [SamplingParams(top_p=0.7, seed=s)], [0])[0]) for s in range(300)}
    assert draws == {0, 1}
    draws = {int(sampler(logits, [SamplingParams(top_p=0.85, seed=s)], [0])[0]) for s in range(300)}
    assert draws == {0, 1, 2}


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    out = Sampler()(logits, [SamplingParams()] * 4000, [0] * 4000)
    freq = torch.bincount(out, minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_min_tokens_suppresses_eos():
    logits = torch.zeros(2, 10)
    logits[:, 2] = 100.0  # EOS is by far the most likely
    sampler = Sampler(eos_token_ids=[2])
    params = [SamplingParams(temperature=0, min_tokens=3)] * 2
    out = sampler(logits, params, [1, 3])
    assert int(out[0]) != 2 and int(out[1]) == 2
