"""Serving workloads: many fine-tunes with Zipf popularity, Poisson or Gamma-bursty arrivals, or a replayed trace.

Trace format (JSON lines, the DeltaZip artifact's): one request per line,
`{"id", "prompt", "timestamp", "model", "min_tokens", "max_tokens"}`, timestamp in seconds from the start.
Everything is seeded: the same WorkloadConfig gives the same requests.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ARRIVALS = ("poisson", "gamma")
TRACE_KEYS = ("id", "prompt", "timestamp", "model", "min_tokens", "max_tokens")
# Words for synthetic prompts; a byte-level tokenizer makes one character one token.
_WORDS = ("the", "delta", "model", "serve", "batch", "token", "fine", "tune", "base", "layer", "kernel", "cache",
          "query", "answer", "data", "bench", "load", "sparse", "quant", "bits")


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a workload; `timestamp` is its arrival in seconds from the start."""

    id: str
    prompt: str
    timestamp: float
    model: str
    min_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    models: tuple[str, ...]  # fine-tune names, most popular first
    num_requests: int = 100
    rate_rps: float = 1.0  # mean arrival rate
    arrival: str = "gamma"  # poisson | gamma
    cv: float = 2.0  # coefficient of variation of inter-arrival gaps (gamma); poisson has cv 1
    zipf_alpha: float = 1.5
    prompt_len_mean: int = 64  # characters (tokens with a byte tokenizer)
    prompt_len_max: int = 256
    output_len_mean: int = 32
    output_len_max: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a workload needs at least one model")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.num_requests <= 0 or self.rate_rps <= 0 or self.cv <= 0 or self.zipf_alpha < 0:
            raise ValueError(f"num_requests, rate_rps and cv must be > 0 and zipf_alpha >= 0: {self}")
        if not 1 <= self.prompt_len_mean <= self.prompt_len_max or not 1 <= self.output_len_mean <= self.output_len_max:
            raise ValueError(f"length means must be in [1, max]: {self}")


def zipf_probabilities(num_models: int, alpha: float) -> np.ndarray:
    """p_i proportional to 1 / i**alpha for ranks i = 1..num_models."""
    weights = 1.0 / np.arange(1, num_models + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def arrival_times(num: int, rate_rps: float, arrival: str, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Cumulative arrival times (s), the first at 0: exponential gaps (poisson) or Gamma gaps with the given CV."""
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate_rps, size=num)
    else:
        shape = 1.0 / cv**2  # Gamma CV = 1/sqrt(shape); mean = shape * scale = 1/rate
        gaps = rng.gamma(shape, 1.0 / (rate_rps * shape), size=num)
    times = np.cumsum(gaps)
    return times - times[0]


def lengths(num: int, mean: int, maximum: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal lengths (sigma 0.5) with the given mean, clipped to [1, maximum]."""
    sigma = 0.5
    mu = np.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, size=num)), 1, maximum).astype(np.int64)


def synthetic_prompt(num_chars: int, rng: np.random.Generator) -> str:
    """Space-joined words cut to exactly `num_chars` characters."""
    words = rng.choice(_WORDS, size=num_chars // 3 + 1)
    return " ".join(words)[:num_chars]


def generate(config: WorkloadConfig) -> list[Request]:
    """The workload's requests in arrival order."""
    # Separate streams: arrivals, lengths and prompts do not change with the number of models, so runs with
    # 8 or 64 models (and the base-only reference) replay the same requests, only the models differ.
    time_rng, model_rng, len_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(4))
    n = config.num_requests
    times = arrival_times(n, config.rate_rps, config.arrival, config.cv, time_rng)
    ranks = model_rng.choice(len(config.models), size=n, p=zipf_probabilities(len(config.models), config.zipf_alpha))
    prompt_lens = lengths(n, config.prompt_len_mean, config.prompt_len_max, len_rng)
    output_lens = lengths(n, config.output_len_mean, config.output_len_max, len_rng)
    return [
        Request(id=f"req-{i:06d}", prompt=synthetic_prompt(int(prompt_lens[i]), rng), timestamp=float(times[i]),
                model=config.models[int(ranks[i])], min_tokens=int(output_lens[i]), max_tokens=int(output_lens[i]))
        for i in range(n)
    ]


def with_model(requests: list[Request], model: str) -> list[Request]:
    """The same requests (ids, arrivals, lengths) all sent to `model`: the base-only reference load."""
    return [Request(r.id, r.prompt, r.timestamp, model, r.min_tokens, r.max_tokens) for r in requests]


def scaled(requests: list[Request], factor: float) -> list[Request]:
    """Arrivals compressed by `factor` (factor 2 = twice the load), everything else unchanged."""
    return [Request(r.id, r.prompt, r.timestamp / factor, r.model, r.min_tokens, r.max_tokens) for r in requests]


def write_trace(requests: list[Request], path: str | Path) -> Path:
    """Write requests as JSON lines, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for r in requests:
            f.write(json.dumps(asdict(r)) + "\n")
    os.replace(tmp, path)
    return path


def read_trace(path: str | Path, model_map: dict[str, str] | None = None) -> list[Request]:
    """Requests of a JSON-lines trace, sorted by timestamp and shifted to start at 0; `model_map` renames models."""
    requests = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [k for k in ("prompt", "timestamp", "model") if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_no}: trace record lacks {missing}; keys are {TRACE_KEYS}")
            max_tokens = int(record.get("max_tokens") or 128)
            model = str(record["model"])
            requests.append(Request(str(record.get("id", f"req-{line_no:06d}")), str(record["prompt"]),
                                    float(record["timestamp"]), (model_map or {}).get(model, model),
                                    int(record.get("min_tokens") or 0), max_tokens))
    if not requests:
        raise ValueError(f"{path}: empty trace")
    requests.sort(key=lambda r: r.timestamp)
    start = requests[0].timestamp
    return [Request(r.id, r.prompt, r.timestamp - start, r.model, r.min_tokens, r.max_tokens) for r in requests]


def map_trace_models(requests: list[Request], models: tuple[str, ...]) -> list[Request]:
    """Map a trace's model names onto `models` by popularity rank (most requested -> models[0]), wrapping around."""
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.model] = counts.get(r.model, 0) + 1
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    names = {m: models[i % len(models)] for i, m in enumerate(ranked)}
    return [Request(r.id, r.prompt, r.timestamp, names[r.model], r.min_tokens, r.max_tokens) for r in requests]
