"""Report every Triton / Gluon kernel compile of this process (and its seconds) to registered callbacks.

A compile happens on the first launch of a kernel variant and blocks that launch for up to seconds (less when
Triton's on-disk cache has the binary). The worker's step profile counts them (phase `compile`), so a benchmark
sees compiles that land inside its measured window. Uses Triton's global JIT hooks (`triton.knobs.runtime`:
`jit_cache_hook` runs before a compile, `jit_post_compile_hook` after); with a Triton that lacks them, `watch`
is a no-op and returns False.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_lock = threading.Lock()
_callbacks: list[Callable[[str, float], None]] = []
_started = threading.local()  # per thread: the start of the compile in progress


def watch(callback: Callable[[str, float], None]) -> bool:
    """Call `callback(kernel name, seconds)` after every kernel compile in this process, on the compiling
    thread."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover - depends on the installed triton
        return False
    runtime = knobs.runtime
    if not (hasattr(runtime, "jit_cache_hook") and hasattr(runtime, "jit_post_compile_hook")):
        return False  # pragma: no cover - an older triton
    with _lock:
        _callbacks.append(callback)
        runtime.jit_cache_hook = _before
        runtime.jit_post_compile_hook = _after
    return True


def unwatch(callback: Callable[[str, float], None]) -> None:
    """Stop calling `callback`; the hooks go when no callback is left."""
    with _lock:
        if callback in _callbacks:
            _callbacks.remove(callback)
        if not _callbacks:
            from triton import knobs

            knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None


def _before(**_kwargs) -> bool:
    _started.t = time.perf_counter()
    return False  # False: compile as usual (True would skip the compile)


def _after(**kwargs) -> None:
    seconds = time.perf_counter() - getattr(_started, "t", time.perf_counter())
    name = getattr(kwargs.get("fn"), "name", "?")  # triton's JitFunctionInfo: the kernel's qualified name
    with _lock:
        callbacks = list(_callbacks)
    for callback in callbacks:
        callback(name, seconds)
