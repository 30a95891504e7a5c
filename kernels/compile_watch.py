"""Count the compiled variants Triton holds in memory for our kernels, so a caller can see compiles happen.

A compile happens on the first launch of a kernel variant in a process and blocks that launch for up to seconds
(less when Triton's on-disk cache has the binary). The worker's engine reads `compiled_variants()` around each
forward: a step during which the count grew compiled inside the step (a stall), which its profile counts (phase
`compile`), so a benchmark sees compiles that land inside its measured window.

Why counting and not Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook`): with a hook set, Triton
serializes every compile's constexprs to JSON, and the Gluon kernels' layout constexprs do not serialize, so the
compile itself fails (seen on the H100 device machine). The count reads each JITFunction's per-device kernel
cache (`device_caches[device][0]`); a Triton without it counts 0.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from triton.runtime.jit import JITFunction


def compiled_variants(kernels: Iterable | None = None) -> int:
    """Compiled variants in memory, over all devices, of `kernels` (default: every Triton kernel defined in a
    loaded module of the `kernels` package)."""
    total = 0
    for kernel in _our_kernels() if kernels is None else kernels:
        caches = getattr(kernel, "device_caches", None)
        if not caches:
            continue
        for entry in list(caches.values()):
            cache = entry[0] if isinstance(entry, tuple) else None
            total += len(cache) if isinstance(cache, dict) else 0
    return total


def _our_kernels() -> list:
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "kernels" or name.startswith("kernels.")):
            continue
        found.extend(value for value in vars(module).values() if isinstance(value, JITFunction))
    return found
