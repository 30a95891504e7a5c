"""One decoder layer at a time: build it from tensors, run calibration through it, capture linear inputs."""

import torch

from deltazip.compress.hessian import HessianAccumulator
from deltazip.model.config import LlamaConfig
from deltazip.model.layers import NamedLinear, RMSNorm, Rope
from deltazip.model.llama import LlamaDecoderLayer

# Linears that share one input are compressed together, in the order their inputs become available.
STAGES: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


def build_layer(config: LlamaConfig, index: int, tensors: dict[str, torch.Tensor]) -> LlamaDecoderLayer:
    """A decoder layer holding `tensors` (local names, e.g. 'mlp.up_proj.weight'); modules know HF names."""
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config)
    layer.load_state_dict(tensors, strict=True, assign=True)
    for name, module in layer.named_modules():
        if isinstance(module, (NamedLinear, RMSNorm)):
            module.hf_name = layer_prefix(index) + name
    return layer.eval()


class _StopForward(Exception):
    """Raised by the collector once the inputs it needs were seen; the rest of the forward is skipped."""


class InputCollector:
    """A DeltaOps that changes nothing: it feeds one linear's inputs into a Hessian, then stops the forward."""

    def __init__(self, module_name: str, hessian: HessianAccumulator) -> None:
        self.module_name = module_name
        self.hessian = hessian

    def linear(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if name == self.module_name:
            self.hessian.add(x)  # x: [B*L, in_features]
            raise _StopForward

    def norm_weight(self, name: str, weight: torch.Tensor, x: torch.Tensor) -> None:
        return None

    def embedding(self, name: str, input_ids: torch.Tensor, h: torch.Tensor) -> None:
        return None


def collect_hessian(
    layer: LlamaDecoderLayer, module_name: str, hidden: torch.Tensor, rope: Rope, batch: int
) -> HessianAccumulator:
    """H of `module_name`'s inputs over all calibration samples. hidden: [S, L, hidden]."""
    linear = layer.get_submodule(module_name.split(".", 3)[-1])
    acc = HessianAccumulator(linear.in_features, hidden.device)
    collector = InputCollector(module_name, acc)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch):
            try:
                layer.forward_dense(hidden[start : start + batch], rope, collector)
            except _StopForward:
                pass
    return acc


def run_layer(layer: LlamaDecoderLayer, hidden: torch.Tensor, rope: Rope, batch: int) -> None:
    """hidden <- layer(hidden), in place, batch by batch. hidden: [S, L, hidden]."""
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch):
            hidden[start : start + batch] = layer.forward_dense(hidden[start : start + batch], rope)
