"""WorkerConfig: flags over env over defaults, validation with actionable messages."""

import pytest

from services.worker.config import WorkerConfig, config_from_args


def test_flags_win_over_env_and_types_are_parsed():
    env = {"DELTAZIP_NUM_DEVICE_SLOTS": "8", "DELTAZIP_PORT": "7000", "DELTAZIP_BASE_DIR": "/b",
           "DELTAZIP_STORE_ADDRESSES": "a:1, b:2", "DELTAZIP_KV_MEMORY_FRACTION": "0.25"}
    cfg = config_from_args(["--port", "0", "--max-deltas-per-batch", "2"], env)
    assert (cfg.port, cfg.num_device_slots, cfg.max_deltas_per_batch) == (0, 8, 2)
    assert cfg.store_addresses == ("a:1", "b:2") and cfg.kv_memory_fraction == 0.25 and cfg.base_dir == "/b"


@pytest.mark.parametrize("argv, env, want", [([], {}, True), (["--sparse-mma-2bit"], {}, True),
                                              (["--sparse-mma-2bit", "0"], {"DELTAZIP_SPARSE_MMA_2BIT": "1"}, False),
                                              ([], {"DELTAZIP_SPARSE_MMA_2BIT": "false"}, False),
                                              (["--sparse-mma-2bit"], {"DELTAZIP_SPARSE_MMA_2BIT": "0"}, True)])
def test_sparse_mma_2bit_is_on_by_default_and_0_or_false_turns_it_off(argv, env, want):
    assert config_from_args(argv, {"DELTAZIP_BASE_DIR": "/b", **env}).sparse_mma_2bit is want


def test_bool_flags_reject_words_they_do_not_know():
    with pytest.raises(ValueError, match="--sparse-mma-2bit 'maybe' is not a valid bool"):
        config_from_args(["--sparse-mma-2bit", "maybe"], {"DELTAZIP_BASE_DIR": "/b"})


def test_worker_ids_are_unique_by_default():
    assert WorkerConfig().worker_id != WorkerConfig().worker_id


@pytest.mark.parametrize("mode", ["delta", "dense-delta", "swap"])
def test_every_mode_is_accepted(mode):
    assert WorkerConfig(mode=mode).mode == mode


def test_mode_selector_lists_valid_modes():
    from services.worker.modes import select_mode

    assert select_mode("swap").swaps_weights and not select_mode("dense-delta").swaps_weights
    with pytest.raises(ValueError, match="valid modes: delta, dense-delta, swap"):
        select_mode("lora")


@pytest.mark.parametrize("kw, match", [
    ({"mode": "lora"}, "valid modes: delta, dense-delta, swap"),
    ({"num_device_slots": 0}, "--num-device-slots must be > 0"),
    ({"cuda_graphs": 2}, "--cuda-graphs must be -1"),
    ({"max_deltas_per_batch": 9}, "cannot exceed"),
    ({"heartbeat_s": 5, "heartbeat_ttl_s": 5}, "must exceed"),
    ({"dtype": "int8"}, "dtype must be one of"),
])
def test_invalid_values_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        WorkerConfig(**kw)


def test_advertised_address():
    assert WorkerConfig(host="127.0.0.1").address(1234) == "127.0.0.1:1234"
    assert WorkerConfig(advertise="w:1").address(1234) == "w:1"


def test_tensor_parallel_size_flag_env_and_refusals():
    cfg = config_from_args(["--base-dir", "/m"], env={"DELTAZIP_TENSOR_PARALLEL_SIZE": "2"})
    assert cfg.tensor_parallel_size == 2
    assert config_from_args(["--base-dir", "/m"], env={}).tensor_parallel_size == 1
    with pytest.raises(ValueError, match="--tensor-parallel-size must be >= 1"):
        WorkerConfig(base_dir="/m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="--mode swap"):
        WorkerConfig(base_dir="/m", tensor_parallel_size=2, mode="swap")
    with pytest.raises(ValueError, match="--cuda-graphs 1"):
        WorkerConfig(base_dir="/m", tensor_parallel_size=2, cuda_graphs=1)


def test_kernel_switches_default_and_reach_the_model_modules(monkeypatch):
    """The decode attention kernel is on by default, the unmeasured prefill kernel and fused rotation off; the
    config sets this process's module flags (the leader and every TP follower call it)."""
    from deltazip.model import attention, layers

    default = config_from_args([], env={})
    assert (default.decode_attention_kernel, default.prefill_attention_kernel, default.fused_rope_kv) == (True, True,
                                                                                                          True)
    for module, name in ((attention, "DECODE_KERNEL"), (attention, "PREFILL_KERNEL"), (layers, "FUSED_ROPE_KV")):
        monkeypatch.setattr(module, name, getattr(module, name))  # put back after the test
    config_from_args(["--decode-attention-kernel", "0", "--prefill-attention-kernel", "0", "--fused-rope-kv", "on"],
                     env={}).apply_kernel_flags()
    assert (attention.DECODE_KERNEL, attention.PREFILL_KERNEL, layers.FUSED_ROPE_KV) == (False, False, True)


def test_sp2_prefill_rows_sets_the_route_threshold(monkeypatch):
    """--sp2-prefill-rows N sets kernels/delta_linear.py's SP2_PREFILL_ROWS, 0 turns the route off, -1 (the default)
    leaves the module's measured value; below -1 is refused."""
    from kernels import delta_linear

    monkeypatch.setattr(delta_linear, "SP2_PREFILL_ROWS", 256)
    config_from_args([], env={}).apply_kernel_flags()
    assert delta_linear.SP2_PREFILL_ROWS == 256
    config_from_args([], env={"DELTAZIP_SP2_PREFILL_ROWS": "96"}).apply_kernel_flags()
    assert delta_linear.SP2_PREFILL_ROWS == 96
    config_from_args(["--sp2-prefill-rows", "0"], env={}).apply_kernel_flags()
    assert delta_linear.SP2_PREFILL_ROWS is None
    with pytest.raises(ValueError, match="--sp2-prefill-rows"):
        config_from_args(["--sp2-prefill-rows", "-2"], env={})


def test_sp2_prefill_left_rows_sets_the_route_condition(monkeypatch):
    """--sp2-prefill-left-rows N sets kernels/delta_linear.py's SP2_PREFILL_LEFT_ROWS, 0 removes the condition, -1
    (the default) leaves the module's value; below -1 is refused."""
    from kernels import delta_linear

    monkeypatch.setattr(delta_linear, "SP2_PREFILL_LEFT_ROWS", None)
    config_from_args([], env={}).apply_kernel_flags()
    assert delta_linear.SP2_PREFILL_LEFT_ROWS is None
    config_from_args(["--sp2-prefill-left-rows", "32"], env={}).apply_kernel_flags()
    assert delta_linear.SP2_PREFILL_LEFT_ROWS == 32
    config_from_args([], env={"DELTAZIP_SP2_PREFILL_LEFT_ROWS": "0"}).apply_kernel_flags()
    assert delta_linear.SP2_PREFILL_LEFT_ROWS is None
    with pytest.raises(ValueError, match="--sp2-prefill-left-rows"):
        config_from_args(["--sp2-prefill-left-rows", "-2"], env={})


def test_dense_rows_overrides_the_device_tables(monkeypatch):
    """--dense-rows N makes segments of N rows take the dense route at every code width (sbmm.dense_rows, which
    kernels/delta_linear.py and the worker's StepDeltaOps read), 0 turns the route off, -1 (the default) leaves the
    device tables; below -1 is refused."""
    import torch

    from kernels import sbmm, sbmm_plan

    cuda = torch.device("cuda", 0)  # dense_rows reads the table by device name; no GPU is touched
    monkeypatch.setattr(sbmm_plan, "_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setattr(sbmm_plan, "DENSE_ROWS_OVERRIDE", None)
    table = sbmm.dense_rows(cuda, 2)
    config_from_args([], env={}).apply_kernel_flags()
    assert sbmm.dense_rows(cuda, 2) == table and table is not None
    config_from_args(["--dense-rows", "384"], env={}).apply_kernel_flags()
    assert (sbmm.dense_rows(cuda, 2), sbmm.dense_rows(cuda, 4)) == (384, 384)
    config_from_args([], env={"DELTAZIP_DENSE_ROWS": "0"}).apply_kernel_flags()
    assert (sbmm.dense_rows(cuda, 2), sbmm.dense_rows(cuda, 4)) == (None, None)
    with pytest.raises(ValueError, match="--dense-rows"):
        config_from_args(["--dense-rows", "-2"], env={})


def test_merged_cache_flags_are_checked():
    """--merged-cache-bytes (0 = off) and --merged-cache-admit-rows parse, bad values and tensor parallelism are
    refused with the flag's name."""
    cfg = config_from_args(["--merged-cache-bytes", str(16 << 30), "--merged-cache-admit-rows", "128"], env={})
    assert (cfg.merged_cache_bytes, cfg.merged_cache_admit_rows) == (16 << 30, 128)
    assert config_from_args([], env={}).merged_cache_bytes == 0
    with pytest.raises(ValueError, match="--merged-cache-bytes"):
        config_from_args(["--merged-cache-bytes", "-1"], env={})
    with pytest.raises(ValueError, match="--merged-cache-admit-rows"):
        config_from_args(["--merged-cache-admit-rows", "0"], env={})
    with pytest.raises(ValueError, match="--merged-cache-bytes needs --tensor-parallel-size 1"):
        config_from_args(["--merged-cache-bytes", "1024", "--tensor-parallel-size", "2"], env={})
    with pytest.raises(ValueError, match="applies to --mode delta"):
        config_from_args(["--merged-cache-bytes", "1024", "--mode", "swap"], env={})
