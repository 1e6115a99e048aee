"""The custom ops: schemas, opcheck, torch.compile(fullgraph=True), autocast."""
import pytest
import torch

import mitkernels
from mitkernels import _backends, ops
from mitkernels.state import initial_buffers

from conftest import cpu_backends

KERNEL_BACKENDS = [b for b in cpu_backends() if b != "reference"]
needs_kernels = pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend built here")


def test_public_schemas_are_kernel_schemas_plus_backend():
    for name, kernel_schema in ops.KERNEL_SCHEMAS.items():
        public = str(getattr(torch.ops.mitkernels, name).default._schema)
        assert public.startswith(f"mitkernels::{name}(")
        assert "str backend" in public


@pytest.mark.skipif(_backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
                    reason="C++ extension not built")
def test_compiled_library_registers_the_same_schemas():
    for name in ops.KERNEL_SCHEMAS:
        compiled = str(getattr(torch.ops.mitkernels_C, name).default._schema)
        public = str(getattr(torch.ops.mitkernels, name).default._schema)
        assert compiled.replace("mitkernels_C::", "") == \
            public.replace("mitkernels::", "").replace(", str backend)", ")"), name
    for name, schema in ops.EAGER_SCHEMAS.items():
        compiled = str(getattr(torch.ops.mitkernels_C, name).default._schema)
        expected = str(torch._C.parse_schema(f"mitkernels_C::{name}{schema}"))
        assert compiled == expected, name
    for name, kernel in ops.TRITON_KERNEL_OPS.items():
        compiled = str(getattr(torch.ops.mitkernels_C, name).default._schema)
        expected = str(torch._C.parse_schema(f"mitkernels_C::{name}{ops.KERNEL_SCHEMAS[kernel]}"))
        assert compiled == expected, name


def _op_args(kind, backend, dtype=torch.float64, reduction=1, n=6, c=4, s=1, layout="dense"):
    torch.manual_seed(0)
    if layout == "dense":
        logits = torch.randn(n, c, s, dtype=dtype)
    else:  # next-token logits: h[:, :-1].transpose(1, 2), a view with gaps, classes innermost
        logits = torch.randn(n, s + 1, c, dtype=dtype)[:, :-1].transpose(1, 2)
    targets = torch.randint(0, c, (n * s,))
    targets[1] = -100
    if kind == ops.KIND_MIT:
        tau = torch.tensor([0.2], dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        state = list(initial_buffers(c).values())
        hparams, temp = [], (1e-6, 1e-3, 500.0)
    elif kind == ops.KIND_TET:
        tau, state, hparams, temp = torch.zeros(1), [], [0.1], (0.0, 0.5, 0.5)
    else:
        tau = torch.linspace(-0.3, 0.8, c)
        state = [torch.full((c,), 1.0 / c, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)]
        hparams, temp = [0.9, 1e-12], (0.0, 0.75, 1.5)
    return logits, targets, tau, state, kind, hparams, temp, reduction


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", [ops.KIND_MIT, ops.KIND_TET, ops.KIND_CCT])
@pytest.mark.parametrize("layout", ["dense", "gaps"])
def test_opcheck_every_op(backend, kind, layout):
    # "gaps": the cpu gradient of such a view came out contiguous where the fake kernels (and
    # empty_like) give the view's order, and inductor's stride check failed the backward.
    logits, targets, tau, state, kind, hparams, temp, red = _op_args(
        kind, backend, s=1 if layout == "dense" else 3, layout=layout)
    loss_dtype = logits.dtype
    fwd_args = (logits, targets, tau, state, kind, hparams, *temp, -100, red, True, loss_dtype,
                backend)
    torch.library.opcheck(torch.ops.mitkernels.loss_forward_.default, fwd_args)
    row_stats, summary = torch.ops.mitkernels.row_stats(logits, targets, tau, *temp, -100, backend)
    torch.library.opcheck(torch.ops.mitkernels.row_stats.default,
                          (logits, targets, tau, *temp, -100, backend))
    torch.library.opcheck(torch.ops.mitkernels.finalize_.default,
                          (summary, None, row_stats, tau, state, kind, hparams, *temp, red, True,
                           loss_dtype, backend))
    loss, stats, row_stats, grad_info = torch.ops.mitkernels.loss_forward_(*fwd_args)
    grad = torch.ones_like(loss)
    torch.library.opcheck(torch.ops.mitkernels.loss_backward.default,
                          (grad, logits, targets, tau, row_stats, grad_info, *temp, -100, red, True,
                           backend))
    x = logits.clone().requires_grad_(True)
    t = tau.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.mitkernels.loss_with_grad.default,
                          (loss, x, t, targets, row_stats, grad_info, [*temp, -100.0], backend))


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradcheck_through_ops(backend):
    torch.manual_seed(1)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 2, 1])

    # lambda is a constant for autograd (published semantics): with update_state it would move
    # with the logits and finite differences would see it, so read it from the state instead.
    state = initial_buffers(4)
    state["lambda_entropy"].fill_(0.3)

    def f(logits, tau):
        holder = type("S", (), dict(tau=tau, **state))
        return mitkernels.mit_loss(logits, y, holder, backend=backend, update_state=False)[0]

    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, tau))


@pytest.mark.parametrize("backend", cpu_backends()[:2])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(2)
    model = torch.nn.Linear(6, 4)
    eager_crit = mitkernels.MiTLoss(4, backend=backend)
    comp_crit = mitkernels.MiTLoss(4, backend=backend)

    def step(crit, x, y):
        loss, stats = crit(model(x), y)
        return loss, stats

    compiled = torch.compile(step, fullgraph=True)
    for i in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
        model.zero_grad()
        l1, s1 = step(eager_crit, x, y)
        l1.backward()
        g1 = model.weight.grad.clone()
        model.zero_grad()
        l2, s2 = compiled(comp_crit, x, y)
        l2.backward()
        torch.testing.assert_close(l2, l1)
        torch.testing.assert_close(model.weight.grad, g1)
        torch.testing.assert_close(comp_crit.tau.grad, eager_crit.tau.grad)
        for key in s1:
            torch.testing.assert_close(s2[key], s1[key])
    for k, v in eager_crit.state_dict().items():
        torch.testing.assert_close(comp_crit.state_dict()[k], v)
    assert int(comp_crit.dual_updates) == 3


@pytest.mark.parametrize("backend", cpu_backends())
def test_autocast_bf16_computes_in_float32(backend):
    torch.manual_seed(3)
    model = torch.nn.Linear(6, 5)
    x, y = torch.randn(16, 6), torch.randint(0, 5, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss, _ = mitkernels.mit_loss(logits, y, mitkernels.MiTState(5), backend=backend)
        expected = torch.nn.functional.cross_entropy(logits, y)
    assert loss.dtype == torch.float32 and expected.dtype == torch.float32
    ref_loss, _ = mitkernels.mit_loss(logits.float(), y, mitkernels.MiTState(5),
                                      backend="reference")
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.weight.grad is not None and model.weight.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# loss_step_: the eager step of the C++ backends (views, forward, C++ autograd node).
# ------------------------------------------------------------------------------------------
needs_cpu_kernels = pytest.mark.skipif(
    _backends.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="C++ extension not built")


def _step_args(kind, reduction, spatial=False):
    logits, targets, tau, state, kind, hparams, temp, red = _op_args(
        kind, "cpu", reduction=reduction, n=4 if spatial else 6, s=3 if spatial else 1)
    n, c, s = logits.shape
    if spatial:  # [N, C, 3] as the [N, C, 3, 1] a segmentation model gives, targets [N, 3, 1]
        logits, targets = logits.reshape(n, c, s, 1), targets.reshape(n, s, 1)
    else:
        logits = logits.reshape(n, c)
    if kind == ops.KIND_MIT:
        tau = tau.reshape(())  # MiTState.tau is 0-dim
    return logits, targets, tau, state, kind, hparams, temp, red


STEP_CASES = [(ops.KIND_MIT, 1, False), (ops.KIND_MIT, 0, True), (ops.KIND_MIT, 2, True),
              (ops.KIND_TET, 0, False), (ops.KIND_CCT, 1, False), (ops.KIND_CCT, 2, True)]


@needs_cpu_kernels
@pytest.mark.parametrize("kind,reduction,spatial", STEP_CASES)
def test_opcheck_loss_step(kind, reduction, spatial):
    logits, targets, tau, state, kind, hparams, temp, red = _step_args(kind, reduction, spatial)
    x = logits.clone().requires_grad_(True)
    t = tau.clone().requires_grad_(kind != ops.KIND_TET)
    torch.library.opcheck(torch.ops.mitkernels_C.loss_step_.default,
                          (x, targets, t, state, kind, hparams, *temp, -100, red, True, x.dtype))


@needs_cpu_kernels
@pytest.mark.parametrize("kind,reduction,spatial", STEP_CASES)
def test_gradcheck_loss_step(kind, reduction, spatial):
    # update_state=False: the coefficient is read from the state, so finite differences see the
    # same function as the analytic gradient (it is a constant for autograd).
    logits, targets, tau, state, kind, hparams, temp, red = _step_args(kind, reduction, spatial)
    targets.view(-1)[2] = -100
    if kind == ops.KIND_MIT:
        state[2].fill_(0.3)  # lambda, so that the entropy term takes part
    x = logits.clone().requires_grad_(True)
    t = tau.to(torch.float64).requires_grad_(kind != ops.KIND_TET)

    def f(x, t):
        loss, _ = torch.ops.mitkernels_C.loss_step_(x, targets, t, state, kind, hparams, *temp,
                                                    -100, red, False, x.dtype)
        return loss

    assert torch.autograd.gradcheck(f, (x, t))


@needs_cpu_kernels
def test_loss_step_node_prints_a_readable_name():
    logits = torch.randn(4, 3, requires_grad=True)
    loss, _ = mitkernels.mit_loss(logits, torch.tensor([0, 1, 2, 0]), mitkernels.MiTState(3),
                                  backend="cpu")
    assert "grad_fn=<CppNode<MitkernelsLossBackward>>" in str(loss), str(loss)


@needs_cpu_kernels
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_step_in_inference_mode_matches_reference(reduction):
    # Below autograd the op takes its CompositeExplicitAutograd kernel: same values, no graph.
    torch.manual_seed(4)
    logits, targets = torch.randn(7, 4, 2, dtype=torch.float64), torch.randint(0, 4, (7, 2))
    kernel_state, ref_state = mitkernels.MiTState(4), mitkernels.MiTState(4)
    with torch.inference_mode():
        loss, stats = mitkernels.mit_loss(logits, targets, kernel_state, backend="cpu",
                                          reduction=reduction)
    ref_loss, ref_stats = mitkernels.mit_loss(logits, targets, ref_state, backend="reference",
                                              reduction=reduction)
    assert not loss.requires_grad and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss.detach())
    for key in ("ce", "H", "H_star", "lambda", "T", "valid"):
        torch.testing.assert_close(stats[key], ref_stats[key], msg=key)
    torch.testing.assert_close(kernel_state.class_counts, ref_state.class_counts)


@needs_cpu_kernels
def test_loss_step_sees_logits_changed_in_place_before_backward():
    # The node saves the logits themselves, so autograd's version check catches a change that
    # would make the gradient wrong.
    logits = torch.randn(5, 3, requires_grad=True)
    x = logits * 1.0
    loss, _ = mitkernels.mit_loss(x, torch.tensor([0, 1, 2, 0, 1]), mitkernels.MiTState(3),
                                  backend="cpu")
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_row_stats_of_16_bit_logits(backend, dtype):
    # The row statistics are float32 whatever the logits' dtype: a fake kernel that gave them
    # the logits' dtype passed every float32/float64 opcheck (mutation testing)
    logits, targets, tau, *_ = _op_args(ops.KIND_MIT, backend, dtype=dtype)
    torch.library.opcheck(torch.ops.mitkernels.row_stats.default,
                          (logits, targets, tau, 1e-6, 1e-3, 500.0, -100, backend))


def _bad_op_calls():
    """(case, op, arguments without backend, message): calls each kernel backend must refuse
    before it writes anything. Most would read or write past a buffer if they ran."""
    x, y, tau = torch.randn(4, 3, 1), torch.tensor([0, 1, 2, 0]), torch.zeros(1)
    temp = (1e-6, 1e-3, 500.0)

    def mit(c=3):
        return list(initial_buffers(c).values())

    cct = [torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    rs, summary = torch.ops.mitkernels.row_stats(x, y, tau, *temp, -100, KERNEL_BACKENDS[0])
    _, _, _, gi = torch.ops.mitkernels.loss_forward_(x, y, tau, mit(), 0, [], *temp, -100, 1,
                                                     False, torch.float32, KERNEL_BACKENDS[0])
    fwd = (x, y, tau, mit(), 0, [], *temp, -100, 1, True, torch.float32)
    fin = (summary, None, rs, tau, mit(), 0, [], *temp, 1, True, torch.float32)
    bwd = (torch.ones(()), x, y, tau, rs, gi, *temp, -100, 1, True)
    strided = torch.full((6,), 7.0, dtype=torch.float64)[::2]  # written as if contiguous

    def with_(args, **at):
        args = list(args)
        for i, v in at.items():
            args[int(i[1:])] = v
        return tuple(args)

    return [
        ("logits_2d", "row_stats", (x[..., 0], y, tau, *temp, -100),
         r"logits must be \[N, C, S\]"),
        ("logits_int", "row_stats", (x.int(), y, tau, *temp, -100),
         "logits must be float16, bfloat16, float32 or float64"),
        ("short_targets", "loss_forward_", with_(fwd, a1=y[:3]),
         r"targets must be \[N\*S\] = \[4\]"),
        ("float_targets", "row_stats", (x, y.float(), tau, *temp, -100), "int64 or int32"),
        ("two_taus", "row_stats", (x, y, torch.zeros(2), *temp, -100),
         r"tau must be \[1\] or \[C\]"),
        ("int_tau", "loss_backward", with_(bwd, a3=torch.zeros(1, dtype=torch.int64)),
         "tau must be float32 or float64"),
        ("short_counts", "loss_forward_", with_(fwd, a3=mit(2)), "class_counts must be"),
        ("long_counts", "loss_forward_", with_(fwd, a3=mit(4)),
         r"class_counts .* got Double \[4\]"),
        ("strided_counts", "loss_forward_", with_(fwd, a3=[strided] + mit()[1:]), "not contiguous"),
        ("mit_state_of_3", "finalize_", with_(fin, a4=mit()[:3]), "MiT state is"),
        ("two_value_lambda", "finalize_", with_(fin, a4=mit()[:2] + [torch.zeros(2)] + mit()[3:]),
         "lambda_entropy must hold one value"),
        ("unknown_kind", "loss_forward_", with_(fwd, a4=7), "kind must be 0"),
        ("unknown_reduction", "finalize_", with_(fin, a10=3), "reduction must be 0"),
        ("cct_none", "loss_forward_",
         (x, y, torch.zeros(3), cct, 2, [0.9, 1e-12], 0.0, 0.75, 1.5, -100, 0, True,
          torch.float32), "reduction 'none' is not defined for CCT-EAL"),
        ("cct_short_hparams", "loss_forward_",
         (x, y, torch.zeros(3), cct, 2, [0.9], 0.0, 0.75, 1.5, -100, 1, True, torch.float32),
         "CCT-EAL hparams are"),
        ("tet_with_state", "loss_forward_", with_(fwd, a4=1, a5=[0.1]), "TET state is"),
        ("tet_no_lambda", "loss_forward_", with_(fwd, a3=[], a4=1), "TET hparams are"),
        # a third hparam: the GPU kernels take two, and dropped it without a word
        ("cct_three_hparams", "loss_forward_",
         (x, y, torch.zeros(3), cct, 2, [0.9, 1e-12, 5.0], 0.0, 0.75, 1.5, -100, 1, True,
          torch.float32), r"CCT-EAL hparams are \[ema_momentum, entropy_eps\], got 3"),
        ("mit_with_hparams", "finalize_", with_(fin, a6=[0.5]), r"MiT hparams are \[\], got 1"),
        ("float8_loss", "loss_forward_", with_(fwd, a12=torch.float8_e4m3fn),
         "loss_dtype must be float16, bfloat16, float32"),
        ("short_local_summary", "finalize_", with_(fin, a1=summary[:4].clone()),
         "local_summary must be float64 like summary"),
        ("summary_for_one_tau", "finalize_", with_(fin, a3=torch.zeros(3)), "summary has"),
        ("row_stats_of_3_rows", "loss_backward", with_(bwd, a4=rs[:, :3].contiguous()),
         "row_stats must be"),
        ("float64_row_stats", "loss_backward", with_(bwd, a4=rs.double()),
         "row_stats must be Float"),
        ("short_grad_info", "loss_backward", with_(bwd, a5=gi[:2].clone()), "grad_info must be"),
        ("rows_grad_for_mean", "loss_backward", with_(bwd, a0=torch.ones(4)),
         "grad_loss must be a scalar"),
        ("short_grad_for_none", "loss_backward", with_(bwd, a0=torch.ones(3), a10=0),
         r"grad_loss must be \[R\] = \[4\]"),
    ]


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_op_calls())), ids=[c[0] for c in _bad_op_calls()])
def test_every_kernel_backend_refuses_bad_op_input(backend, case):
    # The public ops take any tensors. The C++ backends check them (csrc/op_checks.h), the
    # Triton launchers with the same messages (mitkernels/triton/checks.py): before, Triton took
    # a short class_counts and wrote past it, read past short targets, and ran CCT-EAL's
    # finalize for an unknown kind.
    _, op, args, message = _bad_op_calls()[case]
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a])
               if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.mitkernels, op)(*args, backend)
    for b, a in zip(before, tensors):
        assert torch.equal(b, a), "a refused call changed an input"


@needs_kernels
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_op_inputs_are_read_as_their_values(backend):
    # The contract's targets and tau are contiguous; a strided view is read by its values (the
    # C++ ops make it contiguous; Triton's kernels read it as if contiguous, which took every
    # other element of the storage).
    torch.manual_seed(4)
    x = torch.randn(4, 3, 1)
    y = torch.tensor([0, 9, 1, 9, 2, 9, 0, 9])[::2]
    tau = torch.tensor([0.3, 9.0, -0.2, 9.0, 0.5, 9.0])[::2]
    for args in ((x, y, torch.zeros(1)), (x, y, tau)):
        strided = torch.ops.mitkernels.row_stats(*args, 0.0, 0.75, 1.5, -100, backend)
        dense = torch.ops.mitkernels.row_stats(*(a.contiguous() for a in args), 0.0, 0.75, 1.5,
                                               -100, backend)
        for s, d in zip(strided, dense):
            assert torch.equal(s, d)
    cct = [torch.full((3,), 1 / 3, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]
    _, _, rs, gi = torch.ops.mitkernels.loss_forward_(x, y.contiguous(), tau.contiguous(), cct, 2,
                                                      [0.9, 1e-12], 0.0, 0.75, 1.5, -100, 1,
                                                      False, torch.float32, backend)
    rs_strided = torch.stack([rs, rs], 2)[..., 0]  # the same values, strides (2R, 2)
    grads = [torch.ops.mitkernels.loss_backward(torch.ones(()), x, yy, tt, r, gi, 0.0, 0.75, 1.5,
                                                -100, 1, True, backend)
             for yy, tt, r in ((y, tau, rs_strided), (y.contiguous(), tau.contiguous(), rs))]
    for s, d in zip(*grads):
        assert torch.equal(s, d)


@needs_cpu_kernels
def test_the_eager_step_op_refuses_what_mit_loss_refuses_before_the_state_moves():
    # mitkernels_C::loss_step_ called directly (mit_loss checks these itself): a float target
    # was truncated to a class and counted; targets of the right count in another shape gave a
    # loss of their shape; inference logits with a tau that takes a gradient updated the state,
    # then failed to save the logits.
    logits, targets, tau, state, kind, hparams, temp, red = _step_args(ops.KIND_MIT, 0, True)
    before = [t.clone() for t in state]
    step = torch.ops.mitkernels_C.loss_step_
    t = tau.clone().requires_grad_(True)
    with pytest.raises(TypeError, match="targets must hold integer class indices"):
        step(logits, targets.double(), t, state, kind, hparams, *temp, -100, red, True,
             logits.dtype)
    with pytest.raises(ValueError, match="targets must be shaped as the logits"):
        step(logits, targets.reshape(-1, 1, 4), t, state, kind, hparams, *temp, -100, red,
             True, logits.dtype)
    with torch.inference_mode():
        frozen = logits.clone()
    with pytest.raises(ValueError, match="cannot be saved for the temperature's gradient"):
        step(frozen, targets, t, state, kind, hparams, *temp, -100, red, True, logits.dtype)
    for b, a in zip(before, state):
        assert torch.equal(b, a)
    step(logits, targets.to(torch.int16), t, state, kind, hparams, *temp, -100, red, True,
         logits.dtype)  # a narrower integer dtype is taken
    assert int(state[3]) == 1
