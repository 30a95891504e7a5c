"""Compressed matrices survive pack -> artifact -> load bit-exactly; dequantization equals the reference."""

import pytest
import torch

from deltazip.artifact import load_delta
from deltazip.artifact.writer import ArtifactWriter
from deltazip.compress.baselines import BITDELTA_SPEC, bitdelta, magnitude_rtn
from deltazip.compress.obs import obs_compress
from deltazip.compress.packer import pack_matrix
from deltazip.compress.quantizer import QuantSpec
from deltazip.compress.sparsity import Sparsity
from kernels import packing

N, K = 32, 128


def correlated_hessian(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) @ (torch.eye(k) + torch.randn(k, k, generator=g) / k**0.5)
    return 2 * x.T @ x / x.shape[0]


_LAYOUTS = ((None, True), (64, False), (32, True), (None, False))
# Every bit width with every sparsity kind, scale layouts rotated through the cases.
CASES = [
    (bits, *_LAYOUTS[(i + j) % len(_LAYOUTS)], sp)
    for i, bits in enumerate((2, 3, 4, 8))
    for j, sp in enumerate(("2:4", "0", "0.5"))
]


@pytest.mark.parametrize("bits,group_size,sym,sparsity", CASES)
def test_pack_load_round_trip_is_bit_exact(tmp_path, bits, group_size, sym, sparsity):
    g = torch.Generator().manual_seed(bits * 100 + (group_size or 0))
    delta = torch.randn(N, K, generator=g) * 1e-3
    spec, sp = QuantSpec(bits=bits, group_size=group_size, sym=sym), Sparsity.parse(sparsity)
    result = obs_compress(delta, correlated_hessian(K, 1), spec, sp, block_size=64)
    kind, parts = pack_matrix(result, spec, sp)
    assert kind == ("sparse24" if sp.is_24 else "quant")
    reference = packing.dequantize(
        parts["qweight"], parts["scales"], parts.get("zeros"), parts.get("meta"), bits, (N, K)
    )
    assert torch.equal(reference, result.dequantized)  # what OBS measured is exactly what the kernel computes
    if sp.is_24:
        assert torch.equal(packing.unpack_meta(parts["meta"], K), torch.nonzero(result.mask)[:, 1].view(N, K // 2))
    with ArtifactWriter(tmp_path / "a", "sha256:test", {"method": "obs"}) as writer:
        writer.add("w", parts, kind=kind, shape=(N, K), dtype="bfloat16", bits=bits, group_size=group_size, sym=sym)
    loaded = load_delta(tmp_path / "a", "cpu")["w"]
    for role, tensor in parts.items():
        stored = getattr(loaded, role)
        assert stored.dtype == tensor.dtype and torch.equal(stored, tensor), role
    assert torch.equal(loaded.dequantize(torch.float32), reference)
    assert torch.equal(loaded.dequantize(torch.float16), reference.half())


def test_codes_and_sparsity_pattern():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(N, K, generator=g)
    spec = QuantSpec(bits=3, group_size=64, sym=False)
    res = obs_compress(delta, correlated_hessian(K, 2), spec, Sparsity.parse("2:4"))
    assert bool((res.mask.view(N, K // 4, 4).sum(-1) == 2).all())
    assert bool((res.dequantized[~res.mask] == 0).all())
    assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= spec.maxq
    assert bool((res.zeros == res.zeros.round()).all())
    assert torch.equal(res.scales, res.scales.half().float())
    unstructured = obs_compress(delta, correlated_hessian(K, 2), spec, Sparsity.parse("0.5"))
    assert abs(float((~unstructured.mask).float().mean()) - 0.5) < 0.02


def test_baselines_pack_exactly():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(N, K, generator=g) * 1e-3
    spec, sp = QuantSpec(bits=2, group_size=None, sym=True), Sparsity.parse("2:4")
    for result, s, p in ((magnitude_rtn(delta, spec, sp), spec, sp), (bitdelta(delta), BITDELTA_SPEC, Sparsity())):
        _, parts = pack_matrix(result, s, p)
        ref = packing.dequantize(parts["qweight"], parts["scales"], parts.get("zeros"), parts.get("meta"), s.bits, (N, K))
        assert torch.equal(ref, result.dequantized)
    signs = bitdelta(delta).dequantized
    assert torch.equal(torch.sign(signs), torch.sign(delta)) and signs.abs().unique().numel() == 1
