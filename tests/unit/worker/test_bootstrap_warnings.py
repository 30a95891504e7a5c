"""What a worker says at start about its GPU (services/worker/bootstrap.py)."""

import torch


def test_a_worker_on_a_gpu_without_tables_of_its_own_says_so_at_start(monkeypatch):
    """bootstrap._warn_if_untuned: one warning naming the GPU and the fix when kernels/sbmm_configs.json does not
    name it; nothing for a tuned GPU or a CPU worker."""
    from kernels import sbmm_plan
    from services.worker import bootstrap

    logs = []

    class Recorder:  # the module's logger (structlog caches bound loggers: capture_logs misses them)
        def warning(self, event, **fields):
            logs.append(dict(fields, event=event))

    monkeypatch.setattr(bootstrap, "log", Recorder())
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    bootstrap._warn_if_untuned(torch.device("cpu"))
    monkeypatch.setattr(sbmm_plan, "tuned_for", lambda device: True)
    bootstrap._warn_if_untuned(torch.device("cuda", 0))
    assert logs == []
    monkeypatch.setattr(sbmm_plan, "tuned_for", lambda device: False)
    bootstrap._warn_if_untuned(torch.device("cuda", 0))
    assert [(e["event"], e["gpu"]) for e in logs] == [("sbmm_tables_untuned", "NVIDIA B200")]
    assert "sbmm_configs.json" in logs[0]["fix"]
