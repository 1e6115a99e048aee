"""Custom operators of mitkernels: one schema per op, fake kernels, autograd, backend choice.

Every backend (C++ CPU, C++/CUDA, Triton) implements the *same* four kernels below; this module
registers the public ``torch.ops.mitkernels.*`` ops once and routes each call to a backend.
The math is in ``docs/KERNEL_MATH.md`` and in ``mitkernels/reference.py``.

The op contract
===============
Canonical inputs (``functional.py`` prepares them, views whenever the layout allows):

* ``logits``: ``[N, C, S]`` with arbitrary strides (``S = 1`` for ``[N, C]`` inputs; ``S = d1*d2*..``
  for ``[N, C, d1, d2, ..]``). float16, bfloat16, float32 or float64. Row ``r`` in ``[0, R)``,
  ``R = N*S``, is ``logits[r // S, :, r % S]``.
* ``targets``: ``[R]`` contiguous, int64 or int32. Row ``r`` is *valid* iff
  ``targets[r] != ignore_index and 0 <= targets[r] < C``. A row that is neither valid nor
  ``ignore_index`` is *invalid*: counted in ``n_invalid``, otherwise treated as ignored. Kernels never
  index memory with a target that is not valid.
* ``tau``: ``[K]`` contiguous, float32 or float64, ``K = 1`` (one temperature) or ``K = C``
  (class-conditional: row ``r`` uses ``tau[targets[r]]``). Never requires grad here.
* Temperature: ``T_k = clamp(softplus(tau_k) + t_eps, t_min, t_max)`` with torch's softplus
  (``softplus(x) = x`` for ``x > 20``). ``dT_k/dtau_k = sigmoid(tau_k)`` (1 for ``tau_k > 20``) when
  ``t_min <= softplus(tau_k) + t_eps <= t_max``, else 0 (torch.clamp's inclusive rule).
* *acc dtype*: float64 when the logits are float64, else float32. All row math runs in it.

``row_stats(logits, targets, tau, t_eps, t_min, t_max, ignore_index) -> (row_stats, summary)``
  ``row_stats``: ``[5, R]`` acc dtype (``ROW_STATS_FIELDS``); rows ``m, H, V, CE - H, log s``:
  ``m = max_j x_j`` (logit units, not divided by ``T_r``), ``H, V, CE - H`` of ``z = x / T_r``
  (KERNEL_MATH s.2) and ``log s``, ``s = sum_j exp((x_j - m) / T_r)``, so ``lse = m / T_r + log s``
  and ``CE = (CE - H) + H``. The backward takes ``log p = (x - m) / T_r - log s`` (exact near the
  max, whatever ``|z|``); ``CE - H = E_p[z] - z_y`` is formed directly (the temperature gradient
  needs it, and it is small where CE and H are not: small logits). All five are 0 for rows that
  are not valid.
  ``summary``: float64 ``[5 + C]`` (``K = 1``) or ``[5 + 3C]`` (``K = C``):
  ``[B, sum (CE - H), sum H, sum V, n_invalid, hist[C], (sum_{y=k}(CE - H))[C], (sum_{y=k} V)[C]]``,
  sums over valid rows, ``B`` the number of valid rows, ``hist`` the valid rows per class.
  Reductions in a fixed order: bitwise identical on every run.

``finalize_(summary, local_summary, row_stats, tau, state, kind, hparams, t_eps, t_min, t_max,
reduction, update_state, loss_dtype) -> (loss, stats, grad_info)``
  ``summary`` may be all-reduced across ranks; ``local_summary`` (or ``summary`` when None) is this
  rank's. Capital sums below come from ``summary``, the loss from ``local_summary``.
  ``kind``: 0 = MiT, 1 = TET, 2 = CCT-EAL. ``reduction``: 0 none, 1 mean, 2 sum (torch's enum).
  ``state`` (mutated in place, float64 unless said):
  MiT ``[class_counts[C], total_seen[], lambda_entropy[], dual_updates[] int64]``; TET ``[]``;
  CCT-EAL ``[label_freq_ema[C], alpha[]]`` (alpha is read, never written).
  ``hparams``: MiT ``[]``; TET ``[lambda]``; CCT-EAL ``[ema_momentum, entropy_eps]``.
  In float64, with ``Bg = max(B, 1)``::

      ok  = B > 0 and n_invalid == 0 and sum (CE - H), sum H, sum V all finite
      upd = update_state and ok                   (no state tensor changes unless upd)
      mean_ce = (sum (CE - H) + sum H) / Bg ; mean_H = sum H / Bg
      MiT: counts' = counts + hist; H* = -sum q log q, q = counts'/sum(counts') (0 log 0 = 0);
           n' = n + 1; d = max(0, (H* - mean_H) / log C); lam' = clamp((lam (n'-1) + d) / n', 0, 0.5);
           total' = total + B; c = lam'.   When not upd: counts, lam, n, total unchanged, H* from
           counts as they are, c = lam.
      TET: c = hparams[0]; H* = 0 (not reported).
      CCT: ema' = m ema + (1 - m) hist / Bg (when upd); H* = -sum p log p, p = max(ema', entropy_eps);
           alpha = state[1]; c = -2 alpha (mean_H - H*).
  loss (Bl, CEl = sum (CE - H) + sum H, Hl: valid count and sums of ``local_summary``), dtype
  ``loss_dtype``:
      mean: CEl/max(Bl,1) - c Hl/max(Bl,1)   (CCT: CEl/max(Bl,1) + alpha (mean_H - H*)^2)
      sum:  CEl - c Hl                       (CCT: CEl + Bl alpha (mean_H - H*)^2)
      none: ``[R]``, ``(CE - H)_r + (1 - c) H_r`` for valid rows, 0 otherwise (not defined for
      CCT).
      0 when Bl == 0; NaN (every element) when n_invalid of ``summary`` (all ranks) > 0.
  ``stats``: float64 ``[9]`` = ``[loss (the mean form, whatever the reduction), mean_ce, mean_H, H*, lambda|alpha,
  T_0 (CCT: T_mean = sum_k hist_k T_k / Bg), updated (0/1), B, n_invalid]``.
  ``grad_info``: acc dtype ``[2 + K]`` = ``[c, row_scale, dL/dtau_0 .. dL/dtau_{K-1}]``;
  ``row_scale = 1/max(Bl,1)`` (mean) or 1 (sum, none); for mean/sum, with ``gs = 1/Bg`` (mean) or 1:
  ``K = 1``: ``dL/dtau = -gs/T (sum (CE - H) + c sum V) T'(tau)``;
  ``K = C``: ``dL/dtau_k = -gs/T_k (sum_{y=k}(CE-H) + c sum_{y=k} V) T'(tau_k)``; zeros for none.
  Across ranks the temperature gradient is thus that of the global-batch loss on every rank (keep
  the loss module outside DistributedDataParallel), while ``row_scale`` keeps the logits' gradient
  local so that DDP's averaging yields the global-batch gradient.

``loss_forward_(logits, targets, tau, state, kind, hparams, t_eps, t_min, t_max, ignore_index,
reduction, update_state, loss_dtype) -> (loss, stats, row_stats, grad_info)``
  ``row_stats`` followed by ``finalize_`` with ``local_summary = None``, fused where it pays
  (Triton: one launch when the batch fits one program).

``loss_backward(grad_loss, logits, targets, tau, row_stats, grad_info, t_eps, t_min, t_max,
ignore_index, reduction, compute_grad_tau) -> (grad_logits, grad_tau)``
  ``grad_loss``: ``[]`` (mean, sum) or ``[R]`` (none). ``grad_logits``: like ``logits`` (its strides
  when it is dense, else contiguous), logits dtype. For a valid row, with ``g_r`` the incoming
  gradient, ``p = exp(x / T_r - lse_r)``::

      dx[r, j] = g_r row_scale / T_r (p_rj (1 + c (log p_rj + H_r)) - [j == y_r]),  0 for other rows
  ``grad_tau`` ``[K]`` (tau dtype): mean/sum ``g dL/dtau``; none (K = 1):
  ``sum_r g_r (-1/T)(CE_r - H_r + c V_r) T'(tau)``; zeros when ``compute_grad_tau`` is false.
"""
from __future__ import annotations


import torch
from torch import Tensor

from . import _backends

KIND_MIT, KIND_TET, KIND_CCT = 0, 1, 2
# The op contract's dtypes: logits (and the loss), and targets.
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
STATS_FIELDS = ("loss", "ce", "H", "H_star", "coef", "T", "updated", "valid", "invalid_targets")
SUMMARY_HEADER = 5  # B, sum (CE - H), sum H, sum V, n_invalid
# Rows of row_stats (csrc/mit_loss_math.h kRowStats): the row's max logit, H, V, CE - H, log s.
ROW_STATS_FIELDS = ("m", "H", "V", "CE_minus_H", "log_s")

# The kernel schemas, without the routing argument: the C++ library registers exactly these
# (tests/test_ops.py checks it), the public ops add ``str backend``.
KERNEL_SCHEMAS = {
    "row_stats": (
        "(Tensor logits, Tensor targets, Tensor tau, float t_eps, float t_min, float t_max, "
        "int ignore_index) -> (Tensor, Tensor)"
    ),
    "finalize_": (
        "(Tensor summary, Tensor? local_summary, Tensor row_stats, Tensor tau, Tensor(a!)[] state, "
        "int kind, float[] hparams, float t_eps, float t_min, float t_max, int reduction, "
        "bool update_state, ScalarType loss_dtype) -> (Tensor, Tensor, Tensor)"
    ),
    "loss_forward_": (
        "(Tensor logits, Tensor targets, Tensor tau, Tensor(a!)[] state, int kind, float[] hparams, "
        "float t_eps, float t_min, float t_max, int ignore_index, int reduction, bool update_state, "
        "ScalarType loss_dtype) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "loss_backward": (
        "(Tensor grad_loss, Tensor logits, Tensor targets, Tensor tau, Tensor row_stats, "
        "Tensor grad_info, float t_eps, float t_min, float t_max, int ignore_index, int reduction, "
        "bool compute_grad_tau) -> (Tensor, Tensor)"
    ),
}


# Ops that the C++ library registers beside the kernels, for eager calls only (no public op, no
# Triton version: torch.compile traces the four kernels above). ``loss_step_`` is one eager step:
# the canonical views of ``functional.py``, ``loss_forward_``, on CPU the ValueError for invalid
# targets, and a C++ autograd node whose backward runs ``loss_backward`` (csrc/loss_step.cpp).
# ``logits`` ``[N, C, d1, ..]``, ``targets`` ``[N, d1, ..]`` (any integer dtype), ``tau`` ``K``
# values in any shape (the one that takes the gradient); the rest as ``loss_forward_``. Returns
# ``(loss, stats)``: ``loss`` ``[]``, or shaped like ``targets`` for reduction 'none'; ``stats``
# the 9 entries of ``loss_forward_``'s stats as 0-dim float64 tensors (the stats dict's values).
# ``triton_loss_step_`` is the same step over ``triton_loss_forward_`` / ``triton_loss_backward``
# (TRITON_KERNEL_OPS), whose CPU and CUDA kernels are the Triton launchers, registered from Python
# by ``functional._triton_step_op``.
_STEP_SCHEMA = (
    "(Tensor logits, Tensor targets, Tensor tau, Tensor(a!)[] state, int kind, float[] hparams, "
    "float t_eps, float t_min, float t_max, int ignore_index, int reduction, bool update_state, "
    "ScalarType loss_dtype) -> (Tensor, Tensor[])"
)
EAGER_SCHEMAS = {"loss_step_": _STEP_SCHEMA, "triton_loss_step_": _STEP_SCHEMA}
# The extension's ops with a kernel op's schema and Triton launchers for kernels: name -> the
# KERNEL_SCHEMAS entry it copies.
TRITON_KERNEL_OPS = {"triton_loss_forward_": "loss_forward_",
                     "triton_loss_backward": "loss_backward"}


def _public_schema(kernel_schema: str) -> str:
    args, ret = kernel_schema.rsplit(") ->", 1)
    return f"{args}, str backend) ->{ret}"


_lib = torch.library.Library("mitkernels", "DEF")  # noqa: TOR901 - owned by this module
for _name, _schema in KERNEL_SCHEMAS.items():
    _lib.define(_name + _public_schema(_schema))
# The differentiable op: forward is a copy of the loss the forward op computed, backward runs
# loss_backward. ``params`` = [t_eps, t_min, t_max, ignore_index]; mean and sum differ only
# through grad_info's row_scale, and 'none' is told by the loss's rank. Few, flat arguments on
# purpose: torch.library's autograd wrapper spends time per argument (and more on tensor lists)
# on every call, which a 32-row step notices.
_lib.define(
    "loss_with_grad(Tensor loss, Tensor logits, Tensor tau, Tensor targets, Tensor row_stats, "
    "Tensor grad_info, float[] params, str backend) -> Tensor"
)


# --------------------------------------------------------------------------------------------
# Routing: the same kernel function of the chosen backend, whatever the device.
# --------------------------------------------------------------------------------------------
def _route(name: str):
    def impl(*args):
        *kernel_args, backend = args
        device = next(a.device for a in kernel_args if isinstance(a, Tensor))
        return getattr(_backends.get(backend, device), name)(*kernel_args)

    impl.__name__ = f"{name}_impl"
    return impl


for _name in KERNEL_SCHEMAS:
    _lib.impl(_name, _route(_name), "CompositeExplicitAutograd")


def _loss_with_grad_impl(loss, *rest):
    return loss.clone()


_lib.impl("loss_with_grad", _loss_with_grad_impl, "CompositeExplicitAutograd")


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes and dtypes only, for torch.compile and opcheck.
# --------------------------------------------------------------------------------------------
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def summary_size(num_classes: int, num_temperatures: int) -> int:
    return SUMMARY_HEADER + num_classes * (1 if num_temperatures == 1 else 3)


@torch.library.register_fake("mitkernels::row_stats")
def _row_stats_fake(logits, targets, tau, t_eps, t_min, t_max, ignore_index, backend):
    torch._check(logits.dim() == 3, lambda: "row_stats: logits must be [N, C, S]")
    n, c, s = logits.shape
    row_stats = logits.new_empty((len(ROW_STATS_FIELDS), n * s), dtype=acc_dtype(logits.dtype))
    summary = logits.new_empty((summary_size(c, tau.shape[0]),), dtype=torch.float64)
    return row_stats, summary


def _finalize_outputs(row_stats, tau, reduction, loss_dtype):
    rows = row_stats.shape[1]
    loss = row_stats.new_empty((rows,) if reduction == 0 else (), dtype=loss_dtype)
    stats = row_stats.new_empty((len(STATS_FIELDS),), dtype=torch.float64)
    grad_info = row_stats.new_empty((2 + tau.shape[0],))
    return loss, stats, grad_info


@torch.library.register_fake("mitkernels::finalize_")
def _finalize_fake(summary, local_summary, row_stats, tau, state, kind, hparams, t_eps, t_min,
                   t_max, reduction, update_state, loss_dtype, backend):
    return _finalize_outputs(row_stats, tau, reduction, loss_dtype)


@torch.library.register_fake("mitkernels::loss_forward_")
def _loss_forward_fake(logits, targets, tau, state, kind, hparams, t_eps, t_min, t_max,
                       ignore_index, reduction, update_state, loss_dtype, backend):
    row_stats, _ = _row_stats_fake(logits, targets, tau, t_eps, t_min, t_max, ignore_index, backend)
    loss, stats, grad_info = _finalize_outputs(row_stats, tau, reduction, loss_dtype)
    return loss, stats, row_stats, grad_info


def _grad_logits_like(logits: Tensor) -> Tensor:
    # The gradient keeps the logits' layout when it is dense, so kernels read and write alike.
    return torch.empty_like(logits)


@torch.library.register_fake("mitkernels::loss_backward")
def _loss_backward_fake(grad_loss, logits, targets, tau, row_stats, grad_info, t_eps, t_min, t_max,
                        ignore_index, reduction, compute_grad_tau, backend):
    return _grad_logits_like(logits), torch.empty_like(tau)


@torch.library.register_fake("mitkernels::loss_with_grad")
def _loss_with_grad_fake(loss, *rest):
    return torch.empty_like(loss)


# --------------------------------------------------------------------------------------------
# Autograd: only loss_with_grad is differentiable; its backward is itself a custom op.
# --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    loss, logits, tau, targets, row_stats, grad_info, params, backend = inputs
    ctx.save_for_backward(logits, tau, targets, row_stats, grad_info)
    ctx.params = tuple(params)
    ctx.reduction = REDUCTIONS["none"] if loss.dim() else REDUCTIONS["mean"]
    ctx.backend = backend


class _NoSecondDerivative(torch.autograd.Function):
    """The identity on a gradient of the kernels, depending on the logits and tau, that raises
    when a second derivative reaches it (as the C++ step's ``NoSecondDerivative``,
    ``csrc/loss_step.cpp``): under ``create_graph=True`` the kernels' gradients would otherwise
    join the graph as constants, whose derivative is silently 0."""

    @staticmethod
    def forward(ctx, grad, logits, tau):
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("mitkernels: the loss's kernels have no second derivative (a gradient "
                           "of its gradient, taken with create_graph=True); backend='reference' "
                           "has one")


def _backward_with(ctx, grad_loss, loss_backward):
    logits, tau, targets, row_stats, grad_info = ctx.saved_tensors
    needs_logits, needs_tau = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (needs_logits or needs_tau):
        return (None,) * 8
    t_eps, t_min, t_max, ignore_index = ctx.params
    grad_logits, grad_tau = loss_backward(
        grad_loss.contiguous(), logits, targets, tau, row_stats, grad_info, t_eps, t_min, t_max,
        int(ignore_index), ctx.reduction, needs_tau)
    if torch.is_grad_enabled():  # create_graph=True
        grad_logits = _NoSecondDerivative.apply(grad_logits, logits, tau)
        grad_tau = _NoSecondDerivative.apply(grad_tau, logits, tau)
    return (None, grad_logits if needs_logits else None, grad_tau if needs_tau else None,
            None, None, None, None, None)


def _backward(ctx, grad_loss):
    return _backward_with(ctx, grad_loss, lambda *args: torch.ops.mitkernels.loss_backward(
        *args, ctx.backend))


torch.library.register_autograd("mitkernels::loss_with_grad", _backward, setup_context=_setup_context)


class EagerLossWithGrad(torch.autograd.Function):
    """``loss_with_grad`` for eager calls: the same context and backward as the registered op,
    calling the backend's kernels directly.

    torch.library's generic autograd wrapper and the Python routing op cost a few hundred
    microseconds per step, more than the kernels themselves on a 32-row batch. Eager Triton
    calls take this path when the extension is missing (with it, ``triton_loss_step_``'s C++
    node serves them: ``functional._triton_step_op``), and distributed eager calls of every
    backend; traced calls (torch.compile) use the registered ops, which the compiler needs. All
    run the same kernels on the same arguments.
    """

    @staticmethod
    def forward(ctx, loss, logits, tau, targets, row_stats, grad_info, params, backend):
        _setup_context(ctx, (loss, logits, tau, targets, row_stats, grad_info, params, backend),
                       None)
        ctx.kernels = _backends.get(backend, logits.device)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward_with(ctx, grad_loss, ctx.kernels.loss_backward)


__all__ = [
    "EAGER_SCHEMAS", "INDEX_DTYPES", "KERNEL_SCHEMAS", "KIND_CCT", "KIND_MIT", "KIND_TET",
    "LOGITS_DTYPES", "REDUCTIONS",
    "ROW_STATS_FIELDS", "STATS_FIELDS", "TRITON_KERNEL_OPS", "acc_dtype", "summary_size",
]
