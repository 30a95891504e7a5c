"""On real activations of the fine-tuned tiny model, OBS beats magnitude pruning + round-to-nearest."""

import pytest
import torch
from tiny_finetune import held_out_ids

from deltazip.artifact.checkpoint import Checkpoint
from deltazip.compress.baselines import magnitude_rtn
from deltazip.compress.calib import load_calibration
from deltazip.compress.obs import obs_compress
from deltazip.compress.quantizer import QuantSpec
from deltazip.compress.sparsity import Sparsity
from deltazip.model.loader import load_model


class RecordInputs:
    """DeltaOps that records every linear's input rows and changes nothing."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = {}

    def linear(self, name, x, y):
        self.inputs.setdefault(name, []).append(x.detach().clone())

    def norm_weight(self, name, weight, x):
        return None

    def embedding(self, name, input_ids, h):
        return None


def linear_inputs(model_dir, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model = load_model(model_dir)
    rec = RecordInputs()
    with torch.no_grad():
        model.forward_dense(ids, rec)
    return {name: torch.cat(xs) for name, xs in rec.inputs.items() if ".layers." in name}  # [T, K]


@pytest.fixture(scope="module")
def activations(models):
    calib = load_calibration(models["ft"], 256, nsamples=32, seq_len=64)
    return linear_inputs(models["ft"], calib), linear_inputs(models["ft"], held_out_ids())


@pytest.mark.parametrize("bits,group_size", [(2, None), (4, 128)])
def test_obs_output_error_below_080x_rtn(models, activations, bits, group_size):
    calib_x, held_x = activations
    base, ft = Checkpoint(models["base"]), Checkpoint(models["ft"])
    spec, sparsity = QuantSpec(bits=bits, group_size=group_size), Sparsity.parse("2:4")
    ratios, held_ratios = [], []
    for name, x in sorted(calib_x.items()):
        delta = ft.get(name + ".weight").float() - base.get(name + ".weight").float()  # [N, K]
        hessian = 2 * x.T @ x / x.shape[0]
        obs = obs_compress(delta, hessian, spec, sparsity).dequantized
        rtn = magnitude_rtn(delta, spec, sparsity).dequantized
        err = lambda dq, xs: float((xs @ (delta - dq).T).norm())  # noqa: E731
        ratios.append(err(obs, x) / err(rtn, x))
        held_ratios.append(err(obs, held_x[name]) / err(rtn, held_x[name]))
    print(f"bits={bits} gs={group_size} obs/rtn output error: calib max {max(ratios):.3f} "
          f"mean {sum(ratios) / len(ratios):.3f}; held-out max {max(held_ratios):.3f}")  # fmt: skip
    assert max(ratios) < 0.8, ratios
    assert max(held_ratios) < 0.9, held_ratios  # the gain is not an artifact of fitting the calibration set
