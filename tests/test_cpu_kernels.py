"""The C++ CPU kernels (torch.ops.mitkernels_C.*) against mitkernels/reference.py.

The ops are called directly here, in their canonical [N, C, S] form, so every layout, dtype and
odd size reaches the kernels as written; the golden trajectories also go through the public
``mitkernels.mit_loss(..., backend="cpu")``. The reference is the only oracle.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import mitkernels
from mitkernels import _backends, reference
from mitkernels.state import initial_buffers
from conftest import views_past_32_bits

pytestmark = pytest.mark.skipif(
    _backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="the C++ extension is not built")

OPS = torch.ops.mitkernels_C
MIT_TEMP = (reference.MIT_T_EPS, reference.MIT_T_MIN, reference.MIT_T_MAX)
CCT_TEMP = (0.0, 0.75, 1.5)
MEAN, SUM, NONE = 1, 2, 0
RED_NAMES = {MEAN: "mean", SUM: "sum", NONE: "none"}


# ----------------------------------------------------------------------------------------------
# Helpers: one step through the ops, the same step through the reference.
# ----------------------------------------------------------------------------------------------
def canonical(logits):
    """[N, C, d1, ..] -> [N, C, S] without a copy (the kernels take any strides)."""
    n, c = logits.shape[:2]
    return logits.reshape(n, c, -1) if logits.dim() > 2 else logits.unsqueeze(-1)


def flat_targets(targets):
    return targets.reshape(-1).contiguous()


def mit_state(c):
    return list(initial_buffers(c).values())


def ops_step(kind, logits, targets, tau, state, hparams=(), temp=MIT_TEMP, reduction=MEAN,
             ignore_index=-100, update_state=True, grad_loss=None, loss_dtype=None):
    """Forward + backward through the kernel ops; the incoming gradient is ones (or grad_loss)."""
    x3 = canonical(logits)
    loss_dtype = loss_dtype or (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    loss, stats, row_stats, grad_info = OPS.loss_forward_(
        x3, flat_targets(targets), tau, state, kind, list(hparams), *temp, ignore_index, reduction,
        update_state, loss_dtype)
    if grad_loss is None:
        grad_loss = torch.ones_like(loss)
    grad_x, grad_tau = OPS.loss_backward(grad_loss, x3, flat_targets(targets), tau, row_stats,
                                         grad_info, *temp, ignore_index, reduction, True)
    return dict(loss=loss, stats=stats, row_stats=row_stats, grad_info=grad_info,
                grad=grad_x.reshape(logits.shape), grad_tau=grad_tau)


def ref_mit(logits, targets, tau, state, reduction=MEAN, ignore_index=-100, update_state=True,
            grad_loss=None):
    x = logits.detach().clone().requires_grad_(True)
    t = tau.detach().clone().requires_grad_(True)
    loss, stats = reference.mit_step(x, targets, t, *state, ignore_index=ignore_index,
                                     reduction=RED_NAMES[reduction], update_state=update_state)
    loss.backward(torch.ones_like(loss) if grad_loss is None else grad_loss.reshape(loss.shape))
    return dict(loss=loss.detach(), stats=stats, grad=x.grad, grad_tau=t.grad)


def assert_close(actual, expected, tol, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=msg)


def compare_mit(logits, targets, tau0=0.3, reduction=MEAN, tol=1e-10, ignore_index=-100,
                update_state=True):
    c = logits.shape[1]
    tau = torch.tensor([tau0], dtype=torch.float64)
    st_k, st_r = mit_state(c), mit_state(c)
    grad_loss = None
    if reduction == NONE:
        grad_loss = torch.linspace(0.5, 1.5, targets.numel(), dtype=torch.float64)
    k = ops_step(0, logits, targets, tau, st_k, reduction=reduction, ignore_index=ignore_index,
                 update_state=update_state,
                 grad_loss=None if grad_loss is None else grad_loss.to(
                     torch.float64 if logits.dtype == torch.float64 else torch.float32))
    r = ref_mit(logits, targets, tau, st_r, reduction=reduction, ignore_index=ignore_index,
                update_state=update_state, grad_loss=grad_loss)
    assert_close(k["loss"].reshape(-1), r["loss"].reshape(-1), tol, "loss")
    # stats' loss is the mean form whatever the reduction
    for i, key in enumerate(("loss", "ce", "H", "H_star", "lambda", "T")):
        assert_close(k["stats"][i], r["stats"][key], tol, key)
    assert_close(k["grad"], r["grad"], tol, "grad_logits")
    assert_close(k["grad_tau"].reshape(()), r["grad_tau"].reshape(()), tol, "grad_tau")
    for a, b in zip(st_k, st_r):
        assert_close(a, b, tol, "state")
    return k, r


# ----------------------------------------------------------------------------------------------
# Golden trajectories of the published code (float64, 1e-10).
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_index", range(4))
def test_golden_trajectory_through_ops(golden_trajectory, case_index):
    case = golden_trajectory["cases"][case_index]
    state = mit_state(case["num_classes"])
    tau = torch.tensor([case["tau0"]], dtype=torch.float64)
    for step in case["steps"]:
        logits = torch.tensor(step["logits"], dtype=torch.float64)
        targets = torch.tensor(step["targets"])
        out = ops_step(0, logits, targets, tau, state)
        stats = out["stats"]
        assert float(out["loss"]) == pytest.approx(step["loss"], abs=1e-10)
        for i, key in ((1, "ce"), (2, "H"), (3, "H_star"), (4, "lambda"), (5, "T")):
            assert float(stats[i]) == pytest.approx(step[key], abs=1e-10), key
        assert float(out["grad_tau"]) == pytest.approx(step["grad_tau"], abs=1e-10)
        if "grad_logits" in step:
            expected = torch.tensor(step["grad_logits"], dtype=torch.float64)
            torch.testing.assert_close(out["grad"], expected, atol=1e-10, rtol=0)


# The golden trajectories through mit_loss(backend="cpu") are replayed by test_functional.py.


# ----------------------------------------------------------------------------------------------
# Sizes, layouts, reductions (float64 against the reference to 1e-10).
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,c", [(1, 2), (5, 3), (7, 2), (3, 1000), (2, 4099), (33, 37), (9, 67)])
@pytest.mark.parametrize("reduction", [MEAN, SUM, NONE])
def test_sizes_and_reductions(n, c, reduction):
    g = torch.Generator().manual_seed(n * 1000 + c)
    logits = torch.randn(n, c, dtype=torch.float64, generator=g) * 3
    targets = torch.randint(0, c, (n,), generator=g)
    if n > 2:
        targets[1] = -100
    compare_mit(logits, targets, reduction=reduction)


def _layouts():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 2 * 33, dtype=torch.float64, generator=g)
    yield "contiguous", base[:, :33].contiguous()
    yield "strided_rows", base[:, :33]
    yield "strided_classes", base[:, ::2]
    yield "transposed", torch.randn(33, 12, dtype=torch.float64, generator=g).t()
    yield "expanded_rows", torch.randn(1, 33, dtype=torch.float64, generator=g).expand(12, 33)
    nchw = torch.randn(3, 11, 4, 5, dtype=torch.float64, generator=g)
    yield "nchw", nchw
    yield "channels_last", nchw.contiguous(memory_format=torch.channels_last)
    yield "nchw_sliced", torch.randn(3, 11, 4, 9, dtype=torch.float64, generator=g)[..., ::2]


@pytest.mark.parametrize("name,logits", list(_layouts()), ids=[n for n, _ in _layouts()])
def test_layouts(name, logits):
    g = torch.Generator().manual_seed(3)
    shape = (logits.shape[0],) + tuple(logits.shape[2:])
    targets = torch.randint(0, logits.shape[1], shape, generator=g)
    targets.view(-1)[0] = -100
    k, _ = compare_mit(logits, targets)
    if name in ("nchw", "channels_last", "contiguous", "transposed"):  # dense: same strides
        assert k["grad"].stride() == logits.stride()


def test_ignore_index_custom_and_all_ignored():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, dtype=torch.float64, generator=g)
    targets = torch.tensor([0, 7, 3, 7, 4, 1])  # 7 is ignore_index here
    compare_mit(logits, torch.where(targets == 7, -100, targets))
    compare_mit(logits, targets, ignore_index=7)
    state = mit_state(5)
    before = [t.clone() for t in state]
    out = ops_step(0, logits, torch.full((6,), -100), torch.tensor([0.1], dtype=torch.float64),
                   state)
    assert float(out["loss"]) == 0.0 and float(out["stats"][6]) == 0.0
    assert torch.count_nonzero(out["grad"]) == 0 and float(out["grad_tau"]) == 0.0
    for a, b in zip(state, before):
        assert torch.equal(a, b)


def test_update_state_false_keeps_state():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(8, 4, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 4, (8,), generator=g)
    compare_mit(logits, targets, update_state=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_offsets_past_32_bits(dtype):
    # Element offsets are 64-bit (row * row stride, class * class stride, pixel): each view
    # against the reference on the same values, dense and in float64.
    g = torch.Generator().manual_seed(11)
    for name, view in views_past_32_bits(dtype, g):
        shape = (view.shape[0],) + tuple(view.shape[2:])
        targets = torch.randint(0, view.shape[1], shape, generator=g)
        targets.view(-1)[-1] = -100
        tau = torch.tensor([0.3], dtype=torch.float64)
        k = ops_step(0, view, targets, tau, mit_state(view.shape[1]))
        r = ref_mit(view.double().contiguous(), targets, tau, mit_state(view.shape[1]))
        tol = 1e-5 if dtype == torch.float32 else 1e-4  # float32 accumulation either way
        assert_close(k["loss"], r["loss"], tol, f"{name}: loss")
        # the gradient is stored in the logits' dtype: bf16 holds it to 2^-9 of itself, so the
        # bound is 2^-7 of the largest (a wrong read moves a row's gradient by its own size)
        grad_tol = tol if dtype == torch.float32 else 2**-7 * float(r["grad"].abs().max())
        assert_close(k["grad"], r["grad"], grad_tol, f"{name}: grad_logits")
        assert_close(k["grad_tau"].reshape(()), r["grad_tau"].reshape(()), tol, f"{name}: grad_tau")
        del view


def test_invalid_targets_never_read():
    # Targets far outside [0, C): a read would fault or pick up garbage. They are counted, the
    # loss is NaN, no state changes, and the other rows are exactly the rows of a clean batch.
    g = torch.Generator().manual_seed(6)
    c = 5
    logits = torch.randn(7, c, dtype=torch.float64, generator=g)
    bad = torch.tensor([0, 2**40, 3, -7, c, 1, -100])
    clean = torch.tensor([0, -100, 3, -100, -100, 1, -100])
    tau = torch.tensor([0.2], dtype=torch.float64)
    for targets in (bad, bad.clamp(-(2**31), 2**31 - 1).to(torch.int32)):
        state = mit_state(c)
        before = [t.clone() for t in state]
        out = ops_step(0, logits, targets, tau, state)
        ref = ops_step(0, logits, clean, tau, mit_state(c))
        assert math.isnan(float(out["loss"])) and float(out["stats"][8]) == 3.0
        assert float(out["stats"][6]) == 0.0
        for a, b in zip(state, before):
            assert torch.equal(a, b)
        torch.testing.assert_close(out["row_stats"], ref["row_stats"], rtol=0, atol=0)
        assert torch.count_nonzero(out["grad"][[1, 3, 4, 6]]) == 0
    rs, summary = OPS.row_stats(canonical(logits), bad, tau, *MIT_TEMP, -100)
    assert float(summary[4]) == 3.0 and float(summary[0]) == 3.0


@pytest.mark.parametrize("n,c,s,k", [(20003, 5, 1, 1), (7, 3, 1501, 1), (9001, 70, 1, 1),
                                      (9001, 6, 1, 6)],
                         ids=["C5", "C3-spatial", "C70", "C6-per-class"])
def test_summary_counts_and_sums(n, c, s, k):
    """The summary against sums of the row statistics in float64: exact counts (the header's B
    and invalid count, the class histogram), sums within float64 rounding, over several chunks
    of rows ending in a partial group of ways, with ignored and invalid targets. C5 and the
    spatial C3 count classes as integers, C70 and per-class temperatures in float64."""
    g = torch.Generator().manual_seed(n + c)
    logits = torch.randn(n, c, s, generator=g)
    targets = torch.randint(0, c, (n * s,), generator=g)
    targets[::13] = -100
    targets[5::97] = c + 2  # invalid
    tau = torch.linspace(0.1, 0.5, k)
    temp = MIT_TEMP if k == 1 else CCT_TEMP
    rs, summary = OPS.row_stats(logits, targets, tau, *temp, -100)
    valid = (targets >= 0) & (targets < c)
    rsd = rs.double()
    assert float(summary[0]) == float(valid.sum())
    assert float(summary[4]) == float(((targets != -100) & ~valid).sum())
    hist = torch.bincount(targets[valid], minlength=c).double()
    assert torch.equal(summary[5:5 + c], hist)
    for i, row in ((1, 3), (2, 1), (3, 2)):  # sum (CE - H), sum H, sum V
        want = float(rsd[row][valid].sum())
        assert float(summary[i]) == pytest.approx(want, rel=1e-12, abs=1e-9)
    if k > 1:
        y = targets[valid]
        for off, row in ((5 + c, 3), (5 + 2 * c, 2)):
            want = torch.zeros(c, dtype=torch.float64).index_add_(0, y, rsd[row][valid])
            torch.testing.assert_close(summary[off:off + c], want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_rows_match_float_rows_bitwise(dtype):
    """16-bit logits widen exactly to float32, and the kernels then run the float32 math: the row
    statistics equal those of the float32 kernels on the widened values bit for bit, the gradient
    is theirs rounded to 16 bits, the temperature's gradient theirs. Every length of a row's
    partial vector (C = 1 .. 9, 15, 17, 1001: the AVX2 build loads it by pairs and an odd last
    value), ignored rows."""
    for c in list(range(1, 10)) + [15, 17, 1001]:
        g = torch.Generator().manual_seed(c)
        x16 = (torch.randn(37, c, 1, generator=g) * 3).to(dtype)
        y = torch.randint(0, c, (37,), generator=g)
        y[::5] = -100
        tau = torch.tensor([0.3])
        outs = []
        for x in (x16, x16.float()):
            _, _, rs, gi = OPS.loss_forward_(x, y, tau, mit_state(c), 0, [], *MIT_TEMP, -100, MEAN,
                                             False, torch.float32)
            grad, grad_tau = OPS.loss_backward(torch.ones(()), x, y, tau, rs, gi, *MIT_TEMP, -100,
                                               MEAN, True)
            outs.append((rs, grad, grad_tau))
        (rs16, g16, t16), (rs32, g32, t32) = outs
        assert _same_bits(rs16, rs32), c
        assert _same_bits(g16, g32.to(dtype)), c
        assert _same_bits(t16, t32), c


# ----------------------------------------------------------------------------------------------
# Reduced precision: within the error of eager PyTorch in the same dtype.
# ----------------------------------------------------------------------------------------------
def _eager_in_dtype(logits, targets, t, lam):
    """The MiT loss and its logits gradient computed by eager PyTorch in the logits' dtype."""
    x = logits.detach().clone().requires_grad_(True)
    z = x / t.to(x.dtype)
    logp = torch.log_softmax(z, dim=1)
    h = -(logp.exp() * logp).sum(1).mean()
    ce = torch.nn.functional.cross_entropy(z, targets)
    loss = ce - lam * h
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,c", [(16, 10), (4, 1000), (3, 4099), (64, 3)])
def test_reduced_precision_within_eager_error(dtype, n, c):
    g = torch.Generator().manual_seed(n + c)
    logits = (torch.randn(n, c, generator=g) * 2).to(dtype)
    targets = torch.randint(0, c, (n,), generator=g)
    tau = torch.tensor([0.4], dtype=torch.float32)
    state = [s for s in mit_state(c)]
    state[2].fill_(0.3)
    out = ops_step(0, logits, targets, tau, state, update_state=False)
    assert out["grad"].dtype == dtype and out["loss"].dtype == torch.float32
    st = mit_state(c)
    st[2].fill_(0.3)
    exact = ref_mit(logits.double(), targets, tau.double(), st, update_state=False)
    t = reference.temperature(tau.double())
    eager_loss, eager_grad = _eager_in_dtype(logits, targets, t, 0.3)
    loss_err = float((eager_loss.double() - exact["loss"]).abs())
    grad_err = float((eager_grad.double() - exact["grad"]).abs().max())
    eps = torch.finfo(dtype).eps
    assert float((out["loss"].double() - exact["loss"]).abs()) <= max(loss_err, 64 * eps * 1e-3) \
        + 1e-5 * abs(float(exact["loss"]))
    scale = float(exact["grad"].abs().max())
    # A few ulps of the largest gradient (fp32: eager's own error can be below one ulp there).
    assert float((out["grad"].double() - exact["grad"]).abs().max()) <= max(grad_err, 4 * eps * scale)
    assert_close(out["grad_tau"].double(), exact["grad_tau"].reshape(1), 1e-3 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_exp_across_the_shift_range(dtype):
    """The float kernels' own exp (2^n 2^r, mit_loss_cpu.cpp) over every shift it sees: rows
    [0, d], target 0 and T = 1, so the gradient of the second logit is p = e^d / (1 + e^d), for d
    from 0 down past float's underflow and -inf (masked: exactly 0, as F.softmax gives)."""
    d = torch.cat([torch.linspace(-104.0, 0.0, 4001), torch.tensor([-math.inf, -1e30, -87.5])])
    logits = torch.stack([torch.zeros_like(d), d], 1).to(dtype)
    targets = torch.zeros(len(d), dtype=torch.long)
    tau = torch.tensor([math.log(math.expm1(1.0 - reference.MIT_T_EPS))])  # T = 1
    state = mit_state(2)
    state[2].fill_(0.0)  # lambda = 0: the gradient is p - onehot
    out = ops_step(0, logits, targets, tau, state, reduction=NONE, update_state=False,
                   grad_loss=torch.ones(len(d)))
    x = logits.double()
    want = torch.softmax(x, 1)[:, 1]
    got = out["grad"][:, 1].double()
    if dtype == torch.float32:
        # the shift (x - m) log2(e) / T carries float roundings of relative 2^-24 (here, with
        # T = 1 and m = 0, those of log2(e) and of the product), as eager float32's z = x / T
        # then z - max z does: up to 1.2e-7 |d| of p (6e-6 at d = -50)
        tol = (4e-7 + 1.2e-7 * x[:, 1].abs()) * want
        normal = want >= torch.finfo(torch.float32).tiny
        assert torch.all((got - want).abs()[normal] <= tol[normal])
        assert torch.all(got[~normal].abs() <= torch.finfo(torch.float32).tiny)
    else:  # one rounding to bfloat16 of p
        assert torch.all((got - want).abs() <= 2 ** -8 * want + torch.finfo(torch.float32).tiny)
    assert torch.all(got[-3:-1] == 0) and torch.all(got[want == 0] == 0)
    # the rows' loss, CE = logsumexp - x_0, through the sum s = 1 + e^d that carries the exp
    torch.testing.assert_close(out["loss"].double(), torch.logsumexp(x, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spatial", [False, True])
def test_row_log_s_within_float_rounding(spatial):
    """log s of a float row, the float kernels' own log (mit_loss_cpu.cpp, log_normal), against
    float64's: rows of k zero logits and C - k masked ones (-inf) have s = k exactly (e^0 = 1,
    the masked terms exactly 0), for k from 1 to C = 4099 (every binade up to 2^12 and the
    mantissas between). At most 1.15 ulp of float32 (the log checked on every normal float:
    1.144), for the row kernels and, as NCHW, the spatial lanes; 0 for k = 1."""
    c = 4099
    ks = torch.unique(torch.cat([torch.arange(1, 130), torch.tensor([c]),
                                 torch.randint(1, c, (200,), generator=torch.Generator().manual_seed(3)),
                                 2 ** torch.arange(13) - 1, 2 ** torch.arange(13) + 1]).clamp(1, c))
    logits = torch.where(torch.arange(c)[None, :] < ks[:, None], 0.0, -math.inf)
    if spatial:  # [1, C, rows]: the rows are pixels, the lanes path
        x3 = logits.t().contiguous().unsqueeze(0)
    else:
        x3 = logits.unsqueeze(-1)
    targets = torch.zeros(len(ks), dtype=torch.long)
    tau = torch.zeros(1)
    row_stats, _ = OPS.row_stats(x3, targets, tau, *MIT_TEMP, -100)
    got = row_stats[4].double()
    want = torch.log(ks.double())
    wf = want.float()
    ulp = torch.minimum(torch.nextafter(wf, torch.tensor(math.inf)).double() - wf.double(),
                        wf.double() - torch.nextafter(wf, torch.tensor(-math.inf)).double())
    err = ((got - want).abs() / ulp)
    assert got[ks == 1].eq(0).all()
    assert err.max() <= 1.15, (ks[err.argmax()], err.max())


# ----------------------------------------------------------------------------------------------
# TET and CCT-EAL against the reference.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", [MEAN, SUM, NONE])
@pytest.mark.parametrize("shape", [(9, 6), (3, 5, 2, 3)])
def test_tet_against_reference(reduction, shape):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(*shape, dtype=torch.float64, generator=g)
    targets = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
    targets.view(-1)[2] = -100
    temperature, lam = 0.7, 0.15
    tau = torch.zeros(1, dtype=torch.float64)
    weight = torch.linspace(0.5, 1.5, targets.numel(), dtype=torch.float64)
    out = ops_step(1, logits, targets, tau, [], hparams=[lam], temp=(0.0, temperature, temperature),
                   reduction=reduction, grad_loss=weight if reduction == NONE else None)
    x = logits.clone().requires_grad_(True)
    loss, stats = reference.tet_loss(x, targets, temperature, lam, reduction=RED_NAMES[reduction])
    loss.backward(weight.reshape(loss.shape) if reduction == NONE else None)
    assert_close(out["loss"].reshape(-1), loss.detach().reshape(-1), 1e-10)
    assert_close(out["stats"][1], stats["ce"], 1e-10)
    assert_close(out["stats"][2], stats["H"], 1e-10)
    assert_close(out["stats"][4], stats["lambda"], 1e-10)
    assert_close(out["grad"], x.grad, 1e-10)
    assert float(out["grad_tau"]) == 0.0  # the clamp t_min = t_max holds T


@pytest.mark.parametrize("reduction", [MEAN, SUM])
@pytest.mark.parametrize("shape", [(12, 5), (4, 3, 3, 2), (2, 1000)])
def test_cct_eal_against_reference(reduction, shape):
    g = torch.Generator().manual_seed(12)
    c = shape[1]
    logits = torch.randn(*shape, dtype=torch.float64, generator=g) * 2
    targets = torch.randint(0, c, (shape[0],) + shape[2:], generator=g)
    targets.view(-1)[0] = -100
    tau_c = torch.linspace(-0.5, 1.5, c, dtype=torch.float64)
    ema0 = torch.rand(c, dtype=torch.float64, generator=g)
    ema0 /= ema0.sum()
    alpha = torch.tensor(0.7, dtype=torch.float64)
    state = [ema0.clone(), alpha.clone()]
    ema_ref = ema0.clone()
    for _ in range(2):  # two steps: the EMA state carries over
        out = ops_step(2, logits, targets, tau_c, state, hparams=[0.9, 1e-12], temp=CCT_TEMP,
                       reduction=reduction)
        x = logits.clone().requires_grad_(True)
        t = tau_c.clone().requires_grad_(True)
        loss, stats = reference.cct_eal_step(x, targets, t, ema_ref, alpha,
                                             reduction=RED_NAMES[reduction])
        loss.backward()
        assert_close(out["loss"], loss.detach(), 1e-10, "loss")
        for i, key in ((1, "ce"), (2, "H"), (3, "H_star"), (4, "alpha_t"), (5, "T_mean")):
            assert_close(out["stats"][i], stats[key], 1e-10, key)
        assert_close(out["grad"], x.grad, 1e-10, "grad")
        assert_close(out["grad_tau"], t.grad, 1e-10, "grad_tau")
        assert_close(state[0], ema_ref, 1e-12, "ema")


@pytest.mark.parametrize("reduction", [MEAN, SUM, NONE])
def test_class_conditional_temperatures_with_mit_kind(reduction):
    # K = C temperatures under the MiT finalize: dL/dtau_k from the per-class sums (with "none",
    # from each row's weight: a kernel that read every row's gradient at class 0 passed "mean").
    g = torch.Generator().manual_seed(13)
    c, n = 4, 10
    logits = torch.randn(n, c, dtype=torch.float64, generator=g)
    targets = torch.randint(0, c, (n,), generator=g)
    tau = torch.linspace(-0.2, 0.9, c, dtype=torch.float64)
    state = mit_state(c)
    state[2].fill_(0.25)
    grad_loss = torch.linspace(0.5, 1.5, n, dtype=torch.float64) if reduction == NONE else None
    out = ops_step(0, logits, targets, tau, state, update_state=False, reduction=reduction,
                   grad_loss=grad_loss)
    x = logits.clone().requires_grad_(True)
    t = tau.clone().requires_grad_(True)
    temps = reference.temperature(t)[targets]
    z = x / temps[:, None]
    logp = torch.log_softmax(z, 1)
    rows = -logp.gather(1, targets[:, None])[:, 0] - 0.25 * (-(logp.exp() * logp).sum(1))
    loss = {MEAN: rows.mean(), SUM: rows.sum(), NONE: rows}[reduction]
    loss.backward(grad_loss)
    assert_close(out["loss"], loss.detach(), 1e-10)
    assert_close(out["grad"], x.grad, 1e-10)
    assert_close(out["grad_tau"], t.grad, 1e-10)


# ----------------------------------------------------------------------------------------------
# gradcheck through the ops (float64), logits and tau.
# ----------------------------------------------------------------------------------------------
def _op_loss(kind, targets, state_fn, hparams, temp, reduction, update_state):
    def f(x, tau):
        x3 = canonical(x)
        loss, stats, rs, gi = torch.ops.mitkernels.loss_forward_(
            x3.detach(), flat_targets(targets), tau.detach(), state_fn(), kind, hparams, *temp,
            -100, reduction, update_state, torch.float64, "cpu")
        return torch.ops.mitkernels.loss_with_grad(loss, x3, tau, flat_targets(targets), rs, gi,
                                                   [*temp, -100.0], "cpu")
    return f


@pytest.mark.parametrize("kind,reduction", [(0, MEAN), (0, SUM), (0, NONE), (1, MEAN), (2, MEAN),
                                            (2, SUM)])
def test_gradcheck_logits_and_tau(kind, reduction):
    g = torch.Generator().manual_seed(21)
    c = 4
    x = torch.randn(5, c, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    targets = torch.randint(0, c, (5, 3), generator=g)
    targets[1, 1] = -100
    if kind == 0:
        # lambda is a constant of the step (published); with update_state it would also move
        # with the batch's H, which the published gradient ignores on purpose.
        def state_fn():
            s = mit_state(c)
            s[2].fill_(0.3)
            return s
        tau = torch.tensor([0.3], dtype=torch.float64)
        f = _op_loss(0, targets, state_fn, [], MIT_TEMP, reduction, False)
    elif kind == 1:
        tau = torch.tensor([0.3], dtype=torch.float64)
        f = _op_loss(1, targets, lambda: [], [0.2], (0.0, 1e-3, 500.0), reduction, True)
    else:
        tau = torch.linspace(-0.3, 0.6, c, dtype=torch.float64)
        ema = torch.full((c,), 1.0 / c, dtype=torch.float64)
        f = _op_loss(2, targets, lambda: [ema.clone(), torch.tensor(0.8, dtype=torch.float64)],
                     [0.9, 1e-12], (0.0, 0.5, 3.0), reduction, True)
    tau.requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, tau))


# ----------------------------------------------------------------------------------------------
# Determinism: bitwise across runs and thread counts.
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,c,s,k", [(40000, 7, 1, 1), (64, 3000, 1, 1), (50, 9, 300, 9)])
def test_bitwise_deterministic_across_threads(n, c, s, k):
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(n, c, s, generator=g)
    targets = torch.randint(0, c, (n * s,), generator=g)
    targets[::17] = -100
    tau = torch.linspace(0.1, 0.5, k)
    state_fn = (lambda: mit_state(c)) if k == 1 else (
        lambda: [torch.full((c,), 1.0 / c, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)])
    kind = 0 if k == 1 else 2
    hp = [] if k == 1 else [0.9, 1e-12]
    temp = MIT_TEMP if k == 1 else CCT_TEMP
    threads = torch.get_num_threads()
    results = []
    try:
        for nt in (1, 2, 2, 1):
            torch.set_num_threads(nt)
            rs, summary = OPS.row_stats(logits, targets, tau, *temp, -100)
            st = state_fn()
            out = ops_step(kind, logits, targets, tau, st, hparams=hp, temp=temp)
            results.append((rs, summary, out["loss"], out["stats"], out["grad"], out["grad_tau"],
                            *st))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())


def _same_bits(a, b):
    """Equal bit for bit (so +0 is not -0), NaN matching any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return bool(torch.all((a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())))


def _channels_last_like(x):
    """The same values with the class dimension innermost (class stride 1: the row kernels)."""
    order = (0, *range(2, x.dim()), 1)
    inverse = [order.index(d) for d in range(x.dim())]
    return x.permute(order).contiguous().permute(inverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("c,spatial,k,reduction", [
    (2, (5, 7), 1, MEAN), (5, (3, 11), 5, NONE), (9, (2, 9), 1, NONE), (17, (4, 5), 17, MEAN),
    (40, (19,), 1, MEAN), (3, (8231,), 1, NONE)])
def test_spatial_lanes_are_bitwise_equal_to_rows(dtype, c, spatial, k, reduction):
    """Logits laid out as NCHW (spatial stride 1) take the spatial-lane kernels, W rows to a
    vector; with the classes innermost every row takes the row kernels. Same bits, with ignored
    rows, masked (-inf) classes, one or per-class temperatures, per-row incoming gradients, and
    on 1 and 2 threads (the 3 x 8231 rows split between threads inside a vector of rows)."""
    g = torch.Generator().manual_seed(c * 31 + len(spatial))
    n = 3 if c == 3 else 2
    x = (torch.randn(n, c, *spatial, generator=g) * 3).to(dtype)
    flat = x.view(n, c, -1)  # pixel p of image i: flat[i, :, p]
    flat[0, 1, :3] = -math.inf  # a masked class in a few rows
    flat[1, :, 0] = torch.tensor([(-1.0) ** k * 0.0 for k in range(c)]).to(dtype)  # +0, -0
    flat[1, 0, -1] = math.nan  # a NaN row
    targets = torch.randint(0, c, (n, *spatial), generator=g)
    targets.view(-1)[::7] = -100
    targets.view(n, -1)[:, :3] = 0  # not ignored: the rows holding -inf logits count
    targets.view(n, -1)[1, -1] = 0  # nor the NaN row
    tau = torch.linspace(-0.4, 0.8, k)
    grad_loss = None if reduction != NONE else torch.linspace(0.5, 1.5, targets.numel()).reshape(
        targets.shape).to(torch.float64 if dtype == torch.float64 else torch.float32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for layout, nt in ((lambda t: t, 1), (lambda t: t, 2), (_channels_last_like, 1)):
            torch.set_num_threads(nt)
            xl = layout(x)
            out = ops_step(0, xl, targets, tau, mit_state(c), reduction=reduction,
                           update_state=False,
                           grad_loss=None if grad_loss is None else grad_loss.reshape(-1))
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert outs[0]["grad"].is_contiguous() and not outs[2]["grad"].is_contiguous()
    for other in outs[1:]:
        for key in ("loss", "stats", "row_stats", "grad", "grad_tau"):
            assert _same_bits(outs[0][key], other[key]), key
    assert torch.all(outs[0]["grad"].view(n, c, -1)[0, 1, :3] == 0)  # masked: exactly 0
    assert torch.isnan(outs[0]["row_stats"]).any()  # the NaN row went through


def _layouts_of_rows(x):
    """[N, C, S] tensors holding x's values in layouts whose neighbouring rows are a stride apart
    (1, C, 2C, ..): (name, logits)."""
    n, c, s = x.shape
    wide = torch.zeros(n, 2 * c, s, dtype=x.dtype)
    wide[:, :c] = x
    return [
        ("contiguous", x),  # [N, C] rows (S = 1) or NCHW pixels
        ("classes_last", x.transpose(1, 2).contiguous().transpose(1, 2)),  # NHWC pixels, rows
        ("columns_of_wider", wide[:, :c]),  # gradient contiguous, logits rows 2C apart
        ("transposed", x.permute(2, 1, 0).contiguous().permute(2, 1, 0)),  # samples innermost
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("c", [2, 3, 7, 12, 13, 48, 49, 96, 97])
@pytest.mark.parametrize("spatial", [False, True])
def test_lanes_of_any_layout_are_bitwise_equal_to_rows(dtype, c, spatial):
    """Every layout whose rows go through the lanes (W rows to a vector: contiguous, or gathered
    a class at a time where the rows are strided) gives each row the bits the row kernels give
    it. A call of 3 rows always takes the row kernels (no group of W rows fits): the batch is
    checked against itself split that way, row by row, for the row statistics, the per-row loss
    and the gradient under per-row incoming gradients, with ignored rows, masked (-inf) classes,
    +0 / -0, a NaN row and per-class temperatures."""
    g = torch.Generator().manual_seed(7 * c + spatial)
    rows = 45
    n, s = (1, rows) if spatial else (rows, 1)
    flat = (torch.randn(rows, c, generator=g) * 3).to(dtype)  # row r's classes
    flat[1::5, 0] = -math.inf  # a masked class
    flat[4] = torch.tensor([(-1.0) ** k * 0.0 for k in range(c)]).to(dtype)  # +0, -0
    flat[9, -1] = math.nan
    x = flat.reshape(n, s, c).permute(0, 2, 1).contiguous()  # [N, C, S]
    targets = torch.randint(0, c, (rows,), generator=g)
    targets[::6] = -100
    targets[1::5] = torch.randint(1, c, (len(targets[1::5]),), generator=g)  # never the -inf one
    targets[9] = 0
    tau = torch.linspace(-0.4, 0.8, c)
    grad_loss = torch.linspace(0.5, 1.5, rows).to(torch.float64 if dtype == torch.float64
                                                    else torch.float32)

    def step(logits, ys, gl):  # MiT's step with a temperature a class (the op takes it)
        return ops_step(0, logits, ys, tau, mit_state(c), reduction=NONE, update_state=False,
                        grad_loss=gl)

    for name, logits in _layouts_of_rows(x):
        assert _same_bits(logits.contiguous(), x), name
        whole = step(logits, targets, grad_loss)
        parts = [step(logits[..., r:r + 3] if spatial else logits[r:r + 3], targets[r:r + 3],
                      grad_loss[r:r + 3]) for r in range(0, rows, 3)]
        rs = torch.cat([p["row_stats"] for p in parts], 1)
        assert _same_bits(whole["row_stats"], rs), name
        assert _same_bits(whole["loss"], torch.cat([p["loss"] for p in parts])), name
        grad = torch.cat([p["grad"] for p in parts], 2 if spatial else 0)
        assert _same_bits(whole["grad"].contiguous(), grad.contiguous()), name
        assert torch.isnan(whole["row_stats"][:, 9]).any(), name


# ----------------------------------------------------------------------------------------------
# opcheck of each mitkernels_C op (the Meta kernels in csrc/ops.cpp make them traceable).
# ----------------------------------------------------------------------------------------------
def _opcheck_inputs(kind):
    g = torch.Generator().manual_seed(41)
    c = 4
    logits = torch.randn(6, c, 2, dtype=torch.float64, generator=g)
    targets = torch.randint(0, c, (12,), generator=g)
    targets[3] = -100
    if kind == 0:
        return logits, targets, torch.tensor([0.2], dtype=torch.float64), mit_state(c), [], MIT_TEMP
    if kind == 1:
        return logits, targets, torch.zeros(1), [], [0.1], (0.0, 0.5, 0.5)
    return (logits, targets, torch.linspace(-0.3, 0.8, c), [torch.full((c,), 0.25, dtype=torch.float64),
            torch.tensor(2.0, dtype=torch.float64)], [0.9, 1e-12], CCT_TEMP)


@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("reduction", [MEAN, SUM, NONE])
def test_opcheck_each_op(kind, reduction):
    if kind == 2 and reduction == NONE:
        pytest.skip("reduction 'none' is not defined for CCT-EAL")
    logits, targets, tau, state, hp, temp = _opcheck_inputs(kind)
    torch.library.opcheck(OPS.row_stats.default, (logits, targets, tau, *temp, -100))
    rs, summary = OPS.row_stats(logits, targets, tau, *temp, -100)
    torch.library.opcheck(OPS.finalize_.default, (summary, None, rs, tau, state, kind, hp, *temp,
                                                  reduction, True, torch.float64))
    torch.library.opcheck(OPS.finalize_.default, (summary, summary.clone(), rs, tau, state, kind, hp,
                                                  *temp, reduction, False, torch.float32))
    fwd = (logits, targets, tau, state, kind, hp, *temp, -100, reduction, True, torch.float64)
    torch.library.opcheck(OPS.loss_forward_.default, fwd)
    loss, stats, rs, gi = OPS.loss_forward_(*fwd)
    torch.library.opcheck(OPS.loss_backward.default,
                          (torch.ones_like(loss), logits, targets, tau, rs, gi, *temp, -100,
                           reduction, True))


# ----------------------------------------------------------------------------------------------
# Input checks and the portable kernels.
# ----------------------------------------------------------------------------------------------
def test_the_first_invalid_target_is_named_as_the_reference_names_it():
    x, y = torch.randn(4, 3), torch.tensor([0, 5, -3, 1])
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match="found 5"):
            mitkernels.mit_loss(x, y, mitkernels.MiTState(3), backend=backend)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_ignored_pixels_get_a_zero_gradient_whatever_their_logits(layout):
    # An ignored pixel whose logits hold a masked class's -inf, or NaN (padding): its gradient
    # is exactly 0 on both layouts (a contiguous-lane store that skipped the zeroing gave NaN
    # in NCHW only).
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    x[:, 2] = -math.inf
    x[1, :, 3, 5] = math.nan
    y = torch.randint(0, 2, (2, 4, 8))
    y[0, 0, 0] = -100
    y[1, 3, 5] = -100
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    loss, _ = mitkernels.mit_loss(x, y, mitkernels.MiTState(3), backend="cpu")
    loss.backward()
    assert torch.equal(x.grad[0, :, 0, 0], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(x.grad[1, :, 3, 5], torch.zeros(3, dtype=torch.float64))
    assert not x.grad.isnan().any()


def test_integer_state_scalars_saturate_rather_than_overflow():
    # The op takes int32/int64 state scalars: an int32 total_seen past 2^31 and a dual_updates
    # at int64's max were converted with undefined behaviour (UBSan). They now hold their
    # largest values, as the reference's int64 count does.
    x, y, tau = torch.randn(4, 3, 1), torch.tensor([0, 1, 2, 0]), torch.zeros(1)
    state = mit_state(3)
    state[1] = torch.tensor(2**31 - 2, dtype=torch.int32)
    state[3] = torch.tensor(2**63 - 1, dtype=torch.int64)
    OPS.loss_forward_(x, y, tau, state, 0, [], *MIT_TEMP, -100, MEAN, True, torch.float32)
    assert int(state[1]) == 2**31 - 1 and int(state[3]) == 2**63 - 1
    state[3] = torch.tensor(2**31 - 1, dtype=torch.int32)  # an int32 count wrapped to -2^31
    OPS.loss_forward_(x, y, tau, state, 0, [], *MIT_TEMP, -100, MEAN, True, torch.float32)
    assert int(state[3]) == 2**31 - 1


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_narrower_kernels_match_the_reference(capability):
    """ATEN_CPU_CAPABILITY caps the row kernels: `default` selects the portable ones, `avx2` the
    AVX2 ones on a CPU whose own pick is AVX-512 (the rest of this file runs the widest set the
    CPU has). The same checks through them: the reference, eager low precision, the log, the
    lanes of every layout against the rows, 16-bit rows against float rows."""
    from mitkernels import _C

    info = _C.build_info()
    if capability not in info["cpu_kernels_compiled"]:
        pytest.skip(f"the extension has no {capability} kernels")
    if capability == info["cpu_kernels"]:
        pytest.skip(f"the rest of the suite runs the {capability} kernels")
    script = r"""
import torch, mitkernels._C as C
import sys; sys.path.insert(0, %r)
import test_cpu_kernels as t
if C.build_info()["cpu_kernels"] != %r:
    print("skip: the CPU lacks them", C.build_info())
    sys.exit(0)
for n, c in ((3, 2), (5, 37), (2, 4099)):
    x = torch.randn(n, c, dtype=torch.float64) * 2
    y = torch.randint(0, c, (n,))
    t.compare_mit(x, y)
    t.compare_mit(x.t().contiguous().t(), y)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    t.test_reduced_precision_within_eager_error(dtype, 4, 1000)
    if dtype != torch.float32:
        t.test_half_rows_match_float_rows_bitwise(dtype)
for spatial in (False, True):  # the log's and the strided lanes' branches
    t.test_row_log_s_within_float_rounding(spatial)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        t.test_lanes_of_any_layout_are_bitwise_equal_to_rows(dtype, 7, spatial)
for dtype in (torch.float32, torch.float64):  # the spatial lanes and the exp's branches
    t.test_spatial_lanes_are_bitwise_equal_to_rows(dtype, 17, (4, 5), 17, t.MEAN)
    t.test_spatial_lanes_are_bitwise_equal_to_rows(dtype, 5, (3, 11), 5, t.NONE)
print("ok")
""" % (os.path.dirname(os.path.abspath(__file__)), capability)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    if res.stdout.startswith("skip"):
        pytest.skip(res.stdout.strip())
    assert "ok" in res.stdout, res.stdout + res.stderr


def test_build_info():
    from mitkernels import _C

    info = _C.build_info()
    assert info["cpu"] is True and isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list) and info["torch_version"]
    assert info["cpu_kernels"] in info["cpu_kernels_compiled"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_layouts_are_bitwise_equal_to_contiguous(dtype):
    g = torch.Generator().manual_seed(51)
    base = torch.randn(4, 37, 6, 5, generator=g).to(dtype)
    targets = torch.randint(0, 37, (4, 6, 5), generator=g)
    tau = torch.tensor([0.3])
    outs = []
    for x in (base, base.contiguous(memory_format=torch.channels_last),
              base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
        outs.append(ops_step(0, x, targets, tau, mit_state(37)))
    for other in outs[1:]:
        for key in ("loss", "stats", "row_stats", "grad", "grad_tau"):
            assert torch.equal(outs[0][key], other[key]), key
