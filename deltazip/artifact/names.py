"""Which checkpoint tensors are transformer-block linears (compressed) and which are kept (torch-free)."""


def is_block_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A 2-D `.weight` inside a decoder layer: q/k/v/o and gate/up/down projections."""
    return len(shape) == 2 and name.endswith(".weight") and ".layers." in name


def linear_module_name(tensor_name: str) -> str:
    """HF tensor name -> module name ('model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj')."""
    return tensor_name.removesuffix(".weight")
