"""benchmarks/cpu_ops.py, the per-logit timing of the CPU kernel ops, on a small run."""
import re

import pytest

from conftest import run_python


def test_cpu_ops_prints_a_time_per_logit_for_each_case():
    pytest.importorskip("mitkernels._C")
    out = run_python(["-m", "benchmarks.cpu_ops", "--shapes", "8x3,4x1000,2x3x4x5", "--dtypes",
                      "fp32,bf16", "--rounds", "2", "--calls", "2", "--overhead"], timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for piece in ("op loss_forward_", "op loss_backward", "the bench step", "autograd.grad",
                  "engine.run_backward"):
        assert re.search(re.escape(piece) + r".*\s[\d.]+$", out.stdout, re.M), (piece, out.stdout)
    rows = re.findall(r"^\s+([\dx]+)\s+(\w+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
    assert [(shape, dtype) for shape, dtype, _, _ in rows] == [
        ("8x3", "fp32"), ("8x3", "bf16"), ("4x1000", "fp32"), ("4x1000", "bf16"),
        ("2x3x4x5", "fp32"), ("2x3x4x5", "bf16")], out.stdout
    assert all(float(fwd) > 0 and float(bwd) > 0 for _, _, fwd, bwd in rows)
