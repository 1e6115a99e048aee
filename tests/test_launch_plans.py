"""Launch plans (``mitkernels/triton/launch_plans.py``, ``csrc/triton_plans.cpp``).

CPU, under ``TRITON_INTERPRET=1`` (``test_triton.py``'s ``test_interpreter_suite`` runs this
module in such a process): the interpreter compiles nothing, so the plans are recorded with the
kernels compiled ahead of time for sm_90 the way a launch would compile them (the JIT's binder
and specialization, ``triton.compile``), and replayed into the extension's logging launcher. Each
replayed launch is then checked against the Python launchers run on copies of the same inputs:
the same compiled specialization, grid, block and shared memory; every parameter of the
compiled kernel's PTX entry filled (pointers to the right tensors, the same integers and floats,
the scratch pointers null). The launch itself (cuLaunchKernel) runs only on a GPU:
``test_cuda_plans_match_the_python_launches``.
"""
import os
import re
import struct
import types

import pytest
import torch

triton = pytest.importorskip("triton")

import mitkernels  # noqa: E402
from mitkernels import _backends, ops  # noqa: E402
from mitkernels.triton import launch_plans  # noqa: E402
from conftest import gpu_test, jit_mit_loss_module  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EXT = _backends.extension()
HAVE_PLANS = not isinstance(EXT, ImportError) and hasattr(EXT, "_triton_plan_store")
cpu_only = pytest.mark.skipif(
    not (INTERPRET and HAVE_PLANS),
    reason="needs the extension, and TRITON_INTERPRET=1 (test_triton.py's interpreter suite)")
BACKWARD_KERNELS = ("_backward_kernel", "_grad_tau_none_kernel")


# ------------------------------------------------------------------------------------------
# Compiling as a launch would, without a GPU.
# ------------------------------------------------------------------------------------------
METADATA = ("name", "hash", "shared", "num_warps", "num_ctas", "global_scratch_size",
            "profile_scratch_size", "launch_pdl", "launch_cooperative_grid")
_WORKER_JIT = None


def _compile_in_worker(name, signature, constexprs, attrs, options):
    """In a process without the interpreter (Triton's own jit functions, tl.cdiv among them, are
    interpreted in this one): compile kernel ``name`` for sm_90."""
    global _WORKER_JIT
    from triton.backends.compiler import GPUTarget

    if _WORKER_JIT is None:
        _WORKER_JIT = jit_mit_loss_module()
    src = triton.compiler.ASTSource(getattr(_WORKER_JIT, name), signature, constexprs, attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return (dict(ck.src.signature), {f: getattr(ck.metadata, f, None) for f in METADATA},
            ck.asm["ptx"])


class AotCompiler:
    """``compiled_for`` for the recorder: each interpreted launch's kernel compiled for sm_90 with
    the specialization and options a GPU launch would give it (Triton 3.9's JIT path: its binder
    and _pack_args here, triton.compile in a worker process), and a made-up function handle
    for each compiled variant."""

    def __init__(self):
        import concurrent.futures
        import multiprocessing

        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.jit = jit_mit_loss_module()
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {name: create_function_from_signature(k.signature, k.params, self.backend)
                        for name, k in self.jit.KERNELS.items()}
        self.compiled = {}
        interpret = os.environ.pop("TRITON_INTERPRET", None)
        try:  # the worker starts now, without TRITON_INTERPRET
            self.pool = concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn"))
            self.pool.submit(os.getpid).result()
        finally:
            if interpret is not None:
                os.environ["TRITON_INTERPRET"] = interpret

    def __call__(self, kernel, args, kwargs):
        from triton import knobs

        name = kernel.fn.__name__
        jit = self.jit.KERNELS[name]
        kw = dict(kwargs, debug=False,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
        bound, specialization, options = self.binders[name](*args, **kw)
        key = (name, str(specialization), str(options))
        if key not in self.compiled:
            options, signature, constexprs, attrs = jit._pack_args(self.backend, kw, bound,
                                                                   specialization, options)
            sig, meta, ptx = self.pool.submit(_compile_in_worker, name, signature, constexprs,
                                              attrs, dict(options.__dict__)).result()
            self.compiled[key] = types.SimpleNamespace(
                src=types.SimpleNamespace(signature=sig), metadata=types.SimpleNamespace(**meta),
                asm={"ptx": ptx}, function=0x5EED0000 + len(self.compiled))
        return self.compiled[key]


@pytest.fixture(scope="module")
def aot():
    try:
        compiler = AotCompiler()
    except (ImportError, AttributeError) as err:  # Triton internals other than 3.9's
        pytest.skip(f"this Triton's JIT internals differ: {err}")
    yield compiler
    compiler.pool.shutdown()


@pytest.fixture
def plans(monkeypatch, aot):
    """Plans on, recorded with ``aot``, replayed into the logging launcher."""
    monkeypatch.setenv("MITKERNELS_TRITON_LAUNCH", "cpp")
    monkeypatch.setattr(launch_plans, "compiled_for", aot)
    EXT._triton_plan_clear()
    EXT._triton_plan_test_launcher(True)
    yield EXT
    EXT._triton_plan_test_launcher(False)
    EXT._triton_plan_clear()


# ------------------------------------------------------------------------------------------
# The step of each case: every forward path of mit_loss.py and both backwards.
# ------------------------------------------------------------------------------------------
CASES = {
    # name: (loss, logits shape, dtype, reduction); the launcher path it takes
    "fused": ("mit", (9, 6), torch.float32, "mean"),             # _fused_kernel
    "rows_none": ("mit", (2000, 5), torch.float32, "none"),      # _forward_kernel, none-loss
    "wide": ("mit", (6, 1500), torch.float32, "sum"),            # _rows_kernel + classes finalize
    "spatial_bf16": ("mit", (4, 3, 40, 40), torch.bfloat16, "mean"),  # SPATIAL tiles
    "cct": ("cct", (1500, 7), torch.float32, "mean"),            # rows + summary + finalize
    "tet_fp64": ("tet", (30, 4), torch.float64, "mean"),         # fused, TET's dummy state
}


def make_inputs(case, seed):
    loss_name, shape, dtype, reduction = CASES[case]
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    logits = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, c, (shape[0], *shape[2:]), generator=g)
    targets.view(-1)[3] = -100
    if loss_name == "mit":
        state = mitkernels.MiTState(c, temperature=0.8)
        extra = {"state": state}
    elif loss_name == "cct":
        extra = {"tau": torch.linspace(-0.4, 0.4, c, dtype=torch.float64).requires_grad_(True),
                 "ema": torch.full((c,), 1 / c, dtype=torch.float64),
                 "alpha": torch.tensor(0.3, dtype=torch.float64)}
    else:
        extra = {}
    return logits, targets, extra


def clone_inputs(inputs):
    logits, targets, extra = inputs
    extra2 = {}
    for k, v in extra.items():
        if isinstance(v, mitkernels.MiTState):
            s = mitkernels.MiTState(v.num_classes)
            s.load_state_dict(v.state_dict())
            extra2[k] = s
        else:
            extra2[k] = v.detach().clone().requires_grad_(v.requires_grad)
    return logits.clone(), targets.clone(), extra2


def user_tensors(inputs):
    """name -> tensor of what a call's kernels may point at directly."""
    logits, targets, extra = inputs
    out = {"logits": logits, "targets": targets}
    for k, v in extra.items():
        if isinstance(v, mitkernels.MiTState):
            out["tau"] = v.tau
            out.update(v.buffers())
        else:
            out[k] = v
    return out


def step(case, inputs):
    loss_name, _, _, reduction = CASES[case]
    logits, targets, extra = inputs
    x = logits.detach().requires_grad_(True)
    if loss_name == "mit":
        loss, stats = mitkernels.mit_loss(x, targets, extra["state"], backend="triton",
                                          reduction=reduction)
        tau = extra["state"].tau
    elif loss_name == "cct":
        loss, stats = mitkernels.cct_eal_loss(x, targets, extra["tau"], extra["ema"],
                                              extra["alpha"], backend="triton",
                                              reduction=reduction)
        tau = extra["tau"]
    else:
        loss, stats = mitkernels.tet_loss(x, targets, 0.7, 0.2, backend="triton",
                                          reduction=reduction)
        tau = None
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype,
                             device=loss.device).reshape(loss.shape)
    wrt = (x,) if tau is None else (x, tau)
    grads = torch.autograd.grad((loss * weights).sum(), wrt)
    return loss, stats, grads


# ------------------------------------------------------------------------------------------
# The oracle: the Python launchers' launches, in the logged launches' terms.
# ------------------------------------------------------------------------------------------
def python_launches(monkeypatch, case, inputs):
    """What the Python launchers do for this step: (kernel, grid, args, kwargs) of each launch,
    and the allocations (sizes, strides, dtype, zeroed) of the forward and of the backward."""
    events = []

    def spy(kernel, grid, *args, **kwargs):
        events.append(("launch", (kernel, grid, args, kwargs)))
        return original(kernel, grid, *args, **kwargs)

    def alloc(make, zero):
        def wrapped(*args, **kwargs):
            t = make(*args, **kwargs)
            events.append(("alloc", (list(t.shape), list(t.stride()),
                                     str(t.dtype).rpartition(".")[2], zero)))
            return t
        return wrapped

    original = launch_plans.launch
    with monkeypatch.context() as m:
        m.setenv("MITKERNELS_TRITON_LAUNCH", "python")
        m.setattr(launch_plans, "launch", spy)
        for name, zero in (("empty", False), ("zeros", True), ("empty_like", False)):
            m.setattr(launch_plans, name, alloc(getattr(launch_plans, name), zero))
        step(case, inputs)
    launches = [e for kind, e in events if kind == "launch"]
    # the backward's allocations are those after the forward's last launch
    last_forward = max(i for i, (kind, e) in enumerate(events)
                       if kind == "launch" and e[0].fn.__name__ not in BACKWARD_KERNELS)
    allocations = [[e for kind, e in events[:last_forward] if kind == "alloc"],
                   [e for kind, e in events[last_forward:] if kind == "alloc"]]
    return launches, allocations


class Labels:
    """A pointer's role within one op call: the user tensor it is, the forward output it is
    (``rs``, ``gi``: the backward reads them), or the parameter that first passed it."""

    def __init__(self, users, carried=None):
        self.known = {t.data_ptr(): name for name, t in users.items()}
        self.known.update(carried or {})
        self.first = {}

    def __call__(self, ptr, where):
        if ptr in self.known:
            return self.known[ptr]
        return self.first.setdefault(ptr, where)


def _as_param(value, ptx_type: str):
    """A Python scalar as the kernel parameter of ``ptx_type`` holds it (f32: rounded)."""
    return struct.unpack("<f", struct.pack("<f", value))[0] if ptx_type == "f32" else value


def _slot(value: int, ptx_type: str):
    raw = struct.pack("<Q", value)
    return {"u32": struct.unpack("<i", raw[:4])[0], "s32": struct.unpack("<i", raw[:4])[0],
            "u64": value, "s64": struct.unpack("<q", raw)[0],
            "f32": struct.unpack("<f", raw[:4])[0], "f64": struct.unpack("<d", raw)[0]}[ptx_type]


def expected_params(aot, kernel, args, kwargs, labels, index):
    """The parameters a GPU launch of this call gets: ``(kind, value)`` in PTX order."""
    import inspect

    compiled = aot(kernel, args, kwargs)
    names = set(kernel.arg_names)
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items()
                                                        if k in names})
    bound.apply_defaults()
    out = []
    for name, value in bound.arguments.items():
        ty = compiled.src.signature[name]
        if ty == "constexpr":
            continue
        if ty.startswith("*"):
            out.append(("ptr", labels(value.data_ptr(), (index, name)), name))
        else:
            out.append(("val", value, name))
    return compiled, out


def check_replay(aot, logged, launches, users_replay, users_python):
    assert launches  # the Python launchers launched something
    assert len(logged) == len(launches), (len(logged), [k.fn.__name__ for k, *_ in launches])
    op_labels = {}
    carried = {"replay": {}, "python": {}}
    for i, ((function, grid, threads, shared, slots), (kernel, pgrid, args, kwargs)) in \
            enumerate(zip(logged, launches)):
        op = "backward" if kernel.fn.__name__ in BACKWARD_KERNELS else "forward"
        if op not in op_labels:
            op_labels[op] = (Labels(users_replay, carried["replay"] if op == "backward" else None),
                             Labels(users_python, carried["python"] if op == "backward" else None))
        rep_labels, py_labels = op_labels[op]
        compiled, want = expected_params(aot, kernel, args, kwargs, py_labels, i)
        name = kernel.fn.__name__
        assert function == compiled.function, f"{name}: another specialization was replayed"
        assert tuple(grid) == tuple(pgrid) + (1,) * (3 - len(pgrid)), name
        assert threads == 32 * kwargs["num_warps"] and shared == compiled.metadata.shared, name
        ptx = launch_plans.ptx_params(compiled.asm["ptx"], compiled.metadata.name)
        # the entry's parameter count read apart from launch_plans' parser: its parameter names
        # are <kernel>_param_<i>
        count = len(set(re.findall(re.escape(compiled.metadata.name) + r"_param_(\d+)\b",
                                   compiled.asm["ptx"])))
        assert len(slots) == len(ptx) == count, (name, len(slots), len(ptx), count)
        assert len(ptx) in (len(want), len(want) + 1, len(want) + 2)
        for j, (kind, value, pname) in enumerate(want):
            got = slots[j]
            if kind == "ptr":
                label = rep_labels(got, (i, pname))
                assert label == value, f"{name}.{pname}: points at {label}, Python at {value}"
                if op == "forward" and pname in ("rs_ptr", "gi_ptr"):
                    carried["replay"].setdefault(got, pname)
                    carried["python"].setdefault(args[kernel.arg_names.index(pname)].data_ptr(),
                                                 pname)
            else:
                assert _slot(got, ptx[j]) == _as_param(value, ptx[j]), \
                    f"{name}.{pname}: {_slot(got, ptx[j])} against {value}"
        assert all(s == 0 for s in slots[len(want):]), f"{name}: scratch pointers not null"


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------
@cpu_only
@pytest.mark.parametrize("case", list(CASES))
def test_replayed_launches_match_the_python_launches(monkeypatch, plans, aot, case):
    first = make_inputs(case, seed=1)
    step(case, first)  # records the forward's plan and the backward's
    info = plans._triton_plan_info()
    assert info["refused"] == 0, info["last_refusal"]
    assert info["recorded"] == 2  # the forward and the backward
    assert info["hits"] == 0 and plans._triton_plan_test_log() == []

    second = make_inputs(case, seed=2)
    step(case, second)  # replays both
    logged = plans._triton_plan_test_log()
    assert plans._triton_plan_info()["hits"] == 2
    replay_buffers = plans._triton_plan_test_buffers()
    python_side = clone_inputs(second)
    launches, allocations = python_launches(monkeypatch, case, python_side)
    check_replay(aot, logged, launches, user_tensors(second), user_tensors(python_side))
    # the same buffers, in the same order, zeroed where the launchers zeroed them
    assert replay_buffers == allocations


@cpu_only
@pytest.mark.parametrize("case", ["fused", "rows_none", "cct"])
def test_a_replays_outputs_hold_only_their_own_memory(plans, case):
    # A replay's outputs were views of one block: tau's gradient, one number, kept the logits'
    # gradient alive (as tau.grad, until zero_grad), and a kept loss the row statistics.
    step(case, make_inputs(case, seed=1))
    loss, stats, grads = step(case, make_inputs(case, seed=2))
    assert plans._triton_plan_info()["hits"] == 2
    for t in (loss, *grads):
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), t.shape
    for value in stats.values():  # 0-dim views of the one stats tensor, as the launchers give
        assert value.untyped_storage().nbytes() == len(ops.STATS_FIELDS) * 8


@cpu_only
def test_a_new_signature_records_a_new_plan(plans):
    inputs = make_inputs("fused", seed=1)
    step("fused", inputs)
    assert plans._triton_plan_info()["recorded"] == 2
    step("fused", make_inputs("fused", seed=2))
    assert plans._triton_plan_info()["hits"] == 2
    # 8 rows: another shape
    logits, targets, extra = make_inputs("fused", seed=3)
    step("fused", (logits[:8], targets[:8], extra))
    assert plans._triton_plan_info()["recorded"] == 4
    # logits one element into their storage: 4-byte aligned, which Triton compiles apart
    logits, targets, extra = make_inputs("fused", seed=4)
    shifted = torch.empty(logits.numel() + 1, dtype=logits.dtype)[1:].view(logits.shape)
    shifted.copy_(logits)
    step("fused", (shifted, targets, extra))
    info = plans._triton_plan_info()
    assert info["recorded"] == 6 and info["hits"] == 2, info  # the backward reads them too
    assert info["refused"] == 0, info["last_refusal"]
    assert len(plans._triton_plan_test_log()) == 2  # the one replayed step: a launch each way


def _scalar_step(change, seed):
    """A MiT or CCT-EAL step of 9 x 6 logits with one scalar argument changed (or none)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 6, generator=g, dtype=torch.float64).float().requires_grad_(True)
    y = torch.randint(0, 6, (9,), generator=g)
    if change.startswith("cct") or change == "base_cct":
        tau = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        kw = {"ema_momentum": 0.8} if change == "cct_momentum" else \
            {"t_min": 0.7} if change == "cct_t_min" else {}
        loss, _ = mitkernels.cct_eal_loss(x, y, tau, torch.full((6,), 1 / 6, dtype=torch.float64),
                                          torch.tensor(0.3, dtype=torch.float64),
                                          backend="triton", **kw)
        return torch.autograd.grad(loss, (x, tau))
    state = mitkernels.MiTState(6)
    kw = {"ignore_index": 2} if change == "ignore_index" else \
        {"update_state": False} if change == "update_state" else {}
    loss, _ = mitkernels.mit_loss(x, y, state, backend="triton", **kw)
    return torch.autograd.grad(loss, (x,) if change == "needs_tau" else (x, state.tau))


@cpu_only
@pytest.mark.parametrize("change,replayed", [
    ("ignore_index", 0), ("update_state", 1), ("needs_tau", 1), ("cct_momentum", 1),
    ("cct_t_min", 0)])
def test_a_changed_scalar_is_a_new_signature(plans, change, replayed):
    # Each scalar the launchers pass to a kernel is in the key: with one changed, the op it
    # reaches records a new plan rather than replay the old literal (`replayed`: how many of the
    # step's two ops keep their key).
    base = "base_cct" if change.startswith("cct") else "base"
    _scalar_step(base, seed=1)
    _scalar_step(base, seed=2)
    before = plans._triton_plan_info()
    assert before["hits"] == 2 and before["recorded"] == 2, before
    _scalar_step(change, seed=3)
    after = plans._triton_plan_info()
    assert after["hits"] - before["hits"] == replayed, after
    assert after["recorded"] - before["recorded"] == 2 - replayed, after
    assert after["refused"] == 0, after["last_refusal"]


@cpu_only
def test_the_backward_of_a_summed_none_loss_is_planned(plans):
    # loss.sum() hands the backward an expanded (stride 0) gradient; the step makes it
    # contiguous before the launchers see it, so the backward is planned like the others.
    for seed in (1, 2):
        logits, targets, extra = make_inputs("rows_none", seed)
        x = logits.requires_grad_(True)
        loss, _ = mitkernels.mit_loss(x, targets, extra["state"], backend="triton",
                                      reduction="none")
        torch.autograd.grad(loss.sum(), (x, extra["state"].tau))
    info = plans._triton_plan_info()
    assert info == {**info, "recorded": 2, "hits": 2, "refused": 0}, info


@cpu_only
def test_an_unplannable_call_stays_on_python_and_is_right(monkeypatch, plans):
    # No compiled kernel for the recorder (as under the interpreter without tests' AOT): the
    # signature is refused once, then its calls run the Python launchers every time, unchanged.
    monkeypatch.setattr(launch_plans, "compiled_for", None)
    results = []
    for _ in range(3):
        inputs = make_inputs("fused", seed=5)
        loss, stats, grads = step("fused", inputs)
        results.append((loss.detach(), stats["loss"], grads[0], inputs[2]["state"].tau.detach()))
    info = plans._triton_plan_info()
    assert info["refused"] == 2 and info["hits"] == 0 and info["recorded"] == 0, info
    assert "no compiled kernel" in info["last_refusal"]
    assert launch_plans.summary().startswith("plans: 0 replays, 2 refused (Unplannable")
    assert plans._triton_plan_test_log() == []
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)


def _python_step(monkeypatch, case, inputs):
    """The step through the Python launchers (no plan recorded or replayed)."""
    with monkeypatch.context() as m:
        m.setenv("MITKERNELS_TRITON_LAUNCH", "python")
        return step(case, inputs)


def _assert_same_step(got, want, state_got, state_want, grads=True):
    loss, stats, g = got
    assert torch.equal(loss.detach(), want[0].detach())
    assert torch.equal(stats["loss"], want[1]["loss"])
    for k, t in state_want.buffers().items():
        assert torch.equal(state_got.buffers()[k], t), k
    if grads:
        for a, b in zip(g, want[2]):
            assert torch.equal(a, b)


@cpu_only
def test_a_first_launch_the_driver_refuses_takes_the_python_launchers(monkeypatch, plans):
    # A refusal returned by the launch itself, before any kernel of the replay ran (a function
    # not loaded in this context, a configuration the driver will not take): the call runs the
    # Python launchers and is right, and the signature stays on them.
    step("fused", make_inputs("fused", seed=1))  # records the forward and the backward
    for seed in (2, 3):
        inputs, python_side = make_inputs("fused", seed), None
        python_side = clone_inputs(inputs)
        if seed == 2:
            plans._triton_plan_test_refuse(0, times=2, code=201)  # each op's first launch
        got = step("fused", inputs)
        want = _python_step(monkeypatch, "fused", python_side)
        _assert_same_step(got, want, inputs[2]["state"], python_side[2]["state"])
    info = plans._triton_plan_info()
    assert info["hits"] == 0 and info["recorded"] == 2 and info["refused"] == 2, info
    assert "refused the replay's first launch (CUresult 201)" in info["last_refusal"], info
    assert plans._triton_plan_test_log() == []  # nothing was launched through a plan


@cpu_only
@pytest.mark.parametrize("code", [214, 700, 702, 709, 710, 714, 715, 716, 717, 718, 719])
def test_an_error_the_context_held_fails_the_call_and_keeps_the_plan(monkeypatch, plans, code):
    # 700 (an illegal address) at a replay's first launch is an earlier kernel's error that the
    # context kept, not a refusal of this launch: it was counted as one and retired the plan,
    # so a sanitizer's finding read as a plan's fault. The call fails naming it; the plan stays.
    # Every sticky code (mutation testing dropped 719 from the list unnoticed).
    step("fused", make_inputs("fused", seed=1))
    plans._triton_plan_test_refuse(0, code=code)
    with pytest.raises(RuntimeError, match=rf"CUresult {code} at the replay's first launch"):
        step("fused", make_inputs("fused", seed=2))
    info = plans._triton_plan_info()
    assert info["refused"] == 0 and info["hits"] == 0, info
    step("fused", make_inputs("fused", seed=3))
    assert plans._triton_plan_info()["hits"] == 2


@cpu_only
def test_an_input_on_another_device_is_another_signature(plans):
    # A replay passes pointers to the driver unchecked: a plan recorded with every input on the
    # logits' device must not serve a call whose targets live elsewhere.
    same = [torch.zeros(3), torch.zeros(3, dtype=torch.long)]
    elsewhere = [torch.zeros(3), torch.zeros(3, dtype=torch.long, device="meta")]
    assert plans._triton_plan_test_key(same) == plans._triton_plan_test_key(
        [torch.ones(3), torch.ones(3, dtype=torch.long)])
    assert plans._triton_plan_test_key(same) != plans._triton_plan_test_key(elsewhere)


@cpu_only
def test_inputs_that_alias_are_another_signature(plans):
    # A state passing one tensor as two slots (total_seen and lambda_entropy, say) records a
    # plan whose launches get one pointer for both: replayed for separate tensors, the second
    # would never be passed, and the kernel would write one slot's value into the other.
    a, b, c = torch.zeros(3), torch.zeros(()), torch.zeros(())
    assert plans._triton_plan_test_key([a, b, b]) != plans._triton_plan_test_key([a, b, c])
    assert plans._triton_plan_test_key([a, b, c]) == plans._triton_plan_test_key(
        [torch.ones(3), torch.ones(()), torch.ones(())])


@cpu_only
def test_a_later_launch_the_driver_refuses_fails_the_call(monkeypatch, plans):
    # The none-loss forward launches twice: refused at its second launch, the first had been
    # queued (on a GPU it may have updated the state), so the call fails, naming the refusal;
    # the signature then stays on the Python launchers.
    step("rows_none", make_inputs("rows_none", seed=1))
    plans._triton_plan_test_refuse(1, code=1)
    with pytest.raises(RuntimeError, match=r"refused launch 2 of the replay \(CUresult 1\)"):
        step("rows_none", make_inputs("rows_none", seed=2))
    info = plans._triton_plan_info()
    assert info["refused"] == 1 and "replay failed" in info["last_refusal"], info
    assert len(plans._triton_plan_test_log()) == 1
    inputs = make_inputs("rows_none", seed=3)
    python_side = clone_inputs(inputs)
    got = step("rows_none", inputs)  # the forward on Python; the backward still replays
    want = _python_step(monkeypatch, "rows_none", python_side)
    _assert_same_step(got, want, inputs[2]["state"], python_side[2]["state"], grads=False)
    assert plans._triton_plan_info()["hits"] == 1


@cpu_only
@pytest.mark.parametrize("damage,message", [
    (lambda p: (p[0], p[1], p[2], [len(p[1])]), "output buffer"),
    (lambda p: (p[0], p[1], [(*p[2][0][:4], [(1, len(p[1]), 0, 0.0)])], p[3]), "buffer"),
    (lambda p: (p[0], p[1], [(*p[2][0][:4], [(0, p[0], 0, 0.0)])], p[3]), "input"),
    (lambda p: (p[0], p[1], [(*p[2][0][:4], [(1, 0, 1 << 40, 0.0)])], p[3]), "at byte"),
    (lambda p: (p[0], p[1], [(*p[2][0][:4], [(9, 0, 0, 0.0)])], p[3]), "parameter kind"),
    (lambda p: (p[0], p[1], [(p[2][0][0], [1, 1], *p[2][0][2:])], p[3]), "3 dimensions"),
], ids=["output", "buffer", "input", "offset", "kind", "grid"])
def test_the_store_refuses_a_malformed_plan(monkeypatch, plans, damage, message):
    # Whatever the recorder hands over is checked before it is kept: a plan that points outside
    # its inputs or buffers is refused (the call's result stands; the signature stays on Python).
    plan = launch_plans.Recorder.plan
    monkeypatch.setattr(launch_plans.Recorder, "plan", lambda self, out: damage(plan(self, out)))
    loss, _, _ = step("fused", make_inputs("fused", seed=8))
    info = plans._triton_plan_info()
    assert info["recorded"] == 0 and info["refused"] == 2, info
    assert message in info["last_refusal"], info["last_refusal"]
    assert torch.isfinite(loss).all()
    step("fused", make_inputs("fused", seed=9))
    assert plans._triton_plan_info()["hits"] == 0 and plans._triton_plan_test_log() == []


@cpu_only
def test_unknown_launch_setting_is_an_error(monkeypatch, plans):
    inputs = make_inputs("fused", seed=6)
    state = inputs[2]["state"]
    before = {k: t.clone() for k, t in state.buffers().items()}
    monkeypatch.setenv("MITKERNELS_TRITON_LAUNCH", "c++")
    with pytest.raises(ValueError, match="MITKERNELS_TRITON_LAUNCH must be python or cpp, "
                                         "got 'c\\+\\+'"):
        step("fused", inputs)
    for k, t in state.buffers().items():
        assert torch.equal(t, before[k]), k


def test_ptx_params_reads_the_entry():
    ptx = (".visible .entry other(\n .param .u32 other_param_0\n)\n"
           ".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n"
           "\t.param .u32 k_param_1,\n\t.param .f64 k_param_2\n)\n{\n}")
    assert launch_plans.ptx_params(ptx, "k") == ["u64", "u32", "f64"]
    with pytest.raises(launch_plans.Unplannable):
        launch_plans.ptx_params(ptx, "missing")


# ------------------------------------------------------------------------------------------
# GPU: the launches themselves.
# ------------------------------------------------------------------------------------------
gpu_only = gpu_test(not INTERPRET and torch.cuda.is_available() and HAVE_PLANS and
                    _backends.unavailable_reason("triton", torch.device("cuda")) is None,
                    "needs a CUDA device, Triton and the extension")


def _poison_cuda_allocator():
    """Leave the caching allocator's free blocks full of 0xFF bytes, so that a buffer a replay
    fails to zero starts as garbage rather than as a lucky zero."""
    blocks = [torch.full((n,), -1, dtype=torch.int8, device="cuda")
              for n in (512, 4096, 1 << 16, 1 << 20, 1 << 22) for _ in range(8)]
    del blocks


@gpu_only
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backward", ["auto", "triton"])
def test_cuda_plans_match_the_python_launches(monkeypatch, case, backward):
    """Three steps through plans (one recorded, two replayed) give the bits of three steps
    through the Python launchers, state included."""
    monkeypatch.setenv("MITKERNELS_TRITON_BACKWARD", backward)
    EXT._triton_plan_clear()

    def run(launch):
        monkeypatch.setenv("MITKERNELS_TRITON_LAUNCH", launch)
        logits, targets, extra = make_inputs(case, seed=7)
        inputs = (logits.cuda(), targets.cuda(), {
            k: (v.to("cuda") if isinstance(v, mitkernels.MiTState)
                else v.detach().cuda().requires_grad_(v.requires_grad))
            for k, v in extra.items()})
        out = []
        for _ in range(3):
            _poison_cuda_allocator()
            loss, stats, grads = step(case, inputs)
            out += [loss.detach(), *stats.values(), *grads]
        out += list(user_tensors(inputs).values())
        torch.cuda.synchronize()
        return [t.cpu() for t in out]

    via_plans = run("cpp")
    info = EXT._triton_plan_info()
    assert info["refused"] == 0, info["last_refusal"]
    assert info["hits"] >= 2, info
    via_python = run("python")
    assert len(via_plans) == len(via_python)
    for a, b in zip(via_plans, via_python):
        assert torch.equal(a, b)
    EXT._triton_plan_clear()


@cpu_only
def test_plans_host_cpu_benchmark_runs():
    # benchmarks/plans_host_cpu.py: the three columns for a small shape, plans replayed
    from conftest import run_python

    out = run_python(["benchmarks/plans_host_cpu.py", "--shapes", "8x3", "--calls", "5"],
                     timeout=300, env={"TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row = [line.split() for line in out.stdout.splitlines() if line.strip().startswith("8x3")]
    assert len(row) == 1 and all(float(v) > 0 for v in row[0][1:]), out.stdout
