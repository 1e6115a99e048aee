"""mit_loss / tet_loss / cct_eal_loss on every backend this machine runs, against the reference."""
import math

import pytest
import torch

import mitkernels
from mitkernels import reference

from hypothesis import given, settings
from hypothesis.strategies import sampled_from

from conftest import check_golden_step, cpu_backends, masked_class_logits, mit_cases

BACKENDS = cpu_backends()


def _fresh_state(num_classes, tau0, dtype=torch.float64):
    state = mitkernels.MiTState(num_classes, dtype=dtype)
    with torch.no_grad():
        state.tau.fill_(tau0)
    return state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_index", range(4))
def test_golden_trajectory_through_mit_loss(golden_trajectory, backend, case_index):
    case = golden_trajectory["cases"][case_index]
    state = _fresh_state(case["num_classes"], case["tau0"])
    for step in case["steps"]:
        logits = torch.tensor(step["logits"], dtype=torch.float64, requires_grad=True)
        targets = torch.tensor(step["targets"])
        state.tau.grad = None
        loss, stats = mitkernels.mit_loss(logits, targets, state, backend=backend)
        loss.backward()
        check_golden_step(step, loss, stats, logits.grad, state.tau.grad)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("node", ["step", "python"])
def test_a_second_derivative_raises_rather_than_vanish(monkeypatch, backend, node):
    # The kernels have no second derivative. Under create_graph=True their gradients must not
    # join the graph as constants (a gradient penalty through them would silently be 0): a
    # second derivative that reaches them raises. One that does not (a penalty on another term)
    # works. node: the C++ step's autograd node, or the Python one (distributed calls, Triton
    # without the extension).
    from mitkernels import functional
    if node == "python":
        monkeypatch.setattr(functional, "_loss_step_op", lambda: None)
        monkeypatch.setattr(functional, "_triton_step_op", lambda: None)
    torch.manual_seed(3)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (8,))
    state = _fresh_state(4, 0.3)
    loss, _ = mitkernels.mit_loss(x, y, state, backend=backend)
    gx, gtau = torch.autograd.grad(loss, (x, state.tau), create_graph=True)
    ref_state = _fresh_state(4, 0.3)
    x_ref = x.detach().requires_grad_(True)
    ref_loss, _ = mitkernels.mit_loss(x_ref, y, ref_state, backend="reference")
    gx_ref, gtau_ref = torch.autograd.grad(ref_loss, (x_ref, ref_state.tau))
    torch.testing.assert_close(gx, gx_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(gtau, gtau_ref, atol=1e-10, rtol=1e-10)
    for g in (gx, gtau):
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad((g ** 2).sum(), x)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    loss, _ = mitkernels.mit_loss(x, y, state, backend=backend)
    _, gw = torch.autograd.grad(loss + (w ** 3).sum(), (x, w), create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gw.sum(), w)[0], 6 * w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_are_detached_float64_on_device(backend):
    state = mitkernels.MiTState(3)
    loss, stats = mitkernels.mit_loss(torch.randn(4, 3, requires_grad=True),
                                      torch.tensor([0, 1, 2, 1]), state, backend=backend)
    assert loss.requires_grad and loss.dtype == torch.float32
    for key in ("loss", "ce", "H", "H_star", "lambda", "T", "updated", "valid", "invalid_targets"):
        assert stats[key].dtype == torch.float64 and not stats[key].requires_grad, key
        assert stats[key].shape == ()


def _kernel_vs_reference(backend, logits, targets, reduction="mean", ignore_index=-100, tau0=0.3,
                         reference_logits=None):
    """Run one step on a backend and on the reference (on ``reference_logits`` when given) from
    equal states; compare everything."""
    num_classes = logits.shape[1]
    ref_state, state = _fresh_state(num_classes, tau0), _fresh_state(num_classes, tau0)
    ref_logits = logits if reference_logits is None else reference_logits
    outs = []
    for st, name, inputs in ((ref_state, "reference", ref_logits), (state, backend, logits)):
        x = inputs.detach().clone().requires_grad_(True)
        loss, stats = mitkernels.mit_loss(x, targets, st, backend=name, reduction=reduction,
                                          ignore_index=ignore_index)
        weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (loss * weight).sum().backward()
        outs.append((loss.detach(), stats, x.grad, st.tau.grad.clone(), st))
    (l0, s0, g0, t0, st0), (l1, s1, g1, t1, st1) = outs

    tol = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(l1, l0, **tol)
    torch.testing.assert_close(g1, g0, **tol)
    torch.testing.assert_close(t1, t0, **tol)
    for key in ("loss", "ce", "H", "H_star", "lambda", "T", "valid"):  # loss: the mean form
        torch.testing.assert_close(s1[key], s0[key], **tol)
    for name in ("class_counts", "total_seen", "lambda_entropy", "dual_updates"):
        torch.testing.assert_close(getattr(st1, name), getattr(st0, name), **tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignore_index(backend, reduction):
    torch.manual_seed(0)
    logits = torch.randn(9, 4, dtype=torch.float64) * 3
    targets = torch.tensor([0, 3, -1, 2, 1, -1, 0, 3, 2])
    _kernel_vs_reference(backend, logits, targets, reduction, ignore_index=-1)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_segmentation_layout_and_strides(backend):
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3, 4))
    targets[0, 1, 2] = -100
    _kernel_vs_reference(backend, logits, targets)
    _kernel_vs_reference(backend, logits, targets, reduction="none")
    transposed = torch.randn(6, 7, dtype=torch.float64).t()  # [7, 6], column-major rows
    _kernel_vs_reference(backend, transposed, torch.randint(0, 6, (7,)))
    strided = torch.randn(5, 16, dtype=torch.float64)[:, ::2]
    _kernel_vs_reference(backend, strided, torch.randint(0, 8, (5,)))


# ------------------------------------------------------------------------------------------
# Validation: clear errors, nothing touched.
# ------------------------------------------------------------------------------------------
def _snapshot(state):
    return {k: v.detach().clone() for k, v in
            {"tau": state.tau, **state.buffers()}.items()}


BAD_CALLS = [
    ("rank", lambda: (torch.randn(4), torch.zeros(4, dtype=torch.long)), ValueError, "logits must"),
    ("classes", lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), ValueError, "C = 5"),
    ("length", lambda: (torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, "shape"),
    ("int logits", lambda: (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
     TypeError, "floating point"),
    ("float targets", lambda: (torch.randn(4, 3), torch.zeros(4)), TypeError, "integer"),
    ("range", lambda: (torch.randn(4, 3), torch.tensor([0, 1, 3, 0])), ValueError, "found 3"),
    ("negative", lambda: (torch.randn(4, 3), torch.tensor([0, -5, 1, 0])), ValueError, "found -5"),
    ("complex", lambda: (torch.randn(4, 3, dtype=torch.complex64), torch.zeros(4, dtype=torch.long)),
     TypeError, "floating point"),
    # as many targets as rows, but not in the logits' spatial shape
    ("spatial", lambda: (torch.randn(2, 3, 2, 6), torch.zeros(2, 3, 4, dtype=torch.long)),
     ValueError, r"targets must have shape \(2, 2, 6\)"),
    ("fp16 tau", lambda: (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.float16),
     TypeError, "tau must be float32 or float64"),
    # uint8's 156 compared equal to ignore_index -100 (in uint8): the reference's check let it
    # through and indexed with it; uint64's 2^64 - 100 became -100 in int64 on the kernels
    ("uint8 target", lambda: (torch.randn(4, 3), torch.tensor([0, 156, 1, 2], dtype=torch.uint8)),
     ValueError, "found 156"),
    ("uint64 targets", lambda: (torch.randn(4, 3), torch.tensor([0, 2**64 - 100, 1, 2],
                                                                dtype=torch.uint64)),
     TypeError, "uint64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,error,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_and_leaves_state(backend, name, make, error, match):
    state = mitkernels.MiTState(3)
    logits, targets, *tau_dtype = make()
    if tau_dtype:
        state.tau = state.tau.detach().to(tau_dtype[0]).requires_grad_(True)
    before = _snapshot(state)
    with pytest.raises(error, match=match):
        mitkernels.mit_loss(logits, targets, state, backend=backend)
    for key, value in _snapshot(state).items():
        assert torch.equal(value, before[key]), key


def test_bad_options_raise():
    state = mitkernels.MiTState(3)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction"):
        mitkernels.mit_loss(x, y, state, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        mitkernels.mit_loss(x, y, state, ignore_index=1.5)
    with pytest.raises(mitkernels.BackendUnavailableError, match="unknown backend"):
        mitkernels.mit_loss(x, y, state, backend="tpu")
    with pytest.raises(mitkernels.BackendUnavailableError, match=r"^backend '' is not"):
        mitkernels.mit_loss(x, y, state, backend="")  # not a quiet "automatic", nor the env's
    for index in (2**63, -2**63 - 1):  # the kernels compare it with int64 targets
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            mitkernels.mit_loss(x, y, state, ignore_index=index)
    state.tau = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="tau must hold 1"):
        mitkernels.mit_loss(x, y, state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_the_kernels_cannot_update_raises_before_the_step(backend):
    # A state made under inference_mode (no gradient, no in-place update outside it) and a
    # strided histogram: each fails midway through a step unless refused first, with the state
    # untouched. (Under inference_mode itself, such a state is fine: an evaluation pass.)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.inference_mode():
        state = mitkernels.MiTState(3)
        mitkernels.mit_loss(x, y, state, backend=backend)
    before = {k: v.clone() for k, v in state.buffers().items()}
    with pytest.raises(ValueError, match="inference_mode"):
        mitkernels.mit_loss(x, y, state, backend=backend)
    for k, v in state.buffers().items():
        assert torch.equal(v, before[k]), k
    state = mitkernels.MiTState(3)
    state.class_counts = torch.ones(6, dtype=torch.float64)[::2]
    with pytest.raises(ValueError, match=r"class_counts must be contiguous"):
        mitkernels.mit_loss(x, y, state, backend=backend)
    assert torch.equal(state.class_counts, torch.ones(3, dtype=torch.float64))
    ema = torch.full((6,), 1 / 3, dtype=torch.float64)[::2]
    with pytest.raises(ValueError, match=r"label_freq_ema must be contiguous"):
        mitkernels.cct_eal_loss(x, y, torch.zeros(3, requires_grad=True), ema,
                                torch.tensor(0.3, dtype=torch.float64), backend=backend)


def test_forced_backend_that_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(mitkernels.BackendUnavailableError, match="triton"):
        mitkernels.mit_loss(torch.randn(2, 3), torch.tensor([0, 1]), mitkernels.MiTState(3),
                            backend="triton")
    monkeypatch.setenv("MITKERNELS_BACKEND", "cuda")
    with pytest.raises(mitkernels.BackendUnavailableError, match="cuda.*MITKERNELS_BACKEND"):
        mitkernels.mit_loss(torch.randn(2, 3), torch.tensor([0, 1]), mitkernels.MiTState(3))


def test_auto_choice_takes_cuda_beyond_tritons_rows(monkeypatch):
    """On CUDA tensors the automatic choice is Triton, whose kernels count rows (N x d1 x ..) in
    32 bits: a batch of more rows goes to the cuda backend (64-bit rows) where it is built. A
    backend asked for by name, or by MITKERNELS_BACKEND, is kept (Triton's launchers then refuse
    the batch with a clear error: test_triton.py). Expanded targets: no memory."""
    from mitkernels import _backends, functional

    monkeypatch.delenv("MITKERNELS_BACKEND", raising=False)
    here = {"triton", "cuda"}
    monkeypatch.setattr(_backends, "unavailable_reason",
                        lambda name, device: None if name in here else "not built")
    most = _backends.TRITON_MAX_ROWS

    def choice(shape, requested=None, classes=2):
        targets = torch.zeros((1,) * len(shape), dtype=torch.int64).expand(shape)
        return functional._backend_for(requested, torch.device("cuda"), None, targets, classes,
                                       -100)

    assert choice((most,)) == "triton"
    assert choice((most + 1,)) == "cuda"
    assert choice((2, 1024, most // 2048 + 1)) == "cuda"  # segmentation: N x H x W rows
    assert choice((1,), classes=most) == "triton"
    assert choice((1,), classes=most + 1) == "cuda"  # the column loops count in 32 bits too
    assert choice((most + 1,), requested="triton") == "triton"
    monkeypatch.setenv("MITKERNELS_BACKEND", "triton")
    assert choice((most + 1,)) == "triton"
    monkeypatch.delenv("MITKERNELS_BACKEND")
    here.discard("cuda")  # no CUDA kernels in the extension: Triton's clear error, not a switch
    assert choice((most + 1,)) == "triton"


def test_auto_choice_by_rows_traces_in_one_graph(monkeypatch):
    """Under torch.compile(fullgraph=True) the rows-aware choice is a constant for the graph
    (the environment read and the extension's build info are not traced), the row count a
    guard: one graph each side of the limit, dynamic shapes included."""
    from mitkernels import _backends

    monkeypatch.delenv("MITKERNELS_BACKEND", raising=False)

    def reason(name, device):
        torch._dynamo.graph_break()  # as the real one's pybind call (build_info) does to a trace
        return None if name in ("triton", "cuda") else "not built"

    monkeypatch.setattr(_backends, "unavailable_reason", reason)

    def f(t, scale):
        name = _backends.choose_for_rows(None, torch.device("cuda"), t.numel() * scale)
        return t + (1 if name == "cuda" else 2)

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=True, backend="eager")
    assert torch.equal(g(torch.zeros(4), 1), torch.full((4,), 2.0))
    assert torch.equal(g(torch.zeros(5), 2**30), torch.full((5,), 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nan_in_the_running_statistics_reaches_the_loss_on_every_backend(backend):
    # A NaN count (MiT) or EMA entry (CCT-EAL), set by hand (loading refuses it): H*, lambda and
    # the loss are NaN, as in the reference, not a finite value computed without it (a NaN-
    # dropping max or clamp in a kernel gave 2.21 for CCT-EAL's loss and H* = 0 for MiT's).
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    state = mitkernels.MiTState(3)
    state.class_counts[0] = float("nan")
    loss, stats = mitkernels.mit_loss(x, y, state, backend=backend)
    for value in (loss, stats["H_star"], stats["lambda"], state.lambda_entropy):
        assert torch.isnan(value).all()
    state = mitkernels.MiTState(3)
    state.class_counts.zero_()  # nothing counted, no update: H* of 0 / 0
    _, stats = mitkernels.mit_loss(x, y, state, backend=backend, update_state=False)
    assert torch.isnan(stats["H_star"])
    ema = torch.tensor([float("nan"), 0.5, 0.5], dtype=torch.float64)
    loss, stats = mitkernels.cct_eal_loss(x, y, torch.zeros(3), ema,
                                          torch.tensor(8.0, dtype=torch.float64), backend=backend)
    assert torch.isnan(loss) and torch.isnan(stats["H_star"])
    # A NaN tau (what an optimizer step on a NaN loss leaves): T and the loss are NaN and the
    # state is not updated, rather than T clamped to a bound and a finite loss
    state = mitkernels.MiTState(3)
    with torch.no_grad():
        state.tau.fill_(float("nan"))
    loss, stats = mitkernels.mit_loss(x, y, state, backend=backend)
    assert torch.isnan(loss) and torch.isnan(stats["T"]) and float(stats["updated"]) == 0.0
    assert int(state.dual_updates) == 0
    tau_c = torch.tensor([float("nan"), 0.0, 0.0])
    loss, stats = mitkernels.cct_eal_loss(x, y, tau_c, torch.full((3,), 1 / 3, dtype=torch.float64),
                                          torch.tensor(1.0, dtype=torch.float64), backend=backend)
    assert torch.isnan(loss) and torch.isnan(stats["T_mean"])


@pytest.mark.parametrize("backend", cpu_backends()[:2])
def test_tet_compiles_in_one_graph_with_its_floats_dynamic(backend):
    # TETLoss under dynamic=True, and tet_loss with a temperature that changes between calls:
    # the option check (math.isfinite) is not traced, so fullgraph holds.
    torch.manual_seed(5)
    x, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    crit = mitkernels.TETLoss(0.7, 0.2, backend=backend)
    torch._dynamo.reset()
    f = torch.compile(lambda x, y: crit(x, y)[0], fullgraph=True, dynamic=True)
    torch.testing.assert_close(f(x, y), crit(x, y)[0])
    g = torch.compile(lambda x, y, t: mitkernels.tet_loss(x, y, t, 0.1, backend=backend)[0],
                      fullgraph=True)
    for t in (0.5, 0.9, 1.3):
        torch.testing.assert_close(g(x, y, t),
                                   mitkernels.tet_loss(x, y, t, 0.1, backend=backend)[0])


@pytest.mark.parametrize("backend", cpu_backends())
def test_state_of_the_wrong_dtype_is_refused_by_every_backend(backend):
    """State tensors are updated in place, so they are never converted: each backend refuses
    the same ones, with the same message, and touches nothing."""
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    state = mitkernels.MiTState(3)
    state.class_counts = state.class_counts.float()
    with pytest.raises(TypeError, match="class_counts must be torch.float64"):
        mitkernels.mit_loss(x, y, state, backend=backend)
    assert torch.equal(state.class_counts, torch.ones(3)) and int(state.dual_updates) == 0
    tau_c = torch.zeros(3, requires_grad=True)
    ema = torch.full((3,), 1 / 3)  # float32
    with pytest.raises(TypeError, match="label_freq_ema must be torch.float64"):
        mitkernels.cct_eal_loss(x, y, tau_c, ema, 2.0, backend=backend)
    assert torch.equal(ema, torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="alpha must hold 1"):
        mitkernels.cct_eal_loss(x, y, tau_c, ema.double(), torch.ones(2, dtype=torch.float64),
                                backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_cct_eal_takes_alpha_as_a_number(backend):
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    out = []
    # alpha is only read: a float32 tensor was refused "as updated in place", and is now used
    for alpha in (2.5, torch.tensor(2.5, dtype=torch.float64), torch.tensor(2.5)):
        tau_c = torch.zeros(4, requires_grad=True)
        ema = torch.full((4,), 0.25, dtype=torch.float64)
        loss, stats = mitkernels.cct_eal_loss(x, y, tau_c, ema, alpha, backend=backend)
        out.append((loss, ema, float(stats["alpha_t"])))
    for other in out[1:]:
        assert torch.equal(out[0][0], other[0]) and torch.equal(out[0][1], other[1])
        assert other[2] == 2.5
    with pytest.raises(TypeError, match="alpha must be a number or a floating-point tensor"):
        mitkernels.cct_eal_loss(x, y, tau_c, ema, torch.tensor(2), backend=backend)
    # a schedule, not learned: the reference gave it a gradient, the kernels none
    with pytest.raises(TypeError, match="CCT-EAL's alpha is not learned"):
        mitkernels.cct_eal_loss(x, y, tau_c, ema, torch.tensor(2.5, requires_grad=True),
                                backend=backend)
    # read only, so one made under inference_mode serves (float64 was refused as "state")
    with torch.inference_mode():
        alpha = torch.tensor(2.5, dtype=torch.float64)
    tau_c = torch.zeros(4, requires_grad=True)
    ema = torch.full((4,), 0.25, dtype=torch.float64)
    loss, _ = mitkernels.cct_eal_loss(x, y, tau_c, ema, alpha, backend=backend)
    assert torch.equal(loss, out[0][0]) and torch.equal(ema, out[0][1])
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):  # not AttributeError
        mitkernels.cct_eal_loss(x.tolist(), y, tau_c, ema, 2.5, backend=backend)


def test_loss_options_are_checked():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for name in ("temperature", "lambda_entropy"):  # read as numbers: no gradient reaches them
        with pytest.raises(TypeError, match=f"TET's {name} is not learned"):
            mitkernels.tet_loss(x, y, **{name: torch.tensor(0.5, requires_grad=True)})
        # compiled too: the check had been skipped there, and the gradient silently lost
        compiled = torch.compile(mitkernels.tet_loss, backend="eager")
        with pytest.raises(TypeError, match=f"TET's {name} is not learned"):
            compiled(x, y, **{name: torch.tensor(0.5, requires_grad=True)})
    with pytest.raises(ValueError, match="lambda_entropy must be finite"):
        mitkernels.tet_loss(x, y, lambda_entropy=float("nan"))
    # A fixed temperature lies where MiT's own is clamped to: the kernels take its reciprocal
    # in float32, and TET's T = 1e39 gave NaN (float32 logits on cpu, float64 on Triton).
    for bad in (float("inf"), float("nan"), 0.0, -1.0, 1e-39, 1e39, 9e-4, 501.0):
        with pytest.raises(ValueError, match=r"temperature must lie in \[0.001, 500\]"):
            mitkernels.tet_loss(x, y, temperature=bad)
    with pytest.raises(ValueError, match="at least one class"):
        mitkernels.tet_loss(torch.randn(3, 0), torch.full((3,), -100))
    for backend in BACKENDS:  # Triton's CCT-EAL read a temperature that was not there
        with pytest.raises(ValueError, match="at least one class"):
            mitkernels.cct_eal_loss(torch.randn(3, 0), torch.full((3,), -100), torch.zeros(0),
                                    torch.zeros(0, dtype=torch.float64), 1.0, backend=backend)
    ema = torch.full((4,), 0.25, dtype=torch.float64)
    with pytest.raises(ValueError, match="ema_momentum"):
        mitkernels.cct_eal_loss(x, y, torch.zeros(4), ema, 1.0, ema_momentum=1.5)
    for t_min, t_max, match in [(1e-39, 1.5, "T_min must lie"), (0.75, 1e39, "T_max must lie"),
                                (1.5, 0.75, "T_min <= T_max")]:
        with pytest.raises(ValueError, match=match):
            mitkernels.cct_eal_loss(x, y, torch.zeros(4), ema, 1.0, t_min=t_min, t_max=t_max)
    assert torch.equal(ema, torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-3, 500.0], ids=["T-floor", "T-cap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_tet_at_the_ends_of_its_temperature_range(backend, temperature, dtype):
    # float64 logits: the reference in float64 (its fp32 step could round differently at 1e-3)
    x = torch.randn(5, 4, dtype=dtype) * 0.01  # small: x / 1e-3 stays a moderate logit
    y = torch.tensor([0, 1, 2, 3, 1])
    loss, _ = mitkernels.tet_loss(x, y, temperature=temperature, backend=backend)
    ref, _ = mitkernels.tet_loss(x.double(), y, temperature=temperature, backend="reference")
    assert math.isfinite(float(loss))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("targets", [torch.zeros(0, dtype=torch.long),
                                     torch.full((3,), -100, dtype=torch.long)],
                         ids=["empty", "all-ignored"])
def test_empty_and_all_ignored_batches(backend, targets):
    state = mitkernels.MiTState(4)
    before = _snapshot(state)
    logits = torch.randn(targets.numel(), 4, requires_grad=True)
    loss, stats = mitkernels.mit_loss(logits, targets, state, backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and math.isfinite(float(loss))
    assert torch.count_nonzero(logits.grad) == 0
    assert float(state.tau.grad) == 0.0
    assert float(stats["updated"]) == 0.0
    for key, value in _snapshot(state).items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", ["mit", "tet"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0, 4), (2, 4, 0)], ids=["N=0", "d1=0"])
def test_empty_batches_backward_for_every_reduction(backend, loss_name, reduction, shape):
    # Triton's backward read the upstream gradient's first element unmasked: with 'none' an
    # empty batch's holds none, and the interpreter crashed (a GPU would read out of bounds).
    logits = torch.randn(shape, requires_grad=True)
    targets = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    if loss_name == "mit":
        state = mitkernels.MiTState(4)
        loss, _ = mitkernels.mit_loss(logits, targets, state, backend=backend,
                                      reduction=reduction)
        inputs = (logits, state.tau)
    else:
        loss, _ = mitkernels.tet_loss(logits, targets, backend=backend, reduction=reduction)
        inputs = (logits,)
    assert loss.shape == (targets.shape if reduction == "none" else ())
    grads = torch.autograd.grad(loss.sum(), inputs)
    assert grads[0].shape == logits.shape
    assert all(float(g) == 0.0 for g in grads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_name", ["mit", "cct"])
def test_targets_made_in_inference_mode_take_a_step(backend, loss_name):
    # Labels kept from an inference_mode pass: the kernels updated the state, then torch refused
    # to save the targets for backward. The reference takes them; so must every backend.
    with torch.inference_mode():
        frozen = torch.tensor([0, 2, 1, 2, 0])
    targets = frozen.clone()
    x = torch.randn(5, 3, dtype=torch.float64)

    def step(t, b):
        logits = x.clone().requires_grad_(True)
        if loss_name == "mit":
            state = _fresh_state(3, 0.3)
            loss, _ = mitkernels.mit_loss(logits, t, state, backend=b)
            tau, buffers = state.tau, list(state.buffers().values())
        else:
            tau = torch.full((3,), 0.3, dtype=torch.float64, requires_grad=True)
            buffers = [torch.full((3,), 1 / 3, dtype=torch.float64)]
            loss, _ = mitkernels.cct_eal_loss(logits, t, tau, buffers[0], 2.0, backend=b)
        return [loss, *torch.autograd.grad(loss, (logits, tau)), *buffers]

    for got, want in zip(step(frozen, backend), step(targets, "reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_made_in_inference_mode_are_refused_before_the_step(backend):
    with torch.inference_mode():
        logits = torch.randn(4, 3)
    targets = torch.tensor([0, 2, 1, 2])
    state = mitkernels.MiTState(3)
    before = _snapshot(state)
    with pytest.raises(ValueError, match="inference_mode"):
        mitkernels.mit_loss(logits, targets, state, backend=backend)
    for key, value in _snapshot(state).items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():  # no gradient to record: the step runs
        mitkernels.mit_loss(logits, targets, state, backend=backend)
    assert int(state.dual_updates) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start", [2**53, 2**53 + 1, 2**62])
def test_dual_updates_counts_exactly_past_2_to_the_53(backend, start):
    # The C++ kernels counted through a double: 2^53 stayed 2^53, 2^53 + 1 stepped back.
    state = mitkernels.MiTState(3)
    state.dual_updates.fill_(start)
    mitkernels.mit_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), state, backend=backend)
    assert int(state.dual_updates) == start + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_clamped_temperature_passes_no_gradient_even_from_an_overflowed_row(backend, reduction):
    # T at its 1e-3 floor, and a row whose CE overflows float32 (1e36 / 1e-3): the kernels took
    # inf * dT/dtau = inf * 0 = NaN into tau's gradient, where torch's clamp passes 0.
    logits = torch.tensor([[1e36, -1e36, 0.0], [0.1, 0.2, 0.3]], requires_grad=True)
    state = _fresh_state(3, -30.0, dtype=torch.float32)
    loss, _ = mitkernels.mit_loss(logits, torch.tensor([1, 0]), state, backend=backend,
                                  reduction=reduction)
    loss.sum().backward()
    assert float(state.tau.grad) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_entropy_over_many_classes_is_summed_to_the_last_digits(backend):
    # H* of a 100,000-class histogram: the cpu finalize added its terms one after another
    # (8.5e-13 relative error); the reference sums pairwise (3e-16).
    num_classes = 100_000
    state = _fresh_state(num_classes, 0.5)
    _, stats = mitkernels.mit_loss(torch.zeros(3, num_classes, dtype=torch.float64),
                                   torch.tensor([5, num_classes - 1, 17]), state, backend=backend)
    counts = state.class_counts.tolist()
    total = math.fsum(counts)
    exact = -math.fsum(c / total * math.log(c / total) for c in counts)
    assert float(stats["H_star"]) == pytest.approx(exact, rel=2e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_nan_tau_gives_a_nan_loss_and_gradient(backend, reduction):
    # The reference's autograd gives tau a NaN gradient (the clamp passes 0, softplus' backward
    # multiplies it by NaN); the cpu kernels gave 0, Triton NaN.
    state = _fresh_state(4, float("nan"), dtype=torch.float32)
    loss, stats = mitkernels.mit_loss(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), state,
                                      backend=backend, reduction=reduction)
    assert torch.isnan(loss).all() and torch.isnan(stats["T"])
    loss.sum().backward()
    assert torch.isnan(state.tau.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dual_updates_holds_at_the_largest_count(backend):
    state = mitkernels.MiTState(3)
    state.dual_updates.fill_(2**63 - 1)  # the C++ kernels overflowed (undefined behaviour)
    mitkernels.mit_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), state, backend=backend)
    assert int(state.dual_updates) == 2**63 - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_cct_eal_with_one_class_and_no_valid_row_reports_no_temperature(backend):
    # T_mean is the valid rows' mean temperature: 0 with none (Triton reported T_0 with C = 1)
    ema = torch.ones(1, dtype=torch.float64)
    _, stats = mitkernels.cct_eal_loss(torch.randn(3, 1), torch.full((3,), -100), torch.zeros(1),
                                       ema, 1.0, backend=backend)
    assert float(stats["T_mean"]) == 0.0 and float(stats["valid"]) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_logits_skip_state_update(backend):
    state = mitkernels.MiTState(3)
    mitkernels.mit_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), state, backend=backend)
    before = _snapshot(state)
    # +inf anywhere; a -inf target logit, whose CE is +inf while H and V stay finite (a kernel
    # that checked only H and V updated the state there, and only +inf was tested)
    for where, value in (((1, 2), float("inf")), ((1, 1), float("-inf"))):
        logits = torch.randn(4, 3)
        logits[where] = value
        _, stats = mitkernels.mit_loss(logits, torch.tensor([0, 1, 2, 0]), state,
                                       backend=backend)
        assert float(stats["updated"]) == 0.0
        for key, now in _snapshot(state).items():
            assert torch.equal(now, before[key]), key
        for key in ("lambda", "H_star"):
            assert math.isfinite(float(stats[key]))


def test_reference_gives_nan_for_masked_classes():
    """The published code's 0 * log 0: why the kernels' masked-class tests take a finite oracle."""
    logits, targets, _ = masked_class_logits(6, 5, torch.float64, seed=8)
    loss, _ = mitkernels.mit_loss(logits, targets, mitkernels.MiTState(5), backend="reference")
    assert math.isnan(float(loss.detach()))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_masked_classes(backend, reduction):
    """-inf logits (masked classes) have p = 0: the loss, the gradients (0 at masked entries)
    and the state update are those of the finite oracle, for MiT, TET and CCT-EAL."""
    logits, targets, finite = masked_class_logits(11, 7, torch.float64, seed=9)
    _kernel_vs_reference(backend, logits, targets, reduction, reference_logits=finite)
    tol = dict(atol=1e-10, rtol=1e-10)
    outs = []
    for name, inputs in (("reference", finite), (backend, logits)):
        x = inputs.clone().requires_grad_(True)
        loss, _ = mitkernels.tet_loss(x, targets, 0.7, 0.2, backend=name, reduction=reduction)
        loss.sum().backward()
        outs.append((loss.detach(), x.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, **tol)
    if reduction == "none":
        return  # CCT-EAL's loss is a batch quantity
    outs = []
    for name, inputs in (("reference", finite), (backend, logits)):
        x = inputs.clone().requires_grad_(True)
        tau_c = torch.linspace(-0.5, 1.5, 7, dtype=torch.float64).requires_grad_(True)
        ema = torch.full((7,), 1 / 7, dtype=torch.float64)
        loss, _ = mitkernels.cct_eal_loss(x, targets, tau_c, ema, 3.0, backend=name)
        loss.backward()
        outs.append((loss.detach(), x.grad, tau_c.grad, ema))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, **tol)
    assert torch.all(outs[1][1][torch.isinf(logits)] == 0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=mit_cases())
def test_random_steps_against_reference(backend, case):
    """Shapes, scales, temperatures, ignored rows and masked classes drawn at random (the same
    draws on every run): every output of the step as the reference gives it."""
    logits, targets, finite, reduction, tau0 = case
    _kernel_vs_reference(backend, logits, targets, reduction, tau0=tau0, reference_logits=finite)


def _step_outputs(backend, logits, targets, reduction, tau0, tau_dtype):
    state = _fresh_state(logits.shape[1], tau0, dtype=tau_dtype)
    x = logits.clone().requires_grad_(True)
    loss, _ = mitkernels.mit_loss(x, targets, state, backend=backend, reduction=reduction)
    loss.double().sum().backward()
    return {"loss": loss.detach().double(), "grad": x.grad.double(),
            "grad_tau": state.tau.grad.double()}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(case=mit_cases(), dtype=sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_random_low_precision_steps_within_eager_error(backend, case, dtype):
    """float32, bfloat16 and float16 logits: the loss and both gradients are as close to the
    float64 step as eager PyTorch's in the same dtype (twice its error, plus 1e-6 of the scale;
    a float16 loss past 65504 is inf on both sides, as F.cross_entropy's). At large
    |x / T| this needs log p = (x - m) / T - log s (ops.ROW_STATS_FIELDS): z - lse missed by 100x;
    at small logits grad_tau needs CE - H formed per row: from rounded CE and H it missed by 1e4x.
    """
    logits, targets, finite, reduction, tau0 = case
    # the values both sides see: the oracle's -1e9 stands in for -inf, and float16's lowest
    # (-65504) for it in float16, where -1e9 would round to -inf (still a zero probability: its
    # shift is at least 65504 - 1500 over T <= 500)
    values = finite.clamp(min=torch.finfo(dtype).min).to(dtype)
    exact = _step_outputs("reference", values.double(), targets, reduction, tau0, torch.float64)
    eager = _step_outputs("reference", values, targets, reduction, tau0, torch.float32)
    got = _step_outputs(backend, logits.to(dtype), targets, reduction, tau0, torch.float32)
    for key, want in exact.items():
        if not want.numel():
            continue
        err = float((got[key] - want).abs().max())
        err_eager = float((eager[key] - want).abs().max())
        assert err <= 2 * err_eager + 1e-6 * max(1.0, float(want.abs().max())), (key, err,
                                                                                 err_eager)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_state_false_reads_state(backend):
    state = mitkernels.MiTState(3)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 1])
    mitkernels.mit_loss(x, y, state, backend=backend)
    before = _snapshot(state)
    loss, stats = mitkernels.mit_loss(x * 2, y, state, backend=backend, update_state=False)
    for key, value in _snapshot(state).items():
        assert torch.equal(value, before[key]), key
    assert float(stats["lambda"]) == float(before["lambda_entropy"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_match_contiguous(backend):
    torch.manual_seed(4)
    base = torch.randn(6, 10, 4)
    logits = base[:, :, 1]  # strided rows and columns
    targets = torch.randint(0, 10, (12,))[::2]
    s1, s2 = mitkernels.MiTState(10), mitkernels.MiTState(10)
    l1, _ = mitkernels.mit_loss(logits, targets, s1, backend=backend)
    l2, _ = mitkernels.mit_loss(logits.contiguous(), targets.contiguous(), s2, backend=backend)
    assert torch.equal(l1, l2)
    expanded = torch.randn(1, 10).expand(6, 10)
    l3, _ = mitkernels.mit_loss(expanded, targets, mitkernels.MiTState(10), backend=backend)
    l4, _ = mitkernels.mit_loss(expanded.contiguous(), targets, mitkernels.MiTState(10),
                                backend=backend)
    assert torch.equal(l3, l4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_bitwise(backend):
    torch.manual_seed(5)
    logits = torch.randn(300, 37)
    targets = torch.randint(0, 37, (300,))
    results = []
    for _ in range(3):
        state = mitkernels.MiTState(37)
        x = logits.clone().requires_grad_(True)
        loss, _ = mitkernels.mit_loss(x, targets, state, backend=backend)
        loss.backward()
        results.append((loss.detach(), x.grad, state.tau.grad, state.lambda_entropy.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# TET and CCT-EAL through every backend.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_a_float32_tau_on_a_clamp_bound_keeps_its_gradient(backend):
    # torch.clamp passes the gradient on its bounds. A float32 tau whose softplus(tau) + eps is a
    # bound once rounded to float32 (500 + 1e-6 is 500; softplus(tau) = 1.50000003 is 1.5) is on
    # the bound, so it has a gradient; a test on the unrounded value had it outside, with a
    # gradient of 0 that would keep tau there for good.
    torch.manual_seed(4)
    x, y = torch.randn(16, 5) * 3, torch.arange(16) % 5
    for temperature in (500.0, 1e-3, 1.0):
        grads = []
        for name in ("reference", backend):
            state = mitkernels.MiTState(5, temperature=temperature)
            loss, _ = mitkernels.mit_loss(x, y, state, backend=name)
            grads.append(torch.autograd.grad(loss, state.tau)[0])
        assert grads[0] != 0, temperature
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=0)
    tau = torch.tensor([math.log(math.expm1(0.75)), math.log(math.expm1(1.5)), -5.0, 5.0, 0.3])
    grads = []
    for name in ("reference", backend):
        t = tau.clone().requires_grad_(True)
        loss, _ = mitkernels.cct_eal_loss(x, y, t, torch.full((5,), 0.2, dtype=torch.float64),
                                          torch.tensor(0.0, dtype=torch.float64), backend=name)
        grads.append(torch.autograd.grad(loss, t)[0])
    assert (grads[0][:2] != 0).all() and (grads[0][2:4] == 0).all()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tet_against_reference(backend, reduction):
    torch.manual_seed(6)
    logits = torch.randn(7, 4, dtype=torch.float64) * 2
    targets = torch.tensor([0, 1, 2, 3, -100, 1, 0])
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    l1, s1 = reference.tet_loss(x1, targets, 0.7, 0.2, reduction=reduction)
    l2, s2 = mitkernels.tet_loss(x2, targets, 0.7, 0.2, backend=backend, reduction=reduction)
    l1.sum().backward()
    l2.sum().backward()
    torch.testing.assert_close(l2, l1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-10, rtol=1e-10)
    for key in ("loss", "ce", "H", "T", "lambda"):
        torch.testing.assert_close(s2[key], s1[key].double(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cct_eal_against_reference_over_steps(backend, reduction):
    torch.manual_seed(7)
    num_classes = 5
    make_state = lambda: (torch.linspace(-0.5, 1.5, num_classes, dtype=torch.float64)
                          .requires_grad_(True),
                          torch.full((num_classes,), 1 / num_classes, dtype=torch.float64),
                          torch.tensor(3.0, dtype=torch.float64))
    ref, mine = make_state(), make_state()
    for step in range(4):
        logits = torch.randn(12, num_classes, dtype=torch.float64) * 2
        targets = torch.randint(0, num_classes, (12,))
        targets[step] = -100
        outs = []
        for (tau_c, ema, alpha), fn in ((ref, reference.cct_eal_step),
                                         (mine, lambda *a, **k: mitkernels.cct_eal_loss(
                                             *a, backend=backend, **k))):
            x = logits.clone().requires_grad_(True)
            tau_c.grad = None
            loss, stats = fn(x, targets, tau_c, ema, alpha, reduction=reduction)
            loss.backward()
            outs.append((loss.detach(), x.grad, tau_c.grad.clone(), ema.clone(), stats))
        (l0, g0, t0, e0, s0), (l1, g1, t1, e1, s1) = outs
        tol = dict(atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(l1, l0, **tol)
        torch.testing.assert_close(g1, g0, **tol)
        torch.testing.assert_close(t1, t0, **tol)
        torch.testing.assert_close(e1, e0, **tol)
        for key in ("loss", "ce", "H", "H_star", "T_mean", "alpha_t"):
            torch.testing.assert_close(s1[key], s0[key].double(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cct_eal_with_no_entropy_floor_and_an_unseen_class(backend):
    # entropy_eps = 0 and an EMA entry of 0: p log p is 0 there (torch.xlogy), not 0 * -inf
    torch.manual_seed(8)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    outs = []
    for name in ("reference", backend):
        ema = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
        loss, stats = mitkernels.cct_eal_loss(x, y, torch.zeros(3), ema,
                                              torch.tensor(1.0, dtype=torch.float64),
                                              entropy_eps=0.0, backend=name)
        outs.append((loss.detach(), stats["H_star"]))
    assert torch.isfinite(outs[1][0])
    torch.testing.assert_close(outs[1][0], outs[0][0].to(outs[1][0].dtype))
    torch.testing.assert_close(outs[1][1], outs[0][1].double(), atol=1e-12, rtol=1e-12)


def test_cct_eal_rejects_none_reduction():
    with pytest.raises(ValueError, match="batch quantity"):
        mitkernels.cct_eal_loss(torch.randn(2, 3), torch.tensor([0, 1]),
                                torch.zeros(3, requires_grad=True),
                                torch.full((3,), 1 / 3, dtype=torch.float64),
                                torch.tensor(1.0, dtype=torch.float64), reduction="none")


def test_a_state_that_is_not_mit_is_named():
    # another loss, a state dict or None gave a bare AttributeError about class_counts
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    for wrong in (mitkernels.TETLoss(), mitkernels.CCTEALLoss(3), None,
                  mitkernels.MiTState(3).state_dict()):
        with pytest.raises(TypeError, match="state must be a MiTState or a MiTLoss"):
            mitkernels.mit_loss(x, y, wrong)


def test_one_hot_targets_get_a_hint():
    x = torch.randn(4, 3)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match=r"look one-hot; pass class indices \(targets.argmax"):
        mitkernels.mit_loss(x, one_hot, mitkernels.MiTState(3))
    with pytest.raises(ValueError, match=r"got \(4, 1\)$"):  # no hint where it would mislead
        mitkernels.mit_loss(x, one_hot[:, :1], mitkernels.MiTState(3))
    with pytest.raises(TypeError, match=r"look one-hot or like class probabilities"):
        mitkernels.mit_loss(x, one_hot.float(), mitkernels.MiTState(3))


def test_a_device_mismatch_names_the_tensor():
    # "found a tensor on meta" did not say which: usually a criterion never moved to the GPU
    x, y = torch.randn(4, 3, device="meta"), torch.tensor([0, 1, 2, 0])
    for backend in BACKENDS:  # targets elsewhere than CPU logits and state (the cpu kernel read
        # uninitialised memory when the fast all-on-CPU test left the targets out)
        with pytest.raises(ValueError, match="logits on cpu, targets are on meta$"):
            mitkernels.mit_loss(torch.randn(4, 3), y.to("meta"), mitkernels.MiTState(3),
                                backend=backend)
    with pytest.raises(ValueError, match="logits on meta, targets are on cpu$"):
        mitkernels.mit_loss(x, y, mitkernels.MiTState(3, device="meta"))
    with pytest.raises(ValueError, match=r"the loss's state is on cpu: move it there \(a crit"):
        mitkernels.mit_loss(x, y.to("meta"), mitkernels.MiTLoss(3))
    with pytest.raises(ValueError, match=r"the loss's state is on cpu: move it there \(a crit"):
        mitkernels.CCTEALLoss(3)(x, y.to("meta"))


# ------------------------------------------------------------------------------------------
# Cases that mutation testing found no test reaching: each test below fails with the mutation
# its comment names, and passes on the code as it is.
# ------------------------------------------------------------------------------------------
KERNELS = [b for b in BACKENDS if b != "reference"]


@pytest.mark.parametrize("backend", KERNELS)
def test_lambda_takes_no_negative_step_when_the_batch_entropy_passes_the_label_entropy(backend):
    # d = max(0, (H* - H) / log C). Without the floor, lambda fell to 0 (cpu) or 0.11 (Triton)
    # where the reference halves it: no golden step has H > H* once lambda has grown.
    y1 = torch.arange(8) % 4
    steps = [(10 * torch.nn.functional.one_hot(y1, 4).double(), y1),
             (torch.zeros(64, 4, dtype=torch.float64), torch.zeros(64, dtype=torch.long))]
    states = {"reference": _fresh_state(4, 0.3), backend: _fresh_state(4, 0.3)}
    lambdas = []
    for x, y in steps:
        stats = {name: mitkernels.mit_loss(x, y, st, backend=name)[1]
                 for name, st in states.items()}
        for key in ("loss", "H", "H_star", "lambda"):
            torch.testing.assert_close(stats[backend][key], stats["reference"][key],
                                       atol=1e-12, rtol=1e-12)
        lambdas.append(float(stats["reference"]["lambda"]))
    assert float(stats["reference"]["H"]) > float(stats["reference"]["H_star"])
    assert lambdas == [0.5, 0.25]  # the second step averages in a gap of 0
    for name in ("class_counts", "total_seen", "lambda_entropy", "dual_updates"):
        torch.testing.assert_close(getattr(states[backend], name),
                                   getattr(states["reference"], name), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("num_classes", [5, 67])  # cpu: C <= 64 counts in registers, more not
def test_an_ignore_index_that_is_a_class(backend, num_classes):
    # Every other test ignores -100, -1 or 255: a kernel that dropped the ignore_index test of
    # a valid class index counted those rows (loss 1.94 against 1.36, valid 6 against 3).
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(12, num_classes, dtype=torch.float64, generator=g) * 2
    targets = torch.randint(0, num_classes, (12,), generator=g)
    targets[::3] = 2
    for reduction in ("mean", "none"):
        _kernel_vs_reference(backend, logits, targets, reduction, ignore_index=2)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("tau0", [16.0, 19.5, 20.0])  # 20: dT/dtau is sigmoid(20) there, not 1
def test_a_float64_tau_below_softplus_threshold_is_not_taken_as_tau(backend, tau0):
    # softplus(tau) = tau only past torch's threshold of 20: at 16 the log1p term (1.1e-7) is
    # still there in float64 (a threshold of 15 dropped it; float32 tau hides it).
    torch.manual_seed(3)
    logits = torch.randn(6, 4, dtype=torch.float64) * 20
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    _kernel_vs_reference(backend, logits, targets, tau0=tau0)
    grads = []  # tau's gradient alone, relative: sigmoid(20) = 1 - 2e-9 hid under the atol
    for name in ("reference", backend):
        state = _fresh_state(4, tau0)
        mitkernels.mit_loss(logits, targets, state, backend=name)[0].backward()
        grads.append(state.tau.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=0.0, rtol=1e-12)


def _cct_pair(backend, logits, targets, ema, alpha=1.0, **kw):
    """One CCT-EAL step on the reference and on ``backend`` from equal states: their
    (loss, stats, logits' gradient, tau_c's gradient, ema) pairs."""
    outs = []
    for name in ("reference", backend):
        x = logits.clone().requires_grad_(True)
        tau_c = torch.linspace(-0.5, 1.5, logits.shape[1], dtype=torch.float64,
                               requires_grad=True)
        e = ema.clone()
        loss, stats = mitkernels.cct_eal_loss(x, targets, tau_c, e, alpha, backend=name, **kw)
        loss.backward()
        outs.append((loss.detach(), stats, x.grad, tau_c.grad, e))
    return outs


@pytest.mark.parametrize("backend", KERNELS)
def test_cct_eal_label_entropy_floors_frequencies_at_eps(backend):
    # H* = -sum p log p with p = max(ema, eps): the only test used eps = 0 (without the floor,
    # H* was 1.02965 against the reference's 1.03656 here).
    torch.manual_seed(4)
    logits = torch.randn(6, 4, dtype=torch.float64)
    ema = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    for update_state in (False, True):
        (l0, s0, g0, t0, e0), (l1, s1, g1, t1, e1) = _cct_pair(
            backend, logits, torch.tensor([0, 1, 2, 0, 1, 2]), ema, entropy_eps=1e-3,
            update_state=update_state)
        tol = dict(atol=1e-12, rtol=1e-12)
        for key in ("loss", "H_star"):
            torch.testing.assert_close(s1[key], s0[key], **tol)
        for a, b in ((l1, l0), (g1, g0), (t1, t0), (e1, e0)):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cct_eal_batch_of_ignored_rows_has_a_zero_loss(backend, reduction):
    # No valid row: loss 0, as the reference gives (Triton left alpha H*^2 = 1.92 in it; the
    # test with one class, where H* = 0, could not tell)
    logits = torch.randn(5, 4, dtype=torch.float64)
    ema = torch.full((4,), 0.25, dtype=torch.float64)
    (l0, *_), (l1, s1, g1, t1, _) = _cct_pair(backend, logits, torch.full((5,), -100), ema,
                                              reduction=reduction)
    assert float(l0) == 0.0 and float(l1) == 0.0 and float(s1["loss"]) == 0.0
    assert torch.count_nonzero(g1) == 0 and torch.count_nonzero(t1) == 0


def test_the_reference_refuses_a_process_group():
    # Asserted only where the extension is missing, it went unchecked where it is built.
    with pytest.raises(ValueError, match="process_group needs a kernel backend"):
        mitkernels.mit_loss(torch.randn(2, 3), torch.tensor([0, 1]), mitkernels.MiTState(3),
                            backend="reference", process_group=object())


STATS_KEYS = {
    "mit": {"loss", "ce", "H", "H_star", "lambda", "T", "updated", "valid", "invalid_targets"},
    "tet": {"loss", "ce", "H", "lambda", "T", "valid", "invalid_targets"},
    "cct": {"loss", "ce", "H", "H_star", "alpha_t", "T_mean", "updated", "valid",
            "invalid_targets"},
}


def _each_loss(backend, x, y, **kw):
    c = x.shape[1]
    yield "mit", mitkernels.mit_loss(x, y, mitkernels.MiTState(c), backend=backend, **kw)
    yield "tet", mitkernels.tet_loss(x, y, backend=backend, **kw)
    yield "cct", mitkernels.cct_eal_loss(x, y, torch.zeros(c, requires_grad=True),
                                         torch.full((c,), 1 / c, dtype=torch.float64), 2.0,
                                         backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_hold_the_documented_keys(backend):
    # the kernels' stats gained a None key (TET's unnamed field) that the reference lacks
    for name, (_, stats) in _each_loss(backend, torch.randn(4, 3), torch.tensor([0, 1, 2, 0])):
        assert set(stats) == STATS_KEYS[name], name


@pytest.mark.parametrize("backend", KERNELS)
def test_targets_with_gaps_through_compile(backend):
    # [::2] targets reach the traced ops as they are: a kernel that read them as contiguous
    # took every other label from the wrong row (loss 1.22 against 1.44)
    torch.manual_seed(5)
    x = torch.randn(6, 4, dtype=torch.float64)
    big = torch.randint(0, 4, (12,))
    want = dict(_each_loss(backend, x, big[::2].contiguous()))
    compiled = torch.compile(lambda x, y: dict(_each_loss(backend, x, y)), backend="aot_eager")
    got = compiled(x, big[::2])
    for name in want:
        torch.testing.assert_close(got[name][0], want[name][0], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tau_c_of_the_wrong_shape_is_refused(backend):
    # [C, 1] holds C values: the cpu kernel took it, the reference failed on an index
    with pytest.raises(ValueError, match=r"tau_c must hold 3 value\(s\), got shape \(3, 1\)"):
        mitkernels.cct_eal_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]),
                                torch.zeros(3, 1, requires_grad=True),
                                torch.full((3,), 1 / 3, dtype=torch.float64), 2.0,
                                backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_state_update_is_an_in_place_update_for_autograd(backend):
    # A graph that saved a state tensor before the step must not differentiate through its
    # updated value. The kernels write the state through pointers: before they marked it
    # written (its version counter), such a backward gave p.grad = the updated counts, [2, 3, 2],
    # where the reference raises, as torch does after any in-place update.
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    state = mitkernels.MiTState(3)
    ema = torch.full((3,), 1 / 3, dtype=torch.float64)
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    saved = [(p * state.class_counts).sum(), (p * state.lambda_entropy).sum(), (p * ema).sum()]
    mitkernels.mit_loss(x, y, state, backend=backend)
    mitkernels.cct_eal_loss(x, y, torch.zeros(3), ema, torch.tensor(1.0, dtype=torch.float64),
                            backend=backend)
    for graph in saved:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            graph.backward()
    # nothing is written, nothing is marked: a graph of the state survives an evaluation step
    state = mitkernels.MiTState(3)
    kept = (p * state.class_counts).sum()
    mitkernels.mit_loss(x, y, state, backend=backend, update_state=False)
    mitkernels.tet_loss(x, y, backend=backend)
    kept.backward()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_an_inference_state_is_refused_by_the_ops_before_anything_is_written(backend):
    # mit_loss refuses such a state itself; the public op, called directly, wrote it in place
    # outside inference mode, which torch forbids for an inference tensor.
    with torch.inference_mode():
        state = list(mitkernels.state.initial_buffers(3).values())
    x, y = torch.randn(4, 3, 1), torch.tensor([0, 1, 2, 1])
    with pytest.raises(RuntimeError, match="class_counts was made under torch.inference_mode"):
        torch.ops.mitkernels.loss_forward_(x, y, torch.zeros(1), state, 0, [], 1e-6, 1e-3, 500.0,
                                           -100, 1, True, torch.float32, backend)
    assert torch.equal(state[0], torch.ones(3, dtype=torch.float64))
    assert int(state[3]) == 0
    with torch.inference_mode():  # inside inference mode the update is allowed
        torch.ops.mitkernels.loss_forward_(x, y, torch.zeros(1), state, 0, [], 1e-6, 1e-3, 500.0,
                                           -100, 1, True, torch.float32, backend)
    assert int(state[3]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_and_options_no_step_can_use_are_refused(backend):
    # Each was taken before, with backends disagreeing or the state corrupted: a 1-class MiT
    # state (lambda 0/0 = NaN, stored as updated), counts shaped [1, C] (the reference ran, the
    # kernels raised from the op), a NaN entropy_eps (the reference's H* NaN, the kernels' not).
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    state = mitkernels.MiTState(3)
    state.class_counts = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="at least 2 classes"):
        mitkernels.mit_loss(x[:, :1], torch.zeros(4, dtype=torch.long), state, backend=backend)
    state = mitkernels.MiTState(3)
    state.class_counts = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"class_counts must hold \[3\]"):
        mitkernels.mit_loss(x, y, state, backend=backend)
    assert torch.equal(state.class_counts, torch.ones(1, 3, dtype=torch.float64))
    ema = torch.full((3,), 1 / 3, dtype=torch.float64)
    for eps in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="entropy_eps must be finite and >= 0"):
            mitkernels.cct_eal_loss(x, y, torch.zeros(3), ema, 1.0, entropy_eps=eps,
                                    backend=backend)
        with pytest.raises(ValueError, match="entropy_eps must be finite and >= 0"):
            mitkernels.CCTEALLoss(3, eps=eps, backend=backend)
    for alpha in (float("inf"), float("nan"), -1.0):  # as the loader refuses alpha_t
        with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
            mitkernels.cct_eal_loss(x, y, torch.zeros(3), ema, alpha, backend=backend)
    assert torch.equal(ema, torch.full((3,), 1 / 3, dtype=torch.float64))
