"""Temperature initialisation: the exact NLL-optimal temperature of held-out logits.

The published code fits ``T`` with L-BFGS on ``log T`` and stores ``tau = inf`` when the model has
no skill. Here ``T`` is bounded to the clamp range and found by a safeguarded Newton iteration on
``u = log T`` whose derivatives come from the row statistics (docs/KERNEL_MATH.md, section 6)::

    f(u)   = mean_i CE_i                   (CE_i of softmax(x_i / T))
    f'(u)  = -mean_i (CE_i - H_i)
    f''(u) =  mean_i (V_i + CE_i - H_i)

One pass over the logits per iteration, through the row kernel of the fastest backend.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import _backends, distributed, ops, reference
from .state import _caller_stacklevel

DEFAULT_BOUNDS = (reference.MIT_T_MIN, reference.MIT_T_MAX)
_REFERENCE_CHUNK_ROWS = 1 << 16


def _all_reduce(values, device, process_group):
    """The sums over the group's ranks of a few float64 numbers (the values themselves without
    a group). Calibration runs outside the training step: reading them back costs nothing."""
    if process_group is None:
        return list(values)
    import torch.distributed as dist

    # torch only warns when this rank is outside the group, and skips the sum: the rank would
    # quietly calibrate on its own rows. The loss's own check says what is wrong instead.
    distributed.check_member(process_group)
    buf = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buf, group=process_group)
    return buf.tolist()


def _slope_and_curvature(logits: Tensor, labels: Tensor, t: float, backend: str,
                         process_group=None, total_rows: Optional[float] = None
                         ) -> Tuple[float, float]:
    """``f'(log t)`` and ``f''(log t)`` of the mean NLL over the group's rows, in float64."""
    if logits.shape[0] == 0:
        gap_sum = curv_sum = 0.0
    elif backend == "reference":
        sums = torch.zeros(2, dtype=torch.float64)
        for start in range(0, logits.shape[0], _REFERENCE_CHUNK_ROWS):
            rows = reference.row_statistics(logits[start:start + _REFERENCE_CHUNK_ROWS],
                                            labels[start:start + _REFERENCE_CHUNK_ROWS], t)
            gap = rows["CE_minus_H"].double()
            sums += torch.stack([gap.sum(), (gap + rows["V"].double()).sum()]).cpu()
        gap_sum, curv_sum = sums.tolist()
    else:
        tau = torch.zeros(1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32,
                          device=logits.device)
        # The temperature rides on the clamp: clamp(softplus(0) + 0, t, t) == t exactly.
        _, summary = torch.ops.mitkernels.row_stats(
            logits.unsqueeze(-1), labels, tau, 0.0, t, t, -100, backend)
        # The header's sum (CE - H) is formed per row by the kernels: a difference of the sums
        # of CE and H would lose its digits when the logits say little (both near log C).
        _, gap_sum, _, sum_v = summary[:4].tolist()
        curv_sum = gap_sum + sum_v
    gap_sum, curv_sum = _all_reduce((gap_sum, curv_sum), logits.device, process_group)
    n = logits.shape[0] if total_rows is None else total_rows
    return -gap_sum / n, curv_sum / n


def calibrate_temperature(logits: Tensor, labels: Tensor, *,
                          bounds: Tuple[float, float] = DEFAULT_BOUNDS,
                          backend: Optional[str] = None, ignore_index: int = -100,
                          tol: float = 1e-12, max_iter: int = 100, process_group=None) -> Tensor:
    """The temperature minimising ``NLL(softmax(logits / T), labels)`` over ``T`` in ``bounds``.

    Args:
        logits: ``[N, C]`` or ``[N, C, d1, ...]`` held-out logits, shaped as the losses take
            them (any float dtype; computed in float32/float64).
        labels: ``[N]`` or ``[N, d1, ...]`` class indices; rows labelled ``ignore_index`` are
            left out.
        bounds: ``(T_min, T_max)``; the default is the MiT clamp range ``(1e-3, 500)``.
        backend: as in :func:`mitkernels.mit_loss`.
        process_group: a ``torch.distributed`` group whose ranks each hold a part of the
            held-out logits: every rank calls this, and every rank gets the optimum of the
            rows of all (a few float64 numbers all-reduced per iteration). A rank may hold no
            row.

    Masked classes (``-inf`` logits, never at a row's label) take no part, as in the losses; a
    NaN or ``+inf`` logit, or a ``-inf`` one at the label (an infinite NLL), is refused.

    Returns:
        A float64 0-dim tensor, always finite: the interior optimum, or the bound the NLL
        decreases towards (a model with no skill drives ``T`` up, never to infinity). When every
        row's logits are equal (a zero-initialised head, say), the NLL does not depend on ``T``:
        then 1 (within ``bounds``), which leaves the logits as they are, with a warning.
    """
    if not isinstance(logits, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("logits and labels must be torch.Tensors")
    if logits.dim() < 2 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"need logits [N, C] and labels [N] (or [N, C, d1, ...] and "
                         f"[N, d1, ...]), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if logits.dtype not in ops.LOGITS_DTYPES:  # the reference took integer logits; kernels not
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got "
                        f"{logits.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"logits and labels must be on one device, got {logits.device} and "
                         f"{labels.device}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")  # 0 returned T_max
    if not 0.0 <= float(tol) < math.inf:
        raise ValueError(f"tol must be finite and >= 0, got {tol}")
    lo, hi = (float(b) for b in bounds)
    if not 0 < lo < hi or not math.isfinite(hi):
        raise ValueError(f"bounds must satisfy 0 < T_min < T_max < inf, got {bounds}")
    num_classes = logits.shape[1]
    if logits.dim() > 2:  # one row per position, classes last
        logits = logits.movedim(1, -1).reshape(-1, num_classes)
    labels = labels.reshape(-1).long()
    keep = labels != ignore_index
    if not bool(keep.all()):
        logits, labels = logits[keep], labels[keep]
    labels = labels.contiguous()
    name = _backends.choose_for_rows(backend, logits.device, logits.shape[0], num_classes)
    problem = _check_rows(logits, labels, num_classes, ignore_index, name)
    # With a group, every rank learns what any rank found, so that all raise, warn or go on
    # together: a rank that raised alone would leave the others waiting in a collective.
    bad, rows, varied = _all_reduce(
        (problem is not None, logits.shape[0],
         logits.shape[0] > 0 and not _rows_all_equal(logits)),
        logits.device, process_group)
    if bad:
        raise ValueError(problem or "another rank's logits or labels were refused (its error "
                                    "names the problem)")
    if rows == 0:
        raise ValueError("calibration needs at least one row whose label is not ignore_index")
    if not varied:
        # softmax(x / T) is uniform whatever T: no temperature is better than another, and a
        # bound would scale the model's later logits by up to 1000 (or 1/500) for nothing.
        warnings.warn("every row's logits are equal, so the NLL does not depend on T: returning "
                      "T = 1; calibrate on the logits of a model with some skill",
                      stacklevel=_caller_stacklevel())
        return torch.tensor(min(max(1.0, lo), hi), dtype=torch.float64)

    def slope(u: float) -> Tuple[float, float]:
        return _slope_and_curvature(logits, labels, math.exp(u), name, process_group, rows)

    a, b = math.log(lo), math.log(hi)
    fa, ha = slope(a)
    if fa >= 0:
        return torch.tensor(lo, dtype=torch.float64)
    fb, hb = slope(b)
    if fb <= 0:
        return torch.tensor(hi, dtype=torch.float64)
    # f' < 0 at a and > 0 at b: a minimum lies between. Newton from the better end, falling back to
    # bisection whenever the step leaves the bracket or does not shrink it fast enough.
    u, g, h = (a, fa, ha) if -fa < fb else (b, fb, hb)
    for _ in range(max_iter):
        step_ok = h > 0
        u_new = u - g / h if step_ok else 0.5 * (a + b)
        if not (a < u_new < b):
            u_new = 0.5 * (a + b)
        g_new, h_new = slope(u_new)
        if g_new < 0:
            a = u_new
        else:
            b = u_new
        done = abs(u_new - u) <= tol * max(1.0, abs(u_new)) or b - a <= tol
        u, g, h = u_new, g_new, h_new
        if done or g == 0:
            break
    return torch.tensor(math.exp(u), dtype=torch.float64)


def _check_rows(logits: Tensor, labels: Tensor, num_classes: int, ignore_index: int,
                backend: str) -> Optional[str]:
    """What is wrong with this rank's rows (ignored rows already left out), or None."""
    if logits.shape[0] == 0:
        return None
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        return (f"labels must lie in [0, {num_classes}) or equal ignore_index ({ignore_index}); "
                f"found {int(labels[bad][0])}")
    if bool(torch.isnan(logits).any()) or bool((logits == math.inf).any()):
        return "logits must be finite (or -inf at a masked class): found NaN or +inf"
    if bool((logits.gather(1, labels[:, None]) == -math.inf).any()):
        return "a label's logit is -inf: its NLL is infinite at every temperature"
    if backend == "reference" and bool((logits == -math.inf).any()):
        return ("masked (-inf) logits need a kernel backend: the reference, as the published "
                "code, turns their 0 * log 0 into NaN")
    return None


def _rows_all_equal(logits: Tensor) -> bool:
    """Whether every row's logits are equal, but for masked classes' -inf: such a row's softmax
    no temperature changes. Rows with a -inf are looked at again a chunk at a time, so that no
    copy of the logits is made (calibration sets can be gigabytes)."""
    hi, lo = logits.amax(1), logits.amin(1)
    masked = (lo == -math.inf).nonzero().reshape(-1)
    for start in range(0, masked.numel(), _REFERENCE_CHUNK_ROWS):
        rows = masked[start:start + _REFERENCE_CHUNK_ROWS]
        part = logits[rows]
        lo[rows] = part.masked_fill(part == -math.inf, math.inf).amin(1)
    return bool((hi == lo).all())


def _to_device(x, device):
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


@torch.no_grad()
def collect_logits(model: nn.Module, loader, device=None) -> Tuple[Tensor, Tensor]:
    """Run ``model`` over ``loader`` (``(inputs, labels)`` batches) in eval mode, no grad.

    ``inputs`` is a tensor (``model(inputs)``), a tuple or list (``model(*inputs)``) or a dict
    (``model(**inputs)``), moved to ``device`` (default: the model's); ``model`` must return
    the logits tensor. Returns ``(logits, labels)`` concatenated on that device; the model's
    training mode is restored afterwards, even on error.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        all_logits, all_labels = [], []
        for batch in loader:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(f"collect_logits takes a loader of (inputs, labels) pairs; got "
                                f"a batch of type {type(batch).__name__}")
            inputs, labels = _to_device(batch, device)
            if isinstance(inputs, (tuple, list)):
                out = model(*inputs)
            elif isinstance(inputs, dict):
                out = model(**inputs)
            else:
                out = model(inputs)
            if not isinstance(out, Tensor):
                raise TypeError(f"collect_logits needs a model that returns the logits tensor; "
                                f"got a {type(out).__name__} (wrap the model to pick them out)")
            all_logits.append(out)
            all_labels.append(torch.as_tensor(labels, device=device))
    finally:
        model.train(was_training)
    if not all_logits:
        raise ValueError("the loader yielded no batch")
    return torch.cat(all_logits), torch.cat(all_labels)
