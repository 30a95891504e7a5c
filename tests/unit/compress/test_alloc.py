"""Allocation mode: the knapsack respects its budget and favours sensitive tensors; `--target-ratio` on a really
fine-tuned tiny Llama writes a self-describing mixed artifact at or above the target ratio."""

import itertools
import json
import random

import pytest
import torch

from deltazip.artifact import load_delta, read_manifest
from deltazip.artifact.manifest import Manifest
from deltazip.artifact.names import is_block_linear
from deltazip.artifact.summary import summarize
from deltazip.cli import main
from deltazip.compress import driver
from deltazip.compress.alloc import DROP, Candidate, allocate, lower_hull, weighted_output_loss
from deltazip.compress.config import CompressConfig
from deltazip.compress.hessian import HessianAccumulator

CALIB = ["--nsamples", "16", "--seq-len", "64", "--group-size", "64", "--no-progress"]


def options(loss_drop: float, loss2: float, loss4: float, b2: int = 100, b4: int = 200) -> list[Candidate]:
    return [Candidate(DROP, 0, loss_drop), Candidate("2b-24", b2, loss2), Candidate("4b-24", b4, loss4)]


def test_weighted_output_loss_is_fisher_weighted_mean_square_output_error():
    g = torch.Generator().manual_seed(0)
    x, err, fisher = torch.randn(50, 8, generator=g), torch.randn(3, 8, generator=g), torch.rand(3, generator=g)
    acc = HessianAccumulator(8, "cpu")
    acc.add(x)
    want = 0.5 * float((fisher * (x @ err.T).pow(2).mean(dim=0)).sum())
    assert weighted_output_loss(err, acc.hessian, fisher) == pytest.approx(want, rel=1e-5)
    plain = 0.5 * float((x @ err.T).pow(2).mean(0).sum())
    assert weighted_output_loss(err, acc.hessian, None) == pytest.approx(plain, rel=1e-5)


def test_lower_hull_drops_options_that_never_pay():
    # 2-bit here saves less per byte than going straight to 4-bit: not on the hull.
    hull = lower_hull(options(10.0, 9.5, 1.0))
    assert [c.option for c in hull] == [DROP, "4b-24"]
    assert [c.option for c in lower_hull(options(10.0, 3.0, 1.0))] == [DROP, "2b-24", "4b-24"]
    assert [c.option for c in lower_hull(options(10.0, 12.0, 1.0))] == [DROP, "4b-24"]  # 2-bit worse than nothing


def test_allocation_prefers_the_sensitive_tensor():
    cands = {"calm": options(1.0, 0.3, 0.1), "touchy": options(100.0, 30.0, 10.0)}
    chosen = allocate(cands, 300)  # room for one 4-bit and one 2-bit, or three 2-bit steps
    assert chosen["touchy"].option == "4b-24" and chosen["calm"].option == "2b-24"
    chosen = allocate(cands, 150)
    assert chosen["touchy"].option == "2b-24" and chosen["calm"].option == DROP


def test_allocation_respects_budget_and_is_near_optimal():
    rng = random.Random(0)
    for _ in range(40):
        cands = {}
        for t in range(5):
            drop = rng.uniform(1, 100)
            l2 = drop * rng.uniform(0.05, 0.6)
            cands[f"t{t}"] = options(drop, l2, l2 * rng.uniform(0.1, 0.5), rng.randint(50, 150), rng.randint(160, 300))
        budget = rng.uniform(0, 1200)
        chosen = allocate(cands, budget)
        used = sum(c.num_bytes for c in chosen.values())
        assert used <= budget
        best = min(sum(c.loss for c in combo) for combo in itertools.product(*cands.values())
                   if sum(c.num_bytes for c in combo) <= budget)  # fmt: skip
        # Greedy on the hull is optimal up to the one upgrade that did not fit.
        worst_step = max(max(c.loss for c in cs) for cs in cands.values())
        assert sum(c.loss for c in chosen.values()) <= best + worst_step


def test_allocation_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="budget"):
        allocate({"t": options(1.0, 0.5, 0.2)}, -1)


def test_config_checks_allocation_settings():
    with pytest.raises(ValueError, match="kernel"):
        CompressConfig(target_ratio=12, alloc_bits=(3, 2))
    with pytest.raises(ValueError, match="2:4"):
        CompressConfig(target_ratio=12, sparsity="0")
    assert "target_ratio" not in CompressConfig().to_manifest()  # uniform manifests are unchanged


@pytest.fixture(scope="module")
def allocated(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("alloc")
    out = {}
    for name, flags in {"b2": ["--bits", "2"], "b4": ["--bits", "4"], "a5": ["--target-ratio", "5"]}.items():
        out[name] = root / name
        assert main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out[name]), *flags, *CALIB]) == 0
    return out


def test_target_ratio_is_met_with_a_mix_recorded_in_the_manifest(allocated):
    summary = summarize(allocated["a5"])
    assert summary["ratio"] >= 5.0
    manifest = read_manifest(allocated["a5"])
    alloc = manifest.compression["allocation"]
    rows = summarize(allocated["b4"])["tensors"]
    linears = [r["name"] for r in rows if is_block_linear(r["name"], tuple(r["shape"]))]
    assert sum(alloc["counts"].values()) == len(linears)
    assert set(alloc["counts"]) == {"2b-24", "4b-24", DROP}, alloc["counts"]  # this target needs all three
    for name in linears:
        if name in alloc["dropped"]:
            assert name not in manifest.tensors  # no entry: the reader applies nothing
        else:
            entry = manifest.tensors[name]
            assert entry.kind == "sparse24" and entry.bits in (2, 4)
    assert sum(alloc["counts"].get(o, 0) for o in ("2b-24", "4b-24")) == sum(
        1 for n in linears if n in manifest.tensors
    )
    assert manifest.compression["bits"] is None and manifest.compression["name"].startswith("alloc-5x")
    assert Manifest.from_json(manifest.to_json()) == manifest  # round trip
    deltas = load_delta(allocated["a5"], "cpu")
    assert {d.bits for n, d in deltas.items() if is_block_linear(n, d.shape)} == {2, 4}


def test_allocated_tensors_equal_the_uniform_runs_at_the_same_bits(allocated):
    """2-bit candidates see the inputs the uniform 2-bit run sees, so a 2-bit tensor is bit-identical."""
    mixed, uniform = load_delta(allocated["a5"], "cpu"), load_delta(allocated["b2"], "cpu")
    first_layer = [n for n, d in mixed.items() if d.bits == 2]
    assert first_layer
    for name in first_layer:
        assert torch.equal(mixed[name].qweight, uniform[name].qweight), name


def test_allocation_gives_bits_to_the_tensor_the_loss_depends_on(models, tmp_path, monkeypatch):
    """Make one tensor's loss gradient huge: it must get 4 bits even under a budget that drops others."""
    real = driver.loss_sensitivity
    target = "model.layers.1.mlp.gate_proj.weight"

    def boosted(*args, **kwargs):
        sens = real(*args, **kwargs)
        sens.fisher[target] = sens.fisher[target] * 1e6
        return sens

    monkeypatch.setattr(driver, "loss_sensitivity", boosted)
    out = tmp_path / "boost"
    flags = ["--target-ratio", "8", *CALIB]
    assert main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out), *flags]) == 0
    manifest = read_manifest(out)
    assert manifest.tensors[target].bits == 4
    assert manifest.compression["allocation"]["dropped"]  # the budget was tight


def test_unreachable_target_fails_and_leaves_no_artifact(models, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out), "--target-ratio", "500", *CALIB])
    assert code == 2 and "out of reach" in capsys.readouterr().err
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())


def test_inspect_reports_the_allocation(allocated, capsys):
    capsys.readouterr()
    assert main(["inspect", str(allocated["a5"])]) == 0
    text = capsys.readouterr().out
    assert "allocation" in text and "drop" in text
    assert main(["inspect", str(allocated["a5"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compression"]["allocation"]["target_ratio"] == 5.0


def test_sensitivity_gradient_is_the_weight_gradient_of_the_mean_loss(models):
    from deltazip.compress.sensitivity import loss_sensitivity
    from deltazip.model.loader import load_model

    tokens = torch.randint(0, 256, (3, 17), generator=torch.Generator().manual_seed(0))
    sens = loss_sensitivity(models["ft"], tokens, torch.device("cpu"), torch.float32, with_grad=True)
    model = load_model(models["ft"])
    logits = model.forward_dense(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    name = "model.layers.1.self_attn.o_proj.weight"
    torch.testing.assert_close(sens.grad[name], model.get_parameter(name).grad, rtol=1e-3, atol=1e-6)
    assert set(sens.fisher) == set(sens.grad) and len(sens.fisher) == 14
    assert all(bool((f >= 0).all()) for f in sens.fisher.values())


def test_taylor_sensitivity_runs_end_to_end(models, tmp_path):
    out = tmp_path / "taylor"
    flags = ["--target-ratio", "5", "--alloc-sensitivity", "taylor", *CALIB]
    assert main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out), *flags]) == 0
    alloc = read_manifest(out).compression["allocation"]
    assert alloc["sensitivity"] == "taylor" and summarize(out)["ratio"] >= 5.0


def test_zstd_target_counts_the_compressed_shards(models, tmp_path):
    out = tmp_path / "zstd"
    flags = ["--target-ratio", "6", "--lossless", "zstd", *CALIB]
    assert main(["compress", str(models["base"]), str(models["ft"]), "-o", str(out), *flags]) == 0
    manifest = read_manifest(out)
    assert all(s.codec == "zstd" for s in manifest.shards.values())
    assert summarize(out)["ratio"] >= 6.0  # bytes on disk, after zstd
    assert 0.5 < manifest.compression["allocation"]["zstd_shard_factor"] <= 1.2
