"""The eager specification of the MiT loss family: the one oracle the kernels are tested against.

Readable PyTorch, differentiated by autograd (never by the closed forms the kernels use), so a
test comparing a kernel with this module checks the derivation as well as the code.

* ``mit_step``: one step of the published ``MiTLoss_WithTrainCalibration`` (Pan & Wang 2025),
  quirks included: counts start at ones, ``dual_updates`` starts at 0 so the first step overwrites
  lambda, lambda is updated from this batch (under no_grad) before the loss, ``H_max = log C``.
* ``tet_loss``: TET, fixed temperature and fixed entropy weight.
* ``cct_eal_step``: CCT-EAL, class-conditional temperature and squared entropy alignment.

Extensions over the published code, shared by all three: ``ignore_index`` (ignored rows take no
part anywhere, counts included), ``reduction`` in {"mean", "sum", "none"} (the entropy term
follows the same reduction), ``[N, C, d1, ...]`` logits, and a state update that is skipped when
the batch has no valid row or its statistics are not finite.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

MIT_T_EPS, MIT_T_MIN, MIT_T_MAX = 1e-6, 1e-3, 500.0
MIT_LAMBDA_MAX = 0.5  # the dual update keeps lambda in [0, MIT_LAMBDA_MAX]


def temperature(tau: Tensor, t_eps: float = MIT_T_EPS, t_min: float = MIT_T_MIN,
                t_max: float = MIT_T_MAX) -> Tensor:
    """``T = clamp(softplus(tau) + t_eps, t_min, t_max)`` (the published MiT parametrisation)."""
    return (F.softplus(tau) + t_eps).clamp(t_min, t_max)


def flatten_rows(logits: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """``[N, C, d1, ..]`` logits and ``[N, d1, ..]`` targets as ``[R, C]`` rows and ``[R]`` targets."""
    num_classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(-1, num_classes)
    return rows, targets.reshape(-1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half inputs are computed in float32, as F.cross_entropy does under autocast.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_terms(logits: Tensor, targets: Tensor, row_temperature: Tensor, ignore_index: int):
    """Per-row cross-entropy and entropy of ``softmax(x / T)``, and the valid-row mask."""
    x, y = flatten_rows(logits, targets)
    x = x.to(_compute_dtype(logits.dtype))
    y = y.long()  # int32 targets compared with ignore_index in 64 bits: 2**32 + 1 is not 1
    valid = y != ignore_index
    safe_y = torch.where(valid, y, torch.zeros_like(y))
    t_rows = row_temperature(safe_y).to(x.dtype)
    log_p = F.log_softmax(x / t_rows.unsqueeze(1), dim=1)
    ce_rows = -log_p.gather(1, safe_y.unsqueeze(1)).squeeze(1)
    h_rows = -(log_p.exp() * log_p).sum(dim=1)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, ce_rows, zero), torch.where(valid, h_rows, zero), valid, safe_y


def _reduce(ce_rows: Tensor, h_rows: Tensor, valid: Tensor, reduction: str, entropy_coef,
            shape) -> Tensor:
    """CE minus ``entropy_coef`` times H, reduced the way F.cross_entropy reduces
    (``reduction='none'`` keeps the targets' ``shape``)."""
    rows = ce_rows - entropy_coef * h_rows
    if reduction == "none":
        return torch.where(valid, rows, torch.zeros_like(rows)).reshape(shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / valid.sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _means(ce_rows: Tensor, h_rows: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    count = valid.sum()
    denom = count.clamp_min(1).to(ce_rows.dtype)
    return ce_rows.sum() / denom, h_rows.sum() / denom, count


def _entropy(p: Tensor) -> Tensor:
    return -torch.xlogy(p, p).sum()


def _histogram(safe_y: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    # A fixed-size scatter: no data-dependent output size, exact in float64.
    hist = torch.zeros(num_classes, dtype=torch.float64, device=safe_y.device)
    return hist.index_add_(0, safe_y, valid.to(torch.float64))


def _assign(dst: Tensor, src: Tensor) -> None:
    # Through a 1-D view: torch.compile (2.13) drops a copy_ into a 0-dim float64 input.
    dst.view(-1).copy_(src.reshape(-1))


def mit_step(logits: Tensor, targets: Tensor, tau: Tensor, class_counts: Tensor,
             total_seen: Tensor, lambda_entropy: Tensor, dual_updates: Tensor, *,
             ignore_index: int = -100, reduction: str = "mean",
             update_state: bool = True) -> Tuple[Tensor, Dict[str, Tensor]]:
    """One published MiT step. Mutates the four state tensors in place (when ``update_state``).

    Args:
        logits: ``[N, C]`` or ``[N, C, d1, ...]``.
        targets: ``[N]`` or ``[N, d1, ...]`` class indices (or ``ignore_index``).
        tau: ``[1]`` or ``[]`` learnable temperature parameter.
        class_counts: ``[C]`` running class histogram (starts at ones).
        total_seen, lambda_entropy, dual_updates: scalars.

    Returns:
        ``(loss, stats)`` with stats ``loss, ce, H, H_star, lambda, T, updated, valid``.
    """
    num_classes = logits.shape[1]
    t = temperature(tau.reshape(-1)[:1])
    ce_rows, h_rows, valid, safe_y = _row_terms(logits, targets, lambda y: t.expand(y.shape),
                                               ignore_index)
    ce, h, count = _means(ce_rows, h_rows, valid)
    with torch.no_grad():
        hist = _histogram(safe_y, valid, num_classes)
        ok = (count > 0) & torch.isfinite(ce) & torch.isfinite(h)
        do_update = ok & update_state
        counts_new = torch.where(do_update, class_counts + hist, class_counts)
        h_star = _entropy(counts_new / counts_new.sum())
        # held at int64's largest count rather than wrap (a state dict can hold any count)
        n_new = torch.where(dual_updates < torch.iinfo(torch.int64).max, dual_updates + 1,
                            dual_updates)
        gap = ((h_star - h.detach().double()) / math.log(num_classes)).clamp_min(0.0)
        lam_new = ((lambda_entropy * (n_new - 1) + gap) / n_new).clamp(0.0, MIT_LAMBDA_MAX)
        lam = torch.where(do_update, lam_new, lambda_entropy)
        if update_state:  # else nothing is written (nor marked written, for autograd)
            _assign(class_counts, counts_new)
            _assign(total_seen, torch.where(do_update, total_seen + count, total_seen))
            _assign(dual_updates, torch.where(do_update, n_new, dual_updates))
            _assign(lambda_entropy, lam)
    entropy_coef = lam.to(ce_rows.dtype)
    loss = _reduce(ce_rows, h_rows, valid, reduction, entropy_coef, targets.shape)
    loss_mean = ce - entropy_coef * h
    stats = {"loss": loss_mean, "ce": ce, "H": h, "H_star": h_star, "lambda": lam, "T": t[0],
             "updated": do_update, "valid": count}
    return loss, {k: v.detach() for k, v in stats.items()}


def tet_loss(logits: Tensor, targets: Tensor, temperature: float = 0.5,
             lambda_entropy: float = 0.1, *, ignore_index: int = -100,
             reduction: str = "mean") -> Tuple[Tensor, Dict[str, Tensor]]:
    """TET: ``CE(x / T) - lambda * H(softmax(x / T))`` with fixed ``T`` and ``lambda``."""
    t = torch.tensor(float(temperature), dtype=torch.float64, device=logits.device)
    ce_rows, h_rows, valid, _ = _row_terms(logits, targets, lambda y: t.expand(y.shape),
                                           ignore_index)
    ce, h, count = _means(ce_rows, h_rows, valid)
    loss = _reduce(ce_rows, h_rows, valid, reduction, lambda_entropy, targets.shape)
    stats = {"loss": ce - lambda_entropy * h, "ce": ce, "H": h,
             "lambda": torch.tensor(float(lambda_entropy), dtype=torch.float64, device=logits.device),
             "T": t, "valid": count}
    return loss, {k: v.detach() for k, v in stats.items()}


def cct_eal_step(logits: Tensor, targets: Tensor, tau_c: Tensor, label_freq_ema: Tensor,
                 alpha: Tensor, *, ema_momentum: float = 0.9, entropy_eps: float = 1e-12,
                 t_min: float = 0.75, t_max: float = 1.5, ignore_index: int = -100,
                 reduction: str = "mean",
                 update_state: bool = True) -> Tuple[Tensor, Dict[str, Tensor]]:
    """CCT-EAL: ``CE(x / T_y) + alpha * (H - H*)^2``, ``T_c = clamp(softplus(tau_c), T_min, T_max)``.

    ``H*`` is the entropy of an EMA of the batch label frequencies, updated from this batch first
    (when ``update_state``). ``reduction='sum'`` is ``B`` times the mean; ``'none'`` is not defined
    because the alignment term is a property of the batch, not of a row.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError("CCT-EAL supports reduction 'mean' or 'sum': its entropy alignment term "
                         f"is a batch quantity, got {reduction!r}")
    num_classes = logits.shape[1]
    t_c = temperature(tau_c, 0.0, t_min, t_max)
    ce_rows, h_rows, valid, safe_y = _row_terms(logits, targets, lambda y: t_c[y], ignore_index)
    ce, h, count = _means(ce_rows, h_rows, valid)
    with torch.no_grad():
        hist = _histogram(safe_y, valid, num_classes)
        ok = (count > 0) & torch.isfinite(ce) & torch.isfinite(h)
        do_update = ok & update_state
        freq = hist / count.clamp_min(1)
        ema_new = ema_momentum * label_freq_ema + (1.0 - ema_momentum) * freq
        if update_state:
            _assign(label_freq_ema, torch.where(do_update, ema_new, label_freq_ema))
        h_star = _entropy(label_freq_ema.clamp_min(entropy_eps))
        t_mean = (hist * t_c.detach().double()).sum() / count.clamp_min(1)
    align = alpha.to(h.dtype) * (h - h_star.to(h.dtype)) ** 2
    loss_mean = ce + align
    if reduction == "mean":
        loss = loss_mean
    else:
        loss = ce_rows.sum() + count * align
    loss = torch.where(count > 0, loss, torch.zeros_like(loss))
    loss_mean = torch.where(count > 0, loss_mean, torch.zeros_like(loss_mean))
    stats = {"loss": loss_mean, "ce": ce, "H": h, "H_pred": h, "H_star": h_star, "alpha_t": alpha,
             "T_mean": t_mean, "updated": do_update, "valid": count}
    return loss, {k: v.detach() for k, v in stats.items()}


def nll_at_temperature(logits: Tensor, labels: Tensor, t: float) -> Tensor:
    """Mean negative log-likelihood of ``softmax(logits / t)``: the calibration objective."""
    return F.cross_entropy(logits.double() / t, labels)


def row_statistics(logits: Tensor, targets: Tensor, t: float) -> Dict[str, Tensor]:
    """Per-row ``CE``, ``H``, ``V`` (variance of ``z`` under ``p``) and ``CE_minus_H`` of
    ``softmax(logits / t)``.

    ``logits`` ``[R, C]``, ``targets`` ``[R]`` (all valid). The calibration's eager path and the
    tests of the row kernels use it. ``CE_minus_H = E_p[z] - z_y`` is formed directly, as the
    kernels form it: at a large ``t`` both CE and H sit near ``log C``, and their difference
    taken from rounded values lost the calibration slope's sign (``calibrate_temperature``
    with bounds up to 1e9 returned the bound where the optimum was 2.66).
    """
    z = logits.to(_compute_dtype(logits.dtype)) / t
    log_p = F.log_softmax(z, dim=1)
    p = log_p.exp()
    mean_z = (p * z).sum(dim=1)
    y = targets.long().unsqueeze(1)
    return {
        "CE": -log_p.gather(1, y).squeeze(1),
        "H": -(p * log_p).sum(dim=1),
        "V": (p * (z - mean_z.unsqueeze(1)) ** 2).sum(dim=1),
        "CE_minus_H": mean_z - z.gather(1, y).squeeze(1),
    }
