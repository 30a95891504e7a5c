"""DeltaZip: serve many full-parameter fine-tunes of one base LLM from shared GPUs via compressed deltas.

`from deltazip import Client` loads the SDK on first use, so `import deltazip` stays light (no torch, no grpc).
"""

__version__ = "0.1.0"

_LAZY = {"Client", "AsyncClient", "DeltaZipError", "Completion", "Token", "ModelInfo"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import deltazip.client as client

        return getattr(client, name)
    raise AttributeError(f"module 'deltazip' has no attribute {name!r}")
