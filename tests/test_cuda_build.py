"""The CUDA backend: every .cu compiles for sm_80 and sm_90 (wherever nvcc is), and, on a GPU,
the CUDA ops against mitkernels/reference.py."""
import glob
import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from mitkernels import _backends, reference
from mitkernels.state import initial_buffers

from conftest import gpu_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


def _nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def test_there_are_cuda_sources():
    assert CU_FILES, "no .cu file under csrc/"


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cu_compiles(path, arch, tmp_path):
    cmd = [NVCC, "-c", path, "-o", str(tmp_path / "out.o"), "-O3", "-std=c++17",
           "--expt-relaxed-constexpr", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-Xptxas=-v", "-Werror=all-warnings", "-I", os.path.join(ROOT, "csrc")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    # The per-element kernels (one read / one write of the logits) must not spill; the one-block
    # bookkeeping kernels may keep a slow-path call frame.
    current, checked = None, 0
    for line in out.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and current and re.search(r"(row_stats|grad)(_thread)?_kernel", current):
            assert int(m.group(1)) == 0, f"{current} spills: {line}"
            checked += 1
    # the four dtypes of the warp and thread kernels of both passes (ptxas' report still parsed)
    assert checked >= 16, out[-3000:]


# ----------------------------------------------------------------------------------------------
# On a GPU: the CUDA ops against the reference.
# ----------------------------------------------------------------------------------------------
has_cuda_ops = torch.cuda.is_available() and \
    _backends.unavailable_reason("cuda", torch.device("cuda")) is None
needs_cuda_ops = gpu_test(has_cuda_ops, "needs a GPU and the CUDA kernels")
MIT_TEMP = (reference.MIT_T_EPS, reference.MIT_T_MIN, reference.MIT_T_MAX)


def _step(logits, targets, tau, state, kind=0, hparams=(), temp=MIT_TEMP, reduction=1,
          grad_loss=None):
    ops = torch.ops.mitkernels_C
    x3 = logits.reshape(logits.shape[0], logits.shape[1], -1)
    y = targets.reshape(-1).contiguous()
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss, stats, rs, gi = ops.loss_forward_(x3, y, tau, state, kind, list(hparams), *temp, -100,
                                            reduction, True, loss_dtype)
    g = torch.ones_like(loss) if grad_loss is None else grad_loss
    grad, grad_tau = ops.loss_backward(g, x3, y, tau, rs, gi, *temp, -100, reduction, True)
    return loss, stats, rs, grad.reshape(logits.shape), grad_tau


@needs_cuda_ops
@pytest.mark.parametrize("case_index", range(4))
def test_golden_trajectory_on_gpu(golden_trajectory, case_index):
    case = golden_trajectory["cases"][case_index]
    state = list(initial_buffers(case["num_classes"], device="cuda").values())
    tau = torch.tensor([case["tau0"]], dtype=torch.float64, device="cuda")
    for step in case["steps"]:
        logits = torch.tensor(step["logits"], dtype=torch.float64, device="cuda")
        targets = torch.tensor(step["targets"], device="cuda")
        loss, stats, _, grad, grad_tau = _step(logits, targets, tau, state)
        assert float(loss) == pytest.approx(step["loss"], abs=1e-10)
        for i, key in ((1, "ce"), (2, "H"), (3, "H_star"), (4, "lambda"), (5, "T")):
            assert float(stats[i]) == pytest.approx(step[key], abs=1e-10), key
        assert float(grad_tau) == pytest.approx(step["grad_tau"], abs=1e-10)
        if "grad_logits" in step:
            torch.testing.assert_close(grad.cpu(), torch.tensor(step["grad_logits"],
                                                                dtype=torch.float64),
                                       atol=1e-10, rtol=0)


@needs_cuda_ops
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (5, 1000), (3, 4099), (2, 5, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_mit_against_reference_on_gpu(shape, dtype, reduction):
    g = torch.Generator().manual_seed(sum(shape))
    c = shape[1]
    logits = (torch.randn(*shape, generator=g) * 2).to(dtype)
    targets = torch.randint(0, c, (shape[0],) + shape[2:], generator=g)
    if targets.numel() > 2:
        targets.view(-1)[1] = -100
    tau = torch.tensor([0.3], dtype=torch.float64)
    state = list(initial_buffers(c).values())
    weight = torch.linspace(0.5, 1.5, targets.numel(), dtype=torch.float64)
    loss, stats, _, grad, grad_tau = _step(
        logits.cuda(), targets.cuda(), tau.cuda(), [s.cuda() for s in state], reduction=reduction,
        grad_loss=(weight.cuda().to(torch.float64 if dtype == torch.float64 else torch.float32)
                   if reduction == 0 else None))
    x = logits.double().requires_grad_(True)
    t = tau.clone().requires_grad_(True)
    ref_state = list(initial_buffers(c).values())
    rl, rstats = reference.mit_step(x, targets, t, *ref_state,
                                    reduction={0: "none", 1: "mean", 2: "sum"}[reduction])
    rl.backward(weight.reshape(rl.shape) if reduction == 0 else None)
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 3e-2)
    torch.testing.assert_close(loss.double().cpu().reshape(-1), rl.detach().reshape(-1),
                               atol=tol, rtol=tol)
    for i, key in ((1, "ce"), (2, "H"), (3, "H_star"), (4, "lambda")):
        assert float(stats[i]) == pytest.approx(float(rstats[key]), abs=tol, rel=tol), key
    torch.testing.assert_close(grad.double().cpu(), x.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(grad_tau.cpu().reshape(()), t.grad.reshape(()), atol=tol * 10,
                               rtol=tol * 10)


@needs_cuda_ops
def test_cct_eal_on_gpu():
    g = torch.Generator().manual_seed(5)
    c = 6
    logits = torch.randn(40, c, dtype=torch.float64, generator=g)
    targets = torch.randint(0, c, (40,), generator=g)
    tau_c = torch.linspace(-0.5, 1.0, c, dtype=torch.float64)
    ema = torch.full((c,), 1.0 / c, dtype=torch.float64)
    alpha = torch.tensor(0.5, dtype=torch.float64)
    state = [ema.cuda(), alpha.cuda()]
    loss, stats, _, grad, grad_tau = _step(logits.cuda(), targets.cuda(), tau_c.cuda(), state,
                                           kind=2, hparams=(0.9, 1e-12), temp=(0.0, 0.75, 1.5))
    x = logits.clone().requires_grad_(True)
    t = tau_c.clone().requires_grad_(True)
    rl, rstats = reference.cct_eal_step(x, targets, t, ema, alpha)
    rl.backward()
    assert float(loss) == pytest.approx(float(rl), abs=1e-10)
    assert float(stats[3]) == pytest.approx(float(rstats["H_star"]), abs=1e-10)
    torch.testing.assert_close(grad.cpu(), x.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad_tau.cpu(), t.grad, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state[0].cpu(), ema, atol=1e-12, rtol=0)


@needs_cuda_ops
def test_gpu_bitwise_deterministic_and_invalid_targets():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(5000, 37, generator=g).cuda()
    targets = torch.randint(0, 37, (5000,), generator=g).cuda()
    tau = torch.tensor([0.2], device="cuda")
    runs = []
    for _ in range(3):
        state = [s.cuda() for s in initial_buffers(37).values()]
        runs.append(_step(logits, targets, tau, state))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
    bad = targets.clone()
    bad[3] = 2**40
    bad[4] = -5
    state = [s.cuda() for s in initial_buffers(37).values()]
    loss, stats, *_ = _step(logits, bad, tau, state)
    assert math.isnan(float(loss)) and float(stats[8]) == 2.0 and float(stats[6]) == 0.0
