"""The Triton backend against the eager reference (``mitkernels/reference.py``) and golden data.

CPU: the kernels run under ``TRITON_INTERPRET=1``. Triton reads that variable when a kernel is
decorated (at import), so when this process did not start with it set, ``test_interpreter_suite``
runs this module again in a subprocess that has it, and the CPU tests here skip. Run them directly
with ``TRITON_INTERPRET=1 pytest tests/test_triton.py``. CUDA tests skip without a GPU.
"""
import gc
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import mitkernels  # noqa: E402
from mitkernels import ops, reference  # noqa: E402
from mitkernels.triton.mit_loss import _to_dtype  # noqa: E402
from conftest import (ROOT, check_golden_step, cuda_backends, gpu_test,  # noqa: E402
                      masked_class_logits, views_past_32_bits)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cpu_only = pytest.mark.skipif(
    not INTERPRET, reason="runs under TRITON_INTERPRET=1 in test_interpreter_suite's subprocess")
gpu_only = gpu_test(not INTERPRET and torch.cuda.is_available(),
                    "needs a CUDA device (and no interpreter)")


def _kernels():
    from mitkernels.triton import mit_loss

    return mit_loss


@pytest.mark.parametrize("suite", [
    [__file__],  # this module's CPU tests
    # every public-function test parametrized by backend (golden trajectories, bad input,
    # layouts, TET, CCT-EAL, masked classes, random steps) with the triton backend
    [str(Path(__file__).with_name("test_functional.py")), "-k", "triton"],
    # launch plans recorded from the launchers and replayed into the C++ logging launcher
    [str(Path(__file__).with_name("test_launch_plans.py"))],
    # the public ops routed to Triton: opcheck, bad input refused as the C++ ops refuse it
    [str(Path(__file__).with_name("test_ops.py")), "-k", "triton"],
], ids=["test_triton", "test_functional", "test_launch_plans", "test_ops"])
def test_interpreter_suite(suite):
    """CPU tests of the Triton backend, in a process that starts with TRITON_INTERPRET=1."""
    if INTERPRET:
        pytest.skip("already running under the interpreter")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", *suite, "-q", "-x", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    tail = (out.stdout + out.stderr)[-6000:]
    assert out.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


# ------------------------------------------------------------------------------------------
# Helpers: one step on a backend, everything that comes out of it.
# ------------------------------------------------------------------------------------------
def _mit_state(num_classes, tau0, tau_dtype, device="cpu"):
    state = mitkernels.MiTState(num_classes, dtype=tau_dtype, device=device)
    with torch.no_grad():
        state.tau.fill_(tau0)
    return state


def _mit_step(backend, logits, targets, state, reduction="mean", ignore_index=-100):
    # A leaf with the logits' own strides, gaps included (clone() makes a view with gaps
    # contiguous, and the kernels' strided gradient store went untested)
    x = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype,
                            device=logits.device).copy_(logits.detach()).requires_grad_(True)
    state.tau.grad = None
    loss, stats = mitkernels.mit_loss(x, targets, state, backend=backend, reduction=reduction,
                                      ignore_index=ignore_index)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64, device=loss.device)
    (loss.double() * weight.reshape(loss.shape)).sum().backward()
    return dict(loss=loss.detach(), grad=x.grad, grad_tau=state.tau.grad.clone(),
                **{f"stat_{k}": v for k, v in stats.items()},
                **{f"state_{k}": v.clone() for k, v in state.buffers().items()})


def _tolerance(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)


def _assert_outputs_close(got, want, dtype, skip=()):
    tol = _tolerance(dtype)
    for key, expected in want.items():
        if key in skip or key not in got:
            continue
        actual = got[key]
        scale = float(expected.double().abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual.double(), expected.double().to(actual.device),
                                   atol=tol["atol"] * max(1.0, scale), rtol=tol["rtol"],
                                   equal_nan=True, msg=lambda m: f"{key}: {m}")


def _compare_mit(logits, targets, tau0=0.3, reduction="mean", ignore_index=-100, steps=1,
                 backend="triton", reference_logits=None):
    """``steps`` steps on ``backend`` against the reference (run on ``reference_logits`` when
    given), from equal states."""
    dtype = logits.dtype
    ref_logits = logits if reference_logits is None else reference_logits
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    num_classes = logits.shape[1]
    ref_state = _mit_state(num_classes, tau0, tau_dtype)
    state = _mit_state(num_classes, tau0, tau_dtype, device=logits.device)
    for _ in range(steps):
        want = _mit_step("reference", ref_logits.cpu(), targets.cpu(), ref_state, reduction,
                         ignore_index)
        got = _mit_step(backend, logits, targets, state, reduction, ignore_index)
        _assert_outputs_close(got, want, dtype)


# ------------------------------------------------------------------------------------------
# CPU (interpreter)
# ------------------------------------------------------------------------------------------
@cpu_only
@pytest.mark.parametrize("case_index", range(4))
def test_golden_trajectory(golden_trajectory, case_index):
    case = golden_trajectory["cases"][case_index]
    state = _mit_state(case["num_classes"], case["tau0"], torch.float64)
    for step in case["steps"]:
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        state.tau.grad = None
        loss, stats = mitkernels.mit_loss(logits, torch.tensor(step["targets"]), state,
                                          backend="triton")
        loss.backward()
        check_golden_step(step, loss, stats, logits.grad, state.tau.grad)


# (C, N): fused one-program path, single-launch multi-program path, wide rows (C > 1024: rows
# kernel + MiT's finalize spread over programs), per-thread wide rows (C > 8192).
SHAPES = [(2, 37), (3, 3000), (1000, 6), (1000, 20), (4099, 3), (9000, 3)]


@cpu_only
@pytest.mark.parametrize("dtype,reduction", [(torch.float64, "mean"), (torch.float64, "sum"),
                                             (torch.float64, "none"), (torch.float32, "mean")],
                         ids=["fp64-mean", "fp64-sum", "fp64-none", "fp32-mean"])
@pytest.mark.parametrize("num_classes,rows", SHAPES, ids=[f"C{c}xN{n}" for c, n in SHAPES])
def test_mit_against_reference(num_classes, rows, dtype, reduction):
    gen = torch.Generator().manual_seed(num_classes * 7 + rows)
    logits = (torch.randn(rows, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, num_classes, (rows,), generator=gen)
    targets[::5] = -100
    _compare_mit(logits, targets, reduction=reduction, steps=2)


@cpu_only
def test_layouts_one_row_strided_spatial():
    gen = torch.Generator().manual_seed(3)
    spatial = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3, 4), generator=gen)
    targets[0, 1, 2] = -100
    _compare_mit(spatial, targets)
    _compare_mit(spatial, targets, reduction="none")
    channels_last = spatial.contiguous(memory_format=torch.channels_last)
    _compare_mit(channels_last, targets)
    _compare_mit(torch.randn(1, 9, generator=gen, dtype=torch.float64), torch.tensor([4]))
    strided = torch.randn(6, 22, generator=gen, dtype=torch.float64)[:, ::2]
    _compare_mit(strided, torch.randint(0, 11, (6,), generator=gen))
    transposed = torch.randn(7, 40, generator=gen, dtype=torch.float64).t()
    _compare_mit(transposed, torch.randint(0, 7, (40,), generator=gen))
    _compare_mit(spatial.float(), targets, reduction="sum")


@cpu_only
@pytest.mark.parametrize("shape,dtype,forward_spatial", [
    ((2, 5, 23, 29), torch.float32, True), ((3, 2, 40, 40), torch.float32, True),
    ((3, 4, 32, 32), torch.float32, True), ((3, 5, 10, 20), torch.float32, False),
    ((2, 3, 25, 44), torch.bfloat16, True), ((2, 8, 16, 80), torch.float16, True),
    ((2, 16, 23, 29), torch.float32, True), ((2, 11, 20, 40), torch.float32, True),
    ((2, 16, 20, 40), torch.bfloat16, False), ((2, 13, 16, 80), torch.float16, False)],
    ids=["fp32-C5", "fp32-C2", "fp32-whole", "fp32-bwd-only", "bf16-C3", "fp16-C8", "fp32-C16",
         "fp32-C11", "bf16-C16-bwd", "fp16-C13-bwd"])
def test_spatial_tiles(shape, dtype, forward_spatial):
    """NCHW logits of a few classes take the SPATIAL tiles (tiles of one sample's neighbouring
    pixels, the forward's 512 / 1024 pixels and the backward's 256) where a sample fills half a
    tile: pixel counts that end each sample in a partial tile (667, 1600, 1100, 800 for the
    forward; those and 200 for the backward) or fill it (1024 in float32, 1280 for the fp16
    backward), ignored pixels, every target class, samples after the first (whose rows start at
    n S); at 200 pixels only the backward takes them. Up to 16 classes in float32 (both
    passes) and in the 16-bit backward (the 16-bit forward keeps the row tiles past 8). MiT in
    each reduction, TET, and the per-class backward of CCT-EAL (its forward takes the row
    tiles)."""
    kernels = _kernels()
    n, c = shape[:2]
    gen = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    targets = torch.randint(0, c, (n, *shape[2:]), generator=gen)
    targets[:, ::7, ::3] = -100
    view = logits.reshape(n, c, -1)
    assert (kernels.spatial_config(view) is not None) == forward_spatial
    assert kernels.spatial_config(view, backward=True) is not None
    # too large for the one-program forward, which takes the row tiles
    fused = kernels._fits_one_program(kernels.row_config(c, dtype), view.shape[0] * view.shape[2])
    assert not (fused and forward_spatial)
    if c <= 8:
        assert fused != forward_spatial
    if dtype.itemsize == 2:
        _assert_half_within_eager_error(logits, targets)
        return
    for reduction in ("mean", "none"):
        _compare_mit(logits, targets, reduction=reduction, steps=2)
    got = mitkernels.tet_loss(logits.clone().requires_grad_(True), targets, backend="triton")
    want = reference.tet_loss(logits.double(), targets)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    outs = []
    for backend in ("reference", "triton"):
        x = logits.clone().requires_grad_(True)
        tau_c = torch.linspace(-0.3, 0.4, c).requires_grad_(True)
        ema = torch.full((c,), 1.0 / c, dtype=torch.float64)
        alpha = torch.tensor(0.3, dtype=torch.float64)
        if backend == "reference":
            loss, _ = reference.cct_eal_step(x, targets, tau_c, ema, alpha)
        else:
            loss, _ = mitkernels.cct_eal_loss(x, targets, tau_c, ema, alpha, backend="triton")
        loss.backward()
        outs.append(dict(loss=loss.detach(), grad=x.grad, grad_tau=tau_c.grad, ema=ema))
    _assert_outputs_close(outs[1], outs[0], dtype)


def _check_offsets_past_32_bits(backend, dtype, device):
    """Each of conftest.views_past_32_bits' views (elements 2^31 and 2^32 apart: rows, class
    planes, samples) through ``mit_loss`` and its backward, the logits read in place, against
    the reference on a dense float64 copy of the same values: a 32-bit offset anywhere would
    read another element (or fault)."""
    g = torch.Generator().manual_seed(11)
    for name, view in views_past_32_bits(dtype, g, device):
        c = view.shape[1]
        targets = torch.randint(0, c, (view.shape[0],) + tuple(view.shape[2:]), generator=g)
        targets.view(-1)[-1] = -100
        x = view.requires_grad_(True)
        state = _mit_state(c, 0.3, torch.float32, device=device)
        loss, stats = mitkernels.mit_loss(x, targets.to(device), state, backend=backend)
        loss.backward()
        ref_x = view.detach().cpu().double().requires_grad_(True)
        ref_state = _mit_state(c, 0.3, torch.float64)
        ref_loss, _ = mitkernels.mit_loss(ref_x, targets, ref_state, backend="reference")
        ref_loss.backward()
        # loss and gradient are stored in the logits' dtype (bf16: to 2^-9 of themselves): the
        # bounds are 2^-7 of the loss and of the largest gradient (a wrong read moves a row's
        # gradient by its own size)
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        assert float(loss) == pytest.approx(float(ref_loss), rel=tol), name
        assert float(state.tau.grad) == pytest.approx(float(ref_state.tau.grad), rel=1e-4), name
        grad_tol = 1e-5 if dtype == torch.float32 else 2**-7 * float(ref_x.grad.abs().max())
        torch.testing.assert_close(x.grad.cpu().double(), ref_x.grad, atol=grad_tol, rtol=tol,
                                   msg=lambda m: f"{name}: {m}")
        del x, view


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_offsets_past_32_bits(dtype):
    """Under the interpreter the kernels read the CPU storage in place: only the viewed pages
    are touched."""
    _check_offsets_past_32_bits("triton", dtype, "cpu")


def test_the_row_limit_leaves_room_for_32_bit_row_arithmetic():
    """Past the last row the kernels compute in 32 bits a tile count (R + BLOCK_R - 1) and loop
    counters one block or one grid of programs beyond it: the row limit keeps those below 2^31
    (at 2^31 - 100 rows the tile count went negative, no row was read, and the spatial backward
    wrote before its buffer). Programs: at most 16 an SM on up to 1024 SMs."""
    kernels = _kernels()
    steps = [ce[k] for _, _, ce, _ in kernels.launch_variants() for k in ce
             if k.startswith("BLOCK_") and isinstance(ce[k], int)]
    most_programs = 16 * 1024
    assert kernels.MAX_ROWS + max(steps) + most_programs < 2**31, (max(steps), kernels.MAX_ROWS)


def test_rows_beyond_32_bits_are_refused():
    """2^31 rows (N x d1 x ..): the kernels index rows with 32 bits, so every launcher refuses
    them with a clear error before it allocates or launches anything (expanded tensors: no
    memory)."""
    kernels = _kernels()
    rows = kernels.MAX_ROWS + 1
    x3 = torch.zeros(1, 2, 1).expand(rows, 2, 1)
    targets = torch.zeros(1, dtype=torch.int64).expand(rows)
    tau = torch.zeros(1)
    state = _mit_buffers(2)
    before = [t.clone() for t in state]
    temp = (1e-6, 1e-3, 500.0)
    msg = f"the Triton kernels take at most {kernels.MAX_ROWS} rows"
    with pytest.raises(ValueError, match=msg):
        kernels.loss_forward_(x3, targets, tau, state, ops.KIND_MIT, [], *temp, -100, 1, True,
                              torch.float32)
    with pytest.raises(ValueError, match=msg):
        kernels.row_stats(x3, targets, tau, *temp, -100)
    with pytest.raises(ValueError, match=msg):
        kernels.loss_backward(torch.ones(()), x3, targets, tau, torch.zeros(5, 1),
                              torch.zeros(3), *temp, -100, 1, True)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    # a pixel-major view of as many rows: the same
    with pytest.raises(ValueError, match=msg):
        kernels.loss_backward(torch.ones(()), torch.zeros(1, 2, 1).expand(2, 2, rows // 2 + 1),
                              targets[:1].expand(2 * (rows // 2 + 1)), tau, torch.zeros(5, 1),
                              torch.zeros(3), *temp, -100, 1, True)


def test_classes_beyond_32_bits_are_refused():
    """The column loops count in 32 bits (c0 + BLOCK_C wraps negative near 2^31 and still
    passes cols < C): more classes than the row limit are refused before anything runs."""
    kernels = _kernels()
    classes = kernels.MAX_ROWS + 1
    x3 = torch.zeros(1, 1, 1).expand(1, classes, 1)
    msg = f"the Triton kernels take at most {kernels.MAX_ROWS} classes"
    with pytest.raises(ValueError, match=msg):
        kernels.row_stats(x3, torch.zeros(1, dtype=torch.int64), torch.zeros(1), 1e-6, 1e-3,
                          500.0, -100)


@cpu_only
@pytest.mark.parametrize("rows", [10, 5000], ids=["fused", "rows"])
def test_integer_state_scalars_and_loss_dtype_as_the_cpu_op(rows):
    """The op takes int32/int64 state scalars: an int32 dual_updates counts (the int64 cap
    failed to compile against it), an int32 total_seen past 2^31 and a dual_updates at int64's
    max hold their largest values (saturating_cast, as the C++ kernels), and a loss dtype the op
    cannot store is refused before the state moves."""
    kernels = _kernels()
    x = torch.randn(rows, 3, 1)
    y = torch.randint(0, 3, (rows,))
    temp = (1e-6, 1e-3, 500.0)
    for total, count, want_total, want_count in (
            (torch.tensor(5.0, dtype=torch.float64), torch.tensor(5, dtype=torch.int32),
             5.0 + rows, 6),
            (torch.tensor(2**31 - 2, dtype=torch.int32), torch.tensor(2**63 - 1),
             2**31 - 1, 2**63 - 1),
            # an int32 count at its max (it wrapped to -2^31 without the cap)
            (torch.tensor(5.0, dtype=torch.float64), torch.tensor(2**31 - 1, dtype=torch.int32),
             5.0 + rows, 2**31 - 1)):
        state = _mit_buffers(3)
        state[1], state[3] = total, count
        kernels.loss_forward_(x, y, torch.zeros(1), state, ops.KIND_MIT, [], *temp, -100, 1, True,
                              torch.float32)
        assert float(state[1]) == want_total and int(state[3]) == want_count
    state = _mit_buffers(3)
    before = [s.clone() for s in state]
    with pytest.raises(RuntimeError, match="loss_dtype must be float16, bfloat16, float32"):
        kernels.loss_forward_(x, y, torch.zeros(1), state, ops.KIND_MIT, [], *temp, -100, 1, True,
                              torch.float8_e4m3fn)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


@triton.jit
def _store_as_bfloat16(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < n
    tl.store(out_ptr + i, _to_dtype(tl.load(x_ptr + i, mask=m), tl.bfloat16), mask=m)


@cpu_only
def test_bfloat16_outputs_round_to_nearest_even_as_torch_does():
    # The interpreter truncates float32 -> bfloat16, so _to_dtype rounds by hand there: ties go
    # to the even neighbour (1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6), as torch's .to() does.
    ties = 1 + torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=torch.float64) * 2**-8
    x = torch.cat([ties, -ties, torch.randn(200, dtype=torch.float64) * 100,
                   torch.tensor([65504.0, 3.0e38, 1e-40])]).float()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _store_as_bfloat16[(1,)](x, out, x.numel(), BLOCK=256)
    assert torch.equal(out.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


@cpu_only
def test_spatial_empty_batch():
    """No sample (N = 0) of NCHW logits: the row tiles, whose mask (rows < R = 0) covers every
    row; a SPATIAL tile would have masked only the pixels beyond S and read the empty tensors."""
    x = torch.randn(0, 5, 40, 40, requires_grad=True)
    targets = torch.randint(0, 5, (0, 40, 40))
    assert _kernels().spatial_config(x.detach().reshape(0, 5, 1600), backward=True) is None
    loss, stats = mitkernels.mit_loss(x, targets, _mit_state(5, 0.3, torch.float32),
                                      backend="triton")
    loss.backward()
    assert float(loss) == 0.0 and x.grad.shape == x.shape


@cpu_only
# 4099: row-block form; 9000: per-thread, one block (fp32) or several (fp64); 17000: per-thread,
# two blocks in fp32.
@pytest.mark.parametrize("num_classes", [4099, 9000, 17000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_wide_rows_with_masked_spans(num_classes, dtype):
    """Spans of a huge negative logit (masked classes) as long as a column block: accumulators
    that move from such a maximum to a real one scale by 2^-huge = 0 and must not turn d^2 = inf
    into NaN (d^2 overflows from 1e30 in float32, from 1e200 in float64)."""
    gen = torch.Generator().manual_seed(num_classes)
    masked = -1e30 if dtype == torch.float32 else -1e200
    logits = torch.randn(4, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.tensor([num_classes - 1, 3, 0, 7])
    logits[0, : num_classes - 500] = masked
    logits[1, 100:] = masked
    logits[1, 3] = 2.0
    logits[2, 1::2] = masked
    _compare_mit(logits, targets, steps=2)


@cpu_only
# 5: fused small batch; 4099: row-block form; 17000: per-thread, two blocks in fp32.
@pytest.mark.parametrize("num_classes,rows", [(5, 9), (4099, 3), (17000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_masked_classes(num_classes, rows, dtype):
    """-inf logits (masked classes): forward and backward match the reference on the finite
    oracle (conftest.masked_class_logits); the backward once gave 0 * -inf = NaN there."""
    logits, targets, finite = masked_class_logits(rows, num_classes, dtype, seed=num_classes)
    _compare_mit(logits, targets, steps=2, reference_logits=finite)


@cpu_only
@pytest.mark.parametrize("update_state", [False, True])
@pytest.mark.parametrize("per_class", [False, True], ids=["K1", "KC"])
def test_mit_finalize_beyond_one_program(update_state, per_class):
    """The MiT finalize spread over programs (with K = 1 it reads the rows kernel's partials,
    with K = C, beyond FINALIZE_BLOCK classes, the summary): loss, gradients (logits and every
    tau_k) against autograd of the eager formula with the coefficient the kernels used (lambda,
    whether updated; that lambda and the state against the reference: test_mit_against_reference
    at C = 4099 and 9000)."""
    kernels = _kernels()
    c, n = kernels.FINALIZE_BLOCK + 3, 6
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, c, (n,), generator=gen)
    tau = torch.linspace(-0.2, 0.9, c if per_class else 1, dtype=torch.float64)
    state = _mit_buffers(c)
    state[2].fill_(0.25)
    x3 = logits[:, :, None]
    loss, stats, rs, gi = kernels.loss_forward_(x3, targets, tau, state, ops.KIND_MIT, [], 1e-6,
                                                1e-3, 500.0, -100, 1, update_state,
                                                torch.float64)
    grad, grad_tau = kernels.loss_backward(torch.ones((), dtype=torch.float64), x3, targets, tau,
                                           rs, gi, 1e-6, 1e-3, 500.0, -100, 1, True)
    coef = float(stats[ops.STATS_FIELDS.index("coef")])
    assert (coef != 0.25) == update_state  # the lambda update ran exactly when asked
    # MiT reports T_0 whatever K (the hist-weighted mean is CCT-EAL's), as the CPU kernels do
    assert float(stats[ops.STATS_FIELDS.index("T")]) == pytest.approx(
        float(reference.temperature(tau[:1])), rel=1e-12)
    x = logits.clone().requires_grad_(True)
    t = tau.clone().requires_grad_(True)
    temps = reference.temperature(t)[targets if per_class else torch.zeros_like(targets)]
    logp = torch.log_softmax(x / temps[:, None], 1)
    want = -logp.gather(1, targets[:, None]).mean() - coef * (-(logp.exp() * logp).sum(1).mean())
    want.backward()
    torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad[:, :, 0], x.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_tau, t.grad, rtol=1e-10, atol=1e-12)


@cpu_only
def test_ignored_rows_and_temperature_edges():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(12, 6, generator=gen, dtype=torch.float64) * 4
    targets = torch.randint(0, 6, (12,), generator=gen)
    targets[[0, 5, 11]] = 7  # ignore_index = 7 (> C): ignored, not invalid
    _compare_mit(logits, targets, ignore_index=7, steps=2)
    for tau0 in (-12.0, 25.0, 400.0):  # clamp at t_min (dT = 0), softplus threshold, clamp at t_max
        _compare_mit(logits, targets, tau0=tau0, ignore_index=7)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("num_classes,rows", [(7, 64), (1500, 4)])
def test_half_inputs_within_eager_error(dtype, num_classes, rows):
    """Against the float64 reference on the same (rounded) values, the kernels err no more than
    eager PyTorch run on the half-precision tensor."""
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(rows, num_classes, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, num_classes, (rows,), generator=gen)
    _assert_half_within_eager_error(logits, targets)


def _assert_half_within_eager_error(logits, targets):
    dtype, num_classes = logits.dtype, logits.shape[1]
    exact = _mit_step("reference", logits.double(), targets, _mit_state(num_classes, 0.3,
                                                                          torch.float64))
    eager = _mit_step("reference", logits, targets, _mit_state(num_classes, 0.3, torch.float32))
    got = _mit_step("triton", logits, targets, _mit_state(num_classes, 0.3, torch.float32))
    assert got["grad"].dtype == dtype and got["loss"].dtype == dtype
    eps = torch.finfo(dtype).eps
    for key in ("grad", "grad_tau"):
        err_eager = float((eager[key].double() - exact[key]).abs().max())
        err = float((got[key].double() - exact[key]).abs().max())
        assert err <= 2 * err_eager + 1e-6, (key, err, err_eager)
    # The loss is rounded once to the logits' dtype; the stats are float64 from float32 math.
    assert float(got["loss"]) == pytest.approx(float(exact["loss"]), rel=eps, abs=eps)
    for key in ("stat_ce", "stat_H", "stat_H_star", "stat_lambda", "stat_T"):
        assert float(got[key]) == pytest.approx(float(exact[key]), rel=1e-5, abs=1e-6), key


@cpu_only
@pytest.mark.parametrize("num_classes", [1100, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_per_thread_rows_on_small_tiles(monkeypatch, dtype, num_classes):
    """The per-thread form of wide rows (_lane_row_stats: whole blocks unmasked, then the masked
    partial block) in every logits dtype, on tiles small enough for the interpreter: every table's
    rows above 1024 classes replaced by one per-thread row of one warp and two 16-byte loads a
    thread, so that 1100 classes end in a partial block and 1536 fill whole blocks in each dtype.
    Rows: a masked span, an ignored row, targets in the first and the last block."""
    kernels = _kernels()
    per_thread = 16 // dtype.itemsize
    wide = (kernels.RowConfig(None, 2 * per_thread * 32, 1, 1, lanes=True),)
    for table in ("ROW_TABLE", "ROW_TABLE_16", "ROW_TABLE_FP64"):
        monkeypatch.setattr(kernels, table, getattr(kernels, table)[:-2] + wide)
    assert kernels.row_config(num_classes, dtype) == wide[0]
    gen = torch.Generator().manual_seed(num_classes)
    logits = (torch.randn(4, num_classes, generator=gen, dtype=torch.float64) * 3).to(dtype)
    targets = torch.tensor([num_classes - 1, 3, -100, 600])
    if dtype.itemsize == 2:  # against the float64 reference on the rounded values
        logits[1, 200:] = -1e4
        _assert_half_within_eager_error(logits, targets)
    else:
        logits[1, 100:] = -1e30 if dtype == torch.float32 else -1e200
        _compare_mit(logits, targets, steps=2)


@cpu_only
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tet_against_reference(reduction):
    gen = torch.Generator().manual_seed(6)
    for dtype in (torch.float64, torch.float32):
        logits = (torch.randn(9, 5, generator=gen, dtype=torch.float64) * 2).to(dtype)
        targets = torch.tensor([0, 1, 2, 3, -100, 1, 0, 4, 4])
        want, got = [], []
        for backend, out in (("reference", want), ("triton", got)):
            x = logits.clone().requires_grad_(True)
            fn = reference.tet_loss if backend == "reference" else mitkernels.tet_loss
            kwargs = {} if backend == "reference" else {"backend": "triton"}
            loss, stats = fn(x, targets, 0.7, 0.2, reduction=reduction, **kwargs)
            loss.sum().backward()
            out.append(dict(loss=loss.detach(), grad=x.grad, ce=stats["ce"], H=stats["H"],
                            T=stats["T"]))
        _assert_outputs_close(got[0], want[0], dtype)


@cpu_only
@pytest.mark.parametrize("num_classes,rows,reduction,dtype", [
    (5, 40, "mean", torch.float64), (5, 40, "sum", torch.float32),
    (5, 3000, "mean", torch.float32), (1500, 6, "sum", torch.float64)])
def test_cct_eal_against_reference(num_classes, rows, reduction, dtype):
    gen = torch.Generator().manual_seed(num_classes + rows)
    tau_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tau0 = torch.randn(num_classes, generator=gen, dtype=torch.float64).to(tau_dtype)
    states = {}
    for backend in ("reference", "triton"):
        states[backend] = (tau0.clone().requires_grad_(True),
                           torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64),
                           torch.tensor(0.3, dtype=torch.float64))
    for step in range(2):
        logits = (torch.randn(rows, num_classes, generator=gen, dtype=torch.float64) * 2).to(dtype)
        targets = torch.randint(0, num_classes, (rows,), generator=gen)
        targets[::7] = -100
        outs = {}
        for backend, (tau_c, ema, alpha) in states.items():
            x = logits.clone().requires_grad_(True)
            tau_c.grad = None
            if backend == "reference":
                loss, stats = reference.cct_eal_step(x, targets, tau_c, ema, alpha,
                                                     reduction=reduction)
            else:
                loss, stats = mitkernels.cct_eal_loss(x, targets, tau_c, ema, alpha,
                                                      reduction=reduction, backend="triton")
            loss.backward()
            outs[backend] = dict(loss=loss.detach(), grad=x.grad, grad_tau=tau_c.grad.clone(),
                                 ema=ema.clone(), **{k: stats[k] for k in
                                                     ("ce", "H", "H_star", "T_mean", "updated")})
        _assert_outputs_close(outs["triton"], outs["reference"], dtype)


def _forward_op(logits, targets, tau, state, kind=ops.KIND_MIT, hparams=(), reduction=1,
                update_state=True):
    return torch.ops.mitkernels.loss_forward_(
        logits.reshape(logits.shape[0], logits.shape[1], -1), targets, tau, state, kind,
        list(hparams), 1e-6, 1e-3, 500.0, -100, reduction, update_state, logits.dtype, "triton")


def _mit_buffers(num_classes):
    return [torch.ones(num_classes, dtype=torch.float64), torch.zeros((), dtype=torch.float64),
            torch.full((), 0.1, dtype=torch.float64), torch.zeros((), dtype=torch.int64)]


@cpu_only
@pytest.mark.parametrize("num_classes,rows", [(4, 10), (4, 5000), (3000, 3), (5000, 3)])
@pytest.mark.parametrize("per_class", [False, True])
def test_invalid_targets_are_counted_never_indexed(num_classes, rows, per_class):
    logits = torch.randn(rows, num_classes, dtype=torch.float64)
    targets = torch.randint(0, num_classes, (rows,))
    targets[0], targets[-1] = num_classes, -5  # out of range, not ignore_index
    targets[1] = -100
    tau = torch.zeros(num_classes if per_class else 1, dtype=torch.float64)
    state = _mit_buffers(num_classes)
    before = [t.clone() for t in state]
    loss, stats, row_stats, grad_info = _forward_op(logits, targets, tau, state)
    assert math.isnan(float(loss))
    assert stats[ops.STATS_FIELDS.index("invalid_targets")] == 2
    assert stats[ops.STATS_FIELDS.index("valid")] == rows - 3
    assert stats[ops.STATS_FIELDS.index("updated")] == 0
    for t, b in zip(state, before):
        assert torch.equal(t, b)
    assert torch.count_nonzero(row_stats[:, [0, 1, -1]]) == 0
    rs, summary = torch.ops.mitkernels.row_stats(logits[:, :, None], targets, tau, 1e-6, 1e-3,
                                                 500.0, -100, "triton")
    assert summary[4] == 2 and summary[0] == rows - 3
    none_loss = _forward_op(logits, targets, tau, state, reduction=0)[0]
    assert torch.isnan(none_loss).all()


@cpu_only
@pytest.mark.parametrize("num_classes,rows", [(3, 300), (4099, 4)])
@pytest.mark.parametrize("per_class", [False, True])
def test_row_stats_op(num_classes, rows, per_class):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(rows, num_classes, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, num_classes, (rows,), generator=gen)
    targets[::4] = -100
    tau = (torch.rand(num_classes if per_class else 1, generator=gen, dtype=torch.float64) - 0.5)
    rs, summary = torch.ops.mitkernels.row_stats(logits[:, :, None], targets, tau, 1e-6, 1e-3,
                                                 500.0, -100, "triton")
    valid = targets != -100
    safe = torch.where(valid, targets, 0)
    temps = reference.temperature(tau)[safe if per_class else torch.zeros_like(safe)]
    z = logits / temps[:, None]
    want = reference.row_statistics(z, safe, 1.0)
    m = logits.amax(dim=1)
    log_s = torch.logsumexp((logits - m[:, None]) / temps[:, None], dim=1)
    zero = torch.zeros(())
    ceh = want["CE"] - want["H"]
    assert ops.ROW_STATS_FIELDS == ("m", "H", "V", "CE_minus_H", "log_s") and rs.shape[0] == 5
    for i, w in enumerate((m, want["H"], want["V"], ceh, log_s)):
        torch.testing.assert_close(rs[i], torch.where(valid, w, zero.double()), atol=1e-10,
                                   rtol=1e-10)
    hist = torch.bincount(targets[valid], minlength=num_classes).double()
    torch.testing.assert_close(summary[5:5 + num_classes], hist)
    assert summary[0] == valid.sum() and summary[4] == 0
    for i, w in ((1, ceh), (2, want["H"]), (3, want["V"])):
        torch.testing.assert_close(summary[i], w[valid].sum(), atol=1e-9, rtol=1e-12)
    if per_class:
        ceh = torch.zeros(num_classes, dtype=torch.float64).index_add_(
            0, targets[valid], (want["CE"] - want["H"])[valid])
        var = torch.zeros(num_classes, dtype=torch.float64).index_add_(
            0, targets[valid], want["V"][valid])
        torch.testing.assert_close(summary[5 + num_classes:5 + 2 * num_classes], ceh)
        torch.testing.assert_close(summary[5 + 2 * num_classes:], var)


@cpu_only
@pytest.mark.parametrize("num_classes", [6, 4099], ids=["one-program", "spread"])
def test_finalize_reads_global_summary_and_local_loss(num_classes):
    """Two identical ranks: the global summary is twice the local one. The state moves as for the
    doubled batch, the loss is this rank's, and row_scale is 1 / local B (4099 classes: the
    finalize spread over programs)."""
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(50, num_classes, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, num_classes, (50,), generator=gen)
    tau = torch.full((1,), 0.2, dtype=torch.float64)
    rs, local = torch.ops.mitkernels.row_stats(logits[:, :, None], targets, tau, 1e-6, 1e-3, 500.0,
                                               -100, "triton")
    state = _mit_buffers(num_classes)
    loss, stats, grad_info = torch.ops.mitkernels.finalize_(
        2 * local, local, rs, tau, state, ops.KIND_MIT, [], 1e-6, 1e-3, 500.0, 1, True,
        torch.float64, "triton")
    ref_state = _mit_buffers(num_classes)
    ref_loss, ref_stats = reference.mit_step(torch.cat([logits, logits]), torch.cat([targets] * 2),
                                             tau, *ref_state)
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for got, want in zip(state, ref_state):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert float(grad_info[1]) == pytest.approx(1 / 50)


@cpu_only
def test_deterministic_bitwise():
    gen = torch.Generator().manual_seed(11)
    for num_classes, rows in ((3, 3000), (2000, 5)):
        logits = torch.randn(rows, num_classes, generator=gen)
        targets = torch.randint(0, num_classes, (rows,), generator=gen)
        runs = [_mit_step("triton", logits, targets, _mit_state(num_classes, 0.1, torch.float32))
                for _ in range(2)]
        for key in runs[0]:
            assert torch.equal(runs[0][key], runs[1][key]), key


def _count_launches(monkeypatch):
    counts = {}
    module = _kernels()
    for name, kernel in module.KERNELS.items():
        original = kernel.run

        def run(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return counts


@cpu_only
def test_a_step_is_one_forward_and_one_backward_launch(monkeypatch):
    counts = _count_launches(monkeypatch)
    state = _mit_state(7, 0.3, torch.float32)
    logits = torch.randn(1024, 7, requires_grad=True)
    loss, _ = mitkernels.mit_loss(logits, torch.randint(0, 7, (1024,)), state, backend="triton")
    assert counts == {"_fused_kernel": 1}
    loss.backward()
    assert counts == {"_fused_kernel": 1, "_backward_kernel": 1}
    # Beyond one program: many programs, the last one finalizes (one temperature, C <= 1024)...
    counts.clear()
    mitkernels.mit_loss(torch.randn(1025, 7), torch.randint(0, 7, (1025,)), state,
                        backend="triton")
    assert counts == {"_forward_kernel": 1}
    # ... while MiT's wider rows take the rows kernel and a finalize spread over programs that
    # reads its partials (no summary kernel between them), and CCT-EAL rows, summary, finalize.
    counts.clear()
    mitkernels.mit_loss(torch.randn(1025, 4099), torch.randint(0, 4099, (1025,)),
                        _mit_state(4099, 0.3, torch.float32), backend="triton")
    assert counts == {"_rows_kernel": 1, "_finalize_classes_kernel": 1}
    counts.clear()
    mitkernels.cct_eal_loss(torch.randn(1025, 7), torch.randint(0, 7, (1025,)), torch.zeros(7),
                            torch.full((7,), 1 / 7, dtype=torch.float64),
                            torch.tensor(0.5, dtype=torch.float64), backend="triton")
    assert counts == {"_rows_kernel": 1, "_summary_kernel": 1, "_finalize_kernel": 1}
    # CCT-EAL's finalize stays in one program at any C (the spread walk writes MiT's counts)
    counts.clear()
    mitkernels.cct_eal_loss(torch.randn(3, 4099), torch.randint(0, 4099, (3,)), torch.zeros(4099),
                            torch.full((4099,), 1 / 4099, dtype=torch.float64),
                            torch.tensor(0.5, dtype=torch.float64), backend="triton")
    assert counts == {"_rows_kernel": 1, "_summary_kernel": 1, "_finalize_kernel": 1}


def _has_triton_step_op():
    from mitkernels import _backends

    return not isinstance(_backends.extension(), ImportError)


@cpu_only
@pytest.mark.skipif(not _has_triton_step_op(), reason="C++ extension not built")
@pytest.mark.parametrize("loss_name,reduction", [("mit", "mean"), ("mit", "none"), ("cct", "sum")])
def test_eager_step_is_the_cpp_node_and_matches_the_python_node(monkeypatch, loss_name,
                                                                 reduction):
    # With the extension an eager Triton step is mitkernels_C::triton_loss_step_ (C++ views and
    # autograd node around the launchers); without it, the Python node. Same launches with the
    # same arguments: the same bits everywhere, state included.
    from mitkernels import functional

    def step(python_node):
        if python_node:
            monkeypatch.setattr(functional, "_triton_step_op", lambda: None)
        else:
            monkeypatch.undo()
        torch.manual_seed(3)
        n, c = 9, 6
        logits = torch.randn(n, c, 2, dtype=torch.float64, requires_grad=True)
        targets = torch.randint(0, c, (n, 2))
        targets[2, 1] = -100
        if loss_name == "mit":
            state = _mit_state(c, 0.4, torch.float64)
            loss, stats = mitkernels.mit_loss(logits, targets, state, backend="triton",
                                              reduction=reduction)
            tau, buffers = state.tau, [state.class_counts, state.lambda_entropy]
        else:
            tau = torch.linspace(-0.5, 0.5, c, dtype=torch.float64).requires_grad_(True)
            ema = torch.full((c,), 1 / c, dtype=torch.float64)
            loss, stats = mitkernels.cct_eal_loss(logits, targets, tau, ema,
                                                  torch.tensor(0.5, dtype=torch.float64),
                                                  backend="triton", reduction=reduction)
            buffers = [ema]
        weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        grads = torch.autograd.grad((loss * weights).sum(), (logits, tau))
        node = loss.grad_fn
        while node.name().startswith("ViewBackward"):  # the Python node's 'none' loss is a view
            node = node.next_functions[0][0]
        return node.name(), [loss.detach(), *stats.values(), *grads, *buffers]

    cpp_name, cpp = step(python_node=False)
    py_name, py = step(python_node=True)
    assert cpp_name.endswith("CppNode<MitkernelsTritonLossBackward>"), cpp_name
    assert "EagerLossWithGrad" in py_name, py_name
    assert len(cpp) == len(py)
    for got, want in zip(cpp, py):
        assert got.shape == want.shape and torch.equal(got, want)


@cpu_only
@pytest.mark.skipif(not _has_triton_step_op(), reason="C++ extension not built")
def test_eager_step_refuses_an_unknown_backward_choice(monkeypatch):
    """MITKERNELS_TRITON_BACKWARD is checked before the step computes anything: an unknown value
    is a ValueError naming it, with the state untouched. On CPU tensors (the interpreter) every
    valid value runs Triton's backward."""
    torch.manual_seed(4)
    logits = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 4, (6,))
    state = _mit_state(4, 0.3, torch.float64)
    before = {k: t.clone() for k, t in state.buffers().items()}
    monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", "fast")
    with pytest.raises(ValueError, match="MITKERNELS_TRITON_BACKWARD must be auto, triton or "
                                         "cuda, got 'fast'"):
        mitkernels.mit_loss(logits, targets, state, backend="triton")
    assert all(torch.equal(t, before[k]) for k, t in state.buffers().items())
    grads = []
    for choice in ("auto", "cuda", "triton"):
        monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", choice)
        loss, _ = mitkernels.mit_loss(logits, targets, _mit_state(4, 0.3, torch.float64),
                                      backend="triton")
        grads.append(torch.autograd.grad(loss, logits)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


# ------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------
@gpu_only
@pytest.mark.parametrize("backend", cuda_backends() or ["triton"])
@pytest.mark.parametrize("num_classes,rows,dtype", [
    (7, 1024, torch.float32), (3, 100_000, torch.float32), (1000, 64, torch.float64),
    (32_000, 16, torch.bfloat16), (131_072, 4, torch.bfloat16), (4099, 8, torch.float16)])
def test_cuda_against_reference(num_classes, rows, dtype, backend):
    """Every GPU backend (Triton and the C++/CUDA fallback) against the eager reference."""
    gen = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, num_classes, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, num_classes, (rows,), generator=gen)
    targets[::9] = -100
    if dtype in (torch.float16, torch.bfloat16):
        _compare_low_precision(logits, logits.cuda(), targets, backend)
    else:
        _compare_mit(logits.cuda(), targets.cuda(), steps=2, backend=backend)


@gpu_only
@pytest.mark.parametrize("num_classes,rows,dtype", [
    (7, 1024, torch.float32), (32_000, 16, torch.bfloat16), (33_000, 4, torch.bfloat16),
    (9000, 8, torch.float16), (131_072, 4, torch.float32)])
def test_cuda_triton_backward_against_reference(monkeypatch, num_classes, rows, dtype):
    """The Triton step with Triton's own backward (MITKERNELS_TRITON_BACKWARD=triton; by default
    it runs the extension's CUDA kernel, which the other tests then cover): the base-2 gradient,
    the target's element rewritten after the barrier, 16-bit rows ending in a partial block
    (33,000 and 9,000 classes), ignored rows, a masked span."""
    monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", "triton")
    gen = torch.Generator().manual_seed(rows + num_classes)
    logits = (torch.randn(rows, num_classes, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, num_classes, (rows,), generator=gen)
    targets[::9] = -100
    targets[1] = num_classes - 1
    logits[2, num_classes // 2:] = -1e4
    if dtype in (torch.float16, torch.bfloat16):
        _compare_low_precision(logits, logits.cuda(), targets, "triton")
    else:
        _compare_mit(logits.cuda(), targets.cuda(), steps=2, backend="triton")


def _compare_low_precision(logits, device_logits, targets, backend):
    """16-bit logits: ``backend`` on ``device_logits`` (the values of ``logits``) within twice
    eager PyTorch's error in the same dtype, both against the float64 reference.

    The floor is 1e-6 of the largest exact value (at least 1e-6), the scaled absolute part of
    the float32 comparisons' bound (_tolerance, which adds 1e-5 relative). ``grad_tau`` is one
    float32 number of hundreds or thousands here, and eager's error can be its rounding alone,
    under one ulp (6e-5 at 566): a result an ulp or two away (another order of the same float32
    sums) failed twice eager's error on an H200 (9000 x 8 fp16: 5.3e-5 against 7.5e-6; 33000 x 4
    bf16: 2.0e-4 against 4.1e-5 at 1314, 1.5e-7 relative), while 1e-6 relative is 8 to 11 ulps
    there."""
    num_classes = logits.shape[1]
    exact = _mit_step("reference", logits.double(), targets,
                      _mit_state(num_classes, 0.3, torch.float64))
    eager = _mit_step("reference", logits, targets, _mit_state(num_classes, 0.3, torch.float32))
    got = _mit_step(backend, device_logits, targets.to(device_logits.device),
                    _mit_state(num_classes, 0.3, torch.float32, device=device_logits.device))
    for key in ("grad", "grad_tau"):
        err_eager = float((eager[key].double() - exact[key]).abs().max())
        err = float((got[key].cpu().double() - exact[key]).abs().max())
        floor = 1e-6 * max(1.0, float(exact[key].abs().max()))
        assert err <= 2 * err_eager + floor, (key, err, err_eager, floor)
    for key in ("stat_ce", "stat_H", "stat_H_star", "stat_lambda"):
        assert float(got[key]) == pytest.approx(float(exact[key]), rel=1e-5, abs=1e-6)


@gpu_only
@pytest.mark.parametrize("backend", cuda_backends() or ["triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_rows_off_alignment(backend, dtype):
    """Rows that start off a 16-byte boundary. The CUDA kernels read a contiguous row in 16-byte
    packets after a head taken element by element; the backward does so only where the gradient's
    row sits as far from a boundary as the logits' row. Dense logits with an odd C (each row its
    own offset, the gradient laid out alike): packets and heads in both kernels. A column slice
    (the gradient then contiguous, placed otherwise): packets in the forward, the element loop in
    the backward."""
    gen = torch.Generator().manual_seed(21)
    for num_classes, offset in ((5, None), (1001, None), (4099, None), (5, 1), (1001, 3),
                                (4099, 1)):
        width = num_classes if offset is None else num_classes + 4
        base = (torch.randn(33, width, generator=gen) * 3).to(dtype)
        targets = torch.randint(0, num_classes, (33,), generator=gen)
        targets[::7] = -100
        start = offset or 0
        logits = base[:, start:start + num_classes]
        device_logits = base.cuda()[:, start:start + num_classes]  # .cuda() of a slice copies
        assert device_logits.stride() == logits.stride()
        if dtype == torch.bfloat16:
            _compare_low_precision(logits, device_logits, targets, backend)
        else:
            _compare_mit(device_logits, targets.cuda(), steps=2, backend=backend,
                         reference_logits=logits)


@gpu_only
@pytest.mark.skipif("cuda" not in cuda_backends(), reason="the extension has no CUDA kernels")
@pytest.mark.parametrize("choice", [None, "auto", "cuda", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_eager_triton_step_backward(monkeypatch, choice, reduction):
    """The eager Triton step's backward is the extension's CUDA gradient kernel (no Python on
    the autograd thread), or Triton's with MITKERNELS_TRITON_BACKWARD=triton; both against the
    reference."""
    if choice is None:
        monkeypatch.delenv("MITKERNELS_TRITON_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", choice)
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(64, 1000, generator=gen) * 3
    targets = torch.randint(0, 1000, (64,), generator=gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _compare_mit(logits.cuda(), targets.cuda(), backend="triton", reduction=reduction)
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages())
    ran_cuda, ran_triton = "grad_kernel" in names, "_backward_kernel" in names
    want_triton = choice == "triton"
    assert (ran_cuda, ran_triton) == (not want_triton, want_triton), names


@gpu_only
@pytest.mark.skipif("cuda" not in cuda_backends(), reason="the extension has no CUDA kernels")
@pytest.mark.parametrize("choice,want_triton", [(None, True), ("cuda", False)])
def test_cuda_eager_triton_step_backward_by_size(monkeypatch, choice, want_triton):
    """Logits of 1 GiB (8192 x 65536 bf16): `auto` takes Triton's backward, whose device time
    there beats the CUDA kernel's by more than its Python launch costs; `cuda` still forces the
    CUDA kernel. Which kernel ran is read from the profiler (the values are the other tests')."""
    if choice is None:
        monkeypatch.delenv("MITKERNELS_TRITON_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", choice)
    logits = torch.randn(8192, 65536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert logits.numel() * logits.element_size() == 1 << 30
    targets = torch.randint(0, 65536, (8192,), device="cuda")
    state = mitkernels.MiTState(65536, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        loss, _ = mitkernels.mit_loss(logits, targets, state, backend="triton")
        loss.backward()
        torch.cuda.synchronize()
    names = " ".join(e.key for e in prof.key_averages())
    assert torch.isfinite(logits.grad.float().sum())
    assert ("_backward_kernel" in names, "grad_kernel" in names) == (want_triton,
                                                                      not want_triton), names


@gpu_only
@pytest.mark.parametrize("backend", cuda_backends() or ["triton"])
@pytest.mark.parametrize("num_classes,rows,dtype", [
    (7, 1024, torch.float32), (4099, 64, torch.float64), (131_072, 4, torch.float32)])
def test_cuda_masked_classes(num_classes, rows, dtype, backend):
    logits, targets, finite = masked_class_logits(rows, num_classes, dtype, seed=rows)
    _compare_mit(logits.cuda(), targets.cuda(), steps=2, backend=backend,
                 reference_logits=finite)


@gpu_only
@pytest.mark.parametrize("backend", cuda_backends() or ["triton"])
@pytest.mark.parametrize("num_classes", [3, 9, 40, 5000])
def test_cuda_positive_inf_logit(num_classes, backend):
    """A +inf logit makes its row NaN (loss, H, that row's gradient) and skips the state update,
    as on the cpu backend. The CUDA warp merge once dropped the lane that held it (finite stats),
    and then stored the row's max as NaN (inf + -inf beside an empty lane: 9 classes) where it
    is +inf."""
    logits = torch.randn(4, num_classes, generator=torch.Generator().manual_seed(num_classes))
    logits[1, 2] = float("inf")
    targets = torch.tensor([0, 1, 2, 0])
    outs = []
    for name, device in (("cpu", "cpu"), (backend, "cuda")):
        x = logits.clone().to(device).requires_grad_(True)
        state = mitkernels.MiTState(num_classes, device=device)
        loss, stats = mitkernels.mit_loss(x, targets.to(device), state, backend=name)
        loss.backward()
        outs.append((float(loss), float(stats["H"]), float(stats["updated"]),
                     torch.isnan(x.grad).any(1).cpu().tolist()))
    assert math.isnan(outs[1][0]) and math.isnan(outs[1][1]) and outs[1][2] == 0.0
    assert outs[1][3] == outs[0][3] == [False, True, False, False]
    # The row statistics themselves (row_stats' public output): the max +inf, the rest NaN, as
    # on the cpu (a GPU's tl.maximum drops a NaN: V came out 0)
    stats = []
    for name, device in (("cpu", "cpu"), (backend, "cuda")):
        rs, _ = torch.ops.mitkernels.row_stats(logits.to(device).unsqueeze(-1),
                                               targets.to(device), torch.zeros(1, device=device),
                                               1e-6, 1e-3, 500.0, -100, name)
        stats.append(rs.cpu())
    assert stats[0][0, 1] == float("inf") and stats[0][1:, 1].isnan().all()
    torch.testing.assert_close(stats[1], stats[0], rtol=1e-5, atol=1e-6, equal_nan=True)


@gpu_only
@pytest.mark.parametrize("backend", cuda_backends() or ["triton"])
def test_cuda_nan_tau_gives_a_nan_loss(backend):
    """A NaN tau gives T = NaN, a NaN loss and a NaN tau gradient (the reference's autograd) on
    the GPU as on the CPU: min / max drop a NaN (a GPU's, and the interpreter's np.fmin /
    np.fmax), which clamped T to a bound."""
    x, y = torch.randn(64, 5), torch.randint(0, 5, (64,))
    for device, name in (("cpu", "cpu"), ("cuda", backend)):
        state = mitkernels.MiTState(5, device=device)
        with torch.no_grad():
            state.tau.fill_(float("nan"))
        loss, stats = mitkernels.mit_loss(x.to(device), y.to(device), state, backend=name)
        assert torch.isnan(loss).item() and torch.isnan(stats["T"]).item(), device
        assert float(stats["updated"]) == 0.0 and int(state.dual_updates) == 0
        loss.backward()
        assert torch.isnan(state.tau.grad).item(), device


@gpu_only
@pytest.mark.parametrize("backend,backward", [("triton", None), ("triton", "triton"),
                                              ("cuda", None)])
def test_cuda_edge_steps_match_the_cpu(monkeypatch, backend, backward):
    """The GPU side of what tests/test_functional.py checks on the CPU backends: an empty batch
    with reduction='none' through backward (Triton's backward read its upstream gradient
    unmasked), dual_updates counted in integers past 2^53 (the finalize counted through a
    double), and a clamped T passing no gradient from a row whose CE overflows (inf * 0)."""
    if backend not in cuda_backends():
        pytest.skip(f"backend {backend} is not available here")
    if backward is not None:
        monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", backward)
    for shape in ((0, 4), (2, 4, 0)):
        logits = torch.randn(shape, device="cuda", requires_grad=True)
        targets = torch.zeros((shape[0], *shape[2:]), dtype=torch.long, device="cuda")
        state = mitkernels.MiTState(4, device="cuda")
        loss, _ = mitkernels.mit_loss(logits, targets, state, backend=backend, reduction="none")
        grads = torch.autograd.grad(loss.sum(), (logits, state.tau))
        assert grads[0].shape == logits.shape and float(grads[1]) == 0.0
    state = mitkernels.MiTState(3, device="cuda")
    state.dual_updates.fill_(2**53 + 1)
    mitkernels.mit_loss(torch.randn(4, 3, device="cuda"), torch.tensor([0, 1, 2, 0], device="cuda"),
                        state, backend=backend)
    assert int(state.dual_updates) == 2**53 + 2
    for reduction in ("mean", "none"):
        logits = torch.tensor([[1e36, -1e36, 0.0], [0.1, 0.2, 0.3]], device="cuda",
                              requires_grad=True)
        state = _mit_state(3, -30.0, torch.float32, device="cuda")
        loss, _ = mitkernels.mit_loss(logits, torch.tensor([1, 0], device="cuda"), state,
                                      backend=backend, reduction=reduction)
        loss.sum().backward()
        assert float(state.tau.grad) == 0.0, reduction


@gpu_only
def test_cuda_layouts_and_kinds():
    gen = torch.Generator().manual_seed(12)
    spatial = torch.randn(2, 19, 8, 8, generator=gen)
    targets = torch.randint(0, 19, (2, 8, 8), generator=gen)
    _compare_mit(spatial.cuda(), targets.cuda())
    _compare_mit(spatial.cuda().contiguous(memory_format=torch.channels_last), targets.cuda(),
                 reduction="none")
    tau_c = torch.randn(300, generator=gen)
    logits = torch.randn(500, 300, generator=gen)
    tg = torch.randint(0, 300, (500,), generator=gen)
    outs = []
    for device in ("cpu", "cuda"):
        t = tau_c.clone().to(device).requires_grad_(True)
        ema = torch.full((300,), 1 / 300, dtype=torch.float64, device=device)
        alpha = torch.tensor(0.3, dtype=torch.float64, device=device)
        x = logits.clone().to(device).requires_grad_(True)
        fn = (reference.cct_eal_step if device == "cpu" else
              lambda *a: mitkernels.cct_eal_loss(*a, backend="triton"))
        loss, stats = fn(x, tg.to(device), t, ema, alpha)
        loss.backward()
        outs.append(dict(loss=loss.detach(), grad=x.grad, grad_tau=t.grad, ema=ema))
    _assert_outputs_close(outs[1], outs[0], torch.float32)


@gpu_only
@pytest.mark.parametrize("backend,backward", [("triton", None), ("triton", "triton"),
                                              ("cuda", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_offsets_past_32_bits(monkeypatch, backend, backward, dtype):
    """The views past 2^31 elements on the GPU (a storage of 8 or 16 GB): every backend, and the
    eager Triton step with each backward (by default its logits, a few elements, take the CUDA
    backward)."""
    if backend not in cuda_backends():
        pytest.skip(f"backend {backend} is not available here")
    torch.cuda.empty_cache()
    need = (2**32 + 4096) * dtype.itemsize + 2 * 2**30
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    if backward is not None:
        monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", backward)
    try:
        _check_offsets_past_32_bits(backend, dtype, "cuda")
    finally:
        # a failure's traceback keeps the storage alive: the next case would skip for memory
        gc.collect()
        torch.cuda.empty_cache()


@gpu_only
@pytest.mark.parametrize("backend,backward", [("triton", None), ("triton", "triton"),
                                              ("cuda", None)])
@pytest.mark.parametrize("num_classes,spatial,dtype,channels_last", [
    (5, (33, 31), torch.float32, False), (5, (33, 31), torch.float32, True),
    (2, (64, 64), torch.float64, False), (150, (9, 7), torch.float32, False),
    (7, (16, 24), torch.bfloat16, False), (3, (40, 40), torch.float16, False),
    (300, (5, 6), torch.float32, False), (16, (33, 31), torch.float32, False),
    (12, (16, 24), torch.bfloat16, False)])
def test_cuda_segmentation_layouts(monkeypatch, backend, backward, num_classes, spatial, dtype,
                                   channels_last):
    """[N, C, H, W] logits, whose classes lie H W apart, and few-class rows take the CUDA
    kernels' thread-a-row form (thread_rows): the cuda backend's forward and backward, and the
    eager Triton step's default backward; Triton's own backward too. With at most 16 classes in
    float32 and 8 in 16 bits (16 in their backward), Triton's kernels take tiles of one sample's
    pixels (SPATIAL_TABLE; 1023 and 1600 pixels end a sample in a partial tile). Odd pixel
    counts (33 x 31), ignored pixels,
    150 classes strided (a thread a row) and 300 (a warp a row, its strided loop),
    channels-last (contiguous classes, 5 of them)."""
    if backend not in cuda_backends():
        pytest.skip(f"{backend} is not available here")
    if backward is None:
        monkeypatch.delenv("MITKERNELS_TRITON_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", backward)
    gen = torch.Generator().manual_seed(num_classes + spatial[0])
    logits = (torch.randn(3, num_classes, *spatial, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, num_classes, (3, *spatial), generator=gen)
    targets[:, ::5, ::3] = -100
    device_logits = logits.cuda()
    if channels_last:
        device_logits = device_logits.contiguous(memory_format=torch.channels_last)
    if dtype == torch.bfloat16:
        _compare_low_precision(logits, device_logits, targets, backend)
    else:
        _compare_mit(device_logits, targets.cuda(), steps=2, backend=backend,
                     reference_logits=logits)


@gpu_only
def test_cuda_deterministic_and_no_recompile(monkeypatch):
    module = _kernels()
    logits = torch.randn(4096, 1000, device="cuda")
    targets = torch.randint(0, 1000, (4096,), device="cuda")
    runs = [_mit_step("triton", logits, targets, _mit_state(1000, 0.1, torch.float32, "cuda"))
            for _ in range(2)]
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    compiled = []
    # Triton calls this hook after each compilation (a kernel missing from its in-memory cache).
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook",
                        lambda *args, **kwargs: compiled.append(kwargs.get("repr")))
    _mit_step("triton", logits, targets, _mit_state(1000, 0.7, torch.float32, "cuda"))
    assert not compiled, f"a new temperature compiled a new kernel: {compiled}"


def test_the_row_limit_is_inclusive(monkeypatch):
    # "at most MAX_ROWS": that many rows are taken, one more refused (as choose_for_rows reads it)
    kernels = _kernels()
    monkeypatch.setattr(kernels, "MAX_ROWS", 12)
    kernels._check_rows(torch.empty(12, 3, 1))
    kernels._check_rows(torch.empty(3, 12, 1))
    with pytest.raises(ValueError, match="at most 12 rows"):
        kernels._check_rows(torch.empty(13, 3, 1))
    with pytest.raises(ValueError, match="at most 12 classes"):
        kernels._check_rows(torch.empty(2, 13, 1))
