"""dense2 stacks (kernels/layout.py): 2-bit symmetric deltas, 2:4 or dense, held as dense 2-bit words. On CUDA
slots this is automatic; here it is forced on CPU slots so the stacks and the re-encoding are checked through
the CPU path (which dequantizes dense2 words), next to a 4-bit delta that keeps the canonical layout."""

import torch

from deltazip.artifact.delta_tensor import DeltaTensor
from kernels import packing
from services.worker.delta_ops import StepDeltaOps
from services.worker.device_slots import DeviceSlots
from tests.kernels.packed_factory import random_packed

N, K, GROUP = 64, 256, 32
NAME = "layer.weight"


def _packed(bits: int, seed: int) -> DeltaTensor:
    p = random_packed(N, K, bits, GROUP, True, generator=torch.Generator().manual_seed(seed))
    return DeltaTensor(NAME, "sparse24", (N, K), bits, GROUP, True, qweight=p["qweight"], meta=p["meta"],
                       scales=p["scales"])


def _dense_2bit(seed: int) -> DeltaTensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), generator=g)
    scales = (torch.rand(N, K // GROUP, generator=g) * 0.01 + 1e-3).half()
    return DeltaTensor(NAME, "quant", (N, K), 2, GROUP, True, qweight=packing.pack_codes(codes, 2), scales=scales)


def test_two_bit_deltas_in_dense2_stacks_give_the_canonical_products():
    deltas = {0: _packed(2, 1), 1: _dense_2bit(2), 2: _packed(4, 3)}
    slots = DeviceSlots(3, "cpu", torch.float32, {NAME}, tie_word_embeddings=False, dense2=True)
    for slot, delta in deltas.items():
        slots.write(slot, f"d{slot}", {NAME: delta})
    layouts = {slot: slots.stack(slot, NAME).layout for slot in deltas}
    assert layouts == {0: "dense2", 1: "dense2", 2: "canonical"}
    assert "meta" not in slots.stack(0, NAME).parts and slots.stack(0, NAME) is not slots.stack(1, NAME)
    segments = [(0, 2), (None, 1), (1, 2), (2, 1)]
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(4))
    y = torch.zeros(6, N)
    StepDeltaOps(slots, segments).linear("layer", x, y)
    want = torch.zeros(6, N)
    row = 0
    for slot, rows in segments:
        if slot is not None:
            want[row:row + rows] = x[row:row + rows] @ deltas[slot].dequantize(torch.float32).T
        row += rows
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_cpu_slots_keep_the_canonical_layout_by_default():
    slots = DeviceSlots(1, "cpu", torch.float32, {NAME}, tie_word_embeddings=False)
    slots.write(0, "d", {NAME: _packed(2, 5)})
    assert slots.stack(0, NAME).layout == "canonical" and "meta" in slots.stack(0, NAME).parts
