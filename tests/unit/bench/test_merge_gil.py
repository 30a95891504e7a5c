"""bench/merge_gil.py end to end on the CPU (tiny model): the pipeline, not the timings."""

import json

import torch

from bench import merge_gil
from services.worker.modes import merged_weights


def test_merge_gil_measures_every_switch_interval(tmp_path):
    path = merge_gil.main(["--device", "cpu", "--shape", "tiny", "--num-layers", "1", "--idle-s", "0.2",
                           "--host-ops", "5", "--merges", "2", "--switch-ms", "5,0.5", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert [r["switch_ms"] for r in data["rows"]] == [5.0, 0.5]
    for row in data["rows"]:
        assert len(row["merge_s"]) == 2 and all(s > 0 for s in row["merge_s"])
        assert row["idle"]["n"] > 0 and row["idle"]["median_ms"] > 0
    assert data["merged_model_bytes"] > 0 and data["limit"]


def test_the_merged_model_is_base_plus_the_delta():
    """What the bench's thread builds is a real merge: every linear equals base + dequantized delta."""
    shapes = merge_gil.linear_shapes("tiny", 1)
    _, host, delta = merge_gil.make_weights(shapes, torch.device("cpu"), 2, 128)
    merged = merged_weights(host, delta)
    for name in shapes:
        want = (host[name].float() + delta[name].dequantize(torch.float32)).half()
        torch.testing.assert_close(merged[name], want)
        assert not torch.equal(merged[name], host[name])
