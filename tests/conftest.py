"""Shared fixtures: golden data and the backends this machine can run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

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


@st.composite
def mit_cases(draw, max_rows=40, max_classes=70):
    """A random MiT step as users make them: [N, C] or [N, C, d] float64 logits of any scale, with
    ignored rows, masked (-inf) classes and a temperature anywhere in its range; returns
    (logits, targets, finite oracle logits, reduction, tau0). The oracle's -1e9 stays a zero
    probability up to T = 500 (masked_class_logits' -1e4 needs T near 1)."""
    rows = draw(st.integers(1, max_rows))
    num_classes = draw(st.integers(2, max_classes))
    spatial = draw(st.sampled_from([(), (3,)]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 300.0]))
    logits = torch.randn(rows, num_classes, *spatial, generator=gen, dtype=torch.float64) * scale
    targets = torch.randint(0, num_classes, (rows, *spatial), generator=gen)
    targets[torch.rand(targets.shape, generator=gen) < draw(st.sampled_from([0.0, 0.3]))] = -100
    mask = torch.rand(logits.shape, generator=gen) < draw(st.sampled_from([0.0, 0.2, 0.9]))
    # Never mask a target: its logit -inf makes CE inf, a case of its own.
    safe = targets.clamp(min=0).unsqueeze(1)
    mask.scatter_(1, safe, torch.zeros_like(safe, dtype=torch.bool))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    tau0 = draw(st.sampled_from([-8.0, 0.3, 2.0, 600.0]))  # T at its 1e-3 floor .. 500 cap
    return (logits.masked_fill(mask, float("-inf")), targets, logits.masked_fill(mask, -1e9),
            reduction, tau0)


def views_past_32_bits(dtype, generator, device="cpu"):
    """Logits whose elements lie 2^31 and 2^32 elements apart and more: strided views into one
    storage of 2^32 + 4096 elements, of which only the viewed elements are written. On the CPU
    the storage's pages are never touched elsewhere, so it costs those elements' pages, not its
    8 or 16 GB; on a GPU it is allocated whole. Yields (name, view):
    - 32 rows 2^27 + 1 apart (the lanes take them, gathered; W = 16 puts the second group's
      first row past 2^31);
    - rows of 1000 classes 2^31 + 7 apart (the row kernels);
    - NCHW logits whose class planes lie 2^31 + 1 apart (the spatial lanes, and the row kernels
      at an odd S), and whose samples do.
    Skips where the storage cannot be had (a CPU without the address space to reserve)."""
    try:
        storage = torch.empty(2**32 + 4096, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as err:  # torch's out-of-memory errors are RuntimeErrors
        pytest.skip(f"cannot allocate a storage of 2^32 {dtype} elements here: {err}")
    cases = [("rows_lanes", (32, 5), (2**27 + 1, 1)),
             ("rows_wide", (3, 1000), (2**31 + 7, 1)),
             ("nchw_lanes", (2, 3, 40), (40, 2**31 + 1, 1)),
             ("nchw_odd", (1, 3, 7), (7, 2**31 + 1, 1)),
             ("nchw_samples", (2, 3, 40), (2**31 + 5, 40, 1))]
    for name, size, stride in cases:
        view = storage.as_strided(size, stride)
        # the last element lies past 2^31: a 32-bit offset would wrap
        assert sum((n - 1) * st for n, st in zip(size, stride)) >= 2**31
        view.copy_((torch.randn(size, generator=generator) * 3).to(dtype))
        yield name, view


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


def jit_mit_loss_module():
    """``mitkernels/triton/mit_loss.py`` loaded again with real ``@triton.jit`` kernels, even when
    this process runs the interpreter: what AOT compilation reads."""
    import importlib.util

    from triton import knobs

    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        spec = importlib.util.spec_from_file_location(
            "_mitkernels_triton_aot", ROOT / "mitkernels" / "triton" / "mit_loss.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return module
