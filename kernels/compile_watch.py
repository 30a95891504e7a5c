"""Count the compiled variants Triton holds in memory for the SBMM kernels, so a caller can see compiles happen.

A compile happens on the first launch of a kernel variant in a process and blocks that launch while it runs
(shorter when Triton's on-disk cache has the binary). The worker's engine reads `compiled_variants()` around each
forward: a step during which the count grew compiled inside the step (a stall), which its profile counts (phase
`compile`), so a benchmark sees compiles that land inside its measured window.

Why counting and not Triton's JIT hooks (`triton.knobs.runtime.jit_cache_hook`): with a hook set, Triton
serializes every compile's constexprs to JSON, and the Gluon kernels' layout constexprs do not serialize, so the
compile itself fails (seen on the H100 device machine). The count reads each JITFunction's per-device kernel
cache (`device_caches[device][0]`); a Triton without it counts 0.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable


def compiled_variants(kernels: Iterable | None = None) -> int:
    """Compiled variants in memory, over all devices, of `kernels` (default: the SBMM kernels, `sbmm_kernels`).
    Cheap (a few dict lengths): the engine reads it twice per step."""
    total = 0
    for kernel in sbmm_kernels() if kernels is None else kernels:
        caches = getattr(kernel, "device_caches", None)
        if not caches:
            continue
        for entry in list(caches.values()):
            cache = entry[0] if isinstance(entry, tuple) else None
            total += len(cache) if isinstance(cache, dict) else 0
    return total


@functools.cache
def sbmm_kernels() -> tuple:
    """The kernels a step launches whose variants kernels/sbmm_warmup.py compiles ahead: the Gluon, the two
    sparse-MMA and the portable SBMM kernels (those this Triton has)."""
    from kernels import sbmm

    return tuple(kernel for kernel in (getattr(sbmm.sbmm_gluon, "_sbmm_gluon_kernel", None),
                                       getattr(sbmm.sbmm_spmma, "_sbmm_spmma_kernel", None),
                                       getattr(sbmm.sbmm_spmma2, "_sbmm_spmma2_kernel", None),
                                       sbmm.sbmm_triton._sbmm_kernel) if kernel is not None)
