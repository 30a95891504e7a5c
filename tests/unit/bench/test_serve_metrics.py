"""Serving metrics: throughput over the busy span, percentiles, SLO attainment per request, ratios to baselines."""

import pytest

from bench.replay import Outcome, add_ratios, summarize
from bench.serve import mode_flags, parse_args


def outcome(i: int, e2e_ms: float, ok: bool = True, ttft_ms: float = 10.0, num_tokens: int = 5) -> Outcome:
    return Outcome(f"r{i}", "ft-000", ok, arrival_s=float(i), lag_ms=0.0, ttft_ms=ttft_ms, e2e_ms=e2e_ms,
                   num_tokens=num_tokens if ok else 0, server_queue_ms=1.0, server_ttft_ms=5.0,
                   error="" if ok else "UnavailableError: gone")


def test_summary_counts_throughput_and_slo():
    base = {o.id: o for o in (outcome(i, 100.0) for i in range(4))}
    runs = [outcome(0, 200.0), outcome(1, 600.0), outcome(2, 400.0), outcome(3, 1000.0, ok=False)]
    row = summarize(runs, wall_s=4.0, base=base, slo_k=5.0)
    assert row["num_failed"] == 1 and row["errors"] == ["UnavailableError: gone"]
    assert row["throughput_rps"] == pytest.approx(3 / 4.0)  # last finish: arrival 3 s + 1 s
    assert row["tokens_per_s"] == pytest.approx(15 / 4.0)
    assert row["slo_attainment"] == pytest.approx(2 / 4)  # 600 > 5 x 100 misses; a failure always misses
    assert row["tpot_p50_ms"] == pytest.approx((400.0 - 10.0) / 4)
    assert row["ttft_p90_vs_base"] == pytest.approx(1.0)


def test_ratios_pair_rows_of_the_same_point():
    rows = [{"mode": m, "bits": b, "num_models": 32, "load": 1.0, "throughput_rps": t}
            for m, b, t in (("delta", 4, 30.0), ("swap", 4, 2.0), ("dense-delta", 4, 10.0), ("delta", 2, 40.0))]
    add_ratios(rows)
    assert rows[0]["throughput_vs_swap"] == pytest.approx(15.0) and rows[0]["throughput_vs_dense"] == pytest.approx(3.0)
    assert rows[3]["throughput_vs_swap"] is None  # no 2-bit swap row measured


def test_flags():
    assert mode_flags(["swap=--num-device-slots=1", "delta=--x=2"], "swap") == ["--num-device-slots=1"]
    with pytest.raises(ValueError, match="MODE=FLAG"):
        mode_flags(["bogus"], "swap")
    with pytest.raises(SystemExit):
        parse_args(["--modes", "delta,lora"])
    args = parse_args(["--num-models", "8,16", "--loads", "0.5,2", "--modes", "delta,swap"])
    assert args.num_models == [8, 16] and args.loads == [0.5, 2.0] and args.modes == ["delta", "swap"]


def test_mode_variants_take_their_kinds_flags_then_their_own():
    """delta+md8: a worker of mode delta with delta's --mode-flag values, then its own (the last of a flag wins in
    the worker's argparse); plain delta does not get the variant's; bad labels, unknown kinds and a mode named
    twice are refused before anything starts."""
    from bench.serve import check_mode, mode_kind

    specs = ["delta=--max-deltas-per-batch=16", "delta+md8=--max-deltas-per-batch=8", "swap=--num-device-slots=1"]
    assert mode_flags(specs, "delta+md8") == ["--max-deltas-per-batch=16", "--max-deltas-per-batch=8"]
    assert mode_flags(specs, "delta") == ["--max-deltas-per-batch=16"]
    assert mode_flags(specs, "swap+x") == ["--num-device-slots=1"]
    assert mode_kind("delta+md8") == "delta" and mode_kind("dense-delta") == "dense-delta"
    assert check_mode("delta+md8") is None and check_mode("dense-delta+a.b_c-1") is None
    assert "one of" in check_mode("lora+x") and "label" in check_mode("delta+") and "label" in check_mode("delta+a b")
    args = parse_args(["--modes", "delta,delta+md8", *(f"--mode-flag={s}" for s in specs)])
    assert args.modes == ["delta", "delta+md8"]
    for bad in (["--modes", "delta,delta"], ["--modes", "delta+"], ["--modes", "delta", "--mode-flag=lora+x=--y"],
                ["--modes", "delta,delta+md8", "--mode-flag=delta+md9=--x=1"]):  # a variant not run: a typo
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_goal_summary_reads_the_32_model_point():
    from bench.replay import goal_summary

    rows = []
    for load, (d, s, dense) in {1.0: (0.9, 0.5, 0.8), 2.0: (0.8, 0.1, 0.3)}.items():
        for mode, slo, tput in (("delta", d, 32.0 * load), ("swap", s, 2.0), ("dense-delta", dense, 8.0)):
            rows.append({"mode": mode, "bits": 4, "num_models": 32, "load": load, "throughput_rps": tput,
                         "slo_attainment": slo, "ttft_p90_vs_base": 1.5})
    rows.append({"mode": "base", "bits": None, "num_models": 0, "load": 2.0, "throughput_rps": 70.0})
    add_ratios(rows)
    goals = goal_summary(rows)
    assert goals["num_models"] == 32 and goals["load"] == 2.0
    four = goals["4bit"]
    assert four["throughput_vs_swap"] == pytest.approx(32.0) and four["goal_throughput_vs_swap_15x"]
    assert four["goal_ttft_p90_within_2x_base"]
    assert four["slo_at_least_baseline_at_every_load"] == {"swap": True, "dense-delta": True}


def test_goals_without_baselines_are_open_not_failed():
    from bench.replay import goal_summary

    rows = [{"mode": "delta", "bits": 2, "num_models": 3, "load": 1.0, "throughput_rps": 5.0, "ttft_p90_vs_base": 3.0}]
    add_ratios(rows)
    two = goal_summary(rows)["2bit"]
    assert two["goal_throughput_vs_swap_15x"] is None and two["goal_ttft_p90_within_2x_base"] is False
