"""The GPU session's scripts, run here on their CPU paths.

Device time is lent in minutes, so a script that breaks only once it runs on a GPU wastes a
session: ``make gpu-check`` (``benchmarks/gpu_check.sh``), the kernel timings
(``benchmarks/gpu_kernels.py``) and the memcheck fuzz (``benchmarks/sanitizer_fuzz.py``) each
have a path that runs on a CPU, and these tests take it.
"""
import os
import re
import subprocess

import pytest

from conftest import ROOT, run_python


def _python(args, env=None):
    out = run_python(args, timeout=600, env=env)
    return out.returncode, out.stdout + out.stderr


def test_gpu_check_plan_names_every_stage():
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "GPU_CHECK_DRY_RUN": "1"})
    rc, log = out.returncode, out.stdout + out.stderr
    assert rc == 0, log[-3000:]
    for stage in ("env", "build", "kernels", "tests", "bench", "fuzz", "sanitizer"):
        assert stage in log, (stage, log[-3000:])


def test_gpu_kernels_dry_run_with_overhead():
    """Every row of the kernel table and of the host-time table, one call each, under Triton's
    interpreter; a row that raises is printed as 'failed' (host times) or as NaN with the error
    (kernels), which fails this test. 2x3x32x64: NCHW beyond the one-program forward, so that
    the SPATIAL forward, its row-tile sweep and the grid-cap sweep all launch."""
    pytest.importorskip("triton")
    pytest.importorskip("mitkernels._C")
    rc, log = _python(["-m", "benchmarks.gpu_kernels", "--dry-run", "--overhead", "--shapes",
                       "8x3,2x3x32x64", "--dtypes", "fp32,bf16", "--sweep"],
                      env={"TRITON_INTERPRET": "1"})
    assert rc == 0, log[-3000:]
    assert "failed" not in log, log[-3000:]
    for row in ("triton.loss_forward_ 256x5", "triton_loss_backward (dispatcher) 256x5",
                "triton backward alone 256x5", "triton.step", "torch.profiler"):
        assert row in log, (row, log[-3000:])
    # a segmentation shape (NxCxHxW): the ops on its [N, C, H W] view, cross-entropy on NCHW
    for row in ("triton.step", "ce.eager", "sweep.fwd.rowtiles", "sweep.bwd.rowtiles",
                "sweep.fwd.p16"):
        for dtype in ("fp32", "bf16"):
            # a time, not the NaN of a row that raised
            pattern = r"2x3x32x64\s+" + dtype + r"\s+" + re.escape(row) + r"\s+\d+\.\d+"
            assert re.search(pattern, log), (pattern, log[-3000:])
    assert not re.search(r"\s(nan|NaN)\s", log) and "Error:" not in log, log[-3000:]


def test_sanitizer_fuzz_on_cpu():
    pytest.importorskip("mitkernels._C")
    rc, log = _python(["benchmarks/sanitizer_fuzz.py", "--device", "cpu", "--cases", "4"])
    assert rc == 0, log[-3000:]
