"""Child processes that must not outlive the service that started them (a worker's fetch processes, a scheduler's
--processes children)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable


def die_with_parent(parent_pid: int, on_orphaned: Callable[[], None]) -> None:
    """Call in the child: SIGTERM to us when the parent dies, even by SIGKILL (Linux PR_SET_PDEATHSIG); elsewhere,
    or if the parent died before this ran, a thread polls and calls `on_orphaned`."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        on_orphaned()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
