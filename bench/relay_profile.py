"""bench/relay.py's profiles: py-spy records of the worker and a scheduler, read back into a short summary."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path


def profile(py_spy: str, pids: dict[str, int], out_dir: Path, name: str, duration_s: int) -> list:
    """py-spy record (collapsed stacks) of the worker and the first scheduler, in the background."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for who in ("worker", "scheduler0"):
        out = out_dir / f"{name}-{who}.txt"
        procs.append(subprocess.Popen([py_spy, "record", "--pid", str(pids[who]), "--duration", str(duration_s),
                                       "--format", "raw", "--threads", "--rate", "200", "--nonblocking",
                                       "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


_OURS = ("services/", "deltazip/", "grpc/", "redis/", "structlog/", "Handle._run", "select")
_ENTRY = ("__main__.py", "service_main.py", "errors.py")


def top_frames(path: Path, num: int = 20) -> dict:
    """A py-spy raw profile read back: share of samples per thread, and the frames with the most samples in them."""
    threads, inclusive, total = collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames, n = stack.split(";"), int(count)
        total += n
        threads[frames[0].split(" (")[0] + " " + frames[0].rsplit(": ", 1)[-1]] += n
        for frame in set(frames[1:]):
            if any(k in frame for k in _OURS) and not any(k in frame for k in _ENTRY):
                inclusive[frame] += n
    share = lambda c: {k: round(v / max(total, 1), 3) for k, v in c.most_common(num)}  # noqa: E731
    return {"samples": total, "threads": share(threads), "frames": share(inclusive)}
