"""``nn.Module`` losses holding their state as a parameter and buffers with the published names."""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _backends, functional
from .calibration import calibrate_temperature
from .state import (STATE_BUFFERS, check_cct_statistics, check_loaded_entry,
                    check_num_classes, convert_published_state_dict, initial_buffers,
                    tau_for_temperature)
from .reference import MIT_T_MAX, MIT_T_MIN
from .reference import temperature as _temperature


def _options_repr(module) -> str:
    """The options a loss module was built with, those that are not the defaults."""
    parts = [f"ignore_index={module.ignore_index}"] if module.ignore_index != -100 else []
    if module.reduction != "mean":
        parts.append(f"reduction={module.reduction!r}")
    if module.backend is not None:
        parts.append(f"backend={module.backend!r}")
    if getattr(module, "process_group", None) is not None:
        parts.append("process_group=<given>")
    return "".join(", " + p for p in parts)


class _ExactStateModule(nn.Module):
    """Keeps the running statistics in float64, and the temperature parameter in float32 or
    float64, whatever ``.half()``, ``.bfloat16()`` or ``.to(dtype)`` ask: a model wrapper that
    holds the loss can be cast to 16 bits as a whole (the kernels read 16-bit logits as they are
    and compute in float32)."""

    _exact_buffers: Tuple[str, ...] = ()
    _temperature_parameter: str = ""

    def _apply(self, fn, recurse=True):
        # Copies taken before super()._apply, which rounds what a cast reaches: after a cast, the
        # old values (not their rounding: 16 bits hold no count past 2048, float16 none past
        # 65504) go back, on the new device. All are a few numbers a class.
        param = self._parameters.get(self._temperature_parameter)
        keep = {name: self._buffers[name].clone() for name in self._exact_buffers
                if self._buffers.get(name) is not None}
        if param is not None:
            keep[""] = param.detach().clone()
            if param.grad is not None:
                keep[".grad"] = param.grad.detach().clone()
        super()._apply(fn, recurse)
        param = self._parameters.get(self._temperature_parameter)
        if param is not None and param.dtype not in (torch.float32, torch.float64):
            with torch.no_grad():
                param.data = keep[""].to(param.device)
                if param.grad is not None:
                    param.grad = keep[".grad"].to(param.device)
        for name in self._exact_buffers:
            buf = self._buffers[name]
            if buf is not None and buf.dtype != torch.float64:
                self._buffers[name] = keep[name].to(buf.device)
        return self


class MiTLoss(_ExactStateModule):
    """The MiT loss as a module: ``loss, stats = criterion(logits, targets)``.

    Holds the parameter ``tau`` (give it to the optimizer with the model's parameters) and the
    buffers ``class_counts``, ``total_seen``, ``lambda_entropy``, ``dual_updates`` under the names
    of the published ``MiTLoss_WithTrainCalibration``, so its state dicts load here.

    Unlike the published code, the running statistics are updated in training mode only (like
    BatchNorm): the published criterion also updated them on validation batches, which leaks the
    test labels into ``H*``. Call ``criterion.eval()`` when evaluating.

    What to expect: each dual step adds ``max(0, (H* - H) / log C)``, and an accurate model's mean
    predictive entropy ``H`` is far below the label entropy ``H*``, so ``lambda`` climbs to its
    clamp of 0.5. The entropy bonus then keeps predictions away from certainty: the published
    loss trades sharpness (NLL, ECE) for a softer, entropy-matched output (see the demo).

    The criterion is not a submodule of the model, so ``model.eval()`` does not reach it: call
    ``criterion.eval()`` too (or register it on a module that holds both).

    Args:
        num_classes: ``C >= 2``.
        temperature: initial ``T``; see :meth:`calibrate_` to start from the calibrated one.
        ignore_index, reduction, process_group, backend: as in :func:`mitkernels.mit_loss`.
    """

    _exact_buffers = ("class_counts", "total_seen", "lambda_entropy")
    _temperature_parameter = "tau"

    def __init__(self, num_classes: int, temperature: float = 1.0, *, ignore_index: int = -100,
                 process_group=None, backend: Optional[str] = None, reduction: str = "mean"):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        functional.check_options(ignore_index, reduction)
        self.ignore_index = ignore_index
        self.process_group = process_group
        _backends.check_name(backend)
        self.backend = backend
        self.reduction = reduction
        self.tau = nn.Parameter(torch.tensor(tau_for_temperature(float(temperature))))
        for name, value in initial_buffers(self.num_classes).items():
            self.register_buffer(name, value)

    @property
    def temperature(self) -> Tensor:
        """The temperature ``T`` the next step uses (detached)."""
        return _temperature(self.tau.detach())

    def forward(self, logits: Tensor, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(loss, stats)`` of one step (:func:`mitkernels.mit_loss`); the state is updated in
        training mode only."""
        return functional.mit_loss(
            logits, targets, self, backend=self.backend, update_state=self.training,
            ignore_index=self.ignore_index, reduction=self.reduction,
            process_group=self.process_group)

    def calibrate_(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Set ``tau`` so that ``T`` is the NLL-optimal temperature of ``logits`` (rows whose
        label is ``ignore_index`` left out); returns that temperature.

        ``T`` then equals it to the precision of ``tau``'s dtype (float32 by default: within a
        few parts in 10^7). Calibrate on the logits of a model with some skill (after a short
        warm-up with plain CE, as the published recipe does): an untrained model's optimum sits
        at the upper bound, where ``softplus`` is the identity and ``tau`` would have to travel
        hundreds of units to come back. A result on either bound is warned about. With a
        ``process_group``, every rank calls it with its part of the logits, and every rank sets
        the same ``tau``: the optimum over the rows of all.
        """
        functional.check_class_count(logits, self.num_classes)  # as the loss itself refuses
        t_opt = calibrate_temperature(logits, labels, backend=self.backend,
                                      ignore_index=self.ignore_index,
                                      process_group=self.process_group)
        if float(t_opt) == MIT_T_MAX:
            warnings.warn(f"the calibrated temperature sits on its upper bound ({MIT_T_MAX:g}): "
                          "the logits show no usable skill; calibrate after a short warm-up",
                          stacklevel=2)
        elif float(t_opt) == MIT_T_MIN:
            warnings.warn(f"the calibrated temperature sits on its lower bound ({MIT_T_MIN:g}): "
                          "the logits separate these labels perfectly, so the NLL keeps falling "
                          "as T shrinks; calibrate on held-out logits", stacklevel=2)
        with torch.no_grad():
            self.tau.fill_(tau_for_temperature(float(t_opt)))
        return t_opt

    @torch.no_grad()
    def scale_logits(self, logits: Tensor) -> Tensor:
        """``logits / T``: what the model predicts with this loss's temperature."""
        return logits / self.temperature.to(logits.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Accept the published criterion's dicts: float32 counts, scalar shapes, stray model.* keys.
        if not all(prefix + k in state_dict for k in ("tau", *STATE_BUFFERS)):
            # a partial dict (strict=False): each entry it has, checked on its own
            for k in ("tau", *STATE_BUFFERS):
                if prefix + k in state_dict:
                    check_loaded_entry(k, state_dict[prefix + k])
        else:
            converted = convert_published_state_dict(state_dict, self.num_classes, prefix)
            for key in [k for k in state_dict if k.startswith(prefix + "model.")]:
                del state_dict[key]
            for name, value in converted.items():
                own = getattr(self, name)
                state_dict[prefix + name] = value.reshape(own.shape).to(own.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}{_options_repr(self)}"


class TETLoss(nn.Module):
    """TET as a module: ``loss, stats = criterion(logits, targets)`` with
    ``CE(x / T, y) - lambda * H(softmax(x / T))``, ``T`` and ``lambda`` fixed; no state and no
    parameter (nothing to give the optimizer).

    Args:
        temperature: ``T``, a number in ``[1e-3, 500]`` (the range MiT clamps its ``T`` to).
        lambda_entropy: the entropy weight, a finite number (negative rewards certainty).
        ignore_index, reduction, backend: as in :func:`mitkernels.mit_loss`.

    Under ``torch.compile`` both numbers are constants of the graph: assigning a new
    ``temperature`` compiles a new one (see the README's torch.compile section).
    """

    def __init__(self, temperature: float = 0.5, lambda_entropy: float = 0.1, *,
                 ignore_index: int = -100, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        functional.check_tet_options(temperature, lambda_entropy)
        functional.check_options(ignore_index, reduction)
        self.temperature = float(temperature)
        self.lambda_entropy = float(lambda_entropy)
        self.ignore_index = ignore_index
        self.reduction = reduction
        _backends.check_name(backend)
        self.backend = backend

    @torch.no_grad()
    def scale_logits(self, logits: Tensor) -> Tensor:
        """``logits / T`` with the fixed temperature."""
        return logits / self.temperature

    def forward(self, logits: Tensor, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(loss, stats)``, as :func:`mitkernels.tet_loss`."""
        return functional.tet_loss(logits, targets, self.temperature, self.lambda_entropy,
                                   backend=self.backend, ignore_index=self.ignore_index,
                                   reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, lambda_entropy={self.lambda_entropy}"
                f"{_options_repr(self)}")


class CCTEALLoss(_ExactStateModule):
    """CCT-EAL as a module: class-conditional temperatures and squared entropy alignment.

    Holds ``tau_c`` (``[C]`` parameter, starting where ``softplus(tau_c) = 1``) and the buffers
    ``label_freq_ema`` (``[C]``, starting uniform) and ``alpha_t`` (the current weight, set by
    :meth:`set_progress`), under the published names. The EMA is updated in training mode only.

    ``alpha_t`` starts at ``alpha_max``: without :meth:`set_progress` there is no warm-up. Call
    ``set_progress(epoch / epochs)`` each epoch for the published linear warm-up.
    """

    _exact_buffers = ("label_freq_ema", "alpha_t")
    _temperature_parameter = "tau_c"

    def __init__(self, num_classes: int, alpha_max: float = 8.0, ema_momentum: float = 0.9,
                 T_min: float = 0.75, T_max: float = 1.5, eps: float = 1e-12, *,
                 ignore_index: int = -100, reduction: str = "mean", process_group=None,
                 backend: Optional[str] = None):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        if not 0.0 <= float(alpha_max) < math.inf:
            raise ValueError(f"alpha_max must be finite and >= 0, got {alpha_max}")
        functional.check_cct_options(reduction, ema_momentum, T_min, T_max, eps)
        functional.check_options(ignore_index, reduction)
        self.alpha_max = float(alpha_max)
        self.ema_momentum = float(ema_momentum)
        self.T_min, self.T_max, self.eps = float(T_min), float(T_max), float(eps)
        self.ignore_index, self.reduction = ignore_index, reduction
        _backends.check_name(backend)
        self.process_group, self.backend = process_group, backend
        num_classes = self.num_classes
        self.tau_c = nn.Parameter(torch.full((num_classes,), math.log(math.expm1(1.0))))
        self.register_buffer("label_freq_ema",
                             torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64))
        # The published code kept alpha_t as a Python float; a buffer lets set_progress change it
        # without recompiling a graph that reads it.
        self.register_buffer("alpha_t", torch.tensor(self.alpha_max, dtype=torch.float64))

    def set_progress(self, progress: float, warmup_ratio: float = 0.3) -> None:
        """Warm ``alpha_t`` linearly from 0 to ``alpha_max`` over the first ``warmup_ratio``."""
        progress = min(1.0, max(0.0, float(progress)))
        if progress < warmup_ratio:
            value = self.alpha_max * (progress / max(warmup_ratio, 1e-6))
        else:
            value = self.alpha_max
        self.alpha_t.fill_(value)

    def class_temperatures(self) -> Tensor:
        """``T_c = clamp(softplus(tau_c), T_min, T_max)`` (detached)."""
        return _temperature(self.tau_c.detach(), 0.0, self.T_min, self.T_max)

    def forward(self, logits: Tensor, targets: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``(loss, stats)`` of one step (:func:`mitkernels.cct_eal_loss`); the EMA is updated in
        training mode only."""
        return functional.cct_eal_loss(
            logits, targets, self.tau_c, self.label_freq_ema, self.alpha_t,
            ema_momentum=self.ema_momentum, entropy_eps=self.eps, t_min=self.T_min,
            t_max=self.T_max, backend=self.backend, update_state=self.training,
            ignore_index=self.ignore_index, reduction=self.reduction,
            process_group=self.process_group)

    @torch.no_grad()
    def scale_logits(self, logits: Tensor, targets: Optional[Tensor] = None) -> Tensor:
        """Temperature-scaled logits for evaluation without the labels.

        The published ``scale_logits`` divided each row by ``T`` of its *true* class, so evaluation
        metrics saw the labels. Here each row is scaled by the temperature of its *predicted* class
        (``argmax``, the same for every temperature since ``T > 0``). ``targets`` is accepted and
        ignored, for drop-in use.
        """
        t_c = self.class_temperatures().to(logits.dtype)
        return logits / t_c[logits.argmax(dim=1)].unsqueeze(1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A NaN or negative EMA, or a NaN alpha, would be carried into every later step: refused
        # before anything is copied.
        check_cct_statistics(state_dict.get(prefix + "label_freq_ema"),
                             state_dict.get(prefix + "alpha_t"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, alpha_max={self.alpha_max}, "
                f"ema_momentum={self.ema_momentum}, T_min={self.T_min}, T_max={self.T_max}"
                f"{_options_repr(self)}")
