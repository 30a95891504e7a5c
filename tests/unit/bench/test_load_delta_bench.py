"""bench/load_delta.py on the tiny shape: the readers (hashed, stamped, the old one) and both limits timed, the
JSON complete (plumbing, not speed)."""

import json

from bench import load_delta


def test_load_delta_bench_times_the_readers_against_the_limits(tmp_path):
    path = load_delta.main(["--shape", "tiny", "--num-layers", "1", "--repeats", "1", "--work-dir",
                            str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--label", "test"])
    data = json.loads(path.read_text())
    assert path.name.startswith("load-delta-test-") and data["bench"] == "load_delta"
    assert [r["reader"] for r in data["rows"]] == ["baseline", "load_delta", "load_delta_stamped",
                                                  "load_delta_reused", "copy_limit", "sha256_limit"]
    assert all(r["seconds"] > 0 and r["gb_per_s"] > 0 for r in data["rows"])
    assert data["config"]["disk_bytes"] > 0 and data["summary"]["speedup_vs_baseline"] > 0
    assert data["summary"]["stamped_speedup_vs_load_delta"] > 0 and data["summary"]["reused_vs_copy_limit"] > 0
    assert not list((tmp_path / "work").rglob(".verified.json"))  # the stamp it wrote is gone
    assert data["host"]["cores"] >= 1
