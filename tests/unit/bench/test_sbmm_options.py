"""bench/sbmm_options.py off a GPU: it says what it needs and fails, instead of timing nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import sbmm_options
from kernels import sbmm_spmma2

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_refuses_without_a_gpu(tmp_path):
    run = subprocess.run([sys.executable, "bench/sbmm_options.py", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "needs a CUDA GPU" in run.stderr
    assert not list(tmp_path.iterdir())  # no result file for a run that measured nothing


def test_option_sets_are_launch_config_keys():
    """Every option set merges only keys the sparse-MMA launch reads (kernels/sbmm.py `_launch_sparse_mma`)."""
    assert sbmm_options.OPTIONS["tuned"] == {}
    assert {key for opts in sbmm_options.OPTIONS.values() for key in opts} == {"x_dense", "pdl", "expand"}
    sbmm_spmma2.expand_ptx("f16", sbmm_options.OPTIONS["expand_fma"]["expand"])  # a name it takes (else ValueError)
    for case in sbmm_options.CASES.split(","):
        shape, num, rows = case.split(":")
        assert shape in sbmm_options.ALL_SHAPES and int(num) > 0 and int(rows) > 0
    assert {"qkv", "gate_up2", "qkvo", "gate_up", "down"} <= set(sbmm_options.ALL_SHAPES)  # worker and layer
