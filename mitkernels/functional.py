"""The public functions: ``mit_loss``, ``tet_loss``, ``cct_eal_loss``.

Each validates its inputs (nothing is touched before that), brings them to the canonical
``[N, C, S]`` / ``[R]`` form of the op contract (views whenever the layout allows), and calls one
forward op, then ``loss_with_grad`` when a gradient is needed. The eager ``reference`` backend
runs ``mitkernels/reference.py`` instead.
"""
from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backends, ops, reference
from .reference import MIT_T_EPS, MIT_T_MAX, MIT_T_MIN
from .state import STATE_BUFFERS

SUPPORTED_DTYPES = ops.LOGITS_DTYPES
_INDEX_DTYPES = ops.INDEX_DTYPES

# The names under which each loss reports the fields of the stats tensor (ops.STATS_FIELDS).
STATS_NAMES = {
    ops.KIND_MIT: ("loss", "ce", "H", "H_star", "lambda", "T", "updated", "valid",
                   "invalid_targets"),
    ops.KIND_TET: ("loss", "ce", "H", None, "lambda", "T", None, "valid", "invalid_targets"),
    ops.KIND_CCT: ("loss", "ce", "H", "H_star", "alpha_t", "T_mean", "updated", "valid",
                   "invalid_targets"),
}


# --------------------------------------------------------------------------------------------
# Validation: every check runs before any state tensor is touched.
# --------------------------------------------------------------------------------------------
def _check_inputs(logits, targets, num_classes: int, ignore_index, reduction: str,
                  state_tensors: Sequence[Tensor]) -> Tensor:
    """Every check that needs no pass over the data; the targets' range is checked where the
    backend is known (``_backend_for`` for the reference, after the pass for the kernels).
    Returns the targets as int64 or int32: other integer dtypes converted, since a comparison
    with ``ignore_index`` in their own dtype wraps it (uint8's 156 equals -100).

    Ordered so that a valid call takes the fewest tensor attribute reads: a 32-row step is
    microseconds long, and this runs on every one."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    dtype = logits.dtype
    if dtype not in SUPPORTED_DTYPES:  # every supported dtype is floating point
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {dtype}")
        raise TypeError(f"logits dtype {dtype} is not supported; use one of "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    if targets.dtype not in _INDEX_DTYPES and (
            targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool):
        hint = (" (they look one-hot or like class probabilities; pass class indices, "
                "targets.argmax(1))" if targets.shape == logits.shape else "")
        raise TypeError(f"targets must hold integer class indices, got {targets.dtype}{hint}")
    shape = logits.shape
    if len(shape) < 2:
        raise ValueError(f"logits must be [N, C] or [N, C, d1, ...], got shape {tuple(shape)}")
    if shape[1] < 1:
        raise ValueError(f"logits need at least one class (dim 1), got shape {tuple(shape)}")
    if shape[1] != num_classes:
        _raise_class_count(shape[1], num_classes)
    target_shape = targets.shape
    if len(target_shape) != len(shape) - 1 or target_shape[0] != shape[0] or \
            target_shape[1:] != shape[2:]:
        expected = (shape[0],) + tuple(shape[2:])
        hint = (": they look one-hot; pass class indices (targets.argmax(1))"
                if target_shape == shape else "")
        raise ValueError(f"targets must have shape {expected} for logits of shape "
                         f"{tuple(shape)}, got {tuple(target_shape)}{hint}")
    check_options(ignore_index, reduction)
    if not torch.compiler.is_compiling():  # Dynamo traces no is_inference
        if not torch.is_inference_mode_enabled() and _any_inference(state_tensors):
            # Else the eager step fails midway: tau cannot be saved for backward, nor the
            # statistics be updated in place, once their kernels have written some of them.
            # (A compiled step runs with such a state.)
            raise ValueError("the loss's state (tau and its running statistics) holds tensors "
                             "made under torch.inference_mode(), which outside it take no "
                             "gradient and no in-place update: make the state outside "
                             "inference mode")
        if logits.is_inference() and state_tensors and state_tensors[0].requires_grad and \
                torch.is_grad_enabled():
            # The temperature's gradient reads the logits in backward, and torch refuses to
            # save an inference tensor for it: say so before the state is touched, not after.
            raise ValueError("logits made under torch.inference_mode() cannot be saved for the "
                             "temperature's gradient: make them outside inference mode (or "
                             "clone them there), or call the loss under torch.no_grad()")
    # All on the CPU: is_cpu reads a flag where .device builds an object per tensor.
    if not (logits.is_cpu and targets.is_cpu and all(t.is_cpu for t in state_tensors)):
        device = logits.device
        for i, t in enumerate((targets, *state_tensors)):
            if t.device != device:
                what, hint = ("targets are", "") if i == 0 else (
                    "the loss's state is", ": move it there (a criterion or MiTState with "
                    ".to(device))")
                raise ValueError(f"all tensors must be on one device: logits on {device}, "
                                 f"{what} on {t.device}{hint}")
    if targets.dtype in _INDEX_DTYPES:
        return targets
    if targets.dtype == torch.uint64:  # 2^64 - 100 became -100, ignore_index, in int64
        raise TypeError("targets must not be uint64 (its values past 2^63 do not fit the int64 "
                        "the kernels index with): pass int64")
    return targets.long()  # int8, int16, uint8, uint16, uint32: every value fits


def _raise_class_count(got: int, built_for: int) -> None:
    raise ValueError(f"logits have C = {got} classes (dim 1) but the loss was built for "
                     f"{built_for}")


def check_class_count(logits: Tensor, num_classes: int) -> None:
    """Logits ``[N, C, ...]`` of the loss's ``num_classes`` (others are left to the callee's
    shape checks)."""
    if isinstance(logits, Tensor) and logits.dim() >= 2 and logits.shape[1] != num_classes:
        _raise_class_count(logits.shape[1], num_classes)


def _any_inference(tensors: Sequence[Tensor]) -> bool:
    for t in tensors:  # a loop: any() over a generator costs a step 0.2 us more
        if t.is_inference():
            return True
    return False


def check_options(ignore_index, reduction: str) -> None:
    """The options every loss takes (the modules check them when they are built)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not -2**63 <= ignore_index < 2**63:  # the kernels compare it with int64 targets
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if reduction not in ops.REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_state(entries: Sequence[Tuple[str, Tensor, torch.dtype, int]]) -> None:
    """Each state tensor's type, dtype and size: they are updated in place, so never converted,
    and every backend refuses the same ones."""
    for name, t, dtype, numel in entries:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype} (it is updated in place), got {t.dtype}")
        if t.numel() != numel or (name in _CLASS_VECTORS and t.dim() != 1):
            shape = f"[{numel}]" if name in _CLASS_VECTORS else f"{numel} value(s)"
            raise ValueError(f"{name} must hold {shape}, got shape {tuple(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels update it in place), got "
                             f"strides {t.stride()}")


_MIT_STATE_DTYPES = tuple(STATE_BUFFERS.values())  # class_counts, total_seen, lambda, updates
_CLASS_VECTORS = ("class_counts", "label_freq_ema")  # a [C] vector each (the kernels' layout)


def _mit_state_ok(counts, total_seen, lambda_entropy, dual_updates) -> bool:
    # The common case of _check_state for MiT, in about a microsecond (a 32-row step is tens).
    try:
        return ((counts.dtype, total_seen.dtype, lambda_entropy.dtype, dual_updates.dtype) ==
                _MIT_STATE_DTYPES and total_seen.numel() == 1 and
                lambda_entropy.numel() == 1 and dual_updates.numel() == 1 and
                counts.dim() == 1 and counts.is_contiguous())
    except AttributeError:  # not a tensor: _check_state names it
        return False


def _checks_targets_eagerly(targets: Tensor, process_group=None) -> bool:
    # On the CPU a check costs no synchronisation. On a GPU (and inside a compiled graph, where a
    # Python branch on a value would break the graph) the kernels mask such rows, count them
    # (stats['invalid_targets']), return a NaN loss and leave the state untouched. Under a
    # process group the count is the group's: an empty batch checks it too.
    return targets.device.type == "cpu" and (targets.numel() > 0 or process_group is not None) \
        and not torch.compiler.is_compiling()


def _raise_on_invalid_targets(targets: Tensor, num_classes: int, ignore_index: int,
                              force: bool, grouped: bool = False) -> None:
    """ValueError naming the first target outside [0, C) that is not ignore_index. ``force``:
    the kernels counted one, here or (``grouped``: under a process group) on another rank."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        value = int(targets[bad].reshape(-1)[0])
        raise ValueError(f"targets must lie in [0, {num_classes}) or equal ignore_index "
                         f"({ignore_index}); found {value}")
    if force and grouped:
        # Every rank raises, so that none goes on to a collective the others never join.
        raise ValueError(f"a target on another rank of the process_group lies outside "
                         f"[0, {num_classes}) and is not ignore_index ({ignore_index}); that "
                         f"rank's error names it, and no rank updated its state")
    if force:
        raise ValueError(f"the kernels counted targets outside [0, {num_classes}) that are not "
                         f"ignore_index ({ignore_index}); the state was left as it was")


def _check_temperature(tau: Tensor, expected: int, name: str) -> None:
    if not isinstance(tau, Tensor) or not tau.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if tau.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {tau.dtype}")
    if tau.numel() != expected or (expected > 1 and tau.dim() != 1):
        raise ValueError(f"{name} must hold {expected} value(s), got shape {tuple(tau.shape)}")


def _canonical(logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """``[N, C, S]`` logits (a view when the spatial dims merge) and ``[R]`` targets."""
    n, c = logits.shape[:2]
    logits3 = logits.reshape(n, c, math.prod(logits.shape[2:]))
    flat = targets.reshape(-1)
    if flat.dtype not in (torch.int32, torch.int64):
        flat = flat.long()
    return logits3, flat.contiguous()


def _loss_dtype(logits: Tensor) -> torch.dtype:
    # Like F.cross_entropy: the loss has the logits' dtype, and float32 under autocast.
    if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
            logits.device.type):
        return torch.float32
    return logits.dtype


def _stats_dict(entries: Sequence[Tensor], kind: int) -> Dict[str, Tensor]:
    """The stats dict from the stats tensor's entries (0-dim tensors, in STATS_FIELDS order)."""
    return {name: value for name, value in zip(STATS_NAMES[kind], entries) if name}


# Backends whose eager step is the C++ op loss_step_ (ops.EAGER_SCHEMAS); Triton's is
# triton_loss_step_ when the extension has it (_triton_step_op).
_STEP_BACKENDS = ("cpu", "cuda")


def _callable(overload):
    # The overload's C++ callable where torch exposes it (OpOverload._op): the packet's and the
    # overload's Python __call__ frames cost microseconds on a step that takes tens of them.
    return getattr(overload, "_op", overload)


@functools.lru_cache(maxsize=None)
def _loss_step_op():
    return _callable(torch.ops.mitkernels_C.loss_step_.default)


# The registrations of the Triton launchers as kernels of the extension's triton_ ops, kept
# alive here: a Library object takes its kernels away when it is collected.
_TRITON_KERNEL_LIBS: List[torch.library.Library] = []


@functools.lru_cache(maxsize=None)
def _triton_step_op():
    """``mitkernels_C::triton_loss_step_``, the C++ step (views, autograd node) over the Triton
    launchers, which this registers as the CPU and CUDA kernels of ``ops.TRITON_KERNEL_OPS``;
    None when the extension is missing or predates the op (the Python step serves then).

    The C++ node matters on a GPU: a 4096 x 32000 fp32 step timed alone took 0.414 ms through
    it and 0.924 ms through the Python autograd.Function, whose kernels take 0.41 ms (H200,
    ``python -m benchmarks.gpu_kernels --overhead``,
    benchmarks/results/gpu-nvidia-h200-20261126-082710/kernels.log)."""
    if isinstance(_backends.extension(), ImportError) or \
            not hasattr(torch.ops.mitkernels_C, "triton_loss_step_"):
        return None
    kernels = _backends.triton_module()
    lib = torch.library.Library("mitkernels_C", "IMPL")  # noqa: TOR901 - kernels for its ops
    for name, kernel in ops.TRITON_KERNEL_OPS.items():
        for key in ("CPU", "CUDA"):  # CPU: Triton's interpreter (TRITON_INTERPRET=1)
            lib.impl(name, getattr(kernels, kernel), key)
    _TRITON_KERNEL_LIBS.append(lib)
    return _callable(torch.ops.mitkernels_C.triton_loss_step_.default)


def _run_ops(kind: int, logits: Tensor, targets: Tensor, tau: Tensor, state: List[Tensor],
             hparams: List[float], temp_params: Tuple[float, float, float], ignore_index: int,
             reduction: str, update_state: bool, backend: str,
             process_group=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One forward op (or row_stats, all-reduce, finalize_ across ranks), then autograd."""
    red = ops.REDUCTIONS[reduction]
    loss_dtype = _loss_dtype(logits)
    compiling = torch.compiler.is_compiling()
    if process_group is not None:
        if not update_state and not (torch.is_grad_enabled() and
                                     (logits.requires_grad or tau.requires_grad)):
            # Nothing global to compute (no state update, no tau gradient): the rank runs
            # alone, its stats its own, and may evaluate alone without leaving the others in a
            # collective.
            process_group = None
        elif not compiling:
            from .distributed import check_member

            check_member(process_group)
    step_op = None
    if process_group is None and not compiling:
        # cpu and cuda: _backend_for found them available, so the extension is loaded; Triton's
        # step op checks for the extension itself (None without it: the Python node below).
        step_op = _loss_step_op() if backend in _STEP_BACKENDS else _triton_step_op()
    if step_op is not None:
        # Eager: one C++ op does the views, the step, the invalid-target error and the autograd
        # node (csrc/loss_step.cpp); the engine runs its backward without a Python node.
        loss, entries = step_op(logits, targets, tau, state, kind, hparams, *temp_params,
                                ignore_index, red, update_state, loss_dtype)
        return loss, _stats_dict(entries, kind)
    records_grad = torch.is_grad_enabled() and (logits.requires_grad or tau.requires_grad)
    if not compiling and records_grad and targets.is_inference():
        # Labels kept from an inference_mode pass: the backward reads them, and torch refuses to
        # save an inference tensor for it (after the kernels had updated the state). A copy
        # made here is a normal tensor; targets are small. (The C++ step copies its own.)
        targets = targets.clone()
    logits3, flat_targets = _canonical(logits, targets)
    tau_k = tau.detach().reshape(-1)
    if compiling:
        # Traced: the registered ops, which carry fake kernels and autograd for the compiler.
        def call(name, *args):
            return getattr(torch.ops.mitkernels, name)(*args, backend)

        attach = torch.ops.mitkernels.loss_with_grad
    else:
        # Eager: the same kernels, called directly (see ops.EagerLossWithGrad for why).
        kernels = _backends.get(backend, logits.device)

        def call(name, *args):
            return getattr(kernels, name)(*args)

        attach = ops.EagerLossWithGrad.apply
    if process_group is None:
        loss, stats, row_stats, grad_info = call(
            "loss_forward_", logits3.detach(), flat_targets, tau_k, state, kind, hparams,
            *temp_params, ignore_index, red, update_state, loss_dtype)
    else:
        from .distributed import all_reduce_summary, warn_local_tau_gradient

        if red == 0 and tau.requires_grad and not compiling:
            warn_local_tau_gradient()
        row_stats, local_summary = call("row_stats", logits3.detach(), flat_targets, tau_k,
                                        *temp_params, ignore_index)
        summary = all_reduce_summary(local_summary, process_group)
        loss, stats, grad_info = call("finalize_", summary, local_summary, row_stats, tau_k, state,
                                      kind, hparams, *temp_params, red, update_state, loss_dtype)
    if _checks_targets_eagerly(targets, process_group) and stats[-1].item() != 0:
        # The kernels counted invalid targets (and left the state as it was): say which, now,
        # rather than return a NaN loss. Reading a CPU scalar costs no synchronisation.
        _raise_on_invalid_targets(flat_targets, logits.shape[1], ignore_index, force=True,
                                  grouped=process_group is not None)
    if records_grad:
        loss = attach(loss, logits3, tau.reshape(-1), flat_targets, row_stats, grad_info,
                      [*temp_params, float(ignore_index)], backend)
    if red == 0:
        loss = loss.view(targets.shape)
    return loss, _stats_dict(stats.unbind(), kind)


def _reference_result(logits: Tensor, loss: Tensor, stats: Dict[str, Tensor],
                      kind: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The reference's loss in the kernels' dtype, and its stats under their names."""
    return loss.to(_loss_dtype(logits)), _reference_stats(stats, kind)


def _reference_stats(stats: Dict[str, Tensor], kind: int) -> Dict[str, Tensor]:
    """The reference's stats under the kernel backends' names and dtype (float64 scalars)."""
    names = [n for n in STATS_NAMES[kind] if n and n != "invalid_targets"]
    out = {n: stats[n].to(torch.float64) for n in names}
    out["invalid_targets"] = torch.zeros((), dtype=torch.float64, device=out["loss"].device)
    return out


def _backend_for(backend: Optional[str], device: torch.device, process_group, targets: Tensor,
                 num_classes: int, ignore_index: int) -> str:
    """The backend for a call. The eager reference would index with the targets, so it checks
    them here; the kernels never do, and report invalid ones after their pass. Rows: one a
    target."""
    name = _backends.choose_for_rows(backend, device, targets.numel(), num_classes)
    if name == "reference" and _checks_targets_eagerly(targets):
        _raise_on_invalid_targets(targets, num_classes, ignore_index, force=False)
    if process_group is not None and name == "reference":
        raise ValueError("process_group needs a kernel backend (cpu, cuda or triton); the eager "
                         "reference runs on one process")
    return name


def mit_loss(logits: Tensor, targets: Tensor, state, *, backend: Optional[str] = None,
             update_state: bool = True, ignore_index: int = -100, reduction: str = "mean",
             process_group=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The MiT loss: ``CE(x / T, y) - lambda * H(softmax(x / T))``, with the state update.

    One call is one published MiT step: the class histogram takes this batch's labels, ``H*`` is
    their entropy, ``lambda`` is dual-averaged from ``H*`` and this batch's mean entropy ``H``, and
    the loss uses the new ``lambda`` as a constant. ``T = clamp(softplus(tau) + 1e-6, 1e-3, 500)``.

    Args:
        logits: ``[N, C]`` or ``[N, C, d1, ...]`` float16/bfloat16/float32/float64.
        targets: ``[N]`` or ``[N, d1, ...]`` integer class indices in ``[0, C)`` or
            ``ignore_index``. Any other value raises a ValueError on CPU tensors in eager
            mode; on a GPU and under ``torch.compile`` (where checking would stall the step or
            break the graph) the loss is NaN, ``stats["invalid_targets"]`` counts them and the
            state is left as it was.
        state: a ``MiTState`` or ``MiTLoss`` (anything with ``tau``, ``class_counts``,
            ``total_seen``, ``lambda_entropy``, ``dual_updates``). Only those tensors are read:
            a ``MiTLoss``'s ``ignore_index``, ``reduction``, backend, group and training mode
            are not (this call's arguments rule; call the module itself for its settings).
        backend: ``None`` (auto, or ``MITKERNELS_BACKEND``), ``"reference"``, ``"cpu"``,
            ``"triton"`` or ``"cuda"``.
        update_state: update the running statistics (a training step); when False, ``H*`` and
            ``lambda`` are read as they are.
        ignore_index: rows with this target take no part anywhere (counts included).
        reduction: ``"mean"`` (over valid rows), ``"sum"`` or ``"none"`` (shaped like ``targets``).
        process_group: a ``torch.distributed`` group: the statistics become those of the global
            batch (one all-reduce of a small buffer), identical on every rank, and so does
            ``tau``'s gradient for ``"mean"`` and ``"sum"``. With ``"none"`` it is this rank's
            (the per-element gradient the loss receives is local): average ``tau.grad`` over the
            ranks yourself, as DDP does for the model's, or ``tau`` drifts apart (a warning,
            once a calling line).
            ``stats["loss"]``, like the loss, is the rank's own. A call that updates no state
            and records no gradient runs on the rank alone (its stats the rank's).

    Returns:
        ``(loss, stats)``; ``stats`` holds detached float64 scalars on the logits' device:
        ``loss, ce, H, H_star, lambda, T, updated, valid, invalid_targets``. ``stats["loss"]``
        is the mean over valid rows whatever ``reduction`` (a number to log and compare).
        ``updated`` is 0 when the state was not updated: ``update_state=False``, no valid row,
        non-finite statistics (a NaN or +inf logit, a row of -inf, a -inf target logit; a
        masked class's -inf is fine) or invalid targets.
    """
    try:
        num_classes = int(state.class_counts.numel())
        buffers = [state.class_counts, state.total_seen, state.lambda_entropy, state.dual_updates]
        tau = state.tau
    except AttributeError:
        raise TypeError(f"state must be a MiTState or a MiTLoss (tau and the running "
                        f"statistics), got {type(state).__name__}") from None
    if not _mit_state_ok(*buffers):
        _check_state([(name, t, dtype, num_classes if name == "class_counts" else 1)
                      for (name, dtype), t in zip(STATE_BUFFERS.items(), buffers)])
    if num_classes < 2:  # as MiTState refuses: the dual step divides by log C = 0
        raise ValueError(f"MiT needs at least 2 classes (its lambda step divides by log C), got "
                         f"a state of {num_classes}")
    targets = _check_inputs(logits, targets, num_classes, ignore_index, reduction,
                            [tau, *buffers])
    _check_temperature(tau, 1, "tau")
    name = _backend_for(backend, logits.device, process_group, targets, num_classes, ignore_index)
    if name == "reference":
        loss, stats = reference.mit_step(logits, targets, tau, *buffers,
                                         ignore_index=ignore_index, reduction=reduction,
                                         update_state=update_state)
        return _reference_result(logits, loss, stats, ops.KIND_MIT)
    return _run_ops(ops.KIND_MIT, logits, targets, tau, buffers, [],
                    (MIT_T_EPS, MIT_T_MIN, MIT_T_MAX), ignore_index, reduction, update_state, name,
                    process_group)


def check_temperature_range(name: str, value: float) -> None:
    """A fixed temperature (TET's, CCT-EAL's bounds) in ``[1e-3, 500]``: the range MiT clamps
    its ``T`` to, over which the kernels are tested (their reciprocals are taken in float32)."""
    if not MIT_T_MIN <= float(value) <= MIT_T_MAX:  # NaN fails too
        raise ValueError(f"{name} must lie in [{MIT_T_MIN:g}, {MIT_T_MAX:g}], got {value}")


def _refuse_learned(loss: str, options, hint: str = "") -> None:
    """Options read as numbers: a tensor that requires grad would silently never get one.
    Traceable (a tensor's requires_grad is known when torch.compile traces the call)."""
    for name, value in options:
        if isinstance(value, Tensor) and value.requires_grad:
            raise TypeError(f"{loss}'s {name} is not learned and takes no gradient, got a "
                            f"tensor that requires grad{hint}")


def _refuse_learned_tet(temperature, lambda_entropy) -> None:
    _refuse_learned("TET", (("temperature", temperature), ("lambda_entropy", lambda_entropy)),
                    " (MiT learns its temperature: mitkernels.MiTLoss)")


def check_tet_options(temperature: float, lambda_entropy: float) -> None:
    _refuse_learned_tet(temperature, lambda_entropy)
    check_temperature_range("temperature", temperature)
    if not math.isfinite(float(lambda_entropy)):
        raise ValueError(f"lambda_entropy must be finite, got {lambda_entropy}")


def tet_loss(logits: Tensor, targets: Tensor, temperature: float = 0.5,
             lambda_entropy: float = 0.1, *, backend: Optional[str] = None,
             ignore_index: int = -100, reduction: str = "mean") -> Tuple[Tensor, Dict[str, Tensor]]:
    """TET: ``CE(x / T, y) - lambda * H(softmax(x / T))`` with fixed ``T`` and ``lambda``.

    Args as :func:`mit_loss`; ``temperature`` (in ``[1e-3, 500]``, MiT's clamp range) and
    ``lambda_entropy`` are plain numbers.
    Returns ``(loss, stats)`` with stats ``loss, ce, H, lambda, T, valid, invalid_targets``.
    """
    if not torch.compiler.is_compiling():
        # Dynamo cannot trace math.isfinite of a float it made symbolic (dynamic=True, or a
        # temperature that changes between calls); TETLoss checks its own when it is built.
        check_tet_options(temperature, lambda_entropy)
    else:
        _refuse_learned_tet(temperature, lambda_entropy)
    num_classes = logits.shape[1] if isinstance(logits, Tensor) and logits.dim() >= 2 else 0
    targets = _check_inputs(logits, targets, num_classes, ignore_index, reduction, [])
    name = _backend_for(backend, logits.device, None, targets, num_classes, ignore_index)
    if name == "reference":
        loss, stats = reference.tet_loss(logits, targets, temperature, lambda_entropy,
                                         ignore_index=ignore_index, reduction=reduction)
        return _reference_result(logits, loss, stats, ops.KIND_TET)
    # The fixed temperature rides on the clamp: clamp(softplus(0) + 0, T, T) == T exactly.
    tau = torch.zeros(1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                      device=logits.device)
    t = float(temperature)
    return _run_ops(ops.KIND_TET, logits, targets, tau, [], [float(lambda_entropy)], (0.0, t, t),
                    ignore_index, reduction, False, name)


def check_cct_options(reduction: str, ema_momentum: float, t_min: float, t_max: float,
                      entropy_eps: float = 0.0) -> None:
    check_temperature_range("T_min", t_min)
    check_temperature_range("T_max", t_max)
    if not float(t_min) <= float(t_max):
        raise ValueError(f"need T_min <= T_max, got {t_min}, {t_max}")
    if reduction == "none":
        raise ValueError("CCT-EAL supports reduction 'mean' or 'sum': its entropy alignment term "
                         "is a batch quantity")
    if not 0.0 <= float(ema_momentum) <= 1.0:
        raise ValueError(f"ema_momentum must lie in [0, 1], got {ema_momentum}")
    # a NaN floor made the reference's H* NaN, where the kernels' clamp ignored it
    if not 0.0 <= float(entropy_eps) < math.inf:
        raise ValueError(f"entropy_eps must be finite and >= 0, got {entropy_eps}")


def cct_eal_loss(logits: Tensor, targets: Tensor, tau_c: Tensor, label_freq_ema: Tensor,
                 alpha: Tensor, *, ema_momentum: float = 0.9, entropy_eps: float = 1e-12,
                 t_min: float = 0.75, t_max: float = 1.5, backend: Optional[str] = None,
                 update_state: bool = True, ignore_index: int = -100, reduction: str = "mean",
                 process_group=None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """CCT-EAL: ``CE(x / T_y, y) + alpha * (H - H*)^2`` with ``T_c = clamp(softplus(tau_c), T_min, T_max)``.

    ``H*`` is the entropy of ``label_freq_ema``, an EMA of the batch label frequencies updated
    from this batch first (when ``update_state``). ``reduction`` is ``"mean"`` or ``"sum"``.

    Args:
        tau_c: ``[C]`` learnable per-class temperature parameters.
        label_freq_ema: ``[C]`` float64 EMA of label frequencies (updated in place).
        alpha: the current alignment weight ``alpha_t`` (only read, a schedule: never learned,
            so a tensor that requires grad is refused): a number, or a tensor of one value (a
            buffer, as ``CCTEALLoss`` holds it, so that changing it never recompiles; float64 is
            used as it is, another floating dtype converted).
        ema_momentum: in ``[0, 1]``, the weight of the old frequencies.
    Returns ``(loss, stats)`` with stats ``loss, ce, H, H_star, alpha_t, T_mean, updated, valid,
    invalid_targets``.
    """
    check_cct_options(reduction, ema_momentum, t_min, t_max, entropy_eps)
    if not isinstance(label_freq_ema, Tensor):
        raise TypeError(f"label_freq_ema must be a torch.Tensor, got "
                        f"{type(label_freq_ema).__name__}")
    num_classes = int(label_freq_ema.numel())
    if not isinstance(alpha, Tensor) and isinstance(logits, Tensor):
        # A number is checked as a loaded alpha_t is (a tensor's value would need the host to
        # wait for it): an infinite weight gave the backends different gradients.
        if not 0.0 <= float(alpha) < math.inf:
            raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
        alpha = torch.tensor(float(alpha), dtype=torch.float64, device=logits.device)
    elif isinstance(alpha, Tensor):
        _refuse_learned("CCT-EAL", (("alpha", alpha),), " (a schedule: set_progress)")
        if alpha.dtype != torch.float64:
            if not alpha.is_floating_point():
                raise TypeError(f"alpha must be a number or a floating-point tensor, got "
                                f"{alpha.dtype}")
            alpha = alpha.double()  # only read: a copy serves
        elif not torch.compiler.is_compiling() and alpha.is_inference():
            alpha = alpha.clone()  # only read: a copy the reference's autograd may save
        if alpha.numel() != 1:
            raise ValueError(f"alpha must hold 1 value, got shape {tuple(alpha.shape)}")
    _check_state([("label_freq_ema", label_freq_ema, torch.float64, num_classes)])
    targets = _check_inputs(logits, targets, num_classes, ignore_index, reduction,
                            [tau_c, label_freq_ema, alpha])
    _check_temperature(tau_c, num_classes, "tau_c")
    name = _backend_for(backend, logits.device, process_group, targets, num_classes, ignore_index)
    if name == "reference":
        loss, stats = reference.cct_eal_step(
            logits, targets, tau_c, label_freq_ema, alpha, ema_momentum=ema_momentum,
            entropy_eps=entropy_eps, t_min=t_min, t_max=t_max, ignore_index=ignore_index,
            reduction=reduction, update_state=update_state)
        return _reference_result(logits, loss, stats, ops.KIND_CCT)
    return _run_ops(ops.KIND_CCT, logits, targets, tau_c, [label_freq_ema, alpha],
                    [float(ema_momentum), float(entropy_eps)], (0.0, float(t_min), float(t_max)),
                    ignore_index, reduction, update_state, name, process_group)
