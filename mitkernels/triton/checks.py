"""The op contract's input checks for the Triton launchers: ``csrc/op_checks.h`` in Python.

The public ops (``torch.ops.mitkernels.*``) take any tensors, and route them to a backend. The
C++ backends check every input before anything is written (``csrc/op_checks.h``). The Triton
kernels trust their arguments: a short state vector, short targets or row statistics of
another batch made them write or read past a buffer. So the launchers run the same checks, with
the same messages (``mitkernels (triton)::`` for ``mitkernels_C::``), and raise RuntimeError as
TORCH_CHECK does. ``mitkernels.functional`` makes valid arguments, so these never fail there.
They cost a few microseconds a call, which an eager step of a small batch, bound by its host
time, notices; a launch plan's replay (``MITKERNELS_TRITON_LAUNCH=cpp``) skips them, since its
inputs have the recorded call's signature.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from mitkernels.ops import INDEX_DTYPES as _INDEX_DTYPES
from mitkernels.ops import (KIND_CCT, KIND_MIT, KIND_TET, LOGITS_DTYPES, ROW_STATS_FIELDS,
                            SUMMARY_HEADER)

_FLOAT_DTYPES = (torch.float32, torch.float64)
_SCALAR_DTYPES = (torch.float64, torch.float32, torch.int64, torch.int32)
_ROW_STATS = len(ROW_STATS_FIELDS)
_DTYPE_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
                torch.float64: "Double", torch.int64: "Long", torch.int32: "Int"}


def _fail(op: str, message: str) -> None:
    raise RuntimeError(f"mitkernels (triton)::{op}: {message}")


def _name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype))


def _on(t: Tensor, device: torch.device, op: str, name: str) -> None:
    if t.device != device:
        _fail(op, f"{name} must be on {device}, got {t.device}")


def row_inputs(logits: Tensor, targets: Tensor, tau: Tensor,
               op: str) -> Tuple[int, int, int, int, int]:
    """``check_row_inputs``: returns ``(N, C, S, R, K)``."""
    _on(targets, logits.device, op, "targets")
    _on(tau, logits.device, op, "tau")
    if logits.dim() != 3:
        _fail(op, f"logits must be [N, C, S], got shape {list(logits.shape)}")
    if logits.dtype not in LOGITS_DTYPES:
        _fail(op, "logits must be float16, bfloat16, float32 or float64, got "
                  f"{_name(logits.dtype)}")
    n, c, s = logits.shape
    if c < 1:
        _fail(op, f"logits need at least one class, got C = {c}")
    if targets.dim() != 1 or targets.numel() != n * s:
        _fail(op, f"targets must be [N*S] = [{n * s}], got shape {list(targets.shape)}")
    if targets.dtype not in _INDEX_DTYPES:
        _fail(op, f"targets must be int64 or int32, got {_name(targets.dtype)}")
    if tau.dim() != 1 or tau.numel() not in (1, c):
        _fail(op, f"tau must be [1] or [C] = [{c}], got shape {list(tau.shape)}")
    if tau.dtype not in _FLOAT_DTYPES:
        _fail(op, f"tau must be float32 or float64, got {_name(tau.dtype)}")
    return n, c, s, n * s, tau.numel()


def summaries(summary: Tensor, local: Optional[Tensor]) -> int:
    """``check_summaries``: returns the summary's length."""
    op = "finalize_"
    if summary.dtype != torch.float64 or summary.dim() != 1:
        _fail(op, f"summary must be a float64 vector, got {_name(summary.dtype)} "
                  f"{list(summary.shape)}")
    if local is not None:
        _on(local, summary.device, op, "local_summary")
        if local.dtype != torch.float64 or local.numel() != summary.numel():
            _fail(op, f"local_summary must be float64 like summary ([{summary.numel()}]), got "
                      f"{_name(local.dtype)} {list(local.shape)}")
    return summary.numel()


def _state_vec(t: Tensor, device: torch.device, classes: int, what: str) -> None:
    _on(t, device, "finalize_", what)
    if t.dtype != torch.float64 or t.dim() != 1 or t.numel() != classes or not t.is_contiguous():
        _fail("finalize_", f"{what} must be a contiguous float64 [C] = [{classes}] tensor, got "
                           f"{_name(t.dtype)} {list(t.shape)}"
                           f"{'' if t.is_contiguous() else ' (not contiguous)'}")


def _state_scalar(t: Tensor, device: torch.device, what: str) -> None:
    _on(t, device, "finalize_", what)
    if t.numel() != 1:
        _fail("finalize_", f"{what} must hold one value, got shape {list(t.shape)}")
    if t.dtype not in _SCALAR_DTYPES:
        _fail("finalize_", f"{what} must be float64/float32/int64/int32, got {_name(t.dtype)}")


def finalize_inputs(summary_size: int, row_stats: Tensor, tau: Tensor, state: Sequence[Tensor],
                    kind: int, hparams: Sequence[float], reduction: int,
                    loss_dtype: torch.dtype, device: torch.device) -> int:
    """``check_finalize_inputs``: returns C, the number of classes."""
    op = "finalize_"
    _on(row_stats, device, op, "row_stats")
    _on(tau, device, op, "tau")
    _kind_and_reduction(kind, reduction)
    if tau.dim() != 1 or tau.numel() < 1 or tau.dtype not in _FLOAT_DTYPES:
        _fail(op, "tau must be a float32/float64 [K] tensor")
    if row_stats.dim() != 2 or row_stats.shape[0] != _ROW_STATS or \
            row_stats.dtype not in _FLOAT_DTYPES:
        _fail(op, f"row_stats must be float32/float64 [{_ROW_STATS}, R], got "
                  f"{_name(row_stats.dtype)} {list(row_stats.shape)}")
    k = tau.numel()
    classes = summary_size - SUMMARY_HEADER if k == 1 else k
    if classes < 1 or summary_size != SUMMARY_HEADER + (classes if k == 1 else 3 * classes):
        _fail(op, f"summary has {summary_size} entries, which fits neither [5 + C] (one "
                  f"temperature) nor [5 + 3C] with C = K = {k}")
    state_and_options(state, kind, hparams, loss_dtype, classes, device)
    return classes


def _kind_and_reduction(kind: int, reduction: int) -> None:
    op = "finalize_"
    if kind not in (KIND_MIT, KIND_TET, KIND_CCT):
        _fail(op, f"kind must be 0 (MiT), 1 (TET) or 2 (CCT-EAL), got {kind}")
    if reduction not in (0, 1, 2):
        _fail(op, f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    if kind == KIND_CCT and reduction == 0:
        _fail(op, "reduction 'none' is not defined for CCT-EAL")


def state_and_options(state: Sequence[Tensor], kind: int, hparams: Sequence[float],
                      loss_dtype: torch.dtype, classes: int, device: torch.device,
                      reduction: Optional[int] = None) -> None:
    """The finalize's state, hparams and loss dtype (and kind and reduction when given: a
    forward, whose row statistics the launcher makes itself)."""
    op = "finalize_"
    if reduction is not None:
        _kind_and_reduction(kind, reduction)
    # before any kernel runs: the loss is stored after the state update
    if loss_dtype not in LOGITS_DTYPES:
        _fail(op, "loss_dtype must be float16, bfloat16, float32 or float64, got "
                  f"{_name(loss_dtype)}")
    if kind == KIND_MIT:
        if len(state) != 4:
            _fail(op, "MiT state is [class_counts, total_seen, lambda_entropy, dual_updates], "
                      f"got {len(state)} tensors")
        _state_vec(state[0], device, classes, "class_counts")
        for t, what in zip(state[1:], ("total_seen", "lambda_entropy", "dual_updates")):
            _state_scalar(t, device, what)
        if len(hparams) != 0:
            _fail(op, f"MiT hparams are [], got {len(hparams)} values")
    elif kind == KIND_TET:
        if len(state) != 0:
            _fail(op, f"TET state is [], got {len(state)} tensors")
        if len(hparams) != 1:  # exactly: the kernels take two and would drop a third
            _fail(op, f"TET hparams are [lambda], got {len(hparams)} values")
    else:
        if len(state) != 2:
            _fail(op, f"CCT-EAL state is [label_freq_ema, alpha], got {len(state)} tensors")
        _state_vec(state[0], device, classes, "label_freq_ema")
        _state_scalar(state[1], device, "alpha")
        if len(hparams) != 2:
            _fail(op, f"CCT-EAL hparams are [ema_momentum, entropy_eps], got {len(hparams)} "
                      "values")


_MIT_STATE = ("class_counts", "total_seen", "lambda_entropy", "dual_updates")


def mark_state_written(state: Sequence[Tensor], kind: int, update_state: bool) -> None:
    """``mark_state_written``: the state tensors the finalize writes get their version counters
    bumped, as a torch in-place op bumps them, before the kernels write them through pointers
    autograd cannot see; one made under inference mode is refused outside it."""
    if not update_state or kind == KIND_TET:
        return
    names = _MIT_STATE if kind == KIND_MIT else ("label_freq_ema",)
    if not torch.is_inference_mode_enabled():
        for t, name in zip(state, names):
            if t.is_inference():
                _fail("finalize_", f"{name} was made under torch.inference_mode() and cannot be "
                                   "updated in place outside it: make the state outside "
                                   "inference mode (or pass update_state=False)")
    increment_version(list(state[:len(names)]))


def backward_inputs(grad_loss: Tensor, row_stats: Tensor, grad_info: Tensor, rows: int,
                    temperatures: int, acc: torch.dtype, reduction: int,
                    device: torch.device) -> None:
    """``check_backward_inputs``."""
    op = "loss_backward"
    _on(grad_loss, device, op, "grad_loss")
    _on(row_stats, device, op, "row_stats")
    _on(grad_info, device, op, "grad_info")
    if reduction not in (0, 1, 2):
        _fail(op, f"reduction must be 0, 1 or 2, got {reduction}")
    if row_stats.dim() != 2 or tuple(row_stats.shape) != (_ROW_STATS, rows) or \
            row_stats.dtype != acc:
        _fail(op, f"row_stats must be {_name(acc)} [{_ROW_STATS}, {rows}], got "
                  f"{_name(row_stats.dtype)} {list(row_stats.shape)}")
    if grad_info.dim() != 1 or grad_info.numel() != 2 + temperatures or \
            not grad_info.is_floating_point():
        _fail(op, f"grad_info must be floating [2 + K] = [{2 + temperatures}], got "
                  f"{_name(grad_info.dtype)} {list(grad_info.shape)}")
    if not grad_loss.is_floating_point():
        _fail(op, f"grad_loss must be floating, got {_name(grad_loss.dtype)}")
    if reduction == 0 and grad_loss.numel() != rows:
        _fail(op, f"grad_loss must be [R] = [{rows}] for reduction 'none', got "
                  f"{list(grad_loss.shape)}")
    if reduction != 0 and grad_loss.numel() != 1:
        _fail(op, f"grad_loss must be a scalar for reduction 'mean'/'sum', got "
                  f"{list(grad_loss.shape)}")
