"""Session fixture: the really fine-tuned tiny Llama of tiny_finetune.py. Tests run torch on one thread:
their small ops lose more to thread hand-offs than they gain (5x slower on a busy 2-core machine)."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tiny_finetune import make_models


@contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """base, ft (base + a few real Adam steps on a task), other_base: bf16 HF folders."""
    with one_thread():
        return make_models(tmp_path_factory.mktemp("models"))
