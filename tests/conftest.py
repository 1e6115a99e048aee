"""Shared fixtures: golden data and the backends this machine can run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def run_python(args, timeout, env=None):
    """``python *args`` in the repository root, with the repository on PYTHONPATH (and ``env``
    added to the environment): the examples and scripts as a user runs them."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_json(name):
    with open(DATA / name) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def golden_trajectory():
    return load_json("mit_published_trajectory.json")


@pytest.fixture(scope="session")
def golden_calibration():
    return load_json("calibration.json")


def masked_class_logits(rows, num_classes, dtype, seed):
    """Logits with masked classes (-inf, as users mask classes a sample cannot have), their
    targets (never a masked class) and the same logits with -1e4 in place of -inf.

    The finite copy is the oracle: exp(-1e4 / T) is 0 in float32 and float64 for T < 500, so its
    softmax, entropy and gradients are the masked ones, where the published code (and so the
    reference) turns 0 * log 0 into NaN."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, num_classes, generator=gen, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(0, num_classes, (rows,), generator=gen)
    mask = torch.rand(rows, num_classes, generator=gen) < 0.4
    mask[torch.arange(rows), targets] = False  # a target is never masked
    mask[0] = False  # one row with no masked class
    mask[1] = True
    mask[1, targets[1]] = False  # one row with only its target left
    masked = logits.masked_fill(mask, float("-inf"))
    return masked, targets, logits.masked_fill(mask, -1e4)


def check_golden_step(step, loss, stats, grad_logits, grad_tau, tol=1e-10):
    """One step of a published trajectory: loss, stats and both gradients within ``tol``."""
    assert float(loss.detach()) == pytest.approx(step["loss"], abs=tol)
    for key in ("ce", "H", "H_star", "lambda", "T"):
        assert float(stats[key]) == pytest.approx(step[key], abs=tol), key
    assert float(grad_tau) == pytest.approx(step["grad_tau"], abs=tol)
    if "grad_logits" in step:
        expected = torch.tensor(step["grad_logits"], dtype=torch.float64)
        torch.testing.assert_close(grad_logits, expected, atol=tol, rtol=0)


def cpu_backends():
    """Every backend that runs on CPU tensors here: the reference, the C++ kernels when built,
    Triton only under TRITON_INTERPRET=1."""
    from mitkernels import _backends

    return ["reference"] + [b for b in ("cpu", "triton")
                            if _backends.unavailable_reason(b, torch.device("cpu")) is None]


def cuda_backends():
    from mitkernels import _backends

    if not torch.cuda.is_available():
        return []
    return [b for b in ("triton", "cuda")
            if _backends.unavailable_reason(b, torch.device("cuda")) is None]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def gpu_test(condition: bool, reason: str):
    """A GPU test: marked ``gpu`` (``pytest -m gpu``, what ``make gpu-check`` runs) and skipped
    unless ``condition`` holds."""
    def mark(fn):
        return pytest.mark.gpu(pytest.mark.skipif(not condition, reason=reason)(fn))

    return mark
