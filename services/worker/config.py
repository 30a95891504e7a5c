"""WorkerConfig: every setting of a worker, built once from flags and DELTAZIP_* env vars."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from dataclasses import dataclass, field, fields

from deltazip.rpc.flags import advertise_address, tls_settings, validate_common
from deltazip.security.tokens import read_token_file

MODES = ("delta", "dense-delta", "swap")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")


def default_worker_id() -> str:
    """hostname-pid-random: unique per process, so `--scale worker=N` needs no fixed names."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def default_base_dir() -> str:
    """The bundled base model, converted to a Hugging Face folder on first use (deltazip.convert)."""
    from deltazip.convert.base import default_base_dir as convert_default

    try:
        return str(convert_default())
    except (OSError, ValueError, ImportError) as exc:
        raise ValueError(f"no --base-dir given and the default base model could not be prepared ({exc}); "
                         "pass --base-dir with a Hugging Face Llama folder") from exc


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    host: str = "0.0.0.0"
    port: int = 50053  # 0 = pick a free port; the bound address is published to Redis
    advertise: str = ""  # host:port others dial; '' = host (hostname for wildcard binds):bound_port
    redis_url: str = "redis://127.0.0.1:6379/0"
    grace_s: float = 5.0
    store_addresses: tuple[str, ...] = ()  # fixed delta stores; empty = live stores from Redis
    base_dir: str = ""
    base_name: str = ""  # '' = the base directory's name
    device: str = "auto"
    dtype: str = "float32"
    mode: str = "delta"
    num_device_slots: int = 4
    sparse_mma_2bit: bool = True  # CUDA slots hold 2-bit 2:4 deltas for the 2-bit sparse-MMA kernel
    fused_projections: bool = True  # q/k/v and gate/up: one base GEMM and one delta launch each
    decode_attention_kernel: bool = True  # CUDA decode steps read the paged KV cache directly (Triton)
    prefill_attention_kernel: bool = True  # CUDA steps with prefill chunks too (varlen kernel)
    fused_rope_kv: bool = True  # CUDA: q/k rotation and the KV-cache write in one launch
    sp2_prefill_rows: int = -1  # Hopper: sp2 segments of this many rows on the prefill kernels; 0 off, -1 default
    sp2_prefill_left_rows: int = -1  # ... only when SBMM is left no segment of this many rows; 0 any, -1 default
    dense_rows: int = -1  # CUDA: delta segments of this many rows run as one GEMM on base + Δ; 0 never, -1 the table
    merged_cache_bytes: int = 0  # CUDA: base + Δ weights kept between steps for the busiest fine-tunes; 0 = off
    merged_cache_admit_rows: int = 256  # ... a segment of this many rows admits its fine-tune
    row_buckets: bool = True  # CUDA: eager prefill steps run their linears on a bucketed row count
    device_cache_bytes: int = 0  # 0 = limited by slots only
    host_cache_bytes: int = 4 << 30
    disk_cache_dir: str = ""  # '' = a per-worker temp dir
    disk_cache_bytes: int = 32 << 30
    reverify_disk_cache: bool = False  # hash every shard on each load from the disk cache, not only at fetch
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_deltas_per_batch: int = 4
    prefill_first: bool = False  # prompts and decodes in alternate steps (engine/batch_scheduler.py; measured slower)
    kv_block_size: int = 16
    num_kv_blocks: int = 0  # 0 = derive from kv_memory_fraction
    kv_memory_fraction: float = 0.5
    cuda_graphs: int = -1  # decode steps replay CUDA graphs (CUDA only): 1 on, 0 off, -1 auto = on unless TP > 1
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    heartbeat_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    fetch_chunk_bytes: int = 1 << 20
    fetch_max_attempts: int = 5
    fetch_processes: int = 2  # child processes that download deltas (off the engine's GIL); 0 = threads in this process
    default_max_tokens: int = 16
    stream_chunk_tokens: int = 8  # a request's tokens per stream chunk after the first (1 = one message per token)
    stream_interval_ms: float = 50.0  # longest a token is held for its chunk to fill (the first: never)
    worker_id: str = field(default_factory=default_worker_id)
    log_level: str = "info"
    metrics_port: int = 0  # Prometheus /metrics, 0 = off
    model_sync_s: float = 1.0  # how often deleted/overwritten models are dropped from local caches
    tls_cert: str = ""  # PEM certificate served; '' = plaintext
    tls_key: str = ""
    tls_ca: str = ""  # CA of the other services' certificates; set = dial them over TLS
    tls_server_name: str = ""  # name checked in dialled servers' certificates
    tls_require_client_cert: int = 0  # 1 = mutual TLS
    store_token_file: str = ""  # file holding an admin token for the delta stores (when they check tokens)
    tensor_parallel_size: int = 1  # GPUs (ranks) one worker spans; rank r uses cuda:r (gloo ranks on cpu)

    def apply_kernel_flags(self) -> None:
        """Set this process's attention / rotary / prefill-delta kernel switches and the eager steps' row buckets
        (module flags of deltazip.model, kernels.delta_linear and the engine's model runner) from the config."""
        from deltazip.model import attention, layers
        from kernels import delta_linear, sbmm_plan
        from services.worker.engine import model_runner

        attention.DECODE_KERNEL = self.decode_attention_kernel
        attention.PREFILL_KERNEL = self.prefill_attention_kernel
        layers.FUSED_ROPE_KV = self.fused_rope_kv
        model_runner.ROW_BUCKETS = self.row_buckets
        if self.sp2_prefill_rows >= 0:
            delta_linear.SP2_PREFILL_ROWS = self.sp2_prefill_rows or None
        if self.sp2_prefill_left_rows >= 0:
            delta_linear.SP2_PREFILL_LEFT_ROWS = self.sp2_prefill_left_rows or None
        if self.dense_rows >= 0:
            sbmm_plan.DENSE_ROWS_OVERRIDE = self.dense_rows

    @property
    def use_cuda_graphs(self) -> bool:
        """-1 (auto): on for a single-rank worker (they only ever apply on CUDA)."""
        return self.cuda_graphs == 1 or (self.cuda_graphs == -1 and self.tensor_parallel_size == 1)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown worker mode {self.mode!r}; valid modes: {', '.join(MODES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        validate_common(self.host, self.port, self.redis_url, self.log_level, self.grace_s)
        tls_settings(self)
        read_token_file(self.store_token_file, "--store-token-file")
        _positive(self, "num_device_slots", "max_num_seqs", "max_num_batched_tokens", "max_deltas_per_batch",
                  "kv_block_size", "heartbeat_s", "heartbeat_ttl_s", "fetch_chunk_bytes",
                  "fetch_max_attempts", "default_max_tokens", "model_sync_s", "stream_chunk_tokens")
        _non_negative(self, "device_cache_bytes", "host_cache_bytes", "disk_cache_bytes", "num_kv_blocks",
                      "max_model_len", "metrics_port", "fetch_processes", "merged_cache_bytes")
        _positive(self, "merged_cache_admit_rows")
        if self.merged_cache_bytes and self.tensor_parallel_size > 1:
            raise ValueError("--merged-cache-bytes needs --tensor-parallel-size 1 (shards do not merge)")
        if self.merged_cache_bytes and self.mode != "delta":
            raise ValueError(f"--merged-cache-bytes applies to --mode delta (it keeps base + packed delta), not "
                             f"{self.mode}")
        _row_count(self, "sp2_prefill_rows", "the default", "off")
        _row_count(self, "sp2_prefill_left_rows", "the default", "no condition")
        _row_count(self, "dense_rows", "the device table's", "never")
        if not 0.0 <= self.stream_interval_ms <= 1000.0:
            raise ValueError(f"--stream-interval-ms must be in [0, 1000], got {self.stream_interval_ms}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.heartbeat_ttl_s <= self.heartbeat_s:
            raise ValueError("--heartbeat-ttl-s must exceed --heartbeat-s, or workers flap between alive and dead")
        if self.max_deltas_per_batch > self.num_device_slots:
            raise ValueError(f"max_deltas_per_batch ({self.max_deltas_per_batch}) cannot exceed "
                             f"num_device_slots ({self.num_device_slots})")
        if self.cuda_graphs not in (-1, 0, 1):
            raise ValueError(f"--cuda-graphs must be -1 (auto), 0 or 1, got {self.cuda_graphs}")
        if not self.worker_id:
            raise ValueError("worker_id must not be empty")
        _check_tensor_parallel(self)

    def address(self, bound_port: int) -> str:
        """The address other services dial."""
        return advertise_address(self.host, bound_port, self.advertise)


def _check_tensor_parallel(cfg: WorkerConfig) -> None:
    if cfg.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size must be >= 1, got {cfg.tensor_parallel_size}")
    if cfg.tensor_parallel_size == 1:
        return
    if cfg.mode == "swap":
        raise ValueError("--mode swap does not support --tensor-parallel-size > 1; use delta or dense-delta")
    if cfg.cuda_graphs == 1:
        raise ValueError("--cuda-graphs 1 does not support --tensor-parallel-size > 1 (followers replay no graphs)")


def _positive(cfg: WorkerConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")


def _row_count(cfg: WorkerConfig, name: str, minus_one: str, zero: str) -> None:
    """A row-count flag whose -1 and 0 mean `minus_one` and `zero`."""
    value = getattr(cfg, name)
    if value < -1:
        raise ValueError(f"--{name.replace('_', '-')} must be -1 ({minus_one}), 0 ({zero}) or a row count, got {value}")


def _non_negative(cfg: WorkerConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")


def _env_name(field_name: str) -> str:
    return "DELTAZIP_" + field_name.upper()


def _parse_value(kind: type | str, raw: str):
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        if raw.strip().lower() not in BOOLS:
            raise ValueError(raw)
        return BOOLS[raw.strip().lower()]
    return raw


BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
FLAG_HELP = {  # flags whose meaning the name alone does not tell
    "stream_chunk_tokens": "tokens of one request sent per stream chunk (worker -> scheduler -> client): the first "
                           "token goes alone at once, then chunks of this many, or fewer when the request ends or "
                           "a token has waited --stream-interval-ms; 1 = one message per token",
    "stream_interval_ms": "longest a generated token is held back for its chunk to fill (ms, 0-1000)",
    "reverify_disk_cache": "hash every shard against its sha256 on each load from the disk cache; by default a "
                           "shard the fetcher hashed on download is trusted, in the same boot, while its size, mtime, "
                           "ctime and inode are unchanged (deltazip/artifact/stamp.py; the sha256 ran at 1.2-1.4 "
                           "GB/s on the H200 hosts measured)",
    "fetch_processes": "child processes that download deltas from the stores, so downloads do not hold the engine's "
                       "GIL (a download in a thread of the worker slowed its steps 2-3x); 0 = threads in the worker",
    "sparse_mma_2bit": "2-bit 2:4 deltas go to the 2-bit sparse-MMA kernel (sp2 slots) instead of dense2, on GPUs "
                       "that run it (sm_80+); 0/false = dense2",
    "fused_projections": "q/k/v and gate/up run as one base GEMM and one delta launch each (their weights stacked "
                         "by rows, a delta's members in one slot stack where they share a format); 0/false = "
                         "one GEMM and one launch per projection",
    "decode_attention_kernel": "decode-only steps on CUDA read the paged KV cache with kernels/paged_attention.py; "
                               "0/false = gather the pages into a padded batch for SDPA",
    "prefill_attention_kernel": "steps with prefill chunks on CUDA read the paged KV cache with the varlen kernel "
                                "(kernels/paged_attention.py); 0/false = a padded gather + SDPA",
    "fused_rope_kv": "on CUDA, rotate q/k and write the KV cache in one launch per layer (kernels/rope_kv.py); "
                     "0/false = op by op",
    "sp2_prefill_rows": "on Hopper GPUs with fp16, 2-bit sp2 delta segments of at least this many rows (that fill "
                        "their 128-row blocks well) run on the prefill kernels (kernels/sp2_wgmma_ws.py) instead of "
                        "SBMM; 0 = never, -1 = kernels/delta_linear.py's measured default",
    "sp2_prefill_left_rows": "route to the prefill kernels only when SBMM would be left no segment of at least "
                             "this many rows (one launch takes all of a step's prompt work or none); no gain on "
                             "serving-like steps (docs/kernels.md run 32); "
                             "0 = no such condition, -1 = kernels/delta_linear.py's default (none)",
    "dense_rows": "on CUDA, a delta segment (one fine-tune's rows in a step) of at least this many rows runs as one "
                  "GEMM on base + delta, expanded once (kernels/delta_linear.py merged_linear), instead of the base "
                  "GEMM plus SBMM; 0 = never, -1 = the per-device dense_rows of kernels/sbmm_configs.json",
    "merged_cache_bytes": "on CUDA, keep up to this many bytes of base + delta weights on the GPU between steps for "
                          "the fine-tunes with the most prompt work (services/worker/merged_cache.py): their prompt "
                          "segments of 64+ rows then run one GEMM on kept weights instead of the base GEMM plus SBMM "
                          "(a 7B fine-tune needs ~13 GB); 0 = off. Experimental: 16 GiB made serving slower on an "
                          "H200 (docs/serving.md, session 30)",
    "merged_cache_admit_rows": "with --merged-cache-bytes: a fine-tune's weights are merged and kept once one of its "
                               "prompt segments (its rows in a step) has this many rows",
    "row_buckets": "on CUDA, steps with prompt chunks run their linears on the token count rounded up to one of ~56 "
                   "buckets (zero rows added: at most 1/8 more past 128 rows), planned once while idle, instead of "
                   "every step's own count (cuBLAS plans each new GEMM shape on the host: ~0.2-2 ms a linear); "
                   "0/false = each step's own count",
    "prefill_first": "while sequences decode, steps with prompt work run it without the decodes, and the next step "
                     "runs the decodes alone (a CUDA-graph replay), in turn: a new prompt's step no longer carries "
                     "every running sequence's rows (with deltas, one eager SBMM segment per running fine-tune), "
                     "meant to cut time to first token; decodes skip at most every other step. Measured slower on an "
                     "H200 (docs/serving.md, session 27: TTFT p90 1.30x for base, 1.25x for delta, base capacity "
                     "0.94x), so off by default. 0/false = decodes and prompt chunks share every step",
    "tensor_parallel_size": "GPUs one worker spans (tensor parallel; default 1): rank r runs on cuda:r (cuda:N -> "
                            "cuda:N+r), or gloo ranks with --device cpu; any size works (heads are padded when they "
                            "do not divide); not with --mode swap or --cuda-graphs 1",
}


def build_parser() -> argparse.ArgumentParser:
    """One flag per WorkerConfig field: --num-device-slots, env DELTAZIP_NUM_DEVICE_SLOTS."""
    parser = argparse.ArgumentParser(prog="python -m services.worker", description="DeltaZip GPU worker")
    for f in fields(WorkerConfig):
        flag = "--" + f.name.replace("_", "-")
        extra = {"choices": MODES} if f.name == "mode" else {}
        if f.type == "bool":
            extra = {"nargs": "?", "const": "1"}  # `--flag` alone = on; `--flag 0` = off
        env_help = f"env {_env_name(f.name)}"
        help_text = f"{FLAG_HELP[f.name]} ({env_help})" if f.name in FLAG_HELP else env_help
        parser.add_argument(flag, dest=f.name, default=None, help=help_text, **extra)
    return parser


def config_from_args(argv: list[str] | None = None, env: dict[str, str] | None = None) -> WorkerConfig:
    """Flags win over DELTAZIP_* env vars, which win over defaults."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(argv))
    values = {}
    for f in fields(WorkerConfig):
        raw = args.get(f.name)
        if raw is None:
            raw = env.get(_env_name(f.name))
        if raw is not None:
            try:
                values[f.name] = _parse_value(f.type, raw)
            except ValueError:
                raise ValueError(f"--{f.name.replace('_', '-')} {raw!r} is not a valid {f.type}") from None
    if not values.get("base_dir"):
        values["base_dir"] = default_base_dir()
    return WorkerConfig(**values)
