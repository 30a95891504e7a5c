"""What every benchmark result JSON carries and how it is written: device name, git commit, atomic file.

`bench/results/<bench>-<label>-<date>.json`, label = the device name (or a given label) made file-safe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def device_name(device: str) -> str:
    """The GPU's marketing name for a cuda device (nvidia-smi, no CUDA context in this process), else 'cpu'."""
    if not device.startswith("cuda"):
        return "cpu"
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True)
        names = done.stdout.strip().splitlines()
        if done.returncode == 0 and names:
            return names[0].strip()
    import torch

    return torch.cuda.get_device_name(0)


def host_info() -> dict:
    """The host's CPU model, core counts (all, usable by this process) and cgroup CPU quota: eager steps are
    host-bound, so timings and a load calibrated on the base's capacity differ between hosts with the same GPU."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or "unknown", "cores": os.cpu_count(), "cores_usable": usable, "cpu_quota": _cpu_quota()}


def _cpu_quota() -> float | None:
    """The cgroup (v2) CPU quota in cores, e.g. a container's --cpus; None: none set (or no cgroup v2)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def git_commit() -> str:
    """The short commit hash; BENCH_COMMIT names it where the tree has no .git (a copy on a lent GPU machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    return done.stdout.strip() or "unknown"


def slug(label: str) -> str:
    """A file-name-safe form of a label: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")


def write_results(out_dir: Path, bench: str, label: str, payload: dict) -> Path:
    """<out_dir>/<bench>-<label>-<date>.json, written atomically (temp + rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}-{slug(label)}-{payload['date']}.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, default=float)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a result is for everyone
    os.replace(tmp, path)
    return path
